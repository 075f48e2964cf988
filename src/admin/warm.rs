//! `graft cache warm <repo>:<tag>…`: pre-pulls whole images through a
//! running graft, so its cache holds them before CI runners ask — or before
//! the upstream goes away.
//!
//! For each image it GETs the manifest (accepting OCI and Docker indexes
//! and manifests); for an image index or manifest list, every child
//! manifest (all platforms, nested indexes too); then every config and
//! layer blob. graft fills its cache as for any pull: digests verified
//! before a file becomes visible, concurrent pulls of one blob coalesced,
//! access checked with the upstream using the credentials given here. Blob
//! bodies are counted and dropped as they stream, never held in memory.
//!
//! It talks HTTP rather than opening the data directory, so it runs while
//! `graft serve` holds the index — which is when warming is of use. While
//! the upstream is down, graft serves cached content only to credentials
//! the upstream said yes to for that repository (DESIGN.md, "Security
//! model"), for up to `cache.max_stale` (also across a restart): warm with
//! the credentials the runners use (none for anonymous pulls).

use std::collections::HashSet;
use std::fmt;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use super::cache::human_bytes;
use super::{Outcome, Progress, Unit};
use crate::config::Config;
use crate::oci::media::ACCEPT_MANIFESTS;
use crate::oci::{Descriptor, Digest, Reference, RepoName};
use crate::upstream::Upstream;

/// Largest manifest or index read (graft itself accepts 4 MiB by default).
const MANIFEST_LIMIT: usize = 16 * 1024 * 1024;

/// Levels of indexes inside indexes followed below the image's own.
const MAX_NESTING: usize = 4;

/// How much of an error answer is quoted in a message.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Where and how to pull.
#[derive(Clone, Debug)]
pub struct WarmOptions {
    /// graft's origin, e.g. `http://127.0.0.1:5001`.
    pub graft: String,
    /// The client's `Authorization`, passed to graft (which checks it with
    /// the upstream, and remembers the yes for offline pulls).
    pub auth: Option<HeaderValue>,
    /// Blobs of one image read at once.
    pub jobs: usize,
}

/// An image to warm: `<repo>:<tag>` or `<repo>@<digest>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub repo: RepoName,
    pub reference: Reference,
}

impl ImageRef {
    /// Parses `<repo>:<tag>`, `<repo>@<digest>` (`<repo>:<tag>@<digest>`
    /// pins the digest), or `<repo>` for `<repo>:latest` as `docker pull`
    /// reads it. The repository is graft's, without a registry host.
    pub fn parse(s: &str) -> Result<ImageRef, WarmError> {
        let bad = || WarmError::BadReference(s.to_string());
        let (name, reference) = match s.split_once('@') {
            Some((name, digest)) => {
                let digest: Digest = digest.parse().map_err(|_| bad())?;
                let name = name.split_once(':').map_or(name, |(n, _)| n);
                (name, Reference::Digest(digest))
            }
            None => match s.rsplit_once(':') {
                Some((name, tag)) if Reference::is_tag(tag) => {
                    (name, Reference::Tag(tag.to_string()))
                }
                // `host:5000/app`: a registry host, or a malformed tag.
                Some(_) => return Err(bad()),
                None => (s, Reference::Tag("latest".to_string())),
            },
        };
        let repo = RepoName::parse(name).map_err(|_| bad())?;
        Ok(ImageRef { repo, reference })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repo),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("`{0}` is not <repository>:<tag> or <repository>@<digest>")]
    BadReference(String),
    #[error("{0}")]
    Client(String),
}

/// What a warm run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WarmSummary {
    /// Images whose every manifest and blob was read.
    pub images: usize,
    /// Manifests and indexes read.
    pub manifests: usize,
    /// Blobs read (once per repository, however many images share them).
    pub blobs: usize,
    /// Bytes read through graft, manifests and blobs.
    pub bytes: u64,
    /// Layers with `urls` (foreign layers): registries do not hold them, so
    /// neither does graft's cache.
    pub foreign_skipped: usize,
    /// What could not be read, one line each.
    pub problems: Vec<String>,
}

impl WarmSummary {
    /// Whether every image was read completely.
    pub fn is_complete(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for WarmSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "images: {}", self.images)?;
        writeln!(f, "manifests: {}", self.manifests)?;
        writeln!(f, "blobs: {}", self.blobs)?;
        write!(f, "bytes: {} ({})", self.bytes, human_bytes(self.bytes))?;
        if self.foreign_skipped > 0 {
            write!(
                f,
                "\nforeign layers skipped (clients fetch them from their own URLs): {}",
                self.foreign_skipped
            )?;
        }
        for p in &self.problems {
            write!(f, "\nnot warmed: {p}")?;
        }
        Ok(())
    }
}

/// Pulls every image in `images` through the graft at `opts.graft`,
/// reporting bytes read on one [`Progress::line`] of `progress` per image
/// (pass [`super::Silent`] for none). A fetch that fails is noted in the
/// summary and the run goes on.
pub async fn run(
    opts: &WarmOptions,
    images: &[ImageRef],
    progress: &dyn Progress,
) -> Result<WarmSummary, WarmError> {
    let mut cfg = Config::default().upstream;
    cfg.url = opts.graft.trim_end_matches('/').to_string();
    let client = Upstream::new(&cfg)
        .map_err(|e| WarmError::Client(format!("--graft {}: {e}", opts.graft)))?
        // A Bearer challenge passed through graft is answered as registry
        // clients do, with the command's credentials.
        .client_credentials(opts.auth.as_ref());
    let mut warmer = Warmer {
        client,
        opts,
        fetched: HashSet::new(),
    };
    let mut summary = WarmSummary::default();
    for image in images {
        let line = progress.line();
        let problems = warmer.image(image, &*line, &mut summary).await;
        if problems.is_empty() {
            summary.images += 1;
        }
        summary
            .problems
            .extend(problems.into_iter().map(|p| format!("{image}: {p}")));
    }
    Ok(summary)
}

struct Warmer<'a> {
    client: Upstream,
    opts: &'a WarmOptions,
    /// Blobs already read this run, by repository: a base layer shared by
    /// several images or platforms is read once per repository. Once per
    /// repository, not once: graft records per repository that the
    /// upstream holds a digest, and serves it offline only there.
    fetched: HashSet<(RepoName, Digest)>,
}

/// One manifest as graft served it.
#[derive(Debug, Default, PartialEq)]
struct Manifest {
    bytes: u64,
    /// Child manifests, when it is an index.
    children: Vec<Descriptor>,
    /// Config and layers, when it is an image manifest.
    blobs: Vec<Descriptor>,
}

/// What reading an image's manifests found.
#[derive(Debug, Default)]
struct Manifests {
    read: usize,
    /// Config and layer descriptors of every platform, repeats included.
    blobs: Vec<Descriptor>,
    problems: Vec<String>,
}

impl Warmer<'_> {
    /// Reads one image: its manifests, then its blobs. Returns what failed.
    async fn image(
        &mut self,
        image: &ImageRef,
        line: &dyn Progress,
        summary: &mut WarmSummary,
    ) -> Vec<String> {
        line.message(&format!("{image}: manifests"));
        let mut found = self.manifests(image, summary).await;
        summary.manifests += found.read;
        let wanted = self.unread(&image.repo, std::mem::take(&mut found.blobs), summary);
        // A byte count only when there are bytes to read: an image whose
        // manifest failed ends on its message line with the failure count.
        if !wanted.is_empty() {
            line.count(wanted.iter().map(|d| d.size).sum(), Unit::Bytes);
            line.message(&image.to_string());
        }
        let read = self
            .blobs(&image.repo, &wanted, line, summary, &mut found.problems)
            .await;
        if found.problems.is_empty() {
            let done = format!("{image}: {} manifests, {read} blobs", found.read);
            line.finish(Outcome::Done(&done));
        } else {
            let failed = format!("{image}: {} failed", found.problems.len());
            line.finish(Outcome::Failed(&failed));
        }
        found.problems
    }

    /// Reads the image's manifest and, for an index, every child manifest
    /// (nested indexes too, up to [`MAX_NESTING`] deep), depth first.
    async fn manifests(&self, image: &ImageRef, summary: &mut WarmSummary) -> Manifests {
        let mut found = Manifests::default();
        let mut todo = vec![(image.reference.to_string(), 0)];
        while let Some((reference, depth)) = todo.pop() {
            let m = match self.manifest(&image.repo, &reference).await {
                Ok(m) => m,
                Err(e) => {
                    found.problems.push(e);
                    continue;
                }
            };
            found.read += 1;
            summary.bytes += m.bytes;
            if !m.children.is_empty() && depth >= MAX_NESTING {
                found.problems.push(format!(
                    "{reference}: indexes nested more than {MAX_NESTING} deep"
                ));
                continue;
            }
            // Reversed onto the stack, so platforms go in index order.
            todo.extend(
                m.children
                    .iter()
                    .rev()
                    .map(|c| (c.digest.to_string(), depth + 1)),
            );
            found.blobs.extend(m.blobs);
        }
        found
    }

    /// The blobs of `blobs` still to read in `repo`, each once; foreign
    /// layers are counted and skipped.
    fn unread(
        &mut self,
        repo: &RepoName,
        blobs: Vec<Descriptor>,
        summary: &mut WarmSummary,
    ) -> Vec<Descriptor> {
        let mut wanted = Vec::new();
        for d in blobs {
            if is_foreign(&d) {
                summary.foreign_skipped += 1;
            } else if self.fetched.insert((repo.clone(), d.digest.clone())) {
                wanted.push(d);
            }
        }
        wanted
    }

    /// Reads `wanted`, `opts.jobs` at a time; returns how many were read
    /// and adds what failed to `problems`.
    async fn blobs(
        &mut self,
        repo: &RepoName,
        wanted: &[Descriptor],
        line: &dyn Progress,
        summary: &mut WarmSummary,
        problems: &mut Vec<String>,
    ) -> usize {
        let this = &*self;
        let results: Vec<(Digest, Result<u64, String>)> = stream::iter(wanted)
            .map(|d| async move { (d.digest.clone(), this.blob(repo, d, line).await) })
            .buffer_unordered(self.opts.jobs.max(1))
            .collect()
            .await;
        let mut read = 0;
        for (digest, result) in results {
            match result {
                Ok(n) => {
                    read += 1;
                    summary.bytes += n;
                }
                Err(e) => {
                    // Another image of this run may try it again.
                    self.fetched.remove(&(repo.clone(), digest));
                    problems.push(e);
                }
            }
        }
        summary.blobs += read;
        read
    }

    /// GETs a manifest by tag or digest and checks its bytes against the
    /// digest (the one asked for, or the one graft answered with).
    async fn manifest(&self, repo: &RepoName, reference: &str) -> Result<Manifest, String> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .get(&path, &[(header::ACCEPT, ACCEPT_MANIFESTS)])
            .await?;
        let answered = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        let body = self
            .client
            .read_limited(resp.into_body(), MANIFEST_LIMIT)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let expected = match Reference::parse(reference) {
            Some(Reference::Digest(d)) => Some(d),
            _ => answered,
        };
        if let Some(d) = expected {
            if d.verify(&body) == Some(false) {
                return Err(format!("GET {path}: the body does not match {d}"));
            }
        }
        parse_manifest(&body).map_err(|e| format!("GET {path}: {e}"))
    }

    /// GETs a blob, counting its bytes into `line` and dropping them.
    async fn blob(
        &self,
        repo: &RepoName,
        d: &Descriptor,
        line: &dyn Progress,
    ) -> Result<u64, String> {
        let path = format!("/v2/{repo}/blobs/{}", d.digest);
        let mut body = self.get(&path, &[]).await?.into_body();
        let mut got = 0u64;
        while let Some(frame) = body.frame().await {
            // graft breaks the connection rather than end a body whose
            // bytes do not match their digest: an error here is that, or a
            // failed upstream fetch.
            let frame = frame
                .map_err(|e| format!("GET {path}: the body broke off after {got} bytes ({e})"))?;
            if let Ok(data) = frame.into_data() {
                got += data.len() as u64;
                line.advance(data.len() as u64);
            }
        }
        if got != d.size {
            return Err(format!(
                "GET {path}: {got} bytes, the manifest says {}",
                d.size
            ));
        }
        Ok(got)
    }

    /// A GET that answered 200, or why not.
    async fn get(
        &self,
        path: &str,
        headers: &[(HeaderName, &str)],
    ) -> Result<http::Response<Incoming>, String> {
        let resp = self
            .client
            .call(
                Method::GET,
                path,
                self.opts.auth.as_ref(),
                headers,
                Bytes::new(),
            )
            .await
            .map_err(|e| format!("GET {}{path}: {e}", self.client.origin()))?;
        let status = resp.status();
        if status == StatusCode::OK {
            return Ok(resp);
        }
        if crate::upstream::is_denial(status) {
            return Err(format!(
                "GET {path}: graft answered {status}: the upstream wants credentials that may \
                 read this repository (--username/--password, --token or --docker-config)"
            ));
        }
        let body = self
            .client
            .read_limited(resp.into_body(), ERROR_BODY_LIMIT)
            .await
            .unwrap_or_default();
        Err(format!(
            "GET {path}: graft answered {status}: {}",
            error_text(&body)
        ))
    }
}

/// The first `code: message` of an OCI error body, else the body as text.
fn error_text(body: &[u8]) -> String {
    let first = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("errors")?.get(0).cloned());
    match first {
        Some(e) => format!(
            "{}: {}",
            e.get("code").and_then(Value::as_str).unwrap_or("UNKNOWN"),
            e.get("message").and_then(Value::as_str).unwrap_or_default()
        ),
        None => String::from_utf8_lossy(body).trim().to_string(),
    }
}

/// The manifests of an index, or the config and layers of a manifest
/// (OCI or Docker schema 2; both use these field names).
fn parse_manifest(body: &[u8]) -> Result<Manifest, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let descriptors = |field: &str| -> Result<Vec<Descriptor>, String> {
        match v.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(list) => serde_json::from_value(list.clone())
                .map_err(|e| format!("`{field}` is not a list of descriptors ({e})")),
        }
    };
    let mut m = Manifest {
        bytes: body.len() as u64,
        ..Manifest::default()
    };
    if v.get("manifests").is_some() {
        m.children = descriptors("manifests")?;
    } else if v.get("config").is_some() || v.get("layers").is_some() {
        if let Some(config) = v.get("config") {
            let config: Descriptor = serde_json::from_value(config.clone())
                .map_err(|e| format!("`config` is not a descriptor ({e})"))?;
            m.blobs.push(config);
        }
        m.blobs.extend(descriptors("layers")?);
    } else {
        return Err(
            "neither an image index nor an image manifest (Docker schema 1 is not supported)"
                .into(),
        );
    }
    Ok(m)
}

/// A layer the registry does not hold: it lists `urls` to fetch it from.
fn is_foreign(d: &Descriptor) -> bool {
    d.other
        .get("urls")
        .and_then(Value::as_array)
        .is_some_and(|urls| !urls.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_repo_colon_tag_or_repo_at_digest() {
        let d = Digest::sha256_of(b"m");
        let parse = |s: &str| ImageRef::parse(s).map(|r| r.to_string());
        assert_eq!(parse("team/app:v1").ok().as_deref(), Some("team/app:v1"));
        assert_eq!(parse("app").ok().as_deref(), Some("app:latest"));
        let pinned = format!("app@{d}");
        assert_eq!(parse(&pinned).ok().as_deref(), Some(pinned.as_str()));
        assert_eq!(
            parse(&format!("app:v1@{d}")).ok().as_deref(),
            Some(pinned.as_str())
        );
        for bad in [
            "registry.example:5000/app",
            "registry.example:5000/app:v1",
            "app:",
            "app@sha256:short",
            "App:v1",
        ] {
            assert!(
                matches!(ImageRef::parse(bad), Err(WarmError::BadReference(_))),
                "{bad}"
            );
        }
    }

    fn descriptor(seed: &[u8], extra: Value) -> Value {
        let mut v = serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": Digest::sha256_of(seed).to_string(),
            "size": 3,
        });
        if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        v
    }

    #[test]
    fn indexes_give_children_and_manifests_give_config_and_layers() {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests": [descriptor(b"a", serde_json::json!({"platform": {"os": "linux"}}))],
        });
        let bytes = serde_json::to_vec(&index).expect("json");
        let m = parse_manifest(&bytes).expect("an index");
        assert_eq!(m.children.len(), 1);
        assert!(m.blobs.is_empty());
        assert_eq!(m.bytes, bytes.len() as u64);

        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": descriptor(b"c", Value::Null),
            "layers": [
                descriptor(b"l1", Value::Null),
                descriptor(b"l2", serde_json::json!({"urls": ["https://example.com/l2"]})),
            ],
        });
        let m = parse_manifest(&serde_json::to_vec(&manifest).expect("json")).expect("manifest");
        assert_eq!(m.blobs.len(), 3);
        assert_eq!(m.blobs[0].digest, Digest::sha256_of(b"c"));
        assert_eq!(
            m.blobs.iter().map(is_foreign).collect::<Vec<_>>(),
            [false, false, true]
        );

        assert!(parse_manifest(br#"{"schemaVersion":1,"fsLayers":[]}"#).is_err());
        assert!(parse_manifest(b"not json").is_err());
    }

    #[test]
    fn oci_errors_are_quoted_by_code_and_message() {
        assert_eq!(
            error_text(
                br#"{"errors":[{"code":"UNAVAILABLE","message":"upstream down","detail":null}]}"#
            ),
            "UNAVAILABLE: upstream down"
        );
        assert_eq!(error_text(b" plain text \n"), "plain text");
    }

    #[test]
    fn summary_lists_counts_then_what_failed() {
        let mut s = WarmSummary {
            images: 1,
            manifests: 3,
            blobs: 4,
            bytes: 2048,
            ..WarmSummary::default()
        };
        assert!(s.is_complete());
        assert_eq!(
            s.to_string(),
            "images: 1\nmanifests: 3\nblobs: 4\nbytes: 2048 (2.00 KiB)"
        );
        s.problems.push("app:v2: GET …: graft answered 502".into());
        assert!(!s.is_complete());
        assert!(s
            .to_string()
            .ends_with("\nnot warmed: app:v2: GET …: graft answered 502"));
    }
}
