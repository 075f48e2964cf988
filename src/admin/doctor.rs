//! `graft doctor`: checks a registry before graft is put in front of it and
//! says in plain words what will and will not work.
//!
//! Every check ends pass, warn or fail with one sentence. Fail means graft
//! needs something the registry does not give (exit 1); warn means graft
//! works but something is worth knowing. The write probes push a tiny
//! manifest to `graft-doctor/probe` with the account graft will use, and
//! remove what they pushed when the registry allows deletes.
//!
//! Requests go through [`Upstream::call`], so Bearer challenges are
//! answered the way graft itself answers them ([`crate::token`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::body;
use crate::config::UpstreamConfig;
use crate::token::{self, Challenge, TokenClient};
use crate::upstream::{Upstream, UpstreamError};

/// The repository the write probes use.
pub const PROBE_REPO: &str = "graft-doctor/probe";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Largest answer body read (errors, listings, indexes).
const READ_LIMIT: usize = 256 * 1024;
/// A round trip slower than this is worth a warning: every cache miss and
/// referrers write pays it several times.
const SLOW_RTT: Duration = Duration::from_millis(250);

/// What `graft doctor` was asked to check.
#[derive(Clone, Debug)]
pub struct DoctorOptions {
    /// The registry's origin, e.g. `https://registry.internal:5000`.
    pub upstream: String,
    /// The account graft will use upstream (`Basic …`), if any.
    pub auth: Option<HeaderValue>,
    /// Extra CA certificates trusted for the registry.
    pub ca_file: Option<PathBuf>,
    /// Connect and response timeout for each request.
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

/// One check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Level,
    pub detail: String,
}

/// Every check, in the order they ran.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub upstream: String,
    pub checks: Vec<Check>,
    /// The registry did not answer at all (exit 2).
    pub unreachable: bool,
}

impl Report {
    /// 0 when graft can serve the registry fully, 1 when something it
    /// needs fails, 2 when the registry could not be reached.
    pub fn exit_code(&self) -> u8 {
        if self.unreachable {
            2
        } else if self.checks.iter().any(|c| c.status == Level::Fail) {
            1
        } else {
            0
        }
    }

    /// The report as one JSON object, for scripts.
    pub fn to_json(&self) -> String {
        let value = serde_json::json!({
            "upstream": self.upstream,
            "exit_code": self.exit_code(),
            "checks": self.checks,
        });
        serde_json::to_string_pretty(&value).unwrap_or_default()
    }

    fn push(&mut self, name: &'static str, status: Level, detail: impl Into<String>) {
        self.checks.push(Check {
            name,
            status,
            detail: detail.into(),
        });
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "graft doctor: {}", self.upstream)?;
        for c in &self.checks {
            let tag = match c.status {
                Level::Pass => "pass",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            writeln!(f, "  {tag}  {:<15} {}", c.name, c.detail)?;
        }
        let verdict = match self.exit_code() {
            0 => "graft can serve this registry fully.",
            1 => "graft cannot serve this registry fully: see the FAIL lines above.",
            _ => "the registry could not be reached.",
        };
        write!(f, "Result: {verdict}")
    }
}

/// Runs every check against `opts.upstream`.
pub async fn run(opts: &DoctorOptions) -> Report {
    let mut report = Report {
        upstream: opts.upstream.clone(),
        checks: Vec::new(),
        unreachable: false,
    };
    let cfg = UpstreamConfig {
        url: opts.upstream.trim_end_matches('/').to_string(),
        ca_file: opts.ca_file.clone(),
        connect_timeout: opts.timeout,
        response_timeout: opts.timeout,
        body_timeout: opts.timeout,
        ..crate::Config::default().upstream
    };
    let upstream = match Upstream::new(&cfg) {
        Ok(u) => u.client_credentials(opts.auth.as_ref()),
        Err(e) => {
            report.push("reachable", Level::Fail, e.to_string());
            report.unreachable = true;
            return report;
        }
    };
    let doctor = Doctor {
        upstream,
        cfg,
        auth: opts.auth.clone(),
    };
    doctor.check_all(&mut report).await;
    report
}

struct Doctor {
    upstream: Upstream,
    cfg: UpstreamConfig,
    auth: Option<HeaderValue>,
}

/// A response read whole (bodies here are small).
struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    /// The first OCI error code in the body, if any.
    fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_owned)
    }

    fn header(&self, name: HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Doctor {
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, &str)],
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let resp = self
            .upstream
            .call(method, path, self.auth.as_ref(), headers, body)
            .await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = self
            .upstream
            .read_limited(resp.into_body(), READ_LIMIT)
            .await?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    async fn get(&self, path: &str) -> Result<Answer, UpstreamError> {
        self.call(Method::GET, path, &[], Bytes::new()).await
    }

    async fn check_all(&self, report: &mut Report) {
        // The first request goes without credentials: its answer names the
        // registry's auth scheme.
        let started = Instant::now();
        let first = self.anonymous_v2().await;
        let first_rtt = started.elapsed();
        let tls_note = self.tls_note();
        let first = match first {
            Ok(a) => a,
            Err(e) => {
                let text = e.to_string();
                if is_tls_failure(&text) {
                    report.push(
                        "reachable",
                        Level::Pass,
                        "the registry accepts connections.",
                    );
                    report.push(
                        "tls",
                        Level::Fail,
                        format!(
                            "the certificate could not be verified ({tls_note}): {text}; give \
                             the CA that issued it with --upstream-ca-file (upstream.ca_file)."
                        ),
                    );
                } else {
                    report.push(
                        "reachable",
                        Level::Fail,
                        format!("GET /v2/ got no answer: {text}."),
                    );
                    report.unreachable = true;
                }
                return;
            }
        };
        report.push(
            "reachable",
            Level::Pass,
            format!(
                "GET /v2/ answered {} in {} ms.",
                first.status.as_u16(),
                first_rtt.as_millis()
            ),
        );
        self.check_tls(report, &tls_note);
        if !self.check_auth(report, &first).await {
            report.push(
                "probes",
                Level::Warn,
                "not run: the registry refused graft's account, so nothing more could be checked.",
            );
            return;
        }
        self.check_catalog(report).await;
        let pushed = self.check_push(report).await;
        if let Some(probe) = &pushed {
            self.check_referrers(report, probe).await;
            self.check_tag_pagination(report).await;
        }
        self.check_unknown_index(report).await;
        if let Some(probe) = &pushed {
            self.check_delete(report, probe).await;
        }
        self.check_round_trip(report).await;
    }

    /// `GET /v2/` with no credentials, past graft's token handling.
    async fn anonymous_v2(&self) -> Result<Answer, UpstreamError> {
        let uri = format!("{}/v2/", self.upstream.origin())
            .parse::<http::Uri>()
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        let req = Request::get(uri)
            .body(body::empty())
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        let (resp, _) = self.upstream.send(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = self
            .upstream
            .read_limited(resp.into_body(), READ_LIMIT)
            .await?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    fn tls_note(&self) -> String {
        match &self.cfg.ca_file {
            Some(ca) => format!("system roots and {}", ca.display()),
            None => "system roots".into(),
        }
    }

    fn check_tls(&self, report: &mut Report, tls_note: &str) {
        if self.cfg.url.starts_with("https://") {
            report.push(
                "tls",
                Level::Pass,
                format!("the certificate was verified against the {tls_note}."),
            );
            return;
        }
        let loopback = self
            .cfg
            .url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .is_some_and(|h| {
                h == "localhost"
                    || h.trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            });
        if loopback {
            report.push(
                "tls",
                Level::Pass,
                "plain http on a loopback address: nothing leaves the machine.",
            );
        } else {
            report.push(
                "tls",
                Level::Warn,
                "plain http: credentials and content cross the network unencrypted.",
            );
        }
    }

    /// Reports the auth scheme; false when graft's account cannot get in
    /// (the write probes would only repeat the refusal).
    async fn check_auth(&self, report: &mut Report, first: &Answer) -> bool {
        if first.status.is_success() {
            report.push(
                "auth",
                Level::Pass,
                "none: the registry answers without credentials.",
            );
            return true;
        }
        if first.status != StatusCode::UNAUTHORIZED {
            report.push(
                "auth",
                Level::Fail,
                format!(
                    "GET /v2/ answered {}, neither 200 nor 401: this is not an OCI registry \
                     root.",
                    first.status.as_u16()
                ),
            );
            return false;
        }
        let challenge = first.header(header::WWW_AUTHENTICATE).unwrap_or_default();
        if let Some(bearer) = Challenge::parse(challenge) {
            return self.check_bearer(report, &bearer).await;
        }
        let scheme = challenge.split(' ').next().unwrap_or("unknown").to_owned();
        if self.auth.is_none() {
            report.push(
                "auth",
                Level::Fail,
                format!(
                    "{scheme}: the registry needs credentials and none were given; graft's own \
                     upkeep of fallback tags needs an account (--upstream-username, \
                     --upstream-password or --docker-config)."
                ),
            );
            return false;
        }
        match self.get("/v2/").await {
            Ok(a) if a.status.is_success() => {
                report.push(
                    "auth",
                    Level::Pass,
                    format!("{scheme}: the credentials given were accepted."),
                );
                true
            }
            Ok(a) => {
                report.push(
                    "auth",
                    Level::Fail,
                    format!(
                        "{scheme}: the credentials given were refused ({}).",
                        a.status.as_u16()
                    ),
                );
                false
            }
            Err(e) => {
                report.push("auth", Level::Fail, format!("{scheme}: {e}."));
                false
            }
        }
    }

    /// Bearer: the realm must be reachable and hand out a token for the
    /// probe repository.
    async fn check_bearer(&self, report: &mut Report, challenge: &Challenge) -> bool {
        let probe = Challenge {
            scope: Some(format!("repository:{PROBE_REPO}:pull,push")),
            ..challenge.clone()
        };
        // A client of its own, so the token fetched here is not the one the
        // later requests reuse: each goes through `call` as graft's would.
        let mut tokens = TokenClient::new(&self.cfg);
        tokens.set_client_credentials(self.auth.as_ref());
        let who = if self.auth.is_some() {
            "with the credentials given"
        } else {
            "anonymously"
        };
        match tokens.token_for(&self.upstream, &probe, None, None).await {
            Ok(_) => {
                report.push(
                    "auth",
                    Level::Pass,
                    format!(
                        "Bearer: the token realm {} is reachable and issued a token {who} for \
                         `{}`.",
                        challenge.realm,
                        probe.scope.as_deref().unwrap_or_default()
                    ),
                );
                true
            }
            Err(e @ token::TokenError::Refused { .. }) if self.auth.is_none() => {
                report.push(
                    "auth",
                    Level::Fail,
                    format!(
                        "Bearer: {e}; graft's own upkeep of fallback tags needs an account \
                         (--upstream-username, --upstream-password or --docker-config)."
                    ),
                );
                false
            }
            Err(e) => {
                report.push("auth", Level::Fail, format!("Bearer: {e}."));
                false
            }
        }
    }

    async fn check_catalog(&self, report: &mut Report) {
        match self.get("/v2/_catalog?n=1").await {
            Ok(a) if a.status.is_success() => report.push(
                "catalog",
                Level::Pass,
                "GET /v2/_catalog is allowed: `graft reindex` can find every repository.",
            ),
            Ok(a) => report.push(
                "catalog",
                Level::Warn,
                format!(
                    "GET /v2/_catalog answered {}: `graft reindex` needs --repo for each \
                     repository.",
                    a.status.as_u16()
                ),
            ),
            Err(e) => report.push("catalog", Level::Warn, format!("GET /v2/_catalog: {e}.")),
        }
    }

    /// Pushes the empty config blob and a probe manifest tagged `probe-a`
    /// and `probe-b`, as graft's fallback-tag upkeep would push; the
    /// manifest's digest and bytes when it worked.
    async fn check_push(&self, report: &mut Report) -> Option<Probe> {
        let result = self.push_probe().await;
        match result {
            Ok(probe) => {
                report.push(
                    "push",
                    Level::Pass,
                    format!(
                        "graft's account pushed a probe manifest to {PROBE_REPO}: fallback \
                         tags can be written."
                    ),
                );
                Some(probe)
            }
            Err(why) => {
                report.push(
                    "push",
                    Level::Fail,
                    format!(
                        "graft's account could not push to {PROBE_REPO} ({why}): fallback tags \
                         cannot be written."
                    ),
                );
                None
            }
        }
    }

    async fn push_probe(&self) -> Result<Probe, String> {
        let config = Bytes::from_static(b"{}");
        let config_digest = sha256(&config);
        let start = self
            .call(
                Method::POST,
                &format!("/v2/{PROBE_REPO}/blobs/uploads/"),
                &[],
                Bytes::new(),
            )
            .await
            .map_err(|e| e.to_string())?;
        if start.status != StatusCode::ACCEPTED {
            return Err(format!("starting a blob upload answered {}", start.status));
        }
        let location = start
            .header(header::LOCATION)
            .ok_or("the upload answer had no Location")?;
        let path = self.path_of(location)?;
        let sep = if path.contains('?') { '&' } else { '?' };
        let put = self
            .call(
                Method::PUT,
                &format!("{path}{sep}digest={config_digest}"),
                &[(header::CONTENT_TYPE, "application/octet-stream")],
                config.clone(),
            )
            .await
            .map_err(|e| e.to_string())?;
        if put.status != StatusCode::CREATED {
            return Err(format!("uploading a blob answered {}", put.status));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "artifactType": "application/vnd.graft.doctor.probe",
            "config": { "mediaType": EMPTY, "digest": config_digest, "size": 2 },
            "layers": [{ "mediaType": EMPTY, "digest": config_digest, "size": 2 }],
            "annotations": { "org.opencontainers.image.description": "graft doctor probe" },
        });
        let bytes = Bytes::from(serde_json::to_vec(&manifest).unwrap_or_default());
        let digest = sha256(&bytes);
        for tag in ["probe-a", "probe-b"] {
            let a = self
                .call(
                    Method::PUT,
                    &format!("/v2/{PROBE_REPO}/manifests/{tag}"),
                    &[(header::CONTENT_TYPE, MANIFEST)],
                    bytes.clone(),
                )
                .await
                .map_err(|e| e.to_string())?;
            if a.status != StatusCode::CREATED {
                return Err(format!(
                    "PUT manifest answered {}{}",
                    a.status,
                    a.error_code().map(|c| format!(" {c}")).unwrap_or_default()
                ));
            }
        }
        Ok(Probe {
            digest,
            config_digest,
        })
    }

    /// The path and query of an upload `Location` (absolute or not).
    fn path_of(&self, location: &str) -> Result<String, String> {
        if location.starts_with('/') {
            return Ok(location.to_owned());
        }
        let uri: http::Uri = location
            .parse()
            .map_err(|_| format!("unusable Location `{location}`"))?;
        uri.path_and_query()
            .map(|p| p.as_str().to_owned())
            .ok_or_else(|| format!("unusable Location `{location}`"))
    }

    async fn check_referrers(&self, report: &mut Report, probe: &Probe) {
        let path = format!("/v2/{PROBE_REPO}/referrers/{}", probe.digest);
        match self.get(&path).await {
            Ok(a) if a.status == StatusCode::OK && is_index(&a.body) => report.push(
                "referrers",
                Level::Pass,
                "the registry serves the referrers API itself; graft passes it through.",
            ),
            Ok(a) if a.status == StatusCode::NOT_FOUND => report.push(
                "referrers",
                Level::Pass,
                "the registry has no referrers API (404): graft answers it from its index and \
                 keeps the sha256-<hex> fallback tags.",
            ),
            Ok(a) => report.push(
                "referrers",
                Level::Warn,
                format!(
                    "GET referrers answered {} without an image index: graft answers the API \
                     itself.",
                    a.status.as_u16()
                ),
            ),
            Err(e) => report.push("referrers", Level::Warn, format!("GET referrers: {e}.")),
        }
    }

    async fn check_tag_pagination(&self, report: &mut Report) {
        let path = format!("/v2/{PROBE_REPO}/tags/list?n=1");
        let a = match self.get(&path).await {
            Ok(a) => a,
            Err(e) => {
                report.push(
                    "tag-pagination",
                    Level::Warn,
                    format!("GET tags/list: {e}."),
                );
                return;
            }
        };
        let tags: Vec<String> = serde_json::from_slice::<serde_json::Value>(&a.body)
            .ok()
            .and_then(|v| serde_json::from_value(v["tags"].clone()).ok())
            .unwrap_or_default();
        let next = super::next_link(&a.headers, self.upstream.origin());
        if !a.status.is_success() {
            report.push(
                "tag-pagination",
                Level::Warn,
                format!("GET tags/list?n=1 answered {}.", a.status.as_u16()),
            );
        } else if tags.len() == 1 && next.is_some() {
            report.push(
                "tag-pagination",
                Level::Pass,
                "tags/list honours `n` and links the next page: long tag lists are read in pages.",
            );
        } else if tags.len() > 1 {
            report.push(
                "tag-pagination",
                Level::Warn,
                format!(
                    "tags/list?n=1 returned {} tags: `n` is ignored, so every listing arrives \
                     whole.",
                    tags.len()
                ),
            );
        } else {
            report.push(
                "tag-pagination",
                Level::Warn,
                "tags/list?n=1 sent no `Link` to the next page: a long listing cannot be \
                 followed past its first page.",
            );
        }
    }

    /// An index naming a manifest the registry does not have must be
    /// refused: graft takes an accepted index as proof its children exist.
    async fn check_unknown_index(&self, report: &mut Report) {
        let missing = sha256(format!("graft doctor missing {:?}", Instant::now()).as_bytes());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": [{ "mediaType": MANIFEST, "digest": missing, "size": 321 }],
        });
        let bytes = Bytes::from(serde_json::to_vec(&index).unwrap_or_default());
        let digest = sha256(&bytes);
        let path = format!("/v2/{PROBE_REPO}/manifests/{digest}");
        match self
            .call(
                Method::PUT,
                &path,
                &[(header::CONTENT_TYPE, INDEX)],
                bytes.clone(),
            )
            .await
        {
            Ok(a) if a.status.is_client_error() && a.status != StatusCode::UNAUTHORIZED => {
                let code = a.error_code().unwrap_or_else(|| "no error code".into());
                if a.status == StatusCode::FORBIDDEN {
                    report.push(
                        "unknown-index",
                        Level::Warn,
                        "not checked: graft's account may not push (403).",
                    );
                } else {
                    report.push(
                        "unknown-index",
                        Level::Pass,
                        format!(
                            "an image index naming a manifest the registry lacks was refused \
                             ({} {code}), as graft relies on.",
                            a.status.as_u16()
                        ),
                    );
                }
            }
            Ok(a) if a.status.is_success() => {
                let _ = self.call(Method::DELETE, &path, &[], Bytes::new()).await;
                report.push(
                    "unknown-index",
                    Level::Fail,
                    format!(
                        "an image index naming a manifest the registry lacks was accepted ({}): \
                         graft would take it as proof that manifest exists.",
                        a.status.as_u16()
                    ),
                );
            }
            Ok(a) => report.push(
                "unknown-index",
                Level::Warn,
                format!("not checked: PUT index answered {}.", a.status.as_u16()),
            ),
            Err(e) => report.push("unknown-index", Level::Warn, format!("PUT index: {e}.")),
        }
    }

    /// Deletes the probe manifest (and its config link): 202 means a
    /// referrer deleted through graft leaves its subject's fallback tag,
    /// rewritten; 405 UNSUPPORTED means deletes are disabled.
    async fn check_delete(&self, report: &mut Report, probe: &Probe) {
        let path = format!("/v2/{PROBE_REPO}/manifests/{}", probe.digest);
        match self.call(Method::DELETE, &path, &[], Bytes::new()).await {
            Ok(a) if a.status == StatusCode::ACCEPTED => {
                let blob = format!("/v2/{PROBE_REPO}/blobs/{}", probe.config_digest);
                let _ = self.call(Method::DELETE, &blob, &[], Bytes::new()).await;
                report.push(
                    "delete",
                    Level::Pass,
                    "DELETE of manifests is enabled: deleted referrers leave the fallback tags \
                     cleanly (the probe was deleted again).",
                );
            }
            Ok(a) => {
                let code = a.error_code().unwrap_or_default();
                let why = if a.status == StatusCode::METHOD_NOT_ALLOWED || code == "UNSUPPORTED" {
                    "DELETE of manifests is disabled (distribution: storage.delete.enabled: \
                     false)"
                        .to_string()
                } else {
                    format!("DELETE of the probe manifest answered {} {code}", a.status)
                };
                report.push(
                    "delete",
                    Level::Fail,
                    format!(
                        "{why}: referrers (signatures, SBOMs) cannot be deleted through graft, \
                         so the sha256-<hex> fallback tags are never rewritten clean of them; the \
                         probe stays in {PROBE_REPO} (tags probe-a, probe-b)."
                    ),
                );
            }
            Err(e) => report.push("delete", Level::Fail, format!("DELETE manifest: {e}.")),
        }
    }

    /// The median of three authenticated `GET /v2/`.
    async fn check_round_trip(&self, report: &mut Report) {
        let mut times = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            if self.get("/v2/").await.is_ok() {
                times.push(started.elapsed());
            }
        }
        times.sort();
        let Some(median) = times.get(times.len() / 2) else {
            report.push("round-trip", Level::Warn, "GET /v2/ did not answer again.");
            return;
        };
        let ms = median.as_secs_f64() * 1000.0;
        if *median > SLOW_RTT {
            report.push(
                "round-trip",
                Level::Warn,
                format!(
                    "{ms:.1} ms per request: every cache miss and referrers write pays this \
                     several times."
                ),
            );
        } else {
            report.push(
                "round-trip",
                Level::Pass,
                format!("{ms:.1} ms per request (median of 3)."),
            );
        }
    }
}

/// What the push probe left in the registry.
struct Probe {
    digest: String,
    config_digest: String,
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn is_index(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v["manifests"].is_array() && v["schemaVersion"] == 2)
}

/// Whether a connection error is a certificate or TLS handshake failure.
fn is_tls_failure(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer"]
        .iter()
        .any(|w| t.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(levels: &[Level], unreachable: bool) -> Report {
        Report {
            upstream: "http://x".into(),
            checks: levels
                .iter()
                .map(|l| Check {
                    name: "c",
                    status: *l,
                    detail: "d".into(),
                })
                .collect(),
            unreachable,
        }
    }

    #[test]
    fn exit_codes_follow_the_worst_check() {
        assert_eq!(report(&[Level::Pass, Level::Warn], false).exit_code(), 0);
        assert_eq!(report(&[Level::Pass, Level::Fail], false).exit_code(), 1);
        assert_eq!(report(&[Level::Fail], true).exit_code(), 2);
        let json: serde_json::Value =
            serde_json::from_str(&report(&[Level::Warn], false).to_json()).expect("json");
        assert_eq!(json["checks"][0]["status"], "warn");
        assert_eq!(json["exit_code"], 0);
    }

    #[test]
    fn tls_failures_are_told_apart_from_refused_connections() {
        assert!(is_tls_failure(
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        ));
        assert!(!is_tls_failure(
            "client error (Connect): tcp connect error: Connection refused"
        ));
    }
}
