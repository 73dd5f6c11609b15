//! A request body that can be sent again, for retries (Linkerd's `ReplayBody`). The body is
//! streamed to the first try as it arrives, and recorded on the way; a retry's body
//! ([`ReplayBody::try_clone`]) yields the recording from the start, then goes on reading the
//! client's body where the previous try stopped. Tries are sequential: one body reads at a
//! time. The recording is bounded: once it holds more than `limit` bytes it is dropped and
//! the request is no longer retried (a large upload is streamed once, never buffered whole).
//! Trailers are recorded and replayed too (gRPC's status is in them).

use std::{
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _};
use hyper::body::{Body, Frame, SizeHint};

/// The error of a boxed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a replayed body cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the request body went past the retry buffer ({limit} bytes) in an earlier try and \
         cannot be replayed: raise `max_buffered_body` to retry such requests"
    )]
    Overflowed { limit: usize },
    #[error("the client's request body failed in an earlier try: {0}")]
    Failed(String),
}

/// A body recorded for retries; see the module's documentation.
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// The data frames of the recording this body has yielded.
    cursor: usize,
    /// Whether this body has yielded the trailers.
    trailers_sent: bool,
}

/// What the tries of one request share.
#[derive(Debug)]
struct Shared {
    source: Source,
    limit: usize,
    /// Data frames read from the client's body so far.
    read: usize,
    /// Those frames, unless `overflowed`.
    recorded: Vec<Bytes>,
    /// Their bytes.
    recorded_len: usize,
    /// The recording went past `limit` and was dropped: nothing more is recorded.
    overflowed: bool,
    /// The client's trailers, once read.
    trailers: Option<HeaderMap>,
}

#[derive(Debug)]
enum Source {
    /// The client's body, not read to its end yet.
    Reading(UnsyncBoxBody<Bytes, BoxError>),
    Ended,
    /// It failed, with this error.
    Failed(String),
}

impl ReplayBody {
    /// Records `body`, up to `limit` bytes. A body announcing more than `limit` bytes (its
    /// size hint) is not recorded at all.
    pub fn new<B>(body: B, limit: usize) -> Self
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let overflowed = body.size_hint().lower() > limit as u64;
        ReplayBody {
            shared: Arc::new(Mutex::new(Shared {
                source: Source::Reading(body.map_err(Into::into).boxed_unsync()),
                limit,
                read: 0,
                recorded: Vec::new(),
                recorded_len: 0,
                overflowed,
                trailers: None,
            })),
            cursor: 0,
            trailers_sent: false,
        }
    }

    /// The body for another try: everything read so far, then the rest of the client's body.
    /// `None` once the body went past the limit (the request is not retried).
    ///
    /// The previous try's body should be dropped before this one is polled: should it read
    /// on past the limit, this one could not be replayed (it fails with
    /// [`Error::Overflowed`]).
    pub fn try_clone(&self) -> Option<ReplayBody> {
        let shared = lock(&self.shared);
        (!shared.overflowed).then(|| ReplayBody {
            shared: Arc::clone(&self.shared),
            cursor: 0,
            trailers_sent: false,
        })
    }
}

impl ReplayBody {
    /// Whether the client's body has been read to its end within the limit (or had nothing to
    /// read): a clone then replays all of it without reading the client's body again.
    pub fn whole(&self) -> bool {
        let shared = lock(&self.shared);
        !shared.overflowed
            && match &shared.source {
                Source::Ended => true,
                Source::Reading(body) => body.is_end_stream(),
                Source::Failed(_) => false,
            }
    }
}

impl Shared {
    fn record(&mut self, data: &Bytes) {
        if self.overflowed {
            return;
        }
        self.recorded_len = self.recorded_len.saturating_add(data.len());
        if self.recorded_len > self.limit {
            self.overflowed = true;
            self.recorded = Vec::new();
        } else {
            self.recorded.push(data.clone());
        }
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic elsewhere while holding the lock leaves the state as consistent as at any
    // await point: carry on.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut guard = lock(&this.shared);
        let shared = &mut *guard;
        // The recording first.
        if this.cursor < shared.read {
            let Some(data) = shared.recorded.get(this.cursor).cloned() else {
                let limit = shared.limit;
                return Poll::Ready(Some(Err(Error::Overflowed { limit }.into())));
            };
            this.cursor += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = &shared.trailers {
            if this.trailers_sent {
                return Poll::Ready(None);
            }
            this.trailers_sent = true;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
        }
        // Then the client's body, where the last reader left it.
        let body = match &mut shared.source {
            Source::Reading(body) => body,
            Source::Ended => return Poll::Ready(None),
            Source::Failed(e) => return Poll::Ready(Some(Err(Error::Failed(e.clone()).into()))),
        };
        let frame = match ready!(Pin::new(body).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                shared.source = Source::Failed(e.to_string());
                return Poll::Ready(Some(Err(e)));
            }
            None => {
                shared.source = Source::Ended;
                return Poll::Ready(None);
            }
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                shared.read += 1;
                this.cursor += 1;
                shared.record(&data);
                Frame::data(data)
            }
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => {
                    // Trailers end a body.
                    shared.trailers = Some(trailers.clone());
                    shared.source = Source::Ended;
                    this.trailers_sent = true;
                    Frame::trailers(trailers)
                }
                Err(_) => return Poll::Ready(Some(Err("a body frame of an unknown kind".into()))),
            },
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let shared = lock(&self.shared);
        if self.cursor < shared.read {
            return false;
        }
        if shared.trailers.is_some() {
            return self.trailers_sent;
        }
        match &shared.source {
            Source::Reading(body) => body.is_end_stream(),
            Source::Ended => true,
            Source::Failed(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let shared = lock(&self.shared);
        if shared.overflowed && self.cursor < shared.read {
            return SizeHint::default();
        }
        let replay: u64 = shared
            .recorded
            .get(self.cursor..)
            .unwrap_or_default()
            .iter()
            .map(|d| d.len() as u64)
            .sum();
        match &shared.source {
            Source::Reading(body) => {
                let rest = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(replay));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(replay));
                }
                hint
            }
            Source::Ended | Source::Failed(_) => SizeHint::with_exact(replay),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt as _, Full, StreamBody};

    use super::*;

    type Frames = Vec<Result<Frame<Bytes>, std::io::Error>>;

    fn data(s: &'static str) -> Result<Frame<Bytes>, std::io::Error> {
        Ok(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    /// A body of these frames, with no size hint.
    fn body(frames: Frames, limit: usize) -> ReplayBody {
        ReplayBody::new(StreamBody::new(futures::stream::iter(frames)), limit)
    }

    /// The data and trailers of a body read to its end.
    async fn read(body: ReplayBody) -> (Bytes, Option<HeaderMap>) {
        let all = body.collect().await.expect("the whole body");
        let trailers = all.trailers().cloned();
        (all.to_bytes(), trailers)
    }

    async fn next_data(body: &mut ReplayBody) -> Bytes {
        body.frame()
            .await
            .expect("a frame")
            .expect("not an error")
            .into_data()
            .expect("data")
    }

    fn abc() -> Frames {
        vec![data("a"), data("bc"), data("def")]
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_is_replayed_whole() {
        let first = body(abc(), 100);
        let second = first.try_clone().expect("replayable");
        assert_eq!(read(first).await.0, "abcdef");
        assert_eq!(second.size_hint().exact(), Some(6));
        let third = second.try_clone().expect("replayable");
        assert_eq!(read(second).await.0, "abcdef");
        assert_eq!(read(third).await.0, "abcdef");
    }

    #[tokio::test]
    async fn a_body_is_whole_once_read_to_its_end_within_the_limit() {
        let mut first = body(abc(), 100);
        let mirror = first.try_clone().expect("replayable");
        assert!(!mirror.whole());
        assert_eq!(next_data(&mut first).await, "a");
        assert!(!mirror.whole(), "read in part");
        let _ = read(first).await;
        assert!(mirror.whole());
        assert_eq!(read(mirror).await.0, "abcdef");
        // Nothing to read is whole at once; past the limit never is.
        assert!(ReplayBody::new(http_body_util::Empty::<Bytes>::new(), 0).whole());
        let over = body(abc(), 2);
        let probe = over.try_clone().expect("replayable until read");
        let _ = read(over).await;
        assert!(!probe.whole());
    }

    #[tokio::test]
    async fn a_body_read_in_part_is_replayed_then_read_on() {
        let mut first = body(abc(), 100);
        assert_eq!(next_data(&mut first).await, "a");
        assert!(!first.is_end_stream());
        let mut second = first.try_clone().expect("replayable");
        drop(first);
        assert_eq!(next_data(&mut second).await, "a", "the recording");
        assert_eq!(
            next_data(&mut second).await,
            "bc",
            "the client's body, read on"
        );
        let third = second.try_clone().expect("replayable");
        assert_eq!(read(second).await.0, "def", "the rest");
        assert_eq!(read(third).await.0, "abcdef");
    }

    #[tokio::test]
    async fn the_size_hint_counts_the_recording_and_the_rest() {
        let mut first = ReplayBody::new(Full::new(Bytes::from_static(b"hello")), 100);
        assert_eq!(first.size_hint().exact(), Some(5));
        let second = first.try_clone().expect("replayable");
        assert_eq!(next_data(&mut first).await, "hello");
        assert!(first.is_end_stream());
        assert_eq!(first.size_hint().exact(), Some(0));
        assert!(!second.is_end_stream());
        assert_eq!(second.size_hint().exact(), Some(5));
        assert_eq!(read(second).await.0, "hello");
    }

    #[tokio::test]
    async fn past_the_limit_the_body_streams_on_but_is_not_replayable() {
        let mut first = body(abc(), 2);
        assert_eq!(next_data(&mut first).await, "a");
        let early = first.try_clone().expect("1 byte: replayable");
        assert_eq!(next_data(&mut first).await, "bc");
        assert!(first.try_clone().is_none(), "3 bytes are past the limit");
        assert_eq!(read(first).await.0, "def", "the first try gets the rest");
        // A body cloned before, behind the reader, cannot be served.
        let err = read_err(early).await;
        assert!(err.contains("past the retry buffer (2 bytes)"), "{err}");
        // A body announcing more than the limit is not recorded at all.
        let big = ReplayBody::new(Full::new(Bytes::from_static(b"hello")), 4);
        assert!(big.try_clone().is_none());
        assert_eq!(read(big).await.0, "hello");
        // Exactly the limit is replayable.
        let exact = body(abc(), 6);
        let again = exact.try_clone().expect("replayable");
        assert_eq!(read(exact).await.0, "abcdef");
        assert!(again.try_clone().is_some());
    }

    async fn read_err(body: ReplayBody) -> String {
        match body.collect().await {
            Ok(all) => panic!("read {:?} without an error", all.to_bytes()),
            Err(e) => e.to_string(),
        }
    }

    #[tokio::test]
    async fn trailers_are_replayed() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = vec![data("x"), Ok(Frame::trailers(trailers.clone()))];
        let first = body(frames, 100);
        let second = first.try_clone().expect("replayable");
        assert_eq!(
            read(first).await,
            (Bytes::from("x"), Some(trailers.clone()))
        );
        let third = second.try_clone().expect("replayable");
        assert_eq!(
            read(second).await,
            (Bytes::from("x"), Some(trailers.clone()))
        );
        let mut third = third;
        assert_eq!(next_data(&mut third).await, "x");
        assert!(!third.is_end_stream(), "the trailers are still to come");
        assert!(third.frame().await.expect("trailers").is_ok());
        assert!(third.is_end_stream());
    }

    #[tokio::test]
    async fn an_error_of_the_clients_body_is_surfaced_to_every_try() {
        let frames = vec![data("a"), Err(std::io::Error::other("client went away"))];
        let mut first = body(frames, 100);
        assert_eq!(next_data(&mut first).await, "a");
        let second = first.try_clone().expect("replayable");
        let err = first
            .frame()
            .await
            .expect("a frame")
            .expect_err("the error");
        assert_eq!(err.to_string(), "client went away");
        let mut second = second;
        assert_eq!(next_data(&mut second).await, "a");
        let err = read_err(second).await;
        assert!(err.contains("client went away"), "{err}");
    }
}
