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
mod status;
mod tag_list;
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
use crate::oci::Reference;
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
    /// What the status page keeps beside the metrics (last probe, last
    /// errors, index counts).
    pub(crate) board: Arc<crate::status::Board>,
    /// With `[[upstream]]` entries: the other upstreams' instances and how
    /// requests are routed to them (this one is the default).
    pub(crate) mirror: Option<crate::mirror::Router>,
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
    /// Opens the index under the data directory and connects the upstream;
    /// with `[[upstream]]` entries, one instance each (`crate::mirror`).
    pub fn new(config: Config) -> Result<Proxy, Error> {
        if config.upstreams.is_empty() {
            Proxy::single(config)
        } else {
            crate::mirror::build(config)
        }
    }

    /// The instance for one upstream.
    pub(crate) fn single(config: Config) -> Result<Proxy, Error> {
        let upstream = Upstream::new(&config.upstream)?;
        let keys = CredentialKeys::load_or_create(&config.storage.data_dir).map_err(|e| {
            Error::Startup(format!(
                "{}: cannot read or create the credentials secret: {e}",
                config.storage.data_dir.display()
            ))
        })?;
        let (index, stand_in) = Index::open_or_stand_in(
            &config.storage.data_dir.join("index"),
            config.clock.clone(),
            config.index.cache_bytes,
        )?;
        if let Some(why) = &stand_in {
            tracing::error!(error = %why, "the data directory is full: running with the cache disabled and a temporary index in memory until graft restarts with room; referrers are learnt again from the fallback tags, and work owed at a crash is not kept");
        }
        let referrers = Referrers::new(
            index.clone(),
            upstream.clone(),
            config.referrers.clone(),
            config.upstream.own_authorization(),
            keys.clone(),
        );
        let metrics = Arc::new(Metrics::default());
        let cache = if config.cache.enabled && stand_in.is_none() {
            match ContentCache::open(
                &config.storage.data_dir,
                index.clone(),
                metrics.clone(),
                config.cache.clone(),
                config.clock.clone(),
            ) {
                Ok(cache) => Some(cache),
                Err(e) if e.is_no_space() => {
                    tracing::error!(error = %e, "the data directory is full: running with the cache disabled until graft restarts with room");
                    None
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let tokens = crate::jwt::TokenVerifier::from_config(&config.upstream)
            .map_err(|e| Error::Startup(format!("`upstream.token_certificate`: {e}")))?;
        let access = Arc::new(AccessCache::new(
            upstream.clone(),
            index.clone(),
            metrics.clone(),
            keys,
            &config.cache,
            config.clock.clone(),
            tokens,
        ));
        register_owned_metrics(&metrics, &index, &access);
        let r = Arc::downgrade(&referrers);
        metrics.register_gauge_fn(
            "graft_referrers_recent_checks",
            "Fallback-tag checks remembered in memory (referrers.tag_ttl).",
            move || r.upgrade().map_or(0, |r| r.recent_checks()),
        );
        register_tag_size_metrics(&metrics, &referrers);
        let r = Arc::downgrade(&referrers);
        metrics.register_counter_fn(
            "graft_tag_writes_unauthorized",
            "Fallback-tag writes refused to the client's credentials (or graft's own) for lack of \
             rights; with no upstream.username configured they stay owed.",
            move || r.upgrade().map_or(0, |r| r.tag_writes_unauthorized()),
        );
        if let Some(cache) = &cache {
            register_cache_metrics(&metrics, cache);
            let budget = config.cache.max_bytes;
            metrics.register_gauge_fn(
                "graft_cache_max_bytes",
                "The cache's byte budget (cache.max_bytes).",
                move || budget,
            );
        }
        let board = Arc::new(crate::status::Board::default());
        board.register_metrics(&metrics);
        Ok(Proxy {
            board,
            access,
            config: Arc::new(config),
            upstream,
            referrers,
            cache,
            metrics,
            mirror: None,
        })
    }

    /// This instance and, in mirror mode, every other upstream's.
    pub(crate) fn instances(&self) -> Vec<&Proxy> {
        let others = self.mirror.iter().flat_map(|m| m.others());
        std::iter::once(self).chain(others.map(|p| &**p)).collect()
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

    pub(crate) fn board(&self) -> &Arc<crate::status::Board> {
        &self.board
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
        match &self.mirror {
            Some(router) => router.handle(self, req, peer, scheme).await,
            None => self.handle_here(req, peer, scheme).await,
        }
    }

    /// Handles a request for this instance's own upstream.
    pub(crate) async fn handle_here(
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
        let public_url = self.config.server.public_url.as_deref();
        let client = ClientSide::new(peer, scheme, host, public_url);
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
        if answers_with_location(&route, req.method()) && !client.has_origin() {
            // Refused before forwarding: the upstream must not store what
            // the client is then told failed.
            return Err(crate::upstream::host_required());
        }
        match route {
            Route::Health => Ok(health::healthz()),
            Route::Ready => Ok(health::readyz(self).await),
            Route::NotFound => {
                // A test-only stand-in for a handler bug (see tests/server_panic.rs).
                crate::failpoint::panic_if("panic-on-not-found");
                Err(Error::NotFound)
            }
            Route::Metrics => {
                // The index counts are gauges too; a scrape sees fresh ones.
                self.board.recount(self.referrers.index()).await;
                Ok(self.render_metrics())
            }
            Route::Status => Ok(status::page(self, req.method().clone()).await),
            Route::StatusJson => Ok(status::json(self, req.method().clone()).await),
            Route::Blob { name, digest } => match req.method().clone() {
                Method::GET | Method::HEAD => {
                    let (n, d) = (name.clone(), digest.clone());
                    let resp =
                        pull::by_digest(self, Kind::Blob, n, d, req, client, outcome).await?;
                    manifest::forget_if_gone(self, &name, &digest, resp.status()).await;
                    Ok(resp)
                }
                Method::DELETE => {
                    let forwarded = passthrough::forward(self, req, client, outcome).await;
                    // Whatever the upstream answers: asking again costs a HEAD.
                    if let Some(cache) = &self.cache {
                        cache.forget_present(&name, &digest).await;
                    }
                    forwarded
                }
                _ => passthrough::forward(self, req, client, outcome).await,
            },
            Route::Manifest { name, reference } => {
                manifest::handle(self, name, reference, req, client, outcome).await
            }
            // Only a push is graft's business (it may carry a `subject`);
            // the upstream judges the reference.
            Route::ManifestUnparsed { name, raw } if req.method() == Method::PUT => {
                manifest::handle(self, name, Reference::Tag(raw), req, client, outcome).await
            }
            Route::ManifestUnparsed { .. } => {
                passthrough::forward(self, req, client, outcome).await
            }
            Route::Referrers { name, digest } => {
                referrers::handle(self, name, digest, req, client, outcome).await
            }
            Route::UploadStart { name } => upload::start(self, name, req, client, outcome).await,
            Route::Upload { name, id } => {
                upload::continue_upload(self, name, id, req, client, outcome).await
            }
            Route::TagsList { name } => tag_list::handle(self, name, req, client, outcome).await,
            Route::Base | Route::Catalog | Route::OtherV2 => {
                passthrough::forward(self, req, client, outcome).await
            }
        }
    }
}

/// Writes whose success answer carries a `Location` on graft (manifest
/// pushes, blob uploads: distribution-spec "Pushing blobs", "Pushing
/// Manifests").
fn answers_with_location(route: &Route, method: &Method) -> bool {
    let writes = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
    writes
        && matches!(
            route,
            Route::Manifest { .. } | Route::UploadStart { .. } | Route::Upload { .. }
        )
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
    let a = Arc::downgrade(access);
    metrics.register_counter_fn(
        "graft_auth_offline_token_pulls",
        "Pulls served offline on a token validated against upstream.token_certificate.",
        move || a.upgrade().map_or(0, |a| a.offline_token_pulls()),
    );
    let a = Arc::downgrade(access);
    metrics.register_counter_fn(
        "graft_auth_offline_token_refusals",
        "Offline pulls refused: the token did not validate or grant pull.",
        move || a.upgrade().map_or(0, |a| a.offline_token_refusals()),
    );
}

/// What the fallback-tag size rule did, read at scrape time.
fn register_tag_size_metrics(metrics: &Metrics, referrers: &Arc<Referrers>) {
    let r = Arc::downgrade(referrers);
    metrics.register_counter_fn(
        "graft_referrers_tag_annotations_dropped",
        "Referrer descriptors written to a fallback tag without their annotations (referrers.max_tag_bytes).",
        move || r.upgrade().map_or(0, |r| r.tag_size().annotations_dropped()),
    );
    let r = Arc::downgrade(referrers);
    metrics.register_counter_fn(
        "graft_referrers_tag_too_large",
        "Fallback-tag writes not attempted: the bare descriptors exceed referrers.max_tag_bytes.",
        move || r.upgrade().map_or(0, |r| r.tag_size().too_large()),
    );
    let r = Arc::downgrade(referrers);
    metrics.register_counter_fn(
        "graft_referrers_tag_writes_refused",
        "Fallback-tag writes the registry refused with 400 or 413, not retried unchanged.",
        move || r.upgrade().map_or(0, |r| r.tag_size().refused()),
    );
    let r = Arc::downgrade(referrers);
    metrics.register_counter_fn(
        "graft_referrers_tag_writes_dropped",
        "Fallback-tag writes the registry refused even when recomputed from its current state; dropped, not retried.",
        move || r.upgrade().map_or(0, |r| r.tag_writes_dropped()),
    );
    let r = Arc::downgrade(referrers);
    metrics.register_counter_fn(
        "graft_referrers_tag_writes_replaced",
        "Fallback-tag writes another writer (a replica, an old client) replaced around graft's write; merged and written again.",
        move || r.upgrade().map_or(0, |r| r.tag_writes_replaced()),
    );
}

/// The cache's own counts, read at scrape time.
fn register_cache_metrics(metrics: &Metrics, cache: &Arc<ContentCache>) {
    // Weak, as in `register_owned_metrics`: the cache holds the metrics.
    let c = Arc::downgrade(cache);
    metrics.register_gauge_fn(
        "graft_cache_upload_sessions",
        "Blob upload sessions graft keeps state and a cache tee for now.",
        move || c.upgrade().map_or(0, |c| c.upload_sessions()),
    );
    let c = Arc::downgrade(cache);
    metrics.register_counter_fn(
        "graft_cache_upload_sessions_dropped",
        "Upload sessions forgotten (their uploads pass through uncached) at cache.max_upload_sessions, cache.max_upload_sessions_per_client, cache.upload_idle_timeout or cache.upload_session_ttl.",
        move || c.upgrade().map_or(0, |c| c.upload_sessions_dropped()),
    );
    let c = Arc::downgrade(cache);
    metrics.register_counter_fn(
        "graft_cache_corrupt",
        "Cache files found changed on disk (wrong size or bytes), dropped and fetched again.",
        move || c.upgrade().map_or(0, |c| c.corrupt_found()),
    );
    let c = Arc::downgrade(cache);
    metrics.register_counter_fn(
        "graft_cache_fills_skipped",
        "Misses streamed from the upstream uncached: no room on disk (cache.min_free).",
        move || c.upgrade().map_or(0, |c| c.fills_skipped()),
    );
    let c = Arc::downgrade(cache);
    metrics.register_gauge_fn(
        "graft_cache_reserved_bytes",
        "Bytes reserved by cache fills in flight (counted against cache.max_bytes).",
        move || c.upgrade().map_or(0, |c| c.reserved_bytes()),
    );
}
