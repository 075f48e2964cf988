//! The Distribution API passes through graft: uploads, reads, deletes,
//! ranges, listings and mounts behave as on the upstream, and every
//! `Location` keeps the client talking to graft.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::api::{expect_status, location};
use common::image::OCI_MANIFEST;
use common::{
    assert_location_on, assert_oci_error, header_str, random_bytes, Api, FakeUpstream, Graft,
    Registry, TestImage,
};
use reqwest::{Method, StatusCode};

#[tokio::test]
async fn chunked_upload_of_64_mib_round_trips_and_every_location_points_at_graft() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let data = Bytes::from(random_bytes(64 << 20));

    let (digest, locations) = api.push_blob_chunked("big/chunked", &data, 16 << 20).await;

    assert_eq!(locations.len(), 6, "POST, four PATCHes, PUT: {locations:?}");
    for l in &locations {
        assert_location_on(&graft, l);
    }
    assert!(
        locations
            .last()
            .expect("final Location")
            .ends_with(&format!("/v2/big/chunked/blobs/{digest}")),
        "final Location names the blob: {locations:?}"
    );
    registry.wait_for_access("the final PUT", |e| {
        e.method == "PUT" && e.uri.contains("digest=")
    });
    assert_eq!(
        registry.count_requests("PATCH", "/v2/big/chunked/blobs/uploads/"),
        4,
        "each chunk reached the upstream as its own PATCH"
    );

    let (pulled, len) = api.blob_digest("big/chunked", &digest).await;
    assert_eq!(len, data.len() as u64);
    assert_eq!(pulled, digest);
}

#[tokio::test]
async fn manifests_and_blobs_answer_head_get_and_delete_as_upstream_does() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let direct = Api::for_registry(&registry);
    let image = TestImage::build(2);
    api.push_image("app/web", "v1", &image).await;
    let manifest_path = format!("/v2/app/web/manifests/{}", image.digest);
    let layer = &image.layers[0];
    let blob_path = format!("/v2/app/web/blobs/{}", layer.digest);

    let head = Api::send(
        api.head("/v2/app/web/manifests/v1")
            .header("accept", OCI_MANIFEST),
    )
    .await;
    let head = expect_status(head, StatusCode::OK, "HEAD manifest by tag").await;
    assert_eq!(
        header_str(head.headers(), "docker-content-digest"),
        Some(image.digest.clone())
    );
    assert_eq!(
        header_str(head.headers(), "content-type").as_deref(),
        Some(OCI_MANIFEST)
    );
    assert_eq!(
        header_str(head.headers(), "content-length"),
        Some(image.manifest.len().to_string())
    );
    assert!(head.bytes().await.expect("HEAD body").is_empty());

    assert_eq!(
        api.get_manifest("app/web", &image.digest).await,
        image.manifest
    );

    let head = expect_status(
        Api::send(api.head(&blob_path)).await,
        StatusCode::OK,
        "HEAD blob",
    )
    .await;
    assert_eq!(
        header_str(head.headers(), "content-length"),
        Some(layer.data.len().to_string())
    );
    assert_eq!(
        header_str(head.headers(), "docker-content-digest"),
        Some(layer.digest.clone())
    );
    assert_eq!(api.get_blob("app/web", &layer.digest).await, layer.data);

    let deleted = Api::send(api.delete(&manifest_path)).await;
    expect_status(deleted, StatusCode::ACCEPTED, "DELETE manifest by digest").await;
    let gone = Api::send(api.get(&manifest_path).header("accept", OCI_MANIFEST)).await;
    let upstream_gone = Api::send(direct.get(&manifest_path).header("accept", OCI_MANIFEST)).await;
    assert_same_answer(gone, upstream_gone, StatusCode::NOT_FOUND).await;

    let deleted = Api::send(api.delete(&blob_path)).await;
    expect_status(deleted, StatusCode::ACCEPTED, "DELETE blob").await;
    let gone = Api::send(api.get(&blob_path)).await;
    let upstream_gone = Api::send(direct.get(&blob_path)).await;
    assert_same_answer(gone, upstream_gone, StatusCode::NOT_FOUND).await;
    let head = Api::send(api.head(&blob_path)).await;
    assert_eq!(
        head.status(),
        StatusCode::NOT_FOUND,
        "HEAD of a deleted blob"
    );
}

/// graft's answer equals the upstream's: status, content type, body.
async fn assert_same_answer(
    via_graft: reqwest::Response,
    upstream: reqwest::Response,
    status: StatusCode,
) {
    assert_eq!(upstream.status(), status, "upstream status");
    assert_eq!(via_graft.status(), status, "status through graft");
    assert_eq!(
        header_str(via_graft.headers(), "content-type"),
        header_str(upstream.headers(), "content-type")
    );
    let want = upstream.bytes().await.expect("upstream body");
    let got = via_graft.bytes().await.expect("body through graft");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want),
        "body"
    );
}

#[tokio::test]
async fn range_request_on_a_blob_gets_206_with_content_range_and_those_bytes() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let data = Bytes::from(random_bytes(100));
    let digest = api.push_blob("app/ranged", data.clone()).await;

    let response = Api::send(
        api.get(&format!("/v2/app/ranged/blobs/{digest}"))
            .header("range", "bytes=10-19"),
    )
    .await;

    let response = expect_status(response, StatusCode::PARTIAL_CONTENT, "ranged GET").await;
    assert_eq!(
        header_str(response.headers(), "content-range").as_deref(),
        Some("bytes 10-19/100")
    );
    assert_eq!(
        response.bytes().await.expect("ranged body"),
        data.slice(10..20)
    );
}

#[tokio::test]
async fn tags_list_without_a_page_and_catalog_pass_through_with_their_query_as_is() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let direct = Api::for_registry(&registry);
    let image = TestImage::build(1);
    api.push_image("lib/tagged", "b", &image).await;
    for tag in ["a", "c"] {
        api.push_manifest("lib/tagged", tag, OCI_MANIFEST, image.manifest.clone())
            .await;
    }
    api.push_blob("lib/other", random_bytes(10)).await;

    let tags = Api::send(api.get("/v2/lib/tagged/tags/list")).await;
    let tags: serde_json::Value = expect_status(tags, StatusCode::OK, "tags list")
        .await
        .json()
        .await
        .expect("tags JSON");
    assert_eq!(tags["name"], "lib/tagged");
    // distribution 2.8 lists tags in storage order, not sorted.
    let mut names: Vec<&str> = tags["tags"]
        .as_array()
        .expect("tags array")
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["a", "b", "c"]);

    // A query that asks for no page graft defines (tests/conformance.rs has
    // the pages) reaches the upstream untouched, whatever it does with it.
    for query in ["ns=example.com", "n=abc"] {
        let path = format!("/v2/lib/tagged/tags/list?{query}");
        let via_graft = Api::send(api.get(&path)).await;
        registry.wait_for_access(&path, |e| e.uri == path);
        let upstream = Api::send(direct.get(&path)).await;
        assert_eq!(
            header_str(via_graft.headers(), "link"),
            header_str(upstream.headers(), "link"),
            "{path}"
        );
        assert_same_answer(via_graft, upstream, StatusCode::OK).await;
    }

    let catalog = Api::send(api.get("/v2/_catalog")).await;
    let catalog: serde_json::Value = expect_status(catalog, StatusCode::OK, "catalog")
        .await
        .json()
        .await
        .expect("catalog JSON");
    assert_eq!(
        catalog,
        serde_json::json!({ "repositories": ["lib/other", "lib/tagged"] })
    );

    let via_graft = Api::send(api.get("/v2/_catalog?n=1")).await;
    let upstream = Api::send(direct.get("/v2/_catalog?n=1")).await;
    let link = header_str(via_graft.headers(), "link");
    assert!(
        link.as_deref().is_some_and(|l| l.contains("rel=\"next\"")),
        "Link header: {link:?}"
    );
    assert_eq!(link, header_str(upstream.headers(), "link"));
    assert_same_answer(via_graft, upstream, StatusCode::OK).await;
}

#[tokio::test]
async fn cross_repository_mount_answers_201_with_a_location_on_graft() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let digest = api.push_blob("team/source", random_bytes(1000)).await;

    let mount = api.request(
        Method::POST,
        &format!("/v2/team/target/blobs/uploads/?mount={digest}&from=team/source"),
    );
    let response = expect_status(Api::send(mount).await, StatusCode::CREATED, "mount").await;

    let mounted = location(&response);
    assert_location_on(&graft, &mounted);
    assert!(
        mounted.ends_with(&format!("/v2/team/target/blobs/{digest}")),
        "{mounted}"
    );
    assert_eq!(
        header_str(response.headers(), "docker-content-digest"),
        Some(digest.clone())
    );
    let head = Api::send(api.head(&mounted)).await;
    expect_status(head, StatusCode::OK, "HEAD mounted blob").await;
}

#[tokio::test]
async fn connection_listed_request_headers_do_not_break_requests() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let data = Bytes::from(random_bytes(4096));
    let digest = api.push_blob("app/hop", data.clone()).await;

    let cases = [
        ("/v2/".to_owned(), Bytes::from_static(b"{}")),
        (format!("/v2/app/hop/blobs/{digest}"), data),
    ];
    for (path, body) in cases {
        let request = api
            .get(&path)
            .header("connection", "keep-alive, X-Foo")
            .header("x-foo", "1")
            .header("keep-alive", "timeout=5");
        let response = expect_status(Api::send(request).await, StatusCode::OK, &path).await;
        assert_eq!(response.bytes().await.expect("body"), body, "{path}");
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_in_both_directions_and_the_rest_forwarded() {
    let upstream = FakeUpstream::responding(
        "HTTP/1.1 200 OK\r\n\
         Content-Type: application/json\r\n\
         Content-Length: 2\r\n\
         Docker-Distribution-Api-Version: registry/2.0\r\n\
         Connection: X-Bar\r\n\
         X-Bar: 1\r\n\
         Keep-Alive: timeout=5\r\n\
         Link: </v2/hop/tags/list?last=a&n=1>; rel=\"next\"\r\n\
         OCI-Chunk-Min-Length: 1024\r\n\
         Docker-Content-Digest: sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a\r\n\
         \r\n\
         {}",
    );
    let graft = Graft::start_for_upstream(&upstream.url(), |_| {});
    let api = Api::for_graft(&graft);

    let request = api
        // No `n`/`last`: a listing graft forwards rather than pages itself.
        .get("/v2/hop/tags/list?ns=hop")
        .header("connection", "keep-alive, X-Foo")
        .header("x-foo", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
        .header("authorization", "Bearer client-token")
        .header("x-kept", "yes");
    let response = expect_status(
        Api::send(request).await,
        StatusCode::OK,
        "GET tags through graft",
    )
    .await;

    assert_eq!(
        header_str(response.headers(), "x-bar"),
        None,
        "X-Bar was named by the upstream's Connection header"
    );
    assert_eq!(
        header_str(response.headers(), "link").as_deref(),
        Some("</v2/hop/tags/list?last=a&n=1>; rel=\"next\"")
    );
    assert_eq!(
        header_str(response.headers(), "docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    assert_eq!(
        header_str(response.headers(), "oci-chunk-min-length").as_deref(),
        Some("1024")
    );
    assert_eq!(
        header_str(response.headers(), "docker-content-digest").as_deref(),
        Some("sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a")
    );
    assert_eq!(response.bytes().await.expect("body"), "{}");

    let requests = upstream.requests();
    let forwarded = requests
        .iter()
        .find(|r| r.target() == "/v2/hop/tags/list?ns=hop")
        .unwrap_or_else(|| panic!("the request did not reach the upstream as is: {requests:?}"));
    assert_eq!(forwarded.header_values("x-kept"), ["yes"]);
    assert_eq!(
        forwarded.header_values("authorization"),
        ["Bearer client-token"]
    );
    for dropped in ["x-foo", "keep-alive", "proxy-authorization"] {
        assert!(
            forwarded.header_values(dropped).is_empty(),
            "{dropped} was forwarded: {forwarded:?}"
        );
    }
    for connection in forwarded.header_values("connection") {
        assert!(
            !connection.to_ascii_lowercase().contains("x-foo"),
            "Connection forwarded: {connection}"
        );
    }
    // The upstream is addressed by its own name and told who asked.
    assert_eq!(
        forwarded.header_values("host"),
        [upstream.addr().to_string()]
    );
    assert_eq!(forwarded.header_values("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(forwarded.header_values("x-forwarded-proto"), ["http"]);
    assert_eq!(forwarded.header_values("x-forwarded-host"), [graft.host()]);
}

#[tokio::test]
async fn upstream_errors_pass_through_with_status_headers_and_body() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let direct = Api::for_registry(&registry);

    for path in [
        "/v2/nothing/here/manifests/latest",
        "/v2/nothing/here/tags/list",
    ] {
        let via_graft = Api::send(api.get(path)).await;
        let upstream = Api::send(direct.get(path)).await;
        assert_same_answer(via_graft, upstream, StatusCode::NOT_FOUND).await;
    }
    // A well-formed digest the upstream does not have: its 404, not graft's.
    let digest = common::sha256_digest(b"never pushed");
    let via_graft = Api::send(api.get(&format!("/v2/nothing/here/blobs/{digest}"))).await;
    assert_oci_error(via_graft, 404, Some("BLOB_UNKNOWN")).await;
}

#[tokio::test]
async fn upload_session_headers_status_and_cancel_pass_through() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);

    let post = Api::send(api.request(Method::POST, "/v2/app/session/blobs/uploads/")).await;
    let post = expect_status(post, StatusCode::ACCEPTED, "POST upload").await;
    let uuid = header_str(post.headers(), "docker-upload-uuid").expect("Docker-Upload-UUID");
    let upload = location(&post);
    assert_location_on(&graft, &upload);
    assert!(
        upload.contains(&uuid),
        "Location {upload} names upload {uuid}"
    );
    assert_eq!(header_str(post.headers(), "range").as_deref(), Some("0-0"));

    let patch = api
        .request(Method::PATCH, &upload)
        .header("content-type", "application/octet-stream")
        .body(random_bytes(100));
    let patch = expect_status(Api::send(patch).await, StatusCode::ACCEPTED, "PATCH").await;
    let upload = location(&patch);
    assert_location_on(&graft, &upload);

    let status = expect_status(
        Api::send(api.get(&upload)).await,
        StatusCode::NO_CONTENT,
        "upload status",
    )
    .await;
    assert_eq!(
        header_str(status.headers(), "docker-upload-uuid"),
        Some(uuid.clone())
    );
    assert_eq!(
        header_str(status.headers(), "range").as_deref(),
        Some("0-99")
    );
    assert_location_on(&graft, &location(&status));

    expect_status(
        Api::send(api.delete(&upload)).await,
        StatusCode::NO_CONTENT,
        "cancel upload",
    )
    .await;
    let gone = Api::send(api.get(&upload)).await;
    assert_oci_error(gone, 404, Some("BLOB_UPLOAD_UNKNOWN")).await;
}

#[tokio::test]
async fn streamed_patch_without_content_length_uploads_a_blob() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let data = Bytes::from(random_bytes(3 << 20));
    let digest = common::sha256_digest(&data);
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(256 << 10)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();

    let upload = api.start_upload("app/streamed").await;
    // Like docker and containerd: one PATCH whose body has no known length.
    let patch = api
        .request(Method::PATCH, &upload)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )));
    let patch = expect_status(
        Api::send(patch).await,
        StatusCode::ACCEPTED,
        "streamed PATCH",
    )
    .await;
    assert_eq!(
        header_str(patch.headers(), "range"),
        Some(format!("0-{}", data.len() - 1))
    );
    let put = api
        .request(Method::PUT, &location(&patch))
        .query(&[("digest", digest.as_str())]);
    expect_status(Api::send(put).await, StatusCode::CREATED, "PUT").await;

    assert_eq!(
        api.blob_digest("app/streamed", &digest).await,
        (digest, data.len() as u64)
    );
}

#[tokio::test]
async fn response_bodies_stream_before_the_upstream_finishes_sending() {
    // The upstream promises 2048 bytes, sends 1024 and then stalls.
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 2048\r\n\r\n";
    let upstream = FakeUpstream::responding(&format!("{head}{}", "x".repeat(1024)));
    let graft = Graft::start_for_upstream(&upstream.url(), |config| {
        config.server.shutdown_grace = Duration::from_secs(1);
    });
    let api = Api::for_graft(&graft);

    let read_half = async {
        let response = Api::send(api.get("/v2/slow/tags/list")).await;
        let mut response = expect_status(response, StatusCode::OK, "GET").await;
        let mut received = 0;
        while received < 1024 {
            let chunk = response
                .chunk()
                .await
                .expect("read")
                .expect("body ended early");
            received += chunk.len();
        }
        received
    };
    let received = tokio::time::timeout(Duration::from_secs(5), read_half)
        .await
        .expect("the head and first half arrive while the upstream still owes the rest");
    assert_eq!(received, 1024);
}
