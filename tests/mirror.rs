//! Mirror mode: one graft in front of several real registries
//! (`[[upstream]]`). Each routing form — the `ns` query parameter
//! containerd sends, a path prefix, the `Host`, the default — reaches its
//! own upstream; the same repository name on two upstreams never mixes
//! (content, tags, access decisions); URLs in answers keep the client on
//! its routing form; graft pulls with its own token where configured and
//! never hands it out.

mod common;

use std::path::{Path, PathBuf};

use common::token::{Grant, ALL, PUSH_PULL};
use common::{header_str, require_tool};
use common::{Api, Graft, Registry, RegistryOptions, TestImage, TokenOptions, TokenService};
use graft::mirror::NamedUpstream;
use graft::Config;
use reqwest::StatusCode;

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";

/// graft with one `[[upstream]]` per `(name, registry, hosts)`; the first is
/// the default.
fn mirror(upstreams: &[(&str, &Registry, &[&str])], adjust: impl FnOnce(&mut Config)) -> Graft {
    Graft::start_for_upstream(&upstreams[0].1.url(), |c| {
        for (name, registry, hosts) in upstreams {
            let mut entry = NamedUpstream::new(name, &registry.url(), c);
            entry.hosts = hosts.iter().map(|h| h.to_string()).collect();
            c.upstreams.push(entry);
        }
        adjust(c);
    })
}

async fn manifest_status(api: &Api, path: &str, host: Option<&str>) -> (StatusCode, Vec<u8>) {
    let mut req = api.get(path).header("accept", ACCEPT);
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let resp = Api::send(req).await;
    let status = resp.status();
    (status, resp.bytes().await.expect("body").to_vec())
}

#[tokio::test]
async fn each_routing_form_reaches_its_own_upstream_and_names_never_mix() {
    let (a, b) = (Registry::start(), Registry::start());
    let (image_a, image_b) = (TestImage::build(1), TestImage::build(1));
    Api::for_registry(&a)
        .push_image("team/app", "v1", &image_a)
        .await;
    Api::for_registry(&b)
        .push_image("team/app", "v1", &image_b)
        .await;
    let graft = mirror(
        &[("a.test", &a, &["a.mirror"]), ("b.test", &b, &["b.mirror"])],
        |_| {},
    );
    let api = Api::for_graft(&graft);
    let a_manifest = image_a.manifest.to_vec();
    let b_manifest = image_b.manifest.to_vec();

    // The prefix form.
    let (s, body) = manifest_status(&api, "/v2/b.test/team/app/manifests/v1", None).await;
    assert_eq!((s, &body), (StatusCode::OK, &b_manifest), "prefix b.test");
    let (s, body) = manifest_status(&api, "/v2/a.test/team/app/manifests/v1", None).await;
    assert_eq!((s, &body), (StatusCode::OK, &a_manifest), "prefix a.test");

    // containerd's form: `ns`, answered with `OCI-Namespace`.
    let resp = Api::send(
        api.get("/v2/team/app/manifests/v1?ns=b.test")
            .header("accept", ACCEPT),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header_str(resp.headers(), "oci-namespace").as_deref(),
        Some("b.test")
    );
    assert_eq!(resp.bytes().await.expect("body").to_vec(), b_manifest);
    let log = b.access_log();
    assert!(
        log.iter().all(|e| !e.uri.contains("ns=")),
        "the upstream never sees `ns`"
    );
    assert!(log
        .iter()
        .any(|e| e.uri.starts_with("/v2/team/app/manifests/")));

    // By Host; and the default for a request that names none.
    let (s, body) = manifest_status(&api, "/v2/team/app/manifests/v1", Some("b.mirror")).await;
    assert_eq!((s, &body), (StatusCode::OK, &b_manifest), "Host b.mirror");
    let (s, body) = manifest_status(&api, "/v2/team/app/manifests/v1", None).await;
    assert_eq!((s, &body), (StatusCode::OK, &a_manifest), "the default");

    // A namespace graft does not mirror is never looked up elsewhere.
    let (s, _) = manifest_status(&api, "/v2/team/app/manifests/v1?ns=quay.io", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Content cached for b.test is not served for a.test: a's instance asks
    // a, which does not have it.
    let layer_b = &image_b.layers[0].digest;
    let got = api.get_blob("b.test/team/app", layer_b).await;
    assert_eq!(got, image_b.layers[0].data);
    let resp = Api::send(api.get(&format!("/v2/a.test/team/app/blobs/{layer_b}"))).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "b's layer through a");

    // Tags, too, are each upstream's own.
    Api::for_registry(&b)
        .push_manifest("team/app", "only-b", ACCEPT, image_b.manifest.clone())
        .await;
    let tags = |resp: reqwest::Response| async move {
        let v: serde_json::Value = resp.json().await.expect("tag list");
        let mut tags: Vec<String> = serde_json::from_value(v["tags"].clone()).expect("tags");
        tags.sort();
        tags
    };
    let on_b = tags(Api::send(api.get("/v2/b.test/team/app/tags/list")).await).await;
    let on_a = tags(Api::send(api.get("/v2/a.test/team/app/tags/list")).await).await;
    assert_eq!(on_b, ["only-b", "v1"]);
    assert_eq!(on_a, ["v1"]);

    // Each upstream's counts, labelled.
    let metrics = Api::send(api.get("/metrics"))
        .await
        .text()
        .await
        .expect("metrics");
    for name in ["a.test", "b.test"] {
        let label = format!("graft_cache_misses_total{{upstream=\"{name}\"}}");
        assert!(metrics.contains(&label), "{label} missing:\n{metrics}");
    }
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.starts_with("# TYPE graft_cache_misses"))
            .count(),
        1,
        "one family, written once:\n{metrics}"
    );

    // Each upstream keeps its index, cache and keys in its own directory.
    for name in ["a.test", "b.test"] {
        let dir = graft.data_dir().join("upstreams").join(name);
        assert!(dir.join("index").is_dir(), "{} has no index", dir.display());
    }
}

#[tokio::test]
async fn pushes_through_the_prefix_and_ns_forms_stay_on_them() {
    let (a, b) = (Registry::start(), Registry::start());
    let graft = mirror(&[("a.test", &a, &[]), ("b.test", &b, &[])], |_| {});
    let api = Api::for_graft(&graft);

    // A chunked upload through the prefix: every Location keeps the prefix.
    let data = bytes::Bytes::from(common::random_bytes(3000));
    let (digest, locations) = api.push_blob_chunked("b.test/team/new", &data, 1000).await;
    for l in &locations {
        assert!(
            l.contains("/v2/b.test/team/new/"),
            "Location off the prefix form: {l}"
        );
    }
    assert_eq!(
        Api::for_registry(&b).get_blob("team/new", &digest).await,
        data
    );
    let resp = Api::send(api.head(&format!("/v2/team/new/blobs/{digest}"))).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "a never got it");

    // The ns form: the upload's Location carries `ns` on.
    let resp = Api::send(api.request(
        reqwest::Method::POST,
        "/v2/team/other/blobs/uploads/?ns=b.test",
    ))
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = common::api::location(&resp);
    assert!(location.contains("ns=b.test"), "{location}");
    assert!(
        location.contains("/v2/team/other/blobs/uploads/"),
        "{location}"
    );
    let put = Api::send(
        api.request(reqwest::Method::PUT, &location)
            .query(&[("digest", digest.as_str())])
            .body(data.clone()),
    )
    .await;
    assert_eq!(put.status(), StatusCode::CREATED);
    assert_eq!(
        Api::for_registry(&b).get_blob("team/other", &digest).await,
        data
    );
}

#[tokio::test]
async fn an_authorization_on_one_upstream_is_not_one_on_another() {
    let a = Registry::start_with(RegistryOptions::default().basic_auth("alice", "pw-a"));
    let b = Registry::start_with(RegistryOptions::default().basic_auth("bob", "pw-b"));
    let image = TestImage::build(1);
    // The very same image (same digests) on both.
    Api::for_registry(&a)
        .with_basic_auth("alice", "pw-a")
        .push_image("team/app", "v1", &image)
        .await;
    Api::for_registry(&b)
        .with_basic_auth("bob", "pw-b")
        .push_image("team/app", "v1", &image)
        .await;
    let graft = mirror(&[("a.test", &a, &[]), ("b.test", &b, &[])], |_| {});
    let alice = Api::for_graft(&graft).with_basic_auth("alice", "pw-a");

    let layer = &image.layers[0].digest;
    assert_eq!(
        alice.get_blob("a.test/team/app", layer).await,
        image.layers[0].data
    );
    assert_eq!(
        alice.get_manifest("a.test/team/app", &image.digest).await,
        image.manifest
    );
    // alice's yes on a, and the cached bytes, do not open b.
    for path in [
        format!("/v2/b.test/team/app/blobs/{layer}"),
        format!("/v2/b.test/team/app/manifests/{}", image.digest),
        format!("/v2/team/app/blobs/{layer}?ns=b.test"),
    ] {
        let resp = Api::send(alice.get(&path).header("accept", ACCEPT)).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let bob = Api::for_graft(&graft).with_basic_auth("bob", "pw-b");
    assert_eq!(
        bob.get_blob("b.test/team/app", layer).await,
        image.layers[0].data
    );
}

/// A `registries.conf` sending `b.test/…` images to graft's prefix form.
fn registries_conf(dir: &Path, graft: &Graft) -> PathBuf {
    let path = dir.join("registries.conf");
    let text = format!(
        "[[registry]]\nprefix = \"b.test\"\nlocation = \"b.test\"\n\n\
         [[registry.mirror]]\nlocation = \"{}/b.test\"\ninsecure = true\n",
        graft.host()
    );
    std::fs::write(&path, text).expect("write registries.conf");
    path
}

#[tokio::test]
async fn skopeo_pulls_through_a_registries_conf_mirror_entry() {
    let (a, b) = (Registry::start(), Registry::start());
    let image = TestImage::build(2);
    Api::for_registry(&b)
        .push_image("team/app", "v1", &image)
        .await;
    let graft = mirror(&[("a.test", &a, &[]), ("b.test", &b, &[])], |_| {});
    let work = tempfile::tempdir().expect("work dir");
    let conf = registries_conf(work.path(), &graft);
    let out = work.path().join("copy");
    let output = std::process::Command::new(require_tool("skopeo"))
        .arg("--registries-conf")
        .arg(&conf)
        .args(["copy", "--insecure-policy", "--preserve-digests"])
        .arg("docker://b.test/team/app:v1")
        .arg(format!("oci:{}:v1", out.display()))
        .output()
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pulled = common::image::read_oci_layout(&out, "v1");
    assert_eq!(pulled.manifest, image.manifest);
    assert!(
        b.access_log()
            .iter()
            .any(|e| e.uri.starts_with("/v2/team/app/manifests/")),
        "b served it"
    );
    assert_eq!(
        a.count_requests("HEAD", "/v2/team/app/"),
        0,
        "a was not asked"
    );
    assert_eq!(
        a.count_requests("GET", "/v2/team/app/"),
        0,
        "a was not asked"
    );
}

/// An htpasswd file with one bcrypt entry.
fn htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
    let path = dir.join("clients.htpasswd");
    let hash = bcrypt::hash(password, 4).expect("bcrypt");
    std::fs::write(&path, format!("{user}:{hash}\n")).expect("write htpasswd");
    path
}

#[tokio::test]
async fn graft_pulls_with_its_own_token_and_never_hands_it_out() {
    let service = TokenService::start(TokenOptions::default().user(
        "graft",
        "graft-pw",
        &[Grant::new("*", ALL)],
    ));
    let tokened =
        Registry::start_with(RegistryOptions::default().token_auth(service.registry_auth()));
    let plain = Registry::start();
    let image = TestImage::build(2);
    Api::for_registry(&tokened)
        .with_bearer(&service.mint_for("team/app", PUSH_PULL))
        .push_image("team/app", "v1", &image)
        .await;
    let work = tempfile::tempdir().expect("work dir");
    let users = htpasswd(work.path(), "runner", "runner-pw");
    let graft = mirror(
        &[("plain.test", &plain, &[]), ("tok.test", &tokened, &[])],
        |c| {
            let e = &mut c.upstreams[1];
            e.upstream.username = Some("graft".into());
            e.upstream.password = Some("graft-pw".into());
            e.access.use_own_credentials = true;
            e.access.htpasswd = Some(users.clone());
        },
    );
    let before = service.issued().len();

    // Without credentials, or with wrong ones: graft's own challenge, never
    // the registry's realm.
    for api in [
        Api::for_graft(&graft),
        Api::for_graft(&graft).with_basic_auth("runner", "wrong"),
    ] {
        let resp = Api::send(
            api.get("/v2/tok.test/team/app/manifests/v1")
                .header("accept", ACCEPT),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let challenge = header_str(resp.headers(), "www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Basic "), "{challenge}");
        assert!(!challenge.contains(&service.realm()), "{challenge}");
    }

    let runner = Api::for_graft(&graft).with_basic_auth("runner", "runner-pw");
    let mut answers = Vec::new();
    for _ in 0..2 {
        let resp = Api::send(
            runner
                .get("/v2/tok.test/team/app/manifests/v1")
                .header("accept", ACCEPT),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        answers.push(format!("{:?}", resp.headers()));
        assert_eq!(resp.bytes().await.expect("body"), image.manifest);
        for blob in image.blobs() {
            let resp =
                Api::send(runner.get(&format!("/v2/team/app/blobs/{}?ns=tok.test", blob.digest)))
                    .await;
            assert_eq!(resp.status(), StatusCode::OK);
            answers.push(format!("{:?}", resp.headers()));
            assert_eq!(resp.bytes().await.expect("body"), blob.data);
        }
    }
    // One token for graft, for the one scope it pulled in.
    let issued: Vec<_> = service.issued().into_iter().skip(before).collect();
    let to_graft: Vec<_> = issued
        .iter()
        .filter(|i| i.user.as_deref() == Some("graft"))
        .collect();
    assert_eq!(to_graft.len(), 1, "tokens issued: {issued:?}");
    assert_eq!(to_graft[0].access[0].name, "team/app");
    for answer in &answers {
        assert!(
            !answer.contains(&to_graft[0].token),
            "a token reached a client"
        );
        assert!(!answer.contains(&service.realm()));
    }

    // Nobody pushes through a mirror upstream unless configured.
    let posts = tokened.count_requests("POST", "/v2/team/app/blobs/uploads/");
    let resp = Api::send(runner.request(
        reqwest::Method::POST,
        "/v2/tok.test/team/app/blobs/uploads/",
    ))
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        tokened.count_requests("POST", "/v2/team/app/blobs/uploads/"),
        posts
    );
}

/// A containerd daemon of the test's own (root, state, socket in a temp
/// dir); killed on drop.
struct Containerd {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// `None` (after saying why, loudly) when not root: containerd needs it.
    fn start() -> Option<Containerd> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let root = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0");
        if !root {
            eprintln!("SKIPPED: containerd needs root; run the tests as root (as CI does)");
            return None;
        }
        let bin = require_tool("containerd");
        let dir = tempfile::Builder::new()
            .prefix("graft-test-containerd-")
            .tempdir()
            .expect("containerd dir");
        let config = dir.path().join("config.toml");
        // Only what `ctr content fetch` needs: the content store and its
        // gRPC API, no CRI, no runtime.
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .expect("write containerd config");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log");
        let child = std::process::Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--address")
            .arg(dir.path().join("containerd.sock"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let d = Containerd { child, dir };
        common::wait_until(
            std::time::Duration::from_secs(20),
            "containerd's socket",
            || d.socket().exists(),
        );
        Some(d)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// `ctr content fetch` of `image` with `hosts_dir`; its output on failure.
    fn fetch(&self, hosts_dir: &Path, image: &str) -> Result<(), String> {
        let out = std::process::Command::new(require_tool("ctr"))
            .arg("--address")
            .arg(self.socket())
            .args([
                "--namespace",
                "graft-test",
                "content",
                "fetch",
                "--hosts-dir",
            ])
            .arg(hosts_dir)
            .arg(image)
            .output()
            .expect("run ctr");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}\n{}\ncontainerd log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
            ))
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<dir>/<registry>/hosts.toml` sending `registry`'s pulls to `mirror`.
fn hosts_toml(dir: &Path, registry: &str, mirror: &str, extra: &str) {
    let d = dir.join(registry);
    std::fs::create_dir_all(&d).expect("hosts dir");
    let text = format!(
        "server = \"https://{registry}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{extra}"
    );
    std::fs::write(d.join("hosts.toml"), text).expect("write hosts.toml");
}

#[tokio::test]
async fn containerd_pulls_through_hosts_toml_mirrors() {
    let Some(containerd) = Containerd::start() else {
        return;
    };
    let (a, b) = (Registry::start(), Registry::start());
    let (image_a, image_b) = (TestImage::build(1), TestImage::build(2));
    Api::for_registry(&a)
        .push_image("team/app", "v1", &image_a)
        .await;
    Api::for_registry(&b)
        .push_image("team/app", "v1", &image_b)
        .await;
    let graft = mirror(&[("a.test", &a, &[]), ("b.test", &b, &[])], |_| {});
    let hosts = tempfile::tempdir().expect("hosts dir");
    // The plain mirror entry for b.test, which is not the default: only
    // containerd's `?ns=b.test` can route it.
    hosts_toml(hosts.path(), "b.test", &graft.url(), "");
    // The path-prefix form (containerd adds `ns` there too).
    hosts_toml(
        hosts.path(),
        "a.test",
        &format!("{}/v2/a.test", graft.url()),
        "  override_path = true\n",
    );
    let fetched = tokio::task::spawn_blocking({
        let hosts = hosts.path().to_path_buf();
        move || {
            let a = containerd.fetch(&hosts, "a.test/team/app:v1");
            let b = containerd.fetch(&hosts, "b.test/team/app:v1");
            (a, b)
        }
    })
    .await
    .expect("ctr");
    if let Err(e) = fetched.0 {
        panic!("ctr fetch of a.test failed: {e}");
    }
    if let Err(e) = fetched.1 {
        panic!("ctr fetch of b.test failed: {e}");
    }
    for (registry, image) in [(&a, &image_a), (&b, &image_b)] {
        for blob in image.blobs() {
            assert!(
                registry.count_requests("GET", &format!("/v2/team/app/blobs/{}", blob.digest)) >= 1,
                "{} came from its own upstream",
                blob.digest
            );
        }
    }
}
