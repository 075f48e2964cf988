//! Request handling: route a request and hand it to the handler for its
//! endpoint family. What every request gets regardless of its route (ids,
//! the access log, caps, panic catching, timeouts) is the server's layer
//! stack around [`Proxy::handle`], in `server/stack.rs`.

mod health;
mod manifest;
mod passthrough;
mod pull;
mod referrers;
pub(crate) mod serve;
mod upload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Response};

use crate::access::{AccessCache, Kind};
use crate::body::{self, Body};
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
    pub(crate) access: Arc<AccessCache>,
    pub(crate) metrics: Arc<Metrics>,
}

/// What the access log learns from a handled request, carried to the
/// server's log layer on the response's extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Handled {
    /// The endpoint family ([`Route::kind`]).
    pub(crate) route: &'static str,
    /// Time until the upstream's response head, when the upstream was asked.
    pub(crate) upstream: Option<Duration>,
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
            Error::Startup(format!(
                "{}: cannot read or create the credentials secret: {e}",
                config.storage.data_dir.display()
            ))
        })?;
        let index = Index::open_with(
            &config.storage.data_dir.join("index"),
            config.clock.clone(),
            config.index.cache_bytes,
        )?;
        let referrers = Referrers::new(
            index.clone(),
            upstream.clone(),
            config.referrers.clone(),
            config.upstream.own_authorization(),
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
        let access = Arc::new(AccessCache::new(
            upstream.clone(),
            index.clone(),
            metrics.clone(),
            keys,
            &config.cache,
            config.clock.clone(),
        ));
        register_owned_metrics(&metrics, &index, &access);
        let r = Arc::downgrade(&referrers);
        metrics.register_gauge_fn(
            "graft_referrers_recent_checks",
            "Fallback-tag checks remembered in memory (referrers.tag_ttl).",
            move || r.upgrade().map_or(0, |r| r.recent_checks()),
        );
        if let Some(cache) = &cache {
            register_cache_metrics(&metrics, cache);
        }
        Ok(Proxy {
            access,
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
            http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        );
        resp
    }

    pub fn cache(&self) -> Option<&Arc<ContentCache>> {
        self.cache.as_ref()
    }

    pub fn referrers(&self) -> &Arc<Referrers> {
        &self.referrers
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Handles one request; never fails: errors become OCI error responses.
    /// The response carries a `Handled` extension for the access log,
    /// which the server's layers write when the body is done.
    pub async fn handle(
        &self,
        req: Request<Body>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> Response<Body> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let client = ClientSide::new(peer, scheme, host);
        let route = Route::parse(req.uri().path());
        let kind = route.as_ref().map(Route::kind).unwrap_or("invalid");
        let mut outcome = Outcome::default();
        let mut resp = match route {
            Ok(route) => self
                .dispatch(route, req, &client, &mut outcome)
                .await
                .unwrap_or_else(Error::into_response),
            Err(e) => e.into_response(),
        };
        resp.extensions_mut().insert(Handled {
            route: kind,
            upstream: outcome.upstream,
        });
        resp
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
            Route::NotFound => {
                // A test-only stand-in for a handler bug (see tests/server_panic.rs).
                crate::failpoint::panic_if("panic-on-not-found");
                Err(Error::NotFound)
            }
            Route::Metrics => Ok(self.render_metrics()),
            Route::Blob { name, digest } => match req.method().clone() {
                Method::GET | Method::HEAD => {
                    pull::by_digest(self, Kind::Blob, name, digest, req, client, outcome).await
                }
                Method::DELETE => {
                    let resp = passthrough::forward(self, req, client, outcome).await?;
                    if let Some(cache) = self.cache.as_ref().filter(|_| resp.status().is_success())
                    {
                        cache.forget_present(&name, &digest).await;
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

/// Metrics whose values other components own, read at scrape time.
fn register_owned_metrics(metrics: &Metrics, index: &Index, access: &Arc<AccessCache>) {
    let i = index.clone();
    metrics.register_counter_fn(
        "graft_index_write_failures",
        "Best-effort index writes that failed (logged with their context).",
        move || i.write_failures(),
    );
    let i = index.clone();
    metrics.register_counter_fn(
        "graft_index_pruned",
        "Index entries pruned by age or count.",
        move || i.pruned(),
    );
    // Weak: the access cache and the content cache hold the metrics, so a
    // strong reference back would keep both (and the index) alive forever.
    let a = Arc::downgrade(access);
    metrics.register_gauge_fn(
        "graft_auth_remembered_entries",
        "(credentials, repository) authorizations remembered in memory.",
        move || a.upgrade().map_or(0, |a| a.remembered()),
    );
}

/// The cache's own counts, read at scrape time.
fn register_cache_metrics(metrics: &Metrics, cache: &Arc<ContentCache>) {
    // Weak, as in `register_owned_metrics`: the cache holds the metrics.
    let c = Arc::downgrade(cache);
    metrics.register_gauge_fn(
        "graft_cache_upload_sessions",
        "Blob uploads being teed into the cache now.",
        move || c.upgrade().map_or(0, |c| c.upload_sessions()),
    );
    let c = Arc::downgrade(cache);
    metrics.register_counter_fn(
        "graft_cache_upload_sessions_dropped",
        "Upload tees dropped at cache.max_upload_sessions or cache.upload_session_ttl.",
        move || c.upgrade().map_or(0, |c| c.upload_sessions_dropped()),
    );
}
