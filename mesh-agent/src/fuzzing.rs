//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz), one per parser that sees
//! untrusted input; built with the `fuzzing` feature (and in the unit tests, which replay the
//! seed corpora and every input a fuzzer found through them). Each takes the fuzzer's bytes,
//! drives the agent's real code and panics when an invariant breaks; none does I/O.
//!
//! | entry | drives | input |
//! |---|---|---|
//! | [`record_reader`] | the TLS record reader after the handshake (`tunnel::record`) | a script of records sealed with a known key, raw bytes and corruptions |
//! | [`connect_request`] | the HBONE server's judgement of a CONNECT request (`tunnel::connect`) | method, authority, headers and the pod the tunnel reached |
//! | [`state_file`] | the state file: parsing, validation, build, reload (`discovery::file`) | YAML, optionally a second version after a `0xff` byte |
//! | [`policy`] | AuthorizationPolicy compilation and decisions (`policy`, `discovery::policies`) | YAML, then connections to decide |
//! | [`kube_objects`] | the Kubernetes source's conversion into the state (`discovery::kube::convert`) | a kind, options, then the object as JSON |
//! | [`request_target`] | the waypoint's normalisation of a request's path and host (`waypoint::normalize`) | a selector byte, then the target or host as text |
//!
//! `cargo xtask fuzz` runs them; docs/security.md says what each has found.

mod connect;
mod kube;
mod policy;
mod state;
mod target;
#[cfg(test)]
mod tests;

pub use connect::connect_request;
pub use kube::kube_objects;
pub use policy::policy;
pub use state::state_file;
pub use target::request_target;

pub use crate::tunnel::record::fuzzing::record_reader;

/// Reads a fuzzer's input as a sequence of small fields.
#[derive(Debug)]
pub(crate) struct Input<'a>(pub(crate) &'a [u8]);

impl<'a> Input<'a> {
    pub(crate) fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub(crate) fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }

    /// A field of up to 255 bytes, its length first.
    pub(crate) fn field(&mut self) -> &'a [u8] {
        let n = self.byte().unwrap_or(0);
        self.take(usize::from(n))
    }
}
