//! Spec conformance through graft (issue 8): where distribution 2.8 alone
//! answers to spec, graft answers the same (the same request is sent
//! straight at the registry and through graft); where it does not — tag
//! pages, tag deletion, content deleted behind the cache — graft answers
//! as the distribution spec words it.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::api::expect_status;
use common::artifacts::{artifact, push_subject};
use common::image::{OCI_INDEX, OCI_MANIFEST};
use common::{assert_oci_error, header_str, Api, Graft, Registry, RegistryOptions, TestImage};
use graft::clock::Clock;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Status, `Content-Type` and body of an answer.
async fn answer(resp: reqwest::Response) -> (StatusCode, Option<String>, Bytes) {
    let status = resp.status();
    let content_type = header_str(resp.headers(), "content-type");
    (status, content_type, resp.bytes().await.expect("body"))
}

/// Sends `method path` straight at the registry and through graft; both
/// answers must be the same, and `want`.
async fn same_answer(direct: &Api, via: &Api, method: Method, path: &str, want: StatusCode) {
    let up = answer(Api::send(direct.request(method.clone(), path)).await).await;
    let through = answer(Api::send(via.request(method.clone(), path)).await).await;
    assert_eq!(up.0, want, "{method} {path} straight at the registry");
    assert_eq!(
        through, up,
        "{method} {path}: through graft vs the registry"
    );
}

#[tokio::test]
async fn a_reference_that_is_neither_tag_nor_digest_gets_the_registry_s_404() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let (direct, via) = (Api::for_registry(&registry), Api::for_graft(&graft));
    via.push_image("pull/app", "v1", &TestImage::build(1)).await;

    for reference in [".INVALID_MANIFEST_NAME", "-bad", "a%2Fb"] {
        let path = format!("/v2/pull/app/manifests/{reference}");
        for method in [Method::GET, Method::HEAD, Method::DELETE] {
            same_answer(&direct, &via, method, &path, StatusCode::NOT_FOUND).await;
        }
        let put = |api: &Api| {
            api.request(Method::PUT, &path)
                .header("content-type", OCI_MANIFEST)
                .body(TestImage::build(1).manifest)
        };
        let up = answer(Api::send(put(&direct)).await).await;
        let through = answer(Api::send(put(&via)).await).await;
        assert_eq!(through, up, "PUT {path}");
    }

    // A malformed digest graft refuses itself (it keys its cache by
    // digests): 400 DIGEST_INVALID, where distribution answers 500.
    let path = "/v2/pull/app/manifests/sha256:zz";
    let up = Api::send(direct.get(path)).await.status();
    assert_eq!(up, StatusCode::INTERNAL_SERVER_ERROR, "distribution alone");
    assert_oci_error(Api::send(via.get(path)).await, 400, Some("DIGEST_INVALID")).await;
}

/// The tags of `repo` through `api`, page by page from `first`, following
/// `Link`; also checks every page but the last is exactly `n` long.
async fn page_through(api: &Api, first: &str, n: usize) -> Vec<String> {
    let mut tags = Vec::new();
    let mut next = Some(first.to_string());
    while let Some(path) = next.take() {
        let resp = expect_status(Api::send(api.get(&path)).await, StatusCode::OK, &path).await;
        let link = header_str(resp.headers(), "link");
        let body: serde_json::Value = resp.json().await.expect("tag list JSON");
        let page: Vec<String> = serde_json::from_value(body["tags"].clone()).expect("tags");
        if let Some(link) = link {
            assert_eq!(page.len(), n, "a page with a Link holds n tags: {path}");
            let target = link
                .strip_prefix('<')
                .and_then(|l| l.split_once(">; rel=\"next\""))
                .map(|(t, _)| t.to_string())
                .unwrap_or_else(|| panic!("Link `{link}` is not <…>; rel=\"next\""));
            let last = page.last().expect("a page with a Link has tags");
            assert_eq!(
                target,
                format!("/v2/tags/many/tags/list?n={n}&last={last}"),
                "Link after {path}"
            );
            next = Some(target);
        }
        tags.extend(page);
    }
    tags
}

#[tokio::test]
async fn a_thousand_tags_page_with_n_7_each_once_in_lexical_order() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let (direct, via) = (Api::for_registry(&registry), Api::for_graft(&graft));
    let repo = "tags/many";
    // Three subjects with two referrers each, pushed through graft: graft
    // writes their fallback tags (`sha256-<hex>`).
    let mut expected = Vec::new();
    for i in 0..3 {
        let tag = format!("subject-{i}");
        let subject = push_subject(&via, repo, &tag).await;
        for kind in ["sig", "sbom"] {
            let m = artifact(
                &subject,
                Some(&format!("application/vnd.{kind}")),
                None,
                None,
            );
            let digest = common::sha256_digest(&m);
            via.push_manifest(repo, &digest, OCI_MANIFEST, m).await;
        }
        expected.push(tag);
        expected.push(subject.fallback_tag());
    }
    // The rest straight at the registry, names chosen so that ASCII order
    // differs from numeric and case-insensitive order.
    let manifest = TestImage::build(1);
    for blob in manifest.blobs() {
        direct.push_blob(repo, blob.data.clone()).await;
    }
    let names: Vec<String> = (0..1000 - expected.len())
        .map(|i| match i % 4 {
            0 => format!("v{i}"),
            1 => format!("V{i}.x"),
            2 => format!("_{i}"),
            _ => format!("a-{i}_Z"),
        })
        .collect();
    let mut pushes = tokio::task::JoinSet::new();
    for chunk in names.chunks(50) {
        let (api, chunk, body) = (direct.clone(), chunk.to_vec(), manifest.manifest.clone());
        pushes.spawn(async move {
            for tag in chunk {
                api.push_manifest(repo, &tag, OCI_MANIFEST, body.clone())
                    .await;
            }
        });
    }
    while let Some(done) = pushes.join_next().await {
        done.expect("push task");
    }
    expected.extend(names);
    expected.sort();
    assert_eq!(expected.len(), 1000);

    let got = page_through(&via, &format!("/v2/{repo}/tags/list?n=7"), 7).await;
    assert_eq!(got.len(), 1000, "every tag once");
    assert_eq!(got, expected, "lexical order, each tag exactly once");

    // Without `n` or `last` the listing is the registry's own.
    same_answer(
        &direct,
        &via,
        Method::GET,
        &format!("/v2/{repo}/tags/list"),
        StatusCode::OK,
    )
    .await;
}

#[tokio::test]
async fn tag_pages_follow_the_spec_s_example_and_edges() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let (direct, via) = (Api::for_registry(&registry), Api::for_graft(&graft));
    let image = TestImage::build(1);
    via.push_image("ex/app", "v3", &image).await;
    for tag in ["v4", "v1", "v2"] {
        via.push_manifest("ex/app", tag, OCI_MANIFEST, image.manifest.clone())
            .await;
    }
    let page = |q: &'static str| {
        let via = via.clone();
        async move {
            let resp = Api::send(via.get(&format!("/v2/ex/app/tags/list?{q}"))).await;
            let resp = expect_status(resp, StatusCode::OK, q).await;
            assert_eq!(
                header_str(resp.headers(), "content-type").as_deref(),
                Some("application/json"),
                "{q}"
            );
            let link = header_str(resp.headers(), "link");
            let body: serde_json::Value = resp.json().await.expect("JSON");
            assert_eq!(body["name"], "ex/app", "{q}");
            (body["tags"].clone(), link)
        }
    };
    let link = |n: u32, last: &str| {
        Some(format!(
            "</v2/ex/app/tags/list?n={n}&last={last}>; rel=\"next\""
        ))
    };
    assert_eq!(page("n=2").await, (json!(["v1", "v2"]), link(2, "v2")));
    assert_eq!(page("n=2&last=v2").await, (json!(["v3", "v4"]), None));
    assert_eq!(page("n=0").await, (json!([]), None), "n=0: empty, no Link");
    assert_eq!(page("n=0&last=v1").await, (json!([]), None));
    assert_eq!(page("last=v1").await, (json!(["v2", "v3", "v4"]), None));
    assert_eq!(
        page("n=3&last=v0").await,
        (json!(["v1", "v2", "v3"]), link(3, "v3"))
    );
    assert_eq!(page("n=10").await, (json!(["v1", "v2", "v3", "v4"]), None));
    assert_eq!(page("n=1&last=v4").await, (json!([]), None));

    // Values the spec does not define are the registry's to answer.
    for q in ["n=abc", "n=-1", "last=.x"] {
        let path = format!("/v2/ex/app/tags/list?{q}");
        same_answer(&direct, &via, Method::GET, &path, StatusCode::OK).await;
    }
    // An unknown repository: the registry's 404 NAME_UNKNOWN, unchanged.
    same_answer(
        &direct,
        &via,
        Method::GET,
        "/v2/ex/none/tags/list?n=2",
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn a_refused_tag_page_is_the_registry_s_refusal_with_its_challenge() {
    let registry = Registry::start_with(RegistryOptions::default().basic_auth("alice", "s3cret"));
    let graft = Graft::start(&registry);
    let alice = Api::for_graft(&graft).with_basic_auth("alice", "s3cret");
    alice
        .push_image("auth/app", "v1", &TestImage::build(1))
        .await;
    let path = "/v2/auth/app/tags/list?n=1";
    let anonymous = Api::for_graft(&graft);
    let up = Api::send(Api::new(&registry.url()).get(path)).await;
    let through = Api::send(anonymous.get(path)).await;
    assert_eq!(through.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header_str(through.headers(), "www-authenticate"),
        header_str(up.headers(), "www-authenticate")
    );
    assert_eq!(answer(through).await, answer(up).await);
    let resp = Api::send(alice.get(path)).await;
    let body: serde_json::Value = expect_status(resp, StatusCode::OK, path)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["tags"], json!(["v1"]));
}

/// A scripted registry on `127.0.0.1`: `answer(method, target)` gives each
/// whole HTTP/1.1 response (one request per connection). For what
/// distribution 2.8 cannot show: paged tag lists, tag deletion.
async fn scripted_upstream(
    answer: impl Fn(&str, &str) -> String + Send + Sync + 'static,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let answer = std::sync::Arc::new(answer);
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let mut line = text.split(' ');
                let method = line.next().unwrap_or_default();
                let target = line.next().unwrap_or_default();
                let resp = answer(method, target);
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, task)
}

/// A whole response with `headers` (each ending in CRLF) and `body`.
fn response(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A registry listing `tags` in pages of two, in storage order, with a
/// `Link` to the next page (as most registries other than distribution 2.8
/// do).
async fn paginating_upstream(
    tags: &'static [&'static str],
) -> (String, tokio::task::JoinHandle<()>) {
    scripted_upstream(move |_, target| {
        let query: HashMap<&str, &str> = target
            .split_once('?')
            .map(|(_, q)| q.split('&').filter_map(|p| p.split_once('=')).collect())
            .unwrap_or_default();
        let start = query
            .get("last")
            .and_then(|l| tags.iter().position(|t| t == l))
            .map_or(0, |i| i + 1);
        let page = &tags[start..(start + 2).min(tags.len())];
        let link = if start + 2 < tags.len() {
            format!(
                "Link: </v2/up/app/tags/list?last={}&n=2>; rel=\"next\"\r\n",
                page[1]
            )
        } else {
            String::new()
        };
        let headers = format!("content-type: application/json\r\n{link}");
        let body = json!({ "name": "up/app", "tags": page }).to_string();
        response("200 OK", &headers, &body)
    })
    .await
}

#[tokio::test]
async fn the_upstream_s_own_pages_are_followed_to_the_end() {
    const TAGS: &[&str] = &["z", "b", "a", "y", "c"];
    let (url, task) = paginating_upstream(TAGS).await;
    let graft = Graft::start_for_upstream(&url, |_| {});
    let via = Api::for_graft(&graft);
    let resp = Api::send(via.get("/v2/up/app/tags/list?n=4")).await;
    let resp = expect_status(resp, StatusCode::OK, "n=4").await;
    assert_eq!(
        header_str(resp.headers(), "link").as_deref(),
        Some("</v2/up/app/tags/list?n=4&last=y>; rel=\"next\"")
    );
    let body: serde_json::Value = resp.json().await.expect("JSON");
    assert_eq!(body["tags"], json!(["a", "b", "c", "y"]));
    let resp = Api::send(via.get("/v2/up/app/tags/list?n=4&last=y")).await;
    let body: serde_json::Value = expect_status(resp, StatusCode::OK, "last=y")
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["tags"], json!(["z"]));
    task.abort();
}

#[tokio::test]
async fn deleting_a_tag_the_registry_cannot_delete_answers_unsupported() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let (direct, via) = (Api::for_registry(&registry), Api::for_graft(&graft));
    let image = TestImage::build(1);
    via.push_image("del/app", "v1", &image).await;
    let path = "/v2/del/app/manifests/v1";

    // distribution 2.8 alone: 400 DIGEST_INVALID, which the spec does not allow.
    assert_oci_error(
        Api::send(direct.delete(path)).await,
        400,
        Some("DIGEST_INVALID"),
    )
    .await;
    let body = assert_oci_error(Api::send(via.delete(path)).await, 400, Some("UNSUPPORTED")).await;
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("cannot delete tags"), "{body}");
    // Nothing was deleted.
    assert_eq!(via.get_manifest("del/app", "v1").await, image.manifest);

    // Deleting by digest is the registry's answer, the same through graft.
    let unknown = format!("/v2/del/app/manifests/{}", common::sha256_digest(b"none"));
    same_answer(
        &direct,
        &via,
        Method::DELETE,
        &unknown,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn a_tag_deleted_by_a_registry_that_can_is_forgotten_by_graft() {
    // A registry that deletes tags: `v1` names `manifest` until deleted.
    let manifest = TestImage::build(1).manifest;
    let digest = common::sha256_digest(&manifest);
    let deleted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = String::from_utf8(manifest.to_vec()).expect("JSON");
    let d = deleted.clone();
    let tag_path = "/v2/del/app/manifests/v1";
    let by_digest = format!("/v2/del/app/manifests/{digest}");
    let found = format!("content-type: {OCI_MANIFEST}\r\ndocker-content-digest: {digest}\r\n");
    let (url, task) = scripted_upstream(move |method, target| {
        use std::sync::atomic::Ordering;
        let unknown = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
        let gone = response(
            "404 Not Found",
            "content-type: application/json\r\n",
            unknown,
        );
        let known = target == tag_path || target == by_digest;
        match method {
            "DELETE" if target == tag_path => {
                d.store(true, Ordering::SeqCst);
                response("202 Accepted", "", "")
            }
            _ if target == tag_path && d.load(Ordering::SeqCst) => gone,
            // A HEAD answer announces the length and sends no body.
            "HEAD" if known => format!(
                "HTTP/1.1 200 OK\r\n{found}content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            ),
            "GET" if known => response("200 OK", &found, &body),
            _ => gone,
        }
    })
    .await;
    // Tags trusted for ten minutes: only forgetting makes graft ask again.
    let graft = Graft::start_for_upstream(&url, |c| c.cache.tag_ttl = Duration::from_secs(600));
    let via = Api::for_graft(&graft);
    assert_eq!(via.get_manifest("del/app", "v1").await, manifest);
    assert_eq!(via.get_manifest("del/app", "v1").await, manifest);

    let resp = Api::send(via.delete(tag_path)).await;
    assert_eq!(
        resp.status(),
        StatusCode::ACCEPTED,
        "the registry's own answer"
    );
    assert!(deleted.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        manifest_status(&via, Method::GET, "del/app", "v1").await,
        StatusCode::NOT_FOUND,
        "once deleted, a GET of the tag returns 404"
    );
    task.abort();
}

/// Pushes two child images and an index of them through `api`, tagged
/// `tag`; returns (children, index digest).
async fn push_index(api: &Api, repo: &str, tag: &str) -> (Vec<TestImage>, String) {
    let children = vec![TestImage::build(1), TestImage::build(1)];
    for child in &children {
        for blob in child.blobs() {
            api.push_blob(repo, blob.data.clone()).await;
        }
        api.push_manifest(repo, &child.digest, OCI_MANIFEST, child.manifest.clone())
            .await;
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": children.iter().map(TestImage::descriptor).collect::<Vec<_>>(),
    });
    let index = Bytes::from(serde_json::to_vec(&index).expect("index JSON"));
    let digest = api.push_manifest(repo, tag, OCI_INDEX, index).await;
    (children, digest)
}

/// Status of `method` on a manifest through `api`.
async fn manifest_status(api: &Api, method: Method, repo: &str, reference: &str) -> StatusCode {
    let path = format!("/v2/{repo}/manifests/{reference}");
    Api::send(api.request(method, &path).header("accept", ACCEPT_ALL))
        .await
        .status()
}

#[tokio::test]
async fn content_deleted_behind_graft_is_not_served_from_its_cache() {
    let registry = Registry::start();
    // Tags trusted without asking, so the tag of a deleted index is
    // answered from graft's records unless they forgot it.
    let graft = Graft::start_with(&registry, |c| c.cache.tag_ttl = Duration::from_secs(600));
    let (direct, via) = (Api::for_registry(&registry), Api::for_graft(&graft));
    let repo = "gone/app";
    let (children, index) = push_index(&via, repo, "multi").await;
    // Pulled through graft: cached, and this client's access remembered.
    via.get_manifest(repo, "multi").await;
    for child in &children {
        via.get_manifest(repo, &child.digest).await;
    }

    // A child deleted straight at the registry (as a registry collecting an
    // index's children would), then through graft: the registry's 404.
    let child = &children[0].digest;
    let resp = Api::send(direct.delete(&format!("/v2/{repo}/manifests/{child}"))).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = Api::send(via.delete(&format!("/v2/{repo}/manifests/{child}"))).await;
    assert_oci_error(resp, 404, Some("MANIFEST_UNKNOWN")).await;
    for method in [Method::HEAD, Method::GET] {
        assert_eq!(
            manifest_status(&via, method.clone(), repo, child).await,
            StatusCode::NOT_FOUND,
            "{method} of the deleted child through graft"
        );
    }

    // The index deleted through graft: gone by digest and by its tag.
    let resp = Api::send(via.delete(&format!("/v2/{repo}/manifests/{index}"))).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    for reference in [index.as_str(), "multi"] {
        for method in [Method::HEAD, Method::GET] {
            assert_eq!(
                manifest_status(&via, method.clone(), repo, reference).await,
                StatusCode::NOT_FOUND,
                "{method} {reference} after the index was deleted through graft"
            );
        }
    }
    // The other child is still there, and still served.
    assert_eq!(
        via.get_manifest(repo, &children[1].digest).await,
        children[1].manifest
    );
}

#[tokio::test]
async fn a_manifest_deleted_at_the_registry_is_served_at_most_auth_ttl_after_its_confirmation() {
    const AUTH_TTL: Duration = Duration::from_secs(60);
    let registry = Registry::start();
    let clock = Clock::skewable();
    let c = clock.clone();
    let graft = Graft::start_with(&registry, move |config| {
        config.clock = c;
        config.cache.auth_ttl = AUTH_TTL;
    });
    let (direct, via) = (Api::for_registry(&registry), Api::for_graft(&graft));
    let repo = "window/app";
    let (children, _) = push_index(&via, repo, "multi").await;
    let (old, fresh) = (&children[0], &children[1]);
    via.get_manifest(repo, &old.digest).await;

    // Past auth_ttl, another pull renews this client's yes on the
    // repository; the old confirmation of `old` is not renewed by it.
    clock.advance(AUTH_TTL + Duration::from_secs(1));
    via.get_manifest(repo, &fresh.digest).await;
    let resp = Api::send(direct.delete(&format!("/v2/{repo}/manifests/{}", old.digest))).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(
        manifest_status(&via, Method::HEAD, repo, &old.digest).await,
        StatusCode::NOT_FOUND,
        "a presence older than auth_ttl is asked about"
    );
    assert_eq!(via.get_manifest(repo, &fresh.digest).await, fresh.manifest);
}

#[tokio::test]
async fn a_manifest_with_a_non_distributable_layer_gets_the_registry_s_own_answer() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let (direct, via) = (Api::for_registry(&registry), Api::for_graft(&graft));
    let image = TestImage::build(1);
    direct
        .push_blob("foreign/app", image.config.data.clone())
        .await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": image.config.descriptor(),
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "digest": common::sha256_digest(b"never uploaded"),
            "size": 14,
            "urls": ["https://example.com/layer.tar.gz"],
        }],
    });
    let body = Bytes::from(serde_json::to_vec(&manifest).expect("JSON"));
    let put = |api: &Api| {
        api.request(Method::PUT, "/v2/foreign/app/manifests/v1")
            .header("content-type", OCI_MANIFEST)
            .body(body.clone())
    };
    let up = answer(Api::send(put(&direct)).await).await;
    let through = answer(Api::send(put(&via)).await).await;
    // An upstream limit graft cannot repair: distribution 2.8 answers 500
    // (the spec would have it accept the manifest); graft passes it on
    // rather than guess.
    assert_eq!(
        up.0,
        StatusCode::INTERNAL_SERVER_ERROR,
        "distribution alone"
    );
    assert_eq!(through, up, "through graft vs the registry");
}

#[tokio::test]
async fn a_manifest_past_the_size_limit_gets_413_size_invalid_and_nothing_reaches_the_registry() {
    // end-7 allows 413 for a manifest too large to accept; graft buffers
    // manifests (to index `subject`), so it sets the bound itself.
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |c| c.server.max_manifest_bytes = 4096);
    let (direct, via) = (Api::for_registry(&registry), Api::for_graft(&graft));
    let image = TestImage::build(1);
    via.push_blob("big/app", image.config.data.clone()).await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": image.config.descriptor(),
        "layers": [],
        "annotations": {"padding": "x".repeat(8192)},
    });
    let body = Bytes::from(serde_json::to_vec(&manifest).expect("JSON"));
    let resp = Api::send(
        via.request(Method::PUT, "/v2/big/app/manifests/v1")
            .header("content-type", OCI_MANIFEST)
            .body(body),
    )
    .await;
    let (status, _, json) = answer(resp).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let json: serde_json::Value = serde_json::from_slice(&json).expect("an OCI error body");
    assert_eq!(json["errors"][0]["code"], "SIZE_INVALID");
    // With the OCI type accepted: distribution 2.8 answers 404 to an OCI
    // manifest asked for without it, stored or not.
    let at_registry = Api::send(
        direct
            .get("/v2/big/app/manifests/v1")
            .header("accept", OCI_MANIFEST),
    )
    .await;
    assert_eq!(
        at_registry.status(),
        StatusCode::NOT_FOUND,
        "nothing stored"
    );
}
