//! Reconciling graft's referrers with the upstream, the upstream judging:
//! referrers deleted straight at a real distribution 2.8 registry (behind
//! graft's back) leave graft's API and the fallback tags graft writes,
//! entries old clients add are learnt, and a tag write the registry refuses
//! because it names a deleted manifest heals instead of looping.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::artifacts::{
    artifact, digests_of, expected_descriptor, push_by_digest, push_subject, put_fallback_tag,
    referrer_list, referrers, upstream_fallback_digests, Subject,
};
use common::{sha256_digest, Api, Graft, Registry};
use reqwest::StatusCode;
use serde_json::json;

/// Pushes a referrer of `subject` of kind `kind` through `api`; returns it.
async fn attach(api: &Api, subject: &Subject, kind: &str) -> Bytes {
    let m = artifact(subject, Some(kind), None, None);
    push_by_digest(api, "app", &m).await;
    m
}

/// Deletes `manifest` straight at the registry, bypassing graft.
async fn delete_upstream(registry: &Registry, manifest: &[u8]) {
    let path = format!("/v2/app/manifests/{}", sha256_digest(manifest));
    let resp = Api::send(Api::for_registry(registry).delete(&path)).await;
    assert_eq!(
        resp.status(),
        StatusCode::ACCEPTED,
        "DELETE at the registry"
    );
}

/// Sorted digests of `manifests`.
fn digests(manifests: &[&Bytes]) -> Vec<String> {
    let mut v: Vec<String> = manifests.iter().map(|m| sha256_digest(m)).collect();
    v.sort();
    v
}

async fn listed(api: &Api, subject: &Subject) -> Vec<String> {
    digests_of(&referrer_list(referrers(api, "app", &subject.digest, "").await).await)
}

/// Stops graft and counts the fallback-tag writes its index still owes: an
/// owed write is retried by recovery, so any left over is a loop.
fn owed_after_shutdown(mut graft: Graft) -> usize {
    graft.begin_shutdown();
    graft
        .wait_stopped(Duration::from_secs(30))
        .expect("graft stops cleanly");
    let index = graft::index::Index::open(&graft.data_dir().join("index")).expect("index");
    let owed = index.intents().owed_tag_writes().expect("owed writes");
    owed.len()
}

async fn metric(api: &Api, name: &str) -> u64 {
    common::read_metric(api, name)
        .await
        .unwrap_or_else(|| panic!("graft exports {name}"))
}

#[tokio::test]
async fn a_referrer_deleted_at_the_registry_and_left_out_of_the_tag_leaves_the_api_and_graft_s_tags(
) {
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |c| c.referrers.tag_ttl = Duration::ZERO);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = attach(&api, &subject, "application/vnd.example.sig").await;
    let sbom = attach(&api, &subject, "application/spdx+json").await;
    assert_eq!(listed(&api, &subject).await, digests(&[&sig, &sbom]));

    // An old client, straight at the registry: deletes the signature and
    // rewrites the fallback tag without it.
    delete_upstream(&registry, &sig).await;
    put_fallback_tag(
        &upstream,
        "app",
        &subject.fallback_tag(),
        &[expected_descriptor(&sbom)],
    )
    .await;

    assert_eq!(listed(&api, &subject).await, digests(&[&sbom]));
    // The next tag graft writes does not bring it back.
    let vex = attach(&api, &subject, "application/vnd.example.vex").await;
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        digests(&[&sbom, &vex])
    );
    assert_eq!(listed(&api, &subject).await, digests(&[&sbom, &vex]));
    assert_eq!(
        metric(&api, "graft_referrers_tag_writes_dropped_total").await,
        0
    );
    assert_eq!(owed_after_shutdown(graft), 0);
}

#[tokio::test]
async fn a_referrer_deleted_while_the_tag_lists_it_is_dropped_once_the_tag_changes_and_new_entries_are_learnt(
) {
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |c| c.referrers.tag_ttl = Duration::ZERO);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = attach(&api, &subject, "application/vnd.example.sig").await;
    let sbom = attach(&api, &subject, "application/spdx+json").await;
    assert_eq!(listed(&api, &subject).await, digests(&[&sig, &sbom]));

    // An old client adds an attestation graft never saw...
    let att = attach(&upstream, &subject, "application/vnd.example.att").await;
    let entries = [&sig, &sbom, &att].map(|m| expected_descriptor(m));
    put_fallback_tag(&upstream, "app", &subject.fallback_tag(), &entries).await;
    // ...and the signature is deleted at the registry; the tag still
    // lists it (a registry does not rewrite tags on delete).
    delete_upstream(&registry, &sig).await;

    assert_eq!(listed(&api, &subject).await, digests(&[&sbom, &att]));
    // graft repaired the tag: it names only manifests that exist.
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        digests(&[&sbom, &att])
    );
    assert_eq!(listed(&api, &subject).await, digests(&[&sbom, &att]));
    assert_eq!(owed_after_shutdown(graft), 0);
}

#[tokio::test]
async fn an_entry_graft_never_knew_whose_manifest_is_gone_is_not_listed_nor_written() {
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |c| c.referrers.tag_ttl = Duration::ZERO);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let sbom = attach(&api, &subject, "application/spdx+json").await;

    // Written straight at the registry, then deleted there.
    let old = attach(&upstream, &subject, "application/vnd.example.old").await;
    let entries = [&sbom, &old].map(|m| expected_descriptor(m));
    put_fallback_tag(&upstream, "app", &subject.fallback_tag(), &entries).await;
    delete_upstream(&registry, &old).await;

    assert_eq!(listed(&api, &subject).await, digests(&[&sbom]));
    let vex = attach(&api, &subject, "application/vnd.example.vex").await;
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        digests(&[&sbom, &vex])
    );
    assert_eq!(owed_after_shutdown(graft), 0);
}

#[tokio::test]
async fn an_owed_write_refused_because_it_names_a_deleted_manifest_heals() {
    let registry = Registry::start();
    // The default tag_ttl: graft does not look at the tag between writes.
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = attach(&api, &subject, "application/vnd.example.sig").await;
    let sbom = attach(&api, &subject, "application/spdx+json").await;

    // Deleted at the registry; the tag still lists it, so graft's next
    // merge names it and distribution refuses that index with 400.
    delete_upstream(&registry, &sig).await;
    let stale = [&sig, &sbom].map(|m| expected_descriptor(m));
    let refused = Api::send(
        upstream
            .request(
                reqwest::Method::PUT,
                &format!("/v2/app/manifests/{}", subject.fallback_tag()),
            )
            .header("content-type", common::artifacts::INDEX)
            .body(common::artifacts::fallback_index(&stale).to_vec()),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "the premise");

    let vex = attach(&api, &subject, "application/vnd.example.vex").await;
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        digests(&[&sbom, &vex]),
        "the tag lists exactly the manifests the registry holds"
    );
    assert_eq!(listed(&api, &subject).await, digests(&[&sbom, &vex]));
    assert_eq!(
        metric(&api, "graft_referrers_tag_writes_dropped_total").await,
        0
    );
    assert_eq!(
        metric(&api, "graft_referrers_tag_writes_refused_total").await,
        0
    );
    assert_eq!(owed_after_shutdown(graft), 0, "nothing left to retry");
}

#[tokio::test]
async fn a_write_the_registry_refuses_even_recomputed_is_dropped_and_counted() {
    let registry = Registry::start();
    // A limit above distribution's own 4 MiB: the registry refuses the tag
    // however often graft recomputes it.
    let graft = Graft::start_with(&registry, |c| c.referrers.max_tag_bytes = 64 << 20);
    let api = Api::for_graft(&graft);
    let subject = push_subject(&api, "app", "v1").await;
    let mut pushed = Vec::new();
    for kind in ["application/vnd.example.a", "application/vnd.example.b"] {
        let m = artifact(
            &subject,
            Some(kind),
            None,
            Some(json!({ "com.example.blob": "a".repeat(3 << 20) })),
        );
        push_by_digest(&api, "app", &m).await;
        pushed.push(m);
    }
    assert_eq!(
        listed(&api, &subject).await,
        digests(&[&pushed[0], &pushed[1]])
    );
    assert_eq!(
        metric(&api, "graft_referrers_tag_writes_dropped_total").await,
        1
    );
    assert_eq!(
        owed_after_shutdown(graft),
        0,
        "the dropped write is not owed"
    );
}

#[tokio::test]
async fn one_read_asks_about_at_most_32_manifests_and_the_next_read_carries_on() {
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |c| c.referrers.tag_ttl = Duration::ZERO);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let keep = attach(&api, &subject, "application/vnd.example.keep").await;
    let mut doomed = Vec::new();
    for i in 0..40 {
        doomed.push(attach(&api, &subject, &format!("application/vnd.example.{i}")).await);
    }
    assert_eq!(listed(&api, &subject).await.len(), 41);

    // 40 referrers deleted at the registry, and the tag rewritten without
    // them: a diff larger than one read may judge.
    for m in &doomed {
        delete_upstream(&registry, m).await;
    }
    put_fallback_tag(
        &upstream,
        "app",
        &subject.fallback_tag(),
        &[expected_descriptor(&keep)],
    )
    .await;
    common::settle(&registry).await;
    let heads_before = registry.count_requests("HEAD", "/v2/app/manifests/sha256:");

    let first = listed(&api, &subject).await;
    common::settle(&registry).await;
    let heads = registry.count_requests("HEAD", "/v2/app/manifests/sha256:") - heads_before;
    assert_eq!(heads, 32, "HEADs of referrer manifests in one query");
    assert_eq!(first.len(), 1 + 40 - 32, "the unjudged ones stay listed");

    assert_eq!(listed(&api, &subject).await, digests(&[&keep]));
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        digests(&[&keep])
    );
    assert_eq!(owed_after_shutdown(graft), 0);
}

#[tokio::test]
async fn an_owed_write_recovery_finds_refused_is_recomputed_and_heals_after_a_restart() {
    let registry = Registry::start();
    let mut graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = attach(&api, &subject, "application/vnd.example.sig").await;
    let sbom = attach(&api, &subject, "application/spdx+json").await;

    // While graft is down: the signature is deleted at the registry (the
    // tag still lists it), and graft's index holds a referrer accepted
    // just before a crash, its tag write owed.
    graft.begin_shutdown();
    graft
        .wait_stopped(Duration::from_secs(30))
        .expect("graft stops cleanly");
    delete_upstream(&registry, &sig).await;
    let vex = attach(&upstream, &subject, "application/vnd.example.vex").await;
    {
        let index = graft::index::Index::open(&graft.data_dir().join("index")).expect("index");
        let repo = graft::oci::RepoName::parse("app").expect("name");
        let s: graft::oci::Digest = subject.digest.parse().expect("digest");
        let d: graft::oci::Descriptor =
            serde_json::from_value(expected_descriptor(&vex)).expect("descriptor");
        index.referrers().add(&repo, &s, &d).expect("index vex");
        index.intents().owe_tag_write(&repo, &s).expect("owe");
        index.flush().await.expect("flush");
    }
    graft.restart();

    // Recovery's write names the deleted signature, is refused with 400,
    // and is recomputed from the registry's state.
    common::eventually(Duration::from_secs(20), "the tag heals", || async {
        upstream_fallback_digests(&upstream, "app", &subject).await == digests(&[&sbom, &vex])
    })
    .await;
    assert_eq!(listed(&api, &subject).await, digests(&[&sbom, &vex]));
    assert_eq!(
        metric(&api, "graft_referrers_tag_writes_dropped_total").await,
        0
    );
    assert_eq!(owed_after_shutdown(graft), 0, "nothing left to retry");
}
