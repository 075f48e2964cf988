//! The layers every request goes through on its way to [`Proxy::handle`],
//! built once and shared by every connection. Each layer says why it is
//! there and why at its position (linkerd2-proxy's habit); the order in
//! [`build`] is outermost first.
//!
//! There is no body-size layer: manifests are bounded where they are read
//! (`server.max_manifest_bytes`, with an early 413 on a larger
//! `Content-Length`), blob uploads are unbounded streams by design, and
//! nothing else is buffered. A silent client is bounded instead, by the
//! body timeout.
//!
//! The three hand-written layers ([`RequestIdLayer`], [`AccessLogLayer`],
//! [`RequestCapLayer`]) return boxed `Send` futures, and the whole stack is
//! one concrete [`Stack`]: with concrete types rustc can prove the
//! connection future `Send`, which it could not through nested generic
//! futures over the boxed body (a higher-ranked lifetime limitation).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE};
use http::{HeaderValue, Request, Response};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveHeadersLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

use super::ServerStats;
use crate::body::{self, Body, BoxError, Counted, OnDone};
use crate::config::ServerConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::proxy::{Handled, Proxy};
use crate::route::Route;

/// The whole stack as one concrete, cloneable service.
pub(crate) type Stack = BoxCloneSyncService<Request<Incoming>, Response<Body>, Infallible>;

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// The request id header, read from clients and set on every response.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The client end of the connection a request came on, put on each request
/// by the accept loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    pub(crate) scheme: &'static str,
}

/// The id [`RequestIdLayer`] chose, for the layers below it.
#[derive(Clone, Debug)]
struct RequestId(String);

/// Builds the stack around `proxy`.
pub(crate) fn build(proxy: Arc<Proxy>, stats: Arc<ServerStats>, cfg: &ServerConfig) -> Stack {
    let stack = ServiceBuilder::new()
        // First, before any layer can log or copy the request: credentials
        // are marked sensitive, so no log line or debug dump prints them
        // (and `Set-Cookie` on the way out, for the same reason).
        .layer(SetSensitiveHeadersLayer::new([
            AUTHORIZATION,
            PROXY_AUTHORIZATION,
            COOKIE,
            SET_COOKIE,
        ]))
        // The id wraps everything that can answer (the cap, the panic
        // catch, the handler), so every answer and every log line of the
        // request names it.
        .layer(RequestIdLayer)
        // Inside the id (the line carries it), outside the cap and the panic
        // catch (shed and panicked requests are logged too).
        .layer(AccessLogLayer {
            metrics: proxy.metrics().clone(),
            board: proxy.board().clone(),
        })
        // Sheds at once rather than queueing: a queue would only hide
        // overload from clients that retry anyway. A request counts until
        // its response body is done, since streaming is what costs.
        .layer(RequestCapLayer {
            permits: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            stats: stats.clone(),
        })
        // Back to graft's one body type (the panic catch boxes its own).
        .map_response(|resp: Response<_>| resp.map(body::boxed))
        // Right around the handler, so a bug costs its own request only and
        // the 500 still passes through the id and log layers above.
        .layer(CatchPanicLayer::custom(move |panic| {
            stats.panics.fetch_add(1, Ordering::Relaxed);
            panic_response(panic)
        }))
        // Innermost, timing only the handler's own reads: the clock runs
        // while graft waits for the client's next bytes, not while graft
        // is busy (or held back by the upstream) between reads.
        .layer(RequestBodyTimeoutLayer::new(cfg.body_timeout))
        .service(Handler(proxy));
    BoxCloneSyncService::new(stack)
}

/// The innermost service: hands the request to [`Proxy::handle`].
#[derive(Clone)]
struct Handler(Arc<Proxy>);

impl<B> Service<Request<B>> for Handler
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Answer {
        let proxy = self.0.clone();
        let peer = req.extensions().get::<Peer>().copied().unwrap_or(Peer {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            scheme: "http",
        });
        Box::pin(async move {
            let req = req.map(body::boxed);
            Ok(proxy.handle(req, peer.addr, peer.scheme).await)
        })
    }
}

/// Gives each request an id: the client's `x-request-id` when it is sane,
/// else a new one; returns it on the response and runs everything below
/// inside [`crate::request_id::scope`].
#[derive(Clone)]
struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = WithRequestId<S>;

    fn layer(&self, inner: S) -> WithRequestId<S> {
        WithRequestId { inner }
    }
}

#[derive(Clone)]
struct WithRequestId<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for WithRequestId<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Answer {
        let id = req
            .headers()
            .get(X_REQUEST_ID)
            .and_then(sane_id)
            .unwrap_or_else(crate::request_id::next);
        let value = HeaderValue::from_str(&id).expect("request ids are visible ASCII");
        req.extensions_mut().insert(RequestId(id.clone()));
        let answer = self.inner.call(req);
        Box::pin(crate::request_id::scope(id, async move {
            let mut resp = answer.await?;
            resp.headers_mut().insert(X_REQUEST_ID, value);
            Ok(resp)
        }))
    }
}

/// A client's id is taken as is when it is short and made of characters
/// that cannot forge a log line or a header.
fn sane_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let ok = (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b));
    ok.then(|| s.to_string())
}

/// One `graft::access` line per request, written when its response body is
/// done (sent, or dropped by a client that went away), with the bytes that
/// actually went each way; and the request counter by route and status.
#[derive(Clone)]
struct AccessLogLayer {
    metrics: Arc<Metrics>,
    /// Where graft's own error answers are noted for the status page: this
    /// layer alone sees them all (shed and panicked requests too) with
    /// their route.
    board: Arc<crate::status::Board>,
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            metrics: self.metrics.clone(),
            board: self.board.clone(),
        }
    }
}

#[derive(Clone)]
struct AccessLog<S> {
    inner: S,
    metrics: Arc<Metrics>,
    board: Arc<crate::status::Board>,
}

// The inner future is named (not `S::Future: Send`): through the boxed
// body's `dyn Error` rustc would demand `Send` for every lifetime.
impl<S, B> Service<Request<B>> for AccessLog<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = Answer>,
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Answer {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let request_id = req.extensions().get::<RequestId>().map(|r| r.0.clone());
        let bytes_in = Arc::new(AtomicU64::new(0));
        let req = req.map(|b| body::boxed(Counted::new(b, bytes_in.clone())));
        let answer = self.inner.call(req);
        let metrics = self.metrics.clone();
        let board = self.board.clone();
        Box::pin(async move {
            let resp = answer.await?;
            let status = resp.status().as_u16();
            // Shed and panicked requests never reached the handler's
            // routing; name their route the same way it would have.
            let handled = resp.extensions().get::<Handled>().copied();
            let route = handled.map_or_else(|| route_kind(&path), |h| h.route);
            let upstream = handled.and_then(|h| h.upstream);
            metrics.request(route, status);
            if let Some(note) = resp.extensions().get::<crate::status::ErrorNote>() {
                board.record_error(route, note);
            }
            Ok(resp.map(move |b| {
                OnDone::new(b, move |bytes_out, complete| {
                    tracing::info!(
                        target: "graft::access",
                        method = %method,
                        path = %path,
                        route,
                        status,
                        bytes_in = bytes_in.load(Ordering::Relaxed),
                        bytes_out,
                        complete,
                        total_ms = millis(started.elapsed()),
                        upstream_ms = upstream.map(millis),
                        request_id = request_id.as_deref(),
                        "request"
                    );
                })
                .boxed_unsync()
            }))
        })
    }
}

fn route_kind(path: &str) -> &'static str {
    Route::parse(path)
        .as_ref()
        .map(Route::kind)
        .unwrap_or("invalid")
}

/// Milliseconds with microsecond precision, for log fields.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// At most `server.max_concurrent_requests` requests in flight; one more is
/// answered [`Error::Overloaded`] (503 `UNAVAILABLE`) at once. `/healthz`
/// and `/metrics` are not counted.
#[derive(Clone)]
struct RequestCapLayer {
    permits: Arc<Semaphore>,
    stats: Arc<ServerStats>,
}

impl<S> Layer<S> for RequestCapLayer {
    type Service = RequestCap<S>;

    fn layer(&self, inner: S) -> RequestCap<S> {
        RequestCap {
            inner,
            cap: self.clone(),
        }
    }
}

#[derive(Clone)]
struct RequestCap<S> {
    inner: S,
    cap: RequestCapLayer,
}

impl<S, B> Service<Request<B>> for RequestCap<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Answer {
        // Liveness and metrics must answer during overload: that is when
        // they are looked at, and a failed liveness probe would restart a
        // busy graft.
        if matches!(req.uri().path(), "/healthz" | "/metrics") {
            return Box::pin(self.inner.call(req));
        }
        let Ok(permit) = self.cap.permits.clone().try_acquire_owned() else {
            self.cap.stats.shed.fetch_add(1, Ordering::Relaxed);
            // Built when polled, inside the request id's scope, so the
            // answer names the request.
            return Box::pin(async { Ok(Error::Overloaded.into_response()) });
        };
        let answer = self.inner.call(req);
        Box::pin(async move {
            let resp = answer.await?;
            Ok(resp.map(|b| OnDone::new(b, move |_, _| drop(permit)).boxed_unsync()))
        })
    }
}

/// The 500 for a caught panic: an internal error like any other, logged
/// with the panic's message and the request id, which the client is told.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into());
    Error::Internal(format!("handler panicked: {what}")).into_response()
}
