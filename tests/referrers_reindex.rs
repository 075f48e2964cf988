//! `graft reindex` over a real distribution 2.8 registry populated behind
//! graft's back: subjects, referrers and fallback tags pushed straight to
//! the registry, then learned by walking the catalog and the tags.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::artifacts::{
    artifact, digests_of, expected_descriptor, graft_command, push_by_digest, push_signed_subject,
    push_subject, put_fallback_tag, referrer_list, referrers, upstream_fallback_digests, Subject,
    MANIFEST,
};
use common::{sha256_digest, Api, Graft, Registry, RegistryOptions, TestImage};
use graft::admin::reindex::{self, ReindexSummary};
use graft::config::FallbackTag;
use graft::index::Index;
use graft::oci::{Digest, RepoName};
use serde_json::{json, Value};

/// graft's configuration for `registry` with its data under `data_dir`.
fn config_for(registry: &Registry, data_dir: &Path) -> graft::Config {
    let mut config = graft::Config::default();
    config.upstream.url = registry.url();
    config.storage.data_dir = data_dir.to_path_buf();
    config
}

async fn reindex(config: &graft::Config, repos: &[&str]) -> ReindexSummary {
    let repos: Vec<RepoName> = repos
        .iter()
        .map(|r| RepoName::parse(r).expect("repository name"))
        .collect();
    reindex::run(config, &repos, &graft::admin::Silent)
        .await
        .expect("reindex runs")
}

/// What the index (opened after the reindex closed it) lists for a subject,
/// as JSON descriptors.
fn indexed(data_dir: &Path, repo: &str, subject: &str) -> Vec<Value> {
    let index = Index::open(&data_dir.join("index")).expect("the reindex closed the index");
    let subject: Digest = subject.parse().expect("digest");
    index
        .referrers()
        .list(&RepoName::parse(repo).expect("name"), &subject)
        .expect("list")
        .iter()
        .map(|d| serde_json::to_value(d).expect("descriptor JSON"))
        .collect()
}

fn sorted(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    v
}

#[tokio::test]
async fn reindex_learns_fallback_tags_written_straight_to_the_registry() {
    let registry = Registry::start();
    let upstream = Api::for_registry(&registry);

    // team/app: a signature and an SBOM, and a plain image that an old
    // client wrongly listed in the tag.
    let app = push_subject(&upstream, "team/app", "v1").await;
    let sig = artifact(
        &app,
        Some("application/vnd.example.sig"),
        None,
        Some(json!({"com.example.key": "k1"})),
    );
    let sbom = artifact(&app, Some("application/spdx+json"), None, None);
    push_by_digest(&upstream, "team/app", &sig).await;
    push_by_digest(&upstream, "team/app", &sbom).await;
    let plain = TestImage::build(1);
    upstream.push_image("team/app", "plain", &plain).await;
    put_fallback_tag(
        &upstream,
        "team/app",
        &app.fallback_tag(),
        &[
            expected_descriptor(&sig),
            expected_descriptor(&sbom),
            plain.descriptor(),
        ],
    )
    .await;

    // other: a signature and, under it, a countersignature (a referrer of
    // a referrer, with a fallback tag of its own).
    let other = push_subject(&upstream, "other", "v1").await;
    let other_sig = artifact(&other, Some("application/vnd.example.sig"), None, None);
    push_by_digest(&upstream, "other", &other_sig).await;
    let sig_subject = Subject::of(&other_sig, MANIFEST);
    let counter = artifact(
        &sig_subject,
        Some("application/vnd.example.countersig"),
        None,
        None,
    );
    push_by_digest(&upstream, "other", &counter).await;
    put_fallback_tag(
        &upstream,
        "other",
        &other.fallback_tag(),
        &[expected_descriptor(&other_sig)],
    )
    .await;
    put_fallback_tag(
        &upstream,
        "other",
        &sig_subject.fallback_tag(),
        &[expected_descriptor(&counter)],
    )
    .await;

    // long/digest: a sha512 subject, whose tag is truncated and so does not
    // name the subject whole; the entry's own `subject` decides. The tag
    // also lists a referrer of another subject (a client's mistake), which
    // the tag does not make a referrer of anything.
    let image = push_subject(&upstream, "long/digest", "v1").await;
    let stray = artifact(&image, Some("application/vnd.example.sig"), None, None);
    push_by_digest(&upstream, "long/digest", &stray).await;
    let long = Subject {
        digest: format!("sha512:{}", "cd".repeat(64)),
        size: 99,
        media_type: MANIFEST,
    };
    let long_sig = artifact(&long, Some("application/vnd.example.sig"), None, None);
    push_by_digest(&upstream, "long/digest", &long_sig).await;
    put_fallback_tag(
        &upstream,
        "long/digest",
        &format!("sha512-{}", &"cd".repeat(64)[..64]),
        &[expected_descriptor(&long_sig), expected_descriptor(&stray)],
    )
    .await;

    // no/referrers: tags, none of them a fallback tag.
    push_subject(&upstream, "no/referrers", "v1").await;

    let data = tempfile::tempdir().expect("data dir");
    let config = config_for(&registry, data.path());
    let summary = reindex(&config, &[]).await;
    assert_eq!(
        summary,
        ReindexSummary {
            repositories: 4,
            subjects: 4,
            referrers_added: 5,
            entries: 7,
            undecided: 0,
            problems: vec![],
        },
        "{summary}"
    );
    assert_eq!(
        summary.to_string(),
        "repositories: 4\nsubjects: 4\nreferrers added: 5"
    );

    assert_eq!(
        indexed(data.path(), "team/app", &app.digest),
        sorted(vec![expected_descriptor(&sig), expected_descriptor(&sbom)]),
        "the plain image is no referrer and stays out"
    );
    assert_eq!(
        indexed(data.path(), "other", &other.digest),
        vec![expected_descriptor(&other_sig)]
    );
    assert_eq!(
        indexed(data.path(), "other", &sig_subject.digest),
        vec![expected_descriptor(&counter)]
    );
    assert_eq!(
        indexed(data.path(), "long/digest", &long.digest),
        vec![expected_descriptor(&long_sig)]
    );
    assert!(indexed(data.path(), "long/digest", &image.digest).is_empty());

    // Idempotent: a second walk finds everything known.
    let again = reindex(&config, &[]).await;
    assert_eq!((again.subjects, again.referrers_added), (4, 0), "{again}");

    // One repository, and one the upstream does not know.
    let one = reindex(&config, &["other", "no/such/repo"]).await;
    assert_eq!((one.repositories, one.subjects), (1, 2), "{one}");
    assert!(!one.is_complete());
    assert_eq!(
        one.problems,
        vec!["no/such/repo: no such repository upstream".to_owned()]
    );

    // The index now carries what the tag said: with the tag gone from the
    // registry (deleting its manifest drops the tag), graft in read mode
    // still lists both referrers, and does not write the tag back.
    let tag_digest = sha256_digest(&common::artifacts::fallback_index(&[
        expected_descriptor(&sig),
        expected_descriptor(&sbom),
        plain.descriptor(),
    ]));
    let resp = Api::send(upstream.delete(&format!("/v2/team/app/manifests/{tag_digest}"))).await;
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
    assert!(upstream_fallback_digests(&upstream, "team/app", &app)
        .await
        .is_empty());
    let graft = Graft::start_with(&registry, |c| {
        c.storage.data_dir = data.path().to_path_buf();
        c.referrers.fallback_tag = FallbackTag::Read;
    });
    let api = Api::for_graft(&graft);
    let list = referrer_list(referrers(&api, "team/app", &app.digest, "").await).await;
    assert_eq!(
        digests_of(&list),
        digests_of(&[expected_descriptor(&sig), expected_descriptor(&sbom)])
    );
    assert!(upstream_fallback_digests(&upstream, "team/app", &app)
        .await
        .is_empty());
}

#[tokio::test]
async fn reindex_walks_every_page_of_the_catalog() {
    // distribution lists 100 repositories a page; the one with referrers
    // sorts last, on the second page.
    let registry = Registry::start();
    let upstream = Api::for_registry(&registry);
    let filler = TestImage::from_parts(
        common::image::Blob::new(
            "application/vnd.oci.empty.v1+json",
            Bytes::from_static(b"{}"),
        ),
        vec![],
    );
    upstream.push_image("filler/r000", "v1", &filler).await;
    for i in 1..110 {
        let repo = format!("filler/r{i:03}");
        let mount = Api::send(upstream.request(
            reqwest::Method::POST,
            &format!(
                "/v2/{repo}/blobs/uploads/?mount={}&from=filler/r000",
                filler.config.digest
            ),
        ))
        .await;
        assert_eq!(mount.status(), reqwest::StatusCode::CREATED, "mount");
        upstream
            .push_manifest(&repo, "v1", MANIFEST, filler.manifest.clone())
            .await;
    }
    let (subject, sig) = push_signed_subject(&upstream, "zz/last").await;

    let data = tempfile::tempdir().expect("data dir");
    let summary = reindex(&config_for(&registry, data.path()), &[]).await;
    assert_eq!(
        (
            summary.repositories,
            summary.subjects,
            summary.referrers_added
        ),
        (111, 1, 1),
        "{summary}"
    );
    assert!(
        registry
            .access_log()
            .iter()
            .any(|e| e.uri.starts_with("/v2/_catalog?last=")),
        "the second catalog page was never asked for"
    );
    assert_eq!(
        indexed(data.path(), "zz/last", &subject.digest),
        vec![expected_descriptor(&sig)]
    );
}

#[tokio::test]
async fn reindex_reads_a_protected_registry_with_graft_s_own_credentials() {
    let registry = Registry::start_with(RegistryOptions::default().basic_auth("robot", "s3cret"));
    let upstream = Api::for_registry(&registry);
    let (subject, sig) = push_signed_subject(&upstream, "app").await;
    let data = tempfile::tempdir().expect("data dir");
    let mut config = config_for(&registry, data.path());

    // Anonymous: the catalog is refused, and so are the tags.
    let refused = reindex::run(&config, &[], &graft::admin::Silent)
        .await
        .expect_err("the catalog needs credentials");
    assert!(refused.to_string().contains("--repo"), "{refused}");
    let anonymous = reindex(&config, &["app"]).await;
    assert_eq!(anonymous.subjects, 0);
    assert!(
        anonymous.problems[0].contains("401"),
        "{:?}",
        anonymous.problems
    );

    config.upstream.username = Some("robot".into());
    config.upstream.password = Some("s3cret".into());
    let summary = reindex(&config, &[]).await;
    assert_eq!(
        (
            summary.repositories,
            summary.subjects,
            summary.referrers_added
        ),
        (1, 1, 1),
        "{summary}"
    );
    assert_eq!(
        indexed(data.path(), "app", &subject.digest),
        vec![expected_descriptor(&sig)]
    );
}

#[tokio::test]
async fn graft_reindex_prints_a_summary_and_refuses_an_index_in_use() {
    let registry = Registry::start();
    let upstream = Api::for_registry(&registry);
    let (subject, sig) = push_signed_subject(&upstream, "app").await;

    let work = tempfile::tempdir().expect("work dir");
    let data = work.path().join("data");
    let run = |data: &Path| {
        graft_command(work.path())
            .args(["reindex", "--upstream", &registry.url(), "--repo", "app"])
            .arg("--data-dir")
            .arg(data)
            .output()
            .expect("run graft reindex")
    };
    let out = run(&data);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "repositories: 1\nsubjects: 1\nreferrers added: 1\n");

    // What the run indexed is what graft serves (the answer also shows
    // graft is up and holds the index).
    let graft = Graft::start_with(&registry, |c| c.storage.data_dir = data.clone());
    let list =
        referrer_list(referrers(&Api::for_graft(&graft), "app", &subject.digest, "").await).await;
    assert_eq!(list, vec![expected_descriptor(&sig)]);

    // While graft runs, the command says the index is in use and fails at
    // once rather than waiting for the lock.
    let started = std::time::Instant::now();
    let out = run(&data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "reindex ran beside graft serve");
    assert!(
        stderr.contains("is in use by another graft process (stop it first)"),
        "stderr: {stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(out.stdout.is_empty(), "no summary when nothing ran");
}
