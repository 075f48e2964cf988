//! Who may read what from the cache (DESIGN.md, "Security model").
//!
//! graft does not widen access: a cache hit for repository R is served only
//! after the upstream said yes to this client's own credentials on R, and
//! only when the upstream confirmed R holds the digest — so content cached
//! through repository A never leaks to B, nor to anonymous clients. A yes is
//! remembered per (hash of the credentials, repository) for `auth_ttl`, never
//! the credentials themselves (the hash is also kept in the index, so the
//! rule below holds across a restart). While the upstream cannot be
//! reached, the last yes stands for up to `max_stale`; a no (401/403)
//! always stands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};

use crate::credentials::{CredKey, CredentialKeys};
use crate::error::Error;
use crate::index::Index;
use crate::metrics::{self, Metrics};
use crate::oci::{Digest, RepoName};
use crate::upstream::{Upstream, UpstreamError};

/// The upstream's answer for this client, or what stands in for it.
pub enum Decision {
    Allowed {
        stale: bool,
    },
    /// The upstream's own no (401, 403) or "not here" (404).
    Denied,
    /// The upstream could not be asked and no remembered yes stands.
    Unreachable(Error),
}

/// Which endpoint family to ask about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    pub fn path(self, repo: &RepoName, reference: &str) -> String {
        match self {
            Kind::Blob => format!("/v2/{repo}/blobs/{reference}"),
            Kind::Manifest => format!("/v2/{repo}/manifests/{reference}"),
        }
    }
}

type Key = (RepoName, CredKey);

pub struct AccessCache {
    upstream: Upstream,
    index: Index,
    metrics: Arc<Metrics>,
    keys: CredentialKeys,
    ttl: Duration,
    max_stale: Duration,
    yes: Mutex<HashMap<Key, Instant>>,
}

/// The upstream failed in a way that is not an answer about access.
pub fn is_outage(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

impl AccessCache {
    pub fn new(
        upstream: Upstream,
        index: Index,
        metrics: Arc<Metrics>,
        keys: CredentialKeys,
        ttl: Duration,
        max_stale: Duration,
    ) -> AccessCache {
        AccessCache {
            upstream,
            index,
            metrics,
            keys,
            ttl,
            max_stale,
            yes: Mutex::new(HashMap::new()),
        }
    }

    /// The key these credentials are remembered under.
    pub fn key(&self, auth: Option<&HeaderValue>) -> CredKey {
        self.keys.key(auth)
    }

    /// Age of the last yes for these credentials on `repo`.
    fn age(&self, repo: &RepoName, cred: CredKey) -> Option<Duration> {
        self.yes
            .lock()
            .expect("access cache poisoned")
            .get(&(repo.clone(), cred))
            .map(Instant::elapsed)
    }

    pub fn remember_yes(&self, repo: &RepoName, cred: CredKey) {
        let mut map = self.yes.lock().expect("access cache poisoned");
        // Bounded: drop expired yeses when the map grows large.
        if map.len() > 65_536 {
            let keep = self.max_stale.max(self.ttl);
            map.retain(|_, t| t.elapsed() < keep);
        }
        let previous = map.insert((repo.clone(), cred), Instant::now());
        drop(map);
        // Persisted (as a hash, never the credentials) so offline pulls
        // survive a restart; at most every 30 s per key, to keep index
        // writes off busy paths.
        if previous.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            let _ =
                self.index
                    .remember_access(repo, &cred, crate::clock::Clock::system().now_secs());
        }
    }

    pub fn forget(&self, repo: &RepoName, cred: CredKey) {
        self.yes
            .lock()
            .expect("access cache poisoned")
            .remove(&(repo.clone(), cred));
        let _ = self.index.forget_access(repo, &cred);
    }

    /// Whether a yes within `auth_ttl` stands (no upstream round trip).
    pub fn fresh_yes(&self, repo: &RepoName, cred: CredKey) -> bool {
        self.age(repo, cred).is_some_and(|a| a < self.ttl)
    }

    /// Whether a yes within `max_stale` stands (upstream unreachable).
    pub fn stale_yes(&self, repo: &RepoName, cred: CredKey) -> bool {
        if self.age(repo, cred).is_some_and(|a| a < self.max_stale) {
            return true;
        }
        // From before a restart.
        self.index.access_remembered(repo, &cred).is_some_and(|at| {
            crate::clock::Clock::system().now_secs().saturating_sub(at) < self.max_stale.as_secs()
        })
    }

    /// May this client read `digest` from `repo`? Asks the upstream (a HEAD
    /// with the client's own `Authorization`) unless a fresh yes stands and
    /// the upstream already confirmed `repo` holds `digest`.
    pub async fn check(
        &self,
        kind: Kind,
        repo: &RepoName,
        digest: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Decision {
        let (upstream, index, metrics) = (&self.upstream, &self.index, &*self.metrics);
        let cred = self.key(auth);
        let present = index.is_present(repo, digest).unwrap_or(false);
        if present && self.fresh_yes(repo, cred) {
            metrics::inc(&metrics.auth_remembered);
            return Decision::Allowed { stale: false };
        }
        metrics::inc(&metrics.auth_checks);
        let path = kind.path(repo, digest.as_str());
        let accept = [(header::ACCEPT, crate::referrers::ACCEPT_MANIFESTS)];
        let headers: &[(header::HeaderName, &str)] =
            if kind == Kind::Manifest { &accept } else { &[] };
        let outcome = upstream
            .call(Method::HEAD, &path, auth, headers, Bytes::new())
            .await;
        let offline = |e: Error| {
            if present && self.stale_yes(repo, cred) {
                metrics::inc(&metrics.cache_stale_hits);
                tracing::info!(%repo, %digest, "upstream unreachable; serving on a remembered authorization");
                Decision::Allowed { stale: true }
            } else {
                Decision::Unreachable(e)
            }
        };
        match outcome {
            Ok(resp) if resp.status().is_success() => {
                self.remember_yes(repo, cred);
                let _ = index.mark_present(repo, digest);
                Decision::Allowed { stale: false }
            }
            Ok(resp) if is_outage(resp.status()) => offline(Error::UpstreamUnreachable(format!(
                "upstream answered {}",
                resp.status()
            ))),
            Ok(resp) => {
                let status = resp.status();
                if crate::upstream::is_denial(status) {
                    self.forget(repo, cred);
                }
                if status == StatusCode::NOT_FOUND {
                    let _ = index.forget_present(repo, digest);
                }
                Decision::Denied
            }
            Err(e @ (UpstreamError::Unreachable(_) | UpstreamError::Timeout(_))) => {
                offline(e.into())
            }
        }
    }
}
