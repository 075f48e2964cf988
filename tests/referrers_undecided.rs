//! When graft rewrites a fallback tag it merges what the tag already lists.
//! An entry whose manifest the upstream cannot serve right now (a 503, a
//! timeout) is neither a referrer nor a stranger yet: the rewritten tag
//! keeps it, so a transient upstream error never deletes a referrer another
//! client wrote.
//!
//! A small proxy between graft and the real registry fails the one request
//! the test names; a real distribution 2.8 registry stores everything.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::artifacts::{
    artifact, digests_of, push_by_digest, push_signed_subject, referrer_list, referrers,
    upstream_fallback_digests,
};
use common::{sha256_digest, Api, Graft, Registry};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// Forwards to `registry`, except that `GET <failing>` gets a 503.
struct FlakyUpstream {
    addr: SocketAddr,
    failing: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyUpstream {
    async fn start(registry: &Registry) -> FlakyUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind flaky upstream");
        let addr = listener.local_addr().expect("address");
        let failing = Arc::new(Mutex::new(None::<String>));
        let origin = registry.url();
        let client = common::api::http_client(None);
        let fail = failing.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (origin, client, fail) = (origin.clone(), client.clone(), fail.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        forward(req, origin.clone(), client.clone(), fail.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FlakyUpstream {
            addr,
            failing,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes `GET path` answer 503 (or, with `None`, nothing fail).
    fn fail(&self, path: Option<String>) {
        *self.failing.lock().expect("flaky lock") = path;
    }
}

impl Drop for FlakyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Headers that describe one connection (and the lengths the client
/// libraries set themselves).
const HOP_BY_HOP: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
];

async fn forward(
    req: Request<Incoming>,
    origin: String,
    client: reqwest::Client,
    fail: Arc<Mutex<Option<String>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let failing = fail.lock().expect("flaky lock").clone();
    if req.method() == hyper::Method::GET && failing.as_deref() == Some(path.as_str()) {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"try later")));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(resp);
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).expect("method");
    let mut upstream = client.request(method, format!("{origin}{path}")).body(body);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            upstream = upstream.header(name.as_str(), value.as_bytes());
        }
    }
    let answer = upstream.send().await.expect("registry answers");
    let mut resp = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            resp = resp.header(name.as_str(), value.as_bytes());
        }
    }
    let bytes = answer.bytes().await.expect("registry body");
    Ok(resp.body(Full::new(bytes)).expect("response"))
}

#[tokio::test]
async fn a_tag_rewrite_keeps_entries_the_upstream_could_not_judge() {
    let registry = Registry::start();
    let flaky = FlakyUpstream::start(&registry).await;
    let graft = Graft::start_for_upstream(&flaky.url(), |_| {});
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);

    // A tag-schema client wrote a referrer and the tag straight to the
    // registry.
    let (subject, old) = push_signed_subject(&upstream, "app").await;

    // While the upstream cannot serve that referrer's manifest, a new
    // referrer is pushed through graft, which rewrites the tag.
    flaky.fail(Some(format!("/v2/app/manifests/{}", sha256_digest(&old))));
    let new = artifact(&subject, Some("application/spdx+json"), None, None);
    push_by_digest(&api, "app", &new).await;
    let mut both = vec![sha256_digest(&old), sha256_digest(&new)];
    both.sort();
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        both,
        "the tag graft wrote lost the entry it could not check"
    );

    // Once the upstream answers again, graft checks it and lists both.
    flaky.fail(None);
    let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(digests_of(&list), both);
}
