//! A small OCI Distribution client for tests: raw requests plus push and
//! pull helpers, over `reqwest` with redirects off (so `Location` headers
//! can be asserted) and no proxy from the environment.

use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use super::{header_str, sha256_digest, DigestWriter, Graft, Registry, TestImage};

/// A `reqwest` client that does not follow redirects and ignores proxy
/// variables; `ca_der` adds a trusted root (the test CA of a TLS registry).
pub fn http_client(ca_der: Option<&[u8]>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120));
    if let Some(der) = ca_der {
        let cert = reqwest::Certificate::from_der(der).expect("test CA certificate");
        builder = builder.tls_certs_only([cert]);
    }
    builder.build().expect("build HTTP client")
}

/// Talks to one registry origin (graft, or the upstream directly).
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    /// Origin without a trailing slash, e.g. `http://127.0.0.1:5001`.
    base: String,
    /// Sent as HTTP basic auth on every request when set.
    basic_auth: Option<(String, String)>,
    /// Sent as `Authorization: Bearer` on every request when set (a token
    /// from [`super::token::TokenService`]).
    bearer: Option<String>,
}

impl Api {
    /// A client for a plain-HTTP origin.
    pub fn new(base_url: &str) -> Api {
        Api {
            http: http_client(None),
            base: base_url.trim_end_matches('/').to_owned(),
            basic_auth: None,
            bearer: None,
        }
    }

    /// A client for graft; uses no credentials (add them with
    /// [`Api::with_basic_auth`]).
    pub fn for_graft(graft: &Graft) -> Api {
        Api::new(&graft.url())
    }

    /// A client for the registry itself, bypassing graft: trusts its test CA
    /// and sends its credentials, if it has them.
    pub fn for_registry(registry: &Registry) -> Api {
        let api = Api {
            http: http_client(registry.ca_der()),
            base: registry.url(),
            basic_auth: None,
            bearer: None,
        };
        match registry.credentials() {
            Some((user, password)) => api.with_basic_auth(user, password),
            None => api,
        }
    }

    pub fn with_basic_auth(mut self, user: &str, password: &str) -> Api {
        self.basic_auth = Some((user.to_owned(), password.to_owned()));
        self
    }

    pub fn with_bearer(mut self, token: &str) -> Api {
        self.bearer = Some(token.to_owned());
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// An absolute URL for `path_or_url`: a path (`/v2/…`) is joined to the
    /// origin, an absolute URL (a `Location`) is used as is.
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_owned()
        } else {
            format!("{}{}", self.base, path_or_url)
        }
    }

    /// A request with this client's credentials.
    pub fn request(&self, method: Method, path_or_url: &str) -> RequestBuilder {
        let builder = self.http.request(method, self.url(path_or_url));
        let builder = match &self.basic_auth {
            Some((user, password)) => builder.basic_auth(user, Some(password)),
            None => builder,
        };
        match &self.bearer {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    pub fn get(&self, path_or_url: &str) -> RequestBuilder {
        self.request(Method::GET, path_or_url)
    }

    pub fn head(&self, path_or_url: &str) -> RequestBuilder {
        self.request(Method::HEAD, path_or_url)
    }

    pub fn delete(&self, path_or_url: &str) -> RequestBuilder {
        self.request(Method::DELETE, path_or_url)
    }

    /// Sends `builder`, failing the test on a transport error.
    pub async fn send(builder: RequestBuilder) -> Response {
        builder
            .send()
            .await
            .unwrap_or_else(|e| panic!("request failed: {e:?}"))
    }

    /// Starts a blob upload (`POST /v2/<repo>/blobs/uploads/`), returning the
    /// `Location` to continue at.
    pub async fn start_upload(&self, repo: &str) -> String {
        let response =
            Api::send(self.request(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))).await;
        let response = expect_status(response, StatusCode::ACCEPTED, "POST blob upload").await;
        location(&response)
    }

    /// Pushes `data` monolithically (POST, then PUT `?digest=`); returns the
    /// digest.
    pub async fn push_blob(&self, repo: &str, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = sha256_digest(&data);
        let upload = self.start_upload(repo).await;
        let put = self
            .request(Method::PUT, &upload)
            .query(&[("digest", digest.as_str())])
            .header("content-type", "application/octet-stream")
            .body(data);
        expect_status(Api::send(put).await, StatusCode::CREATED, "PUT blob").await;
        digest
    }

    /// Pushes `data` in `chunk_size` PATCHes with `Content-Range`, then a
    /// final empty PUT `?digest=`. Returns the digest and every `Location`
    /// the server answered with (POST, each PATCH, PUT), in order.
    pub async fn push_blob_chunked(
        &self,
        repo: &str,
        data: &Bytes,
        chunk_size: usize,
    ) -> (String, Vec<String>) {
        let digest = sha256_digest(data);
        let mut locations = vec![self.start_upload(repo).await];
        let mut offset = 0;
        while offset < data.len() {
            let end = (offset + chunk_size).min(data.len());
            let patch = self
                .request(Method::PATCH, locations.last().expect("a location"))
                .header("content-type", "application/octet-stream")
                .header("content-range", format!("{}-{}", offset, end - 1))
                .body(data.slice(offset..end));
            let response =
                expect_status(Api::send(patch).await, StatusCode::ACCEPTED, "PATCH chunk").await;
            assert_eq!(
                header_str(response.headers(), "range").as_deref(),
                Some(format!("0-{}", end - 1).as_str()),
                "Range after PATCH {offset}-{}",
                end - 1
            );
            locations.push(location(&response));
            offset = end;
        }
        let put = self
            .request(Method::PUT, locations.last().expect("a location"))
            .query(&[("digest", digest.as_str())]);
        let response = expect_status(Api::send(put).await, StatusCode::CREATED, "final PUT").await;
        locations.push(location(&response));
        (digest, locations)
    }

    /// Pushes a manifest; returns the digest the server reports.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: impl Into<Bytes>,
    ) -> String {
        let body = body.into();
        let put = self
            .request(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(body.clone());
        let response =
            expect_status(Api::send(put).await, StatusCode::CREATED, "PUT manifest").await;
        let digest = header_str(response.headers(), "docker-content-digest")
            .unwrap_or_else(|| sha256_digest(&body));
        assert_eq!(
            digest,
            sha256_digest(&body),
            "Docker-Content-Digest of the pushed manifest"
        );
        digest
    }

    /// Pushes an image's config, layers and manifest (tagged `tag`).
    pub async fn push_image(&self, repo: &str, tag: &str, image: &TestImage) {
        for blob in image.blobs() {
            self.push_blob(repo, blob.data.clone()).await;
        }
        let digest = self
            .push_manifest(repo, tag, TestImage::MEDIA_TYPE, image.manifest.clone())
            .await;
        assert_eq!(digest, image.digest);
    }

    /// GETs a blob and checks status 200; returns its bytes.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> Bytes {
        let response = Api::send(self.get(&format!("/v2/{repo}/blobs/{digest}"))).await;
        let response = expect_status(response, StatusCode::OK, "GET blob").await;
        response.bytes().await.expect("read blob")
    }

    /// GETs a manifest (accepting OCI and Docker media types) and checks
    /// status 200; returns its bytes.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Bytes {
        let get = self
            .get(&format!("/v2/{repo}/manifests/{reference}"))
            .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
             application/vnd.docker.distribution.manifest.v2+json",
        );
        let response = expect_status(Api::send(get).await, StatusCode::OK, "GET manifest").await;
        response.bytes().await.expect("read manifest")
    }

    /// Streams a blob and returns the digest and length of what arrived,
    /// without holding it in memory.
    pub async fn blob_digest(&self, repo: &str, digest: &str) -> (String, u64) {
        let response = Api::send(self.get(&format!("/v2/{repo}/blobs/{digest}"))).await;
        let mut response = expect_status(response, StatusCode::OK, "GET blob").await;
        let mut hasher = DigestWriter::default();
        while let Some(chunk) = response.chunk().await.expect("read blob chunk") {
            hasher.update(&chunk);
        }
        let len = hasher.len();
        (hasher.digest(), len)
    }
}

/// Fails the test with the body in the message when the status differs.
pub async fn expect_status(response: Response, want: StatusCode, what: &str) -> Response {
    if response.status() != want {
        let status = response.status();
        let url = response.url().clone();
        let body = response.text().await.unwrap_or_default();
        panic!("{what} {url}: expected {want}, got {status}: {body}");
    }
    response
}

/// The `Location` header, which must be present.
pub fn location(response: &Response) -> String {
    header_str(response.headers(), "location").unwrap_or_else(|| {
        panic!(
            "no Location header on {} {}",
            response.status(),
            response.url()
        )
    })
}
