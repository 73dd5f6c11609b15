//! The receiving half of the record layer, without I/O: ciphertext goes into one buffer (the
//! socket is read straight into its spare capacity), complete records are decrypted in place one
//! at a time, and their application data is served from where it lies. Only a trailing partial
//! record is ever moved (to the front, before the next socket read).
//!
//! Everything here is untrusted input: lengths are checked before they are used, nothing
//! panics, and every violation is an [`Error`] that says what the peer did.

use std::ops::Range;

use rustls::AlertDescription;

use super::{
    cipher::{Protection, TAG_LEN},
    content, Error, HEADER_LEN, MAX_CIPHERTEXT, MAX_HANDSHAKE_MESSAGE, MAX_INNER_PLAINTEXT,
};

/// The smallest read buffer: one record of the largest size fits, so a record never needs more
/// than one buffer.
pub(super) const READ_MIN: usize = 17 << 10;
/// The largest read buffer: one socket read takes up to this much.
pub(super) const READ_MAX: usize = 256 << 10;

/// Records in a row that carry nothing for the caller (empty application data, user_canceled)
/// before the peer is cut off: as rustls does, so a peer cannot make us spin on empty records.
const MAX_EMPTY_RECORDS: u8 = 32;

/// Handshake message types seen after the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// What the next buffered record (or reassembled handshake message) amounts to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Event {
    /// Application data is ready: [`Reader::plaintext`].
    Data,
    /// The peer sent close_notify: no more data will come (what follows is ignored).
    Closed,
    /// The peer updated its sending key: switch with [`Reader::rekey`] before reading on. When
    /// `update_requested`, the peer asks us to update ours too.
    KeyUpdate { update_requested: bool },
    /// A NewSessionTicket message (its body, without the 4-byte handshake header).
    NewSessionTicket(Vec<u8>),
    /// No complete record is buffered: read the socket into [`Reader::read_space`].
    NeedMore,
}

/// Receive state: the buffer, the protection of the peer's direction and the reassembly of
/// post-handshake messages.
#[derive(Debug)]
pub(super) struct Reader {
    /// Bytes read from the socket; `..pos` are records already decrypted.
    buf: Vec<u8>,
    /// Start of the first record not decrypted yet.
    pos: usize,
    /// Application data of the last decrypted record not yet served.
    plain: Range<usize>,
    /// Post-handshake handshake messages, reassembled across records.
    handshake: Vec<u8>,
    protection: Protection,
    closed: bool,
    /// The last socket read filled the buffer: the next one gets a larger buffer.
    grow: bool,
    /// Records in a row that carried nothing (see [`MAX_EMPTY_RECORDS`]).
    empty_records: u8,
}

impl Reader {
    /// A reader decrypting with `protection`; `buffered` are bytes already read from the
    /// socket (what the handshake read past the peer's last handshake record).
    pub(super) fn new(protection: Protection, buffered: Vec<u8>, closed: bool) -> Self {
        Self {
            // After close_notify, what follows is ignored.
            buf: if closed { Vec::new() } else { buffered },
            pos: 0,
            plain: 0..0,
            handshake: Vec::new(),
            protection,
            closed,
            grow: false,
            empty_records: 0,
        }
    }

    /// Application data ready to be served (empty unless the last event was [`Event::Data`]).
    pub(super) fn plaintext(&self) -> &[u8] {
        self.buf.get(self.plain.clone()).unwrap_or_default()
    }

    /// Marks `n` bytes of [`Self::plaintext`] as served.
    pub(super) fn consume(&mut self, n: usize) {
        self.plain.start = self.plain.start.saturating_add(n).min(self.plain.end);
    }

    /// Switches to the peer's next traffic key (after [`Event::KeyUpdate`]).
    pub(super) fn rekey(&mut self, protection: Protection) {
        self.protection = protection;
    }

    /// Bytes received but not yet served: undecrypted ciphertext, unserved plaintext or a
    /// partial handshake message.
    pub(super) fn buffered(&self) -> usize {
        (self.buf.len() - self.pos) + self.plain.len() + self.handshake.len()
    }

    /// Bytes of memory the reader holds in its buffers.
    pub(super) fn capacity(&self) -> usize {
        self.buf.capacity() + self.handshake.capacity()
    }

    /// Frees the buffers if they hold nothing (an idle connection keeps no memory).
    pub(super) fn release_if_empty(&mut self) {
        if self.buffered() == 0 {
            self.buf = Vec::new();
            self.pos = 0;
            self.plain = 0..0;
            self.handshake = Vec::new();
        }
    }

    /// Decrypts buffered records until one yields something for the caller.
    pub(super) fn next_event(&mut self) -> Result<Event, Error> {
        loop {
            if !self.plain.is_empty() {
                return Ok(Event::Data);
            }
            if self.closed {
                return Ok(Event::Closed);
            }
            if let Some(event) = self.next_handshake_message()? {
                return Ok(event);
            }
            let Some((content_type, content)) = self.open_record()? else {
                return Ok(Event::NeedMore);
            };
            let interleaved = !self.handshake.is_empty() && content_type != content::HANDSHAKE;
            if interleaved {
                return Err(Error::Interleaved(content_type));
            }
            match content_type {
                // Zero-length application data is allowed; the loop moves on to the next record.
                content::APPLICATION_DATA => {
                    self.count_empty(content.is_empty())?;
                    self.plain = content;
                }
                content::ALERT => {
                    let [_level, description] = self.buf.get(content.clone()).unwrap_or_default()
                    else {
                        return Err(Error::MalformedAlert { len: content.len() });
                    };
                    match AlertDescription::from(*description) {
                        AlertDescription::CloseNotify => {
                            // What follows close_notify is ignored (RFC 8446 §6.1): drop it.
                            self.closed = true;
                            self.buf.truncate(self.pos);
                        }
                        // Sent before close_notify by some peers; not an error (RFC 8446 §6.1).
                        AlertDescription::UserCanceled => self.count_empty(true)?,
                        description => return Err(Error::AlertReceived(description)),
                    }
                }
                content::HANDSHAKE => {
                    if content.is_empty() {
                        return Err(Error::EmptyHandshakeRecord);
                    }
                    let len = self.handshake.len() + content.len();
                    if len > MAX_HANDSHAKE_MESSAGE + 4 {
                        return Err(Error::HandshakeTooLarge { len });
                    }
                    let fragment = self.buf.get(content).unwrap_or_default();
                    self.handshake.extend_from_slice(fragment);
                    self.count_empty(false)?;
                }
                other => return Err(Error::UnexpectedContentType(other)),
            }
        }
    }

    /// Counts records in a row that carry nothing for the caller (see [`MAX_EMPTY_RECORDS`]).
    fn count_empty(&mut self, empty: bool) -> Result<(), Error> {
        if !empty {
            self.empty_records = 0;
            return Ok(());
        }
        self.empty_records = self.empty_records.saturating_add(1);
        if self.empty_records > MAX_EMPTY_RECORDS {
            return Err(Error::TooManyEmptyRecords);
        }
        Ok(())
    }

    /// Decrypts the next complete record in place; returns its content type and where its
    /// content lies in `buf`, or `None` when no complete record is buffered.
    fn open_record(&mut self) -> Result<Option<(u8, Range<usize>)>, Error> {
        let available = self.buf.get(self.pos..).unwrap_or_default();
        let Some(&[outer_type, version_hi, version_lo, len_hi, len_lo]) =
            available.get(..HEADER_LEN)
        else {
            return Ok(None);
        };
        // Judged as soon as the header is in: a bad header fails before its body arrives.
        if outer_type != content::APPLICATION_DATA {
            return Err(Error::UnexpectedRecordType(outer_type));
        }
        // RFC 8446 §5.1: 0x0303 on every record after the ClientHello. (It is also in the
        // additional data, so another value could not decrypt; refused here from the header.)
        if [version_hi, version_lo] != [3, 3] {
            return Err(Error::BadRecordVersion(u16::from_be_bytes([
                version_hi, version_lo,
            ])));
        }
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if len > MAX_CIPHERTEXT {
            return Err(Error::RecordTooLarge { len });
        }
        if len <= TAG_LEN {
            return Err(Error::RecordTooShort { len });
        }
        let start = self.pos + HEADER_LEN;
        let end = start + len;
        // The additional data is the header as received (RFC 8446 §5.2).
        let header = [outer_type, version_hi, version_lo, len_hi, len_lo];
        let Some(payload) = self.buf.get_mut(start..end) else {
            return Ok(None);
        };
        let inner_len = self.protection.open(header, payload)?;
        self.pos = end;
        if inner_len > MAX_INNER_PLAINTEXT {
            return Err(Error::PlaintextTooLarge { len: inner_len });
        }
        let inner = payload.get(..inner_len).unwrap_or_default();
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(Error::MissingContentType);
        };
        Ok(Some((inner[type_at], start..start + type_at)))
    }

    /// The next complete post-handshake message, if one is reassembled.
    fn next_handshake_message(&mut self) -> Result<Option<Event>, Error> {
        let Some(&[msg_type, a, b, c]) = self.handshake.get(..4) else {
            return Ok(None);
        };
        let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        if len > MAX_HANDSHAKE_MESSAGE {
            return Err(Error::HandshakeTooLarge { len });
        }
        let Some(body) = self.handshake.get(4..4 + len) else {
            return Ok(None);
        };
        let event = match (msg_type, body) {
            (KEY_UPDATE, &[request]) => {
                let update_requested = match request {
                    0 => false,
                    1 => true,
                    _ => return Err(Error::MalformedKeyUpdate),
                };
                // The next record is under the new key: nothing of this one may follow.
                if self.handshake.len() != 4 + len {
                    return Err(Error::KeyUpdateNotAligned);
                }
                Event::KeyUpdate { update_requested }
            }
            (KEY_UPDATE, _) => return Err(Error::MalformedKeyUpdate),
            (NEW_SESSION_TICKET, body) => Event::NewSessionTicket(body.to_vec()),
            (other, _) => return Err(Error::UnexpectedHandshake(other)),
        };
        self.handshake.drain(..4 + len);
        if self.handshake.is_empty() {
            self.handshake = Vec::new();
        }
        Ok(Some(event))
    }

    /// The buffer to read the socket into, with spare capacity: served records are dropped, a
    /// trailing partial record moves to the front, and the buffer grows (up to [`READ_MAX`])
    /// when the last read filled it.
    pub(super) fn read_space(&mut self) -> &mut Vec<u8> {
        // Callers read only once the plaintext is served; the check keeps it that way.
        if self.pos > 0 && self.plain.is_empty() {
            self.buf.drain(..self.pos);
            self.pos = 0;
            self.plain = 0..0;
        }
        let target = if self.grow {
            (self.buf.capacity() * 2).clamp(READ_MIN, READ_MAX)
        } else {
            self.buf.capacity().max(READ_MIN)
        };
        if target > self.buf.capacity() {
            self.buf.reserve_exact(target - self.buf.len());
        }
        &mut self.buf
    }

    /// Notes a socket read of `n` bytes into [`Self::read_space`] that had `spare` bytes free.
    pub(super) fn note_read(&mut self, n: usize, spare: usize) {
        self.grow = n >= spare;
    }
}

#[cfg(test)]
mod tests;
