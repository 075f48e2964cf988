//! Graceful shutdown: once the shutdown future resolves graft stops
//! accepting, lets in-flight responses finish (up to `shutdown_grace`),
//! stops its background work, writes what it batched, and only then
//! returns from `run`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::api::expect_status;
use common::{
    connection_refused, random_bytes, sha256_digest, wait_until, Api, DigestWriter, FakeUpstream,
    Graft, Registry,
};
use reqwest::StatusCode;

#[tokio::test]
async fn download_in_flight_at_shutdown_completes_and_run_returns_after_it() {
    let registry = Registry::start();
    let mut graft = Graft::start_with(&registry, |config| {
        config.server.shutdown_grace = Duration::from_secs(60);
    });
    let data = Bytes::from(random_bytes(64 << 20));
    let digest = Api::for_registry(&registry)
        .push_blob("big/download", data.clone())
        .await;
    let api = Api::for_graft(&graft);

    let response = Api::send(api.get(&format!("/v2/big/download/blobs/{digest}"))).await;
    let mut response = expect_status(response, StatusCode::OK, "GET blob").await;
    let mut received = DigestWriter::default();
    // A slow reader (the pause is the client's pace, not a wait for graft):
    // the proxy is mid-stream, with backpressure, at shutdown.
    while received.len() < 1 << 20 {
        let chunk = response
            .chunk()
            .await
            .expect("read")
            .expect("body ended early");
        received.update(&chunk);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    graft.begin_shutdown();
    wait_until(
        Duration::from_secs(5),
        "graft to refuse new connections",
        || connection_refused(graft.addr()),
    );
    assert!(
        !graft.has_stopped(),
        "run returned while a download was in flight"
    );

    while let Some(chunk) = response.chunk().await.expect("body cut after shutdown") {
        received.update(&chunk);
    }
    assert_eq!(received.len(), data.len() as u64, "bytes received");
    assert_eq!(received.digest(), digest);
    graft
        .wait_stopped(Duration::from_secs(10))
        .expect("run returns Ok after draining");
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_up_shutdown() {
    let registry = Registry::start();
    let mut graft = Graft::start_with(&registry, |config| {
        config.server.shutdown_grace = Duration::from_secs(60);
    });
    let api = Api::for_graft(&graft);
    // The client keeps this connection open in its pool.
    expect_status(Api::send(api.get("/v2/")).await, StatusCode::OK, "GET /v2/").await;

    let started = Instant::now();
    graft.begin_shutdown();
    graft
        .wait_stopped(Duration::from_secs(5))
        .expect("run returns Ok");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(api);
}

#[tokio::test]
async fn shutdown_grace_bounds_how_long_a_stuck_request_delays_run() {
    let upstream = FakeUpstream::hanging();
    let mut graft = Graft::start_for_upstream(&upstream.url(), |config| {
        config.upstream.response_timeout = Duration::from_secs(120);
        config.server.shutdown_grace = Duration::from_secs(1);
    });
    let api = Api::for_graft(&graft);
    let stuck = tokio::spawn(async move {
        api.get("/v2/app/tags/list")
            .send()
            .await
            .map(|r| r.status())
    });
    upstream
        .wait_for_request("/v2/app/tags/list", Duration::from_secs(5))
        .await;

    let started = Instant::now();
    graft.begin_shutdown();
    // Whether `run` reports the cut-off request is its call; it must return.
    let _ = graft.wait_stopped(Duration::from_secs(10));
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "run took {waited:?} with a 1 s grace"
    );
    stuck.abort();
}

#[tokio::test]
async fn a_new_run_on_the_same_data_dir_serves_after_the_previous_one_returned() {
    let registry = Registry::start();
    let mut graft = Graft::start(&registry);
    let image = common::TestImage::build(1);
    Api::for_graft(&graft)
        .push_image("app/restart", "v1", &image)
        .await;

    // `run` returned, so whatever it held in the data dir is released.
    graft.restart();

    let api = Api::for_graft(&graft);
    assert_eq!(api.get_manifest("app/restart", "v1").await, image.manifest);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_body_does_not_hold_run_past_the_grace() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let registry = Registry::start();
    let mut graft = Graft::start_with(&registry, |config| {
        config.server.body_timeout = Duration::from_secs(600);
        config.server.shutdown_grace = Duration::from_secs(1);
    });
    let mut stream = tokio::net::TcpStream::connect(graft.addr())
        .await
        .expect("connect");
    let head = "PUT /v2/stuck/body/manifests/v1 HTTP/1.1\r\nHost: graft\r\n\
                Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n";
    stream.write_all(head.as_bytes()).await.expect("send head");
    // graft sends `100 Continue` when the handler starts reading the body:
    // from here the request is in flight.
    let mut got = Vec::new();
    let mut chunk = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("100 Continue") {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk))
            .await
            .expect("graft never asked for the body")
            .expect("read");
        assert!(n > 0, "graft closed the connection");
        got.extend_from_slice(&chunk[..n]);
    }
    stream
        .write_all(b"{\"schemaVersion\":")
        .await
        .expect("send a little body");

    graft.begin_shutdown();
    // Without the grace period's cut, this request would hold `run` for the
    // ten-minute body timeout.
    let _ = graft.wait_stopped(Duration::from_secs(20));
    drop(stream);
}

#[tokio::test]
async fn shutdown_writes_batched_access_times_before_run_returns() {
    let registry = Registry::start();
    let mut graft = Graft::start(&registry);
    let data = random_bytes(64 << 10);
    let digest = sha256_digest(&data);
    Api::for_registry(&registry)
        .push_blob("app/touched", data)
        .await;
    let api = Api::for_graft(&graft);
    // The miss fills the cache; its file is committed (with an access time)
    // before the last byte reaches the client.
    api.get_blob("app/touched", &digest).await;
    // Access times are in milliseconds: let the clock pass the fill's.
    let filled = unix_millis();
    wait_until(Duration::from_secs(5), "the clock to move", || {
        unix_millis() > filled
    });
    let before_hit = unix_millis();
    // The hit's access time is batched in memory, not yet in the index.
    api.get_blob("app/touched", &digest).await;

    graft.begin_shutdown();
    graft
        .wait_stopped(Duration::from_secs(20))
        .expect("run returns Ok");
    let report = graft::admin::cache::stats(graft.config()).expect("cache stats");
    assert_eq!(report.stats.entries, 1);
    let newest = report.stats.newest_access_ms.expect("an access time");
    assert!(
        newest >= before_hit,
        "the hit's access time ({before_hit} or later) was lost: the index says {newest}"
    );
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
