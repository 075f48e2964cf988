//! A thin HTTP layer in front of a real registry that gives it a referrers
//! API the way a registry gains one by upgrade: when switched on, it
//! answers `GET /v2/<name>/referrers/<digest>` itself, listing only the
//! manifests with that `subject` pushed *through the layer while it was
//! on* (the implementation proposed for distribution records a referrer
//! link when a manifest is pushed). Everything else passes through to the
//! registry unchanged. It can also answer 503 to everything (the upstream
//! is down) while the registry keeps its content. Runs on its own runtime
//! thread; `Drop` stops it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::sha256_digest;

/// Annotation the layer adds to the descriptors it lists when
/// [`NativeLayer::set_mark_descriptors`] is on, so a test can tell whose
/// descriptor a client got.
pub const MARK: &str = "org.example.listed-by";

#[derive(Default)]
struct State {
    native: AtomicBool,
    down: AtomicBool,
    mark: AtomicBool,
    /// (repository, subject) → referrer digest → descriptor.
    referrers: Mutex<BTreeMap<(String, String), BTreeMap<String, Value>>>,
    /// `METHOD path?query` of every request that reached the registry.
    log: Mutex<Vec<String>>,
}

pub struct NativeLayer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NativeLayer {
    /// A layer (off) in front of `upstream` (`http://127.0.0.1:port`).
    pub fn start(upstream: &str) -> NativeLayer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind layer");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("layer addr");
        let state = Arc::new(State::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let (s, upstream) = (state.clone(), upstream.trim_end_matches('/').to_owned());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("layer runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let client = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .expect("layer client");
                let serve = async {
                    loop {
                        let Ok((conn, _)) = listener.accept().await else {
                            continue;
                        };
                        let (s, client, upstream) = (s.clone(), client.clone(), upstream.clone());
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                handle(s.clone(), client.clone(), upstream.clone(), req)
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(conn), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = serve => {}
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        NativeLayer {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`, for `config.upstream.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the referrers API on or off (the upgrade).
    pub fn set_native(&self, on: bool) {
        self.state.native.store(on, Ordering::SeqCst);
    }

    /// Answers every request 503 (the upstream is down) while on.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Adds the [`MARK`] annotation to the descriptors the layer lists.
    pub fn set_mark_descriptors(&self, on: bool) {
        self.state.mark.store(on, Ordering::SeqCst);
    }

    /// Digests the layer's own referrers API lists for `subject`.
    pub fn native_digests(&self, repo: &str, subject: &str) -> Vec<String> {
        let map = self.state.referrers.lock().expect("referrers");
        map.get(&(repo.to_owned(), subject.to_owned()))
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Requests passed to the registry (`METHOD path?query`), oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.state.log.lock().expect("log").clone()
    }
}

impl Drop for NativeLayer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, content_type: &str, body: Vec<u8>) -> Answer {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("answer")
}

async fn handle(
    state: Arc<State>,
    client: reqwest::Client,
    upstream: String,
    req: Request<Incoming>,
) -> Result<Answer, Infallible> {
    if state.down.load(Ordering::SeqCst) {
        let body = br#"{"errors":[{"code":"UNAVAILABLE","message":"layer down"}]}"#.to_vec();
        return Ok(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            body,
        ));
    }
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches("/v2/").split('/').collect();
    let n = segments.len();
    let native = state.native.load(Ordering::SeqCst);
    if native && req.method() == hyper::Method::GET && n >= 3 && segments[n - 2] == "referrers" {
        // The registry decides who may read: its answer to the same
        // credentials on `/v2/` stands for the referrers endpoint's.
        let mut check = client.get(format!("{upstream}/v2/"));
        if let Some(a) = req.headers().get("authorization") {
            check = check.header("authorization", a);
        }
        if let Ok(r) = check.send().await {
            if r.status() == StatusCode::UNAUTHORIZED {
                let mut out = Response::builder().status(StatusCode::UNAUTHORIZED);
                if let Some(c) = r.headers().get("www-authenticate") {
                    out = out.header("www-authenticate", c);
                }
                let body = r.bytes().await.unwrap_or_default();
                return Ok(out.body(Full::new(body)).expect("401"));
            }
        }
        let repo = segments[..n - 2].join("/");
        let list: Vec<Value> = {
            let map = state.referrers.lock().expect("referrers");
            map.get(&(repo, segments[n - 1].to_owned()))
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default()
        };
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": list,
        });
        let body = serde_json::to_vec(&index).expect("index");
        return Ok(answer(
            StatusCode::OK,
            "application/vnd.oci.image.index.v1+json",
            body,
        ));
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| path.clone());
    state
        .log
        .lock()
        .expect("log")
        .push(format!("{} {target}", parts.method));
    let mut up = client.request(parts.method.clone(), format!("{upstream}{target}"));
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str()) {
            up = up.header(name, value);
        }
    }
    let resp = match up.body(body.clone()).send().await {
        Ok(r) => r,
        Err(e) => {
            return Ok(answer(
                StatusCode::BAD_GATEWAY,
                "text/plain",
                e.to_string().into_bytes(),
            ))
        }
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let resp_body = resp.bytes().await.unwrap_or_default();
    let is_manifest = n >= 3 && segments[n - 2] == "manifests";
    let mut oci_subject = None;
    if is_manifest && status.is_success() {
        let repo = segments[..n - 2].join("/");
        if parts.method == hyper::Method::PUT && native {
            oci_subject = record_referrer(&state, &repo, &body);
        }
        if parts.method == hyper::Method::DELETE {
            let gone = segments[n - 1];
            for m in state.referrers.lock().expect("referrers").values_mut() {
                m.remove(gone);
            }
        }
    }
    let mut out = Response::builder().status(status);
    for (name, value) in &headers {
        if !is_hop_by_hop(name.as_str()) && name != "content-length" {
            out = out.header(name, value);
        }
    }
    // A registry with the API says so on the push of a referrer.
    if let Some(subject) = oci_subject {
        out = out.header("oci-subject", subject);
    }
    if parts.method == hyper::Method::HEAD {
        if let Some(len) = headers.get("content-length") {
            out = out.header("content-length", len);
        }
    }
    Ok(out.body(Full::new(resp_body)).expect("relayed answer"))
}

/// Records a pushed manifest with a `subject` as its subject's referrer;
/// returns the subject.
fn record_referrer(state: &State, repo: &str, manifest: &[u8]) -> Option<String> {
    let m = serde_json::from_slice::<Value>(manifest).ok()?;
    let subject = m["subject"]["digest"].as_str()?.to_owned();
    let digest = sha256_digest(manifest);
    let mut d = json!({
        "mediaType": m["mediaType"],
        "digest": digest,
        "size": manifest.len(),
    });
    let artifact_type = m["artifactType"]
        .as_str()
        .or_else(|| m["config"]["mediaType"].as_str());
    if let Some(t) = artifact_type {
        d["artifactType"] = json!(t);
    }
    if m.get("annotations").is_some() {
        d["annotations"] = m["annotations"].clone();
    }
    if state.mark.load(Ordering::SeqCst) {
        if !d["annotations"].is_object() {
            d["annotations"] = json!({});
        }
        d["annotations"][MARK] = json!("native-layer");
    }
    state
        .referrers
        .lock()
        .expect("referrers")
        .entry((repo.to_owned(), subject.clone()))
        .or_default()
        .insert(digest, d);
    Some(subject)
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "transfer-encoding" | "te" | "trailer" | "upgrade"
    )
}
