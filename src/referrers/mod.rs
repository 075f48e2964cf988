//! The referrers service: what graft knows about referrers, how it learns
//! more, and how it keeps the upstream's fallback tags true.
//!
//! Sources of truth, in order: what passed through graft (the index), the
//! upstream fallback tag (read and merged on every query when its digest
//! changed), and a reindex. The fallback tag is the durable shared copy, so
//! every write to it is a merge: graft reads the tag, ingests what it does
//! not know, and writes the union. Writes for one (repository, subject) are
//! serialized inside graft because the upstream has no conditional PUT.
//!
//! Here: listing, and the push and delete lifecycle (intents first, so a
//! crash never loses what the upstream accepted). `fallback.rs` reads the
//! tags, `ingest.rs` learns from them, `reconcile.rs` asks the upstream
//! about what a changed tag and the index disagree on, `tag_write.rs`
//! writes them, `writer.rs` serializes the writes, `recover.rs` finishes
//! what a crash interrupted, `native.rs` answers with the union when the
//! upstream serves the referrers API itself. Index work runs on the blocking pool, a batch
//! at a time.

pub(crate) mod fallback;
mod ingest;
mod native;
mod reconcile;
mod recover;
mod tag_fit;
mod tag_write;
mod writer;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::config::{FallbackTag, ReferrersConfig, ReferrersMode};
use crate::credentials::CredentialKeys;
use crate::error::Error;
use crate::index::Index;
use crate::oci::{Descriptor, Digest, RepoName};
use crate::upstream::Upstream;

pub use fallback::{Access, Denial};

/// What ingesting one fallback-tag index did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReindexStats {
    /// Entries the index listed.
    pub entries: usize,
    /// Referrers the index did not know before.
    pub added: usize,
    /// Entries the upstream could not judge now (unreachable, 5xx, 401):
    /// they are checked again on the next read of the tag.
    pub undecided: usize,
}

impl ReindexStats {
    /// Whether every entry was decided.
    pub fn complete(&self) -> bool {
        self.undecided == 0
    }
}

/// Largest manifest or index graft reads from the upstream for itself.
const READ_LIMIT: usize = 8 * 1024 * 1024;

pub(crate) use crate::oci::media::ACCEPT_MANIFESTS;

/// Whether the upstream has its own referrers API (mode `auto`).
const NATIVE_UNKNOWN: u8 = 0;
const NATIVE_YES: u8 = 1;
const NATIVE_NO: u8 = 2;

pub struct Referrers {
    index: Index,
    upstream: Upstream,
    cfg: ReferrersConfig,
    /// Graft's own credentials, for work no client is waiting on (finishing
    /// owed tag writes after a restart, reindexing).
    own_auth: Option<HeaderValue>,
    /// Keys the recent-checks memory by credentials without keeping them.
    keys: CredentialKeys,
    native: AtomicU8,
    writer: writer::TagWriter,
    recent: fallback::RecentChecks,
    /// Pushes and deletes forwarded right now: their intents are not crash
    /// leftovers, and recovery must not judge them by a HEAD that can race
    /// the upstream's accept. Bounded by time and count: a handler dropped
    /// mid-forward (client gone) never clears its entry, so it expires and
    /// recovery settles the intent by asking the upstream.
    in_flight: moka::sync::Cache<(RepoName, Digest), ()>,
    /// What the fallback-tag size rule did (`referrers.max_tag_bytes`).
    tag_size: tag_fit::TagSizeCounters,
    /// Tag writes a client's credentials could not make and graft had no
    /// account of its own to make instead (`graft_tag_writes_unauthorized`).
    unauthorized: tag_write::Unauthorized,
    /// Tag writes the registry refused even after recomputing them from
    /// its current state: dropped, not looped.
    tag_writes_dropped: std::sync::atomic::AtomicU64,
    /// Tag writes found replaced by another writer's (a replica's, an old
    /// client's) before or after the PUT, and merged again.
    tag_writes_replaced: std::sync::atomic::AtomicU64,
}

/// Longer than any forward can take (a buffered manifest, bounded by
/// `upstream.response_timeout`), short enough that an abandoned entry does
/// not hide its intent from recovery for long.
const IN_FLIGHT_TTL: Duration = Duration::from_secs(15 * 60);
const IN_FLIGHT_CAPACITY: u64 = 100_000;

impl Referrers {
    /// Fallback-tag checks remembered in memory now (bounded by
    /// `referrers.recent_checks_capacity`), for `/metrics`.
    pub fn recent_checks(&self) -> u64 {
        self.recent.len()
    }

    /// What the fallback-tag size rule did, for `/metrics`.
    pub(crate) fn tag_size(&self) -> &tag_fit::TagSizeCounters {
        &self.tag_size
    }

    /// Fallback-tag writes refused for lack of rights that graft could not
    /// make with an account of its own, for `/metrics`.
    pub fn tag_writes_unauthorized(&self) -> u64 {
        self.unauthorized.count()
    }

    /// Fallback-tag writes dropped after the registry refused them twice
    /// (the second time recomputed), for `/metrics`.
    pub fn tag_writes_dropped(&self) -> u64 {
        self.tag_writes_dropped.load(Ordering::Relaxed)
    }

    /// Fallback-tag writes merged again because another writer replaced
    /// the tag around graft's write, for `/metrics`.
    pub fn tag_writes_replaced(&self) -> u64 {
        self.tag_writes_replaced.load(Ordering::Relaxed)
    }

    pub fn new(
        index: Index,
        upstream: Upstream,
        cfg: ReferrersConfig,
        own_auth: Option<HeaderValue>,
        keys: CredentialKeys,
    ) -> Arc<Referrers> {
        let native = match cfg.mode {
            ReferrersMode::Auto => NATIVE_UNKNOWN,
            ReferrersMode::Passthrough => NATIVE_YES,
            ReferrersMode::Synthesize => NATIVE_NO,
        };
        Arc::new(Referrers {
            native: AtomicU8::new(native),
            writer: writer::TagWriter::default(),
            recent: fallback::RecentChecks::new(
                cfg.tag_ttl,
                cfg.recent_checks_capacity,
                index.clock().clone(),
            ),
            in_flight: moka::sync::Cache::builder()
                .max_capacity(IN_FLIGHT_CAPACITY)
                .time_to_live(IN_FLIGHT_TTL)
                .build(),
            index,
            upstream,
            cfg,
            own_auth,
            keys,
            tag_size: tag_fit::TagSizeCounters::default(),
            unauthorized: tag_write::Unauthorized::default(),
            tag_writes_dropped: std::sync::atomic::AtomicU64::new(0),
            tag_writes_replaced: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn config(&self) -> &ReferrersConfig {
        &self.cfg
    }

    /// `Some(true)` when the upstream serves the referrers API itself and
    /// graft should pass it through; `None` while `auto` has not probed.
    pub fn upstream_is_native(&self) -> Option<bool> {
        match self.native.load(Ordering::Relaxed) {
            NATIVE_YES => Some(true),
            NATIVE_NO => Some(false),
            _ => None,
        }
    }

    /// Records what a probe (or an `OCI-Subject` on a push answer) showed.
    /// Only `auto` learns; forced modes stay as configured.
    pub fn learn_native(&self, native: bool) {
        if self.cfg.mode == ReferrersMode::Auto {
            let v = if native { NATIVE_YES } else { NATIVE_NO };
            if self.native.swap(v, Ordering::Relaxed) != v {
                tracing::info!(native, "upstream referrers API support detected");
            }
        }
    }

    fn writes_tags(&self) -> bool {
        self.cfg.fallback_tag == FallbackTag::Write && self.upstream_is_native() != Some(true)
    }

    /// Every referrer of `subject` in `repo` that graft knows or can learn
    /// from the upstream fallback tag, ordered by digest. Checks first that
    /// the client may read `repo` upstream.
    pub async fn list(
        &self,
        repo: &RepoName,
        subject: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Result<Access<Vec<Descriptor>>, Error> {
        match self.read_fallback(repo, subject, auth, true).await? {
            Access::Denied(resp) => return Ok(Access::Denied(resp)),
            Access::Granted(Some(tag)) => self.settle_read(repo, subject, tag, auth).await?,
            Access::Granted(None) => {}
        }
        let (repo, subject) = (repo.clone(), subject.clone());
        let listed = self
            .index
            .blocking(move |ix| ix.referrers().list(&repo, &subject))
            .await?;
        Ok(Access::Granted(listed))
    }

    /// Learns from a fallback tag that changed since graft last saw it and
    /// reconciles the index with it (the upstream judging); repairs the tag
    /// when it lacks a referrer that exists or lists one that is gone.
    /// Graft skips re-reading the tag while it is unchanged only once
    /// everything in it was decided.
    async fn settle_read(
        &self,
        repo: &RepoName,
        subject: &Digest,
        tag: fallback::TagRead,
        auth: Option<&HeaderValue>,
    ) -> Result<(), Error> {
        let ingested = self
            .ingest(repo, ingest::Holder::Subject(subject), &tag.index, auth)
            .await?;
        let reconciled = self
            .reconcile(repo, subject, &tag, &ingested.checked, auth)
            .await?;
        let seen = (ingested.stats.complete() && reconciled.complete).then_some(tag.digest);
        if let Some(d) = &seen {
            let (r, s, d) = (repo.clone(), subject.clone(), d.clone());
            self.index
                .blocking(move |ix| {
                    ix.referrers().set_fallback_seen(&r, &s, &d);
                    Ok(())
                })
                .await?;
        }
        if reconciled.rewrite && self.writes_tags() {
            let (r, s) = (repo.clone(), subject.clone());
            self.index
                .blocking(move |ix| ix.intents().owe_tag_write(&r, &s))
                .await?;
            self.index.flush().await?;
            self.write_tag(repo, subject, auth).await;
        }
        Ok(())
    }

    /// The referrers of `subject` in `repo` the index holds, without asking
    /// the upstream: only for a client whose access graft already knows
    /// (the caller's check), while the fallback tag cannot be read.
    pub async fn list_indexed(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<Descriptor>, Error> {
        let (repo, subject) = (repo.clone(), subject.clone());
        Ok(self
            .index
            .blocking(move |ix| ix.referrers().list(&repo, &subject))
            .await?)
    }

    /// Before a push with `subject` is forwarded: record the intent durably,
    /// so a crash after the upstream accepts it cannot lose the referrer.
    pub async fn before_push(
        &self,
        repo: &RepoName,
        subject: &Digest,
        d: &Descriptor,
    ) -> Result<(), Error> {
        self.mark_in_flight(repo, &d.digest);
        let (r, s, d) = (repo.clone(), subject.clone(), d.clone());
        self.index
            .blocking(move |ix| ix.intents().add_intent(&r, &s, &d))
            .await?;
        self.index.flush().await?;
        Ok(())
    }

    /// The push's outcome is unknown (the upstream connection failed): its
    /// intent stays for recovery to settle by asking the upstream.
    pub fn push_unresolved(&self, repo: &RepoName, referrer: &Digest) {
        self.in_flight.invalidate(&(repo.clone(), referrer.clone()));
    }

    /// After the upstream answered a push announced by [`before_push`].
    pub async fn after_push(
        &self,
        repo: &RepoName,
        subject: &Digest,
        d: &Descriptor,
        accepted: bool,
        auth: Option<&HeaderValue>,
    ) -> Result<(), Error> {
        let recorded = if accepted {
            crate::failpoint::hit("after-upstream-accept");
            self.record(repo, subject, d, None).await
        } else {
            let (r, s, dg) = (repo.clone(), subject.clone(), d.digest.clone());
            self.index
                .blocking(move |ix| ix.intents().remove_intent(&r, &s, &dg))
                .await
                .map_err(Error::from)
        };
        self.push_unresolved(repo, &d.digest);
        recorded?;
        if accepted && self.writes_tags() {
            self.write_tag(repo, subject, auth).await;
        }
        Ok(())
    }

    /// Indexes an accepted referrer: the owed tag write first, then the
    /// entry, then the intent is dropped — each step is safe to repeat.
    /// `checked_at` is when recovery's upstream check found it present
    /// (`None` for a push graft saw accepted): a delete since then wins.
    async fn record(
        &self,
        repo: &RepoName,
        subject: &Digest,
        d: &Descriptor,
        checked_at: Option<u64>,
    ) -> Result<(), Error> {
        let owe = self.writes_tags();
        let (r, s, d) = (repo.clone(), subject.clone(), d.clone());
        self.index
            .blocking(move |ix| {
                if owe {
                    ix.intents().owe_tag_write(&r, &s)?;
                }
                let refs = ix.referrers();
                match checked_at {
                    Some(at) => refs.add_unless_deleted_since(&r, &s, &d, at).map(drop)?,
                    None => refs.add(&r, &s, &d).map(drop)?,
                }
                ix.intents().remove_intent(&r, &s, &d.digest)
            })
            .await?;
        self.index.flush().await?;
        Ok(())
    }

    /// Before a `DELETE` of `digest` is forwarded: when it is an indexed
    /// referrer, record the intent durably, so a crash after the upstream
    /// deleted it cannot leave it listed.
    pub async fn before_delete(&self, repo: &RepoName, digest: &Digest) -> Result<(), Error> {
        // Marked before the intent exists, so recovery never sees the
        // intent unmarked; cleared again when it is not a referrer.
        self.mark_in_flight(repo, digest);
        let (r, d) = (repo.clone(), digest.clone());
        let recorded = self
            .index
            .blocking(move |ix| {
                if ix.referrers().subjects_of(&r, &d)?.is_empty() {
                    return Ok(false);
                }
                ix.intents().add_delete_intent(&r, &d)?;
                Ok(true)
            })
            .await;
        match recorded {
            Ok(true) => {
                self.index.flush().await?;
                Ok(())
            }
            Ok(false) => {
                self.push_unresolved(repo, digest);
                Ok(())
            }
            Err(e) => {
                self.push_unresolved(repo, digest);
                Err(e.into())
            }
        }
    }

    /// After the upstream answered a `DELETE` of `digest` (`accepted` when
    /// it deleted it): it no longer refers to anything, and the fallback
    /// tags that listed it are rewritten. An answer that is not a success
    /// does not prove the manifest is still there, so a referrer's delete
    /// is then settled by asking the upstream.
    pub async fn after_delete(
        &self,
        repo: &RepoName,
        digest: &Digest,
        accepted: bool,
        auth: Option<&HeaderValue>,
    ) -> Result<(), Error> {
        let gone = if accepted {
            crate::failpoint::hit("after-upstream-delete");
            Ok(Some(true))
        } else {
            self.gone_despite_answer(repo, digest, auth).await
        };
        let gone = match gone {
            Ok(gone) => gone,
            Err(e) => {
                self.push_unresolved(repo, digest);
                return Err(e);
            }
        };
        let done = match gone {
            Some(true) => self.forget_deleted(repo, digest, auth).await,
            _ => Ok(()),
        };
        // Undecided: the intent stays, for recovery to settle.
        let cleared = if gone.is_some() {
            let (r, d) = (repo.clone(), digest.clone());
            self.index
                .blocking(move |ix| ix.intents().remove_delete_intent(&r, &d))
                .await
        } else {
            Ok(())
        };
        self.push_unresolved(repo, digest);
        done?;
        cleared?;
        Ok(())
    }

    /// Whether a referrer whose `DELETE` the upstream did not answer with
    /// success is gone all the same: distribution deletes the manifest,
    /// then answers 500 when untagging fails (a tag link being rewritten
    /// concurrently). `Some(false)` when it is still there or not an
    /// indexed referrer; `None` when the upstream cannot tell now.
    async fn gone_despite_answer(
        &self,
        repo: &RepoName,
        digest: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Result<Option<bool>, Error> {
        let (r, d) = (repo.clone(), digest.clone());
        let indexed = self
            .index
            .blocking(move |ix| Ok(!ix.referrers().subjects_of(&r, &d)?.is_empty()))
            .await?;
        if !indexed {
            return Ok(Some(false));
        }
        Ok(match self.head_manifest(repo, digest, auth).await {
            Ok(StatusCode::NOT_FOUND) => {
                tracing::info!(%repo, referrer = %digest, "the upstream failed a referrer delete but deleted it");
                Some(true)
            }
            Ok(status) if status.is_success() => Some(false),
            _ => None,
        })
    }

    async fn forget_deleted(
        &self,
        repo: &RepoName,
        digest: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Result<(), Error> {
        let owe = self.writes_tags();
        let (r, d) = (repo.clone(), digest.clone());
        let subjects = self
            .index
            .blocking(move |ix| {
                let subjects = ix.referrers().remove_referrer(&r, &d)?;
                if owe {
                    for s in &subjects {
                        ix.intents().owe_tag_write(&r, s)?;
                    }
                }
                Ok(subjects)
            })
            .await?;
        self.index.flush().await?;
        if owe {
            for s in &subjects {
                self.write_tag(repo, s, auth).await;
            }
        }
        Ok(())
    }

    /// The upstream's status for a HEAD of a manifest by digest.
    async fn head_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Result<StatusCode, crate::upstream::UpstreamError> {
        let path = format!("/v2/{repo}/manifests/{digest}");
        let accept = [(header::ACCEPT, ACCEPT_MANIFESTS)];
        let resp = self
            .upstream
            .call(Method::HEAD, &path, auth, &accept, Bytes::new())
            .await?;
        Ok(resp.status())
    }

    fn mark_in_flight(&self, repo: &RepoName, digest: &Digest) {
        self.in_flight.insert((repo.clone(), digest.clone()), ());
    }

    /// Whether a push or delete of `digest` is being forwarded right now.
    fn is_in_flight(&self, repo: &RepoName, digest: &Digest) -> bool {
        self.in_flight.contains_key(&(repo.clone(), digest.clone()))
    }

    /// Serializes client writes of the fallback tag `tag` with graft's own.
    pub async fn lock_tag(&self, repo: &RepoName, tag: &str) -> writer::TagGuard {
        self.writer.lock(repo, tag).await
    }

    /// Reads the fallback tag for `subject`. With `use_seen`, a HEAD whose
    /// digest matches the one last read skips the GET (`tag_ttl` decides how
    /// often the HEAD itself happens; 0 = every time).
    async fn read_fallback(
        &self,
        repo: &RepoName,
        subject: &Digest,
        auth: Option<&HeaderValue>,
        use_seen: bool,
    ) -> Result<Access<Option<fallback::TagRead>>, Error> {
        fallback::read(self, repo, subject, auth, use_seen).await
    }
}

/// The subject digest a fallback tag stands for, when the tag holds it whole
/// (`sha256-<64 hex>`); `None` for truncated or foreign tags.
pub fn subject_of_tag(tag: &str) -> Option<Digest> {
    let (alg, enc) = tag.split_once('-')?;
    let d: Digest = format!("{alg}:{enc}").parse().ok()?;
    (d.fallback_tag() == tag).then_some(d)
}

/// Whether `tag` has the shape of a referrers fallback tag.
pub fn is_fallback_tag(tag: &str) -> bool {
    match tag.split_once('-') {
        Some((alg, enc)) => {
            !alg.is_empty()
                && alg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && enc.len() >= 32
                && enc.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// A header name graft adds to push answers (distribution-spec "Pushing
/// Manifests with Subject").
pub const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tags_map_back_to_subjects() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(subject_of_tag(&d.fallback_tag()), Some(d.clone()));
        assert!(is_fallback_tag(&d.fallback_tag()));
        assert!(!is_fallback_tag("latest"));
        assert!(!is_fallback_tag("sha256-abc.sig"));
        let long: Digest = format!("sha512:{}", "a".repeat(128))
            .parse()
            .expect("digest");
        assert_eq!(subject_of_tag(&long.fallback_tag()), None);
        assert!(is_fallback_tag(&long.fallback_tag()));
    }
}
