//! The `record_reader` fuzz target's harness: the receiving half of the record layer
//! ([`Reader`]) after a completed handshake, keyed with a fixed known key so that the fuzzer's
//! records decrypt, driven as [`super::TlsStream`] drives it (socket reads into the reader's
//! spare capacity, key updates with the peer's next key, at most
//! [`MAX_KEY_UPDATES_IN_A_ROW`] of them between application data).
//!
//! The input is a script: a flags byte (read sizes, cipher, starting sequence number, bytes the
//! handshake left over, buffer release between reads) and then operations that each append
//! bytes to the stream the peer sends: records the harness seals with the peer's current key
//! (any content type, content, padding, oversized ones, fragmented post-handshake messages,
//! KeyUpdates after which the harness seals with the next key, alerts), raw bytes, replays,
//! skipped sequence numbers and corruptions of what is already there.
//!
//! Flags: bits 0-2 pick the first read size (the next reads take the next sizes in turn); bit 3:
//! up to 17 KiB arrive with the handshake (`Reader::new`'s `buffered`); bit 4: the buffers are
//! released between reads, or with bit 7 the peer closed during the handshake; bit 5:
//! AES-128-GCM (else AES-256-GCM); bit 6: sequence numbers start 3 short of the end.
//! Operations (the byte modulo 12, then their fields): 0 short data, 1 data of a length, fill
//! and padding, 2 a record of any content type, 3 a handshake message fragmented over records,
//! 4 a KeyUpdate, 5 an alert, 6 raw bytes, 7 a byte changed, 8 a replay, 9 a lost record, 10 a
//! record of any outer type and inner plaintext, 11 the stream cut short.
//!
//! Checked on every input: nothing panics; the reader never yields more application data than
//! the harness sealed, and what it yields is exactly a prefix of it, in order; what it holds
//! stays bounded and is accounted for; a script of well-formed records only is read whole,
//! whatever the read sizes.

use ring::aead;

use super::{
    cipher::{Protection, TAG_LEN},
    content,
    read::{Event, Reader, READ_MAX, READ_MIN},
    Error, MAX_HANDSHAKE_MESSAGE, MAX_KEY_UPDATES_IN_A_ROW, MAX_PLAINTEXT,
};
use crate::fuzzing::Input;

/// Handshake message types the script names.
const KEY_UPDATE: u8 = 24;

/// Read sizes a flags byte picks from: single bytes, record-sized and larger reads.
const READ_SIZES: [usize; 8] = [1, 3, 5, 64, 4096, 16_405, 65_536, usize::MAX];

/// The peer's traffic key after `n` key updates: fixed and known, standing in for rustls's key
/// schedule (which derives the next secret from the current one).
fn protection(aes128: bool, n: u64, seq: u64) -> Protection {
    let [a, b, ..] = n.to_le_bytes();
    let key = [a ^ 0x36, b ^ 0x5c, a, b, 7, 7, 7, 7, a, b, 1, 2, 3, 4, 5, 6];
    let key256 = [key, key].concat();
    let iv = [b, a, 0x5a, 0x5a, 9, 9, 9, 9, 0, 1, 2, 3];
    let made = if aes128 {
        Protection::from_parts(seq, &aead::AES_128_GCM, &key, &iv)
    } else {
        Protection::from_parts(seq, &aead::AES_256_GCM, &key256, &iv)
    };
    match made {
        Ok(p) => p,
        Err(e) => unreachable!("fixed key material is valid: {e}"),
    }
}

/// The peer: seals records with its current key and keeps what the reader must yield.
struct Peer {
    aes128: bool,
    /// Key updates so far.
    key: u64,
    protection: Protection,
    stream: Vec<u8>,
    /// The application data sealed with the right key and sequence number, in order.
    sealed_data: Vec<u8>,
    /// The last record appended, for replays.
    last_record: Vec<u8>,
    /// Only well-formed records so far, of kinds a reader must accept: the stream must be read
    /// whole without error.
    clean: bool,
    /// KeyUpdates since the last application data (beyond the limit, not clean).
    key_updates_in_a_row: u8,
    /// Empty records in a row (beyond the reader's limit of 32, not clean).
    empty_in_a_row: u8,
    /// How much of `sealed_data` was sealed before the first close_notify (what follows it is
    /// ignored) and where the close_notify record ends in `stream`, when the stream is clean up
    /// to it.
    closed_at: Option<(usize, usize)>,
}

impl Peer {
    /// Appends one record of `outer` type whose inner plaintext is `inner` (content, content
    /// type, padding), as given. `false` when it cannot be sealed (too long for the header's
    /// length field, or the sequence numbers are exhausted). The content of what is sealed as
    /// application data, however it was made, is data the reader may yield.
    fn seal(&mut self, outer: u8, inner: &[u8]) -> bool {
        let Ok(len) = u16::try_from(inner.len() + TAG_LEN) else {
            return false;
        };
        let [hi, lo] = len.to_be_bytes();
        let header = [outer, 3, 3, hi, lo];
        let mut record = header.to_vec();
        record.extend_from_slice(inner);
        let Ok(tag) = self.protection.seal(header, &mut record[5..]) else {
            return false;
        };
        record.extend_from_slice(&tag);
        self.stream.extend_from_slice(&record);
        self.last_record = record;
        let type_at = inner.iter().rposition(|&b| b != 0);
        if let Some(at) = type_at.filter(|&at| inner[at] == content::APPLICATION_DATA) {
            self.sealed_data.extend_from_slice(&inner[..at]);
        }
        true
    }

    /// A well-formed record of `content_type` carrying `content` and `padding` zeros.
    fn record(&mut self, content_type: u8, content: &[u8], padding: usize) -> bool {
        let mut inner = Vec::with_capacity(content.len() + 1 + padding);
        inner.extend_from_slice(content);
        inner.push(content_type);
        inner.resize(inner.len() + padding, 0);
        self.seal(content::APPLICATION_DATA, &inner)
    }

    /// Application data: well-formed as long as a run of empty records stays under the limit.
    fn data(&mut self, content: &[u8], padding: usize) {
        let ok = self.record(content::APPLICATION_DATA, content, padding);
        if content.is_empty() {
            self.empty_in_a_row = self.empty_in_a_row.saturating_add(1);
        } else {
            self.empty_in_a_row = 0;
            self.key_updates_in_a_row = 0;
        }
        let fits = content.len() + 1 + padding <= MAX_PLAINTEXT + 1;
        self.clean &= ok && fits && self.empty_in_a_row <= 32;
    }

    /// A KeyUpdate alone in its record; the peer's next records use its next key.
    fn key_update(&mut self, requested: bool, padding: usize) {
        let ok = self.record(
            content::HANDSHAKE,
            &[KEY_UPDATE, 0, 0, 1, u8::from(requested)],
            padding,
        );
        self.rekey();
        self.key_updates_in_a_row = self.key_updates_in_a_row.saturating_add(1);
        self.empty_in_a_row = 0;
        let fits = 5 + 1 + padding <= MAX_PLAINTEXT + 1;
        self.clean &= ok && fits && self.key_updates_in_a_row <= MAX_KEY_UPDATES_IN_A_ROW;
    }

    fn rekey(&mut self) {
        self.key += 1;
        self.protection = protection(self.aes128, self.key, 0);
    }
}

/// Builds the stream the script describes; returns the peer and the flags.
fn build(input: &[u8]) -> Option<(Peer, u8)> {
    let mut script = Input(input);
    let flags = script.byte()?;
    let aes128 = flags & 0x20 != 0;
    // Close to the end of the sequence numbers: the reader must refuse to wrap.
    let seq = if flags & 0x40 != 0 { u64::MAX - 3 } else { 0 };
    let mut peer = Peer {
        aes128,
        key: 0,
        protection: protection(aes128, 0, seq),
        stream: Vec::new(),
        sealed_data: Vec::new(),
        last_record: Vec::new(),
        clean: seq == 0,
        key_updates_in_a_row: 0,
        empty_in_a_row: 0,
        closed_at: None,
    };
    while let Some(op) = script.byte() {
        match op % 12 {
            // Application data, short.
            0 => {
                let n = usize::from(script.byte().unwrap_or(0));
                let content = script.take(n).to_vec();
                peer.data(&content, 0);
            }
            // Application data of a length and fill: large and oversized records, padding.
            1 => {
                let len = usize::from(script.u16().unwrap_or(0));
                let fill = script.byte().unwrap_or(0);
                let padding = usize::from(script.byte().unwrap_or(0)) * 8;
                let len = len.min(usize::from(u16::MAX) - TAG_LEN - 1 - padding);
                peer.data(&vec![fill; len], padding);
            }
            // A record of any content type and content (alert, handshake, unknown types).
            2 => {
                let content_type = script.byte().unwrap_or(0);
                let padding = usize::from(script.byte().unwrap_or(0));
                let n = usize::from(script.byte().unwrap_or(0));
                let content = script.take(n).to_vec();
                peer.record(content_type, &content, padding);
                peer.clean = false;
            }
            // A post-handshake message, fragmented over records at the given sizes.
            3 => {
                let msg_type = script.byte().unwrap_or(0);
                let declared = script.u16();
                let n = usize::from(script.byte().unwrap_or(0));
                let body = script.take(n).to_vec();
                let len = declared.map_or(body.len(), usize::from);
                let [_, a, b, c] = u32::try_from(len).unwrap_or(0).to_be_bytes();
                let mut message = vec![msg_type, a, b, c];
                message.extend_from_slice(&body);
                let fragment = usize::from(script.byte().unwrap_or(0)).max(1);
                for piece in message.chunks(fragment) {
                    peer.record(content::HANDSHAKE, piece, 0);
                }
                // The peer follows the KeyUpdates it sends, well-formed or not.
                if msg_type == KEY_UPDATE {
                    peer.rekey();
                }
                peer.clean = false;
            }
            // A well-formed KeyUpdate.
            4 => {
                let b = script.byte().unwrap_or(0);
                peer.key_update(b & 1 != 0, usize::from(b >> 1));
            }
            // An alert: close_notify, user_canceled, fatal ones, malformed lengths.
            5 => {
                let level = script.byte().unwrap_or(1);
                let description = script.byte().unwrap_or(0);
                let ok = peer.record(content::ALERT, &[level, description], 0);
                match description {
                    // close_notify: the end, whatever follows.
                    0 if peer.clean && ok => {
                        let at = (peer.sealed_data.len(), peer.stream.len());
                        peer.closed_at.get_or_insert(at);
                    }
                    // user_canceled: a record that carries nothing.
                    90 => {
                        peer.empty_in_a_row = peer.empty_in_a_row.saturating_add(1);
                        peer.clean &= ok && peer.empty_in_a_row <= 32;
                    }
                    _ => peer.clean = false,
                }
            }
            // Raw bytes: headers of any type, version and length, garbage, partial records.
            6 => {
                let n = usize::from(script.byte().unwrap_or(0));
                let raw = script.take(n).to_vec();
                peer.stream.extend_from_slice(&raw);
                peer.clean &= raw.is_empty();
            }
            // A byte of what was sent so far, changed.
            7 => {
                let at = usize::from(script.u16().unwrap_or(0));
                let xor = script.byte().unwrap_or(0).max(1);
                if let Some(len) = peer.stream.len().checked_sub(1) {
                    let at = at.min(len);
                    peer.stream[at] ^= xor;
                    peer.clean = false;
                    // Before the close_notify: the stream is no longer well-formed.
                    peer.closed_at = peer.closed_at.filter(|&(_, end)| at >= end);
                }
            }
            // The last record again (a replay).
            8 => {
                let last = peer.last_record.clone();
                peer.stream.extend_from_slice(&last);
                peer.clean &= last.is_empty();
            }
            // A record the network lost: the sequence number moves on.
            9 => {
                let (sent, last) = (peer.stream.len(), peer.last_record.clone());
                let data = peer.sealed_data.len();
                peer.seal(content::APPLICATION_DATA, b"lost\x17");
                peer.stream.truncate(sent);
                peer.sealed_data.truncate(data);
                peer.last_record = last;
                peer.clean = false;
            }
            // A record sealed with the wrong outer type or an inner plaintext without type.
            10 => {
                let outer = script.byte().unwrap_or(0);
                let n = usize::from(script.byte().unwrap_or(0));
                let inner = script.take(n).to_vec();
                peer.seal(outer, &inner);
                peer.clean = false;
            }
            // The record is cut short: the stream ends in the middle of it.
            _ => {
                let cut = usize::from(script.u16().unwrap_or(1)).max(1);
                let keep = peer.stream.len().saturating_sub(cut);
                let cut_any = keep < peer.stream.len();
                peer.stream.truncate(keep);
                peer.clean &= !cut_any;
                peer.closed_at = peer.closed_at.filter(|&(_, end)| keep >= end);
            }
        }
    }
    Some((peer, flags))
}

/// What the reader made of a stream.
#[derive(Debug, Default)]
struct Outcome {
    data: Vec<u8>,
    closed: bool,
    /// Bytes the reader still held when the input ran out (the peer's EOF).
    left: usize,
    error: Option<Error>,
}

/// Feeds `stream` to a reader in reads of the sizes `flags` picks, serving everything, as
/// `TlsStream` does; checks the reader's accounting on the way.
fn read(stream: &[u8], flags: u8, aes128: bool) -> Outcome {
    let seq = if flags & 0x40 != 0 { u64::MAX - 3 } else { 0 };
    let (leftover, mut rest) = if flags & 0x08 != 0 {
        stream.split_at(stream.len().min(READ_MIN))
    } else {
        (&[][..], stream)
    };
    let closed_at_start = flags & 0x90 == 0x90;
    let mut reader = Reader::new(
        protection(aes128, 0, seq),
        leftover.to_vec(),
        closed_at_start,
    );
    let mut key = 0u64;
    let mut key_updates_in_a_row = 0u8;
    let mut out = Outcome::default();
    let mut reads = 0usize;
    loop {
        match reader.next_event() {
            Ok(Event::Data) => {
                key_updates_in_a_row = 0;
                let data = reader.plaintext();
                assert!(!data.is_empty(), "Event::Data with no data");
                // Served in two parts: the reader must keep the rest for the next call.
                let half = data.len().div_ceil(2);
                out.data.extend_from_slice(&data[..half]);
                reader.consume(half);
                let rest = reader.plaintext().to_vec();
                out.data.extend_from_slice(&rest);
                reader.consume(rest.len());
                assert!(reader.plaintext().is_empty(), "served data still served");
            }
            Ok(Event::Closed) => {
                out.closed = true;
                // Closed stays closed.
                assert_eq!(reader.next_event().ok(), Some(Event::Closed));
                break;
            }
            Ok(Event::KeyUpdate { .. }) => {
                key_updates_in_a_row = key_updates_in_a_row.saturating_add(1);
                if key_updates_in_a_row > MAX_KEY_UPDATES_IN_A_ROW {
                    out.error = Some(Error::TooManyKeyUpdates);
                    break;
                }
                key += 1;
                reader.rekey(protection(aes128, key, 0));
            }
            Ok(Event::NewSessionTicket(body)) => {
                // Its body is rustls's to parse (`Kernel::new_session_ticket`).
                assert!(
                    body.len() <= MAX_HANDSHAKE_MESSAGE,
                    "ticket of {}",
                    body.len()
                );
            }
            Ok(Event::NeedMore) => {
                if rest.is_empty() {
                    out.left = reader.buffered();
                    break;
                }
                if flags & 0x90 == 0x10 {
                    let before = reader.buffered();
                    reader.release_if_empty();
                    assert_eq!(reader.buffered(), before, "release lost buffered bytes");
                }
                let size = READ_SIZES[(usize::from(flags) + reads) % READ_SIZES.len()];
                reads += 1;
                let before = reader.buffered();
                let buf = reader.read_space();
                let spare = buf.capacity() - buf.len();
                // A record never needs more than one buffer: there is always room to read.
                assert!(spare > 0, "no room to read into ({} buffered)", buf.len());
                let n = size.min(spare).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                reader.note_read(n, spare);
                assert_eq!(reader.buffered(), before + n, "a read is not accounted for");
            }
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
        // What the reader holds stays bounded: one read buffer, one post-handshake message.
        let bound = READ_MAX + 2 * (MAX_HANDSHAKE_MESSAGE + 4 + MAX_PLAINTEXT);
        assert!(
            reader.capacity() <= bound,
            "reader holds {}",
            reader.capacity()
        );
    }
    out
}

/// The `record_reader` target: see the module documentation for the input's layout.
pub fn record_reader(input: &[u8]) {
    let Some((peer, flags)) = build(input) else {
        return;
    };
    let out = read(&peer.stream, flags, peer.aes128);
    assert!(
        out.data.len() <= peer.stream.len(),
        "{} bytes of plaintext out of {} bytes of input",
        out.data.len(),
        peer.stream.len()
    );
    assert!(
        peer.sealed_data.starts_with(&out.data),
        "the reader yielded data the peer did not seal, or out of order ({} bytes yielded, \
         {} sealed)",
        out.data.len(),
        peer.sealed_data.len()
    );
    // Once clean and closed, the peer's later records are ignored, well-formed or not.
    let clean = peer.clean || peer.closed_at.is_some();
    if clean && flags & 0x90 != 0x90 {
        let sealed = peer
            .closed_at
            .map_or(peer.sealed_data.len(), |(data, _)| data);
        assert!(
            out.error.is_none(),
            "well-formed records refused: {:?}",
            out.error
        );
        assert_eq!(out.data.len(), sealed, "data of well-formed records lost");
        assert_eq!(
            out.closed,
            peer.closed_at.is_some(),
            "close_notify not seen"
        );
        assert_eq!(out.left, 0, "bytes of well-formed records left over");
    }
    // Each error has its alert (or is one the peer caused by closing): its mapping is total.
    if let Some(e) = &out.error {
        let _ = e.alert();
        let _ = std::io::Error::from(e.clone());
    }
}
