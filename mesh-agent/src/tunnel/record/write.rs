//! The sending half of the record layer, without I/O: the caller's bytes are copied once, into
//! place in one contiguous output buffer, and sealed there (header, content, content type,
//! tag), so a batch of records goes out in one socket write.

use std::io::IoSlice;

use super::{
    cipher::{Protection, TAG_LEN},
    content, Error, HEADER_LEN, MAX_PLAINTEXT,
};

/// Records encrypted per write call at most: 16 full records, 256 KiB of plaintext. Bounds the
/// output buffer (the writer takes new data only once the previous batch is sent).
pub(super) const BATCH_RECORDS: usize = 16;

/// Own key update after this many records under one key: far below the AES-GCM
/// confidentiality limit of 2^24.5 full records (RFC 8446 §5.5).
pub(super) const KEY_UPDATE_AFTER: u64 = 1 << 23;

/// Send state: ciphertext not yet written to the socket and the protection of our direction.
#[derive(Debug)]
pub(super) struct Writer {
    buf: Vec<u8>,
    /// `buf[..sent]` is on the wire already.
    sent: usize,
    protection: Protection,
    /// Sequence number at which we update our key (see [`KEY_UPDATE_AFTER`]).
    key_update_at: u64,
    /// End (in `buf`) of a KeyUpdate of ours not yet on the wire.
    key_update_end: Option<usize>,
    closed: bool,
}

impl Writer {
    pub(super) fn new(protection: Protection) -> Self {
        let key_update_at = protection.seq().saturating_add(KEY_UPDATE_AFTER);
        Self {
            buf: Vec::new(),
            sent: 0,
            protection,
            key_update_at,
            key_update_end: None,
            closed: false,
        }
    }

    /// Ciphertext waiting for the socket.
    pub(super) fn pending(&self) -> &[u8] {
        self.buf.get(self.sent..).unwrap_or_default()
    }

    /// Marks `n` bytes of [`Self::pending`] as written.
    pub(super) fn advance(&mut self, n: usize) {
        self.sent = self.sent.saturating_add(n).min(self.buf.len());
        if self.key_update_end.is_some_and(|end| self.sent >= end) {
            self.key_update_end = None;
        }
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        }
    }

    /// Bytes of memory the writer holds.
    pub(super) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Frees the buffer if everything in it is sent.
    pub(super) fn release_if_empty(&mut self) {
        if self.pending().is_empty() {
            self.buf = Vec::new();
            self.sent = 0;
        }
    }

    /// Whether close_notify was queued: nothing may be sent after it.
    pub(super) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether the key must be updated before more application data is sealed (one record is
    /// kept for the KeyUpdate itself).
    pub(super) fn needs_key_update(&self) -> bool {
        self.protection.seq().saturating_add(1) >= self.key_update_at
    }

    /// Seals a KeyUpdate(update_not_requested) under the current key; [`Self::rekey`] follows.
    pub(super) fn seal_key_update(&mut self) -> Result<(), Error> {
        // Handshake type 24, length 1, update_not_requested (0).
        self.seal_control(content::HANDSHAKE, &[24, 0, 0, 1, 0])?;
        self.key_update_end = Some(self.buf.len());
        Ok(())
    }

    /// Whether a KeyUpdate of ours still waits for the socket: a peer's request is then
    /// answered already (RFC 8446 §4.6.3 allows one answer for several requests), which keeps a
    /// peer that requests updates without reading from growing our buffer.
    pub(super) fn key_update_unsent(&self) -> bool {
        self.key_update_end.is_some()
    }

    /// Switches to our next traffic key, after a KeyUpdate was queued under the old one.
    pub(super) fn rekey(&mut self, protection: Protection, key_update_after: u64) {
        self.key_update_at = protection.seq().saturating_add(key_update_after);
        self.protection = protection;
    }

    /// Moves the next key update to `records` after the current sequence number.
    #[cfg(test)]
    pub(super) fn set_key_update_after(&mut self, records: u64) {
        self.key_update_at = self.protection.seq().saturating_add(records);
    }

    /// Seals application data from `bufs` (up to [`BATCH_RECORDS`] full records, fewer if the
    /// key update is near) after the pending ciphertext; returns the bytes taken.
    pub(super) fn seal_data(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, Error> {
        let left = self
            .key_update_at
            .saturating_sub(self.protection.seq().saturating_add(1));
        let records = usize::try_from(left).map_or(BATCH_RECORDS, |l| l.min(BATCH_RECORDS));
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let total = total.min(records * MAX_PLAINTEXT);
        if total == 0 {
            return Ok(0);
        }
        let count = total.div_ceil(MAX_PLAINTEXT);
        self.buf
            .reserve_exact(total + count * (HEADER_LEN + 1 + TAG_LEN));
        let mut chunks = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut current: &[u8] = &[];
        let mut remaining = total;
        while remaining > 0 {
            let len = remaining.min(MAX_PLAINTEXT);
            let start = self.begin_record();
            let mut need = len;
            while need > 0 {
                if current.is_empty() {
                    match chunks.next() {
                        Some(next) => current = next,
                        None => break,
                    }
                }
                let (now, rest) = current.split_at(need.min(current.len()));
                self.buf.extend_from_slice(now);
                current = rest;
                need -= now.len();
            }
            self.finish_record(start, content::APPLICATION_DATA)?;
            remaining -= len;
        }
        Ok(total)
    }

    /// Seals one control record (an alert or a handshake message) after the pending ciphertext.
    pub(super) fn seal_control(&mut self, content_type: u8, message: &[u8]) -> Result<(), Error> {
        let start = self.begin_record();
        self.buf.extend_from_slice(message);
        self.finish_record(start, content_type)
    }

    /// Queues close_notify; later writes are refused.
    pub(super) fn close(&mut self) -> Result<(), Error> {
        if !self.closed {
            // Level warning (1), close_notify (0), as rustls and most stacks send it.
            self.seal_control(content::ALERT, &[1, 0])?;
            self.closed = true;
        }
        Ok(())
    }

    /// Starts a record (its header is completed by [`Self::finish_record`]); returns where it
    /// starts.
    fn begin_record(&mut self) -> usize {
        let start = self.buf.len();
        self.buf
            .extend_from_slice(&[content::APPLICATION_DATA, 3, 3, 0, 0]);
        start
    }

    /// Appends the content type to the record begun at `start`, writes its length into the
    /// header, seals it and appends the tag.
    fn finish_record(&mut self, start: usize, content_type: u8) -> Result<(), Error> {
        self.buf.push(content_type);
        let Some((header, inner)) = self
            .buf
            .get_mut(start..)
            .and_then(|r| r.split_first_chunk_mut::<HEADER_LEN>())
        else {
            return Err(Error::Seal);
        };
        let len = inner.len() + TAG_LEN;
        let wire_len = u16::try_from(len).map_err(|_| Error::RecordTooLarge { len })?;
        header[3..].copy_from_slice(&wire_len.to_be_bytes());
        let tag = self.protection.seal(*header, inner)?;
        self.buf.extend_from_slice(&tag);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
