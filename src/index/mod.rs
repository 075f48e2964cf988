//! The index: the only code that opens sled, as one typed store per concern.
//!
//! [`Index`] opens the database and hands out the stores; each store owns
//! its trees and says what it keeps:
//!
//! - [`ReferrerStore`] (`referrers.rs`): the referrers graft knows, which
//!   subjects a referrer belongs to, tombstones of deleted referrers,
//!   fallback-tag entries judged not to belong, and the digest of each
//!   fallback tag last read;
//! - [`IntentStore`] (`intents.rs`): owed work — pushes and deletes
//!   announced but not settled, fallback-tag writes not yet done;
//! - [`CacheEntries`] (`cache_entries.rs`): one record per cached file;
//! - [`TagStore`] (`tags.rs`): the last known digest of each tag;
//! - [`PresentStore`] (`present.rs`): which repositories the upstream
//!   confirmed hold a digest;
//! - [`AccessStore`] (`access.rs`): when the upstream last said yes to a
//!   client's credentials (as an HMAC, never the credentials);
//! - [`NativeAnswerStore`] (`native_answers.rs`): the last referrers answer
//!   of an upstream with its own referrers API, for answers while it is down.
//!
//! Keys are parts joined by NUL (names and digests never contain NUL), so a
//! subject's referrers are one prefix scan. Trees that grow with traffic
//! carry a Unix-seconds stamp in their values and are pruned by age and
//! count in the background (`prune.rs`); owed work and the referrers
//! themselves never are.
//!
//! Writes come in two kinds. Those that must survive (intents, referrers,
//! owed tag writes) return `Result` and are flushed before they are
//! acknowledged. Best-effort ones (presence, tags, access, rejections,
//! fallback-tag digests, touches, cache-entry removal) return `()`: a
//! failure is logged with what it was about and counted in
//! [`Index::write_failures`], because losing one only costs a later upstream
//! round trip.

mod access;
mod cache_entries;
mod intents;
mod native_answers;
mod present;
mod prune;
mod referrers;
mod schema;
mod tags;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use access::AccessStore;
pub use cache_entries::{CacheEntries, CacheEntry};
pub use intents::{Intent, IntentStore};
pub use native_answers::{NativeAnswer, NativeAnswerStore};
pub use present::PresentStore;
// The server part spawns it from `lib.rs` (merged separately).
pub use crate::config::TreeBounds;
#[allow(unused_imports)]
pub(crate) use prune::prune_periodically;
pub use prune::{PruneBounds, PruneReport, TreePruned};
pub use referrers::ReferrerStore;
pub use tags::{TagRecord, TagStore};

use crate::clock::Clock;

/// Why the index could not do what was asked. sled's own errors stay
/// inside: callers see what failed, as text.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index storage: {0}")]
    Storage(String),
    #[error("index holds unreadable data: {0}")]
    Corrupt(String),
    #[error("index at {path} is in use by another graft process (stop it first): {reason}")]
    Locked { path: String, reason: String },
    #[error("index schema version {found} is not supported (expected {expected})")]
    Schema { found: String, expected: String },
}

impl From<sled::Error> for IndexError {
    fn from(e: sled::Error) -> Self {
        IndexError::Storage(e.to_string())
    }
}

impl From<IndexError> for crate::error::Error {
    fn from(e: IndexError) -> Self {
        crate::error::Error::Internal(e.to_string())
    }
}

/// The index: cheap to clone, every clone is the same database.
#[derive(Clone)]
pub struct Index {
    db: sled::Db,
    referrers: ReferrerStore,
    intents: IntentStore,
    cache_entries: CacheEntries,
    tags: TagStore,
    present: PresentStore,
    access: AccessStore,
    native_answers: NativeAnswerStore,
    shared: Shared,
}

/// How long opening waits for sled's lock to be let go before the index
/// counts as held by another process.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// What every store needs besides its trees: the time its stamps come
/// from, and the counter its best-effort failures go to.
#[derive(Clone)]
pub(crate) struct Shared {
    clock: Clock,
    write_failures: Arc<AtomicU64>,
    pruned: Arc<AtomicU64>,
}

impl Shared {
    fn now_secs(&self) -> u64 {
        self.clock.now_secs()
    }

    /// Settles a best-effort write: a failure is logged with what it was
    /// about (never credentials) and counted.
    fn best_effort<T, E: std::fmt::Display>(
        &self,
        tree: &'static str,
        about: &dyn std::fmt::Display,
        r: Result<T, E>,
    ) {
        if let Err(e) = r {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(tree, about = %about, error = %e, "best-effort index write failed");
        }
    }
}

/// Whether sled failed to open because another process holds its lock.
///
/// sled 0.34 does not pass the `flock` error through: it wraps it in an
/// `ErrorKind::Other` whose only trace is the message ("could not acquire
/// lock on …: … WouldBlock …"), so the message is what can be matched.
fn is_lock_conflict(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.raw_os_error() == Some(11)
                || io.to_string().starts_with("could not acquire lock")
        }
        _ => false,
    }
}

impl IndexError {
    /// Whether the index's file system is out of space.
    pub fn is_no_space(&self) -> bool {
        match self {
            IndexError::Storage(m) => {
                m.contains("No space left on device") || m.contains("os error 28")
            }
            _ => false,
        }
    }
}

/// Copies the files under `from` into `to` (created), recursively.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

impl Index {
    /// Opens (or creates) the index under `dir`, stamping with the system
    /// clock.
    pub fn open(dir: &Path) -> Result<Index, IndexError> {
        Index::open_with(
            dir,
            Clock::system(),
            crate::config::DEFAULT_INDEX_CACHE_BYTES,
        )
    }

    /// Opens (or creates) the index under `dir`; `clock` stamps the values
    /// pruning judges by (`Config.clock`, skewable in tests); sled keeps at
    /// most `cache_bytes` of pages in memory (`index.cache_bytes`).
    pub fn open_with(dir: &Path, clock: Clock, cache_bytes: u64) -> Result<Index, IndexError> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::Storage(e.to_string()))?;
        // sled's flusher thread holds the directory's lock a moment after
        // its last handle is dropped (a restart in the same process, a
        // command run right after graft stopped): wait that out, briefly,
        // before calling the index held by someone else.
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        let db = loop {
            let opened = sled::Config::new()
                .path(dir)
                .cache_capacity(cache_bytes)
                .open();
            match opened {
                Err(e) if is_lock_conflict(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) if is_lock_conflict(&e) => {
                    return Err(IndexError::Locked {
                        path: dir.display().to_string(),
                        reason: e.to_string(),
                    })
                }
                other => break other?,
            }
        };
        Index::on(db, clock)
    }

    /// Opens the index under `dir`, or — when its file system is full and
    /// sled cannot open it (sled writes when it opens) — an empty stand-in
    /// kept in memory (`/dev/shm`) and deleted on drop, with the reason.
    /// Nothing of the real index is read or lost: it is there again at the
    /// next start with room.
    pub fn open_or_stand_in(
        dir: &Path,
        clock: Clock,
        cache_bytes: u64,
    ) -> Result<(Index, Option<IndexError>), IndexError> {
        match Index::open_with(dir, clock.clone(), cache_bytes) {
            Ok(index) => Ok((index, None)),
            Err(e) if e.is_no_space() => {
                let db = sled::Config::new()
                    .temporary(true)
                    .cache_capacity(cache_bytes)
                    .open()?;
                Ok((Index::on(db, clock)?, Some(e)))
            }
            Err(e) => Err(e),
        }
    }

    /// Opens a copy of the index under `dir`, made in `scratch` (on another
    /// file system): for reading a full disk's index without writing to it
    /// (`graft cache gc`). What is written to the copy is thrown away with
    /// `scratch`.
    pub fn open_copy(dir: &Path, scratch: &Path, clock: Clock) -> Result<Index, IndexError> {
        let storage = |e: std::io::Error| IndexError::Storage(e.to_string());
        copy_dir(dir, scratch).map_err(storage)?;
        // The copy carries the original's lock file, not its lock.
        Index::open_with(scratch, clock, crate::config::DEFAULT_INDEX_CACHE_BYTES)
    }

    /// The stores over an opened database.
    fn on(db: sled::Db, clock: Clock) -> Result<Index, IndexError> {
        schema::check_and_migrate(&db, clock.now_secs())?;
        let shared = Shared {
            clock,
            write_failures: Arc::default(),
            pruned: Arc::default(),
        };
        Ok(Index {
            referrers: ReferrerStore::open(&db, shared.clone())?,
            intents: IntentStore::open(&db)?,
            cache_entries: CacheEntries::open(&db, shared.clone())?,
            tags: TagStore::open(&db, shared.clone())?,
            present: PresentStore::open(&db, shared.clone())?,
            access: AccessStore::open(&db, shared.clone())?,
            native_answers: NativeAnswerStore::open(&db, shared.clone())?,
            shared,
            db,
        })
    }

    pub fn referrers(&self) -> &ReferrerStore {
        &self.referrers
    }

    pub fn intents(&self) -> &IntentStore {
        &self.intents
    }

    pub fn cache_entries(&self) -> &CacheEntries {
        &self.cache_entries
    }

    pub fn tags(&self) -> &TagStore {
        &self.tags
    }

    pub fn present(&self) -> &PresentStore {
        &self.present
    }

    pub fn native_answers(&self) -> &NativeAnswerStore {
        &self.native_answers
    }

    pub fn access(&self) -> &AccessStore {
        &self.access
    }

    /// The clock the index stamps with.
    pub(crate) fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// Best-effort writes that failed since open (metric
    /// `graft_index_write_failures_total`).
    pub fn write_failures(&self) -> u64 {
        self.shared.write_failures.load(Ordering::Relaxed)
    }

    /// Entries pruning removed since open (metric
    /// `graft_index_pruned_total`).
    pub fn pruned(&self) -> u64 {
        self.shared.pruned.load(Ordering::Relaxed)
    }

    /// Makes every write so far durable.
    ///
    /// A blocking `flush` on the blocking pool: sled 0.34's `flush_async`
    /// never wakes some of its waiters when several flush at once
    /// (spacejam/sled#1308), which hung concurrent pushes.
    pub async fn flush(&self) -> Result<(), IndexError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| IndexError::Storage(format!("flush task: {e}")))??;
        Ok(())
    }

    /// Runs `work` on the blocking pool, so sled reads never stall an async
    /// worker. Meant for a batch of index work, not one call per key.
    pub(crate) async fn blocking<T, F>(&self, work: F) -> Result<T, IndexError>
    where
        T: Send + 'static,
        F: FnOnce(&Index) -> Result<T, IndexError> + Send + 'static,
    {
        let index = self.clone();
        tokio::task::spawn_blocking(move || work(&index))
            .await
            .map_err(|e| IndexError::Storage(format!("index task: {e}")))?
    }
}

fn key(parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

/// A prefix ending in the separator, so `repo` does not match `repo2`.
fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

fn split(k: &[u8]) -> Result<Vec<String>, IndexError> {
    k.split(|b| *b == 0)
        .map(|p| {
            String::from_utf8(p.to_vec()).map_err(|_| IndexError::Corrupt("non-UTF-8 key".into()))
        })
        .collect()
}

fn corrupt(e: impl std::fmt::Display) -> IndexError {
    IndexError::Corrupt(e.to_string())
}

/// A value that is only a stamp: Unix seconds, big-endian.
fn stamp(secs: u64) -> [u8; 8] {
    secs.to_be_bytes()
}

/// The stamp at the start of a value, if it has one.
fn stamp_of(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::oci::{Descriptor, Digest};

    pub fn desc(n: u8) -> Descriptor {
        serde_json::from_value(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": Digest::sha256_of(&[n]).to_string(),
            "size": 10 + n as u64,
            "artifactType": "application/vnd.example",
        }))
        .expect("descriptor")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_of_a_held_index_reports_it_is_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _held = Index::open(dir.path()).expect("open");
        match Index::open(dir.path()) {
            Err(IndexError::Locked { path, .. }) => {
                assert_eq!(path, dir.path().display().to_string())
            }
            Err(other) => panic!("expected Locked, got {other}"),
            Ok(_) => panic!("a held index opened twice"),
        }
    }
}
