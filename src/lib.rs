//! graft: a caching reverse proxy that gives OCI Distribution 1.0
//! registries the OCI 1.1 referrers API.
//!
//! # Layout
//!
//! - [`admin`]: the operator commands beside the proxy — `graft reindex`,
//!   `graft referrers`, `graft cache stats|gc|verify|warm`.
//! - [`cli`]: the command line (`graft serve`, …); the binary only parses it
//!   and calls in here.
//! - [`config`]: defaults, `graft.toml`, `GRAFT_*` variables and flags, with
//!   every bad key reported.
//! - [`server`]: the accept loop (TCP or TLS, HTTP/1.1 and HTTP/2) under a
//!   connection cap, the tower layer stack every request goes through, and
//!   graceful shutdown.
//! - [`route`]: which endpoint of the distribution spec a request is for.
//! - [`proxy`]: one handler per endpoint family; pass-through for the rest.
//! - [`referrers`]: the referrers service — listing, learning from fallback
//!   tags, keeping them true, crash recovery.
//! - [`index`]: the only code that opens sled.
//! - [`cache`]: the content-addressed store, coalesced fills, eviction; the
//!   only code that writes cache files.
//! - [`access`]: who may read cached content (the upstream decides).
//! - [`jwt`]: registry tokens — their `exp`, and offline validation against
//!   the registry's token-signing certificate.
//! - [`credentials`]: the HMAC key under which a client's credentials are
//!   remembered (never the credentials).
//! - [`clock`]: wall-clock time for everything that expires; skewable in
//!   tests.
//! - [`request_id`]: the id of the request being handled, for errors and
//!   logs.
//! - [`metrics`]: Prometheus text at `/metrics`.
//! - [`status`]: what the status page (`/`, `/-/status.json`) shows, read
//!   back from the metrics, and the last probe and errors it keeps.
//! - [`mirror`]: several upstreams (`[[upstream]]`), one isolated instance
//!   each, and the router that picks one per request.
//! - [`failpoint`]: crash points for the kill tests (feature `failpoints`).
//! - [`upstream`]: the pooled client to the registry, header hygiene and URL
//!   rewriting.
//! - [`token`]: Bearer tokens for requests made with graft's own
//!   credentials (the Docker token protocol).
//! - [`oci`]: the spec's nouns (`Digest`, `RepoName`, `Reference`, error codes).
//! - [`error`]: the one place errors become OCI error responses.
//! - [`body`]: the one body type, and byte counting for the access log.

pub(crate) mod access;
pub mod admin;
pub(crate) mod body;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub(crate) mod credentials;
pub(crate) mod error;
pub(crate) mod failpoint;
pub mod index;
pub(crate) mod jwt;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub(crate) mod proxy;
pub(crate) mod referrers;
pub(crate) mod request_id;
pub(crate) mod route;
pub(crate) mod server;
pub(crate) mod status;
pub(crate) mod token;
pub(crate) mod upstream;

#[cfg(test)]
mod fuzz_tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use config::Config;
pub use error::Error;

/// Serves `config` on `listener` until `shutdown` resolves, then drains
/// in-flight requests for up to `server.shutdown_grace`, stops the
/// background tasks, writes the cache's batched access times and returns.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let server_cfg = config.server.clone();
    let proxy = Arc::new(proxy::Proxy::new(config)?);
    // Background loops watch this and return once it turns true.
    let (stop, stopped) = watch::channel(false);
    let mut background = tokio::task::JoinSet::new();
    // Each upstream's instance (one unless mirroring) has its own loops.
    for instance in proxy.instances() {
        background.spawn(recover_in_background(
            instance.referrers().clone(),
            stopped.clone(),
        ));
        if let Some(cache) = instance.cache() {
            background.spawn(cache::upkeep(cache.clone(), stopped.clone()));
        }
        background.spawn(index::prune_periodically(
            instance.referrers().index().clone(),
            index::PruneBounds::from_config(&instance.config),
            instance.config.clock.clone(),
            stopped.clone(),
        ));
    }
    drop(stopped);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, upstream = proxy.upstream.origin(), "graft listening");
    }
    let served = server::serve(listener, &server_cfg, proxy.clone(), shutdown).await;

    let _ = stop.send(true);
    while let Some(ended) = background.join_next().await {
        if let Err(e) = ended {
            tracing::error!(error = %e, "a background task failed");
        }
    }
    for cache in proxy.instances().iter().filter_map(|p| p.cache().cloned()) {
        // The last few seconds of access times would otherwise be lost,
        // and eviction would take those files for unused.
        let flushed = tokio::task::spawn_blocking(move || cache.flush_touches()).await;
        if let Err(e) = flushed {
            tracing::error!(error = %e, "flushing cache access times failed");
        }
    }
    served
}

/// Finishes referrer pushes and fallback-tag writes that a crash or an
/// upstream outage left owed: at startup, then periodically until
/// `shutdown` (a tag write that failed mid-run is retried too), backing off
/// while work stays owed. A pass cut by shutdown is safe to cut: owed work
/// is recorded before it starts, exactly as for a crash.
async fn recover_in_background(
    referrers: Arc<referrers::Referrers>,
    mut shutdown: watch::Receiver<bool>,
) {
    const IDLE: Duration = Duration::from_secs(30);
    const MAX: Duration = Duration::from_secs(60);
    let mut delay = Duration::from_secs(1);
    loop {
        let passed = tokio::select! {
            passed = referrers.recover() => passed,
            _ = shutdown.wait_for(|&stop| stop) => return,
        };
        match passed {
            Ok(0) => delay = IDLE,
            Ok(n) => {
                tracing::warn!(owed = n, "referrer work still owed; retrying");
                delay = (delay * 2).min(MAX);
            }
            Err(e) => {
                tracing::error!(error = %e, "recovery failed; retrying");
                delay = (delay * 2).min(MAX);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|&stop| stop) => return,
        }
    }
}
