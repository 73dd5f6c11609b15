//! `mesh-agent-bench crypto`: how fast this CPU seals and opens full TLS records with the
//! record layer's own code and the suite HBONE negotiates first (AES-128-GCM). It is the floor
//! of the mesh's CPU cost per byte: every byte crossing nodes is sealed once by the source
//! agent and opened once by the destination agent (docs/performance.md, "Where the time goes").

use std::time::{Duration, Instant};

use ring::aead;

use super::{cipher::Protection, content, Error, HEADER_LEN, MAX_PLAINTEXT};

/// Records per round.
const ROUND: usize = 64;

/// What `mesh-agent-bench crypto` measures, on one thread.
#[derive(Debug)]
pub struct CipherBench {
    /// Plaintext bytes sealed per second.
    pub seal_bytes_per_sec: f64,
    /// Plaintext bytes opened per second.
    pub open_bytes_per_sec: f64,
}

impl CipherBench {
    /// CPU seconds to seal and then open one GiB: the mesh's crypto per GiB, both agents.
    pub fn seal_open_cpu_s_per_gib(&self) -> f64 {
        let gib = f64::from(1u32 << 30);
        gib / self.seal_bytes_per_sec + gib / self.open_bytes_per_sec
    }

    /// One JSON line, for xtask.
    pub fn json(&self) -> String {
        format!(
            "{{\"suite\":\"TLS13_AES_128_GCM_SHA256\",\"record_bytes\":{MAX_PLAINTEXT},\
             \"seal_gbyte_per_s\":{:.3},\"open_gbyte_per_s\":{:.3},\
             \"seal_open_cpu_s_per_gib\":{:.3}}}",
            self.seal_bytes_per_sec / 1e9,
            self.open_bytes_per_sec / 1e9,
            self.seal_open_cpu_s_per_gib()
        )
    }
}

/// Seals full records for about `duration`, then opens the same number of them (each one
/// sealed beforehand, so that opening checks real tags).
pub fn run(duration: Duration) -> Result<CipherBench, Error> {
    let protection = || Protection::from_parts(0, &aead::AES_128_GCM, &[0x42; 16], &[0x24; 12]);
    let mut sealer = protection()?;
    let len = MAX_PLAINTEXT + 1;
    let header = record_header(len);
    let mut inner = vec![0xa5u8; len];
    inner[len - 1] = content::APPLICATION_DATA;

    // Seal: the same buffer over and over, as the writer seals in place.
    let start = Instant::now();
    let mut sealed = 0u64;
    while start.elapsed() < duration {
        for _ in 0..ROUND {
            std::hint::black_box(sealer.seal(header, &mut inner)?);
            sealed += 1;
        }
    }
    let seal_secs = start.elapsed().as_secs_f64();

    // Open: a round of records sealed beforehand (sequence numbers 0..ROUND), each copied
    // back before it is opened in place; the copy is timed apart and taken off, so the figure
    // is the cipher's alone. A new opener starts every round at sequence number 0.
    let mut round_sealer = protection()?;
    let mut records = Vec::with_capacity(ROUND);
    for _ in 0..ROUND {
        let mut body = vec![0x5au8; len];
        body[len - 1] = content::APPLICATION_DATA;
        let tag = round_sealer.seal(header, &mut body)?;
        body.extend_from_slice(&tag);
        records.push(body);
    }
    let mut work = vec![0u8; records[0].len()];
    let start = Instant::now();
    let mut opened = 0u64;
    let mut opener = protection()?;
    let mut copy_secs = 0.0;
    while opened < sealed {
        for record in &records {
            let copy = Instant::now();
            work.copy_from_slice(record);
            copy_secs += copy.elapsed().as_secs_f64();
            std::hint::black_box(opener.open(header, &mut work)?);
            opened += 1;
        }
        opener = protection()?;
    }
    let open_secs = (start.elapsed().as_secs_f64() - copy_secs).max(f64::MIN_POSITIVE);
    let bytes = |n: u64| n as f64 * MAX_PLAINTEXT as f64;
    Ok(CipherBench {
        seal_bytes_per_sec: bytes(sealed) / seal_secs,
        open_bytes_per_sec: bytes(opened) / open_secs,
    })
}

/// The header of an application-data record with `inner` bytes of inner plaintext.
fn record_header(inner: usize) -> [u8; HEADER_LEN] {
    let len = u16::try_from(inner + super::cipher::TAG_LEN).unwrap_or(u16::MAX);
    let [hi, lo] = len.to_be_bytes();
    [content::APPLICATION_DATA, 3, 3, hi, lo]
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_both_directions() {
        let b = super::run(std::time::Duration::from_millis(20)).expect("bench");
        assert!(
            b.seal_bytes_per_sec > 0.0 && b.open_bytes_per_sec > 0.0,
            "{b:?}"
        );
        assert!(
            b.json().contains("\"seal_open_cpu_s_per_gib\":"),
            "{}",
            b.json()
        );
    }
}
