//! What the server's layer stack does for every request: request ids, the
//! connection and request caps, and the request body timeout.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{assert_oci_error, closed_port_url, header_str, Api, FakeUpstream};
use common::{Graft, Registry};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Long enough that only a bug, never a slow machine, makes a read wait it
/// out; the tests never wait for it to pass.
const PATIENCE: Duration = Duration::from_secs(30);

/// Reads one HTTP/1.1 response with a `Content-Length` body; `None` when
/// the connection closed before a whole response arrived.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status = head.split(' ').nth(1)?.parse().ok()?;
            let len: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some((status, buf[end + 4..end + 4 + len].to_vec()));
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn healthz_on(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect to graft");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: graft\r\n\r\n")
        .await
        .expect("send request");
    stream
}

#[tokio::test]
async fn request_ids_are_taken_from_sane_clients_made_otherwise_and_returned() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let id_of = |r: &reqwest::Response| header_str(r.headers(), "x-request-id");

    let resp = Api::send(api.get("/v2/").header("x-request-id", "ci-job-42.step:3")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(id_of(&resp).as_deref(), Some("ci-job-42.step:3"));

    for insane in ["two words", "x\"y", &"a".repeat(200)] {
        let resp = Api::send(api.get("/v2/").header("x-request-id", insane)).await;
        let id = id_of(&resp).expect("an id is returned");
        assert!(
            !id.is_empty() && id != insane,
            "`{insane}` was taken as `{id}`"
        );
    }

    let first = id_of(&Api::send(api.get("/v2/")).await).expect("an id is made");
    let second = id_of(&Api::send(api.get("/healthz")).await).expect("an id is made");
    assert!(!first.is_empty());
    assert_ne!(first, second, "each request gets its own id");
}

#[tokio::test]
async fn an_upstream_failure_names_the_request_id_in_its_detail() {
    let graft = Graft::start_for_upstream(&closed_port_url(), |_| {});
    let api = Api::for_graft(&graft);
    let resp = Api::send(
        api.get("/v2/app/tags/list")
            .header("x-request-id", "trace-me"),
    )
    .await;
    assert_eq!(id(&resp), "trace-me");
    let body = assert_oci_error(resp, 502, Some("UNAVAILABLE")).await;
    assert_eq!(
        body["errors"][0]["detail"]["request_id"], "trace-me",
        "{body}"
    );
}

fn id(resp: &reqwest::Response) -> String {
    header_str(resp.headers(), "x-request-id").unwrap_or_default()
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_wait_until_one_closes() {
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |config| {
        config.server.max_connections = 2;
        config.server.header_read_timeout = Duration::from_secs(300);
    });
    // Two keep-alive connections, each served once and then held open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = healthz_on(graft.addr()).await;
        let answered = tokio::time::timeout(PATIENCE, read_response(&mut stream)).await;
        assert!(matches!(answered, Ok(Some((200, _)))), "{answered:?}");
        held.push(stream);
    }

    // The kernel completes the third handshake (the backlog), but graft
    // does not take the connection: nothing comes back. Absence can only
    // be shown by waiting a while; a served connection answers in
    // milliseconds, so half a second tells.
    let mut third = healthz_on(graft.addr()).await;
    let early = tokio::time::timeout(Duration::from_millis(500), read_response(&mut third)).await;
    assert!(early.is_err(), "a third connection was served: {early:?}");

    drop(held.remove(0));
    let answered = tokio::time::timeout(PATIENCE, read_response(&mut third)).await;
    assert!(
        matches!(answered, Ok(Some((200, _)))),
        "the waiting connection is served once one closes: {answered:?}"
    );
}

#[tokio::test]
async fn past_the_request_cap_requests_get_503_at_once() {
    let upstream = FakeUpstream::hanging();
    let graft = Graft::start_for_upstream(&upstream.url(), |config| {
        config.server.max_concurrent_requests = 1;
        config.upstream.response_timeout = Duration::from_secs(300);
        config.server.shutdown_grace = Duration::from_secs(1);
    });
    let api = Api::for_graft(&graft);
    let stuck = tokio::spawn({
        let api = api.clone();
        async move {
            api.get("/v2/app/tags/list")
                .send()
                .await
                .map(|r| r.status())
        }
    });
    upstream
        .wait_for_request("/v2/app/tags/list", PATIENCE)
        .await;

    let resp = Api::send(api.get("/v2/").header("x-request-id", "shed-1")).await;
    let body = assert_oci_error(resp, 503, Some("UNAVAILABLE")).await;
    assert_eq!(
        body["errors"][0]["detail"]["request_id"], "shed-1",
        "{body}"
    );
    let health = Api::send(api.get("/healthz")).await;
    assert_eq!(health.status(), StatusCode::OK, "liveness is not capped");
    assert!(
        upstream.requests().len() == 1,
        "the shed request never reached the upstream"
    );
    stuck.abort();
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_is_cut_after_the_body_timeout() {
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |config| {
        config.server.body_timeout = Duration::from_secs(1);
    });
    let mut stream = TcpStream::connect(graft.addr()).await.expect("connect");
    let head = "PUT /v2/stall/app/manifests/v1 HTTP/1.1\r\nHost: graft\r\n\
                Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                Content-Length: 1000\r\n\r\n{\"schemaVersion\":";
    stream.write_all(head.as_bytes()).await.expect("send head");
    // …and nothing more: only the body timeout can end this request.
    let answered = tokio::time::timeout(PATIENCE, read_response(&mut stream))
        .await
        .expect("the stalled request was never cut");
    if let Some((status, body)) = answered {
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    }
    let tags = Api::send(Api::for_registry(&registry).get("/v2/stall/app/tags/list")).await;
    assert_eq!(tags.status(), StatusCode::NOT_FOUND, "nothing was pushed");
}

#[tokio::test]
async fn over_tls_a_client_that_never_shakes_hands_gives_its_connection_slot_back() {
    let registry = Registry::start();
    let certs = tempfile::tempdir().expect("cert dir");
    let issued =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, issued.cert.pem()).expect("write cert");
    std::fs::write(&key, issued.signing_key.serialize_pem()).expect("write key");
    let graft = Graft::start_with(&registry, |config| {
        config.server.tls_cert = Some(cert);
        config.server.tls_key = Some(key);
        config.server.max_connections = 1;
        config.server.header_read_timeout = Duration::from_secs(1);
    });

    // Takes the only slot and never sends a ClientHello.
    let _silent = TcpStream::connect(graft.addr()).await.expect("connect");
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_der(issued.cert.der()).expect("CA")])
        .timeout(PATIENCE)
        .build()
        .expect("TLS client");
    let resp = client
        .get(format!("https://{}/v2/", graft.addr()))
        .send()
        .await
        .expect("served over TLS once the silent handshake timed out");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_blob_upload_that_stalls_mid_body_is_cut_and_nothing_is_stored() {
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |config| {
        config.server.body_timeout = Duration::from_secs(1);
    });
    let api = Api::for_graft(&graft);
    let location = api.start_upload("stall/blob").await;
    let target = match location.strip_prefix(&graft.url()) {
        Some(path) => path.to_owned(),
        None => location.clone(),
    };
    let data = common::random_bytes(1 << 20);
    let digest = common::sha256_digest(&data);
    let sep = if target.contains('?') { '&' } else { '?' };
    let mut stream = TcpStream::connect(graft.addr()).await.expect("connect");
    let head = format!(
        "PUT {target}{sep}digest={digest} HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        graft.host(),
        data.len()
    );
    stream.write_all(head.as_bytes()).await.expect("send head");
    stream
        .write_all(&data[..64 << 10])
        .await
        .expect("send some");
    // …and nothing more: only the body timeout can end this request.
    let answered = tokio::time::timeout(PATIENCE, read_response(&mut stream))
        .await
        .expect("the stalled upload was never cut");
    if let Some((status, body)) = answered {
        assert!(
            status >= 400,
            "{status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let blob =
        Api::send(Api::for_registry(&registry).head(&format!("/v2/stall/blob/blobs/{digest}")))
            .await;
    assert_eq!(blob.status(), StatusCode::NOT_FOUND, "nothing was stored");
}
