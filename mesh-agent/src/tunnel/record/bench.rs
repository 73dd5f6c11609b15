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

/// The record path in memory, ours against rustls's unbuffered API (issue 15's A/B; the lab's
/// scenarios compare the two on sockets with the build feature `rustls-records`): one side
/// seals application data into records, the other frames, opens and hands out the plaintext,
/// on one thread, with the suite HBONE negotiates first (AES-128-GCM).
#[derive(Debug)]
pub struct PathBench {
    /// CPU seconds per GiB through full 16 KiB records: ours, then rustls's.
    pub ours_cpu_s_per_gib: f64,
    pub rustls_cpu_s_per_gib: f64,
    /// Nanoseconds per 1 KiB record (a request or response of the latency scenarios).
    pub ours_ns_per_small_record: f64,
    pub rustls_ns_per_small_record: f64,
}

impl PathBench {
    /// One JSON line, for xtask.
    pub fn json(&self) -> String {
        format!(
            "{{\"ours_path_cpu_s_per_gib\":{:.3},\"rustls_path_cpu_s_per_gib\":{:.3},\
             \"ours_path_ns_per_1k_record\":{:.0},\"rustls_path_ns_per_1k_record\":{:.0}}}",
            self.ours_cpu_s_per_gib,
            self.rustls_cpu_s_per_gib,
            self.ours_ns_per_small_record,
            self.rustls_ns_per_small_record
        )
    }
}

/// A failure of the record-path bench, as text (its own certificates, handshake or records).
type PathResult<T> = Result<T, String>;

/// Measures each path for about `duration` per record size.
pub fn paths(duration: Duration) -> PathResult<PathBench> {
    let gib = f64::from(1u32 << 30);
    let big = vec![0xa5u8; MAX_PLAINTEXT];
    let small = vec![0x5au8; 1 << 10];
    let mut ours = OurPath::new().map_err(|e| e.to_string())?;
    let mut theirs = RustlsPath::new()?;
    // Alternating halves, so that a change of the machine's speed meets both.
    let half = duration / 2;
    let (mut ours_big, mut theirs_big, mut ours_small, mut theirs_small) = (
        Rate::default(),
        Rate::default(),
        Rate::default(),
        Rate::default(),
    );
    for _ in 0..2 {
        ours_big.add(timed(half, || ours.pass(&big).map_err(|e| e.to_string()))?);
        theirs_big.add(timed(half, || theirs.pass(&big))?);
        ours_small.add(timed(half, || {
            ours.pass(&small).map_err(|e| e.to_string())
        })?);
        theirs_small.add(timed(half, || theirs.pass(&small))?);
    }
    let per_gib = |r: &Rate| r.secs / (r.count as f64 * MAX_PLAINTEXT as f64 / gib);
    let ns = |r: &Rate| r.secs * 1e9 / r.count as f64;
    Ok(PathBench {
        ours_cpu_s_per_gib: per_gib(&ours_big),
        rustls_cpu_s_per_gib: per_gib(&theirs_big),
        ours_ns_per_small_record: ns(&ours_small),
        rustls_ns_per_small_record: ns(&theirs_small),
    })
}

/// Records passed and the seconds they took.
#[derive(Default)]
struct Rate {
    count: u64,
    secs: f64,
}

impl Rate {
    fn add(&mut self, (count, secs): (u64, f64)) {
        self.count += count;
        self.secs += secs;
    }
}

/// Runs `pass` in rounds for about `duration`: (passes, seconds).
fn timed(duration: Duration, mut pass: impl FnMut() -> PathResult<()>) -> PathResult<(u64, f64)> {
    let start = Instant::now();
    let mut count = 0u64;
    while start.elapsed() < duration {
        for _ in 0..ROUND {
            pass()?;
            count += 1;
        }
    }
    Ok((count, start.elapsed().as_secs_f64()))
}

/// Our writer and reader, as a connection's two ends use them.
struct OurPath {
    writer: super::write::Writer,
    reader: super::read::Reader,
}

impl OurPath {
    fn new() -> Result<Self, Error> {
        let protection = || Protection::from_parts(0, &aead::AES_128_GCM, &[0x42; 16], &[0x24; 12]);
        Ok(Self {
            writer: super::write::Writer::new(protection()?),
            reader: super::read::Reader::new(protection()?, Vec::new(), false),
        })
    }

    /// Seals `data` as one record, moves it to the reader as a socket would, and reads it.
    fn pass(&mut self, data: &[u8]) -> Result<(), Error> {
        self.writer.seal_data(&[std::io::IoSlice::new(data)])?;
        let sealed = self.writer.pending().len();
        let space = self.reader.read_space();
        let spare = space.capacity() - space.len();
        space.extend_from_slice(self.writer.pending());
        self.reader.note_read(sealed, spare);
        self.writer.advance(sealed);
        let mut got = 0;
        while got < data.len() {
            match self.reader.next_event()? {
                super::read::Event::Data => {
                    let n = self.reader.plaintext().len();
                    std::hint::black_box(self.reader.plaintext());
                    self.reader.consume(n);
                    got += n;
                }
                _ => return Err(Error::HandshakeState("bench: no data")),
            }
        }
        Ok(())
    }
}

/// rustls's unbuffered client and server after an in-memory handshake.
struct RustlsPath {
    client: rustls::client::UnbufferedClientConnection,
    server: rustls::server::UnbufferedServerConnection,
    /// The client's records, as the server receives them.
    wire: Vec<u8>,
}

impl RustlsPath {
    fn new() -> PathResult<Self> {
        use std::sync::Arc;

        use arc_swap::ArcSwap;

        use crate::{
            identity::{
                ca::{Issuer, TrustBundle},
                SpiffeId,
            },
            tunnel::tls,
        };
        let day = Duration::from_secs(86_400);
        let td = "bench.local";
        let root = Issuer::generate_root(td, day).map_err(|e| e.to_string())?;
        let node = root
            .issue_intermediate("bench", day)
            .map_err(|e| e.to_string())?;
        let bundle = || TrustBundle::from_roots(root.root_cert_der().into_iter().collect());
        let leaf = |sa: &str| -> PathResult<_> {
            let id = SpiffeId::new(td, "bench", sa).map_err(|e| e.to_string())?;
            let leaf = node.issue_leaf(&id, day).map_err(|e| e.to_string())?;
            Ok((id, Arc::new(ArcSwap::from_pointee(leaf))))
        };
        let (server_id, server_leaf) = leaf("server")?;
        let (_, client_leaf) = leaf("client")?;
        let server_config =
            tls::server_config(bundle(), td.into(), server_leaf).map_err(|e| e.to_string())?;
        let client_config = tls::client_config(bundle(), client_leaf, vec![server_id], None)
            .map_err(|e| e.to_string())?;
        let name =
            rustls::pki_types::ServerName::try_from("bench.local").map_err(|e| e.to_string())?;
        let mut client = rustls::client::UnbufferedClientConnection::new(client_config, name)
            .map_err(|e| e.to_string())?;
        let mut server = rustls::server::UnbufferedServerConnection::new(server_config)
            .map_err(|e| e.to_string())?;
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        for _ in 0..64 {
            let client_done = step(&mut client, &mut to_client, &mut to_server)?;
            let server_done = step(&mut server, &mut to_server, &mut to_client)?;
            if client_done && server_done && !client.is_handshaking() && !server.is_handshaking() {
                return Ok(Self {
                    client,
                    server,
                    wire: Vec::new(),
                });
            }
        }
        Err("bench: the in-memory handshake did not finish".into())
    }

    /// The client seals `data`, the server opens it and hands the plaintext out.
    fn pass(&mut self, data: &[u8]) -> PathResult<()> {
        use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
        let UnbufferedStatus { state, .. } = self.client.process_tls_records(&mut []);
        let ConnectionState::WriteTraffic(mut traffic) = state.map_err(|e| e.to_string())? else {
            return Err("bench: the client cannot write".into());
        };
        self.wire.resize(data.len() + HEADER_LEN + 256, 0);
        let n = traffic
            .encrypt(data, &mut self.wire)
            .map_err(|e| e.to_string())?;
        self.wire.truncate(n);
        let mut got = 0;
        while got < data.len() {
            let UnbufferedStatus { mut discard, state } =
                self.server.process_tls_records(&mut self.wire);
            match state.map_err(|e| e.to_string())? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(|e| e.to_string())?;
                        discard += record.discard;
                        got += std::hint::black_box(record.payload).len();
                    }
                }
                _ => return Err("bench: the server read no data".into()),
            }
            self.wire.drain(..discard);
        }
        Ok(())
    }
}

/// One step of an in-memory handshake for `conn`: processes `incoming`, appends what it sends
/// to `outgoing`; true once it may send application data.
fn step<C: super::handshake::Unbuffered>(
    conn: &mut C,
    incoming: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
) -> PathResult<bool> {
    use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
    loop {
        let UnbufferedStatus { discard, state } = conn.process(incoming);
        let done = match state.map_err(|e| e.to_string())? {
            ConnectionState::EncodeTlsData(mut data) => {
                super::handshake::encode(&mut data, outgoing).map_err(|e| e.to_string())?;
                None
            }
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                None
            }
            ConnectionState::BlockedHandshake => Some(false),
            ConnectionState::WriteTraffic(_) => Some(true),
            _ => return Err("bench: unexpected state in the handshake".into()),
        };
        incoming.drain(..discard);
        if let Some(done) = done {
            return Ok(done);
        }
    }
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

    #[test]
    fn measures_both_record_paths() {
        let b = super::paths(std::time::Duration::from_millis(20)).expect("bench");
        for v in [
            b.ours_cpu_s_per_gib,
            b.rustls_cpu_s_per_gib,
            b.ours_ns_per_small_record,
            b.rustls_ns_per_small_record,
        ] {
            assert!(v.is_finite() && v > 0.0, "{b:?}");
        }
    }
}
