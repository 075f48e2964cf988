//! A referrer deleted through graft must not stay listed when the upstream
//! deleted it but failed the answer (found by the soak): distribution
//! removes the manifest, then looks up the tags naming it to untag them,
//! and answers 500 when a tag link cannot be read — under load, a fallback
//! tag being rewritten at that moment. graft took the 500 for "not
//! deleted", so it listed the referrer forever, and every rewrite of the
//! subject's fallback tag named a manifest that no longer exists, which
//! the registry refuses (400).
//!
//! The unreadable tag link is made here on purpose (the registry's own
//! storage), so the registry answers 500 on every delete in that
//! repository while still deleting the manifest.

mod common;

use bytes::Bytes;
use reqwest::StatusCode;

use common::artifacts::{
    artifact, digests_of, push_by_digest, push_subject, referrer_list, referrers,
    upstream_fallback_digests, Subject, INDEX, MANIFEST,
};
use common::{sha256_digest, Api, Graft, Registry};

const REPO: &str = "app";

/// Makes every manifest DELETE in `REPO` fail after deleting: the link of
/// tag `tag` no longer holds a digest.
fn break_tag_link(registry: &Registry, tag: &str) {
    let link = registry
        .storage_dir()
        .join("docker/registry/v2/repositories")
        .join(REPO)
        .join("_manifests/tags")
        .join(tag)
        .join("current/link");
    assert!(link.is_file(), "no tag link at {}", link.display());
    std::fs::write(&link, b"not a digest").expect("overwrite the tag link");
}

/// Status of a HEAD of `digest` at the registry itself.
async fn upstream_head(direct: &Api, digest: &str) -> StatusCode {
    let head = direct
        .head(&format!("/v2/{REPO}/manifests/{digest}"))
        .header("accept", format!("{MANIFEST}, {INDEX}"));
    Api::send(head).await.status()
}

async fn listed(api: &Api, subject: &Subject) -> Vec<String> {
    digests_of(&referrer_list(referrers(api, REPO, &subject.digest, "").await).await)
}

/// Pushes a subject and two referrers of it through graft; breaks the
/// registry's deletes. Returns the subject and the two referrers.
async fn setup(registry: &Registry, api: &Api, direct: &Api) -> (Subject, Bytes, Bytes) {
    let subject = push_subject(direct, REPO, "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let sbom = artifact(&subject, Some("application/vnd.example.sbom"), None, None);
    push_by_digest(api, REPO, &sig).await;
    push_by_digest(api, REPO, &sbom).await;
    let mut both = vec![sha256_digest(&sig), sha256_digest(&sbom)];
    both.sort();
    assert_eq!(listed(api, &subject).await, both);
    break_tag_link(registry, "v1");
    (subject, sig, sbom)
}

#[tokio::test]
async fn a_referrer_the_upstream_deleted_behind_a_500_is_not_listed() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let (api, direct) = (Api::for_graft(&graft), Api::for_registry(&registry));
    let (subject, sig, sbom) = setup(&registry, &api, &direct).await;
    let sig_digest = sha256_digest(&sig);

    let resp = Api::send(api.delete(&format!("/v2/{REPO}/manifests/{sig_digest}"))).await;
    // The upstream's answer is passed on as it is.
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        upstream_head(&direct, &sig_digest).await,
        StatusCode::NOT_FOUND,
        "the registry deleted the manifest despite its 500"
    );

    let sbom_only = vec![sha256_digest(&sbom)];
    assert_eq!(listed(&api, &subject).await, sbom_only);
    assert_eq!(
        upstream_fallback_digests(&direct, REPO, &subject).await,
        sbom_only,
        "the fallback tag was rewritten without the deleted referrer"
    );

    // Pushed again, it is an upstream accept: it comes back.
    push_by_digest(&api, REPO, &sig).await;
    let mut both = vec![sig_digest, sha256_digest(&sbom)];
    both.sort();
    assert_eq!(listed(&api, &subject).await, both);
    assert_eq!(
        upstream_fallback_digests(&direct, REPO, &subject).await,
        both
    );
}
