//! The cache, behind one door: the proxy asks, the cache answers, and
//! nothing outside this module sees its files, fills or records.
//!
//! The contract, after pingora-cache:
//! - [`ContentCache::lookup`] for (repository, digest, credentials) answers
//!   a [`Hit`] (a committed file to serve), a [`Miss`] (the caller fetches;
//!   it hands the upstream's 200 to [`Miss::fill`], which streams it into
//!   the cache and back to the caller — dropping the `Miss` unfilled means
//!   the fill failed, and followers ask for themselves), or a [`Follow`] of
//!   a fill in progress.
//! - [`ContentCache::resolve_tag`] turns a tag into a digest to serve:
//!   trusted for `cache.tag_ttl`, then revalidated with the caller's HEAD,
//!   and while the upstream is out the last known digest stands for
//!   `cache.max_stale`.
//! - Blob uploads are teed into the cache as they pass through
//!   ([`ContentCache::begin_upload`], [`Session::tee`]), and manifests pushed through
//!   graft are written through ([`ContentCache::store_bytes`]).
//!
//! Which repositories the upstream confirmed hold which content (the
//! `present` records), tag records, last-access times and byte accounting
//! live here too. No file or sled I/O runs on the async workers: it goes
//! through the blocking pool, and the media types of committed manifests
//! are kept in memory so manifest hits read nothing but the file.
//!
//! Readers hold an open file descriptor: eviction unlinks the name, and a
//! reader that already opened the file keeps reading the same inode to the
//! end — an entry being read is never deleted under its reader.

mod body;
mod check;
mod entries;
mod fill;
mod space;
mod spill;
mod store;
mod tags;
mod upload;

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

pub(crate) use body::FileBody;
pub use entries::{upkeep, CacheStats, VerifyReport};
pub(crate) use fill::{Follow, Followed, Miss, Streaming};
pub(crate) use store::Store;
pub(crate) use tags::{Revalidation, TagAnswer};
pub(crate) use upload::{Owner, Session, Teed};

use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::credentials::CredKey;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use fill::{Claim, Fills};
use upload::Uploads;

/// Committed manifests whose media type is kept in memory.
const MEDIA_TYPES: u64 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("upstream body ended early or failed: {0}")]
    Upstream(String),
    #[error("no room on disk: {0}")]
    NoSpace(String),
}

impl CacheError {
    /// Whether the data directory's file system is out of space.
    pub fn is_no_space(&self) -> bool {
        match self {
            CacheError::Io(e) => {
                e.kind() == std::io::ErrorKind::StorageFull
                    || e.raw_os_error() == Some(28)
                    || e.to_string().contains("No space left on device")
            }
            CacheError::NoSpace(_) => true,
            _ => false,
        }
    }
}

impl From<CacheError> for crate::error::Error {
    fn from(e: CacheError) -> Self {
        crate::error::Error::Internal(e.to_string())
    }
}

/// The cache: store, fills in flight, uploads being teed, and the records
/// in the index.
pub struct ContentCache {
    store: Arc<Store>,
    fills: Arc<Fills>,
    uploads: Uploads,
    index: Index,
    metrics: Arc<Metrics>,
    cfg: CacheConfig,
    clock: Clock,
    /// Media types of committed manifests, so a manifest hit does not read
    /// sled; bounded, and refilled from the index after a restart.
    media_types: moka::sync::Cache<Digest, Arc<str>>,
    /// Last-access times not yet written to the index: the hit path only
    /// touches this map; a background task writes it in batches.
    touched: Mutex<HashMap<Digest, u64>>,
    /// One eviction pass at a time: concurrent passes would pick the same
    /// victims and count their bytes twice. A flag, not a lock: a pass does
    /// file I/O, and no lock is held around I/O.
    evicting: AtomicBool,
    /// Changed files found and dropped (`graft_cache_corrupt_total`).
    corrupt: AtomicU64,
    /// Bytes reserved by fills in flight (see `space.rs`).
    reserved: AtomicU64,
    /// Misses streamed uncached for lack of room
    /// (`graft_cache_fills_skipped_total`).
    skipped: AtomicU64,
}

/// A committed file ready to serve, already open (so eviction cannot take
/// it from under the reader).
pub(crate) struct Hit {
    file: Arc<File>,
    len: u64,
    media_type: Option<String>,
}

impl Hit {
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The media type recorded when the content was cached (manifests).
    pub(crate) fn media_type(&self) -> Option<&str> {
        self.media_type.as_deref()
    }

    /// The bytes `[start, end)` of the file.
    pub(crate) fn body(self, start: u64, end: u64) -> FileBody {
        FileBody::committed(self.file, start, end)
    }
}

/// What the cache has for a digest.
pub(crate) enum Lookup {
    Hit(Hit),
    /// Nobody is fetching it: the caller leads the fill.
    Miss(Miss),
    /// Someone is fetching it already.
    Follow(Follow),
}

impl ContentCache {
    /// Runs blocking work (file or sled I/O) off the async workers.
    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CacheError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| CacheError::Io(std::io::Error::other(format!("blocking task: {e}"))))
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// The committed file for `digest`, opened. `manifest` asks for the
    /// media type too.
    pub(crate) async fn hit(self: &Arc<Self>, digest: &Digest, manifest: bool) -> Option<Hit> {
        if !Store::cacheable(digest) {
            return None;
        }
        let (file, len) = match self.store.already_open(digest) {
            Some(opened) => opened,
            None => {
                let (me, d) = (self.clone(), digest.clone());
                Self::blocking(move || me.open_checked(&d)).await.ok()??
            }
        };
        let media_type = if manifest {
            self.media_type(digest).await
        } else {
            None
        };
        Some(Hit {
            file,
            len,
            media_type,
        })
    }

    async fn media_type(&self, digest: &Digest) -> Option<String> {
        if let Some(m) = self.media_types.get(digest) {
            return Some(m.to_string());
        }
        // Cached before this process started: read once, then remembered.
        let (index, d) = (self.index.clone(), digest.clone());
        let entry = Self::blocking(move || index.cache_entries().get(&d))
            .await
            .ok()?;
        let m = entry.ok().flatten()?.media_type?;
        self.media_types
            .insert(digest.clone(), Arc::from(m.as_str()));
        Some(m)
    }

    /// A hit, or the lead of a fill, or a fill to follow.
    pub(crate) async fn lookup(
        self: &Arc<Self>,
        repo: &RepoName,
        digest: &Digest,
        cred: CredKey,
        manifest: bool,
    ) -> Lookup {
        if let Some(hit) = self.hit(digest, manifest).await {
            return Lookup::Hit(hit);
        }
        match self.fills.claim(digest, repo, cred) {
            Claim::Lead(lead) => {
                crate::metrics::inc(&self.metrics.cache_misses);
                Lookup::Miss(Miss::new(lead, self.clone(), repo.clone()))
            }
            Claim::Follow(fill) => {
                crate::metrics::inc(&self.metrics.coalesced_waiters);
                Lookup::Follow(Follow::new(fill))
            }
        }
    }

    /// Records that the upstream confirmed `repo` holds `digest` (a cached
    /// copy may then be served to clients allowed on `repo`).
    pub(crate) async fn mark_present(&self, repo: &RepoName, digest: &Digest) {
        if self.index.present().marked_now(repo, digest) {
            return;
        }
        let (index, r, d) = (self.index.clone(), repo.clone(), digest.clone());
        // The index logs and counts a failed write; only a lost task is ours.
        if let Err(e) = Self::blocking(move || index.present().mark(&r, &d)).await {
            tracing::error!(error = %e, "recording presence failed");
        }
    }

    /// Records that the upstream deleted `digest` from `repo`: the cached
    /// bytes may stay (other repositories can hold them), but clients of
    /// `repo` are no longer served them without asking.
    pub(crate) async fn forget_present(&self, repo: &RepoName, digest: &Digest) {
        let (index, r, d) = (self.index.clone(), repo.clone(), digest.clone());
        // The index logs and counts a failed write; only a lost task is ours.
        if let Err(e) = Self::blocking(move || index.present().forget(&r, &d)).await {
            tracing::error!(error = %e, "forgetting presence failed");
        }
    }

    /// Records that the upstream deleted `tag` from `repo`: the next pull
    /// of it asks the upstream.
    pub(crate) async fn forget_tag(&self, repo: &RepoName, tag: &str) {
        let (index, r, t) = (self.index.clone(), repo.clone(), tag.to_string());
        // The index logs and counts a failed write; only a lost task is ours.
        if let Err(e) = Self::blocking(move || index.tags().forget(&r, &t)).await {
            tracing::error!(error = %e, "forgetting a tag failed");
        }
    }

    /// Notes a read for LRU without writing to sled now.
    pub(crate) fn touch(&self, digest: &Digest) {
        let now = self.clock.now_millis();
        self.touched
            .lock()
            .expect("touch map poisoned")
            .insert(digest.clone(), now);
    }

    /// Remembers the upload the upstream accepted as `id` for `owner`
    /// (`None`: at `cache.max_upload_sessions` = 0).
    pub(crate) fn begin_upload(&self, id: &str, owner: Owner) -> Option<Arc<Session>> {
        let (session, gone) = self
            .uploads
            .begin(&self.store, &self.clock, &self.cfg, id, owner);
        if !gone.is_empty() {
            // A forgotten session may delete its temp file as it drops.
            tokio::task::spawn_blocking(move || drop(gone));
        }
        session
    }

    /// A single-request upload's session (not kept by id).
    pub(crate) fn upload_session(&self, owner: Owner) -> Arc<Session> {
        Session::new(&self.store, &self.clock, owner)
    }

    /// The session of upload `id`; `end` takes it out (the request that
    /// completes or cancels the upload).
    pub(crate) fn upload(&self, id: &str, end: bool) -> Option<Arc<Session>> {
        if end {
            self.uploads.end(id)
        } else {
            self.uploads.get(id)
        }
    }

    /// Forgets upload sessions idle or old past their limits, deleting
    /// their temp files (blocking: the cache's upkeep calls it).
    pub fn sweep_uploads(&self) {
        drop(self.uploads.sweep(&self.clock, &self.cfg));
    }

    /// Upload sessions being teed now (a gauge for `/metrics`).
    pub fn upload_sessions(&self) -> u64 {
        self.uploads.len() as u64
    }

    /// Upload tees dropped for `cache.max_upload_sessions` or
    /// `cache.upload_session_ttl` (a counter for `/metrics`).
    pub fn upload_sessions_dropped(&self) -> u64 {
        self.uploads.dropped()
    }
}

fn index_err(e: crate::index::IndexError) -> CacheError {
    CacheError::Io(std::io::Error::other(e.to_string()))
}
