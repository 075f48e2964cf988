//! graft's memory stays bounded however many distinct clients and
//! subjects it sees: a CI fleet rotating short-lived tokens sends a new
//! `Authorization` on almost every pull, and signature verifiers ask for the
//! referrers of every image they meet. What graft remembers of either is
//! capped (`cache.auth_cache_capacity`, `referrers.recent_checks_capacity`),
//! and the index's pages in memory by `index.cache_bytes`.
//!
//! graft runs in this process (tests/common/graft.rs), so the growth of this
//! process's resident memory (`VmRSS`) across the run bounds graft's. The
//! registry has no auth, so every credential gets a yes: the worst case for
//! what graft remembers. The bound is the one docs/DESIGN.md states.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::{random_bytes, read_metric, Api, Graft, Registry};
use reqwest::{RequestBuilder, StatusCode};

/// Distinct credentials, then distinct subjects, driven through graft.
/// Each costs the upstream a HEAD: about 140 s apiece in a debug build on
/// 2 idle cores.
const DISTINCT: usize = 100_000;
/// Distinct credentials sent before measuring (pools, arenas, the capacity).
const WARMUP: usize = 4_096;
/// Requests in flight at once, each on its own keep-alive connection.
const CONCURRENCY: usize = 16;
/// `cache.auth_cache_capacity` and `referrers.recent_checks_capacity` for
/// the test: far below [`DISTINCT`].
const CAPACITY: u64 = 1_024;
/// `index.cache_bytes` for the test: sled keeps about this much of the
/// index (each persisted yes, ~300 bytes) in memory — in practice its
/// resident use runs to several times the figure (measured: ~12 MiB of
/// growth at 1 MiB, ~30 MiB at 8 MiB, over 200 000 keys).
const INDEX_CACHE: u64 = 1 << 20;
/// Allowed growth of resident memory over each phase of [`DISTINCT`]
/// requests: sled's pages and write buffers (~12-15 MiB at [`INDEX_CACHE`]),
/// at most [`CAPACITY`] entries in memory (~0.5 KiB each, under 1 MiB), and
/// slack for the allocator. Measured: 19 MiB over the credentials, 0.4 MiB
/// over the subjects. Without the caps, 100 000 remembered credentials
/// alone take ~45 MiB (450 bytes each) on top of sled's, past the bound.
const BOUND: u64 = 32 << 20;

/// This process's resident memory in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// Sends `n` requests, the i-th built by `request(i)` (each one distinct),
/// [`CONCURRENCY`] at a time over keep-alive connections; checks that each
/// is answered `want` and reads its body; returns how much this process's
/// resident memory grew meanwhile (saturating at 0).
async fn rss_growth<F>(n: usize, want: StatusCode, request: F) -> u64
where
    F: Fn(usize) -> RequestBuilder + Send + Sync + 'static,
{
    let before = rss_bytes();
    let request = Arc::new(request);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (request, next) = (request.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let resp = Api::send(request(i)).await;
                assert_eq!(resp.status(), want, "request {i}");
                resp.bytes().await.expect("body");
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("request worker");
    }
    rss_bytes().saturating_sub(before)
}

/// The value of `name` on graft's `/metrics`, if graft exports it.
async fn metric(graft: &Graft, name: &str) -> Option<u64> {
    read_metric(&Api::for_graft(graft), name).await
}

/// Only warnings: the test harness keeps captured output in memory, and an
/// access-log line per request would be counted as graft's growth.
fn quiet_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_credentials_and_subjects_far_beyond_the_caps_leave_memory_bounded() {
    quiet_logs();
    let registry = Registry::start();
    let data = random_bytes(512);
    let digest = Api::for_registry(&registry)
        .push_blob("app", data.clone())
        .await;
    let graft = Graft::start_with(&registry, |c| {
        c.cache.auth_cache_capacity = CAPACITY;
        c.referrers.recent_checks_capacity = CAPACITY;
        // Remembered fallback-tag checks only exist with a TTL.
        c.referrers.tag_ttl = std::time::Duration::from_secs(3600);
        c.index.cache_bytes = INDEX_CACHE;
    });
    let api = Api::for_graft(&graft);
    assert_eq!(api.get_blob("app", &digest).await, data, "cached");

    // Credentials: HEADs of the cached blob, each with its own token.
    let path = format!("/v2/app/blobs/{digest}");
    let credentials = {
        let api = api.clone();
        move |round: &'static str| {
            let (api, path) = (api.clone(), path.clone());
            move |i: usize| {
                api.head(&path)
                    .header("authorization", format!("Bearer {round}-{i}"))
            }
        }
    };
    // Warm up connections, pools and allocator arenas (and fill the
    // remembered yeses to capacity) before measuring.
    rss_growth(WARMUP, StatusCode::OK, credentials("warm")).await;
    let checks = metric(&graft, "graft_auth_checks_total").await.unwrap_or(0);
    let started = Instant::now();
    let growth = rss_growth(DISTINCT, StatusCode::OK, credentials("run")).await;
    eprintln!(
        "{DISTINCT} distinct credentials in {:?}: resident memory grew {} KiB",
        started.elapsed(),
        growth >> 10
    );
    assert_eq!(
        metric(&graft, "graft_auth_checks_total").await,
        Some(checks + DISTINCT as u64),
        "every credential was new to graft and checked upstream"
    );
    let entries = metric(&graft, "graft_auth_remembered_entries").await;
    assert!(
        entries.is_some_and(|n| n <= CAPACITY),
        "{entries:?} authorizations remembered, capacity {CAPACITY}"
    );
    assert!(
        growth < BOUND,
        "resident memory grew {} KiB over {DISTINCT} credentials (bound {} KiB)",
        growth >> 10,
        BOUND >> 10
    );

    // Subjects: referrers queries, each for a subject graft never saw; each
    // reads the fallback tag upstream and is remembered for the tag TTL.
    let subjects = move |round: &'static str| {
        let api = api.clone();
        move |i: usize| {
            let subject = graft_digest(&format!("{round}-{i}"));
            api.get(&format!("/v2/app/referrers/{subject}"))
        }
    };
    rss_growth(WARMUP, StatusCode::OK, subjects("warm")).await;
    let started = Instant::now();
    let growth = rss_growth(DISTINCT, StatusCode::OK, subjects("run")).await;
    eprintln!(
        "{DISTINCT} distinct subjects in {:?}: resident memory grew {} KiB",
        started.elapsed(),
        growth >> 10
    );
    let remembered = metric(&graft, "graft_referrers_recent_checks").await;
    assert!(
        remembered.is_some_and(|n| n > 0 && n <= CAPACITY),
        "{remembered:?} fallback-tag checks remembered, capacity {CAPACITY}"
    );
    assert!(
        growth < BOUND,
        "resident memory grew {} KiB over {DISTINCT} subjects (bound {} KiB)",
        growth >> 10,
        BOUND >> 10
    );
}

/// `sha256:<hex>` of `text`: a well-formed digest nobody pushed.
fn graft_digest(text: &str) -> String {
    use sha2::Digest as _;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    )
}
