//! Crash safety of referrer pushes (DESIGN.md, "Failure model"): graft
//! dies right after the upstream accepted a push with `subject` — before it
//! indexed the referrer or wrote the fallback tag — and after a restart the
//! referrer is in both.
//!
//! The crash is the `after-upstream-accept` failpoint (feature
//! `failpoints`), which aborts the process as abruptly as a SIGKILL, so
//! graft runs here as its own process: the real binary.

#![cfg(feature = "failpoints")]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::artifacts::{
    artifact, expected_descriptor, graft_command, push_subject, referrer_list, referrers,
    upstream_fallback_digests, MANIFEST,
};
use common::{free_port, sha256_digest, Api, Registry};
use reqwest::StatusCode;

/// `graft serve` as a child process; `Drop` kills and reaps it, also when
/// the test panics.
struct ServeProcess {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl ServeProcess {
    /// Starts `graft serve` on a free loopback port with `data_dir`, with
    /// `failpoint` armed when given, and waits until it answers.
    async fn start(registry: &Registry, work: &Path, failpoint: Option<&str>) -> ServeProcess {
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = work.join(format!("graft-{}.log", addr.port()));
            let out = std::fs::File::create(&log).expect("log file");
            let mut command = graft_command(work);
            command
                .args(["serve", "--listen", &addr.to_string()])
                .args(["--upstream", &registry.url()])
                .arg("--data-dir")
                .arg(work.join("data"))
                .stdout(Stdio::from(out.try_clone().expect("clone log")))
                .stderr(Stdio::from(out));
            // The recovery assertion reads an info line.
            command.env("RUST_LOG", "info");
            if let Some(f) = failpoint {
                command.env("GRAFT_FAILPOINT", f);
            }
            let mut process = ServeProcess {
                child: command.spawn().expect("spawn graft serve"),
                addr,
                log,
            };
            if process.wait_listening().await {
                return process;
            }
            // Lost the port to someone else: try another.
        }
        panic!("graft serve never listened");
    }

    /// Whether it answers `/healthz`; false when it exited (port taken).
    async fn wait_listening(&mut self) -> bool {
        let api = Api::new(&self.url());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if api.get("/healthz").send().await.is_ok() {
                return true;
            }
            if self.child.try_wait().expect("poll graft").is_some() {
                let log = self.log_text();
                assert!(
                    log.contains("cannot listen"),
                    "graft serve exited at startup:\n{log}"
                );
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "graft serve never listened:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to end on its own and reports whether it died
    /// abnormally (the failpoint aborts).
    fn wait_aborted(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll graft") {
                return !status.success();
            }
            assert!(
                Instant::now() < deadline,
                "graft did not stop at the failpoint:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_crash_between_the_upstream_accept_and_the_tag_write_loses_nothing() {
    let registry = Registry::start();
    let upstream = Api::for_registry(&registry);
    let work = tempfile::tempdir().expect("work dir");

    let mut doomed =
        ServeProcess::start(&registry, work.path(), Some("after-upstream-accept")).await;
    let api = Api::new(&doomed.url());
    // No `subject`: the failpoint is not on this path.
    let subject = push_subject(&api, "app", "v1").await;
    let sig = artifact(
        &subject,
        Some("application/vnd.example.sig"),
        None,
        Some(serde_json::json!({"com.example.key": "k1"})),
    );
    let digest = sha256_digest(&sig);
    let push = api
        .request(reqwest::Method::PUT, &format!("/v2/app/manifests/{digest}"))
        .header("content-type", MANIFEST)
        .body(sig.to_vec())
        .send()
        .await;
    assert!(
        push.is_err(),
        "the push was answered although graft died: {push:?}"
    );
    assert!(doomed.wait_aborted(Duration::from_secs(10)));
    assert!(
        doomed
            .log_text()
            .contains("failpoint `after-upstream-accept` reached"),
        "{}",
        doomed.log_text()
    );
    drop(doomed);

    // The upstream took the referrer; nobody wrote the fallback tag.
    let stored = Api::send(
        upstream
            .get(&format!("/v2/app/manifests/{digest}"))
            .header("accept", MANIFEST),
    )
    .await;
    assert_eq!(
        stored.status(),
        StatusCode::OK,
        "the upstream has the referrer"
    );
    assert!(
        upstream_fallback_digests(&upstream, "app", &subject)
            .await
            .is_empty(),
        "the fallback tag was written before the crash"
    );

    // Restarted on the same data directory, graft finishes the push.
    let graft = ServeProcess::start(&registry, work.path(), None).await;
    let api = Api::new(&graft.url());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tag = upstream_fallback_digests(&upstream, "app", &subject).await;
        if tag == vec![digest.clone()] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upstream fallback tag still lists {tag:?}:\n{}",
            graft.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(list, vec![expected_descriptor(&sig)]);
    // Listed from graft's index, not only from the tag it wrote: the log
    // shows the recovery of the interrupted push.
    assert!(
        graft
            .log_text()
            .contains("recovering a referrer the upstream accepted before a restart"),
        "{}",
        graft.log_text()
    );
}

#[tokio::test]
async fn a_crash_between_the_upstream_delete_and_the_tag_rewrite_leaves_no_ghost() {
    let registry = Registry::start();
    let upstream = Api::for_registry(&registry);
    let work = tempfile::tempdir().expect("work dir");

    // Index a referrer through a healthy graft first.
    let graft = ServeProcess::start(&registry, work.path(), None).await;
    let api = Api::new(&graft.url());
    let subject = push_subject(&api, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let digest = sha256_digest(&sig);
    api.push_manifest("app", &digest, MANIFEST, sig.clone())
        .await;
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        vec![digest.clone()]
    );
    drop(graft);

    // Then delete it through a graft that dies right after the upstream's 202.
    let mut doomed =
        ServeProcess::start(&registry, work.path(), Some("after-upstream-delete")).await;
    let api = Api::new(&doomed.url());
    let delete = api
        .delete(&format!("/v2/app/manifests/{digest}"))
        .send()
        .await;
    assert!(
        delete.is_err(),
        "the delete was answered although graft died: {delete:?}"
    );
    assert!(doomed.wait_aborted(Duration::from_secs(10)));
    drop(doomed);
    let gone = Api::send(
        upstream
            .get(&format!("/v2/app/manifests/{digest}"))
            .header("accept", MANIFEST),
    )
    .await;
    assert_eq!(
        gone.status(),
        StatusCode::NOT_FOUND,
        "the upstream deleted it"
    );
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        vec![digest.clone()],
        "the tag was rewritten before the crash"
    );

    // After a restart graft finishes the delete: tag and API agree.
    let graft = ServeProcess::start(&registry, work.path(), None).await;
    let api = Api::new(&graft.url());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !upstream_fallback_digests(&upstream, "app", &subject)
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the fallback tag still lists the deleted referrer:\n{}",
            graft.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        referrer_list(referrers(&api, "app", &subject.digest, "").await)
            .await
            .is_empty()
    );
}
