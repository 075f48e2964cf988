//! Side-by-side load harness for graft's hot paths, against a baseline run
//! in the same process: the same requests sent straight to the real
//! registry (distribution 2.8) that graft fronts.
//!
//! - a cached large blob (throughput, MiB/s),
//! - a cached manifest by digest (requests/s, 16 concurrent clients),
//! - a tag pull (HEAD revalidation + cached body).
//!
//! Results are printed as ratios `graft / distribution`; nothing here
//! asserts a time. `cargo bench --bench hot_paths` runs the full counts;
//! under `cargo test` (no `--bench` argument) it runs a few requests of each
//! so the harness itself stays tested. Every loop is bounded in count and
//! time; all servers bind 127.0.0.1 and are stopped at the end.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{random_bytes, Api, Graft, Registry, TestImage};

struct Scale {
    blob_bytes: usize,
    blob_rounds: usize,
    manifest_requests: usize,
    concurrency: usize,
    time_cap: Duration,
}

const FULL: Scale = Scale {
    blob_bytes: 100 << 20,
    blob_rounds: 10,
    manifest_requests: 20_000,
    concurrency: 16,
    time_cap: Duration::from_secs(30),
};

const SMOKE: Scale = Scale {
    blob_bytes: 4 << 20,
    blob_rounds: 2,
    manifest_requests: 64,
    concurrency: 4,
    time_cap: Duration::from_secs(10),
};

/// Streams a blob `rounds` times; returns bytes per second.
async fn blob_throughput(api: &Api, repo: &str, digest: &str, rounds: usize, cap: Duration) -> f64 {
    let started = Instant::now();
    let mut total = 0u64;
    for _ in 0..rounds {
        let (_, n) = api.blob_digest(repo, digest).await;
        total += n;
        if started.elapsed() > cap {
            break;
        }
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// `requests` GETs of `path` from `concurrency` clients; returns requests/s.
async fn request_rate(
    api: &Api,
    path: &str,
    accept: &str,
    requests: usize,
    concurrency: usize,
    cap: Duration,
) -> f64 {
    let started = Instant::now();
    let per_client = requests / concurrency;
    let clients = (0..concurrency).map(|_| {
        let api = api.clone();
        let path = path.to_owned();
        let accept = accept.to_owned();
        async move {
            let mut done = 0usize;
            for _ in 0..per_client {
                let resp = Api::send(api.get(&path).header("accept", &accept)).await;
                assert!(resp.status().is_success(), "{path}: {}", resp.status());
                resp.bytes().await.expect("body");
                done += 1;
                if started.elapsed() > cap {
                    break;
                }
            }
            done
        }
    });
    let done: usize = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .sum();
    done as f64 / started.elapsed().as_secs_f64()
}

fn report(what: &str, unit: &str, graft: f64, baseline: f64) {
    println!(
        "{what:<34} graft {graft:>10.1} {unit:<6} distribution {baseline:>10.1} {unit:<6} ratio {:.2}",
        graft / baseline
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if std::env::var_os("GRAFT_TEST_LOG").is_none() {
        // One access-log line per request would drown the results.
        std::env::set_var("GRAFT_TEST_LOG", "warn");
    }
    let scale = if full { FULL } else { SMOKE };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let registry = Registry::start();
        let direct = Api::for_registry(&registry);
        let blob = Bytes::from(random_bytes(scale.blob_bytes));
        let digest = direct.push_blob("bench", blob).await;
        let image = TestImage::build(1);
        direct.push_image("bench", "v1", &image).await;

        let graft = Graft::start_with(&registry, |c| {
            c.cache.auth_ttl = Duration::from_secs(3600);
        });
        let api = Api::for_graft(&graft);
        // Warm the cache.
        api.blob_digest("bench", &digest).await;
        api.get_manifest("bench", &image.digest).await;

        let mib = |bps: f64| bps / (1 << 20) as f64;
        let g = blob_throughput(&api, "bench", &digest, scale.blob_rounds, scale.time_cap).await;
        let d = blob_throughput(&direct, "bench", &digest, scale.blob_rounds, scale.time_cap).await;
        report(
            &format!("cached blob ({} MiB)", scale.blob_bytes >> 20),
            "MiB/s",
            mib(g),
            mib(d),
        );

        let accept = TestImage::MEDIA_TYPE;
        let by_digest = format!("/v2/bench/manifests/{}", image.digest);
        let g = request_rate(
            &api,
            &by_digest,
            accept,
            scale.manifest_requests,
            scale.concurrency,
            scale.time_cap,
        )
        .await;
        let d = request_rate(
            &direct,
            &by_digest,
            accept,
            scale.manifest_requests,
            scale.concurrency,
            scale.time_cap,
        )
        .await;
        report("manifest by digest", "req/s", g, d);

        let by_tag = "/v2/bench/manifests/v1";
        let g = request_rate(
            &api,
            by_tag,
            accept,
            scale.manifest_requests / 4,
            scale.concurrency,
            scale.time_cap,
        )
        .await;
        let d = request_rate(
            &direct,
            by_tag,
            accept,
            scale.manifest_requests / 4,
            scale.concurrency,
            scale.time_cap,
        )
        .await;
        report("manifest by tag (revalidated)", "req/s", g, d);
    });
}
