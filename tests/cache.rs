//! The edge cache in front of a real distribution 2.8 registry: hits,
//! coalesced misses, offline pulls, corrupt upstream bodies, eviction, and
//! the rule that the cache never widens access.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::api::expect_status;
use common::shim::{Fault, Shim};
use common::{
    header_str, random_bytes, read_metric, settle, sha256_digest, Api, DigestWriter, Graft,
    Registry, RegistryOptions, TestImage,
};
use graft::clock::Clock;
use reqwest::StatusCode;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Blob GETs the registry answered for `repo`.
fn blob_gets(registry: &Registry, repo: &str) -> usize {
    registry.count_requests("GET", &format!("/v2/{repo}/blobs/"))
}

/// Pulls a whole image by tag through `api`: manifest, config, layers.
async fn pull_image(api: &Api, repo: &str, tag: &str, image: &TestImage) {
    let manifest = api.get_manifest(repo, tag).await;
    assert_eq!(manifest, image.manifest, "manifest bytes");
    for blob in image.blobs() {
        assert_eq!(
            api.get_blob(repo, &blob.digest).await,
            blob.data,
            "blob {}",
            blob.digest
        );
    }
}

#[tokio::test]
async fn a_second_pull_is_served_from_the_cache() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let image = TestImage::build(2);
    direct.push_image("app", "v1", &image).await;

    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    pull_image(&api, "app", "v1", &image).await;
    settle(&registry).await;
    assert_eq!(
        blob_gets(&registry, "app"),
        3,
        "first pull fetches config and 2 layers"
    );
    let manifest_gets = registry.count_requests("GET", "/v2/app/manifests/");

    pull_image(&api, "app", "v1", &image).await;
    settle(&registry).await;
    assert_eq!(
        blob_gets(&registry, "app"),
        3,
        "second pull made an upstream blob GET"
    );
    assert_eq!(
        registry.count_requests("GET", "/v2/app/manifests/"),
        manifest_gets,
        "second pull made an upstream manifest GET"
    );

    // A hit carries the headers a registry sends.
    let layer = &image.layers[0];
    let resp = Api::send(api.get(&format!("/v2/app/blobs/{}", layer.digest))).await;
    let resp = expect_status(resp, StatusCode::OK, "hit").await;
    assert_eq!(
        header_str(resp.headers(), "docker-content-digest"),
        Some(layer.digest.clone())
    );
    assert_eq!(
        header_str(resp.headers(), "content-length"),
        Some(layer.data.len().to_string())
    );
    assert_eq!(
        header_str(resp.headers(), "etag"),
        Some(format!("\"{}\"", layer.digest))
    );
    let resp = Api::send(
        api.get(&format!("/v2/app/manifests/{}", image.digest))
            .header("accept", OCI_MANIFEST),
    )
    .await;
    assert_eq!(
        header_str(resp.headers(), "content-type").as_deref(),
        Some(OCI_MANIFEST)
    );
    let head = Api::send(api.head(&format!("/v2/app/blobs/{}", layer.digest))).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        header_str(head.headers(), "content-length"),
        Some(layer.data.len().to_string())
    );

    let metrics = Api::send(api.get("/metrics"))
        .await
        .text()
        .await
        .expect("metrics");
    assert!(metrics.contains("graft_cache_hits_total"), "{metrics}");
    assert!(!metrics.contains("graft_cache_hits_total 0\n"), "{metrics}");
}

#[tokio::test]
async fn ranges_on_hits_get_206_and_unsatisfiable_ones_416() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let data = Bytes::from(random_bytes(1000));
    let digest = direct.push_blob("app", data.clone()).await;
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    assert_eq!(api.get_blob("app", &digest).await, data);

    let path = format!("/v2/app/blobs/{digest}");
    let resp = Api::send(api.get(&path).header("range", "bytes=100-199")).await;
    let resp = expect_status(resp, StatusCode::PARTIAL_CONTENT, "range on a hit").await;
    assert_eq!(
        header_str(resp.headers(), "content-range").as_deref(),
        Some("bytes 100-199/1000")
    );
    assert_eq!(resp.bytes().await.expect("body"), data.slice(100..200));
    let resp = Api::send(api.get(&path).header("range", "bytes=-10")).await;
    let resp = expect_status(resp, StatusCode::PARTIAL_CONTENT, "suffix range").await;
    assert_eq!(resp.bytes().await.expect("body"), data.slice(990..));
    for bad in ["bytes=500-0", "bytes=1000-", "bytes=5000-6000"] {
        let resp = Api::send(api.get(&path).header("range", bad)).await;
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{bad}");
        assert_eq!(
            header_str(resp.headers(), "content-range").as_deref(),
            Some("bytes */1000")
        );
    }
    settle(&registry).await;
    assert_eq!(
        blob_gets(&registry, "app"),
        1,
        "ranges were served from the cache"
    );
}

#[tokio::test]
async fn sixteen_concurrent_pulls_of_an_uncached_blob_make_one_upstream_fetch() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    // 16 clients hash what they read (in a debug build, on a shared
    // machine): 16 MiB each keeps that well inside the client's timeout.
    let data = Bytes::from(random_bytes(16 << 20));
    let digest = direct.push_blob("app", data.clone()).await;
    drop(data);
    // A slow upstream (~8 MiB/s), so the fetch is still running while the
    // clients read.
    let shim = Shim::start(&registry.host(), Fault::Throttle(8 << 20));
    let graft = Graft::start_for_upstream(&shim.url(), |_| {});
    let api = Api::for_graft(&graft);
    let started = Instant::now();

    let pulls = (0..16).map(|_| {
        let api = api.clone();
        let digest = digest.clone();
        async move {
            let resp = Api::send(api.get(&format!("/v2/app/blobs/{digest}"))).await;
            let mut resp = expect_status(resp, StatusCode::OK, "coalesced GET").await;
            let mut hasher = DigestWriter::default();
            let mut first_byte = None;
            while let Some(chunk) = resp.chunk().await.expect("body chunk") {
                if first_byte.is_none() && !chunk.is_empty() {
                    first_byte = Some(Instant::now());
                }
                hasher.update(&chunk);
            }
            (
                hasher.digest(),
                first_byte.expect("some bytes"),
                Instant::now(),
            )
        }
    });
    let results = futures_util::future::join_all(pulls).await;
    settle(&registry).await;

    assert_eq!(
        blob_gets(&registry, "app"),
        1,
        "one upstream fetch for 16 clients"
    );
    for (got, _, _) in &results {
        assert_eq!(got, &digest);
    }
    // Every client had bytes before the fetch ended: the first client to
    // finish could only do so once the fill was verified.
    let fetch_done = results.iter().map(|r| r.2).min().expect("16 results");
    for (_, first, _) in &results {
        assert!(
            *first < fetch_done,
            "a client got its first byte only after the fetch ended"
        );
    }
    let _ = started;
}

#[tokio::test]
async fn with_the_upstream_stopped_a_cached_image_still_pulls_and_an_uncached_one_fails() {
    let mut registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let cached = TestImage::build(2);
    let uncached = TestImage::build(1);
    direct.push_image("app", "cached", &cached).await;
    direct.push_image("app", "uncached", &uncached).await;
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    pull_image(&api, "app", "cached", &cached).await;

    registry.stop();
    pull_image(&api, "app", "cached", &cached).await;
    let resp = Api::send(
        api.get("/v2/app/manifests/uncached")
            .header("accept", OCI_MANIFEST),
    )
    .await;
    common::assert_oci_error(resp, 502, None).await;
    let resp = Api::send(api.get(&format!("/v2/app/blobs/{}", uncached.layers[0].digest))).await;
    common::assert_oci_error(resp, 502, None).await;
    let metrics = Api::send(api.get("/metrics"))
        .await
        .text()
        .await
        .expect("metrics");
    assert!(
        !metrics.contains("graft_tag_stale_served_total 0\n"),
        "{metrics}"
    );
}

/// Reads a body to the end; `Err` when the connection broke first.
async fn read_all(resp: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    resp.bytes().await
}

#[tokio::test]
async fn a_corrupted_or_cut_upstream_body_is_never_cached_nor_ended_cleanly() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let data = Bytes::from(random_bytes(4 << 20));
    let digest = direct.push_blob("app", data.clone()).await;
    let shim = Shim::start(&registry.host(), Fault::FlipByteAt(2 << 20));
    let graft = Graft::start_for_upstream(&shim.url(), |_| {});
    let api = Api::for_graft(&graft);
    let path = format!("/v2/app/blobs/{digest}");

    for fault in [Fault::FlipByteAt(2 << 20), Fault::CutAfter(2 << 20)] {
        shim.set_fault(fault);
        let resp = Api::send(api.get(&path)).await;
        match read_all(resp).await {
            Err(_) => {}
            Ok(body) => {
                panic!(
                    "{fault:?}: body ended cleanly with {} bytes (right bytes: {})",
                    body.len(),
                    body == data
                )
            }
        }
    }
    let metrics = Api::send(api.get("/metrics"))
        .await
        .text()
        .await
        .expect("metrics");
    assert!(
        metrics.contains("graft_cache_fills_failed_total 2\n"),
        "both bad fetches counted: {metrics}"
    );
    // Nothing was cached: the next pull fetches again, and gets it right.
    shim.set_fault(Fault::None);
    assert_eq!(api.get_blob("app", &digest).await, data);
    settle(&registry).await;
    assert_eq!(blob_gets(&registry, "app"), 3);
    assert_eq!(api.get_blob("app", &digest).await, data);
    settle(&registry).await;
    assert_eq!(blob_gets(&registry, "app"), 3, "the good copy was cached");
}

/// Files in the cache directory.
fn cached_files(graft: &Graft) -> usize {
    let base = graft.data_dir().join("blobs/sha256");
    std::fs::read_dir(base)
        .map(|shards| {
            shards
                .flatten()
                .map(|s| std::fs::read_dir(s.path()).map(|f| f.count()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn eviction_holds_the_byte_budget_while_a_reader_of_an_old_blob_finishes() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let blobs: Vec<Bytes> = (0..8).map(|_| Bytes::from(random_bytes(1 << 20))).collect();
    let mut digests = Vec::new();
    for b in &blobs {
        digests.push(direct.push_blob("app", b.clone()).await);
    }
    let graft = Graft::start_with(&registry, |c| c.cache.max_bytes = 3 << 20);
    let api = Api::for_graft(&graft);

    // Cache the oldest blob, then hold a reader on it.
    assert_eq!(api.get_blob("app", &digests[0]).await, blobs[0]);
    let resp = Api::send(api.get(&format!("/v2/app/blobs/{}", digests[0]))).await;
    let mut reader = expect_status(resp, StatusCode::OK, "old blob").await;
    let first = reader.chunk().await.expect("chunk").expect("some bytes");

    for (d, b) in digests.iter().zip(&blobs).skip(1) {
        assert_eq!(&api.get_blob("app", d).await, b);
    }
    // Eviction runs in the background right after the commit that broke
    // the budget.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = Api::send(api.get("/metrics"))
            .await
            .text()
            .await
            .expect("metrics");
        let bytes: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("graft_cache_bytes "))
            .and_then(|v| v.parse().ok())
            .expect("graft_cache_bytes");
        if bytes <= 3 << 20 && cached_files(&graft) <= 3 {
            break metrics;
        }
        assert!(Instant::now() < deadline, "cache still holds {bytes} bytes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!metrics.contains("graft_cache_evictions_total 0\n"));

    // The reader that started before the eviction reads on to the end.
    let mut rest = first.to_vec();
    while let Some(chunk) = reader.chunk().await.expect("chunk after eviction") {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(sha256_digest(&rest), digests[0]);
    // The newest blobs are the ones kept.
    assert!(graft
        .data_dir()
        .join("blobs/sha256")
        .join(&digests[7][7..9])
        .join(&digests[7][7..])
        .is_file());
}

#[tokio::test]
async fn cached_content_is_never_served_to_clients_the_upstream_refuses() {
    let registry = Registry::start_with(RegistryOptions::default().basic_auth("alice", "s3cret"));
    let graft = Graft::start(&registry);
    let alice = Api::for_graft(&graft).with_basic_auth("alice", "s3cret");
    let anonymous = Api::for_graft(&graft);
    let mallory = Api::for_graft(&graft).with_basic_auth("alice", "guess");
    let image = TestImage::build(1);
    alice.push_image("app", "v1", &image).await;
    pull_image(&alice, "app", "v1", &image).await;

    for (who, api) in [("anonymous", &anonymous), ("wrong password", &mallory)] {
        for path in [
            format!("/v2/app/blobs/{}", image.layers[0].digest),
            format!("/v2/app/manifests/{}", image.digest),
            "/v2/app/manifests/v1".to_owned(),
        ] {
            let resp = Api::send(api.get(&path)).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{who} {path}");
            assert!(
                header_str(resp.headers(), "www-authenticate").is_some(),
                "{who}: challenge"
            );
            let body = resp.bytes().await.expect("body");
            assert_ne!(body, image.layers[0].data, "{who} got the blob");
        }
    }
    // Alice still pulls from the cache.
    pull_image(&alice, "app", "v1", &image).await;
}

#[tokio::test]
async fn a_blob_cached_through_one_repository_is_refused_for_another_that_lacks_it() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let data = Bytes::from(random_bytes(10_000));
    let digest = direct.push_blob("team-a/app", data.clone()).await;
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    assert_eq!(api.get_blob("team-a/app", &digest).await, data);

    let resp = Api::send(api.get(&format!("/v2/team-b/app/blobs/{digest}"))).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body = resp.bytes().await.expect("body");
    assert_ne!(body, data);
    let body: serde_json::Value = serde_json::from_slice(&body).expect("the registry's error");
    assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN");

    // Once team-b has it upstream, it is served from the cache.
    direct.push_blob("team-b/app", data.clone()).await;
    settle(&registry).await;
    let before = blob_gets(&registry, "team-b/app");
    assert_eq!(api.get_blob("team-b/app", &digest).await, data);
    settle(&registry).await;
    assert_eq!(
        blob_gets(&registry, "team-b/app"),
        before,
        "served from the cache"
    );
}

#[tokio::test]
async fn tags_are_revalidated_unless_within_their_ttl() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let one = TestImage::build(1);
    let two = TestImage::build(1);
    direct.push_image("app", "latest", &one).await;
    direct.push_image("app", "other", &two).await;

    // tag_ttl 0 (the default): a moved tag is seen at once.
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    assert_eq!(api.get_manifest("app", "latest").await, one.manifest);
    direct
        .push_manifest("app", "latest", OCI_MANIFEST, two.manifest.clone())
        .await;
    assert_eq!(api.get_manifest("app", "latest").await, two.manifest);
    drop(graft);

    // tag_ttl 1h: within it, no upstream request at all.
    direct
        .push_manifest("app", "latest", OCI_MANIFEST, one.manifest.clone())
        .await;
    let graft = Graft::start_with(&registry, |c| {
        c.cache.tag_ttl = Duration::from_secs(3600);
        c.cache.auth_ttl = Duration::from_secs(3600);
    });
    let api = Api::for_graft(&graft);
    assert_eq!(api.get_manifest("app", "latest").await, one.manifest);
    settle(&registry).await;
    let heads = registry.count_requests("HEAD", "/v2/app/manifests/latest");
    direct
        .push_manifest("app", "latest", OCI_MANIFEST, two.manifest.clone())
        .await;
    assert_eq!(
        api.get_manifest("app", "latest").await,
        one.manifest,
        "within the TTL the known digest stands"
    );
    settle(&registry).await;
    assert_eq!(
        registry.count_requests("HEAD", "/v2/app/manifests/latest"),
        heads
    );
}

#[tokio::test]
async fn a_manifest_pushed_through_graft_is_pulled_without_an_upstream_get() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let image = TestImage::build(1);
    api.push_image("app", "v1", &image).await;
    let resp = Api::send(
        api.get(&format!("/v2/app/manifests/{}", image.digest))
            .header("accept", OCI_MANIFEST),
    )
    .await;
    let resp = expect_status(resp, StatusCode::OK, "pull after push").await;
    assert_eq!(resp.bytes().await.expect("body"), image.manifest);
    settle(&registry).await;
    assert_eq!(registry.count_requests("GET", "/v2/app/manifests/"), 0);
}

#[tokio::test]
async fn blobs_pushed_through_graft_are_pulled_without_an_upstream_get() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let monolithic = Bytes::from(random_bytes(300_000));
    let chunked = Bytes::from(random_bytes(3 << 20));
    let d1 = api.push_blob("app", monolithic.clone()).await;
    let (d2, _) = api.push_blob_chunked("app", &chunked, 1 << 20).await;
    assert_eq!(api.get_blob("app", &d1).await, monolithic);
    assert_eq!(api.get_blob("app", &d2).await, chunked);
    settle(&registry).await;
    assert_eq!(
        blob_gets(&registry, "app"),
        0,
        "a pushed blob was fetched back from the upstream"
    );

    // A blob pushed straight to the registry is not in the cache.
    let direct = Api::for_registry(&registry);
    let other = Bytes::from(random_bytes(1000));
    let d3 = direct.push_blob("app", other.clone()).await;
    assert_eq!(api.get_blob("app", &d3).await, other);
    settle(&registry).await;
    assert_eq!(blob_gets(&registry, "app"), 1);
}

#[tokio::test]
async fn cache_verify_finds_and_drops_a_corrupted_file() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let good = Bytes::from(random_bytes(5000));
    let bad = Bytes::from(random_bytes(5000));
    let good_digest = direct.push_blob("app", good.clone()).await;
    let bad_digest = direct.push_blob("app", bad.clone()).await;
    let mut graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    api.get_blob("app", &good_digest).await;
    api.get_blob("app", &bad_digest).await;
    graft.begin_shutdown();
    graft
        .wait_stopped(Duration::from_secs(20))
        .expect("graft stops");

    let path = graft
        .data_dir()
        .join("blobs/sha256")
        .join(&bad_digest[7..9])
        .join(&bad_digest[7..]);
    let mut bytes = std::fs::read(&path).expect("cached file");
    bytes[100] ^= 0x55;
    std::fs::write(&path, bytes).expect("corrupt it");

    let index = graft::index::Index::open(&graft.data_dir().join("index")).expect("index");
    let cache = graft::cache::ContentCache::open(
        graft.data_dir(),
        index,
        Arc::new(graft::metrics::Metrics::default()),
        graft.config().cache.clone(),
        graft.config().clock.clone(),
    )
    .expect("cache");
    let (checked, corrupt) = cache.verify_all().expect("verify");
    assert_eq!(checked, 2);
    assert_eq!(
        corrupt.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        vec![bad_digest]
    );
    assert!(!path.exists(), "the corrupt file was dropped");
}

#[tokio::test]
async fn an_authorization_is_checked_once_per_ttl_not_per_hit() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let image = TestImage::build(2);
    direct.push_image("app", "v1", &image).await;
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    pull_image(&api, "app", "v1", &image).await;
    settle(&registry).await;
    let heads = registry.count_requests("HEAD", "/v2/app/blobs/");
    for _ in 0..5 {
        for blob in image.blobs() {
            assert_eq!(api.get_blob("app", &blob.digest).await, blob.data);
        }
    }
    settle(&registry).await;
    assert_eq!(
        registry.count_requests("HEAD", "/v2/app/blobs/"),
        heads,
        "within cache.auth_ttl hits are decided from memory"
    );
    assert_eq!(blob_gets(&registry, "app"), 3);
}

#[tokio::test]
async fn offline_pulls_survive_a_graft_restart_for_the_clients_that_were_allowed() {
    let mut registry =
        Registry::start_with(RegistryOptions::default().basic_auth("alice", "s3cret"));
    let direct = Api::for_registry(&registry);
    let image = TestImage::build(2);
    direct.push_image("app", "v1", &image).await;
    let mut graft = Graft::start(&registry);
    let alice = Api::for_graft(&graft).with_basic_auth("alice", "s3cret");
    pull_image(&alice, "app", "v1", &image).await;

    graft.restart();
    registry.stop();
    // A new client: the old one's pooled connections died with the process.
    let alice = Api::for_graft(&graft).with_basic_auth("alice", "s3cret");
    pull_image(&alice, "app", "v1", &image).await;
    // Nobody vouched for these credentials: nothing cached is served.
    let mallory = Api::for_graft(&graft).with_basic_auth("alice", "guess");
    let resp = Api::send(mallory.get(&format!("/v2/app/blobs/{}", image.layers[0].digest))).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = resp.bytes().await.expect("body");
    assert_ne!(body, image.layers[0].data);
    let anonymous = Api::for_graft(&graft);
    let resp = Api::send(anonymous.get("/v2/app/manifests/v1")).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
}

/// graft's metric `name` (a counter or gauge without labels).
async fn metric(api: &Api, name: &str) -> u64 {
    read_metric(api, name)
        .await
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

#[tokio::test]
async fn a_tag_is_trusted_for_its_ttl_and_revalidated_once_it_passes() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let one = TestImage::build(1);
    let two = TestImage::build(1);
    direct.push_image("app", "latest", &one).await;
    direct.push_image("app", "other", &two).await;
    let clock = Clock::skewable();
    let graft = Graft::start_with(&registry, |c| {
        c.clock = clock.clone();
        c.cache.tag_ttl = Duration::from_secs(600);
        c.cache.auth_ttl = Duration::from_secs(3600);
    });
    let api = Api::for_graft(&graft);
    assert_eq!(api.get_manifest("app", "latest").await, one.manifest);
    settle(&registry).await;
    let heads = registry.count_requests("HEAD", "/v2/app/manifests/latest");
    assert_eq!(heads, 1, "the first pull resolves the tag upstream");
    direct
        .push_manifest("app", "latest", OCI_MANIFEST, two.manifest.clone())
        .await;

    clock.advance(Duration::from_secs(590));
    assert_eq!(
        api.get_manifest("app", "latest").await,
        one.manifest,
        "within cache.tag_ttl the known digest stands"
    );
    settle(&registry).await;
    assert_eq!(
        registry.count_requests("HEAD", "/v2/app/manifests/latest"),
        heads
    );

    clock.advance(Duration::from_secs(20));
    assert_eq!(
        api.get_manifest("app", "latest").await,
        two.manifest,
        "past cache.tag_ttl the tag is revalidated"
    );
    settle(&registry).await;
    assert_eq!(
        registry.count_requests("HEAD", "/v2/app/manifests/latest"),
        heads + 1
    );
}

#[tokio::test]
async fn a_last_known_tag_is_served_while_the_upstream_is_out_up_to_max_stale() {
    let mut registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let image = TestImage::build(1);
    direct.push_image("app", "v1", &image).await;
    let clock = Clock::skewable();
    let graft = Graft::start_with(&registry, |c| {
        c.clock = clock.clone();
        c.cache.max_stale = Duration::from_secs(3600);
    });
    let api = Api::for_graft(&graft);
    pull_image(&api, "app", "v1", &image).await;
    registry.stop();

    clock.advance(Duration::from_secs(3500));
    assert_eq!(api.get_manifest("app", "v1").await, image.manifest);
    assert_eq!(metric(&api, "graft_tag_stale_served_total").await, 1);

    clock.advance(Duration::from_secs(200));
    let resp = Api::send(
        api.get("/v2/app/manifests/v1")
            .header("accept", OCI_MANIFEST),
    )
    .await;
    common::assert_oci_error(resp, 502, None).await;
    assert_eq!(
        metric(&api, "graft_tag_stale_served_total").await,
        1,
        "past cache.max_stale the last known digest is not served"
    );
}

#[tokio::test]
async fn a_stalled_upstream_body_fails_the_fill_and_its_follower_and_nothing_is_cached() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let data = Bytes::from(random_bytes(4 << 20));
    let digest = direct.push_blob("app", data.clone()).await;
    let shim = Shim::start(&registry.host(), Fault::StallAfter(1 << 20));
    let graft = Graft::start_for_upstream(&shim.url(), |c| {
        c.upstream.body_timeout = Duration::from_secs(2);
    });
    let api = Api::for_graft(&graft);
    let path = format!("/v2/app/blobs/{digest}");

    let leader = expect_status(Api::send(api.get(&path)).await, StatusCode::OK, "leader").await;
    // The fill is under way (the leader has its headers): a second client
    // follows it.
    let follower = expect_status(Api::send(api.get(&path)).await, StatusCode::OK, "follower").await;
    assert_eq!(metric(&api, "graft_cache_coalesced_waiters_total").await, 1);
    let (led, followed) = tokio::join!(read_all(leader), read_all(follower));
    assert!(led.is_err(), "the leader's body ended cleanly");
    assert!(followed.is_err(), "the follower's body ended cleanly");
    assert_eq!(metric(&api, "graft_cache_fills_failed_total").await, 1);

    // Nothing was cached: the next pull fetches afresh, and that copy stays.
    shim.set_fault(Fault::None);
    assert_eq!(api.get_blob("app", &digest).await, data);
    common::wait_until(Duration::from_secs(10), "two upstream GETs", || {
        blob_gets(&registry, "app") >= 2
    });
    assert_eq!(api.get_blob("app", &digest).await, data);
    settle(&registry).await;
    assert_eq!(blob_gets(&registry, "app"), 2, "the good copy was cached");
}

#[tokio::test]
async fn past_the_upload_session_cap_the_oldest_tee_is_dropped_and_its_upload_still_succeeds() {
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |c| c.cache.max_upload_sessions = 1);
    let api = Api::for_graft(&graft);
    let first = Bytes::from(random_bytes(100_000));
    let second = Bytes::from(random_bytes(100_000));
    let (d1, d2) = (sha256_digest(&first), sha256_digest(&second));
    let at1 = api.start_upload("app").await;
    // Over the cap: the first session's tee is dropped.
    let at2 = api.start_upload("app").await;
    for (at, data, digest) in [(&at1, &first, &d1), (&at2, &second, &d2)] {
        let put = api
            .request(reqwest::Method::PUT, at)
            .query(&[("digest", digest.as_str())])
            .header("content-type", "application/octet-stream")
            .body(data.clone());
        expect_status(Api::send(put).await, StatusCode::CREATED, "PUT blob").await;
    }
    assert_eq!(api.get_blob("app", &d2).await, second);
    assert_eq!(api.get_blob("app", &d1).await, first);
    settle(&registry).await;
    assert_eq!(
        registry.count_requests("GET", &format!("/v2/app/blobs/{d2}")),
        0,
        "the upload within the cap was cached"
    );
    assert_eq!(
        registry.count_requests("GET", &format!("/v2/app/blobs/{d1}")),
        1,
        "the upload whose tee was dropped was not"
    );
}

#[tokio::test]
async fn a_cache_that_cannot_write_streams_misses_uncached_instead_of_failing_them() {
    let registry = Registry::start();
    let data = random_bytes(256 * 1024);
    let digest = Api::for_registry(&registry)
        .push_blob("app", data.clone())
        .await;
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    // graft answers only once its cache is open.
    expect_status(
        Api::send(api.get("/healthz")).await,
        StatusCode::OK,
        "healthz",
    )
    .await;
    // The temp-file directory becomes a plain file: every fill's temp file
    // fails to be created, as on a full or broken disk (root ignores
    // permission bits, so a read-only directory would not do).
    let tmp = graft.data_dir().join("blobs/tmp");
    std::fs::remove_dir_all(&tmp).expect("remove the temp dir");
    std::fs::write(&tmp, b"not a directory").expect("block the temp dir");

    for round in 1..=2 {
        assert_eq!(
            api.get_blob("app", &digest).await,
            data,
            "pull {round} streams the upstream's bytes"
        );
    }
    settle(&registry).await;
    assert_eq!(blob_gets(&registry, "app"), 2, "nothing was cached");
    assert_eq!(cached_files(&graft), 0);
    assert_eq!(metric(&api, "graft_cache_fills_failed_total").await, 2);
}
