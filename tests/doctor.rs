//! `graft doctor` (the real binary) against the real registry set up
//! several ways: plain, DELETE disabled, htpasswd, TLS, Bearer tokens, and
//! nothing listening at all.

mod common;

use std::path::Path;
use std::process::Command;

use common::token::{Grant, ALL};
use common::{free_port, Registry, RegistryOptions, TokenOptions, TokenService};
use serde_json::Value;

const USER: &str = "doctor";
const PASSWORD: &str = "doctor-test-password";

/// What one run printed and how it ended.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("--json output is not JSON ({e}):\n{}", self.stdout))
    }

    /// The check called `name` in the JSON report: (status, detail).
    fn check(&self, name: &str) -> (String, String) {
        let json = self.json();
        let c = json["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` check in\n{}", self.stdout));
        (
            c["status"].as_str().unwrap_or_default().to_owned(),
            c["detail"].as_str().unwrap_or_default().to_owned(),
        )
    }

    fn statuses(&self) -> Vec<(String, String)> {
        self.json()["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or_default().to_owned(),
                    c["status"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

/// Runs `graft doctor --upstream <url> <args>` in an empty directory, with
/// no GRAFT_* variables and an empty docker config, so nothing of the
/// machine's leaks in.
fn doctor(url: &str, args: &[&str]) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_graft"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GRAFT_") {
            command.env_remove(key);
        }
    }
    let out = command
        .current_dir(dir.path())
        .env("DOCKER_CONFIG", dir.path())
        .args(["doctor", "--upstream", url, "--timeout", "10s"])
        .args(args)
        .output()
        .expect("run graft doctor");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "graft doctor {url} {args:?} → {}\n{}{}",
        run.code, run.stdout, run.stderr
    );
    run
}

/// Exit 0 and every check passed, except tag pagination: distribution 2.8
/// ignores `n` on tags/list (pagination of tags came with distribution 3),
/// which the doctor reports as a warning — graft reads listings whole then.
fn assert_all_pass(run: &Run) {
    assert_eq!(run.code, 0, "exit code:\n{}", run.stdout);
    for (name, status) in run.statuses() {
        if name == "tag-pagination" {
            assert_eq!(
                status, "warn",
                "distribution 2.8 ignores n:\n{}",
                run.stdout
            );
            assert!(
                run.check(&name).1.contains("`n` is ignored"),
                "{}",
                run.stdout
            );
        } else {
            assert_eq!(status, "pass", "check {name}:\n{}", run.stdout);
        }
    }
}

/// Whether the registry still holds a manifest tagged `tag` in the probe
/// repository (its storage is on disk, no credentials needed).
fn probe_tag_exists(registry: &Registry, tag: &str) -> bool {
    registry
        .storage_dir()
        .join("docker/registry/v2/repositories/graft-doctor/probe/_manifests/tags")
        .join(tag)
        .exists()
}

#[test]
fn a_plain_registry_passes_every_check_and_the_probe_is_cleaned_up() {
    let registry = Registry::start();
    let run = doctor(&registry.url(), &["--json"]);
    assert_all_pass(&run);
    let names: Vec<String> = run.statuses().into_iter().map(|(n, _)| n).collect();
    for expected in [
        "reachable",
        "tls",
        "auth",
        "catalog",
        "push",
        "referrers",
        "tag-pagination",
        "unknown-index",
        "delete",
        "round-trip",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    assert!(run.check("auth").1.starts_with("none"), "{}", run.stdout);
    assert!(run.check("referrers").1.contains("404"), "{}", run.stdout);
    assert!(
        run.check("unknown-index")
            .1
            .contains("MANIFEST_BLOB_UNKNOWN"),
        "{}",
        run.stdout
    );
    assert!(!probe_tag_exists(&registry, "probe-a"), "probe left behind");
    assert!(!probe_tag_exists(&registry, "probe-b"), "probe left behind");
    // The registry really received the write probes.
    assert!(registry.count_requests("DELETE", "/v2/graft-doctor/probe/manifests/") >= 1);

    // The plain-words form says the same.
    let text = doctor(&registry.url(), &[]);
    assert_eq!(text.code, 0);
    assert!(
        text.stdout.contains("graft can serve this registry fully"),
        "{}",
        text.stdout
    );
    assert!(!text.stdout.contains("FAIL"), "{}", text.stdout);
    assert!(
        text.stdout.contains("warn  tag-pagination"),
        "{}",
        text.stdout
    );
}

#[test]
fn a_registry_with_delete_disabled_fails_and_says_so() {
    let registry = Registry::start_with(RegistryOptions::default().delete_disabled());
    let run = doctor(&registry.url(), &[]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout.contains("FAIL  delete")
            && run.stdout.contains("DELETE of manifests is disabled"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("cannot serve this registry fully"));
    let json = doctor(&registry.url(), &["--json"]);
    assert_eq!(json.check("delete").0, "fail");
    // Everything else still works against it.
    assert_eq!(json.check("push").0, "pass");
    assert_eq!(json.check("unknown-index").0, "pass");
    // Nothing could be removed: the probe stays, as the report says.
    assert!(probe_tag_exists(&registry, "probe-a"));
}

#[test]
fn htpasswd_needs_the_account_and_passes_with_it() {
    let registry = Registry::start_with(RegistryOptions::default().basic_auth(USER, PASSWORD));

    let without = doctor(&registry.url(), &["--json"]);
    assert_eq!(without.code, 1, "{}", without.stdout);
    let (status, detail) = without.check("auth");
    assert_eq!(status, "fail");
    assert!(
        detail.starts_with("Basic") && detail.contains("none were given"),
        "{detail}"
    );

    let wrong = doctor(
        &registry.url(),
        &[
            "--json",
            "--upstream-username",
            USER,
            "--upstream-password",
            "nope",
        ],
    );
    assert_eq!(wrong.code, 1);
    assert!(
        wrong.check("auth").1.contains("refused"),
        "{}",
        wrong.stdout
    );

    let with = doctor(
        &registry.url(),
        &[
            "--json",
            "--upstream-username",
            USER,
            "--upstream-password",
            PASSWORD,
        ],
    );
    assert_all_pass(&with);
    assert!(with.check("auth").1.starts_with("Basic"), "{}", with.stdout);

    // The same account from a docker config.json entry for the registry.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.json");
    write_docker_config(&config, &registry.host());
    let from_file = doctor(
        &registry.url(),
        &[
            "--json",
            "--docker-config",
            config.to_str().expect("utf-8 path"),
        ],
    );
    assert_all_pass(&from_file);
}

fn write_docker_config(path: &Path, host: &str) {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let json = serde_json::json!({ "auths": { host: { "auth": auth } } });
    std::fs::write(path, json.to_string()).expect("write docker config");
}

#[test]
fn tls_is_verified_with_the_ca_and_fails_without_it() {
    let registry = Registry::start_with(RegistryOptions::default().tls());
    let ca = registry.ca_file().expect("test CA");
    let ca = ca.to_str().expect("utf-8 path");

    let without = doctor(&registry.url(), &["--json"]);
    assert_eq!(without.code, 1, "{}", without.stdout);
    let (status, detail) = without.check("tls");
    assert_eq!(status, "fail");
    assert!(detail.contains("--upstream-ca-file"), "{detail}");

    let with = doctor(&registry.url(), &["--json", "--upstream-ca-file", ca]);
    assert_all_pass(&with);
    let detail = with.check("tls").1;
    assert!(
        detail.contains("verified") && detail.contains(ca),
        "{detail}"
    );
}

#[test]
fn bearer_tokens_are_fetched_from_the_realm_for_the_probe() {
    let service = TokenService::start(TokenOptions::default().user(
        USER,
        PASSWORD,
        &[Grant::new("*", ALL), Grant::new("registry:catalog", &["*"])],
    ));
    let registry =
        Registry::start_with(RegistryOptions::default().token_auth(service.registry_auth()));

    let with = doctor(
        &registry.url(),
        &[
            "--json",
            "--upstream-username",
            USER,
            "--upstream-password",
            PASSWORD,
        ],
    );
    assert_all_pass(&with);
    let detail = with.check("auth").1;
    assert!(
        detail.starts_with("Bearer") && detail.contains(&service.realm()),
        "{detail}"
    );

    // Anonymous tokens are refused by this service: no account, no upkeep.
    let without = doctor(&registry.url(), &["--json"]);
    assert_eq!(without.code, 1, "{}", without.stdout);
    assert_eq!(without.check("auth").0, "fail");
}

#[test]
fn nothing_listening_exits_2() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let run = doctor(&url, &[]);
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(run.stdout.contains("FAIL  reachable"), "{}", run.stdout);
    assert!(
        run.stdout.contains("could not be reached"),
        "{}",
        run.stdout
    );

    let bad = doctor(&url, &["--timeout", "soon"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("--timeout"), "{}", bad.stderr);
}
