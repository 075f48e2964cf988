//! Blob uploads through graft in front of distribution 2.8: chunks answered
//! per the spec where distribution is not ("Pushing a blob in chunks"),
//! sessions answered for only to the client that started them, digests the
//! upstream cannot keep refused, and abandoned sessions holding neither
//! descriptors nor temp files.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha512};

use common::api::{expect_status, location};
use common::{
    assert_oci_error, eventually, free_port, header_str, random_bytes, read_metric, settle,
    sha256_digest, wait_until, Api, Graft, Registry, RegistryOptions,
};

fn sha512_digest(data: &[u8]) -> String {
    format!("sha512:{}", hex::encode(Sha512::digest(data)))
}

async fn patch(api: &Api, at: &str, start: usize, data: &[u8]) -> reqwest::Response {
    let req = api
        .request(Method::PATCH, at)
        .header("content-type", "application/octet-stream")
        .header(
            "content-range",
            format!("{start}-{}", start + data.len() - 1),
        )
        .body(data.to_vec());
    Api::send(req).await
}

async fn put(api: &Api, at: &str, digest: &str, data: &[u8]) -> reqwest::Response {
    let req = api
        .request(Method::PUT, at)
        .query(&[("digest", digest)])
        .header("content-type", "application/octet-stream")
        .body(data.to_vec());
    Api::send(req).await
}

/// Asserts a session status (`GET` 204 or a refused chunk's 416) as the
/// spec words it, on graft's address; returns its `Location`.
fn assert_status(
    resp: &reqwest::Response,
    graft: &Graft,
    status: StatusCode,
    range: &str,
) -> String {
    assert_eq!(resp.status(), status);
    assert_eq!(header_str(resp.headers(), "range").as_deref(), Some(range));
    let at = location(resp);
    assert!(
        at.starts_with(&graft.url()),
        "Location {at} is not on graft"
    );
    let uuid = header_str(resp.headers(), "docker-upload-uuid").expect("Docker-Upload-UUID");
    assert!(at.contains(&uuid), "Location {at} names upload {uuid}");
    at
}

#[tokio::test]
async fn a_chunk_that_does_not_continue_the_upload_gets_416_and_the_upload_recovers() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let data = random_bytes(30_000);
    let at0 = api.start_upload("app").await;
    let first = expect_status(
        patch(&api, &at0, 0, &data[..10_000]).await,
        StatusCode::ACCEPTED,
        "first chunk",
    )
    .await;
    let at1 = location(&first);

    // Out of order: it skips bytes.
    let skip = patch(&api, &at1, 20_000, &data[20_000..]).await;
    let told = assert_status(&skip, &graft, StatusCode::RANGE_NOT_SATISFIABLE, "0-9999");
    assert_eq!(told, at1, "the 416 points at the latest Location");
    // The previous chunk again, with the latest Location and with the POST's.
    for at in [&at1, &at0] {
        let again = patch(&api, at, 0, &data[..10_000]).await;
        assert_status(&again, &graft, StatusCode::RANGE_NOT_SATISFIABLE, "0-9999");
    }
    // A Content-Range that is no range at all.
    let req = api
        .request(Method::PATCH, &at1)
        .header("content-type", "application/octet-stream")
        .header("content-range", "bytes=oops")
        .body(data[10_000..20_000].to_vec());
    assert_status(
        &Api::send(req).await,
        &graft,
        StatusCode::RANGE_NOT_SATISFIABLE,
        "0-9999",
    );

    // The client resumes where the 416 said, even with the POST's Location
    // (distribution alone answers 404 to a Location a chunk old), and the
    // blob is intact.
    let second = patch(&api, &at0, 10_000, &data[10_000..20_000]).await;
    let second = expect_status(second, StatusCode::ACCEPTED, "resumed chunk").await;
    assert_eq!(
        header_str(second.headers(), "range").as_deref(),
        Some("0-19999")
    );
    let digest = sha256_digest(&data);
    let done = put(&api, &location(&second), &digest, &data[20_000..]).await;
    expect_status(done, StatusCode::CREATED, "final PUT with the last chunk").await;
    assert_eq!(api.get_blob("app", &digest).await, data);
    settle(&registry).await;
    assert_eq!(
        registry.count_requests("GET", &format!("/v2/app/blobs/{digest}")),
        0,
        "the refused chunks left the write-through copy intact"
    );
    let direct = Api::for_registry(&registry);
    assert_eq!(
        direct.get_blob("app", &digest).await,
        data,
        "the upstream holds the same bytes"
    );
}

#[tokio::test]
async fn upload_status_answers_204_with_location_and_range_for_any_location_graft_gave() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let at0 = api.start_upload("app").await;
    let status = Api::send(api.get(&at0)).await;
    assert_status(&status, &graft, StatusCode::NO_CONTENT, "0-0");
    let chunk = random_bytes(5000);
    let first = expect_status(
        patch(&api, &at0, 0, &chunk).await,
        StatusCode::ACCEPTED,
        "chunk",
    )
    .await;
    let at1 = location(&first);
    // distribution alone answers 404 to the older Location; graft knows the session.
    for at in [&at0, &at1] {
        let status = Api::send(api.get(at)).await;
        let latest = assert_status(&status, &graft, StatusCode::NO_CONTENT, "0-4999");
        assert_eq!(latest, at1, "the status points at the latest Location");
    }
}

#[tokio::test]
async fn graft_answers_for_a_session_only_to_the_client_that_started_it() {
    let registry = Registry::start_with(RegistryOptions::default().basic_auth("alice", "s3cret"));
    let graft = Graft::start(&registry);
    let alice = Api::for_graft(&graft).with_basic_auth("alice", "s3cret");
    let mallory = Api::for_graft(&graft).with_basic_auth("alice", "guess");
    let at = alice.start_upload("app").await;
    let first = expect_status(
        patch(&alice, &at, 0, &random_bytes(100)).await,
        StatusCode::ACCEPTED,
        "chunk",
    )
    .await;
    let at = location(&first);

    // Other credentials with the right URL: the upstream's answer, not graft's.
    assert_eq!(
        Api::send(mallory.get(&at)).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let probe = patch(&mallory, &at, 50, &random_bytes(10)).await;
    assert_eq!(probe.status(), StatusCode::UNAUTHORIZED);
    // The right credentials with a `_state` graft never handed out pass through too.
    let (path, _) = at.split_once('?').expect("a _state");
    let forged = format!("{path}?_state=forged");
    let from_graft = Api::send(alice.get(&forged)).await;
    let direct = Api::for_registry(&registry).with_basic_auth("alice", "s3cret");
    let (_, direct_path) = path.split_once("/v2/").expect("a /v2/ path");
    let from_registry = Api::send(direct.get(&format!("/v2/{direct_path}?_state=forged"))).await;
    assert_eq!(from_graft.status(), from_registry.status());
    assert_ne!(from_graft.status(), StatusCode::NO_CONTENT);

    // The owner still gets graft's answers.
    let status = Api::send(alice.get(&at)).await;
    assert_status(&status, &graft, StatusCode::NO_CONTENT, "0-99");
}

/// The same requests straight at the registry and through graft, where
/// distribution answers to spec or graft does not know the session.
#[tokio::test]
async fn where_distribution_answers_right_graft_answers_the_same() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    for api in [Api::for_registry(&registry), Api::for_graft(&graft)] {
        let data = random_bytes(12_000);
        let at = api.start_upload("same").await;
        let first = expect_status(
            patch(&api, &at, 0, &data[..6000]).await,
            StatusCode::ACCEPTED,
            "chunk",
        )
        .await;
        assert_eq!(
            header_str(first.headers(), "range").as_deref(),
            Some("0-5999")
        );
        let at = location(&first);
        let status = expect_status(
            Api::send(api.get(&at)).await,
            StatusCode::NO_CONTENT,
            "status",
        )
        .await;
        assert_eq!(
            header_str(status.headers(), "range").as_deref(),
            Some("0-5999")
        );
        let second = expect_status(
            patch(&api, &at, 6000, &data[6000..]).await,
            StatusCode::ACCEPTED,
            "chunk",
        )
        .await;
        let digest = sha256_digest(&data);
        let done = expect_status(
            put(&api, &location(&second), &digest, &[]).await,
            StatusCode::CREATED,
            "PUT",
        )
        .await;
        assert_eq!(
            header_str(done.headers(), "docker-content-digest"),
            Some(digest.clone())
        );
        assert_eq!(api.get_blob("same", &digest).await, data);

        // Cancelled: the session is gone, for graft too.
        let at = api.start_upload("same").await;
        expect_status(
            Api::send(api.delete(&at)).await,
            StatusCode::NO_CONTENT,
            "cancel",
        )
        .await;
        assert_oci_error(
            Api::send(api.get(&at)).await,
            404,
            Some("BLOB_UPLOAD_UNKNOWN"),
        )
        .await;
    }

    // A session started straight at the registry: graft passes it through.
    let direct = Api::for_registry(&registry);
    let at = direct.start_upload("same").await;
    let on_graft = at.replacen(&registry.url(), &graft.url(), 1);
    assert_ne!(at, on_graft);
    let via_graft = Api::for_graft(&graft);
    let status = expect_status(
        Api::send(via_graft.get(&on_graft)).await,
        StatusCode::NO_CONTENT,
        "status",
    )
    .await;
    assert_eq!(
        header_str(status.headers(), "range").as_deref(),
        Some("0-0")
    );
}

#[tokio::test]
async fn a_digest_the_upstream_stores_under_another_algorithm_is_refused_and_not_cached() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let data = Bytes::from(random_bytes(20_000));
    let (sha512, sha256) = (sha512_digest(&data), sha256_digest(&data));

    let at = api.start_upload("algo").await;
    let refused = put(&api, &at, &sha512, &data).await;
    let body = assert_oci_error(refused, 400, Some("DIGEST_INVALID")).await;
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("does not support digest algorithm sha512"),
        "{message}"
    );

    // Nothing cached under either digest: the read goes to the upstream.
    assert_eq!(graft_cache_files(&graft), 0);
    settle(&registry).await;
    let before = registry.count_requests("GET", "/v2/algo/blobs/");
    assert_eq!(api.get_blob("algo", &sha256).await, data);
    settle(&registry).await;
    assert_eq!(
        registry.count_requests("GET", "/v2/algo/blobs/"),
        before + 1
    );

    // A sha512 digest the upstream never saw: 404, as straight at it.
    let unknown = sha512_digest(b"never pushed");
    for api in [Api::for_registry(&registry), Api::for_graft(&graft)] {
        let resp = Api::send(api.get(&format!("/v2/algo/blobs/{unknown}"))).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{}", api.base_url());
    }

    // A monolithic POST with a sha512 digest: distribution opens a session
    // instead (202), through graft as straight at it.
    for api in [Api::for_registry(&registry), Api::for_graft(&graft)] {
        let post = api
            .request(Method::POST, "/v2/algo/blobs/uploads/")
            .query(&[("digest", sha512.as_str())])
            .header("content-type", "application/octet-stream")
            .body(data.clone());
        let post = Api::send(post).await;
        assert_eq!(post.status(), StatusCode::ACCEPTED, "{}", api.base_url());
    }

    // A sha256 push is untouched.
    let ok = put(&api, &api.start_upload("algo").await, &sha256, &data).await;
    expect_status(ok, StatusCode::CREATED, "sha256 PUT").await;
}

/// Files committed under the cache's content directory.
fn graft_cache_files(graft: &Graft) -> usize {
    count_files(&graft.data_dir().join("blobs/sha256"))
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                count_files(&path)
            } else {
                1
            }
        })
        .sum()
}

#[tokio::test]
async fn an_abandoned_upload_s_temp_file_is_deleted_after_the_idle_timeout() {
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |c| {
        c.clock = graft::clock::Clock::skewable();
    });
    let api = Api::for_graft(&graft);
    let at = api.start_upload("idle").await;
    expect_status(
        patch(&api, &at, 0, &random_bytes(50_000)).await,
        StatusCode::ACCEPTED,
        "chunk",
    )
    .await;
    let tmp = graft.data_dir().join("blobs/tmp");
    assert_eq!(count_files(&tmp), 1, "the chunk is teed into a temp file");
    assert_eq!(
        read_metric(&api, "graft_cache_upload_sessions").await,
        Some(1)
    );

    // Idle for 9 minutes, then asked about: graft still knows it (distribution
    // alone answers 404 to the POST's Location, which is a chunk old).
    let clock = &graft.config().clock;
    for _ in 0..2 {
        clock.advance(Duration::from_secs(9 * 60));
        let status = Api::send(api.get(&at)).await;
        assert_status(&status, &graft, StatusCode::NO_CONTENT, "0-49999");
    }
    let dropped = read_metric(&api, "graft_cache_upload_sessions_dropped_total").await;
    clock.advance(Duration::from_secs(11 * 60));
    eventually(
        Duration::from_secs(20),
        "the idle session's temp file to go",
        || async { count_files(&tmp) == 0 },
    )
    .await;
    assert_eq!(
        read_metric(&api, "graft_cache_upload_sessions").await,
        Some(0)
    );
    assert_eq!(
        read_metric(&api, "graft_cache_upload_sessions_dropped_total").await,
        dropped.map(|d| d + 1)
    );
    // Forgotten by graft: the upstream's own answer to the old Location.
    let status = Api::send(api.get(&at)).await;
    assert_eq!(status.status(), StatusCode::NOT_FOUND);
}

/// `graft serve` as a child process under a low descriptor limit.
struct Limited {
    child: Child,
    work: tempfile::TempDir,
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Limited {
    fn start(registry: &Registry, nofile: u32) -> (Limited, Api) {
        let work = tempfile::tempdir().expect("work dir");
        let listen = format!("127.0.0.1:{}", free_port());
        let config = work.path().join("graft.toml");
        std::fs::write(&config, "[cache]\nupload_idle_timeout = \"2s\"\n").expect("config");
        let log = std::fs::File::create(work.path().join("graft.log")).expect("log");
        let mut command = Command::new(common::require_tool("prlimit"));
        command
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_graft"))
            .args([
                "serve",
                "--listen",
                &listen,
                "--upstream",
                &registry.url(),
                "--config",
            ])
            .arg(&config)
            .arg("--data-dir")
            .arg(work.path().join("data"))
            .current_dir(work.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("GRAFT_") {
                command.env_remove(key);
            }
        }
        let child = command.spawn().expect("spawn graft serve");
        (
            Limited { child, work },
            Api::new(&format!("http://{listen}")),
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.path().join("graft.log")).unwrap_or_default()
    }

    /// Open descriptors of the process (prlimit execs graft in its place).
    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("graft's /proc fd list: {e}\n{}", self.log()))
    }

    fn temp_files(&self) -> usize {
        count_files(&self.work.path().join("data/blobs/tmp"))
    }
}

#[tokio::test]
async fn three_hundred_abandoned_uploads_hold_no_descriptors_under_a_128_descriptor_limit() {
    let registry = Registry::start();
    let (graft, api) = Limited::start(&registry, 128);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while api.get("/healthz").send().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "graft never listened:\n{}",
            graft.log()
        );
        // Polling a port that is not open yet: there is no event to wait on.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cached = Bytes::from(random_bytes(100_000));
    let digest = api.push_blob("fd", cached.clone()).await;
    assert_eq!(api.get_blob("fd", &digest).await, cached);
    let baseline = graft.open_fds();

    for n in 0..300 {
        let at = api.start_upload("fd").await;
        // Some carry a chunk, so they own a temp file.
        if n % 10 == 0 {
            expect_status(
                patch(&api, &at, 0, &random_bytes(1000)).await,
                StatusCode::ACCEPTED,
                "chunk",
            )
            .await;
        }
    }
    let after = graft.open_fds();
    assert!(
        after <= baseline + 8,
        "descriptors grew from {baseline} to {after}"
    );
    let sessions = read_metric(&api, "graft_cache_upload_sessions")
        .await
        .expect("gauge");
    assert!(sessions <= 32, "{sessions} sessions kept for one client");

    // Cache hits and new connections are served.
    assert_eq!(api.get_blob("fd", &digest).await, cached);
    let fresh = Api::new(api.base_url());
    expect_status(
        Api::send(fresh.get("/healthz")).await,
        StatusCode::OK,
        "a new connection",
    )
    .await;
    settle(&registry).await;

    // Abandoned: idle past the (test's 2 s) timeout, their temp files go.
    wait_until(
        Duration::from_secs(30),
        "abandoned temp files to be deleted",
        || graft.temp_files() == 0,
    );
    assert!(graft.open_fds() <= baseline + 8);
}
