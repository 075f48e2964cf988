//! The `graft` binary: `graft serve` with flags proxies to the upstream and
//! exits cleanly on SIGTERM.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::api::expect_status;
use common::{free_port, wait_until, Api, Registry, TestImage};
use reqwest::StatusCode;

/// The child process, killed if the test fails before it exits.
struct ServeProcess(Child);

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `graft serve` answers `/healthz`, failing with its log if it
/// exits or never listens.
async fn wait_listening(api: &Api, graft: &mut ServeProcess, read_log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.get("/healthz").send().await.is_err() {
        let exited = graft.0.try_wait().expect("poll graft");
        assert!(
            exited.is_none(),
            "graft serve exited with {exited:?}:\n{}",
            read_log()
        );
        assert!(
            Instant::now() < deadline,
            "graft serve never listened:\n{}",
            read_log()
        );
        // Polling a port that is not open yet: there is no event to wait on.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn graft_serve_proxies_with_flags_and_exits_zero_on_sigterm() {
    let registry = Registry::start();
    let work = tempfile::tempdir().expect("work dir");
    let listen = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(work.path().join("graft.log")).expect("log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_graft"));
    command
        .args([
            "serve",
            "--listen",
            &listen,
            "--upstream",
            &registry.url(),
            "--data-dir",
        ])
        .arg(work.path().join("data"))
        .current_dir(work.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log"))
        .stderr(log);
    // Settings from the environment would change what is under test.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GRAFT_") {
            command.env_remove(key);
        }
    }
    let mut graft = ServeProcess(command.spawn().expect("spawn graft serve"));
    let read_log = || std::fs::read_to_string(work.path().join("graft.log")).unwrap_or_default();

    let api = Api::new(&format!("http://{listen}"));
    wait_listening(&api, &mut graft, read_log).await;

    let image = TestImage::build(1);
    api.push_image("bin/app", "v1", &image).await;
    assert_eq!(api.get_manifest("bin/app", "v1").await, image.manifest);
    let ready = Api::send(api.get("/readyz")).await;
    expect_status(ready, StatusCode::OK, "readyz").await;
    assert!(
        work.path().join("data").is_dir(),
        "--data-dir is where graft keeps its data"
    );

    let term = Command::new("kill")
        .args(["-TERM", &graft.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(term.success());
    let mut status = None;
    wait_until(
        Duration::from_secs(10),
        "graft serve to exit after SIGTERM",
        || {
            status = graft.0.try_wait().expect("poll graft");
            status.is_some()
        },
    );
    let status = status.expect("exit status");
    assert!(status.success(), "exit status {status}:\n{}", read_log());
}

#[test]
fn a_bad_configuration_prints_one_line_per_bad_key_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("graft.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"not an address\"\nshutdown_grace = \"soon\"\n[upstream]\nurl = \"ftp://x\"\n[nonsense]\nkey = 1\n",
    )
    .expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_graft"))
        .args(["serve", "--config"])
        .arg(&file)
        .args(["--log-format", "yaml"])
        .output()
        .expect("run graft");
    assert_eq!(out.status.code(), Some(2), "exit status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 5, "one line per bad key:\n{stderr}");
    for key in [
        "server.listen",
        "server.shutdown_grace",
        "upstream.url",
        "nonsense.key",
        "log.format",
    ] {
        assert!(stderr.contains(key), "{key} not reported:\n{stderr}");
    }
}

#[tokio::test]
async fn credentials_never_reach_the_logs_even_at_trace_level() {
    let registry = Registry::start_with(
        common::RegistryOptions::default().basic_auth("alice", "pa55-w0rd-xyz"),
    );
    let work = tempfile::tempdir().expect("work dir");
    let listen = format!("127.0.0.1:{}", free_port());
    let log_path = work.path().join("graft.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_graft"));
    command
        .args([
            "serve",
            "--listen",
            &listen,
            "--upstream",
            &registry.url(),
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(work.path().join("data"))
        .current_dir(work.path())
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log"))
        .stderr(log);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GRAFT_") {
            command.env_remove(key);
        }
    }
    let mut graft = ServeProcess(command.spawn().expect("spawn graft serve"));
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let api = Api::new(&format!("http://{listen}"));
    wait_listening(&api, &mut graft, read_log).await;
    let alice = api.clone().with_basic_auth("alice", "pa55-w0rd-xyz");
    let image = TestImage::build(1);
    alice.push_image("app", "v1", &image).await;
    alice.get_manifest("app", "v1").await;
    alice.get_blob("app", &image.layers[0].digest).await;
    let wrong = api.clone().with_basic_auth("alice", "wrong-pa55-abc");
    let _ = Api::send(
        wrong
            .get("/v2/app/manifests/v1")
            .header("x-request-id", "wrong-password-probe"),
    )
    .await;

    // The access line of the last request is written once its body is done.
    wait_until(Duration::from_secs(10), "the last access line", || {
        std::fs::read_to_string(&log_path).is_ok_and(|text| {
            text.lines()
                .any(|l| l.contains("graft::access") && l.contains("wrong-password-probe"))
        })
    });
    let text = std::fs::read_to_string(&log_path).expect("log");
    assert!(text.contains("graft::access"), "the access log is there");
    for secret in [
        "pa55-w0rd-xyz",
        "wrong-pa55-abc",
        "YWxpY2U6cGE1NS13MHJkLXh5eg",
    ] {
        assert!(!text.contains(secret), "`{secret}` appeared in the logs");
    }
}
