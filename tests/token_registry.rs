//! graft in front of a Bearer-token registry (distribution with `auth:
//! token`) and the test token service of `tests/common/token.rs`: clients
//! bring their own tokens through graft; graft fetches its own (user
//! `graft`) for recovery, owed tag writes, and tag writes a client's token
//! may not make; the client-side commands answer challenges themselves.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::artifacts::{
    artifact, digests_of, graft_command, push_by_digest, push_subject, referrer_list, referrers,
    upstream_fallback_digests, Subject,
};
use common::token::{Grant, ALL, DELETE_PULL, PULL, PUSH_PULL};
use common::{eventually, header_str, read_metric, require_tool};
use common::{Api, Graft, Registry, RegistryOptions, TestImage, TokenOptions, TokenService};
use reqwest::StatusCode;

const PASSWORD: &str = "token-test-password";
/// graft's own upstream account.
const GRAFT_USER: &str = "graft";
const WAIT: Duration = Duration::from_secs(30);

/// A token service with a pusher, a reader and a deleter on every
/// repository, and a registry that trusts it.
fn token_registry(options: TokenOptions) -> (TokenService, Registry) {
    let service = TokenService::start(
        options
            .user("pusher", PASSWORD, &[Grant::new("*", PUSH_PULL)])
            .user("reader", PASSWORD, &[Grant::new("*", PULL)])
            .user("deleter", PASSWORD, &[Grant::new("*", DELETE_PULL)])
            .user(
                GRAFT_USER,
                PASSWORD,
                &[Grant::new("*", ALL), Grant::new("registry:catalog", &["*"])],
            ),
    );
    let registry =
        Registry::start_with(RegistryOptions::default().token_auth(service.registry_auth()));
    (service, registry)
}

/// Fetches a token from the realm as a client would.
async fn fetch_token(service: &TokenService, user: &str, scope: &str) -> (StatusCode, String) {
    let response = Api::send(
        common::api::http_client(None)
            .get(service.realm())
            .query(&[("service", service.service()), ("scope", scope)])
            .basic_auth(user, Some(PASSWORD)),
    )
    .await;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        body["token"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn token_service_grants_only_the_allowed_part_of_a_scope() {
    let (service, _registry) = token_registry(TokenOptions::default());

    let (status, _) = fetch_token(&service, "reader", "repository:app/one:pull,push").await;
    assert_eq!(status, StatusCode::OK);
    let issued = service.issued();
    let last = issued.last().expect("a token was issued");
    assert_eq!(last.user.as_deref(), Some("reader"));
    assert_eq!(last.access.len(), 1);
    assert_eq!(last.access[0].name, "app/one");
    assert_eq!(last.access[0].actions, vec!["pull".to_owned()]);

    let refused = Api::send(
        common::api::http_client(None)
            .get(service.realm())
            .basic_auth("reader", Some("wrong")),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let anonymous = Api::send(common::api::http_client(None).get(service.realm())).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn pushes_and_pulls_through_graft_with_tokens_and_the_registry_refuses_a_pull_token_push() {
    let (service, registry) = token_registry(TokenOptions::default());
    let graft = Graft::start(&registry);

    // The registry's challenge reaches the client through graft unchanged.
    let challenge = Api::send(Api::for_graft(&graft).get("/v2/")).await;
    assert_eq!(challenge.status(), StatusCode::UNAUTHORIZED);
    let www = header_str(challenge.headers(), "www-authenticate").expect("a challenge");
    assert!(
        www.starts_with("Bearer ") && www.contains(&service.realm()),
        "challenge `{www}`"
    );

    let (_, push_token) = fetch_token(&service, "pusher", "repository:app/one:pull,push").await;
    let pusher = Api::for_graft(&graft).with_bearer(&push_token);
    let image = TestImage::build(1);
    pusher.push_image("app/one", "v1", &image).await;
    assert_eq!(pusher.get_manifest("app/one", "v1").await, image.manifest);

    let (_, pull_token) = fetch_token(&service, "reader", "repository:app/one:pull,push").await;
    let reader = Api::for_graft(&graft).with_bearer(&pull_token);
    assert_eq!(reader.get_manifest("app/one", "v1").await, image.manifest);
    for api in [
        reader.clone(),
        Api::for_registry(&registry).with_bearer(&pull_token),
    ] {
        let push =
            Api::send(api.request(reqwest::Method::POST, "/v2/app/one/blobs/uploads/")).await;
        assert_eq!(
            push.status(),
            StatusCode::UNAUTHORIZED,
            "{}",
            api.base_url()
        );
    }

    // Tokens minted directly: expired, or for another repository.
    let expired = service.mint(
        "pusher",
        &[common::token::Access::repository("app/one", PULL)],
        -120,
    );
    let other = service.mint_for("app/other", PULL);
    let access = [common::token::Access::repository("app/one", PULL)];
    let wrong_issuer = service.mint_with("pusher", &access, 300, |claims| {
        claims["iss"] = "someone-else".into();
    });
    let valid = Api::for_registry(&registry).with_bearer(&service.mint_for("app/one", PULL));
    assert_eq!(
        valid.get_manifest("app/one", &image.digest).await,
        image.manifest
    );
    for token in [expired, other, wrong_issuer] {
        let direct = Api::for_registry(&registry).with_bearer(&token);
        let response =
            Api::send(direct.get(&format!("/v2/app/one/manifests/{}", image.digest))).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn the_registry_takes_rs256_and_es256_tokens_alike() {
    for options in [TokenOptions::default(), TokenOptions::default().es256()] {
        let (service, registry) = token_registry(options);
        let graft = Graft::start(&registry);
        let pusher = client(&graft, &service, "pusher", "app/alg", "pull,push").await;
        let digest = pusher.push_blob("app/alg", b"signed".to_vec()).await;
        let direct = direct_reader(&registry, &service, "app/alg");
        assert_eq!(&direct.get_blob("app/alg", &digest).await[..], b"signed");
        let token = service.issued_to("pusher").pop().expect("a token");
        let header = token.split('.').next().expect("a JWT header");
        let header: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                .expect("base64url"),
        )
        .expect("JSON header");
        assert_eq!(header["alg"], service.algorithm());
        assert!(header["x5c"][0].is_string(), "{header}");
    }
}

#[tokio::test]
async fn skopeo_follows_the_token_challenge_through_graft() {
    let (service, registry) = token_registry(TokenOptions::default());
    let graft = Graft::start(&registry);
    let work = tempfile::tempdir().expect("work dir");
    let image = TestImage::build(2);
    let source = work.path().join("source");
    image.write_oci_layout(&source, "v1");
    let creds = format!("pusher:{PASSWORD}");
    let remote = format!("docker://{}/app/skopeo:v1", graft.host());

    let output = tokio::process::Command::new(require_tool("skopeo"))
        .args(["copy", "--insecure-policy", "--preserve-digests"])
        .args(["--dest-tls-verify=false"])
        .args(["--dest-creds", &creds])
        .arg(format!("oci:{}:v1", source.display()))
        .arg(&remote)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !service.issued_to("pusher").is_empty(),
        "skopeo fetched a token"
    );
    let (_, token) = fetch_token(&service, "reader", "repository:app/skopeo:pull").await;
    let direct = Api::for_registry(&registry).with_bearer(&token);
    assert_eq!(
        direct.get_manifest("app/skopeo", "v1").await,
        image.manifest
    );
}

/// A client of graft holding `user`'s token for `actions` on `repo`.
async fn client(
    graft: &Graft,
    service: &TokenService,
    user: &str,
    repo: &str,
    actions: &str,
) -> Api {
    let (status, token) = fetch_token(service, user, &format!("repository:{repo}:{actions}")).await;
    assert_eq!(status, StatusCode::OK, "token for {user}");
    Api::for_graft(graft).with_bearer(&token)
}

/// The registry itself, read with a pull token for `repo`.
fn direct_reader(registry: &Registry, service: &TokenService, repo: &str) -> Api {
    Api::for_registry(registry).with_bearer(&service.mint_for(repo, PULL))
}

fn with_account(config: &mut graft::Config) {
    config.upstream.username = Some(GRAFT_USER.to_owned());
    config.upstream.password = Some(PASSWORD.to_owned());
}

/// Fails when `text` holds one of the tokens issued to graft's account.
fn assert_no_graft_token(service: &TokenService, text: &str, what: &str) {
    for token in service.issued_to(GRAFT_USER) {
        assert!(
            !text.contains(&token),
            "graft's own token leaked into {what}"
        );
        // The signature alone would still be a usable leak.
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(
            !text.contains(signature),
            "graft's token signature in {what}"
        );
    }
}

/// Headers and body of a response as one text, for leak checks.
async fn response_text(response: reqwest::Response) -> String {
    let mut text = format!("{:?}\n", response.headers());
    text.push_str(&response.text().await.unwrap_or_default());
    text
}

/// A subject with two referrers pushed through graft by `pusher`; returns
/// the subject, the referrer to keep and the one to delete.
async fn subject_with_two_referrers(pusher: &Api, repo: &str) -> (Subject, String, String) {
    let subject = push_subject(pusher, repo, "v1").await;
    let keep = artifact(&subject, Some("application/vnd.example.sbom"), None, None);
    let doomed = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let keep = push_by_digest(pusher, repo, &keep).await;
    let doomed = push_by_digest(pusher, repo, &doomed).await;
    (subject, keep, doomed)
}

async fn wait_for_tag(direct: &Api, repo: &str, subject: &Subject, want: Vec<String>) {
    let mut want = want;
    want.sort();
    eventually(WAIT, "the upstream fallback tag", || {
        let want = want.clone();
        async move { upstream_fallback_digests(direct, repo, subject).await == want }
    })
    .await;
}

#[tokio::test]
async fn a_delete_with_a_delete_scoped_token_leaves_the_fallback_tag_right() {
    let (service, registry) = token_registry(TokenOptions::default());
    let graft = Graft::start_with(&registry, with_account);
    let repo = "app/deleted";
    let pusher = client(&graft, &service, "pusher", repo, "pull,push").await;
    let (subject, keep, doomed) = subject_with_two_referrers(&pusher, repo).await;
    let direct = direct_reader(&registry, &service, repo);
    wait_for_tag(&direct, repo, &subject, vec![keep.clone(), doomed.clone()]).await;

    // What `oras manifest delete` asks for: delete and pull, no push.
    let deleter = client(&graft, &service, "deleter", repo, "delete,pull").await;
    let deleted = Api::send(deleter.delete(&format!("/v2/{repo}/manifests/{doomed}"))).await;
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    let answer = response_text(deleted).await;

    wait_for_tag(&direct, repo, &subject, vec![keep.clone()]).await;
    let reader = client(&graft, &service, "reader", repo, "pull").await;
    let listed = Api::send(reader.get(&format!("/v2/{repo}/referrers/{}", subject.digest))).await;
    assert_eq!(listed.status(), StatusCode::OK);
    let listed = response_text(listed).await;
    assert!(
        listed.contains(&keep) && !listed.contains(&doomed),
        "{listed}"
    );

    assert!(
        !service.issued_to(GRAFT_USER).is_empty(),
        "graft wrote the tag with a token of its own"
    );
    assert_no_graft_token(&service, &answer, "the delete's answer");
    assert_no_graft_token(&service, &listed, "the referrers answer");
    let api = Api::for_graft(&graft);
    assert_eq!(
        read_metric(&api, "graft_tag_writes_unauthorized_total").await,
        Some(0)
    );

    // A second delete in the same repository reuses graft's cached tokens.
    let fetched = service.issued_to(GRAFT_USER).len();
    let again = artifact(&subject, Some("application/vnd.example.vex"), None, None);
    let again = push_by_digest(&pusher, repo, &again).await;
    wait_for_tag(&direct, repo, &subject, vec![keep.clone(), again.clone()]).await;
    let deleted = Api::send(deleter.delete(&format!("/v2/{repo}/manifests/{again}"))).await;
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    wait_for_tag(&direct, repo, &subject, vec![keep]).await;
    assert_eq!(
        service.issued_to(GRAFT_USER).len(),
        fetched,
        "tokens reused"
    );
}

#[tokio::test]
async fn without_an_account_a_refused_tag_write_stays_owed_until_graft_has_one() {
    let (service, registry) = token_registry(TokenOptions::default());
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_path_buf();
    let graft = Graft::start_with(&registry, |c| c.storage.data_dir = data_dir.clone());
    let repo = "app/owed";
    let pusher = client(&graft, &service, "pusher", repo, "pull,push").await;
    let (subject, keep, doomed) = subject_with_two_referrers(&pusher, repo).await;
    let direct = direct_reader(&registry, &service, repo);
    wait_for_tag(&direct, repo, &subject, vec![keep.clone(), doomed.clone()]).await;

    let deleter = client(&graft, &service, "deleter", repo, "delete,pull").await;
    let deleted = Api::send(deleter.delete(&format!("/v2/{repo}/manifests/{doomed}"))).await;
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    let api = Api::for_graft(&graft);
    eventually(WAIT, "the refused tag write counted", || async {
        read_metric(&api, "graft_tag_writes_unauthorized_total").await >= Some(1)
    })
    .await;
    // graft's own answer no longer lists it; the tag does, until written.
    let reader = client(&graft, &service, "reader", repo, "pull").await;
    let list = referrer_list(referrers(&reader, repo, &subject.digest, "").await).await;
    assert_eq!(digests_of(&list), vec![keep.clone()]);
    let mut both = vec![keep.clone(), doomed.clone()];
    both.sort();
    assert_eq!(
        upstream_fallback_digests(&direct, repo, &subject).await,
        both
    );
    assert!(service.issued_to(GRAFT_USER).is_empty());
    drop(graft);

    // With an account, the owed write is finished at startup.
    let data_dir = data.path().to_path_buf();
    let _graft = Graft::start_with(&registry, |c| {
        c.storage.data_dir = data_dir;
        with_account(c);
    });
    wait_for_tag(&direct, repo, &subject, vec![keep]).await;
}

/// `graft <args>` as the binary, in `work`.
fn run_graft(work: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = graft_command(work);
    command
        .args(args)
        .env_remove("DOCKER_CONFIG")
        .env("HOME", work);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run graft")
}

fn assert_success(out: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn reindex_cache_warm_and_referrers_work_against_the_token_registry() {
    let (service, registry) = token_registry(TokenOptions::default());
    let graft = Graft::start(&registry);
    let repo = "app/cli";
    let pusher = client(&graft, &service, "pusher", repo, "pull,push").await;
    let subject = push_subject(&pusher, repo, "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let sig_digest = push_by_digest(&pusher, repo, &sig).await;
    let direct = direct_reader(&registry, &service, repo);
    wait_for_tag(&direct, repo, &subject, vec![sig_digest.clone()]).await;
    let work = tempfile::tempdir().expect("work dir");
    let work = work.path();
    let subject_arg = format!("{repo}@{}", subject.digest);

    // reindex, with graft's account from the environment; without --repo
    // the catalog is read with a `registry:catalog:*` token.
    let data = work.join("reindexed");
    let data_arg = data.display().to_string();
    let args = [
        "reindex",
        "--upstream",
        &registry.url(),
        "--data-dir",
        &data_arg,
    ];
    let env = [
        ("GRAFT_UPSTREAM_USERNAME", GRAFT_USER),
        ("GRAFT_UPSTREAM_PASSWORD", PASSWORD),
    ];
    let out = assert_success(&run_graft(work, &args, &env), "graft reindex");
    assert_eq!(out, "repositories: 1\nsubjects: 1\nreferrers added: 1\n");
    assert!(!service.issued_to(GRAFT_USER).is_empty());

    // referrers with a token the client fetched itself.
    let (_, token) = fetch_token(&service, "reader", &format!("repository:{repo}:pull")).await;
    let args = [
        "referrers",
        &subject_arg,
        "--graft",
        &graft.url(),
        "--token",
        &token,
    ];
    let out = assert_success(&run_graft(work, &args, &[]), "graft referrers --token");
    assert!(out.contains(&sig_digest), "{out}");

    // referrers with docker's config.json: the command answers the
    // challenge graft passes on.
    let before = service.issued_to("reader").len();
    let config = work.join("docker-config.json");
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("reader:{PASSWORD}"))
    };
    let auths = serde_json::json!({"auths": {graft.host(): {"auth": auth}}});
    std::fs::write(&config, auths.to_string()).expect("write config.json");
    let config_arg = config.display().to_string();
    let args = [
        "referrers",
        &subject_arg,
        "--graft",
        &graft.url(),
        "--docker-config",
        &config_arg,
    ];
    let out = assert_success(
        &run_graft(work, &args, &[]),
        "graft referrers --docker-config",
    );
    assert!(out.contains(&sig_digest), "{out}");
    assert!(
        service.issued_to("reader").len() > before,
        "a token was fetched"
    );
    // The default place, ~/.docker/config.json, is read too.
    std::fs::create_dir_all(work.join(".docker")).expect("mkdir .docker");
    std::fs::copy(&config, work.join(".docker/config.json")).expect("copy config.json");
    let args = ["referrers", &subject_arg, "--graft", &graft.url()];
    let out = assert_success(
        &run_graft(work, &args, &[]),
        "graft referrers (default config)",
    );
    assert!(out.contains(&sig_digest), "{out}");

    // cache warm with a user and password.
    let image = format!("{repo}:v1");
    let args = [
        "cache",
        "warm",
        &image,
        "--graft",
        &graft.url(),
        "--username",
        "reader",
    ];
    let env = [("GRAFT_CLIENT_PASSWORD", PASSWORD)];
    let out = assert_success(&run_graft(work, &args, &env), "graft cache warm");
    assert!(out.starts_with("images: 1\n"), "{out}");
}

/// `graft serve` as a child process (a real process to abort, and a log to
/// read); `Drop` kills and reaps it.
struct ServeProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    log: PathBuf,
}

impl ServeProcess {
    /// `graft serve` with debug logs, with graft's account when `account`,
    /// `failpoint` armed when given; waits until it answers.
    async fn start(
        registry: &Registry,
        work: &Path,
        failpoint: Option<&str>,
        account: bool,
    ) -> ServeProcess {
        use std::process::Stdio;
        for _ in 0..5 {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
            let log = work.join(format!("graft-{}.log", addr.port()));
            let out = std::fs::File::create(&log).expect("log file");
            let mut command = graft_command(work);
            command
                .args(["serve", "--listen", &addr.to_string()])
                .args(["--upstream", &registry.url()])
                .arg("--data-dir")
                .arg(work.join("data"))
                // Everything graft logs is searched for its tokens.
                .env("RUST_LOG", "debug")
                .stdout(Stdio::from(out.try_clone().expect("clone log")))
                .stderr(Stdio::from(out));
            if account {
                command
                    .env("GRAFT_UPSTREAM_USERNAME", GRAFT_USER)
                    .env("GRAFT_UPSTREAM_PASSWORD", PASSWORD);
            }
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
        }
        panic!("graft serve never listened");
    }

    async fn wait_listening(&mut self) -> bool {
        let api = Api::new(&self.url());
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if api.get("/healthz").send().await.is_ok() {
                return true;
            }
            if self.child.try_wait().expect("poll graft").is_some() {
                let log = self.log_text();
                assert!(log.contains("cannot listen"), "graft serve exited:\n{log}");
                return false;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "graft serve never listened"
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

    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    fn wait_exited(&mut self) {
        let deadline = std::time::Instant::now() + WAIT;
        while self.child.try_wait().expect("poll graft").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "graft did not stop at the failpoint"
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

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_push_interrupted_after_the_upstream_accept_is_recovered_with_graft_s_own_token() {
    let (service, registry) = token_registry(TokenOptions::default());
    let work = tempfile::tempdir().expect("work dir");
    let repo = "app/crash";
    let direct = direct_reader(&registry, &service, repo);

    let mut doomed =
        ServeProcess::start(&registry, work.path(), Some("after-upstream-accept"), true).await;
    let (_, token) = fetch_token(&service, "pusher", &format!("repository:{repo}:pull,push")).await;
    let pusher = Api::new(&doomed.url()).with_bearer(&token);
    let subject = push_subject(&pusher, repo, "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let digest = common::sha256_digest(&sig);
    let push = pusher
        .request(
            reqwest::Method::PUT,
            &format!("/v2/{repo}/manifests/{digest}"),
        )
        .header("content-type", common::artifacts::MANIFEST)
        .body(sig.to_vec())
        .send()
        .await;
    assert!(push.is_err(), "answered although graft died: {push:?}");
    doomed.wait_exited();
    let first_log = doomed.log_text();
    drop(doomed);
    assert!(upstream_fallback_digests(&direct, repo, &subject)
        .await
        .is_empty());

    // Restarted, graft settles the push with a token of its own: the
    // client's token is long gone from its memory.
    let graft = ServeProcess::start(&registry, work.path(), None, true).await;
    wait_for_tag(&direct, repo, &subject, vec![digest.clone()]).await;
    let (_, token) = fetch_token(&service, "reader", &format!("repository:{repo}:pull")).await;
    let reader = Api::new(&graft.url()).with_bearer(&token);
    let answer = referrers(&reader, repo, &subject.digest, "").await;
    let listed = response_text(answer).await;
    assert!(listed.contains(&digest), "{listed}");
    let list: serde_json::Value =
        serde_json::from_str(listed.split_once('\n').map_or("", |(_, b)| b)).expect("JSON");
    assert_eq!(
        list["manifests"],
        serde_json::json!([common::artifacts::expected_descriptor(&sig)])
    );

    let log = graft.log_text();
    assert!(
        log.contains("recovering a referrer the upstream accepted before a restart"),
        "{log}"
    );
    assert!(
        !service.issued_to(GRAFT_USER).is_empty(),
        "graft fetched a token"
    );
    assert_no_graft_token(&service, &format!("{first_log}\n{log}"), "graft's log");
    assert_no_graft_token(&service, &listed, "the referrers answer");
    assert!(!log.contains(PASSWORD), "graft's password in its log");
}

#[tokio::test]
async fn without_an_account_graft_says_once_per_repository_why_tags_stay_owed() {
    let (service, registry) = token_registry(TokenOptions::default());
    let work = tempfile::tempdir().expect("work dir");
    let graft = ServeProcess::start(&registry, work.path(), None, false).await;
    let repo = "app/told";
    let (_, token) = fetch_token(&service, "pusher", &format!("repository:{repo}:pull,push")).await;
    let pusher = Api::new(&graft.url()).with_bearer(&token);
    let (subject, keep, doomed) = subject_with_two_referrers(&pusher, repo).await;
    let sbom = artifact(&subject, Some("application/vnd.example.vex"), None, None);
    let sbom = push_by_digest(&pusher, repo, &sbom).await;
    let direct = direct_reader(&registry, &service, repo);
    wait_for_tag(
        &direct,
        repo,
        &subject,
        vec![keep, doomed.clone(), sbom.clone()],
    )
    .await;

    let (_, token) = fetch_token(
        &service,
        "deleter",
        &format!("repository:{repo}:delete,pull"),
    )
    .await;
    let deleter = Api::new(&graft.url()).with_bearer(&token);
    for digest in [&doomed, &sbom] {
        let deleted = Api::send(deleter.delete(&format!("/v2/{repo}/manifests/{digest}"))).await;
        assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    }
    let api = Api::new(&graft.url());
    eventually(WAIT, "both refused tag writes counted", || async {
        read_metric(&api, "graft_tag_writes_unauthorized_total").await >= Some(2)
    })
    .await;
    let log = graft.log_text();
    let said = log.matches("graft has no upstream account").count();
    assert_eq!(said, 1, "said once for the repository:\n{log}");
    assert!(log.contains(repo), "{log}");
}
