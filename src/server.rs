//! The accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2, one task per
//! connection, and graceful shutdown.
//!
//! A panic in a handler is caught per request and answered with a 500 OCI
//! error, so a bug costs one request, not every request multiplexed on the
//! connection.

use std::future::Future;
use std::io::BufReader;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::body::Body;
use crate::config::ServerConfig;
use crate::error::{oci_error, Error};
use crate::oci::ErrorCode;
use crate::proxy::Proxy;

/// Accepts connections until `shutdown` resolves, then stops accepting and
/// waits up to `shutdown_grace` for in-flight requests (streaming bodies
/// included) to finish.
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
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
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let proxy = proxy.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let svc = service_fn(move |req: Request<Incoming>| {
                let proxy = proxy.clone();
                async move {
                    let handled = AssertUnwindSafe(proxy.handle(req, peer, scheme)).catch_unwind();
                    Ok::<_, std::convert::Infallible>(handled.await.unwrap_or_else(panic_response))
                }
            });
            let result = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => {
                        watcher
                            .watch(builder.serve_connection(TokioIo::new(s), svc).into_owned())
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    watcher
                        .watch(
                            builder
                                .serve_connection(TokioIo::new(stream), svc)
                                .into_owned(),
                        )
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!(grace = ?cfg.shutdown_grace, "shutting down: draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(cfg.shutdown_grace) => {
            tracing::warn!("shutdown grace elapsed; closing remaining connections")
        }
    }
    Ok(())
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    tracing::error!("handler panicked");
    oci_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Unknown,
        "internal error",
        serde_json::Value::Null,
    )
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
