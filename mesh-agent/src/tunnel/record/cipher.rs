//! TLS 1.3 record protection for one direction (RFC 8446 §5.2-5.3) with ring's AES-GCM: the
//! per-record nonce is the traffic IV XOR the 64-bit sequence number (left-padded with zeros),
//! the additional data is the 5-byte record header.

use std::fmt;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

use super::Error;

/// Length of the AES-GCM authentication tag at the end of every record.
pub(super) const TAG_LEN: usize = 16;

/// The key, IV and next sequence number of one direction of a connection.
pub(super) struct Protection {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl fmt::Debug for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Protection")
            .field("algorithm", self.key.algorithm())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Protection {
    /// Protection with the traffic secrets rustls extracted, starting at sequence number `seq`.
    /// Only the AES-GCM suites HBONE negotiates are supported.
    pub(super) fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, Error> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            _ => return Err(Error::UnsupportedCipherSuite),
        };
        Self::from_parts(seq, algorithm, key.as_ref(), iv.as_ref())
    }

    /// Protection with `algorithm`, raw `key` and `iv` bytes, starting at sequence number `seq`.
    pub(super) fn from_parts(
        seq: u64,
        algorithm: &'static aead::Algorithm,
        key: &[u8],
        iv: &[u8],
    ) -> Result<Self, Error> {
        let key = UnboundKey::new(algorithm, key).map_err(|_| Error::BadKeyMaterial)?;
        let iv = iv.try_into().map_err(|_| Error::BadKeyMaterial)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The sequence number of the next record.
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    /// The nonce of the next record; advances the sequence number. A sequence number never
    /// wraps (RFC 8446 §5.3): the last one is refused instead.
    fn next_nonce(&mut self) -> Result<Nonce, Error> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(Error::SequenceExhausted)?;
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Decrypts `payload` (ciphertext followed by the tag) in place; returns the length of the
    /// inner plaintext, which starts at `payload[0]`.
    pub(super) fn open(&mut self, header: [u8; 5], payload: &mut [u8]) -> Result<usize, Error> {
        let nonce = self.next_nonce()?;
        self.key
            .open_in_place(nonce, Aad::from(header), payload)
            .map(|plain| plain.len())
            .map_err(|_| Error::BadRecordMac)
    }

    /// Encrypts `inner` (content, content type, no padding) in place; returns the tag to append.
    pub(super) fn seal(
        &mut self,
        header: [u8; 5],
        inner: &mut [u8],
    ) -> Result<[u8; TAG_LEN], Error> {
        let nonce = self.next_nonce()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), inner)
            .map_err(|_| Error::Seal)?;
        tag.as_ref().try_into().map_err(|_| Error::Seal)
    }
}
