//! A handler panic costs one request: it is answered 500 with an OCI error
//! body that names the request id, and the same connection and new ones go
//! on being served.
//!
//! The panic is the `panic-on-not-found` failpoint (feature `failpoints`),
//! armed through the process-wide `GRAFT_FAILPOINT`, which is why this test
//! has a file of its own.

#![cfg(feature = "failpoints")]

mod common;

use bytes::Bytes;
use common::{Graft, Registry};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// One HTTP/1.1 connection to graft, kept open across requests.
async fn connect(graft: &Graft) -> SendRequest<Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(graft.addr())
        .await
        .expect("connect to graft");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

async fn get(
    sender: &mut SendRequest<Empty<Bytes>>,
    graft: &Graft,
    path: &str,
    request_id: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    sender.ready().await.expect("connection still usable");
    let req = Request::get(path)
        .header("host", graft.host())
        .header("x-request-id", request_id)
        .body(Empty::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

#[tokio::test]
async fn a_handler_panic_is_a_500_and_the_connection_and_server_go_on() {
    // Edition 2021: setting the environment is safe; no other test runs in
    // this binary, and graft starts after this line.
    std::env::set_var("GRAFT_FAILPOINT", "panic-on-not-found");
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let mut conn = connect(&graft).await;

    let (status, headers, body) = get(&mut conn, &graft, "/not-an-endpoint", "panic-1").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(headers["x-request-id"], "panic-1");
    assert!(headers["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("application/json")));
    let json: serde_json::Value = serde_json::from_slice(&body).expect("OCI error body");
    assert_eq!(json["errors"][0]["code"], "UNKNOWN", "{json}");
    assert_eq!(
        json["errors"][0]["detail"]["request_id"], "panic-1",
        "{json}"
    );
    assert!(
        !String::from_utf8_lossy(&body).contains("failpoint"),
        "the panic message stays in the log: {json}"
    );

    let (status, headers, _) = get(&mut conn, &graft, "/v2/", "after-panic-same-conn").await;
    assert_eq!(status, StatusCode::OK, "same connection after the panic");
    assert_eq!(headers["x-request-id"], "after-panic-same-conn");

    let mut fresh = connect(&graft).await;
    let (status, _, _) = get(&mut fresh, &graft, "/v2/", "after-panic-new-conn").await;
    assert_eq!(status, StatusCode::OK, "a new connection after the panic");
}
