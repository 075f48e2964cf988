//! `graft referrers <repo>@<digest>`: asks a running graft's referrers API
//! (`GET /v2/<name>/referrers/<digest>`, every page) and prints what it
//! answers — each referrer's digest, `artifactType`, size and annotations —
//! as a list, or with `--tree` as a tree of referrers of referrers
//! (a countersignature under the signature it signs).
//!
//! It goes through the API rather than the index on purpose: it shows what
//! clients see, fallback-tag entries and access checks included, and works
//! while `graft serve` holds the index.

use std::collections::HashSet;
use std::fmt::Write as _;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};

use super::Pages;
use crate::config::Config;
use crate::oci::{query, Descriptor, Digest, ImageIndex, RepoName};
use crate::upstream::Upstream;

/// Largest referrers page read.
const PAGE_LIMIT: usize = 16 * 1024 * 1024;

/// Pages followed for one subject before the `Link` chain is taken for a
/// loop.
const MAX_PAGES: usize = 10_000;

/// What to ask and how.
#[derive(Clone, Debug)]
pub struct ListOptions {
    /// graft's origin, e.g. `http://127.0.0.1:5001`.
    pub graft: String,
    /// Only the subject's direct referrers of these types (ORed); what
    /// refers to them is shown whatever its type.
    pub artifact_types: Vec<String>,
    /// Recurse into referrers of referrers.
    pub tree: bool,
    /// Levels below the subject shown with `tree`.
    pub max_depth: usize,
    /// The client's `Authorization`, passed to graft (which checks it with
    /// the upstream).
    pub auth: Option<HeaderValue>,
}

/// One referrer and, with `--tree`, what refers to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub descriptor: Descriptor,
    pub children: Vec<Node>,
    /// Why `children` stops here, when it does.
    pub note: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("`{0}` is not <repository>@<digest>")]
    BadSubject(String),
    #[error("{0}")]
    Graft(String),
    #[error(
        "graft answered {0}: the upstream wants credentials that may read this repository \
         (--username/--password, --token or --docker-config)"
    )]
    Denied(StatusCode),
}

/// Splits `<repository>@<digest>`.
pub fn parse_subject(s: &str) -> Result<(RepoName, Digest), ListError> {
    let bad = || ListError::BadSubject(s.to_string());
    let (repo, digest) = s.rsplit_once('@').ok_or_else(bad)?;
    let repo = RepoName::parse(repo).map_err(|_| bad())?;
    let digest = digest.parse().map_err(|_| bad())?;
    Ok((repo, digest))
}

/// Fetches the referrers of `subject` (and, with `tree`, theirs).
pub async fn fetch(
    opts: &ListOptions,
    repo: &RepoName,
    subject: &Digest,
) -> Result<Vec<Node>, ListError> {
    let mut cfg = Config::default().upstream;
    cfg.url = opts.graft.trim_end_matches('/').to_string();
    let client = Upstream::new(&cfg)
        .map_err(|e| ListError::Graft(e.to_string()))?
        // A Bearer challenge passed through graft is answered as registry
        // clients do, with the command's credentials.
        .client_credentials(opts.auth.as_ref());
    let mut walk = Walk {
        client,
        opts,
        repo,
        seen: HashSet::from([subject.clone()]),
    };
    let top = walk.page_all(subject, &opts.artifact_types).await?;
    let mut nodes = Vec::with_capacity(top.len());
    for d in top {
        nodes.push(walk.node(d, 1).await?);
    }
    Ok(nodes)
}

struct Walk<'a> {
    client: Upstream,
    opts: &'a ListOptions,
    repo: &'a RepoName,
    /// Every digest already placed in the tree. A manifest names one
    /// subject, so a repeat means a cycle (only a lying fallback tag can
    /// make one); it is shown once and not followed again.
    seen: HashSet<Digest>,
}

impl Walk<'_> {
    async fn node(&mut self, descriptor: Descriptor, depth: usize) -> Result<Node, ListError> {
        let mut node = Node {
            descriptor,
            children: Vec::new(),
            note: None,
        };
        if !self.opts.tree {
            return Ok(node);
        }
        let digest = node.descriptor.digest.clone();
        if !self.seen.insert(digest.clone()) {
            node.note = Some("already shown above; not followed again".into());
            return Ok(node);
        }
        let below = self.page_all(&digest, &[]).await?;
        if below.is_empty() {
            return Ok(node);
        }
        if depth >= self.opts.max_depth {
            node.note = Some(format!(
                "{} more referrer(s) below, past --max-depth {}",
                below.len(),
                self.opts.max_depth
            ));
            return Ok(node);
        }
        for d in below {
            let child = Box::pin(self.node(d, depth + 1)).await?;
            node.children.push(child);
        }
        Ok(node)
    }

    /// Every page of graft's answer for `subject`.
    async fn page_all(
        &self,
        subject: &Digest,
        artifact_types: &[String],
    ) -> Result<Vec<Descriptor>, ListError> {
        let mut path = format!("/v2/{}/referrers/{subject}", self.repo);
        for t in artifact_types {
            query::append(&mut path, "artifactType", t);
        }
        let mut out = Vec::new();
        let mut pages = Pages::new(path, MAX_PAGES);
        while let Some(path) = pages
            .next_path()
            .map_err(|e| ListError::Graft(e.to_string()))?
        {
            let (page, filtered) = self.page(&path, &mut pages).await?;
            // A server that ignored the filter says so by omitting
            // OCI-Filters-Applied; the filter is then applied here.
            out.extend(page.into_iter().filter(|d| {
                filtered
                    || artifact_types.is_empty()
                    || d.artifact_type
                        .as_ref()
                        .is_some_and(|t| artifact_types.contains(t))
            }));
        }
        Ok(out)
    }

    /// One page: its entries and whether the server filtered them; the
    /// next page's link goes to `pages`.
    async fn page(
        &self,
        path: &str,
        pages: &mut Pages,
    ) -> Result<(Vec<Descriptor>, bool), ListError> {
        let accept = [(header::ACCEPT, crate::oci::media::IMAGE_INDEX)];
        let resp = self
            .client
            .call(
                Method::GET,
                path,
                self.opts.auth.as_ref(),
                &accept,
                Bytes::new(),
            )
            .await
            .map_err(|e| ListError::Graft(format!("{}: {e}", self.opts.graft)))?;
        let status = resp.status();
        if crate::upstream::is_denial(status) {
            return Err(ListError::Denied(status));
        }
        let filtered = resp
            .headers()
            .get("oci-filters-applied")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|f| f.trim() == "artifactType"));
        pages.followed(resp.headers(), self.client.origin());
        let bytes = self
            .client
            .read_limited(resp.into_body(), PAGE_LIMIT)
            .await
            .map_err(|e| ListError::Graft(format!("{path}: {e}")))?;
        if !status.is_success() {
            return Err(ListError::Graft(format!(
                "GET {path} answered {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            )));
        }
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| ListError::Graft(format!("GET {path}: not an image index ({e})")))?;
        Ok((index.manifests, filtered))
    }
}

/// The listing as text: the subject, then one line per referrer (digest,
/// `artifactType`, size) with its annotations below it, indented by level.
pub fn render(repo: &RepoName, subject: &Digest, nodes: &[Node]) -> String {
    let mut out = format!("{repo}@{subject}\n");
    if nodes.is_empty() {
        out.push_str("(no referrers)\n");
        return out;
    }
    render_level(nodes, "", &mut out);
    out
}

fn render_level(nodes: &[Node], prefix: &str, out: &mut String) {
    for (i, n) in nodes.iter().enumerate() {
        let last = i + 1 == nodes.len();
        let d = &n.descriptor;
        let _ = writeln!(
            out,
            "{prefix}{}{}  {}  {} bytes",
            if last { "└── " } else { "├── " },
            d.digest,
            d.artifact_type.as_deref().unwrap_or("(no artifactType)"),
            d.size,
        );
        let inner = format!("{prefix}{}", if last { "    " } else { "│   " });
        for (k, v) in d.annotations.iter().flatten() {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(out, "{inner}  {k}={v}");
        }
        if let Some(note) = &n.note {
            let _ = writeln!(out, "{inner}  ({note})");
        }
        render_level(&n.children, &inner, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(seed: &[u8], t: &str, annotations: Option<serde_json::Value>) -> Descriptor {
        let mut v = serde_json::json!({
            "mediaType": crate::oci::media::IMAGE_MANIFEST,
            "digest": Digest::sha256_of(seed).to_string(),
            "size": 100,
            "artifactType": t,
        });
        if let Some(a) = annotations {
            v["annotations"] = a;
        }
        serde_json::from_value(v).expect("descriptor")
    }

    #[test]
    fn subjects_are_repository_at_digest() {
        let d = Digest::sha256_of(b"s");
        let (r, got) = parse_subject(&format!("team/app@{d}")).expect("parses");
        assert_eq!(r.as_str(), "team/app");
        assert_eq!(got, d);
        assert!(parse_subject("team/app:v1").is_err());
        assert!(parse_subject("team/app@sha256:short").is_err());
    }

    #[test]
    fn trees_indent_children_under_their_subject() {
        let subject = Digest::sha256_of(b"subject");
        let repo = RepoName::parse("app").expect("name");
        let sig = desc(
            b"sig",
            "application/vnd.sig",
            Some(serde_json::json!({"k": "v"})),
        );
        let counter = desc(b"counter", "application/vnd.countersig", None);
        let sbom = desc(b"sbom", "application/spdx+json", None);
        let nodes = vec![
            Node {
                descriptor: sig.clone(),
                children: vec![Node {
                    descriptor: counter.clone(),
                    children: vec![],
                    note: None,
                }],
                note: None,
            },
            Node {
                descriptor: sbom.clone(),
                children: vec![],
                note: None,
            },
        ];
        let text = render(&repo, &subject, &nodes);
        let want = format!(
            "app@{subject}\n\
             ├── {}  application/vnd.sig  100 bytes\n\
             │     k=v\n\
             │   └── {}  application/vnd.countersig  100 bytes\n\
             └── {}  application/spdx+json  100 bytes\n",
            sig.digest, counter.digest, sbom.digest
        );
        assert_eq!(text, want);
        assert_eq!(
            render(&repo, &subject, &[]),
            format!("app@{subject}\n(no referrers)\n")
        );
    }
}
