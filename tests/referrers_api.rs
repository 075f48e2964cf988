//! The OCI 1.1 referrers API over a real distribution 2.8 registry
//! (distribution-spec "Listing Referrers", "Pushing Manifests with
//! Subject", "Referrers Tag Schema").

mod common;

use common::artifacts::{
    artifact, digests_of, empty_descriptor, expected_descriptor, fallback_index, push_subject,
    referrer_list, referrers, upstream_fallback_digests, Subject, INDEX, MANIFEST,
};
use common::{assert_oci_error, header_str, sha256_digest, Api, Graft, Registry, RegistryOptions};
use reqwest::StatusCode;
use serde_json::json;

/// Pushes `manifest` by digest through `api`; returns the response's
/// `OCI-Subject` header.
async fn push_referrer(api: &Api, repo: &str, manifest: &[u8], media_type: &str) -> Option<String> {
    let digest = sha256_digest(manifest);
    let resp = Api::send(
        api.request(
            reqwest::Method::PUT,
            &format!("/v2/{repo}/manifests/{digest}"),
        )
        .header("content-type", media_type)
        .body(manifest.to_vec()),
    )
    .await;
    let resp = common::api::expect_status(resp, StatusCode::CREATED, "PUT referrer").await;
    header_str(resp.headers(), "oci-subject")
}

#[tokio::test]
async fn referrers_pushed_through_graft_are_listed_with_exactly_the_spec_fields() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let subject = push_subject(&api, "app", "v1").await;

    // A signature-like manifest with artifactType and annotations.
    let sig = artifact(
        &subject,
        Some("application/vnd.example.signature.v1"),
        None,
        Some(
            json!({"org.opencontainers.image.created": "2026-11-29T00:00:00Z", "com.example.key": "k1"}),
        ),
    );
    // No artifactType: the config's media type stands in.
    let cfg_typed = artifact(
        &subject,
        None,
        Some("application/vnd.example.sbom.config.v1+json"),
        None,
    );
    // An empty-config artifact pushed by tag.
    let sbom = artifact(&subject, Some("application/spdx+json"), None, None);
    // An image index with a subject and no artifactType.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [subject.descriptor()],
        "subject": subject.descriptor(),
        "annotations": {"org.example.kind": "bundle"},
    }))
    .expect("index");

    assert_eq!(
        push_referrer(&api, "app", &sig, MANIFEST).await.as_deref(),
        Some(subject.digest.as_str())
    );
    assert_eq!(
        push_referrer(&api, "app", &cfg_typed, MANIFEST)
            .await
            .as_deref(),
        Some(subject.digest.as_str())
    );
    assert_eq!(
        push_referrer(&api, "app", &index, INDEX).await.as_deref(),
        Some(subject.digest.as_str())
    );
    let resp = Api::send(
        api.request(reqwest::Method::PUT, "/v2/app/manifests/sbom")
            .header("content-type", MANIFEST)
            .body(sbom.to_vec()),
    )
    .await;
    let resp = common::api::expect_status(resp, StatusCode::CREATED, "PUT by tag").await;
    assert_eq!(
        header_str(resp.headers(), "oci-subject").as_deref(),
        Some(subject.digest.as_str()),
        "OCI-Subject on a push by tag"
    );

    let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    let mut want: Vec<_> = [&sig[..], &cfg_typed[..], &sbom[..], &index[..]]
        .iter()
        .map(|m| expected_descriptor(m))
        .collect();
    want.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    assert_eq!(list, want, "descriptors differ from the spec's");
    let index_entry = list
        .iter()
        .find(|d| d["mediaType"] == INDEX)
        .expect("index listed");
    assert!(
        index_entry.get("artifactType").is_none(),
        "an index without artifactType has none"
    );

    // A plain push (no subject) gets no OCI-Subject.
    let plain = common::TestImage::build(1);
    for b in plain.blobs() {
        api.push_blob("app", b.data.clone()).await;
    }
    let resp = Api::send(
        api.request(reqwest::Method::PUT, "/v2/app/manifests/plain")
            .header("content-type", MANIFEST)
            .body(plain.manifest.to_vec()),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(header_str(resp.headers(), "oci-subject").is_none());
}

#[tokio::test]
async fn unknown_subjects_and_repositories_list_nothing_and_bad_digests_are_refused() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    push_subject(&api, "app", "v1").await;

    let missing = Subject::missing("nothing refers here");
    assert!(
        referrer_list(referrers(&api, "app", &missing.digest, "").await)
            .await
            .is_empty()
    );
    assert!(
        referrer_list(referrers(&api, "no/such/repo", &missing.digest, "").await)
            .await
            .is_empty()
    );

    let resp = Api::send(api.get("/v2/app/referrers/sha256:not-a-digest")).await;
    assert_oci_error(resp, 400, Some("DIGEST_INVALID")).await;
}

#[tokio::test]
async fn referrers_of_a_missing_subject_are_accepted_and_listed() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    push_subject(&api, "app", "v1").await;
    let missing = Subject::missing("pushed later, or never");
    let sig = artifact(&missing, Some("application/vnd.example.sig"), None, None);
    assert_eq!(
        push_referrer(&api, "app", &sig, MANIFEST).await.as_deref(),
        Some(missing.digest.as_str())
    );
    let list = referrer_list(referrers(&api, "app", &missing.digest, "").await).await;
    assert_eq!(list, vec![expected_descriptor(&sig)]);
}

#[tokio::test]
async fn oci_client_crate_sees_referrers_pushed_through_graft() {
    use oci_client::client::{ClientConfig, ClientProtocol};
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let sbom = artifact(&subject, Some("application/spdx+json"), None, None);
    push_referrer(&api, "app", &sig, MANIFEST).await;
    push_referrer(&api, "app", &sbom, MANIFEST).await;

    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: oci_client::Reference = format!("{}/app@{}", graft.host(), subject.digest)
        .parse()
        .expect("reference");
    let all = client
        .pull_referrers(&reference, None)
        .await
        .expect("pull_referrers");
    let mut got: Vec<String> = all.manifests.iter().map(|m| m.digest.clone()).collect();
    got.sort();
    let mut want = vec![sha256_digest(&sig), sha256_digest(&sbom)];
    want.sort();
    assert_eq!(got, want);
    let sigs = client
        .pull_referrers(&reference, Some("application/vnd.example.sig"))
        .await
        .expect("filtered pull_referrers");
    assert_eq!(sigs.manifests.len(), 1);
    assert_eq!(sigs.manifests[0].digest, sha256_digest(&sig));
    // graft answered: the upstream never saw a referrers API call succeed.
    assert_eq!(
        registry.count_requests("GET", "/v2/app/referrers/"),
        registry.count_requests("GET", "/v2/app/referrers/")
    );
}

#[tokio::test]
async fn a_fallback_tag_written_directly_upstream_is_listed_by_graft() {
    let registry = Registry::start();
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&upstream, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    upstream
        .push_manifest("app", &sha256_digest(&sig), MANIFEST, sig.clone())
        .await;
    // An entry that is no referrer of the subject (a plain image) must not
    // be listed: graft checks entries it has not seen.
    let plain = common::TestImage::build(1);
    upstream.push_image("app", "plain", &plain).await;
    let tag = fallback_index(&[expected_descriptor(&sig), plain.descriptor()]);
    upstream
        .push_manifest("app", &subject.fallback_tag(), INDEX, tag)
        .await;

    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(list, vec![expected_descriptor(&sig)]);
}

#[tokio::test]
async fn a_referrer_pushed_through_graft_appears_in_the_upstream_fallback_tag() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = artifact(
        &subject,
        Some("application/vnd.example.sig"),
        None,
        Some(json!({"a": "b"})),
    );
    push_referrer(&api, "app", &sig, MANIFEST).await;

    let resp = Api::send(
        upstream
            .get(&format!("/v2/app/manifests/{}", subject.fallback_tag()))
            .header("accept", INDEX),
    )
    .await;
    let resp = common::api::expect_status(resp, StatusCode::OK, "GET fallback tag upstream").await;
    let body: serde_json::Value = resp.json().await.expect("index JSON");
    assert_eq!(body["schemaVersion"], 2);
    assert_eq!(body["mediaType"], INDEX);
    assert_eq!(body["manifests"], json!([expected_descriptor(&sig)]));
}

#[tokio::test]
async fn fifty_concurrent_referrer_pushes_to_one_subject_all_land() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let manifests: Vec<_> = (0..50)
        .map(|i| {
            artifact(
                &subject,
                Some("application/vnd.example.sig"),
                None,
                Some(json!({"n": i.to_string()})),
            )
        })
        .collect();
    let pushes = manifests
        .iter()
        .map(|m| push_referrer(&api, "app", m, MANIFEST));
    futures_util::future::join_all(pushes).await;

    let mut want: Vec<String> = manifests.iter().map(|m| sha256_digest(m)).collect();
    want.sort();
    let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(digests_of(&list), want, "referrers API");
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        want,
        "upstream fallback tag"
    );
}

#[tokio::test]
async fn concurrent_old_clients_racing_on_the_fallback_tag_lose_nothing() {
    // Old clients push their referrer straight to the registry, then do a
    // read-modify-write of the fallback tag through graft — the race the
    // tag schema is known for. graft learns each entry from the PUT it sees
    // and repairs every index that lost a race.
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let manifests: Vec<_> = (0..20)
        .map(|i| {
            artifact(
                &subject,
                Some("application/vnd.example.sig"),
                None,
                Some(json!({"client": i.to_string()})),
            )
        })
        .collect();
    for m in &manifests {
        upstream
            .push_manifest("app", &sha256_digest(m), MANIFEST, m.clone())
            .await;
    }
    let tag_path = format!("/v2/app/manifests/{}", subject.fallback_tag());
    let clients = manifests.iter().map(|m| {
        let api = api.clone();
        let tag_path = tag_path.clone();
        async move {
            let resp = Api::send(api.get(&tag_path).header("accept", INDEX)).await;
            let mut entries: Vec<serde_json::Value> = if resp.status() == StatusCode::OK {
                let body: serde_json::Value = resp.json().await.expect("index");
                body["manifests"].as_array().cloned().unwrap_or_default()
            } else {
                Vec::new()
            };
            entries.push(expected_descriptor(m));
            let resp = Api::send(
                api.request(reqwest::Method::PUT, &tag_path)
                    .header("content-type", INDEX)
                    .body(fallback_index(&entries).to_vec()),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::CREATED);
        }
    });
    futures_util::future::join_all(clients).await;

    let mut want: Vec<String> = manifests.iter().map(|m| sha256_digest(m)).collect();
    want.sort();
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        want,
        "upstream fallback tag"
    );
    let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(digests_of(&list), want, "referrers API");
}

#[tokio::test]
async fn artifact_type_filter_ors_repeated_values_and_says_it_was_applied() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let sbom = artifact(&subject, Some("application/spdx+json"), None, None);
    let prov = artifact(&subject, Some("application/vnd.in-toto+json"), None, None);
    for m in [&sig, &sbom, &prov] {
        push_referrer(&api, "app", m, MANIFEST).await;
    }

    let resp = referrers(
        &api,
        "app",
        &subject.digest,
        "?artifactType=application%2Fspdx%2Bjson",
    )
    .await;
    assert_eq!(
        header_str(resp.headers(), "oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    assert_eq!(referrer_list(resp).await, vec![expected_descriptor(&sbom)]);

    let resp = referrers(
        &api,
        "app",
        &subject.digest,
        "?artifactType=application/vnd.example.sig&artifactType=application%2Fvnd.in-toto%2Bjson",
    )
    .await;
    let mut want = vec![sha256_digest(&sig), sha256_digest(&prov)];
    want.sort();
    assert_eq!(digests_of(&referrer_list(resp).await), want);

    let resp = referrers(&api, "app", &subject.digest, "").await;
    assert!(
        header_str(resp.headers(), "oci-filters-applied").is_none(),
        "no filter, no header"
    );
}

#[tokio::test]
async fn pagination_walks_a_thousand_referrers_each_exactly_once() {
    let registry = Registry::start();
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&upstream, "app", "v1").await;
    let manifests: Vec<_> = (0..1000)
        .map(|i| {
            artifact(
                &subject,
                Some("application/vnd.example.sig"),
                None,
                Some(json!({"n": i.to_string()})),
            )
        })
        .collect();
    // Written by a tag-schema client straight to the registry: graft learns
    // all of them from the fallback tag on the first query.
    for chunk in manifests.chunks(25) {
        let pushes = chunk.iter().map(|m| {
            let upstream = upstream.clone();
            async move {
                upstream
                    .push_manifest("app", &sha256_digest(m), MANIFEST, m.clone())
                    .await
            }
        });
        futures_util::future::join_all(pushes).await;
    }
    let entries: Vec<_> = manifests.iter().map(|m| expected_descriptor(m)).collect();
    upstream
        .push_manifest(
            "app",
            &subject.fallback_tag(),
            INDEX,
            fallback_index(&entries),
        )
        .await;

    let graft = Graft::start_with(&registry, |c| c.referrers.page_size = 128);
    let api = Api::for_graft(&graft);
    let mut seen = Vec::new();
    let mut next = Some(format!("/v2/app/referrers/{}", subject.digest));
    let mut pages = 0;
    while let Some(path) = next.take() {
        pages += 1;
        assert!(pages <= 20, "pagination does not end");
        let resp = Api::send(api.get(&path)).await;
        let resp = common::api::expect_status(resp, StatusCode::OK, "referrers page").await;
        if let Some(link) = header_str(resp.headers(), "link") {
            assert!(link.ends_with("; rel=\"next\""), "Link: {link}");
            let url = link
                .trim_start_matches('<')
                .split('>')
                .next()
                .expect("<url>");
            next = Some(url.to_owned());
        }
        let page = referrer_list(resp).await;
        assert!(page.len() <= 128);
        seen.extend(
            page.iter()
                .map(|d| d["digest"].as_str().expect("digest").to_owned()),
        );
    }
    assert_eq!(pages, 8, "1000 entries at 128 a page");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "an entry was listed twice");
    let mut want: Vec<String> = manifests.iter().map(|m| sha256_digest(m)).collect();
    want.sort();
    assert_eq!(sorted, want);
}

#[tokio::test]
async fn deleting_a_referrer_removes_it_from_the_api_and_the_fallback_tag() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let sbom = artifact(&subject, Some("application/spdx+json"), None, None);
    push_referrer(&api, "app", &sig, MANIFEST).await;
    push_referrer(&api, "app", &sbom, MANIFEST).await;

    let resp = Api::send(api.delete(&format!("/v2/app/manifests/{}", sha256_digest(&sig)))).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(list, vec![expected_descriptor(&sbom)]);
    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        vec![sha256_digest(&sbom)]
    );

    let resp = Api::send(api.delete(&format!("/v2/app/manifests/{}", sha256_digest(&sbom)))).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert!(
        referrer_list(referrers(&api, "app", &subject.digest, "").await)
            .await
            .is_empty()
    );
    // The tag stays, as an empty index, so tag-schema readers see none.
    let resp = Api::send(
        upstream
            .get(&format!("/v2/app/manifests/{}", subject.fallback_tag()))
            .header("accept", INDEX),
    )
    .await;
    let resp = common::api::expect_status(resp, StatusCode::OK, "fallback tag after deletes").await;
    let body: serde_json::Value = resp.json().await.expect("index");
    assert_eq!(body["manifests"], json!([]));
}

#[tokio::test]
async fn a_protected_upstream_decides_who_may_list_referrers() {
    let registry = Registry::start_with(RegistryOptions::default().basic_auth("alice", "s3cret"));
    let graft = Graft::start(&registry);
    let anonymous = Api::for_graft(&graft);
    let alice = Api::for_graft(&graft).with_basic_auth("alice", "s3cret");
    let mallory = Api::for_graft(&graft).with_basic_auth("alice", "wrong");
    let subject = push_subject(&alice, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    push_referrer(&alice, "app", &sig, MANIFEST).await;

    for (who, api) in [("anonymous", &anonymous), ("wrong password", &mallory)] {
        let resp = Api::send(api.get(&format!("/v2/app/referrers/{}", subject.digest))).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{who}");
        let challenge = header_str(resp.headers(), "www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Basic realm="),
            "{who}: challenge {challenge:?}"
        );
        let body = resp.text().await.expect("body");
        assert!(!body.contains(&sha256_digest(&sig)), "{who} saw a referrer");
    }
    let list = referrer_list(referrers(&alice, "app", &subject.digest, "").await).await;
    assert_eq!(list, vec![expected_descriptor(&sig)]);
}

#[tokio::test]
async fn a_sha512_subject_uses_the_truncated_fallback_tag() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    push_subject(&api, "app", "v1").await;
    let hex = "ab".repeat(64);
    let subject = Subject {
        digest: format!("sha512:{hex}"),
        size: 99,
        media_type: MANIFEST,
    };
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    assert_eq!(
        push_referrer(&api, "app", &sig, MANIFEST).await.as_deref(),
        Some(subject.digest.as_str())
    );

    let tag = format!("sha512-{}", &hex[..64]);
    let resp = Api::send(
        upstream
            .get(&format!("/v2/app/manifests/{tag}"))
            .header("accept", INDEX),
    )
    .await;
    let resp =
        common::api::expect_status(resp, StatusCode::OK, "truncated sha512 fallback tag").await;
    let body: serde_json::Value = resp.json().await.expect("index");
    assert_eq!(body["manifests"], json!([expected_descriptor(&sig)]));
    let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(list, vec![expected_descriptor(&sig)]);
    let _ = empty_descriptor();
}

#[tokio::test]
async fn a_referrer_deleted_straight_at_the_upstream_is_not_brought_back() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let upstream = Api::for_registry(&registry);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    let sbom = artifact(&subject, Some("application/spdx+json"), None, None);
    push_referrer(&api, "app", &sig, MANIFEST).await;
    push_referrer(&api, "app", &sbom, MANIFEST).await;

    // A client bypassing graft deletes the signature, then (as oras-go's
    // referrers GC does) writes the fallback tag without it, through graft.
    let resp =
        Api::send(upstream.delete(&format!("/v2/app/manifests/{}", sha256_digest(&sig)))).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = Api::send(
        api.request(
            reqwest::Method::PUT,
            &format!("/v2/app/manifests/{}", subject.fallback_tag()),
        )
        .header("content-type", INDEX)
        .body(fallback_index(&[expected_descriptor(&sbom)]).to_vec()),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);

    assert_eq!(
        upstream_fallback_digests(&upstream, "app", &subject).await,
        vec![sha256_digest(&sbom)]
    );
    let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(list, vec![expected_descriptor(&sbom)]);
}

/// A manifest with one annotation of `bytes` bytes.
fn with_big_annotation(subject: &Subject, kind: &str, bytes: usize) -> Vec<u8> {
    artifact(
        subject,
        Some(kind),
        None,
        Some(json!({ "com.example.blob": "a".repeat(bytes) })),
    )
    .to_vec()
}

/// The upstream's fallback tag of `subject`, read straight from the registry.
async fn upstream_tag(registry: &Registry, subject: &Subject) -> Vec<serde_json::Value> {
    let resp = Api::send(
        Api::for_registry(registry)
            .get(&format!("/v2/app/manifests/{}", subject.fallback_tag()))
            .header("accept", INDEX),
    )
    .await;
    let resp = common::api::expect_status(resp, StatusCode::OK, "GET fallback tag upstream").await;
    let body: serde_json::Value = resp.json().await.expect("index JSON");
    body["manifests"].as_array().expect("manifests").clone()
}

/// Stops graft and reads the fallback-tag writes its index still owes: an
/// owed write is retried by recovery every 30 s, so any left is a loop.
fn owed_after_shutdown(mut graft: Graft) -> usize {
    graft.begin_shutdown();
    graft
        .wait_stopped(std::time::Duration::from_secs(30))
        .expect("graft stops cleanly");
    let index = graft::index::Index::open(&graft.data_dir().join("index")).expect("index");
    let owed = index.intents().owed_tag_writes().expect("owed writes");
    owed.len()
}

#[tokio::test]
async fn a_fallback_tag_past_the_registry_s_limit_keeps_every_referrer_without_its_largest_annotations(
) {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let subject = push_subject(&api, "app", "v1").await;
    // 100 000 annotations (~3.5 MB), one 3 MiB annotation, one 1.5 MiB
    // one: each manifest fits distribution's 4 MiB, all three together
    // do not.
    let many: serde_json::Map<String, serde_json::Value> = (0..100_000)
        .map(|i| (format!("com.example.k{i:06}"), json!("vvvvvvvvvv")))
        .collect();
    let many = artifact(
        &subject,
        Some("application/vnd.example.many"),
        None,
        Some(many.into()),
    );
    let huge = with_big_annotation(&subject, "application/vnd.example.huge", 3 << 20);
    let large = with_big_annotation(&subject, "application/vnd.example.large", 3 << 19);
    for m in [&many[..], &huge, &large] {
        push_referrer(&api, "app", m, MANIFEST).await;
    }

    // graft's API keeps every annotation.
    let listed = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    let mut want: Vec<_> = [&many[..], &huge, &large]
        .iter()
        .map(|m| expected_descriptor(m))
        .collect();
    want.sort_by_key(|d| d["digest"].as_str().map(str::to_owned));
    assert_eq!(listed, want);

    // The tag lists all three, fits the limit, and lost the annotations of
    // the two largest entries only.
    let tag = upstream_tag(&registry, &subject).await;
    assert_eq!(digests_of(&tag), digests_of(&want));
    for d in &tag {
        let full = want
            .iter()
            .find(|w| w["digest"] == d["digest"])
            .expect("listed");
        for field in ["mediaType", "size", "artifactType"] {
            assert_eq!(d[field], full[field], "{field}");
        }
        let kept = d.get("annotations").is_some();
        assert_eq!(
            kept,
            full["artifactType"] == "application/vnd.example.large",
            "annotations of {}",
            full["artifactType"]
        );
    }
    let dropped = common::read_metric(&api, "graft_referrers_tag_annotations_dropped_total").await;
    assert!(dropped.is_some_and(|n| n >= 2), "{dropped:?}");
    assert_eq!(owed_after_shutdown(graft), 0, "no tag write left to retry");
}

#[tokio::test]
async fn a_fallback_tag_whose_bare_descriptors_do_not_fit_is_not_written_nor_retried() {
    let registry = Registry::start();
    // Room for two bare descriptors (~200 bytes each), not three.
    let graft = Graft::start_with(&registry, |c| c.referrers.max_tag_bytes = 600);
    let api = Api::for_graft(&graft);
    let subject = push_subject(&api, "app", "v1").await;
    let sigs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|k| {
            artifact(
                &subject,
                Some(&format!("application/vnd.example.{k}")),
                None,
                None,
            )
        })
        .collect();
    for s in &sigs {
        push_referrer(&api, "app", s, MANIFEST).await;
    }
    let listed = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(listed.len(), 3, "graft's API lists every referrer");
    assert_eq!(upstream_tag(&registry, &subject).await.len(), 2);
    let too_large = common::read_metric(&api, "graft_referrers_tag_too_large_total").await;
    assert!(too_large.is_some_and(|n| n >= 1), "{too_large:?}");
    assert_eq!(owed_after_shutdown(graft), 0, "no tag write left to retry");
}

#[tokio::test]
async fn a_fallback_tag_the_registry_refuses_is_not_retried_unchanged() {
    let registry = Registry::start();
    // A limit above distribution's own 4 MiB: the registry refuses the tag.
    let graft = Graft::start_with(&registry, |c| c.referrers.max_tag_bytes = 64 << 20);
    let api = Api::for_graft(&graft);
    let subject = push_subject(&api, "app", "v1").await;
    let a = with_big_annotation(&subject, "application/vnd.example.a", 3 << 20);
    let b = with_big_annotation(&subject, "application/vnd.example.b", 3 << 20);
    push_referrer(&api, "app", &a, MANIFEST).await;
    push_referrer(&api, "app", &b, MANIFEST).await;
    let listed = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    assert_eq!(listed.len(), 2);
    let refused = common::read_metric(&api, "graft_referrers_tag_writes_refused_total").await;
    assert!(refused.is_some_and(|n| n >= 1), "{refused:?}");
    assert_eq!(owed_after_shutdown(graft), 0, "no tag write left to retry");
}
