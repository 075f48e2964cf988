//! Shared harness for graft's integration tests.
//!
//! # Layout
//!
//! - [`registry`]: a real `docker-registry` (CNCF distribution 2.8) child
//!   process on an ephemeral port, optionally with htpasswd auth and TLS from a
//!   test CA; its access log tells how many requests reached the upstream.
//! - [`graft`]: graft itself, in-process on its own tokio runtime and thread,
//!   so a test may block (run `skopeo`) without starving the proxy.
//! - [`api`]: an OCI Distribution client over `reqwest` that never follows
//!   redirects, with helpers to push blobs, manifests and whole images.
//! - [`image`]: test images (config + tar layers) and OCI image layouts.
//! - [`fake`]: a raw TCP "upstream" that records requests and answers with
//!   canned bytes, or never answers (timeouts, header hygiene).
//! - [`native_layer`]: an HTTP layer in front of a real registry that adds
//!   the referrers API for manifests pushed after it is switched on (a
//!   registry that gained the API by upgrade).
//! - [`token`]: a Docker token service issuing ES256 JWTs (with an `x5c`
//!   chain to a test CA) for a registry started with `auth: token`.
//!
//! Every process, thread and temporary directory a helper starts is owned by
//! a value whose `Drop` stops and removes it, also when a test panics.
//!
//! Set `GRAFT_TEST_LOG` (an `EnvFilter`, e.g. `graft=debug`) to see graft's
//! logs in a failing test's output.

// Each test binary uses a different part of the harness (and of its re-exports).
#![allow(dead_code, unused_imports)]

pub mod api;
pub mod artifacts;
pub mod fake;
pub mod graft;
pub mod image;
pub mod native_layer;
pub mod registry;
pub mod shim;
pub mod token;

pub use api::Api;
pub use fake::FakeUpstream;
pub use graft::Graft;
pub use image::TestImage;
pub use registry::{Registry, RegistryOptions, TokenAuth};
pub use token::{TokenOptions, TokenService};

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

/// What to tell someone whose machine lacks the external test tools.
pub const INSTALL_HINT: &str = "run ./scripts/test (the README's test command, which installs \
     them), or `apt-get install -y docker-registry skopeo`";

/// Finds an external tool on `PATH` (or in /usr/bin, where Debian puts it),
/// failing the test (never skipping it) when it is missing.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file());
    match found {
        Some(path) => path,
        None => panic!("`{name}` is not installed: {INSTALL_HINT}"),
    }
}

/// `sha256:<hex>` of `data`, the OCI digest of a blob or manifest.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Incremental sha256 for bodies read chunk by chunk.
#[derive(Default)]
pub struct DigestWriter {
    hasher: Sha256,
    len: u64,
}

impl DigestWriter {
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// `sha256:<hex>` of everything seen so far.
    pub fn digest(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

/// `len` pseudo-random bytes, different on every call (seeded from a counter
/// and the clock), so that blobs of different tests never collide.
pub fn random_bytes(len: usize) -> Vec<u8> {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut state = nanos
        ^ CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // splitmix64: fast, and plenty for test payloads.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A 127.0.0.1 port that was free a moment ago (bound to port 0, then
/// released). Callers that race for it must retry.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// An upstream URL on which nothing listens: connections are refused.
pub fn closed_port_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// Polls `check` every 50 ms until it holds, failing the test after
/// `timeout` with `what` in the message.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Like [`wait_until`] for async tests: polls `check` every 20 ms without
/// blocking the test's runtime (which may be driving the awaited work).
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a new TCP connection to `addr` is refused right now.
pub fn connection_refused(addr: SocketAddr) -> bool {
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

/// Checks that `response` is an OCI error (`{"errors":[{"code","message",
/// "detail"}]}`) with `status` and, when given, `code`; returns the body.
pub async fn assert_oci_error(
    response: reqwest::Response,
    status: u16,
    code: Option<&str>,
) -> serde_json::Value {
    let got = response.status().as_u16();
    let content_type = header_str(response.headers(), "content-type").unwrap_or_default();
    let text = response.text().await.expect("read error body");
    assert_eq!(got, status, "status (body: {text})");
    assert!(
        content_type.starts_with("application/json"),
        "content type `{content_type}` of {text}"
    );
    let body: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    let first = &body["errors"][0];
    let got_code = first["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no errors[0].code in {text}"));
    assert!(!got_code.is_empty(), "empty code in {text}");
    assert!(
        first["message"].is_string(),
        "no errors[0].message in {text}"
    );
    if let Some(code) = code {
        assert_eq!(got_code, code, "error code in {text}");
    }
    body
}

/// A header's value as text, if present and ASCII.
pub fn header_str(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Checks that a `Location` header sends the client back to graft: either a
/// path (`/v2/…`) or an absolute URL whose authority is graft's.
pub fn assert_location_on(graft: &Graft, location: &str) {
    if location.starts_with('/') {
        assert!(
            location.starts_with("/v2/"),
            "relative Location `{location}` is not under /v2/"
        );
        return;
    }
    let rest = location.strip_prefix("http://").unwrap_or_else(|| {
        panic!("Location `{location}` is neither a path nor an http:// URL on graft")
    });
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    assert_eq!(
        authority,
        graft.host(),
        "Location `{location}` must point at graft"
    );
}

/// Waits until the registry has logged every request answered so far: a
/// marker request sent now is logged after them, so counts read after this
/// cannot pass because a line was still being written.
pub async fn settle(registry: &Registry) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static MARKERS: AtomicUsize = AtomicUsize::new(0);
    let n = MARKERS.fetch_add(1, Ordering::Relaxed);
    let path = format!("/v2/settle/marker-{n}/tags/list");
    let _ = Api::send(Api::for_registry(registry).get(&path)).await;
    registry.wait_for_access("the settle marker", |e| e.uri == path);
}

/// The value of `name` (a counter or gauge without labels) on the
/// `/metrics` of the graft `api` talks to; `None` when graft does not
/// export it.
pub async fn read_metric(api: &Api, name: &str) -> Option<u64> {
    let text = Api::send(api.get("/metrics"))
        .await
        .text()
        .await
        .expect("metrics");
    text.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .map(|v| v as u64)
}
