//! Helpers for the record layer's unit tests: keys made from a number, records sealed by hand
//! (any outer type, any inner plaintext) and a small deterministic pseudo-random generator.

use rustls::{
    crypto::cipher::{AeadKey, Iv},
    ConnectionTrafficSecrets,
};

use super::{
    cipher::{Protection, TAG_LEN},
    content,
    read::{Event, Reader},
};

/// AES-256-GCM secrets derived from `n` (a test stands in for rustls's key schedule: key
/// update number `n` uses `secrets(n)`).
pub(super) fn secrets(n: u8) -> ConnectionTrafficSecrets {
    ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([n; 32]),
        iv: Iv::from([n ^ 0x5a; 12]),
    }
}

pub(super) fn protection(n: u8) -> Protection {
    Protection::new(0, &secrets(n)).expect("test protection")
}

/// One record sealed with `p`: `outer` type in the header, `inner` as the inner plaintext
/// (content, content type, padding), exactly as given.
pub(super) fn seal(p: &mut Protection, outer: u8, inner: &[u8]) -> Vec<u8> {
    let len = u16::try_from(inner.len() + TAG_LEN).expect("test record length");
    let [hi, lo] = len.to_be_bytes();
    let header = [outer, 3, 3, hi, lo];
    let mut body = inner.to_vec();
    let tag = p.seal(header, &mut body).expect("seal");
    let mut record = header.to_vec();
    record.extend(body);
    record.extend(tag);
    record
}

/// A well-formed record carrying `content` of `content_type`.
pub(super) fn record(p: &mut Protection, content_type: u8, content: &[u8]) -> Vec<u8> {
    let mut inner = content.to_vec();
    inner.push(content_type);
    seal(p, content::APPLICATION_DATA, &inner)
}

/// A handshake message: type, 24-bit length, body.
pub(super) fn handshake_message(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("length").to_be_bytes();
    let mut message = vec![msg_type, len[1], len[2], len[3]];
    message.extend_from_slice(body);
    message
}

/// Appends bytes to the reader as a socket read would.
pub(super) fn feed(reader: &mut Reader, bytes: &[u8]) {
    reader.read_space().extend_from_slice(bytes);
}

/// What a reader produced until it needed more input, closed or failed.
#[derive(Debug, Default)]
pub(super) struct Drained {
    pub(super) data: Vec<u8>,
    pub(super) events: Vec<Event>,
    pub(super) error: Option<super::Error>,
}

/// Runs the reader over what it holds, serving all data and answering key updates with
/// `secrets(key + 1)` (`key` counts the updates seen).
pub(super) fn drain(reader: &mut Reader, key: &mut u8, out: &mut Drained) {
    // Every event consumes input, so the number of events is bounded by the input size.
    loop {
        match reader.next_event() {
            Ok(Event::Data) => {
                let n = reader.plaintext().len();
                out.data.extend_from_slice(reader.plaintext());
                reader.consume(n);
            }
            Ok(Event::NeedMore) => return,
            Ok(Event::Closed) => {
                out.events.push(Event::Closed);
                return;
            }
            Ok(Event::KeyUpdate { update_requested }) => {
                *key = key.wrapping_add(1);
                reader.rekey(protection(*key));
                out.events.push(Event::KeyUpdate { update_requested });
            }
            Ok(event) => out.events.push(event),
            Err(e) => {
                out.error = Some(e);
                return;
            }
        }
    }
}

/// Feeds `stream` in chunks of `chunk` bytes to a fresh reader keyed with `secrets(0)`.
pub(super) fn read_all(stream: &[u8], chunk: usize) -> Drained {
    let mut reader = Reader::new(protection(0), Vec::new(), false);
    let mut key = 0;
    let mut out = Drained::default();
    for part in stream.chunks(chunk.max(1)) {
        feed(&mut reader, part);
        drain(&mut reader, &mut key, &mut out);
        if out.error.is_some() || out.events.last() == Some(&Event::Closed) {
            break;
        }
    }
    out
}

/// xorshift64*: deterministic, good enough to pick bytes and lengths for the fuzz tests.
#[derive(Debug)]
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub(super) fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).expect("bound")).expect("index")
    }

    pub(super) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[0]).collect()
    }

    /// Random bytes, fewer than `max` of them.
    pub(super) fn noise(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }
}
