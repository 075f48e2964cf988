//! Several grafts (each with its own data directory) in front of one real
//! distribution 2.8 registry converge: with writes for one subject landing
//! on different replicas — pushes with `subject`, old-style fallback-tag
//! writes straight at the registry, deletes through any replica — every
//! replica's referrers API and the upstream fallback tag list exactly the
//! referrer manifests the registry holds, on the next query after the
//! writes stop (`referrers.tag_ttl = 0`).
//!
//! The old clients' read-modify-writes here do not overlap other writes:
//! one that does may drop an entry only the replica that pushed it knows,
//! and that replica restores it on its own next read of the tag.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::artifacts::{
    artifact, digests_of, expected_descriptor, push_by_digest, push_subject, put_fallback_tag,
    referrer_list, referrers, upstream_fallback_digests, Subject, INDEX, MANIFEST,
};
use common::{sha256_digest, Api, Graft, Registry};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::Value;

/// `n` grafts in front of `registry`, each reading the fallback tag on
/// every query.
fn replicas(registry: &Registry, n: usize) -> Vec<Graft> {
    (0..n)
        .map(|_| Graft::start_with(registry, |c| c.referrers.tag_ttl = Duration::ZERO))
        .collect()
}

/// A referrer of `subject` of kind `kind` (not pushed).
fn referrer(subject: &Subject, kind: &str) -> Bytes {
    artifact(subject, Some(kind), None, None)
}

/// Deletes `manifest` by digest through `api` (a replica).
async fn delete(api: &Api, manifest: &[u8]) {
    let path = format!("/v2/app/manifests/{}", sha256_digest(manifest));
    let resp = Api::send(api.delete(&path)).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "DELETE {path}");
}

/// Whether the registry holds `digest`, asked with the OCI Accept types
/// (distribution 2.8 answers 404 to a HEAD of an OCI manifest without).
async fn registry_holds(upstream: &Api, digest: &str) -> bool {
    let resp = Api::send(
        upstream
            .head(&format!("/v2/app/manifests/{digest}"))
            .header("accept", format!("{MANIFEST}, {INDEX}")),
    )
    .await;
    match resp.status() {
        StatusCode::OK => true,
        StatusCode::NOT_FOUND => false,
        other => panic!("HEAD {digest} at the registry: {other}"),
    }
}

/// The sorted digests of `candidates` the registry still holds.
async fn held(upstream: &Api, candidates: &[Bytes]) -> Vec<String> {
    let mut out = Vec::new();
    for m in candidates {
        let d = sha256_digest(m);
        if registry_holds(upstream, &d).await {
            out.push(d);
        }
    }
    out.sort();
    out
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

/// The convergence check: one query on each replica (in turn), then every
/// replica's answer and the upstream tag equal what the registry holds.
async fn assert_converged(apis: &[Api], upstream: &Api, subject: &Subject, want: &[String]) {
    for (i, api) in apis.iter().enumerate() {
        assert_eq!(
            listed(api, subject).await,
            want,
            "replica {i}'s API on the first query after the writes"
        );
    }
    assert_eq!(
        upstream_fallback_digests(upstream, "app", subject).await,
        want,
        "the upstream fallback tag"
    );
    for (i, api) in apis.iter().enumerate() {
        assert_eq!(listed(api, subject).await, want, "replica {i}'s API again");
    }
    assert_eq!(
        upstream_fallback_digests(upstream, "app", subject).await,
        want,
        "the upstream fallback tag, after every replica read it"
    );
}

/// Stops `graft` and counts the fallback-tag writes its index still owes
/// (an owed write is retried by recovery: one left over is a loop).
fn owed_after_shutdown(mut graft: Graft) -> usize {
    graft.begin_shutdown();
    graft
        .wait_stopped(Duration::from_secs(30))
        .expect("graft stops cleanly");
    let index = graft::index::Index::open(&graft.data_dir().join("index")).expect("index");
    let owed = index.intents().owed_tag_writes().expect("owed writes");
    owed.len()
}

async fn dropped_writes(api: &Api) -> u64 {
    common::read_metric(api, "graft_referrers_tag_writes_dropped_total")
        .await
        .expect("graft exports graft_referrers_tag_writes_dropped_total")
}

/// An old-style client (through `via`: the registry itself, or a replica)
/// pushes `manifest` and adds it to the fallback tag by read-modify-write.
async fn old_client_attach(via: &Api, subject: &Subject, manifest: &Bytes) {
    push_by_digest(via, "app", manifest).await;
    let resp = Api::send(
        via.get(&format!("/v2/app/manifests/{}", subject.fallback_tag()))
            .header("accept", INDEX),
    )
    .await;
    let mut entries: Vec<Value> = if resp.status() == StatusCode::OK {
        let body: Value = resp.json().await.expect("fallback tag JSON");
        body["manifests"].as_array().cloned().unwrap_or_default()
    } else {
        Vec::new()
    };
    entries.push(expected_descriptor(manifest));
    put_fallback_tag(via, "app", &subject.fallback_tag(), &entries).await;
}

#[tokio::test]
async fn the_issue_sequence_attach_four_across_two_replicas_delete_one_via_each() {
    let registry = Registry::start();
    let grafts = replicas(&registry, 2);
    let apis: Vec<Api> = grafts.iter().map(Api::for_graft).collect();
    let (a, b) = (&apis[0], &apis[1]);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(a, "app", "v1").await;
    let refs: Vec<Bytes> = (0..4)
        .map(|i| referrer(&subject, &format!("application/vnd.example.{i}")))
        .collect();
    push_by_digest(a, "app", &refs[0]).await;
    push_by_digest(b, "app", &refs[1]).await;
    push_by_digest(a, "app", &refs[2]).await;
    push_by_digest(b, "app", &refs[3]).await;
    let all = digests(&refs.iter().collect::<Vec<_>>());
    assert_converged(&apis, &upstream, &subject, &all).await;

    delete(a, &refs[0]).await;
    let three = digests(&[&refs[1], &refs[2], &refs[3]]);
    assert_eq!(listed(b, &subject).await, three, "B after a delete via A");
    delete(b, &refs[1]).await;

    let want = digests(&[&refs[2], &refs[3]]);
    assert_eq!(held(&upstream, &refs).await, want, "the premise");
    assert_converged(&apis, &upstream, &subject, &want).await;
    for api in &apis {
        assert_eq!(dropped_writes(api).await, 0, "no write was given up");
    }
    for g in grafts {
        assert_eq!(owed_after_shutdown(g), 0, "nothing left to retry");
    }
}

#[tokio::test]
async fn concurrent_pushes_old_clients_and_deletes_converge_on_two_replicas() {
    converge_under_mixed_writes(2).await;
}

#[tokio::test]
async fn concurrent_pushes_old_clients_and_deletes_converge_on_three_replicas() {
    converge_under_mixed_writes(3).await;
}

/// Concurrent pushes split across `n` replicas, old-style tag writes
/// straight at the registry, deletes spread across the replicas (some
/// concurrent with pushes), then the convergence check.
async fn converge_under_mixed_writes(n: usize) {
    let registry = Registry::start();
    let grafts = replicas(&registry, n);
    let apis: Vec<Api> = grafts.iter().map(Api::for_graft).collect();
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&apis[0], "app", "v1").await;

    let first: Vec<Bytes> = (0..12)
        .map(|i| referrer(&subject, &format!("application/vnd.example.first{i}")))
        .collect();
    join_all(
        first
            .iter()
            .enumerate()
            .map(|(i, m)| push_by_digest(&apis[i % n], "app", m)),
    )
    .await;

    let old: Vec<Bytes> = (0..2)
        .map(|i| referrer(&subject, &format!("application/vnd.example.old{i}")))
        .collect();
    // Old clients write the tag themselves: one straight at the registry,
    // one through the last replica.
    old_client_attach(&upstream, &subject, &old[0]).await;
    old_client_attach(&apis[n - 1], &subject, &old[1]).await;

    // A second wave: pushes and deletes at once, spread across replicas.
    let second: Vec<Bytes> = (0..6)
        .map(|i| referrer(&subject, &format!("application/vnd.example.second{i}")))
        .collect();
    let doomed = [&first[0], &first[3], &first[7], &first[10], &old[0]];
    let pushes = second
        .iter()
        .enumerate()
        .map(|(i, m)| push_by_digest(&apis[(i + 1) % n], "app", m))
        .collect::<Vec<_>>();
    let deletes = doomed
        .iter()
        .enumerate()
        .map(|(i, m)| delete(&apis[i % n], m))
        .collect::<Vec<_>>();
    futures_util::future::join(join_all(pushes), join_all(deletes)).await;

    let everything: Vec<Bytes> = first.iter().chain(&old).chain(&second).cloned().collect();
    let want = held(&upstream, &everything).await;
    assert_eq!(want.len(), everything.len() - doomed.len(), "the premise");
    assert_converged(&apis, &upstream, &subject, &want).await;
    for g in grafts {
        assert_eq!(owed_after_shutdown(g), 0, "nothing left to retry");
    }
}
