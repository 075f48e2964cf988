//! Request handling: route a request, hand it to the handler for its
//! endpoint family, and write one access-log line when its response body is
//! done.

mod health;
mod manifest;
mod passthrough;
mod pull;
mod referrers;
mod serve;
mod upload;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::access::{AccessCache, Kind};
use crate::body::{self, Body, Counted, OnDone};
use crate::cache::ContentCache;
use crate::config::Config;
use crate::credentials::CredentialKeys;
use crate::error::Error;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::referrers::Referrers;
use crate::route::Route;
use crate::upstream::{ClientSide, Upstream};

/// Everything a request handler needs, shared by all connections.
pub struct Proxy {
    pub(crate) config: Arc<Config>,
    pub(crate) upstream: Upstream,
    pub(crate) referrers: Arc<Referrers>,
    /// `None` when `cache.enabled = false`: everything passes through.
    pub(crate) cache: Option<Arc<ContentCache>>,
    pub(crate) access: AccessCache,
    pub(crate) metrics: Arc<Metrics>,
}

/// What a handler reports besides its response, for the access log.
#[derive(Default)]
pub(crate) struct Outcome {
    /// Time until the upstream's response head, when the upstream was asked.
    pub upstream: Option<Duration>,
}

impl Proxy {
    /// Opens the index under the data directory and connects the upstream.
    pub fn new(config: Config) -> Result<Proxy, Error> {
        let upstream = Upstream::new(&config.upstream)?;
        let keys = CredentialKeys::load_or_create(&config.storage.data_dir).map_err(|e| {
            Error::Internal(format!("credentials secret in the data directory: {e}"))
        })?;
        let index = Index::open(&config.storage.data_dir.join("index"))?;
        let referrers = Referrers::new(
            index.clone(),
            upstream.clone(),
            config.referrers.clone(),
            own_credentials(&config.upstream),
            keys.clone(),
        );
        let metrics = Arc::new(Metrics::default());
        let cache = if config.cache.enabled {
            Some(ContentCache::open(
                &config.storage.data_dir,
                index.clone(),
                metrics.clone(),
                config.cache.clone(),
                config.clock.clone(),
            )?)
        } else {
            None
        };
        Ok(Proxy {
            access: AccessCache::new(
                upstream.clone(),
                index,
                metrics.clone(),
                keys,
                config.cache.auth_ttl,
                config.cache.max_stale,
            ),
            config: Arc::new(config),
            upstream,
            referrers,
            cache,
            metrics,
        })
    }

    fn render_metrics(&self) -> Response<Body> {
        let mut resp = Response::new(body::full(self.metrics.render()));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        resp
    }

    pub fn cache(&self) -> Option<&Arc<ContentCache>> {
        self.cache.as_ref()
    }

    pub fn referrers(&self) -> &Arc<Referrers> {
        &self.referrers
    }

    /// Handles one request; never fails: errors become OCI error responses.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let client = ClientSide { peer, scheme, host };

        let bytes_in = Arc::new(AtomicU64::new(0));
        let req = req.map(|b| body::boxed(Counted::new(b, bytes_in.clone())));
        let route = Route::parse(&method, &path);
        let kind = route.as_ref().map(Route::kind).unwrap_or("invalid");
        let mut outcome = Outcome::default();
        let resp = match route {
            Ok(route) => self
                .dispatch(route, req, &client, &mut outcome)
                .await
                .unwrap_or_else(Error::into_response),
            Err(e) => e.into_response(),
        };

        let status = resp.status().as_u16();
        self.metrics.request(kind, status);
        let upstream = outcome.upstream;
        resp.map(move |b| {
            OnDone::new(b, move |bytes_out, complete| {
                let total = started.elapsed();
                let bytes_in = bytes_in.load(Ordering::Relaxed);
                tracing::info!(
                    target: "graft::access",
                    method = %method,
                    path = %path,
                    route = kind,
                    status,
                    bytes_in,
                    bytes_out,
                    complete,
                    total_ms = millis(total),
                    upstream_ms = upstream.map(millis),
                    "request"
                );
            })
            .boxed_unsync()
        })
    }

    async fn dispatch(
        &self,
        route: Route,
        req: Request<Body>,
        client: &ClientSide,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, Error> {
        match route {
            Route::Health => Ok(health::healthz()),
            Route::Ready => Ok(health::readyz(self).await),
            Route::NotFound => Err(Error::NotFound),
            Route::Metrics => Ok(self.render_metrics()),
            Route::Blob { name, digest } => match req.method().clone() {
                Method::GET | Method::HEAD => {
                    pull::by_digest(self, Kind::Blob, name, digest, req, client, outcome).await
                }
                Method::DELETE => {
                    let resp = passthrough::forward(self, req, client, outcome).await?;
                    if resp.status().is_success() {
                        // The cached bytes may stay (other repositories can
                        // hold them); this repository no longer does.
                        let _ = self.referrers.index().forget_present(&name, &digest);
                    }
                    Ok(resp)
                }
                _ => passthrough::forward(self, req, client, outcome).await,
            },
            Route::Manifest { name, reference } => {
                manifest::handle(self, name, reference, req, client, outcome).await
            }
            Route::Referrers { name, digest } => {
                referrers::handle(self, name, digest, req, client, outcome).await
            }
            Route::UploadStart { name } => upload::start(self, name, req, client, outcome).await,
            Route::Upload { name, id } => {
                upload::continue_upload(self, name, id, req, client, outcome).await
            }
            Route::Base | Route::Catalog | Route::TagsList { .. } | Route::OtherV2 => {
                passthrough::forward(self, req, client, outcome).await
            }
        }
    }
}

/// A body-less copy of a request's head (method, URI, headers), for the
/// requests graft derives from a client's: probes, HEADs, fetches by digest.
pub(crate) fn head_only<B>(req: &Request<B>) -> Request<Body> {
    let mut r = Request::new(body::empty());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.headers_mut() = req.headers().clone();
    r
}

/// graft's own `Authorization` for background work, from
/// `upstream.username`/`upstream.password`.
pub fn own_credentials(cfg: &crate::config::UpstreamConfig) -> Option<http::HeaderValue> {
    use base64::Engine as _;
    let user = cfg.username.as_deref()?;
    let pass = cfg.password.as_deref().unwrap_or("");
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let mut v = http::HeaderValue::from_str(&format!("Basic {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Milliseconds with microsecond precision, for log fields.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}
