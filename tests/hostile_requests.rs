//! Requests no well-behaved client sends, over raw TCP so that nothing
//! tidies them up on the way: no `Host` (HTTP/1.0, or HTTP/1.1 without
//! one), a malformed `Host`, a broken chunked body. Each gets a clear
//! answer that neither sends the client to the upstream's own address nor
//! reflects what it sent, nor blames the upstream for the client's bytes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Api, Graft, Registry};

/// A response as it came off the wire.
struct RawResponse {
    status: u16,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: String,
    /// The whole response, head and body, for "is X anywhere in it".
    text: String,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as is and reads the first response (graft closes the
/// connection after it: every request here says `Connection: close` or is
/// HTTP/1.0, or breaks the connection's framing).
fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    exchange(addr, request, false)
}

/// Like [`raw`], then hangs up its sending side: the body ends mid-way.
fn raw_then_hang_up(addr: SocketAddr, request: &[u8]) -> RawResponse {
    exchange(addr, request, true)
}

fn exchange(addr: SocketAddr, request: &[u8], hang_up: bool) -> RawResponse {
    let mut stream = TcpStream::connect(addr).expect("connect to graft");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream.write_all(request).expect("send request");
    if hang_up {
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    }
    let mut bytes = Vec::new();
    // The peer may reset after its answer (a broken body); what arrived counts.
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    RawResponse {
        status,
        headers,
        body: body.to_string(),
        text: text.clone(),
    }
}

/// Checks a 400 OCI error that names neither the upstream nor `echo`.
fn assert_plain_400(resp: &RawResponse, registry: &Registry, echo: Option<&str>) {
    assert_eq!(resp.status, 400, "{}", resp.text);
    let json: serde_json::Value = serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("not an OCI error body ({e}): {}", resp.text));
    assert!(json["errors"][0]["code"].is_string(), "{}", resp.text);
    assert!(resp.header("location").is_none(), "{}", resp.text);
    assert!(!resp.text.contains(&registry.host()), "{}", resp.text);
    if let Some(echo) = echo {
        assert!(
            !resp.text.contains(echo),
            "`{echo}` reflected: {}",
            resp.text
        );
    }
}

fn upload_start(version: &str, host: Option<&str>) -> Vec<u8> {
    let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    format!(
        "POST /v2/app/blobs/uploads/ {version}\r\n{host}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn a_request_without_host_is_refused_rather_than_sent_to_the_upstream() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    for version in ["HTTP/1.0", "HTTP/1.1"] {
        let resp = raw(graft.addr(), &upload_start(version, None));
        assert_plain_400(&resp, &registry, None);
    }
}

#[tokio::test]
async fn a_push_without_host_is_refused_before_the_upstream_stores_it() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let mut request = format!(
        "PUT /v2/app/manifests/v1 HTTP/1.0\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\n\r\n",
        manifest.len()
    )
    .into_bytes();
    request.extend_from_slice(manifest);
    assert_plain_400(&raw(graft.addr(), &request), &registry, None);
    let upstream = Api::for_registry(&registry);
    let tag = Api::send(upstream.head("/v2/app/manifests/v1")).await;
    assert_eq!(tag.status(), 404, "nothing was stored");
}

#[tokio::test]
async fn a_malformed_host_is_refused_and_never_reflected() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    for host in [
        "evil.example%2fx",
        "user@evil.example",
        "evil.example:99999",
    ] {
        let resp = raw(graft.addr(), &upload_start("HTTP/1.1", Some(host)));
        assert_plain_400(&resp, &registry, Some("evil.example"));
    }
}

#[tokio::test]
async fn without_host_the_public_url_is_where_location_points() {
    let registry = Registry::start();
    let public = "https://registry.example.com";
    let graft = Graft::start_with(&registry, |c| c.server.public_url = Some(public.into()));
    for request in [
        upload_start("HTTP/1.0", None),
        upload_start("HTTP/1.1", Some("bad host")),
    ] {
        let resp = raw(graft.addr(), &request);
        assert_eq!(resp.status, 202, "{}", resp.text);
        let location = resp.header("location").expect("Location");
        assert!(
            location.starts_with(&format!("{public}/v2/app/blobs/uploads/")),
            "{location}"
        );
        assert!(!resp.text.contains(&registry.host()), "{}", resp.text);
    }
    // A valid Host still wins: the client keeps the address it used.
    let resp = raw(graft.addr(), &upload_start("HTTP/1.1", Some(&graft.host())));
    assert_eq!(resp.status, 202, "{}", resp.text);
    common::assert_location_on(&graft, resp.header("location").expect("Location"));
}

/// A chunked body whose second chunk size is not hex.
fn broken_chunked(method: &str, target: &str, host: &str, content_type: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         2\r\n{{}}\r\nzz\r\nnot a chunk\r\n0\r\n\r\n"
    )
    .into_bytes()
}

/// 400 with a plain sentence: no 502, no hyper error text.
fn assert_client_blamed(resp: &RawResponse) {
    assert_eq!(resp.status, 400, "{}", resp.text);
    let json: serde_json::Value = serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("not an OCI error body ({e}): {}", resp.text));
    let message = json["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{}", resp.text);
    for leak in ["hyper", "chunk size", "error", "Invalid"] {
        assert!(!message.contains(leak), "`{leak}` in {message:?}");
    }
}

#[tokio::test]
async fn a_broken_chunked_manifest_push_is_the_client_s_400() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let resp = raw(
        graft.addr(),
        &broken_chunked(
            "PUT",
            "/v2/app/manifests/v1",
            &graft.host(),
            "application/vnd.oci.image.manifest.v1+json",
        ),
    );
    assert_client_blamed(&resp);
    let upstream = Api::for_registry(&registry);
    let tag = Api::send(upstream.head("/v2/app/manifests/v1")).await;
    assert_eq!(tag.status(), 404, "nothing was stored");
}

#[tokio::test]
async fn a_broken_chunked_blob_patch_is_the_client_s_400() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let location = api.start_upload("app").await;
    let target = location
        .strip_prefix(&graft.url())
        .unwrap_or(&location)
        .to_string();
    let resp = raw(
        graft.addr(),
        &broken_chunked("PATCH", &target, &graft.host(), "application/octet-stream"),
    );
    assert_client_blamed(&resp);
}

#[tokio::test]
async fn a_chunked_blob_patch_cut_mid_chunk_is_the_client_s_400() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let location = api.start_upload("app").await;
    let target = location
        .strip_prefix(&graft.url())
        .unwrap_or(&location)
        .to_string();
    let request = format!(
        "PATCH {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\n\r\n400\r\nonly a few bytes of a 1024-byte chunk",
        graft.host()
    );
    assert_client_blamed(&raw_then_hang_up(graft.addr(), request.as_bytes()));
}
