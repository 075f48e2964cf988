//! The one body type every response carries, and the body wrappers that
//! count bytes for the access log.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body graft sends or forwards: boxed once, streamed, never collected
/// unless a handler has a size bound for it.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

/// Counts the data bytes that pass through a body into a shared counter.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Runs a closure once the body is dropped — after its last byte was sent,
/// or when the client went away — with the byte count and whether the body
/// reached its end. The access log is written from here, so its line carries
/// the bytes actually sent.
pub struct OnDone<F: FnOnce(u64, bool)> {
    inner: Body,
    sent: u64,
    finished: bool,
    done: Option<F>,
}

impl<F: FnOnce(u64, bool)> OnDone<F> {
    pub fn new(inner: Body, done: F) -> Self {
        let finished = inner.is_end_stream();
        OnDone {
            inner,
            sent: 0,
            finished,
            done: Some(done),
        }
    }
}

impl<F: FnOnce(u64, bool) + Unpin> HttpBody for OnDone<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.finished = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<F: FnOnce(u64, bool)> Drop for OnDone<F> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.sent, self.finished || self.inner.is_end_stream());
        }
    }
}

/// A body that fails when no frame arrives for `idle` while it is being
/// waited for (an upstream gone silent mid-body): the client's body then
/// errors instead of hanging. Time the reader spends not asking (a slow
/// client) does not count.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: None,
        }
    }
}

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            self.timer = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let idle = self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "no byte from the upstream for {idle:?}"
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why [`collect_limited`] gave up.
#[derive(Debug)]
pub enum CollectError {
    /// More than the limit arrived (or was announced).
    TooLarge,
    /// No frame arrived for this long.
    Stalled(std::time::Duration),
    /// The body ended in an error (a cut connection, a bad chunk).
    Broken(BoxError),
}

/// Reads a whole body of at most `limit` bytes (manifests and indexes,
/// never blobs): the one bounded reader for client and upstream bodies.
/// With `idle`, a body that stays silent that long between frames is given
/// up on; it is an idle bound, not a total deadline, so a slow body that
/// keeps moving still completes.
pub async fn collect_limited<B>(
    body: B,
    limit: usize,
    idle: Option<std::time::Duration>,
) -> Result<Bytes, CollectError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(CollectError::TooLarge);
    }
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::new();
    loop {
        let next = body.frame();
        let frame = match idle {
            Some(d) => tokio::time::timeout(d, next)
                .await
                .map_err(|_| CollectError::Stalled(d))?,
            None => next.await,
        };
        let Some(frame) = frame else {
            return Ok(buf.freeze());
        };
        let frame = frame.map_err(|e| CollectError::Broken(e.into()))?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > limit {
                return Err(CollectError::TooLarge);
            }
            buf.extend_from_slice(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream::{self, StreamExt};
    use http_body_util::StreamBody;

    type Item = Result<Frame<Bytes>, BoxError>;

    #[tokio::test]
    async fn a_body_that_goes_silent_mid_way_fails_instead_of_hanging() {
        let first: Item = Ok(Frame::data(Bytes::from_static(b"part")));
        let silent = stream::iter([first]).chain(stream::pending::<Item>());
        let mut body = IdleTimeout::new(StreamBody::new(silent), Duration::from_millis(50));
        let data = body.frame().await.expect("a frame").expect("data");
        assert_eq!(data.into_data().expect("data"), Bytes::from_static(b"part"));
        let end = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the idle bound fired");
        assert!(matches!(end, Some(Err(_))), "the body ended cleanly");
    }

    #[tokio::test]
    async fn time_the_reader_spends_away_does_not_count() {
        let chunks: Vec<Item> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
        ];
        let mut body = IdleTimeout::new(
            StreamBody::new(stream::iter(chunks)),
            Duration::from_millis(50),
        );
        body.frame().await.expect("a").expect("data");
        // A slow client: the next frame is asked for long after the bound
        // (the pause is the client's slowness, not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b = body.frame().await.expect("b").expect("data");
        assert_eq!(b.into_data().expect("data"), Bytes::from_static(b"b"));
        assert!(body.frame().await.is_none());
    }
}
