//! Remembered authorizations expire on graft's clock: within `cache.auth_ttl`
//! a cached hit asks the upstream nothing, after it the upstream is asked
//! again; with the upstream stopped a remembered yes serves cached content
//! until `cache.max_stale`, and nothing after. The clock is skewed, never
//! slept on; counts come from graft's own `/metrics`.

mod common;

use std::time::Duration;

use common::{read_metric, Api, Graft, Registry, RegistryOptions, TestImage};
use graft::clock::Clock;

const AUTH_TTL: Duration = Duration::from_secs(60);
const MAX_STALE: Duration = Duration::from_secs(3600);
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A registry that only lets alice in, with `image` pushed as `app:v1`.
async fn registry_with(image: &TestImage) -> Registry {
    let registry = Registry::start_with(RegistryOptions::default().basic_auth("alice", "s3cret"));
    Api::for_registry(&registry)
        .with_basic_auth("alice", "s3cret")
        .push_image("app", "v1", image)
        .await;
    registry
}

/// graft in front of `registry` on a skewable `clock`.
fn graft_on(registry: &Registry, clock: &Clock) -> Graft {
    let clock = clock.clone();
    Graft::start_with(registry, move |c| {
        c.clock = clock;
        c.cache.auth_ttl = AUTH_TTL;
        c.cache.max_stale = MAX_STALE;
    })
}

/// The value of counter `name` on graft's `/metrics` (0 when absent).
async fn counter(graft: &Graft, name: &str) -> u64 {
    read_metric(&Api::for_graft(graft), name).await.unwrap_or(0)
}

/// (upstream checks, hits decided from memory) so far.
async fn auth_counts(graft: &Graft) -> (u64, u64) {
    (
        counter(graft, "graft_auth_checks_total").await,
        counter(graft, "graft_auth_remembered_total").await,
    )
}

#[tokio::test]
async fn a_cached_hit_asks_the_upstream_only_once_auth_ttl_has_passed() {
    let image = TestImage::build(1);
    let registry = registry_with(&image).await;
    let clock = Clock::skewable();
    let graft = graft_on(&registry, &clock);
    let alice = Api::for_graft(&graft).with_basic_auth("alice", "s3cret");
    let layer = &image.layers[0];
    let head_path = format!("/v2/app/blobs/{}", layer.digest);
    let heads = || registry.count_requests("HEAD", &head_path);
    // The miss: fetched with alice's credentials, which remembers her yes.
    assert_eq!(alice.get_blob("app", &layer.digest).await, layer.data);

    let (checks, remembered) = auth_counts(&graft).await;
    clock.advance(AUTH_TTL - Duration::from_secs(1));
    for _ in 0..3 {
        assert_eq!(alice.get_blob("app", &layer.digest).await, layer.data);
    }
    assert_eq!(
        auth_counts(&graft).await,
        (checks, remembered + 3),
        "within auth_ttl hits are decided from memory"
    );
    assert_eq!(heads(), 0, "the upstream was asked nothing");

    clock.advance(Duration::from_secs(1));
    assert_eq!(alice.get_blob("app", &layer.digest).await, layer.data);
    assert_eq!(
        auth_counts(&graft).await,
        (checks + 1, remembered + 3),
        "past auth_ttl the upstream is asked again"
    );
    registry.wait_for_access("graft's HEAD on the blob", |e| {
        e.method == "HEAD" && e.uri == head_path
    });

    // That answer is remembered afresh.
    assert_eq!(alice.get_blob("app", &layer.digest).await, layer.data);
    assert_eq!(auth_counts(&graft).await, (checks + 1, remembered + 4));
}

#[tokio::test]
async fn with_the_upstream_stopped_a_remembered_yes_serves_cached_content_until_max_stale() {
    let image = TestImage::build(1);
    let mut registry = registry_with(&image).await;
    let clock = Clock::skewable();
    let graft = graft_on(&registry, &clock);
    let alice = Api::for_graft(&graft).with_basic_auth("alice", "s3cret");
    let mallory = Api::for_graft(&graft).with_basic_auth("alice", "guess");
    let layer = &image.layers[0];
    let blob_path = format!("/v2/app/blobs/{}", layer.digest);
    assert_eq!(alice.get_manifest("app", "v1").await, image.manifest);
    assert_eq!(alice.get_blob("app", &layer.digest).await, layer.data);

    registry.stop();
    // Past auth_ttl the upstream must be asked, and cannot be.
    clock.advance(AUTH_TTL);
    let stale_hits = counter(&graft, "graft_cache_stale_hits_total").await;
    assert_eq!(alice.get_blob("app", &layer.digest).await, layer.data);
    assert_eq!(alice.get_manifest("app", "v1").await, image.manifest);
    assert_eq!(
        counter(&graft, "graft_cache_stale_hits_total").await,
        stale_hits + 1,
        "the blob was served on the remembered yes"
    );
    let resp = Api::send(mallory.get(&blob_path)).await;
    common::assert_oci_error(resp, 502, None).await;

    clock.advance(MAX_STALE - AUTH_TTL - Duration::from_secs(1));
    assert_eq!(alice.get_blob("app", &layer.digest).await, layer.data);

    clock.advance(Duration::from_secs(1));
    let resp = Api::send(alice.get(&blob_path)).await;
    common::assert_oci_error(resp, 502, None).await;
    let resp = Api::send(
        alice
            .get("/v2/app/manifests/v1")
            .header("accept", OCI_MANIFEST),
    )
    .await;
    common::assert_oci_error(resp, 502, None).await;
    assert_eq!(
        counter(&graft, "graft_cache_stale_hits_total").await,
        stale_hits + 2,
        "nothing was served past max_stale"
    );
}
