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
//! - [`server`]: the accept loop (TCP or TLS, HTTP/1.1 and HTTP/2) and
//!   graceful shutdown.
//! - [`route`]: which endpoint of the distribution spec a request is for.
//! - [`proxy`]: one handler per endpoint family; pass-through for the rest.
//! - [`referrers`]: the referrers service — listing, learning from fallback
//!   tags, keeping them true, crash recovery.
//! - [`index`]: the only code that opens sled.
//! - [`cache`]: the content-addressed store, coalesced fills, eviction; the
//!   only code that writes cache files.
//! - [`access`]: who may read cached content (the upstream decides).
//! - [`credentials`]: the HMAC key under which a client's credentials are
//!   remembered (never the credentials).
//! - [`clock`]: wall-clock time for everything that expires; skewable in
//!   tests.
//! - [`request_id`]: the id of the request being handled, for errors and
//!   logs.
//! - [`metrics`]: Prometheus text at `/metrics`.
//! - [`failpoint`]: crash points for the kill tests (feature `failpoints`).
//! - [`upstream`]: the pooled client to the registry, header hygiene and URL
//!   rewriting.
//! - [`oci`]: the spec's nouns (`Digest`, `RepoName`, `Reference`, error codes).
//! - [`error`]: the one place errors become OCI error responses.
//! - [`body`]: the one body type, and byte counting for the access log.

pub mod access;
pub mod admin;
pub mod body;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod error;
pub mod failpoint;
pub mod index;
pub mod metrics;
pub mod oci;
pub mod proxy;
pub mod referrers;
pub mod request_id;
pub mod route;
pub mod server;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;
pub use error::Error;

/// Serves `config` on `listener` until `shutdown` resolves, then drains
/// in-flight requests for up to `server.shutdown_grace` and returns.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let server_cfg = config.server.clone();
    let proxy = Arc::new(proxy::Proxy::new(config)?);
    tokio::spawn(recover_in_background(proxy.referrers().clone()));
    // Held until `serve` returns: dropping it stops the cache's upkeep.
    let (_stop_upkeep, upkeep_shutdown) = tokio::sync::watch::channel(false);
    if let Some(cache) = proxy.cache() {
        tokio::spawn(cache::upkeep(cache.clone(), upkeep_shutdown));
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, upstream = proxy.upstream.origin(), "graft listening");
    }
    server::serve(listener, &server_cfg, proxy, shutdown).await
}

/// Finishes referrer pushes and fallback-tag writes that a crash or an
/// upstream outage left owed: at startup, then periodically for the life of
/// the process (a tag write that failed mid-run is retried too), backing off
/// while work stays owed.
async fn recover_in_background(referrers: Arc<referrers::Referrers>) {
    use std::time::Duration;
    const IDLE: Duration = Duration::from_secs(30);
    let mut delay = Duration::from_secs(1);
    loop {
        match referrers.recover().await {
            Ok(0) => delay = IDLE,
            Ok(n) => {
                tracing::warn!(owed = n, "referrer work still owed; retrying");
                delay = (delay * 2).min(Duration::from_secs(60));
            }
            Err(e) => {
                tracing::error!(error = %e, "recovery failed; retrying");
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
        tokio::time::sleep(delay).await;
    }
}
