//! The record reader over hand-made input: framing at every split, limits, inner content
//! types, post-handshake messages, and a deterministic fuzz run over random and mutated bytes.

use rustls::AlertDescription;

use super::{Event, Reader};
use crate::tunnel::record::{
    content,
    testing::{drain, feed, handshake_message, protection, read_all, record, seal, Drained, Rng},
    Error, MAX_PLAINTEXT,
};

const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;

fn data_records(sizes: &[usize]) -> (Vec<u8>, Vec<u8>) {
    let mut p = protection(0);
    let mut stream = Vec::new();
    let mut plain = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let content: Vec<u8> = (0..size).map(|j| (i * 31 + j).to_le_bytes()[0]).collect();
        stream.extend(record(&mut p, content::APPLICATION_DATA, &content));
        plain.extend(content);
    }
    (stream, plain)
}

fn expect_error(out: &Drained) -> &Error {
    out.error
        .as_ref()
        .unwrap_or_else(|| panic!("expected an error, got {out:?}"))
}

#[test]
fn data_is_reassembled_whatever_the_read_sizes() {
    let (stream, plain) = data_records(&[1, 0, MAX_PLAINTEXT, 300, 0, 5000]);
    for chunk in [1, 2, 5, 7, 4096, 16_405, stream.len()] {
        let out = read_all(&stream, chunk);
        assert!(out.error.is_none(), "chunk {chunk}: {:?}", out.error);
        assert!(out.events.is_empty(), "chunk {chunk}: {:?}", out.events);
        assert_eq!(out.data, plain, "chunk {chunk}");
    }
}

#[test]
fn padding_is_stripped() {
    let mut p = protection(0);
    let mut inner = b"padded".to_vec();
    inner.push(content::APPLICATION_DATA);
    inner.extend([0; 200]);
    let out = read_all(&seal(&mut p, content::APPLICATION_DATA, &inner), 64);
    assert_eq!(out.data, b"padded");
    assert!(out.error.is_none(), "{:?}", out.error);
}

#[test]
fn close_notify_ends_the_stream_and_later_bytes_are_ignored() {
    let mut p = protection(0);
    let mut stream = record(&mut p, content::APPLICATION_DATA, b"last words");
    stream.extend(record(&mut p, content::ALERT, &[1, 0]));
    stream.extend(b"garbage after close_notify");
    let out = read_all(&stream, stream.len());
    assert_eq!(out.data, b"last words");
    assert_eq!(out.events, [Event::Closed]);
    assert!(out.error.is_none(), "{:?}", out.error);
}

#[test]
fn a_fatal_alert_is_an_error_naming_it() {
    let mut p = protection(0);
    let out = read_all(&record(&mut p, content::ALERT, &[2, 40]), 100);
    let e = expect_error(&out);
    assert!(
        matches!(e, Error::AlertReceived(AlertDescription::HandshakeFailure)),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "TLS: peer sent alert HandshakeFailure (40)");
    // The level does not matter in TLS 1.3: a warning-level bad_certificate is fatal too.
    let out = read_all(&record(&mut p, content::ALERT, &[1, 42]), 100);
    assert!(out.error.is_some(), "{out:?}");
}

#[test]
fn user_canceled_is_ignored_and_malformed_alerts_are_refused() {
    let mut p = protection(0);
    let mut stream = record(&mut p, content::ALERT, &[1, 90]);
    stream.extend(record(&mut p, content::APPLICATION_DATA, b"still here"));
    let out = read_all(&stream, stream.len());
    assert_eq!(out.data, b"still here");
    assert!(out.error.is_none(), "{:?}", out.error);

    let out = read_all(
        &record(&mut protection(0), content::ALERT, &[2, 40, 0]),
        100,
    );
    assert!(
        matches!(expect_error(&out), Error::MalformedAlert { len: 3 }),
        "{out:?}"
    );
}

#[test]
fn only_application_data_records_are_accepted_after_the_handshake() {
    // change_cipher_spec, a plaintext alert, a plaintext handshake record, garbage.
    for outer in [20u8, 21, 22, 0, 255] {
        let out = read_all(&[outer, 3, 3, 0, 1, 1], 6);
        assert!(
            matches!(expect_error(&out), Error::UnexpectedRecordType(t) if *t == outer),
            "type {outer}: {out:?}"
        );
    }
    let mut p = protection(0);
    let out = read_all(&record(&mut p, 20, &[1]), 100);
    assert!(
        matches!(expect_error(&out), Error::UnexpectedContentType(20)),
        "{out:?}"
    );
}

#[test]
fn size_limits() {
    // Refused from the header alone, before the body arrives.
    let out = read_all(&[23, 3, 3, 0x41, 0x01], 5);
    let e = expect_error(&out);
    assert!(matches!(e, Error::RecordTooLarge { len: 16_641 }), "{e:?}");
    assert!(e.to_string().starts_with("TLS: record too large"), "{e}");
    let out = read_all(&[23, 3, 3, 0, 16], 5);
    assert!(
        matches!(expect_error(&out), Error::RecordTooShort { len: 16 }),
        "{out:?}"
    );

    // The largest inner plaintext passes; one byte of padding more does not.
    let mut p = protection(0);
    let mut inner = vec![7; MAX_PLAINTEXT];
    inner.push(content::APPLICATION_DATA);
    let out = read_all(&seal(&mut p, content::APPLICATION_DATA, &inner), 1 << 20);
    assert_eq!(out.data.len(), MAX_PLAINTEXT, "{:?}", out.error);
    inner.push(0);
    let out = read_all(
        &seal(&mut protection(0), content::APPLICATION_DATA, &inner),
        1 << 20,
    );
    assert!(
        matches!(expect_error(&out), Error::PlaintextTooLarge { len } if *len == MAX_PLAINTEXT + 2),
        "{out:?}"
    );
}

#[test]
fn an_all_zero_inner_plaintext_is_refused() {
    let out = read_all(
        &seal(&mut protection(0), content::APPLICATION_DATA, &[0; 40]),
        100,
    );
    assert!(
        matches!(expect_error(&out), Error::MissingContentType),
        "{out:?}"
    );
}

#[test]
fn corrupted_wrong_key_and_replayed_records_are_bad_record_mac() {
    let mut p = protection(0);
    let good = record(&mut p, content::APPLICATION_DATA, b"authentic");
    // The version (judged from the header too) must be 0x0303.
    for at in [1, 2] {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        let out = read_all(&bad, bad.len());
        assert!(
            matches!(expect_error(&out), Error::BadRecordVersion(_)),
            "byte {at}: {out:?}"
        );
    }
    // Damage anywhere but the header (judged before decryption) fails the tag.
    for at in [5, 12, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        let out = read_all(&bad, bad.len());
        assert!(out.data.is_empty(), "byte {at}");
        assert!(
            matches!(expect_error(&out), Error::BadRecordMac),
            "byte {at}: {out:?}"
        );
    }
    let out = read_all(
        &record(&mut protection(9), content::APPLICATION_DATA, b"x"),
        64,
    );
    let e = expect_error(&out);
    assert!(e.to_string().contains("bad_record_mac"), "{e}");
    // Sequence numbers advance: the same record twice fails the second time.
    let mut twice = good.clone();
    twice.extend(&good);
    let out = read_all(&twice, twice.len());
    assert_eq!(out.data, b"authentic");
    assert!(matches!(expect_error(&out), Error::BadRecordMac), "{out:?}");
}

#[test]
fn key_update_switches_the_key_at_the_record_boundary() {
    let mut p = protection(0);
    let mut stream = record(&mut p, content::APPLICATION_DATA, b"old key ");
    stream.extend(record(
        &mut p,
        content::HANDSHAKE,
        &handshake_message(KEY_UPDATE, &[1]),
    ));
    let mut p = protection(1);
    stream.extend(record(&mut p, content::APPLICATION_DATA, b"new key"));
    stream.extend(record(
        &mut p,
        content::HANDSHAKE,
        &handshake_message(KEY_UPDATE, &[0]),
    ));
    let mut p = protection(2);
    stream.extend(record(&mut p, content::APPLICATION_DATA, b", newer key"));
    for chunk in [1, 3, stream.len()] {
        let out = read_all(&stream, chunk);
        assert!(out.error.is_none(), "chunk {chunk}: {:?}", out.error);
        assert_eq!(out.data, b"old key new key, newer key");
        let updates = [
            Event::KeyUpdate {
                update_requested: true,
            },
            Event::KeyUpdate {
                update_requested: false,
            },
        ];
        assert_eq!(out.events, updates);
    }
}

#[test]
fn key_update_must_end_its_record_and_be_well_formed() {
    let mut message = handshake_message(KEY_UPDATE, &[0]);
    message.extend(handshake_message(NEW_SESSION_TICKET, &[0; 10]));
    let out = read_all(
        &record(&mut protection(0), content::HANDSHAKE, &message),
        100,
    );
    assert!(
        matches!(expect_error(&out), Error::KeyUpdateNotAligned),
        "{out:?}"
    );
    for body in [&[2u8][..], &[], &[0, 0]] {
        let message = handshake_message(KEY_UPDATE, body);
        let out = read_all(
            &record(&mut protection(0), content::HANDSHAKE, &message),
            100,
        );
        assert!(
            matches!(expect_error(&out), Error::MalformedKeyUpdate),
            "{body:?}: {out:?}"
        );
    }
}

#[test]
fn post_handshake_messages_are_reassembled_across_and_within_records() {
    let ticket = |n: u8| handshake_message(NEW_SESSION_TICKET, &[n; 300]);
    let first = ticket(1);
    let mut p = protection(0);
    let mut stream = Vec::new();
    for part in first.chunks(128) {
        stream.extend(record(&mut p, content::HANDSHAKE, part));
    }
    let mut two = ticket(2);
    two.extend(ticket(3));
    stream.extend(record(&mut p, content::HANDSHAKE, &two));
    stream.extend(record(&mut p, content::APPLICATION_DATA, b"after"));
    let out = read_all(&stream, 50);
    assert!(out.error.is_none(), "{:?}", out.error);
    let tickets: Vec<_> = (1..=3)
        .map(|n| Event::NewSessionTicket(vec![n; 300]))
        .collect();
    assert_eq!(out.events, tickets);
    assert_eq!(out.data, b"after");
}

#[test]
fn post_handshake_violations_are_refused() {
    let mut p = protection(0);
    // Another record type in the middle of a fragmented message.
    let ticket = handshake_message(NEW_SESSION_TICKET, &[1; 100]);
    let mut stream = record(&mut p, content::HANDSHAKE, &ticket[..50]);
    stream.extend(record(&mut p, content::APPLICATION_DATA, b"x"));
    let out = read_all(&stream, stream.len());
    assert!(
        matches!(expect_error(&out), Error::Interleaved(23)),
        "{out:?}"
    );
    // Any other handshake message (a Finished, a ClientHello).
    for msg_type in [20u8, 1, 2] {
        let message = handshake_message(msg_type, &[0; 32]);
        let out = read_all(
            &record(&mut protection(0), content::HANDSHAKE, &message),
            100,
        );
        assert!(
            matches!(expect_error(&out), Error::UnexpectedHandshake(t) if *t == msg_type),
            "{out:?}"
        );
    }
    // A message announcing more than the limit, and an empty handshake record.
    let out = read_all(
        &record(
            &mut protection(0),
            content::HANDSHAKE,
            &[4, 0x01, 0x11, 0x70],
        ),
        100,
    );
    assert!(
        matches!(expect_error(&out), Error::HandshakeTooLarge { .. }),
        "{out:?}"
    );
    let out = read_all(&record(&mut protection(0), content::HANDSHAKE, &[]), 100);
    assert!(
        matches!(expect_error(&out), Error::EmptyHandshakeRecord),
        "{out:?}"
    );
    // Fragments that never complete cannot grow beyond the limit.
    let mut p = protection(0);
    let mut stream = Vec::new();
    let mut header = vec![4, 0, 0xff, 0xff];
    header.extend([0; MAX_PLAINTEXT - 4]);
    stream.extend(record(&mut p, content::HANDSHAKE, &header));
    for _ in 0..5 {
        stream.extend(record(&mut p, content::HANDSHAKE, &[0; MAX_PLAINTEXT]));
    }
    let out = read_all(&stream, stream.len());
    assert!(
        matches!(expect_error(&out), Error::HandshakeTooLarge { .. }),
        "{out:?}"
    );
}

#[test]
fn buffers_are_released_when_empty_and_sized_by_traffic() {
    let (stream, _) = data_records(&[100, 200]);
    let mut reader = Reader::new(protection(0), Vec::new(), false);
    assert_eq!(reader.capacity(), 0, "nothing held before traffic");
    feed(&mut reader, &stream[..50]);
    reader.release_if_empty();
    assert!(reader.capacity() > 0, "a partial record is kept");
    let mut key = 0;
    let mut out = Drained::default();
    drain(&mut reader, &mut key, &mut out);
    feed(&mut reader, &stream[50..]);
    drain(&mut reader, &mut key, &mut out);
    assert_eq!(out.data.len(), 300);
    reader.release_if_empty();
    assert_eq!(reader.capacity(), 0, "an empty reader holds nothing");

    // The read space starts at one record and doubles while reads fill it.
    let space = reader.read_space().capacity();
    assert!(
        (super::READ_MIN..2 * super::READ_MIN).contains(&space),
        "{space}"
    );
    reader.note_read(space, space);
    assert!(reader.read_space().capacity() >= 2 * super::READ_MIN);
    for _ in 0..10 {
        let space = reader.read_space().capacity();
        reader.note_read(space, space);
    }
    assert!(reader.read_space().capacity() <= super::READ_MAX + super::READ_MIN);
}

/// Random bytes, and valid streams with random damage, fed in random pieces: the reader must
/// end with data, an error or a request for more input, never panic or loop.
#[test]
fn fuzz_random_and_mutated_input() {
    let mut rng = Rng::new(0x6d65_7368);
    for round in 0..3000 {
        let stream = match round % 3 {
            // Noise, sometimes behind a plausible header.
            0 => {
                let mut s = rng.noise(400);
                if rng.below(2) == 0 {
                    let len = u8::try_from(rng.below(256)).expect("byte");
                    let hi = u8::try_from(rng.below(0x42)).expect("byte");
                    s.splice(0..0, [23, 3, 3, hi, len]);
                }
                s
            }
            // A valid stream of every kind of record, then damaged.
            _ => {
                let mut key = 0;
                let mut p = protection(key);
                let mut s = Vec::new();
                for _ in 0..rng.below(8) + 1 {
                    match rng.below(6) {
                        0 => s.extend(record(&mut p, content::ALERT, &[1, 0])),
                        1 => {
                            let body = [u8::from(rng.below(2) == 0)];
                            let m = handshake_message(KEY_UPDATE, &body);
                            s.extend(record(&mut p, content::HANDSHAKE, &m));
                            key += 1;
                            p = protection(key);
                        }
                        2 => {
                            let m = handshake_message(NEW_SESSION_TICKET, &rng.bytes(40));
                            let cut = rng.below(m.len());
                            s.extend(record(&mut p, content::HANDSHAKE, &m[..cut.max(1)]));
                        }
                        _ => {
                            let data = rng.noise(3000);
                            s.extend(record(&mut p, content::APPLICATION_DATA, &data));
                        }
                    }
                }
                for _ in 0..rng.below(4) {
                    match rng.below(3) {
                        0 if !s.is_empty() => {
                            let at = rng.below(s.len());
                            s[at] ^= 1 << rng.below(8);
                        }
                        1 => s.truncate(rng.below(s.len() + 1)),
                        _ => {
                            let at = rng.below(s.len() + 1);
                            s.splice(at..at, rng.noise(8));
                        }
                    }
                }
                s
            }
        };
        let chunk = 1 + rng.below(stream.len().max(1));
        let out = read_all(&stream, chunk);
        // Whatever came out is bounded by what went in.
        assert!(out.data.len() <= stream.len(), "round {round}");
        if let Some(e) = &out.error {
            assert!(e.to_string().starts_with("TLS"), "round {round}: {e}");
        }
    }
}

#[test]
fn a_run_of_empty_records_is_cut_off() {
    let mut p = protection(0);
    let mut stream = Vec::new();
    for round in 0..3 {
        for _ in 0..32 {
            stream.extend(record(&mut p, content::APPLICATION_DATA, b""));
        }
        // Anything with content resets the count.
        stream.extend(record(&mut p, content::APPLICATION_DATA, &[round]));
    }
    let out = read_all(&stream, 100);
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.data, [0, 1, 2]);
    for _ in 0..33 {
        stream.extend(record(&mut p, content::ALERT, &[1, 90]));
    }
    let out = read_all(&stream, 100);
    assert!(
        matches!(expect_error(&out), Error::TooManyEmptyRecords),
        "{out:?}"
    );
}
