//! Keeping the upstream's fallback tags true. Every write is a merge: read
//! the tag, ingest what graft does not know, write the union — so entries
//! written by clients that bypass graft survive. Writes for one
//! (repository, tag) are serialized by [`super::writer::TagWriter`].

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};

use super::fallback::{self, TagRead};
use super::ingest::Holder;
use super::reconcile::Presence;
use super::tag_fit::{self, Fit, TagSizeCounters};
use super::{subject_of_tag, Access, Referrers};
use crate::error::Error;
use crate::oci::{media, Descriptor, Digest, ImageIndex, RepoName};

impl Referrers {
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
    /// A write the client's credentials may not make (a delete-scoped or
    /// pull-only token) is made with graft's own, when it has them: graft
    /// keeps its own tags true, and the client's answer does not depend on
    /// it, so no access is widened.
    async fn write_tag_locked(
        &self,
        repo: &RepoName,
        subject: &Digest,
        auth: Option<&HeaderValue>,
    ) -> bool {
        let mut written = self.try_write_tag(repo, subject, auth).await;
        let own = self.own_auth.as_ref();
        if is_refusal(&written) {
            if auth != own && self.upstream.has_own_credentials() {
                tracing::info!(%repo, %subject, "the client's credentials may not write the fallback tag; writing it with graft's own");
                written = self.try_write_tag(repo, subject, own).await;
            }
            if is_refusal(&written) {
                self.unauthorized
                    .note(repo, self.upstream.has_own_credentials());
            }
        }
        match written {
            Err(e) => {
                tracing::warn!(%repo, %subject, error = %e, "fallback tag write failed; it stays owed");
                return false;
            }
            Ok(Settled::Owed) => {
                tracing::warn!(%repo, %subject, rounds = MAX_ROUNDS, "other writers kept replacing the fallback tag around graft's writes; it stays owed");
                return false;
            }
            Ok(Settled::Yes) => {}
        }
        let (r, s) = (repo.clone(), subject.clone());
        let cleared = self
            .index
            .blocking(move |ix| ix.intents().tag_write_done(&r, &s))
            .await;
        if let Err(e) = cleared {
            // Written but still marked owed: the next recovery rewrites the
            // same content, which changes nothing.
            tracing::error!(%repo, %subject, error = %e, "cannot clear an owed tag write");
        }
        true
    }

    /// One write, and when the registry refuses it with a 4xx that is not
    /// about credentials or rate, once more, recomputed from the upstream's
    /// current state (the tag read again, every entry checked with a HEAD):
    /// a tag naming a manifest deleted behind graft's back is refused with
    /// 400, and the same bytes would be refused forever. When the
    /// recomputed write names the same entries and is refused again, it
    /// cannot succeed: dropped with a warning and a count, never looped
    /// (the next change to this subject's referrers tries anew). When the
    /// entries changed in between (a concurrent delete raced the check),
    /// the write stays owed and is recomputed again later: dropping it
    /// could leave a referrer the upstream accepted out of the tag.
    async fn try_write_tag(
        &self,
        repo: &RepoName,
        subject: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Result<Settled, Error> {
        let (status, what, named) = match self.write_once(repo, subject, auth, false).await? {
            Attempt::Refused {
                status,
                what,
                named,
            } => (status, what, named),
            Attempt::Done => return Ok(Settled::Yes),
            Attempt::Contended => return Ok(Settled::Owed),
        };
        tracing::info!(%repo, %subject, %status, %what, "the registry refused the fallback tag; recomputing it from the upstream's state");
        let (status, what, renamed) = match self.write_once(repo, subject, auth, true).await? {
            Attempt::Refused {
                status,
                what,
                named,
            } => (status, what, named),
            Attempt::Done => return Ok(Settled::Yes),
            Attempt::Contended => return Ok(Settled::Owed),
        };
        if renamed != named {
            // Not the same write refused twice: the referrers changed under
            // it. Owed, recomputed again by the next write or recovery.
            return Err(Error::UpstreamRefused { status, what });
        }
        if status == StatusCode::BAD_REQUEST || status == StatusCode::PAYLOAD_TOO_LARGE {
            TagSizeCounters::add(&self.tag_size.refused, 1);
        }
        self.tag_writes_dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%repo, %subject, %status, %what, "the registry refused the recomputed fallback tag too; write dropped, not retried");
        Ok(Settled::Yes)
    }

    /// Merges and writes the tag until a write is verified: another
    /// replica may read the same tag and write its own merge in between
    /// (a registry has no compare-and-swap), so each write is read back and
    /// merged again when it was replaced — at most [`MAX_ROUNDS`] times,
    /// then the write stays owed (recovery, or the next change, carries on).
    async fn write_once(
        &self,
        repo: &RepoName,
        subject: &Digest,
        auth: Option<&HeaderValue>,
        verify: bool,
    ) -> Result<Attempt, Error> {
        for round in 0..MAX_ROUNDS {
            match self.write_round(repo, subject, auth, verify).await? {
                Round::Replaced => {
                    self.tag_writes_replaced.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%repo, %subject, round, "the fallback tag changed under graft's write; merging again");
                }
                Round::Settled(a) => return Ok(a),
            }
        }
        Ok(Attempt::Contended)
    }

    /// One round: reads the tag, merges, and writes it when it changed
    /// (with `verify`, every entry to write is first checked with the
    /// upstream). Just before the write and just after it, the tag's digest
    /// is checked: a tag that is not the one merged (before) or not the one
    /// written (after) was replaced by another writer.
    async fn write_round(
        &self,
        repo: &RepoName,
        subject: &Digest,
        auth: Option<&HeaderValue>,
        verify: bool,
    ) -> Result<Round, Error> {
        let current = match self.read_fallback(repo, subject, auth, false).await? {
            Access::Denied(d) => {
                return Err(Error::UpstreamRefused {
                    status: d.status,
                    what: format!("graft's read of the fallback tag of {subject} in {repo}"),
                })
            }
            Access::Granted(t) => t,
        };
        let (mut entries, complete) = self.merged(repo, subject, current.as_ref(), auth).await?;
        if verify {
            entries = self.verified(repo, entries, auth).await?;
        }
        let Some(entries) = self.fit_tag(repo, subject, entries) else {
            // Not attempted, and not owed: the same entries would not fit
            // on any retry (the next change to them tries again).
            return Ok(Round::Settled(Attempt::Done));
        };
        let unchanged = current.as_ref().is_some_and(|t| {
            t.index.len() == entries.len() && entries.iter().all(|k| t.index.iter().any(|m| m == k))
        });
        if unchanged {
            if let Some(t) = current.filter(|_| complete) {
                // Judged and right as it is: queries may skip re-reading it.
                self.mark_seen(repo, subject, t.digest).await?;
            }
            return Ok(Round::Settled(Attempt::Done));
        }
        // Merging may have taken many requests; a write over a tag another
        // replica rewrote meanwhile would lose its entries.
        let merged_over = current.map(|t| t.digest);
        let started = std::time::Instant::now();
        // An unreadable tag (distribution answers 500 while another PUT of
        // it is under way) cannot tell either: merge again.
        if self.tag_now(repo, subject, auth).await.ok() != Some(merged_over) {
            return Ok(Round::Replaced);
        }
        let named: Vec<Digest> = entries.iter().map(|e| e.digest.clone()).collect();
        let digest = match self.put_tag(repo, subject, entries, auth).await {
            Err(Error::UpstreamRefused { status, what }) if is_hopeless(status) => {
                return Ok(Round::Settled(Attempt::Refused {
                    status,
                    what,
                    named,
                }))
            }
            written => written?,
        };
        if !self
            .stays_written(repo, subject, auth, &digest, started)
            .await
        {
            return Ok(Round::Replaced);
        }
        if complete {
            // Otherwise the next query must read the tag again, to judge
            // what could not be judged now.
            self.mark_seen(repo, subject, digest.to_string()).await?;
        }
        self.index.flush().await?;
        Ok(Round::Settled(Attempt::Done))
    }

    /// Whether the tag the upstream holds is still the one just written
    /// (`digest`): read back at once, and again after a pause twice as long
    /// as this write's check-and-PUT took. A replica that checked the tag
    /// just before this write landed may land its own merge (without this
    /// write's entries) just after the first read-back; its check-to-PUT
    /// gap is about as long as this one's, so the second read-back sees it.
    /// An unreadable tag cannot tell, and counts as replaced.
    async fn stays_written(
        &self,
        repo: &RepoName,
        subject: &Digest,
        auth: Option<&HeaderValue>,
        digest: &Digest,
        started: std::time::Instant,
    ) -> bool {
        let ours = Some(digest.to_string());
        if self.tag_now(repo, subject, auth).await.ok().flatten() != ours {
            return false;
        }
        // Written and read back: no longer owed, even if the pause is cut
        // short (a shutdown); owed again if the second read-back fails.
        let owed = self.set_owed(repo, subject, false).await;
        let pause = (started.elapsed() * 2).clamp(MIN_SETTLE, MAX_SETTLE);
        tokio::time::sleep(pause).await;
        if self.tag_now(repo, subject, auth).await.ok().flatten() == ours {
            return true;
        }
        if owed.is_ok() {
            // Best effort: when this fails too the replica's next read of
            // the tag still repairs it.
            let _ = self.set_owed(repo, subject, true).await;
        }
        false
    }

    /// Marks the write of the tag of `subject` owed, or done.
    async fn set_owed(&self, repo: &RepoName, subject: &Digest, owed: bool) -> Result<(), Error> {
        let (r, s) = (repo.clone(), subject.clone());
        self.index
            .blocking(move |ix| {
                if owed {
                    ix.intents().owe_tag_write(&r, &s)
                } else {
                    ix.intents().tag_write_done(&r, &s)
                }
            })
            .await?;
        Ok(())
    }

    /// The digest of the tag of `subject` the upstream holds now.
    async fn tag_now(
        &self,
        repo: &RepoName,
        subject: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Result<Option<String>, Error> {
        fallback::tag_digest(self, repo, subject, auth).await
    }

    /// Records `digest` as the copy of the tag of `subject` graft judged.
    async fn mark_seen(
        &self,
        repo: &RepoName,
        subject: &Digest,
        digest: String,
    ) -> Result<(), Error> {
        let (r, s) = (repo.clone(), subject.clone());
        self.index
            .blocking(move |ix| {
                ix.referrers().set_fallback_seen(&r, &s, &digest);
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// `entries` without the manifests the upstream says are gone (those
    /// leave the index too, with a tombstone). At most
    /// [`MAX_VERIFIED_ENTRIES`] are asked about; the rest are kept.
    async fn verified(
        &self,
        repo: &RepoName,
        entries: Vec<Descriptor>,
        auth: Option<&HeaderValue>,
    ) -> Result<Vec<Descriptor>, Error> {
        let mut kept = Vec::with_capacity(entries.len());
        let mut gone = Vec::new();
        for (i, e) in entries.into_iter().enumerate() {
            if i < MAX_VERIFIED_ENTRIES
                && self.presence(repo, &e.digest, auth).await == Presence::Gone
            {
                gone.push(e.digest);
            } else {
                kept.push(e);
            }
        }
        if !gone.is_empty() {
            tracing::info!(%repo, gone = gone.len(), "fallback tag named manifests deleted upstream; dropped");
            self.forget_gone(repo, gone, None).await?;
        }
        Ok(kept)
    }

    /// Applies the size rule (`tag_fit`) to the entries of the tag of
    /// `subject`: the entries to write, or `None` when even the bare
    /// descriptors exceed `referrers.max_tag_bytes`. Either way with a
    /// warning and a count when it had to act.
    fn fit_tag(
        &self,
        repo: &RepoName,
        subject: &Digest,
        entries: Vec<Descriptor>,
    ) -> Option<Vec<Descriptor>> {
        let limit = self.cfg.max_tag_bytes;
        let count = entries.len();
        match tag_fit::fit(entries, limit) {
            Fit::Fits { entries, stripped } => {
                if stripped > 0 {
                    TagSizeCounters::add(&self.tag_size.annotations_dropped, stripped);
                    tracing::warn!(%repo, %subject, stripped, limit, "fallback tag too large with every annotation; written without the largest entries' annotations (graft's API keeps them)");
                }
                Some(entries)
            }
            Fit::TooLarge { bare_bytes } => {
                TagSizeCounters::add(&self.tag_size.too_large, 1);
                tracing::warn!(%repo, %subject, referrers = count, bare_bytes, limit, "fallback tag would exceed referrers.max_tag_bytes even without annotations; not written (graft's API lists every referrer)");
                None
            }
        }
    }

    /// The entries the tag should hold: what the index knows after
    /// ingesting the current tag, plus the tag's entries the upstream could
    /// not judge now (dropping them on a transient error would delete
    /// referrers other clients wrote). Also whether every entry was judged.
    async fn merged(
        &self,
        repo: &RepoName,
        subject: &Digest,
        current: Option<&TagRead>,
        auth: Option<&HeaderValue>,
    ) -> Result<(Vec<Descriptor>, bool), Error> {
        let mut judged = true;
        let undecided = match current {
            Some(t) => {
                let ingested = self
                    .ingest(repo, Holder::Subject(subject), &t.index, auth)
                    .await?;
                if self.tag_changed(repo, subject, t).await? {
                    judged = self
                        .reconcile(repo, subject, t, &ingested.checked, auth)
                        .await?
                        .complete;
                }
                ingested.undecided
            }
            None => Vec::new(),
        };
        let (r, s) = (repo.clone(), subject.clone());
        let mut entries = self
            .index
            .blocking(move |ix| ix.referrers().list(&r, &s))
            .await?;
        let complete = judged && undecided.is_empty();
        for u in undecided {
            if !entries.iter().any(|e| e.digest == u.digest) {
                entries.push(u);
            }
        }
        entries.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok((entries, complete))
    }

    /// PUTs the fallback tag of `subject`; returns the digest written.
    async fn put_tag(
        &self,
        repo: &RepoName,
        subject: &Digest,
        entries: Vec<Descriptor>,
        auth: Option<&HeaderValue>,
    ) -> Result<Digest, Error> {
        let bytes = Bytes::from(ImageIndex::of(entries).to_bytes());
        let digest = Digest::sha256_of(&bytes);
        let path = format!("/v2/{repo}/manifests/{}", subject.fallback_tag());
        let ct = [(header::CONTENT_TYPE, media::IMAGE_INDEX)];
        let resp = self
            .upstream
            .call(Method::PUT, &path, auth, &ct, bytes)
            .await?;
        if !resp.status().is_success() {
            return Err(fallback::refused(&resp, &path, "PUT"));
        }
        Ok(digest)
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
        let Ok(index) = serde_json::from_slice::<ImageIndex>(body) else {
            return Ok(());
        };
        let subject = subject_of_tag(tag);
        let holder = subject.as_ref().map_or(Holder::Tag(tag), Holder::Subject);
        self.ingest(repo, holder, &index.manifests, auth).await?;
        let listed: Vec<Digest> = index.manifests.iter().map(|m| m.digest.clone()).collect();
        for (s, known) in self.subjects_of_tag(repo, tag, subject, &listed).await? {
            self.repair_client_tag(repo, &s, known, &listed, auth)
                .await?;
        }
        Ok(())
    }

    /// The subjects a client-written tag stands for, each with the
    /// referrers graft knows of it. A truncated tag does not name its
    /// subject whole: the subjects are those its entries are indexed under.
    async fn subjects_of_tag(
        &self,
        repo: &RepoName,
        tag: &str,
        subject: Option<Digest>,
        listed: &[Digest],
    ) -> Result<Vec<(Digest, Vec<Descriptor>)>, Error> {
        let (r, tag, listed) = (repo.clone(), tag.to_string(), listed.to_vec());
        let found = self
            .index
            .blocking(move |ix| {
                let refs = ix.referrers();
                let mut subjects: Vec<Digest> = subject.into_iter().collect();
                if subjects.is_empty() {
                    for e in &listed {
                        for s in refs.subjects_of(&r, e)? {
                            if s.fallback_tag() == tag && !subjects.contains(&s) {
                                subjects.push(s);
                            }
                        }
                    }
                }
                subjects
                    .into_iter()
                    .map(|s| Ok((s.clone(), refs.list(&r, &s)?)))
                    .collect()
            })
            .await?;
        Ok(found)
    }

    /// Repairs a client's tag for `subject` that lacks referrers graft
    /// knows: ones deleted upstream leave the index, ones that still exist
    /// are written back.
    async fn repair_client_tag(
        &self,
        repo: &RepoName,
        subject: &Digest,
        known: Vec<Descriptor>,
        listed: &[Digest],
        auth: Option<&HeaderValue>,
    ) -> Result<(), Error> {
        let mut lacks = false;
        for k in known.iter().filter(|k| !listed.contains(&k.digest)) {
            // The client may have left it out because it is gone (deleted
            // straight at the upstream): only a referrer that still exists
            // is a lost race to repair.
            if self.manifest_gone(repo, &k.digest, auth).await {
                tracing::info!(%repo, %subject, referrer = %k.digest, "referrer deleted upstream; dropped from the index");
                let (r, d) = (repo.clone(), k.digest.clone());
                self.index
                    .blocking(move |ix| ix.referrers().remove_referrer(&r, &d))
                    .await?;
            } else {
                lacks = true;
            }
        }
        if lacks && self.writes_tags() {
            tracing::info!(%repo, %subject, "client's fallback tag lacks known referrers; pushing the merged index");
            let (r, s) = (repo.clone(), subject.clone());
            self.index
                .blocking(move |ix| ix.intents().owe_tag_write(&r, &s))
                .await?;
            self.index.flush().await?;
            self.write_tag_locked(repo, subject, auth).await;
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
}

/// How one attempt at a tag write ended, short of a transient error.
enum Attempt {
    /// Written and read back, or nothing to write.
    Done,
    /// Every round's write was replaced by another writer's: still owed.
    Contended,
    /// The registry refused the bytes (a 4xx the same bytes would get
    /// again), which named these referrers.
    Refused {
        status: StatusCode,
        what: String,
        named: Vec<Digest>,
    },
}

/// Whether a write is settled (written, nothing to write, or dropped) or
/// stays owed.
enum Settled {
    Yes,
    Owed,
}

/// How one round of a write ended.
enum Round {
    Settled(Attempt),
    /// The tag changed under the round: merge again.
    Replaced,
}

/// Most rounds of merge-write-verify one write makes before it stays owed:
/// replicas writing one tag at once settle in a few.
const MAX_ROUNDS: usize = 4;

/// Bounds of the pause before a write's second read-back: long enough for
/// a concurrent replica's in-flight PUT on a busy machine, short enough
/// not to weigh on the push that caused the write.
const MIN_SETTLE: std::time::Duration = std::time::Duration::from_millis(25);
const MAX_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Most entries a recomputed write asks the upstream about: a refused write
/// of a huge tag must not turn into thousands of requests.
const MAX_VERIFIED_ENTRIES: usize = 256;

/// A refusal of the tag's content: not credentials (graft may retry with
/// its own), not rate or time (transient, the write stays owed).
fn is_hopeless(status: StatusCode) -> bool {
    status.is_client_error()
        && !crate::upstream::is_denial(status)
        && status != StatusCode::TOO_MANY_REQUESTS
        && status != StatusCode::REQUEST_TIMEOUT
}

/// Whether a write failed because the upstream refused the credentials.
fn is_refusal(written: &Result<Settled, Error>) -> bool {
    matches!(written, Err(Error::UpstreamRefused { status, .. }) if crate::upstream::is_denial(*status))
}

/// Repositories graft has already said it cannot keep tags in, so the log
/// says it once per repository (bounded: one forgotten is said again).
const WARNED_CAPACITY: u64 = 10_000;

/// Counts refused tag writes and says once per repository why they stay
/// owed.
pub(super) struct Unauthorized {
    count: AtomicU64,
    warned: moka::sync::Cache<RepoName, ()>,
}

impl Default for Unauthorized {
    fn default() -> Self {
        Unauthorized {
            count: AtomicU64::new(0),
            warned: moka::sync::Cache::builder()
                .max_capacity(WARNED_CAPACITY)
                .build(),
        }
    }
}

impl Unauthorized {
    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn note(&self, repo: &RepoName, has_account: bool) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if self.warned.contains_key(repo) {
            return;
        }
        self.warned.insert(repo.clone(), ());
        if has_account {
            tracing::warn!(%repo, "graft's upstream account may not write fallback tags here; fallback-tag upkeep needs push rights on this repository (writes stay owed)");
        } else {
            tracing::warn!(%repo, "a client's credentials may not write a fallback tag and graft has no upstream account; fallback-tag upkeep needs upstream.username/password with push rights (writes stay owed)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_of_the_content_are_recomputed_and_dropped() {
        assert!(is_hopeless(StatusCode::BAD_REQUEST));
        assert!(is_hopeless(StatusCode::PAYLOAD_TOO_LARGE));
        assert!(is_hopeless(StatusCode::METHOD_NOT_ALLOWED));
        for transient_or_credentials in [
            StatusCode::UNAUTHORIZED,
            StatusCode::FORBIDDEN,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::REQUEST_TIMEOUT,
            StatusCode::BAD_GATEWAY,
        ] {
            assert!(!is_hopeless(transient_or_credentials));
        }
    }
}
