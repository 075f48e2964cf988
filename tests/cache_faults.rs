//! The cache against a sick environment: upstream bodies that stall, cache
//! files changed behind graft's back, and a data directory that runs out
//! of space. Each fault ends in a whole, correct body or in a body that
//! fails (never a clean end with wrong bytes), and nothing bad stays cached.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::api::expect_status;
use common::shim::{Fault, Shim};
use common::{random_bytes, read_metric, settle, Api, Graft, Registry};
use reqwest::StatusCode;

/// Blob GETs the registry answered for `repo`.
fn blob_gets(registry: &Registry, repo: &str) -> usize {
    registry.count_requests("GET", &format!("/v2/{repo}/blobs/"))
}

async fn metric(api: &Api, name: &str) -> u64 {
    read_metric(api, name)
        .await
        .unwrap_or_else(|| panic!("graft exports no {name}"))
}

/// Reads a body to its end; `Err` when it ends in an error.
async fn read_all(resp: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    resp.bytes().await
}

/// The committed file of `digest` under graft's data directory.
fn cache_file(data_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Temp files of fills in progress (or left behind).
fn temp_files(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("blobs/tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_stalled_body_aborts_the_leader_and_follower_in_time_and_the_next_pull_starts_afresh() {
    let registry = Registry::start();
    let data = Bytes::from(random_bytes(4 << 20));
    let digest = Api::for_registry(&registry)
        .push_blob("app", data.clone())
        .await;
    let shim = Shim::start(&registry.host(), Fault::StallAfter(1 << 20));
    let graft = Graft::start_for_upstream(&shim.url(), |c| {
        c.upstream.body_timeout = Duration::from_secs(2);
    });
    let api = Api::for_graft(&graft);
    let path = format!("/v2/app/blobs/{digest}");

    let leader = expect_status(Api::send(api.get(&path)).await, StatusCode::OK, "leader").await;
    let follower = expect_status(Api::send(api.get(&path)).await, StatusCode::OK, "follower").await;
    // A bound far past the 2 s timeout, only so a regression fails instead
    // of hanging: the bodies must end in an error, not cleanly.
    let (led, followed) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(read_all(leader), read_all(follower))
    })
    .await
    .expect("the stalled bodies were never aborted");
    assert!(led.is_err(), "the leader's body ended cleanly");
    assert!(followed.is_err(), "the follower's body ended cleanly");
    assert_eq!(metric(&api, "graft_cache_fills_failed_total").await, 1);
    common::eventually(Duration::from_secs(10), "the temp file removed", || async {
        temp_files(graft.data_dir()) == 0
    })
    .await;

    // The upstream heals: the next pull is a fresh fetch, not the dead one.
    shim.set_fault(Fault::None);
    assert_eq!(api.get_blob("app", &digest).await, data);
    assert_eq!(temp_files(graft.data_dir()), 0);
    assert!(
        cache_file(graft.data_dir(), &digest).is_file(),
        "not cached"
    );
}

#[tokio::test]
async fn a_cache_file_changed_while_graft_was_stopped_is_refetched_never_served() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let flipped = Bytes::from(random_bytes(300_000));
    let truncated = Bytes::from(random_bytes(300_000));
    let d_flipped = direct.push_blob("app", flipped.clone()).await;
    let d_truncated = direct.push_blob("app", truncated.clone()).await;
    let mut graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    for (d, data) in [(&d_flipped, &flipped), (&d_truncated, &truncated)] {
        assert_eq!(&api.get_blob("app", d).await, data);
    }
    common::eventually(Duration::from_secs(10), "both blobs cached", || async {
        cache_file(graft.data_dir(), &d_flipped).is_file()
            && cache_file(graft.data_dir(), &d_truncated).is_file()
    })
    .await;

    graft.begin_shutdown();
    graft
        .wait_stopped(Duration::from_secs(30))
        .expect("graft stopped cleanly");
    let path = cache_file(graft.data_dir(), &d_flipped);
    let mut bytes = std::fs::read(&path).expect("read the cached file");
    bytes[150_000] ^= 0xff;
    std::fs::write(&path, bytes).expect("flip one byte");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(cache_file(graft.data_dir(), &d_truncated))
        .expect("open for truncation");
    file.set_len(1_000).expect("truncate");
    drop(file);
    graft.restart();
    let api = Api::for_graft(&graft);

    settle(&registry).await;
    let before = blob_gets(&registry, "app");
    for (d, data) in [(&d_flipped, &flipped), (&d_truncated, &truncated)] {
        let resp = Api::send(api.get(&format!("/v2/app/blobs/{d}"))).await;
        let resp = expect_status(resp, StatusCode::OK, "pull after restart").await;
        assert_eq!(
            resp.content_length(),
            Some(data.len() as u64),
            "Content-Length of {d}"
        );
        assert_eq!(
            &read_all(resp).await.expect("whole body"),
            data,
            "bytes of {d}"
        );
    }
    settle(&registry).await;
    assert_eq!(blob_gets(&registry, "app"), before + 2, "both refetched");
    assert_eq!(metric(&api, "graft_cache_corrupt_total").await, 2);
    // The refetched copies are good, and served as hits from now on.
    for (d, data) in [(&d_flipped, &flipped), (&d_truncated, &truncated)] {
        assert_eq!(&api.get_blob("app", d).await, data);
    }
    settle(&registry).await;
    assert_eq!(
        blob_gets(&registry, "app"),
        before + 2,
        "hits after refetch"
    );
}

/// A small tmpfs mounted on a temp dir: a real file system that fills up.
/// Mounting needs root, which CI on Debian has; without it these tests fail
/// with this message rather than pass without testing anything. `Drop`
/// unmounts (lazily, so open files cannot keep it), failed test or not.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::Builder::new()
            .prefix("graft-small-disk-")
            .tempdir()
            .expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "THIS TEST NEEDS ROOT: it mounts a {size} tmpfs to fill a real file system \
             (CI runs as root). mount said: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the file system is full.
    fn fill_up(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler")).expect("filler");
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0u8; 512]);
        let _ = f.sync_all();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_blob_larger_than_the_free_space_reaches_three_concurrent_clients_whole() {
    let disk = SmallDisk::mount("20m");
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let big = Bytes::from(random_bytes(30 << 20));
    let small = Bytes::from(random_bytes(1 << 20));
    let d_big = direct.push_blob("app", big.clone()).await;
    let d_small = direct.push_blob("app", small.clone()).await;
    let data_dir = disk.path().to_path_buf();
    let graft = Graft::start_with(&registry, |c| {
        c.storage.data_dir = data_dir;
        c.cache.max_bytes = 1 << 30;
        c.cache.min_free = 1 << 20;
    });
    let api = Api::for_graft(&graft);
    let pulls = (0..3).map(|_| {
        let api = api.clone();
        let d = d_big.clone();
        async move { api.get_blob("app", &d).await }
    });
    for got in futures_util::future::join_all(pulls).await {
        assert!(
            got == big,
            "a client got {} of {} bytes",
            got.len(),
            big.len()
        );
    }
    assert!(metric(&api, "graft_cache_fills_skipped_total").await >= 1);
    assert_eq!(temp_files(disk.path()), 0, "temp files left");
    assert!(!cache_file(disk.path(), &d_big).exists());
    // What fits is still cached.
    assert_eq!(api.get_blob("app", &d_small).await, small);
    common::eventually(Duration::from_secs(10), "the small blob cached", || async {
        cache_file(disk.path(), &d_small).is_file()
    })
    .await;
}

#[tokio::test]
async fn on_a_full_disk_graft_starts_and_serves_and_cache_gc_frees_space() {
    let disk = SmallDisk::mount("8m");
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let cached = Bytes::from(random_bytes(1 << 20));
    let d_cached = direct.push_blob("app", cached.clone()).await;
    let fresh = Bytes::from(random_bytes(3 << 20));
    let d_fresh = direct.push_blob("app", fresh.clone()).await;
    let data_dir = disk.path().to_path_buf();
    let mut graft = Graft::start_with(&registry, |c| {
        c.storage.data_dir = data_dir;
        c.cache.min_free = 0;
    });
    let api = Api::for_graft(&graft);
    assert_eq!(api.get_blob("app", &d_cached).await, cached);
    common::eventually(Duration::from_secs(10), "the blob cached", || async {
        cache_file(disk.path(), &d_cached).is_file()
    })
    .await;
    graft.begin_shutdown();
    graft
        .wait_stopped(Duration::from_secs(30))
        .expect("graft stopped cleanly");

    disk.fill_up();
    graft.restart();
    // A new client: the old one's pooled connection died with the restart.
    let api = Api::for_graft(&graft);
    let health = Api::send(api.get("/healthz")).await;
    assert_eq!(health.status(), StatusCode::OK, "graft up on a full disk");
    assert_eq!(api.get_blob("app", &d_fresh).await, fresh, "pass-through");
    assert_eq!(api.get_blob("app", &d_cached).await, cached, "cached blob");
    graft.begin_shutdown();
    graft
        .wait_stopped(Duration::from_secs(30))
        .expect("graft stopped cleanly");

    let work = tempfile::tempdir().expect("work dir");
    let graft_cache = |args: &[&str]| {
        let out = common::artifacts::graft_command(work.path())
            .arg("cache")
            .args(args)
            .arg("--data-dir")
            .arg(disk.path())
            .output()
            .expect("run graft cache");
        assert!(
            out.status.success(),
            "graft cache {args:?} on a full disk failed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    graft_cache(&["stats"]);
    let verified = graft_cache(&["verify"]);
    assert!(verified.contains("checked: 1 files"), "{verified}");
    graft_cache(&["gc", "--max-bytes", "0"]);
    assert!(
        !cache_file(disk.path(), &d_cached).exists(),
        "gc removed nothing"
    );
}

#[tokio::test]
async fn a_disk_that_fills_up_mid_fill_does_not_cut_the_clients_bodies() {
    let disk = SmallDisk::mount("24m");
    let registry = Registry::start();
    let data = Bytes::from(random_bytes(12 << 20));
    let digest = Api::for_registry(&registry)
        .push_blob("app", data.clone())
        .await;
    // Slow enough that the disk can be filled while the fill runs.
    let shim = Shim::start(&registry.host(), Fault::Throttle(4 << 20));
    let data_dir = disk.path().to_path_buf();
    let graft = Graft::start_for_upstream(&shim.url(), |c| {
        c.storage.data_dir = data_dir;
        c.cache.max_bytes = 1 << 30;
        c.cache.min_free = 0;
    });
    let api = Api::for_graft(&graft);
    let path = format!("/v2/app/blobs/{digest}");
    let mut leader = expect_status(Api::send(api.get(&path)).await, StatusCode::OK, "leader").await;
    let first = leader
        .chunk()
        .await
        .expect("the leader's first bytes")
        .expect("a first chunk");
    let follower = expect_status(Api::send(api.get(&path)).await, StatusCode::OK, "follower").await;
    assert_eq!(metric(&api, "graft_cache_coalesced_waiters_total").await, 1);

    disk.fill_up();
    let (rest, followed) = tokio::join!(read_all(leader), read_all(follower));
    let mut led = first.to_vec();
    led.extend_from_slice(&rest.expect("the leader's whole body"));
    let followed = followed.expect("the follower's whole body");
    assert!(
        led == data,
        "the leader got {} of {} bytes",
        led.len(),
        data.len()
    );
    assert!(
        followed == data,
        "the follower got {} of {} bytes",
        followed.len(),
        data.len()
    );

    assert_eq!(metric(&api, "graft_cache_fills_failed_total").await, 1);
    assert!(
        !cache_file(disk.path(), &digest).exists(),
        "cached from a full disk"
    );
    common::eventually(Duration::from_secs(10), "the temp file removed", || async {
        temp_files(disk.path()) == 0
    })
    .await;
    // Room again: the next pull fills the cache as usual.
    std::fs::remove_file(disk.path().join("filler")).expect("remove the filler");
    shim.set_fault(Fault::None);
    assert_eq!(api.get_blob("app", &digest).await, data);
    common::eventually(Duration::from_secs(10), "the blob cached", || async {
        cache_file(disk.path(), &digest).is_file()
    })
    .await;
}

#[tokio::test]
async fn eviction_keeps_free_space_above_min_free_even_within_the_budget() {
    let disk = SmallDisk::mount("24m");
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let mut blobs = Vec::new();
    for _ in 0..3 {
        let data = Bytes::from(random_bytes(4 << 20));
        blobs.push((direct.push_blob("app", data.clone()).await, data));
    }
    let data_dir = disk.path().to_path_buf();
    let clock = graft::clock::Clock::skewable();
    let graft = Graft::start_with(&registry, |c| {
        c.storage.data_dir = data_dir;
        c.cache.max_bytes = 1 << 30;
        c.cache.min_free = 8 << 20;
        c.clock = clock.clone();
    });
    let api = Api::for_graft(&graft);
    for (d, data) in &blobs {
        assert_eq!(&api.get_blob("app", d).await, data);
        common::eventually(Duration::from_secs(10), "the blob cached", || async {
            cache_file(disk.path(), d).is_file()
        })
        .await;
        // Access times are kept to the millisecond: each pull a later one.
        clock.advance(Duration::from_millis(5));
    }
    // Something else takes 9 MiB of the ~12 MiB left: free space drops
    // below the 8 MiB floor although the budget is far away. Eviction
    // frees the least recently used files until the floor holds again.
    std::fs::write(disk.path().join("other"), vec![1u8; 9 << 20]).expect("other data");
    common::eventually(
        Duration::from_secs(30),
        "the two oldest evicted",
        || async {
            !cache_file(disk.path(), &blobs[0].0).exists()
                && !cache_file(disk.path(), &blobs[1].0).exists()
        },
    )
    .await;
    assert!(
        cache_file(disk.path(), &blobs[2].0).is_file(),
        "the newest went too"
    );
    assert!(metric(&api, "graft_cache_evictions_total").await >= 2);
}

#[tokio::test]
async fn concurrent_fills_past_the_budget_stream_uncached_and_the_budget_holds() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let mut blobs = Vec::new();
    for _ in 0..5 {
        let data = Bytes::from(random_bytes(4 << 20));
        blobs.push((direct.push_blob("app", data.clone()).await, data));
    }
    // Slow, so the five fills overlap.
    let shim = Shim::start(&registry.host(), Fault::Throttle(8 << 20));
    let graft = Graft::start_for_upstream(&shim.url(), |c| {
        c.cache.max_bytes = 10 << 20;
        c.cache.min_free = 0;
    });
    let api = Api::for_graft(&graft);
    let pulls = blobs.iter().map(|(d, data)| {
        let api = api.clone();
        async move { api.get_blob("app", d).await == *data }
    });
    let whole = futures_util::future::join_all(pulls).await;
    assert!(
        whole.iter().all(|w| *w),
        "a client got wrong or partial bytes"
    );
    // Five 4 MiB fills cannot be in flight at once under a 10 MiB budget.
    assert!(metric(&api, "graft_cache_fills_skipped_total").await >= 1);
    common::eventually(Duration::from_secs(30), "within the budget", || async {
        metric(&api, "graft_cache_bytes").await <= 10 << 20
    })
    .await;
    assert_eq!(metric(&api, "graft_cache_reserved_bytes").await, 0);
    assert_eq!(temp_files(graft.data_dir()), 0);
}
