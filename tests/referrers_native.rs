//! Upstreams that gain the referrers API by upgrade (issue 11): graft in
//! mode `auto` in front of a real distribution 2.8 registry behind
//! `common::native_layer`, which answers the referrers API only for
//! manifests pushed after it was switched on. Referrers pushed before
//! live only in fallback tags; graft's answer stays the union until
//! `graft migrate` re-pushes them, then it is the upstream's own.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::artifacts::{
    artifact, digests_of, expected_descriptor, push_by_digest, push_subject, referrer_list,
    referrers, Subject,
};
use common::native_layer::{NativeLayer, MARK};
use common::{header_str, sha256_digest, Api, Graft, Registry, RegistryOptions};
use reqwest::StatusCode;
use serde_json::json;

const SIG: &str = "application/vnd.example.sig";
const SBOM: &str = "application/spdx+json";

/// A registry, the layer in front of it (off), graft in front of both.
struct Setup {
    registry: Registry,
    layer: NativeLayer,
    graft: Graft,
}

fn setup() -> Setup {
    setup_with(|_| {})
}

fn setup_with(configure: impl FnOnce(&mut graft::Config)) -> Setup {
    setup_on(Registry::start(), configure)
}

fn setup_on(registry: Registry, configure: impl FnOnce(&mut graft::Config)) -> Setup {
    let layer = NativeLayer::start(&registry.url());
    let graft = Graft::start_for_upstream(&layer.url(), |c| {
        c.referrers.tag_ttl = Duration::ZERO;
        configure(c);
    });
    Setup {
        registry,
        layer,
        graft,
    }
}

/// Pushes a referrer of `subject` of kind `kind` through `api`; returns it.
async fn attach(api: &Api, subject: &Subject, kind: &str, note: &str) -> Bytes {
    let m = artifact(subject, Some(kind), None, Some(json!({ "note": note })));
    push_by_digest(api, "app", &m).await;
    m
}

fn digests(manifests: &[&Bytes]) -> Vec<String> {
    let mut v: Vec<String> = manifests.iter().map(|m| sha256_digest(m)).collect();
    v.sort();
    v
}

/// The subject and two referrers pushed through graft before the upgrade
/// (fallback tags), then the upgrade and one referrer pushed after it.
async fn legacy_then_upgrade(s: &Setup, api: &Api) -> (Subject, Bytes, Bytes, Bytes) {
    let subject = push_subject(api, "app", "v1").await;
    let sig = attach(api, &subject, SIG, "legacy").await;
    let sbom = attach(api, &subject, SBOM, "legacy").await;
    let before = referrers(api, "app", &subject.digest, "").await;
    assert_eq!(header_str(before.headers(), "graft-referrers-source"), None);
    assert_eq!(
        digests_of(&referrer_list(before).await),
        digests(&[&sig, &sbom])
    );

    s.layer.set_native(true);
    let new = attach(api, &subject, SIG, "native").await;
    assert_eq!(
        s.layer.native_digests("app", &subject.digest),
        digests(&[&new]),
        "the upgraded registry lists only what was pushed after the upgrade"
    );
    (subject, sig, sbom, new)
}

#[tokio::test]
async fn after_the_upgrade_graft_answers_the_union_of_native_and_legacy_referrers() {
    let s = setup();
    let api = Api::for_graft(&s.graft);
    let (subject, sig, sbom, new) = legacy_then_upgrade(&s, &api).await;

    let resp = referrers(&api, "app", &subject.digest, "").await;
    assert_eq!(
        header_str(resp.headers(), "graft-referrers-source").as_deref(),
        Some("union")
    );
    let list = referrer_list(resp).await;
    assert_eq!(digests_of(&list), digests(&[&sig, &sbom, &new]));
    for m in [&sig, &sbom, &new] {
        let d = list
            .iter()
            .find(|d| d["digest"] == sha256_digest(m))
            .expect("listed");
        assert_eq!(*d, expected_descriptor(m));
    }

    // The filter applies to the union.
    let q = format!("?artifactType={SIG}");
    let resp = referrers(&api, "app", &subject.digest, &q).await;
    assert_eq!(
        header_str(resp.headers(), "oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    assert_eq!(
        digests_of(&referrer_list(resp).await),
        digests(&[&sig, &new])
    );
}

#[tokio::test]
async fn a_referrer_deleted_at_the_registry_is_not_added_by_the_union() {
    let s = setup();
    let api = Api::for_graft(&s.graft);
    let (subject, sig, sbom, new) = legacy_then_upgrade(&s, &api).await;

    let path = format!("/v2/app/manifests/{}", sha256_digest(&sbom));
    let resp = Api::send(Api::for_registry(&s.registry).delete(&path)).await;
    assert_eq!(
        resp.status(),
        StatusCode::ACCEPTED,
        "DELETE at the registry"
    );

    let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(digests_of(&list), digests(&[&sig, &new]));
}

#[tokio::test]
async fn the_upstreams_descriptor_wins_when_both_list_a_referrer() {
    let s = setup();
    let api = Api::for_graft(&s.graft);
    let (subject, sig, sbom, new) = legacy_then_upgrade(&s, &api).await;

    // The legacy signature pushed again after the upgrade: now both the
    // registry and graft list it, and the registry's descriptor differs.
    s.layer.set_mark_descriptors(true);
    push_by_digest(&api, "app", &sig).await;

    let resp = referrers(&api, "app", &subject.digest, "").await;
    assert_eq!(
        header_str(resp.headers(), "graft-referrers-source").as_deref(),
        Some("union"),
        "the SBOM is still only graft's"
    );
    let list = referrer_list(resp).await;
    assert_eq!(digests_of(&list), digests(&[&sig, &sbom, &new]));
    let listed_sig = list
        .iter()
        .find(|d| d["digest"] == sha256_digest(&sig))
        .expect("signature listed once");
    assert_eq!(listed_sig["annotations"][MARK], "native-layer");
    assert_eq!(listed_sig["annotations"]["note"], "legacy");
}

/// Runs `graft migrate` against `upstream` for repository `app` with
/// `extra` arguments; returns whether it exited 0, and its stdout.
fn migrate(upstream: &str, extra: &[&str]) -> (bool, String) {
    let work = tempfile::tempdir().expect("work dir");
    let out = common::artifacts::graft_command(work.path())
        .args(["migrate", "--upstream", upstream, "--repo", "app"])
        .args(extra)
        .output()
        .expect("run graft migrate");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "graft migrate {extra:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), stdout)
}

fn changes(layer: &NativeLayer) -> Vec<String> {
    layer
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PUT ") || r.starts_with("DELETE ") || r.starts_with("POST "))
        .collect()
}

#[tokio::test]
async fn graft_migrate_completes_the_native_list_and_the_union_becomes_pass_through() {
    let s = setup();
    let api = Api::for_graft(&s.graft);
    let (subject, sig, sbom, new) = legacy_then_upgrade(&s, &api).await;
    let all = digests(&[&sig, &sbom, &new]);

    // A dry run reads only, and says work is left. (The fallback tag lists
    // the two legacy referrers: graft stopped writing it at the upgrade.)
    let writes_before = changes(&s.layer);
    let (ok, out) = migrate(&s.layer.url(), &["--dry-run"]);
    assert!(!ok, "a dry run that finds work exits 1");
    assert!(out.contains("dry run: nothing was changed"), "{out}");
    assert!(
        out.contains("app: migrated 0, already native 0, would migrate 2, failed 0"),
        "{out}"
    );
    assert_eq!(
        changes(&s.layer),
        writes_before,
        "the dry run wrote nothing"
    );
    assert_eq!(
        s.layer.native_digests("app", &subject.digest),
        digests(&[&new])
    );

    let (ok, out) = migrate(&s.layer.url(), &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("app: migrated 2, already native 0, failed 0"),
        "{out}"
    );
    assert_eq!(s.layer.native_digests("app", &subject.digest), all);

    // The upstream lists everything graft knows: its own answer, as is.
    let resp = referrers(&api, "app", &subject.digest, "").await;
    assert_eq!(header_str(resp.headers(), "graft-referrers-source"), None);
    assert_eq!(digests_of(&referrer_list(resp).await), all);

    // Fallback tags go once everything in them is listed natively.
    let tag = subject.fallback_tag();
    let registry = Api::for_registry(&s.registry);
    let tag_path = format!("/v2/app/manifests/{tag}");
    let head = |api: &Api| {
        api.head(&tag_path)
            .header("accept", common::artifacts::INDEX)
    };
    assert_eq!(Api::send(head(&registry)).await.status(), StatusCode::OK);
    let (ok, out) = migrate(&s.layer.url(), &["--remove-fallback-tags"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("app: migrated 0, already native 2, fallback tags removed 1, failed 0"),
        "{out}"
    );
    assert_eq!(
        Api::send(head(&registry)).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        Api::send(
            registry
                .head("/v2/app/manifests/v1")
                .header("accept", common::TestImage::MEDIA_TYPE)
        )
        .await
        .status(),
        StatusCode::OK,
        "the subject's own tag stays"
    );
    let resp = referrers(&api, "app", &subject.digest, "").await;
    assert_eq!(header_str(resp.headers(), "graft-referrers-source"), None);
    assert_eq!(digests_of(&referrer_list(resp).await), all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_native_upstream_is_down_a_known_client_gets_the_last_answer() {
    const MAX_STALE: Duration = Duration::from_secs(3600);
    let clock = graft::clock::Clock::skewable();
    let c = clock.clone();
    let s = setup_with(move |config| {
        config.clock = c;
        config.referrers.max_stale = MAX_STALE;
        config.cache.max_stale = MAX_STALE * 10;
    });
    let api = Api::for_graft(&s.graft);
    let (subject, sig, sbom, new) = legacy_then_upgrade(&s, &api).await;
    let all = digests(&[&sig, &sbom, &new]);
    let path = format!("/v2/app/referrers/{}", subject.digest);
    assert_eq!(
        digests_of(&referrer_list(referrers(&api, "app", &subject.digest, "").await).await),
        all
    );

    s.layer.set_down(true);
    let resp = Api::send(api.get(&path)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header_str(resp.headers(), "graft-referrers-source").as_deref(),
        Some("index; upstream-unavailable")
    );
    assert_eq!(digests_of(&referrer_list(resp).await), all);
    let q = format!("{path}?artifactType={SIG}");
    let resp = Api::send(api.get(&q)).await;
    assert_eq!(
        resp.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "no answer was kept for this filter"
    );

    // A client graft has no yes for gets the upstream's trouble.
    let stranger = Api::for_graft(&s.graft).with_basic_auth("mallory", "guess");
    let resp = Api::send(stranger.get(&path)).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header_str(resp.headers(), "graft-referrers-source"), None);

    // Past referrers.max_stale the kept answer no longer stands.
    clock.advance(MAX_STALE + Duration::from_secs(1));
    let resp = Api::send(api.get(&path)).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);

    s.layer.set_down(false);
    let resp = referrers(&api, "app", &subject.digest, "").await;
    assert_eq!(digests_of(&referrer_list(resp).await), all);
}

#[tokio::test]
async fn graft_pages_the_union_and_the_next_page_continues_it() {
    let s = setup_with(|c| c.referrers.page_size = 2);
    let api = Api::for_graft(&s.graft);
    let (subject, sig, sbom, new) = legacy_then_upgrade(&s, &api).await;

    let first = referrers(&api, "app", &subject.digest, "").await;
    let link = header_str(first.headers(), "link").expect("a next link");
    let next = link
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
        .map(|(url, _)| url.to_owned())
        .expect("<url>");
    let mut listed = referrer_list(first).await;
    assert_eq!(listed.len(), 2);
    let second = Api::send(api.get(&next)).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(header_str(second.headers(), "link"), None, "the last page");
    listed.extend(referrer_list(second).await);
    assert_eq!(digests_of(&listed), digests(&[&sig, &sbom, &new]));
}

#[tokio::test]
async fn the_upstreams_no_reaches_the_client_unchanged_and_nothing_is_added() {
    let registry = Registry::start_with(RegistryOptions::default().basic_auth("alice", "secret"));
    let s = setup_on(registry, |_| {});
    let api = Api::for_graft(&s.graft).with_basic_auth("alice", "secret");
    let (subject, _, _, _) = legacy_then_upgrade(&s, &api).await;
    let path = format!("/v2/app/referrers/{}", subject.digest);

    for stranger in [
        Api::for_graft(&s.graft),
        Api::for_graft(&s.graft).with_basic_auth("mallory", "guess"),
    ] {
        let resp = Api::send(stranger.get(&path)).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(header_str(resp.headers(), "www-authenticate").is_some());
        assert_eq!(header_str(resp.headers(), "graft-referrers-source"), None);
    }
}
