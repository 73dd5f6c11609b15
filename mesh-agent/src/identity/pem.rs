//! Reading certificates and keys from PEM files, and writing them back, with errors that name
//! the file.

use std::{
    fs,
    io::{BufReader, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Error;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// All certificates of a PEM file, in file order; an error if there are none.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let file = fs::File::open(path).map_err(io_error(path))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_error(path))?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file. PKCS#8 keys are returned as they are; SEC1
/// ("EC PRIVATE KEY") keys are returned as SEC1 for the caller to convert.
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let file = fs::File::open(path).map_err(io_error(path))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(io_error(path))?
        .ok_or_else(|| Error::NoPrivateKey {
            path: path.to_owned(),
        })
}

/// Wraps a SEC1 `ECPrivateKey` into a PKCS#8 `PrivateKeyInfo` for the named curve, whose
/// `AlgorithmIdentifier` DER is `curve_alg_id` (RFC 5915 section 3 / RFC 5208).
pub(crate) fn sec1_to_pkcs8(sec1: &[u8], curve_alg_id: &[u8]) -> PrivatePkcs8KeyDer<'static> {
    let mut body = vec![0x02, 0x01, 0x00]; // version 0
    body.extend_from_slice(curve_alg_id);
    body.push(0x04); // OCTET STRING
    der_len(&mut body, sec1.len());
    body.extend_from_slice(sec1);
    let mut out = vec![0x30]; // SEQUENCE
    der_len(&mut out, body.len());
    out.extend_from_slice(&body);
    PrivatePkcs8KeyDer::from(out)
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    match u8::try_from(len) {
        Ok(short) if short < 0x80 => out.push(short),
        _ => {
            let bytes = len.to_be_bytes();
            let significant = &bytes[bytes.iter().take_while(|b| **b == 0).count()..];
            // At most size_of::<usize>() bytes, so the count always fits the low 7 bits.
            let count = u8::try_from(significant.len()).unwrap_or(0x7f);
            out.push(0x80 | count);
            out.extend_from_slice(significant);
        }
    }
}

/// `AlgorithmIdentifier` of ecPublicKey on P-256 (prime256v1).
pub(crate) const ALG_ID_EC_P256: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];
/// `AlgorithmIdentifier` of ecPublicKey on P-384 (secp384r1).
pub(crate) const ALG_ID_EC_P384: &[u8] = &[
    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04,
    0x00, 0x22,
];

/// PEM encoding of one DER object, 64 base64 characters a line.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Creates the directory (mode 0700 when it is new) if it does not exist.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))
}

/// Writes a certificate file and a private key file. The key file is created with mode 0600
/// (never readable by others, not even for an instant) and must not exist yet: a key is never
/// overwritten. If the certificate cannot be written, the new key file is removed again.
pub(crate) fn write_pair(
    cert_path: &Path,
    cert_pem: &str,
    key_path: &Path,
    key_pem: &str,
) -> Result<(), Error> {
    let mut key_file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                Error::KeyFileExists {
                    path: key_path.to_owned(),
                }
            } else {
                io_error(key_path)(source)
            }
        })?;
    let written = fs::write(cert_path, cert_pem)
        .map_err(io_error(cert_path))
        .and_then(|()| {
            key_file
                .write_all(key_pem.as_bytes())
                .and_then(|()| key_file.sync_all())
                .map_err(io_error(key_path))
        });
    if written.is_err() {
        // Best effort: do not leave an empty key file that would block the next attempt.
        let _ = fs::remove_file(key_path);
    }
    written
}

/// `<dir>/<name>-cert.pem` and `<dir>/<name>-key.pem`.
pub(crate) fn pair_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 300] {
            let der: Vec<u8> = (0..len).map(|i| i.to_le_bytes()[0] ^ 0x5a).collect();
            let pem = encode("CERTIFICATE", &der);
            let parsed: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("our PEM parses");
            if len == 0 {
                continue;
            }
            assert_eq!(parsed.len(), 1, "length {len}");
            assert_eq!(parsed[0].as_ref(), der.as_slice(), "length {len}");
            assert!(pem.lines().all(|l| l.len() <= 64), "length {len}");
        }
    }

    #[test]
    fn der_lengths() {
        for (len, want) in [
            (0usize, vec![0x00]),
            (0x7f, vec![0x7f]),
            (0x80, vec![0x81, 0x80]),
            (0x1234, vec![0x82, 0x12, 0x34]),
        ] {
            let mut out = Vec::new();
            der_len(&mut out, len);
            assert_eq!(out, want, "length {len:#x}");
        }
    }
}
