//! Registries backed by object storage answer blob GETs with a redirect to
//! another host. graft follows it itself when caching, and never sends the
//! client's credentials there.
//!
//! distribution 2.8 on a filesystem never redirects, so both ends are the
//! scripted TCP upstream: one answers 307 (the registry), the other serves
//! the bytes (the object store) and records what it was sent.

mod common;

use common::{sha256_digest, Api, FakeUpstream, Graft};
use reqwest::StatusCode;

#[tokio::test]
async fn a_redirect_to_another_host_is_followed_without_the_clients_credentials() {
    let content = "layer bytes served by object storage";
    let digest = sha256_digest(content.as_bytes());
    let store = FakeUpstream::responding(&format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n{content}",
        content.len()
    ));
    let registry = FakeUpstream::responding(&format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: {}/bucket/blob?X-Amz-Signature=abc\r\nContent-Length: 0\r\n\r\n",
        store.url()
    ));
    let graft = Graft::start_for_upstream(&registry.url(), |_| {});
    let api = Api::for_graft(&graft).with_basic_auth("alice", "s3cret");

    let resp = Api::send(api.get(&format!("/v2/app/blobs/{digest}"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.expect("body"), content);

    let to_registry = registry.requests();
    assert!(
        to_registry
            .iter()
            .all(|r| !r.header_values("authorization").is_empty()),
        "the registry gets the client's credentials"
    );
    let to_store = store.requests();
    assert_eq!(to_store.len(), 1, "{to_store:?}");
    assert_eq!(to_store[0].target(), "/bucket/blob?X-Amz-Signature=abc");
    assert!(
        to_store[0].header_values("authorization").is_empty(),
        "credentials went to another host: {:?}",
        to_store[0]
    );
    // The fetched bytes were verified and cached.
    let cached = graft
        .data_dir()
        .join("blobs/sha256")
        .join(&digest[7..9])
        .join(&digest[7..]);
    common::wait_until(std::time::Duration::from_secs(5), "the cache file", || {
        cached.is_file()
    });
}
