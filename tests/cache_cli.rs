//! `graft cache stats|gc|verify|warm`, run as the binary against a real
//! distribution 2.8 registry: warming a multi-platform image and pulling it
//! with the upstream stopped, verify dropping a corrupt file, gc holding a
//! budget by least recent use, stats matching the disk, and the commands
//! that open the data directory refusing one a running graft holds.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use bytes::Bytes;
use common::api::expect_status;
use common::artifacts::graft_command;
use common::image::{OCI_INDEX, OCI_MANIFEST};
use common::{header_str, random_bytes, Api, Graft, Registry, TestImage};
use reqwest::StatusCode;
use serde_json::json;

/// Runs `graft cache <args>` in a scratch directory.
fn graft_cache(args: &[&str]) -> Output {
    let work = tempfile::tempdir().expect("work dir");
    graft_command(work.path())
        .arg("cache")
        .args(args)
        .output()
        .expect("run graft cache")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Fails with both streams when the exit code is not `code`.
fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}\nstdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
}

/// Stops graft, so a command may open its data directory.
fn stop(graft: &mut Graft) {
    graft.begin_shutdown();
    graft
        .wait_stopped(Duration::from_secs(20))
        .expect("graft stops cleanly");
}

/// `<data dir>/blobs/sha256/<aa>/<hex>` of `digest`.
fn cache_path(data_dir: &Path, digest: &str) -> std::path::PathBuf {
    data_dir
        .join("blobs/sha256")
        .join(&digest[7..9])
        .join(&digest[7..])
}

/// The committed files of a cache: (count, bytes).
fn files_on_disk(data_dir: &Path) -> (usize, u64) {
    let mut count = 0;
    let mut bytes = 0;
    for shard in std::fs::read_dir(data_dir.join("blobs/sha256")).expect("cache dir") {
        for f in std::fs::read_dir(shard.expect("shard").path()).expect("shard dir") {
            count += 1;
            bytes += f.expect("file").metadata().expect("metadata").len();
        }
    }
    (count, bytes)
}

/// Pushes an image's blobs and its manifest by digest (a platform of an
/// index has no tag of its own).
async fn push_untagged(api: &Api, repo: &str, image: &TestImage) {
    for blob in image.blobs() {
        api.push_blob(repo, blob.data.clone()).await;
    }
    api.push_manifest(repo, &image.digest, OCI_MANIFEST, image.manifest.clone())
        .await;
}

/// Pulls a manifest and every blob it names by digest, checking the bytes.
async fn pull_by_digest(api: &Api, repo: &str, image: &TestImage) {
    assert_eq!(
        api.get_manifest(repo, &image.digest).await,
        image.manifest,
        "{repo}@{}",
        image.digest
    );
    for blob in image.blobs() {
        assert_eq!(
            api.get_blob(repo, &blob.digest).await,
            blob.data,
            "{repo} blob {}",
            blob.digest
        );
    }
}

#[tokio::test]
async fn cache_warm_then_pulls_of_a_multi_platform_image_work_with_the_upstream_stopped() {
    let mut registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let amd64 = TestImage::build(2);
    let arm64 = TestImage::build(1);
    push_untagged(&direct, "app", &amd64).await;
    push_untagged(&direct, "app", &arm64).await;
    let mut amd64_entry = amd64.descriptor();
    amd64_entry["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    let mut arm64_entry = arm64.descriptor();
    arm64_entry["platform"] = json!({ "architecture": "arm64", "os": "linux" });
    let index = Bytes::from(
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [amd64_entry, arm64_entry],
        }))
        .expect("index JSON"),
    );
    direct
        .push_manifest("app", "v1", OCI_INDEX, index.clone())
        .await;
    // A second image, named by digest.
    let tools = TestImage::build(1);
    push_untagged(&direct, "tools", &tools).await;

    let graft = Graft::start(&registry);
    let tools_ref = format!("tools@{}", tools.digest);
    let out = graft_cache(&["warm", "app:v1", &tools_ref, "--graft", &graft.url()]);
    assert_exit(&out, 0, "graft cache warm");
    let blob_bytes: usize = [&amd64, &arm64, &tools]
        .iter()
        .flat_map(|i| i.blobs())
        .map(|b| b.data.len())
        .sum();
    let manifest_bytes =
        index.len() + amd64.manifest.len() + arm64.manifest.len() + tools.manifest.len();
    let total = blob_bytes + manifest_bytes;
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!(
            "images: 2\nmanifests: 4\nblobs: 7\nbytes: {total} ("
        )),
        "{text}"
    );

    // The CI runner's pulls, with the upstream gone.
    registry.stop();
    let api = Api::for_graft(&graft);
    let resp = Api::send(
        api.get("/v2/app/manifests/v1")
            .header("accept", format!("{OCI_INDEX}, {OCI_MANIFEST}")),
    )
    .await;
    let resp = expect_status(resp, StatusCode::OK, "index by tag, offline").await;
    assert_eq!(
        header_str(resp.headers(), "content-type").as_deref(),
        Some(OCI_INDEX)
    );
    assert_eq!(resp.bytes().await.expect("index body"), index);
    pull_by_digest(&api, "app", &amd64).await;
    pull_by_digest(&api, "app", &arm64).await;
    pull_by_digest(&api, "tools", &tools).await;

    // What was not warmed cannot be fetched now, and warm says so.
    let out = graft_cache(&["warm", "app:v2", "--graft", &graft.url()]);
    assert_exit(&out, 1, "warm of an uncached tag, offline");
    let text = stdout(&out);
    assert!(
        text.contains(
            "\nnot warmed: app:v2: GET /v2/app/manifests/v2: graft answered 502 Bad Gateway: \
             UNAVAILABLE: upstream registry unreachable"
        ),
        "{text}"
    );
    let out = graft_cache(&["warm", "registry.example:5000/app:v1"]);
    assert_exit(&out, 2, "a reference with a registry host");
    assert!(
        stderr(&out).contains("is not <repository>:<tag> or <repository>@<digest>"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn cache_verify_removes_a_corrupt_file_and_exits_1_then_0_when_clean() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let good = direct.push_blob("app", random_bytes(5000)).await;
    let bad = direct.push_blob("app", random_bytes(7000)).await;
    let mut graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    api.get_blob("app", &good).await;
    api.get_blob("app", &bad).await;
    stop(&mut graft);

    let path = cache_path(graft.data_dir(), &bad);
    let mut bytes = std::fs::read(&path).expect("cached file");
    bytes[100] ^= 0x55;
    std::fs::write(&path, bytes).expect("corrupt it");

    let data_dir = graft.data_dir().to_str().expect("UTF-8 path");
    let out = graft_cache(&["verify", "--data-dir", data_dir]);
    assert_exit(&out, 1, "verify with a corrupt file");
    assert_eq!(
        stdout(&out),
        format!(
            "corrupt, removed: {bad}  7000 bytes\n\
             checked: 2 files, 12000 bytes (11.72 KiB)\n\
             corrupt: 1\n"
        )
    );
    assert!(!path.exists(), "the corrupt file was removed");
    assert!(cache_path(graft.data_dir(), &good).is_file());

    let out = graft_cache(&["verify", "--data-dir", data_dir]);
    assert_exit(&out, 0, "verify of a clean cache");
    assert_eq!(
        stdout(&out),
        "checked: 1 files, 5000 bytes (4.88 KiB)\ncorrupt: 0\n"
    );
    // The index followed the files: one entry left.
    let out = graft_cache(&["stats", "--data-dir", data_dir]);
    assert_exit(&out, 0, "stats after verify");
    assert!(stdout(&out).starts_with("entries: 1\n"), "{}", stdout(&out));
}

#[tokio::test]
async fn cache_gc_below_the_size_removes_the_least_recently_used_files() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let mut digests = Vec::new();
    for _ in 0..4 {
        digests.push(direct.push_blob("app", random_bytes(100_000)).await);
    }
    let mut graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    for d in &digests {
        api.get_blob("app", d).await;
        // Access times are kept to the millisecond: the next read must
        // come in a later one for the order to be strict.
        next_millisecond();
    }
    // Reading the oldest again makes it the most recently used; the read
    // is recorded in memory and written when graft stops.
    api.get_blob("app", &digests[0]).await;
    stop(&mut graft);

    let data_dir = graft.data_dir().to_str().expect("UTF-8 path");
    let out = graft_cache(&["gc", "--data-dir", data_dir, "--max-bytes", "250000"]);
    assert_exit(&out, 0, "gc below the size");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with(&format!(
            "removed {}  100000 bytes  last access ",
            digests[1]
        )),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "removed {}  100000 bytes  last access ",
            digests[2]
        )),
        "{text}"
    );
    assert_eq!(lines[2], "removed: 2 files, 200000 bytes (195.31 KiB)");
    assert_eq!(
        lines[3],
        "cache: 2 entries, 200000 bytes (195.31 KiB) of a 250000 (244.14 KiB) budget"
    );
    let graft_dir = graft.data_dir();
    assert!(cache_path(graft_dir, &digests[0]).is_file());
    assert!(cache_path(graft_dir, &digests[3]).is_file());
    assert!(!cache_path(graft_dir, &digests[1]).exists());
    assert!(!cache_path(graft_dir, &digests[2]).exists());
    assert_eq!(files_on_disk(graft_dir), (2, 200_000));

    // Within the budget, gc removes nothing.
    let out = graft_cache(&["gc", "--data-dir", data_dir, "--max-bytes", "250000"]);
    assert_exit(&out, 0, "gc within the budget");
    assert!(
        stdout(&out).starts_with("removed: 0 files, 0 bytes"),
        "{}",
        stdout(&out)
    );
    let out = graft_cache(&["gc", "--data-dir", data_dir, "--max-bytes", "lots"]);
    assert_exit(&out, 2, "a malformed --max-bytes");
    assert!(stderr(&out).contains("cache.max_bytes"), "{}", stderr(&out));
}

#[tokio::test]
async fn cache_stats_match_the_files_on_disk() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let image = TestImage::build(3);
    direct.push_image("app", "v1", &image).await;
    let mut graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    api.get_manifest("app", "v1").await;
    for blob in image.blobs() {
        api.get_blob("app", &blob.digest).await;
    }
    stop(&mut graft);

    let (files, bytes) = files_on_disk(graft.data_dir());
    assert_eq!(files, 5, "manifest, config and 3 layers");
    let data_dir = graft.data_dir().to_str().expect("UTF-8 path");
    let out = graft_cache(&["stats", "--data-dir", data_dir]);
    assert_exit(&out, 0, "stats");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert_eq!(lines[0], "entries: 5");
    assert!(
        lines[1].starts_with(&format!("bytes in use: {bytes} (")),
        "{text}"
    );
    assert!(
        lines[2].starts_with("budget: 10737418240 (10.00 GiB), 0.0% used"),
        "{text}"
    );
    assert!(lines[3].starts_with("oldest access: 20"), "{text}");
    assert!(lines[4].starts_with("newest access: 20"), "{text}");
    assert_eq!(lines[5], format!("files on disk: 5 ({bytes} bytes)"));
}

#[tokio::test]
async fn cache_commands_refuse_a_data_directory_a_running_graft_holds() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let digest = direct.push_blob("app", random_bytes(1000)).await;
    let graft = Graft::start(&registry);
    // An answer shows graft is up, and so holds the index.
    let api = Api::for_graft(&graft);
    api.get_blob("app", &digest).await;

    let data_dir = graft.data_dir().to_str().expect("UTF-8 path");
    for command in ["stats", "gc", "verify"] {
        let started = std::time::Instant::now();
        let out = graft_cache(&[command, "--data-dir", data_dir]);
        assert_exit(&out, 1, command);
        assert!(
            stderr(&out).contains(&format!("graft cache {command}: index at "))
                && stderr(&out).contains("is in use by another graft process (stop it first)"),
            "{command}: {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{command} printed a report");
        assert!(started.elapsed() < Duration::from_secs(20));
    }
    // graft's cache is untouched and still serves.
    assert!(cache_path(graft.data_dir(), &digest).is_file());
    assert_eq!(api.get_blob("app", &digest).await.len(), 1000);

    let missing = tempfile::tempdir().expect("dir");
    let nowhere = missing.path().join("not-a-data-dir");
    let out = graft_cache(&["stats", "--data-dir", nowhere.to_str().expect("UTF-8")]);
    assert_exit(&out, 1, "stats of a missing data directory");
    assert!(
        stderr(&out).contains("no graft data directory at"),
        "{}",
        stderr(&out)
    );
    assert!(!nowhere.exists(), "stats created the directory");
}

/// Returns once the wall clock has moved on to another millisecond.
fn next_millisecond() {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis()
    };
    let start = now();
    while now() == start {
        std::hint::spin_loop();
    }
}
