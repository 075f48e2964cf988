//! The referrers API under a sick upstream: when the fallback tag cannot be
//! read right now (500, 429), a client whose access graft already knows is
//! answered from the index (and told so in `Graft-Referrers-Source`); any
//! other client gets the upstream's trouble — 429 with its `Retry-After`,
//! 502 for a 5xx — and never an index answer (that would widen access).
//!
//! The faults come from a scripted front between graft and the real
//! registry: it passes everything through, except that requests for
//! fallback tags get a canned status while a fault is set.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;

use common::artifacts::{artifact, digests_of, push_by_digest, push_subject, referrer_list};
use common::{assert_oci_error, header_str, Api, Graft, Registry};
use graft::clock::Clock;
use graft::config::ReferrersMode;

/// What the front answers fallback-tag requests with, when set: a status
/// and an optional `Retry-After`.
type TagFault = Arc<Mutex<Option<(u16, Option<&'static str>)>>>;

/// A pass-through HTTP front for the registry whose fallback-tag answers
/// can be replaced. Runs on its own runtime thread; `Drop` stops it.
struct Front {
    addr: SocketAddr,
    fault: TagFault,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type FrontBody = BoxBody<Bytes, hyper::Error>;

impl Front {
    fn start(registry: &Registry) -> Front {
        let upstream = registry.url();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind front");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("front addr");
        let fault: TagFault = Arc::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let f = fault.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("front runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                    .build_http::<Incoming>();
                let serve = async {
                    loop {
                        let Ok((conn, _)) = listener.accept().await else {
                            continue;
                        };
                        let (client, upstream, fault) =
                            (client.clone(), upstream.clone(), f.clone());
                        let service = hyper::service::service_fn(move |req| {
                            relay(req, client.clone(), upstream.clone(), fault.clone())
                        });
                        tokio::spawn(
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(conn), service),
                        );
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = serve => {}
                }
            });
        });
        Front {
            addr,
            fault,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fallback-tag requests answer `status` (with `Retry-After`) from now on.
    fn fail_tags(&self, status: u16, retry_after: Option<&'static str>) {
        *self.fault.lock().expect("fault lock") = Some((status, retry_after));
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn relay(
    mut req: Request<Incoming>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Incoming,
    >,
    upstream: String,
    fault: TagFault,
) -> Result<Response<FrontBody>, Infallible> {
    let is_tag = req.uri().path().contains("/manifests/sha256-");
    let canned = *fault.lock().expect("fault lock");
    if let (true, Some((status, retry_after))) = (is_tag, canned) {
        let mut resp = Response::new(
            Full::new(Bytes::from_static(b"{\"errors\":[]}"))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = StatusCode::from_u16(status).expect("status");
        if let Some(r) = retry_after {
            resp.headers_mut()
                .insert("retry-after", r.parse().expect("header value"));
        }
        return Ok(resp);
    }
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = format!("{upstream}{target}").parse().expect("upstream uri");
    Ok(match client.request(req).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(_) => {
            let mut resp = Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            resp
        }
    })
}

const MAX_STALE: Duration = Duration::from_secs(3600);

/// graft (mode `synthesize`, so no probe) in front of `front`, on `clock`.
fn graft_on(front: &Front, clock: &Clock) -> Graft {
    let clock = clock.clone();
    Graft::start_for_upstream(&front.url(), move |c| {
        c.referrers.mode = ReferrersMode::Synthesize;
        c.clock = clock;
        c.cache.max_stale = MAX_STALE;
    })
}

/// A subject with one referrer pushed through graft, and the subject
/// pulled through graft, so graft knows the (anonymous) client may read
/// `app`. Returns the subject's digest and the referrer's.
async fn known_client_with_a_referrer(api: &Api) -> (String, String) {
    let subject = push_subject(api, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let sig_digest = push_by_digest(api, "app", &sig).await;
    api.get_manifest("app", &subject.digest).await;
    (subject.digest, sig_digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_client_is_answered_from_the_index_while_the_tag_read_fails() {
    let registry = Registry::start();
    let front = Front::start(&registry);
    let clock = Clock::skewable();
    let graft = graft_on(&front, &clock);
    let api = Api::for_graft(&graft);
    let (subject, sig) = known_client_with_a_referrer(&api).await;
    let path = format!("/v2/app/referrers/{subject}");

    front.fail_tags(500, None);
    let resp = Api::send(api.get(&path)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header_str(resp.headers(), "graft-referrers-source").as_deref(),
        Some("index; upstream-unavailable")
    );
    assert_eq!(digests_of(&referrer_list(resp).await), vec![sig.clone()]);

    // A client graft knows nothing about gets the upstream's trouble.
    let stranger = Api::for_graft(&graft).with_basic_auth("mallory", "guess");
    assert_oci_error(
        Api::send(stranger.get(&path)).await,
        502,
        Some("UNAVAILABLE"),
    )
    .await;

    // Past cache.max_stale the remembered yes no longer stands.
    clock.advance(MAX_STALE);
    assert_oci_error(Api::send(api.get(&path)).await, 502, Some("UNAVAILABLE")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_reaches_an_unknown_client_with_its_retry_after() {
    let registry = Registry::start();
    let front = Front::start(&registry);
    let clock = Clock::skewable();
    let graft = graft_on(&front, &clock);
    let api = Api::for_graft(&graft);
    let (subject, sig) = known_client_with_a_referrer(&api).await;
    let path = format!("/v2/app/referrers/{subject}");

    front.fail_tags(429, Some("17"));
    let stranger = Api::for_graft(&graft).with_basic_auth("mallory", "guess");
    let resp = Api::send(stranger.get(&path)).await;
    assert_eq!(
        header_str(resp.headers(), "retry-after").as_deref(),
        Some("17")
    );
    assert!(header_str(resp.headers(), "graft-referrers-source").is_none());
    assert_oci_error(resp, 429, Some("TOOMANYREQUESTS")).await;

    // The client graft knows is answered from the index, as cached pulls
    // are on a 429.
    let resp = Api::send(api.get(&path)).await;
    assert_eq!(resp.status(), 200);
    assert!(header_str(resp.headers(), "graft-referrers-source").is_some());
    assert_eq!(digests_of(&referrer_list(resp).await), vec![sig]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_upstream_leaves_no_mark_on_the_answer() {
    let registry = Registry::start();
    let front = Front::start(&registry);
    let graft = graft_on(&front, &Clock::skewable());
    let api = Api::for_graft(&graft);
    let (subject, sig) = known_client_with_a_referrer(&api).await;
    let resp = Api::send(api.get(&format!("/v2/app/referrers/{subject}"))).await;
    assert_eq!(resp.status(), 200);
    assert!(header_str(resp.headers(), "graft-referrers-source").is_none());
    assert_eq!(digests_of(&referrer_list(resp).await), vec![sig]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_client_is_answered_from_the_index_while_the_upstream_is_unreachable() {
    let registry = Registry::start();
    let front = Front::start(&registry);
    let clock = Clock::skewable();
    let graft = graft_on(&front, &clock);
    let api = Api::for_graft(&graft);
    let (subject, sig) = known_client_with_a_referrer(&api).await;
    let path = format!("/v2/app/referrers/{subject}");

    drop(front); // connections to the upstream are refused from now on
    let resp = Api::send(api.get(&path)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header_str(resp.headers(), "graft-referrers-source").as_deref(),
        Some("index; upstream-unavailable")
    );
    assert_eq!(digests_of(&referrer_list(resp).await), vec![sig]);
    let stranger = Api::for_graft(&graft).with_basic_auth("mallory", "guess");
    assert_oci_error(
        Api::send(stranger.get(&path)).await,
        502,
        Some("UNAVAILABLE"),
    )
    .await;
}
