//! When the upstream answers graft's own fallback-tag requests badly, the
//! client hears whose fault it is: the upstream's refusal is passed on as
//! the upstream's answer (a 429 stays a 429), and a tag body graft cannot
//! read is a 502 — never graft's own 500, never a silently empty list.

mod common;

use common::{assert_oci_error, sha256_digest, Api, FakeUpstream, Graft};
use graft::config::ReferrersMode;

fn synthesizing(upstream: &FakeUpstream) -> Graft {
    Graft::start_for_upstream(&upstream.url(), |config| {
        config.referrers.mode = ReferrersMode::Synthesize;
    })
}

#[tokio::test]
async fn an_upstream_429_to_the_fallback_tag_read_reaches_the_client_as_429() {
    let upstream = FakeUpstream::responding(
        "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    let graft = synthesizing(&upstream);
    let api = Api::for_graft(&graft);
    let path = format!("/v2/app/referrers/{}", sha256_digest(b"subject"));

    assert_oci_error(
        Api::send(api.get(&path)).await,
        429,
        Some("TOOMANYREQUESTS"),
    )
    .await;
    assert!(
        upstream
            .requests()
            .iter()
            .any(|r| r.target().contains("/manifests/sha256-")),
        "graft asked for the fallback tag"
    );
}

#[tokio::test]
async fn a_fallback_tag_that_is_not_json_is_a_bad_gateway_not_an_empty_list() {
    let body = "<html>login</html>";
    let upstream = FakeUpstream::responding(&format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.index.v1+json\r\n\
         Docker-Content-Digest: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        sha256_digest(body.as_bytes()),
        body.len()
    ));
    let graft = synthesizing(&upstream);
    let api = Api::for_graft(&graft);
    let path = format!("/v2/app/referrers/{}", sha256_digest(b"subject"));

    let err = assert_oci_error(Api::send(api.get(&path)).await, 502, Some("UNAVAILABLE")).await;
    assert_eq!(
        err["errors"][0]["message"], "upstream registry sent an unusable answer",
        "{err}"
    );
}
