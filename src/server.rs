//! The accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2, one task per
//! connection under a connection cap, and graceful shutdown.
//!
//! What each request goes through — ids, the access log, the request cap,
//! panic catching, body timeouts — is the layer stack in `server/stack.rs`,
//! built once and shared by every connection. Connection tasks are tracked in a
//! `JoinSet`, so [`serve`] returns only when every one has ended, or when
//! `server.shutdown_grace` ran out and the rest were cut.

mod stack;

use std::future::Future;
use std::io::BufReader;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::config::ServerConfig;
use crate::error::Error;
use crate::proxy::Proxy;

/// Counters of the server's own decisions, for `/metrics`.
#[derive(Debug, Default)]
pub struct ServerStats {
    shed: AtomicU64,
    panics: AtomicU64,
    connections: AtomicU64,
}

impl ServerStats {
    /// Exposes these counts on `/metrics`, read at scrape time.
    fn register(self: &Arc<Self>, metrics: &crate::metrics::Metrics) {
        let s = self.clone();
        metrics.register_counter_fn(
            "graft_requests_shed",
            "Requests answered 503 at server.max_concurrent_requests.",
            move || s.requests_shed(),
        );
        let s = self.clone();
        metrics.register_counter_fn(
            "graft_panics_caught",
            "Handler panics answered with a 500.",
            move || s.panics_caught(),
        );
        let s = self.clone();
        metrics.register_gauge_fn(
            "graft_open_connections",
            "Client connections open now.",
            move || s.open_connections(),
        );
    }

    /// Requests answered 503 because `server.max_concurrent_requests` were
    /// already in flight.
    pub fn requests_shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// Handler panics caught and answered with a 500.
    pub fn panics_caught(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// Accepts connections until `shutdown` resolves, then stops accepting and
/// waits up to `shutdown_grace` for in-flight requests (streaming bodies
/// included) to finish; returns once every connection task has ended.
pub async fn serve(
    listener: TcpListener,
    cfg: &ServerConfig,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        _ => None,
    };
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout);
    let stats = Arc::new(ServerStats::default());
    stats.register(proxy.metrics());
    let shared = Arc::new(Shared {
        tls,
        http,
        stats: stats.clone(),
        stack: stack::build(proxy, stats, cfg),
        handshake_timeout: cfg.header_read_timeout,
    });
    // One permit per open connection: at the cap the loop waits for a
    // permit before accepting, so new connections queue in the kernel's
    // backlog instead of becoming tasks.
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the slot semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Reap ended tasks so the set holds only live connections.
        while let Some(ended) = tasks.try_join_next() {
            report_task_end(ended);
        }
        let conn = shared.clone().serve(stream, peer, graceful.watcher(), slot);
        tasks.spawn(conn);
    }

    drop(listener);
    drain(graceful, tasks, cfg.shutdown_grace).await;
    Ok(())
}

/// Tells every connection to finish its in-flight requests and close, waits
/// for their tasks up to `grace`, then aborts what is left.
async fn drain(graceful: GracefulShutdown, mut tasks: JoinSet<()>, grace: Duration) {
    tracing::info!(
        ?grace,
        connections = tasks.len(),
        "shutting down: draining in-flight requests"
    );
    let all_ended = tokio::time::timeout(grace, async {
        graceful.shutdown().await;
        while let Some(ended) = tasks.join_next().await {
            report_task_end(ended);
        }
    })
    .await;
    match all_ended {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => {
            tracing::warn!(
                left = tasks.len(),
                "shutdown grace elapsed; closing remaining connections"
            );
            tasks.shutdown().await;
        }
    }
}

/// A connection task should never panic (handler panics are caught per
/// request); if one did, say so rather than lose it silently.
fn report_task_end(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        if e.is_panic() {
            tracing::error!(error = %e, "a connection task panicked");
        }
    }
}

/// What every connection task shares.
struct Shared {
    tls: Option<TlsAcceptor>,
    http: auto::Builder<TokioExecutor>,
    stats: Arc<ServerStats>,
    stack: stack::Stack,
    /// A TLS handshake gets as long as a request head: a client that never
    /// finishes one must not hold a connection slot forever.
    handshake_timeout: Duration,
}

impl Shared {
    /// Serves one connection until it closes; `_slot` frees its place under
    /// `server.max_connections` when this returns (or is aborted).
    async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        watcher: Watcher,
        _slot: OwnedSemaphorePermit,
    ) {
        let _open = OpenConnection::new(self.stats.clone());
        let _ = stream.set_nodelay(true);
        let conn_peer = stack::Peer {
            addr: peer,
            scheme: if self.tls.is_some() { "https" } else { "http" },
        };
        let stack = self.stack.clone();
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(conn_peer);
            stack.clone().oneshot(req)
        });
        let result = match &self.tls {
            Some(acceptor) => {
                match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let conn = self.http.serve_connection(TokioIo::new(s), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                }
            }
            None => {
                let conn = self.http.serve_connection(TokioIo::new(stream), svc);
                watcher.watch(conn.into_owned()).await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<ServerStats>);

impl OpenConnection {
    fn new(stats: Arc<ServerStats>) -> Self {
        stats.connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(stats)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, Error> {
    let bad = |what: &str, e: &dyn std::fmt::Display| Error::Internal(format!("{what}: {e}"));
    let certs = rustls_pemfile::certs(&mut BufReader::new(
        std::fs::File::open(cert).map_err(|e| bad("server.tls_cert", &e))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| bad("server.tls_cert", &e))?;
    let key = rustls_pemfile::private_key(&mut BufReader::new(
        std::fs::File::open(key).map_err(|e| bad("server.tls_key", &e))?,
    ))
    .map_err(|e| bad("server.tls_key", &e))?
    .ok_or_else(|| Error::Internal("server.tls_key: no private key found".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("server.tls_cert", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
