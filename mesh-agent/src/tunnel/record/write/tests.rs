//! The record writer: coalescing, batch bounds, key update points and close_notify, each
//! checked by reading the output back with the reader.

use std::io::IoSlice;

use super::{Writer, BATCH_RECORDS};
use crate::tunnel::record::{
    cipher::TAG_LEN,
    content,
    read::Event,
    testing::{protection, read_all, Rng},
    HEADER_LEN, MAX_PLAINTEXT,
};

const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

#[test]
fn vectored_chunks_are_coalesced_into_full_records() {
    let mut w = Writer::new(protection(0));
    // What h2 writes: a 9-byte frame header, then the payload.
    let header = [1u8; 9];
    let payload = vec![2u8; 2 * MAX_PLAINTEXT + 91];
    let n = w
        .seal_data(&[IoSlice::new(&header), IoSlice::new(&payload)])
        .expect("seal");
    assert_eq!(n, header.len() + payload.len());
    assert_eq!(
        w.pending().len(),
        n + 3 * OVERHEAD,
        "two full records and one of 100 bytes, not one record per chunk"
    );
    let out = read_all(w.pending(), 1000);
    let mut expected = header.to_vec();
    expected.extend(&payload);
    assert_eq!(out.data, expected);
    assert!(out.error.is_none(), "{:?}", out.error);
}

#[test]
fn one_call_seals_at_most_one_batch_and_the_buffer_is_released() {
    let data = vec![3u8; (BATCH_RECORDS + 3) * MAX_PLAINTEXT];
    let mut w = Writer::new(protection(0));
    let n = w.seal_data(&[IoSlice::new(&data)]).expect("seal");
    assert_eq!(n, BATCH_RECORDS * MAX_PLAINTEXT);
    assert_eq!(
        w.pending().len(),
        BATCH_RECORDS * (MAX_PLAINTEXT + OVERHEAD)
    );
    assert!(w.capacity() <= BATCH_RECORDS * (MAX_PLAINTEXT + OVERHEAD) + 64);
    w.advance(1000);
    w.release_if_empty();
    assert!(w.capacity() > 0, "unsent ciphertext is kept");
    let rest = w.pending().len();
    w.advance(rest);
    assert!(w.pending().is_empty());
    w.release_if_empty();
    assert_eq!(w.capacity(), 0, "an empty writer holds nothing");
}

#[test]
fn sealing_stops_at_the_key_update_point() {
    let mut w = Writer::new(protection(0));
    w.set_key_update_after(4);
    let data = vec![4u8; 10 * MAX_PLAINTEXT];
    let n = w.seal_data(&[IoSlice::new(&data)]).expect("seal");
    assert_eq!(
        n,
        3 * MAX_PLAINTEXT,
        "three records; the fourth sequence number is the KeyUpdate's"
    );
    assert!(w.needs_key_update());
    w.seal_control(content::HANDSHAKE, &[24, 0, 0, 1, 0])
        .expect("KeyUpdate");
    w.rekey(protection(1), 4);
    assert!(!w.needs_key_update());
    let m = w.seal_data(&[IoSlice::new(&data[n..])]).expect("seal");
    assert_eq!(m, 3 * MAX_PLAINTEXT);
    let out = read_all(w.pending(), 4096);
    let update = Event::KeyUpdate {
        update_requested: false,
    };
    assert_eq!(out.events, [update]);
    assert_eq!(out.data, data[..n + m]);
}

#[test]
fn close_notify_is_sent_once() {
    let mut w = Writer::new(protection(0));
    w.seal_data(&[IoSlice::new(b"bye")]).expect("seal");
    w.close().expect("close");
    w.close().expect("close again");
    assert!(w.is_closed());
    let out = read_all(w.pending(), 7);
    assert_eq!(out.data, b"bye");
    assert_eq!(out.events, [Event::Closed]);
}

#[test]
fn random_vectored_writes_round_trip() {
    let mut rng = Rng::new(42);
    for _ in 0..50 {
        let mut w = Writer::new(protection(0));
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..rng.below(20) + 1 {
            let chunks: Vec<Vec<u8>> = (0..rng.below(5))
                .map(|_| {
                    let len = rng.below(3 * MAX_PLAINTEXT / 2);
                    rng.bytes(len)
                })
                .collect();
            let slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
            let n = w.seal_data(&slices).expect("seal");
            expected.extend(chunks.concat().into_iter().take(n));
            // The socket takes a random part; the rest stays pending.
            let take = rng.below(w.pending().len() + 1);
            wire.extend_from_slice(&w.pending()[..take]);
            w.advance(take);
        }
        wire.extend_from_slice(w.pending());
        let out = read_all(&wire, 1 + rng.below(40_000));
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.data, expected);
    }
}

#[test]
fn an_unsent_key_update_is_tracked_until_it_leaves() {
    let mut w = Writer::new(protection(0));
    w.seal_data(&[IoSlice::new(b"before")]).expect("seal");
    w.seal_key_update().expect("KeyUpdate");
    assert!(w.key_update_unsent());
    let before = w.pending().len() - (HEADER_LEN + 5 + 1 + TAG_LEN);
    w.advance(before + 1);
    assert!(w.key_update_unsent(), "partly written");
    let rest = w.pending().len();
    w.advance(rest);
    assert!(!w.key_update_unsent(), "on the wire");
}
