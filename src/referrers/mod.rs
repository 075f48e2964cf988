//! The referrers service: what graft knows about referrers, how it learns
//! more, and how it keeps the upstream's fallback tags true.
//!
//! Sources of truth, in order: what passed through graft (the index), the
//! upstream fallback tag (read and merged on every query when its digest
//! changed), and a reindex. The fallback tag is the durable shared copy, so
//! every write to it is a merge: graft reads the tag, ingests what it does
//! not know, and writes the union. Writes for one (repository, subject) are
//! serialized inside graft because the upstream has no conditional PUT.

pub(crate) mod fallback;
mod writer;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::config::{FallbackTag, ReferrersConfig, ReferrersMode};
use crate::credentials::CredentialKeys;
use crate::error::Error;
use crate::index::Index;
use crate::oci::{media, Descriptor, Digest, ManifestFields, RepoName};
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

pub(crate) const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

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
    /// Pushes forwarded right now: their intents are not crash leftovers,
    /// and recovery must not judge them by a HEAD that can race the
    /// upstream's accept.
    in_flight: Mutex<HashSet<(RepoName, Digest)>>,
}

/// Whose referrers a fallback tag holds.
#[derive(Clone, Copy)]
enum Holder<'a> {
    /// The subject is known (the tag names it whole, or graft read the tag
    /// for it).
    Subject(&'a Digest),
    /// Only the tag is known: a truncated long digest. An entry belongs
    /// when its own `subject` has this fallback tag.
    Tag(&'a str),
}

impl Holder<'_> {
    fn subject(&self) -> Option<&Digest> {
        match self {
            Holder::Subject(s) => Some(s),
            Holder::Tag(_) => None,
        }
    }

    fn holds(&self, found: &Digest) -> bool {
        match self {
            Holder::Subject(s) => *s == found,
            Holder::Tag(t) => found.fallback_tag() == *t,
        }
    }
}

/// What ingesting a fallback-tag index found.
struct Ingested {
    stats: ReindexStats,
    /// The entries the upstream could not judge now, as the tag had them.
    undecided: Vec<Descriptor>,
}

/// What checking one referrer candidate found.
enum Verdict {
    /// It is a referrer of this subject; here is its descriptor.
    Referrer(Digest, Descriptor),
    /// It exists but is not a referrer of the subject in question.
    NotReferrer,
    /// The upstream could not tell now (unreachable, 5xx, 401): decide later.
    Unknown,
}

impl Referrers {
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
            index,
            upstream,
            cfg,
            own_auth,
            keys,
            native: AtomicU8::new(native),
            writer: writer::TagWriter::default(),
            recent: fallback::RecentChecks::default(),
            in_flight: Mutex::new(HashSet::new()),
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
            Access::Granted(Some(tag)) => {
                let ingested = self
                    .ingest(repo, Holder::Subject(subject), &tag.index, auth)
                    .await?;
                if ingested.stats.complete() {
                    self.index.set_fallback_seen(repo, subject, &tag.digest)?;
                }
            }
            Access::Granted(None) => {}
        }
        Ok(Access::Granted(self.index.referrers(repo, subject)?))
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
        self.index.add_intent(repo, subject, d)?;
        self.index.flush().await?;
        Ok(())
    }

    /// The push's outcome is unknown (the upstream connection failed): its
    /// intent stays for recovery to settle by asking the upstream.
    pub fn push_unresolved(&self, repo: &RepoName, referrer: &Digest) {
        self.in_flight
            .lock()
            .expect("in-flight set poisoned")
            .remove(&(repo.clone(), referrer.clone()));
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
            self.record(repo, subject, d).await
        } else {
            self.index
                .remove_intent(repo, subject, &d.digest)
                .map_err(Error::from)
        };
        self.push_unresolved(repo, &d.digest);
        recorded?;
        if !accepted {
            return Ok(());
        }
        if self.writes_tags() {
            self.write_tag(repo, subject, auth).await;
        }
        Ok(())
    }

    /// Indexes an accepted referrer: the owed tag write first, then the
    /// entry, then the intent is dropped — each step is safe to repeat.
    async fn record(&self, repo: &RepoName, subject: &Digest, d: &Descriptor) -> Result<(), Error> {
        if self.writes_tags() {
            self.index.owe_tag_write(repo, subject)?;
        }
        self.index.add(repo, subject, d)?;
        self.index.remove_intent(repo, subject, &d.digest)?;
        self.index.flush().await?;
        Ok(())
    }

    /// Before a `DELETE` of `digest` is forwarded: when it is an indexed
    /// referrer, record the intent durably, so a crash after the upstream
    /// deleted it cannot leave it listed.
    pub async fn before_delete(&self, repo: &RepoName, digest: &Digest) -> Result<(), Error> {
        if self.index.subjects_of(repo, digest)?.is_empty() {
            return Ok(());
        }
        self.mark_in_flight(repo, digest);
        self.index.add_delete_intent(repo, digest)?;
        self.index.flush().await?;
        Ok(())
    }

    /// After the upstream answered a `DELETE` of `digest` (`accepted` when
    /// it deleted it): it no longer refers to anything, and the fallback
    /// tags that listed it are rewritten.
    pub async fn after_delete(
        &self,
        repo: &RepoName,
        digest: &Digest,
        accepted: bool,
        auth: Option<&HeaderValue>,
    ) -> Result<(), Error> {
        let done = if accepted {
            crate::failpoint::hit("after-upstream-delete");
            self.forget_deleted(repo, digest, auth).await
        } else {
            Ok(())
        };
        let cleared = self.index.remove_delete_intent(repo, digest);
        self.push_unresolved(repo, digest);
        done?;
        cleared?;
        Ok(())
    }

    async fn forget_deleted(
        &self,
        repo: &RepoName,
        digest: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Result<(), Error> {
        let subjects = self.index.remove_referrer(repo, digest)?;
        if subjects.is_empty() {
            self.index.flush().await?;
            return Ok(());
        }
        if self.writes_tags() {
            for s in &subjects {
                self.index.owe_tag_write(repo, s)?;
            }
        }
        self.index.flush().await?;
        if self.writes_tags() {
            for s in &subjects {
                self.write_tag(repo, s, auth).await;
            }
        }
        Ok(())
    }

    /// Finishes what a crash interrupted: intents whose push the upstream
    /// accepted become index entries, and owed tag writes are written.
    /// Returns how many items are still owed (to retry later).
    pub async fn recover(&self) -> Result<usize, Error> {
        let auth = self.own_auth.clone();
        for intent in self.index.intents()? {
            if self.is_in_flight(&intent.repo, &intent.descriptor.digest) {
                continue;
            }
            match self
                .head_manifest(&intent.repo, &intent.descriptor.digest, auth.as_ref())
                .await
            {
                Ok(status) if status.is_success() => {
                    tracing::info!(repo = %intent.repo, subject = %intent.subject, referrer = %intent.descriptor.digest, "recovering a referrer the upstream accepted before a restart");
                    self.record(&intent.repo, &intent.subject, &intent.descriptor)
                        .await?;
                }
                Ok(StatusCode::NOT_FOUND) => {
                    self.index.remove_intent(
                        &intent.repo,
                        &intent.subject,
                        &intent.descriptor.digest,
                    )?;
                }
                Ok(status) => {
                    tracing::warn!(%status, repo = %intent.repo, "cannot check an interrupted push yet")
                }
                Err(e) => tracing::warn!(error = %e, "cannot check an interrupted push yet"),
            }
        }
        for (repo, digest) in self.index.delete_intents()? {
            if self.is_in_flight(&repo, &digest) {
                continue;
            }
            match self.head_manifest(&repo, &digest, auth.as_ref()).await {
                Ok(StatusCode::NOT_FOUND) => {
                    tracing::info!(%repo, referrer = %digest, "finishing a referrer delete the upstream did before a restart");
                    self.after_delete(&repo, &digest, true, auth.as_ref())
                        .await?;
                }
                Ok(status) if status.is_success() => {
                    self.index.remove_delete_intent(&repo, &digest)?
                }
                Ok(status) => {
                    tracing::warn!(%status, %repo, "cannot check an interrupted delete yet")
                }
                Err(e) => tracing::warn!(error = %e, "cannot check an interrupted delete yet"),
            }
        }
        if self.writes_tags() {
            for (repo, subject) in self.index.owed_tag_writes()? {
                self.write_tag(&repo, &subject, auth.as_ref()).await;
            }
        }
        self.index.flush().await?;
        let owed = self.index.intents()?.len()
            + self.index.delete_intents()?.len()
            + if self.writes_tags() {
                self.index.owed_tag_writes()?.len()
            } else {
                0
            };
        Ok(owed)
    }

    /// Ingests the entries of a fallback-tag index: each one graft has not
    /// seen is checked once by fetching its manifest and reading `subject`
    /// (some registries resolve the tag to the subject itself, and old
    /// clients make mistakes). When the tag name does not give the full
    /// digest (truncated long digests), each entry's own `subject` is used,
    /// if its fallback tag is the tag read.
    ///
    /// Returns what it added and what it could not decide.
    async fn ingest(
        &self,
        repo: &RepoName,
        holder: Holder<'_>,
        index: &[Descriptor],
        auth: Option<&HeaderValue>,
    ) -> Result<Ingested, Error> {
        let subject = holder.subject();
        let mut stats = ReindexStats {
            entries: index.len(),
            ..ReindexStats::default()
        };
        let mut undecided = Vec::new();
        for entry in index {
            if self.index.is_tombstoned(repo, &entry.digest)? {
                continue;
            }
            if let Some(s) = subject {
                if self.index.contains(repo, s, &entry.digest)?
                    || self.index.is_rejected(repo, s, &entry.digest)?
                {
                    continue;
                }
            }
            match self.check(repo, &entry.digest, auth).await {
                Verdict::Referrer(found, d) if holder.holds(&found) => {
                    if self.index.add(repo, &found, &d)? {
                        stats.added += 1;
                    }
                }
                Verdict::Referrer(..) | Verdict::NotReferrer => {
                    tracing::info!(%repo, subject = ?subject, entry = %entry.digest, "fallback tag lists a manifest that does not refer to its subject; ignored");
                    if let Some(s) = subject {
                        self.index.reject(repo, s, &entry.digest)?;
                    }
                }
                Verdict::Unknown => {
                    stats.undecided += 1;
                    undecided.push(entry.clone());
                }
            }
        }
        Ok(Ingested { stats, undecided })
    }

    /// Reads the fallback tag `tag` of `repo` and ingests its entries
    /// through the same checks a referrers query applies (`graft reindex`).
    /// `auth` must be allowed to read `repo`; a 401/403 comes back as
    /// [`Access::Denied`]. A tag that does not exist (any more) ingests
    /// nothing.
    pub async fn reindex_tag(
        &self,
        repo: &RepoName,
        tag: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<Access<ReindexStats>, Error> {
        let read = match fallback::fetch(self, repo, tag, auth).await? {
            Access::Denied(d) => return Ok(Access::Denied(d)),
            Access::Granted(None) => return Ok(Access::Granted(ReindexStats::default())),
            Access::Granted(Some(read)) => read,
        };
        let subject = subject_of_tag(tag);
        let holder = subject.as_ref().map_or(Holder::Tag(tag), Holder::Subject);
        let stats = self.ingest(repo, holder, &read.index, auth).await?.stats;
        if let Some(s) = &subject {
            if stats.complete() {
                // Queries may skip re-reading this tag while it is unchanged.
                self.index.set_fallback_seen(repo, s, &read.digest)?;
            }
        }
        self.index.flush().await?;
        Ok(Access::Granted(stats))
    }

    /// Fetches a manifest and tells whether it is a referrer, and of what.
    async fn check(&self, repo: &RepoName, digest: &Digest, auth: Option<&HeaderValue>) -> Verdict {
        let path = format!("/v2/{repo}/manifests/{digest}");
        let accept = [(header::ACCEPT, ACCEPT_MANIFESTS)];
        let resp = match self
            .upstream
            .call(Method::GET, &path, auth, &accept, Bytes::new())
            .await
        {
            Ok(r) => r,
            Err(_) => return Verdict::Unknown,
        };
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Verdict::NotReferrer;
        }
        if !status.is_success() {
            return Verdict::Unknown;
        }
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let Ok(bytes) = self
            .upstream
            .read_limited(resp.into_body(), READ_LIMIT)
            .await
        else {
            return Verdict::Unknown;
        };
        if digest.verify(&bytes) == Some(false) {
            return Verdict::NotReferrer;
        }
        let Some(fields) = ManifestFields::parse(&bytes) else {
            return Verdict::NotReferrer;
        };
        match &fields.subject {
            Some(s) => {
                let d = fields.referrer_descriptor(
                    digest.clone(),
                    bytes.len() as u64,
                    content_type.as_deref(),
                );
                Verdict::Referrer(s.digest.clone(), d)
            }
            None => Verdict::NotReferrer,
        }
    }

    /// A client wrote a fallback tag itself (`PUT …/manifests/<alg>-<hex>`)
    /// and the upstream accepted it: learn its entries, and when graft knows
    /// referrers it lacks (the client lost a read-modify-write race), push
    /// the merged index. The caller holds the subject's write lock.
    pub async fn after_client_tag_put(
        &self,
        repo: &RepoName,
        tag: &str,
        body: &[u8],
        auth: Option<&HeaderValue>,
    ) -> Result<(), Error> {
        let Ok(index) = serde_json::from_slice::<crate::oci::ImageIndex>(body) else {
            return Ok(());
        };
        let subject = subject_of_tag(tag);
        let holder = subject.as_ref().map_or(Holder::Tag(tag), Holder::Subject);
        self.ingest(repo, holder, &index.manifests, auth).await?;
        let subjects: Vec<Digest> = match subject {
            Some(s) => vec![s],
            None => {
                // Truncated tag: the subjects are those the entries named.
                let mut v = Vec::new();
                for e in &index.manifests {
                    for s in self.index.subjects_of(repo, &e.digest)? {
                        if s.fallback_tag() == tag && !v.contains(&s) {
                            v.push(s);
                        }
                    }
                }
                v
            }
        };
        for s in subjects {
            let known = self.index.referrers(repo, &s)?;
            let mut lacks = false;
            for k in known
                .iter()
                .filter(|k| !index.manifests.iter().any(|m| m.digest == k.digest))
            {
                // The client may have left it out because it is gone (deleted
                // straight at the upstream): only a referrer that still
                // exists is a lost race to repair.
                if self.manifest_gone(repo, &k.digest, auth).await {
                    tracing::info!(%repo, subject = %s, referrer = %k.digest, "referrer deleted upstream; dropped from the index");
                    self.index.remove_referrer(repo, &k.digest)?;
                } else {
                    lacks = true;
                }
            }
            if lacks && self.writes_tags() {
                tracing::info!(%repo, subject = %s, "client's fallback tag lacks known referrers; pushing the merged index");
                self.index.owe_tag_write(repo, &s)?;
                self.index.flush().await?;
                self.write_tag_locked(repo, &s, auth).await;
            }
        }
        Ok(())
    }

    /// Whether the upstream says the manifest no longer exists (404); any
    /// other answer, or none, keeps it.
    async fn manifest_gone(
        &self,
        repo: &RepoName,
        digest: &Digest,
        auth: Option<&HeaderValue>,
    ) -> bool {
        matches!(
            self.head_manifest(repo, digest, auth).await,
            Ok(StatusCode::NOT_FOUND)
        )
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
        self.in_flight
            .lock()
            .expect("in-flight set poisoned")
            .insert((repo.clone(), digest.clone()));
    }

    /// Whether a push or delete of `digest` is being forwarded right now.
    fn is_in_flight(&self, repo: &RepoName, digest: &Digest) -> bool {
        self.in_flight
            .lock()
            .expect("in-flight set poisoned")
            .contains(&(repo.clone(), digest.clone()))
    }

    /// Serializes client writes of the fallback tag `tag` with graft's own.
    pub async fn lock_tag(&self, repo: &RepoName, tag: &str) -> writer::TagGuard {
        self.writer.lock(repo, tag).await
    }

    /// Brings the upstream fallback tag of `subject` up to date (best
    /// effort: a failure leaves the write owed, retried later).
    pub async fn write_tag(&self, repo: &RepoName, subject: &Digest, auth: Option<&HeaderValue>) {
        let ticket = self.writer.want(repo, &subject.fallback_tag());
        let guard = self.writer.lock(repo, &subject.fallback_tag()).await;
        if guard.covers(ticket) {
            // A write that started after our change was indexed has already
            // carried it.
            return;
        }
        let gen = guard.current();
        if self.write_tag_locked(repo, subject, auth).await {
            guard.done(gen);
        }
    }

    /// The write itself; the caller holds the tag's lock. Returns success.
    async fn write_tag_locked(
        &self,
        repo: &RepoName,
        subject: &Digest,
        auth: Option<&HeaderValue>,
    ) -> bool {
        match self.try_write_tag(repo, subject, auth).await {
            Ok(()) => {
                if let Err(e) = self.index.tag_write_done(repo, subject) {
                    tracing::error!(error = %e, "cannot clear an owed tag write");
                }
                true
            }
            Err(e) => {
                tracing::warn!(%repo, %subject, error = %e, "fallback tag write failed; it stays owed");
                false
            }
        }
    }

    async fn try_write_tag(
        &self,
        repo: &RepoName,
        subject: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Result<(), Error> {
        // Merge first: entries written by clients that bypass graft survive.
        let current = match self.read_fallback(repo, subject, auth, false).await? {
            Access::Denied(d) => {
                return Err(Error::Internal(format!(
                    "upstream refused reading the fallback tag ({})",
                    d.status
                )))
            }
            Access::Granted(t) => t,
        };
        let undecided = match &current {
            Some(t) => {
                self.ingest(repo, Holder::Subject(subject), &t.index, auth)
                    .await?
                    .undecided
            }
            None => Vec::new(),
        };
        let mut entries = self.index.referrers(repo, subject)?;
        // Entries the upstream could not judge now (a 5xx, a timeout) stay
        // as the tag had them: dropping them would delete referrers other
        // clients wrote, on a transient error.
        let complete = undecided.is_empty();
        for u in undecided {
            if !entries.iter().any(|e| e.digest == u.digest) {
                entries.push(u);
            }
        }
        entries.sort_by(|a, b| a.digest.cmp(&b.digest));
        let unchanged = current.as_ref().is_some_and(|t| {
            t.index.len() == entries.len() && entries.iter().all(|k| t.index.iter().any(|m| m == k))
        });
        if unchanged {
            return Ok(());
        }
        let bytes = Bytes::from(crate::oci::ImageIndex::of(entries).to_bytes());
        let digest = Digest::sha256_of(&bytes);
        let path = format!("/v2/{repo}/manifests/{}", subject.fallback_tag());
        let ct = [(header::CONTENT_TYPE, media::IMAGE_INDEX)];
        let resp = self
            .upstream
            .call(Method::PUT, &path, auth, &ct, bytes)
            .await
            .map_err(Error::from)?;
        if !resp.status().is_success() {
            return Err(Error::Internal(format!(
                "upstream answered {} to the fallback tag PUT",
                resp.status()
            )));
        }
        if complete {
            // Otherwise the next query must read the tag again, to judge
            // what could not be judged now.
            self.index
                .set_fallback_seen(repo, subject, digest.as_str())?;
        }
        self.index.flush().await?;
        Ok(())
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
