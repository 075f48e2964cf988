//! The cache's records and budget: an entry per committed file in the
//! index (size, media type, last access), the byte count, least recently
//! used eviction, and the operator's views (`stats`, `verify`, `gc`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use super::{
    index_err, store::Writer, CacheError, ContentCache, Fills, Store, Uploads, MEDIA_TYPES,
};
use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::index::{CacheEntry, Index};
use crate::metrics::{self, Metrics};
use crate::oci::Digest;

/// What [`ContentCache::verify_each`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Files re-hashed, and their bytes.
    pub checked: usize,
    pub bytes: u64,
    /// Files whose bytes did not match their digest (now removed), with
    /// their sizes.
    pub corrupt: Vec<(Digest, u64)>,
    /// Files that could not be read, with the error (left in place).
    pub unreadable: Vec<(Digest, String)>,
}

/// What the cache holds, for `graft cache stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries in the index, and the bytes they record.
    pub entries: usize,
    pub entry_bytes: u64,
    /// Committed files on disk, and their bytes.
    pub files: usize,
    pub file_bytes: u64,
    /// The byte count eviction works against.
    pub bytes_in_use: u64,
    /// The budget (`cache.max_bytes`).
    pub max_bytes: u64,
    /// Unix milliseconds of the least and most recent access; `None` when
    /// the cache is empty.
    pub oldest_access_ms: Option<u64>,
    pub newest_access_ms: Option<u64>,
}

impl ContentCache {
    /// Opens the store and reconciles it with the index: files committed
    /// just before a crash get an entry, entries whose file is gone are
    /// dropped, and the byte gauge starts from what is on disk.
    pub fn open(
        data_dir: &std::path::Path,
        index: Index,
        metrics: Arc<Metrics>,
        cfg: CacheConfig,
        clock: Clock,
    ) -> Result<Arc<ContentCache>, CacheError> {
        let store = Store::open(data_dir)?;
        let cache = ContentCache {
            store,
            fills: Arc::new(Fills::default()),
            uploads: Uploads::default(),
            index,
            metrics,
            cfg,
            clock,
            media_types: moka::sync::Cache::new(MEDIA_TYPES),
            touched: Mutex::new(HashMap::new()),
            evicting: AtomicBool::new(false),
            corrupt: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        };
        cache.reconcile()?;
        Ok(Arc::new(cache))
    }

    fn reconcile(&self) -> Result<(), CacheError> {
        let on_disk: HashMap<Digest, u64> = self.store.list()?.into_iter().collect();
        let entries = self.index.cache_entries().all().map_err(index_err)?;
        let mut total = 0;
        for (d, _) in &entries {
            if !on_disk.contains_key(d) {
                self.index.cache_entries().remove(d);
            }
        }
        let known: HashMap<&Digest, &CacheEntry> = entries.iter().map(|(d, e)| (d, e)).collect();
        for (d, size) in &on_disk {
            if let Some(e) = known.get(d).filter(|e| e.size != *size) {
                // Truncated or grown while graft was stopped: not counted,
                // so dropping it subtracts nothing.
                let why = format!(
                    "{size} bytes on disk, {} recorded when it was cached",
                    e.size
                );
                self.drop_corrupt(d, 0, &why);
                continue;
            }
            total += size;
            if !known.contains_key(d) {
                let e = CacheEntry {
                    size: *size,
                    media_type: self.sniff_media_type(d, *size),
                    last_access_ms: self.clock.now_millis(),
                };
                self.index.cache_entries().put(d, &e).map_err(index_err)?;
            }
        }
        self.metrics.cache_bytes.store(total, Ordering::Relaxed);
        Ok(())
    }

    /// The `mediaType` a manifest file declares, for entries rebuilt after
    /// a crash lost them (a manifest must keep its media type when served).
    fn sniff_media_type(&self, digest: &Digest, size: u64) -> Option<String> {
        if size > 4 << 20 {
            return None;
        }
        let bytes = std::fs::read(self.store.path_of(digest)).ok()?;
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
        }
        serde_json::from_slice::<Head>(&bytes).ok()?.media_type
    }

    /// A fill committed `len` bytes of `digest`.
    pub(super) fn filled(self: &Arc<Self>, digest: &Digest, len: u64, media_type: Option<&str>) {
        self.record(digest, len, media_type);
        metrics::add(&self.metrics.upstream_bytes_fetched, len);
    }

    /// A fill failed: nothing was cached.
    pub(super) fn fill_failed(&self) {
        metrics::inc(&self.metrics.cache_fills_failed);
    }

    /// A miss streamed uncached because the disk had no room for it.
    pub(super) fn fill_skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Misses streamed uncached for lack of room (a counter for `/metrics`).
    pub fn fills_skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Blocking (a sled write): called on the blocking pool or from a fill
    /// task.
    fn record(self: &Arc<Self>, digest: &Digest, len: u64, media_type: Option<&str>) {
        if let Some(m) = media_type {
            self.media_types.insert(digest.clone(), Arc::from(m));
        }
        let e = CacheEntry {
            size: len,
            media_type: media_type.map(str::to_string),
            last_access_ms: self.clock.now_millis(),
        };
        match self.index.cache_entries().put(digest, &e) {
            Ok(true) => {}
            Ok(false) => metrics::add(&self.metrics.cache_bytes, len),
            Err(e) => tracing::error!(%digest, error = %e, "cannot record a cache entry"),
        }
        if self.over_budget() || self.free_shortfall() > 0 {
            self.evict_soon();
        }
    }

    /// Stores content graft already holds whole (a manifest that was
    /// pushed, a verified upload), when it matches `digest`.
    pub(crate) async fn store_bytes(
        self: &Arc<Self>,
        digest: &Digest,
        bytes: bytes::Bytes,
        media_type: Option<String>,
    ) {
        if !Store::cacheable(digest) {
            return;
        }
        let me = self.clone();
        let d = digest.clone();
        let result = tokio::task::spawn_blocking(move || {
            if me.store.contains(&d) {
                return Ok(());
            }
            let mut w = me.store.writer(&d)?;
            w.write(&bytes)?;
            let n = w.commit()?;
            me.record(&d, n, media_type.as_deref());
            Ok::<_, CacheError>(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(%digest, error = %e, "write-through to the cache failed"),
            Err(e) => tracing::warn!(%digest, error = %e, "write-through task failed"),
        }
    }

    /// Commits a teed upload once the upstream accepted it as `digest`.
    pub(super) async fn commit_upload(self: &Arc<Self>, writer: Writer, digest: &Digest) {
        let me = self.clone();
        let d = digest.clone();
        let result = tokio::task::spawn_blocking(move || {
            if me.store.contains(&d) {
                return Ok(0);
            }
            let n = writer.commit_as(&d)?;
            me.record(&d, n, None);
            Ok::<_, CacheError>(n)
        })
        .await;
        match result {
            Ok(Ok(n)) => tracing::debug!(%digest, bytes = n, "pushed blob kept in the cache"),
            Ok(Err(e)) => tracing::warn!(%digest, error = %e, "pushed blob not cached"),
            Err(e) => tracing::warn!(%digest, error = %e, "upload commit task failed"),
        }
    }

    /// Writes batched last-access times to the index.
    pub fn flush_touches(&self) {
        let batch: Vec<(Digest, u64)> = self
            .touched
            .lock()
            .expect("touch map poisoned")
            .drain()
            .collect();
        // Best effort: the index logs and counts a failed write itself.
        self.index.cache_entries().touch(&batch);
    }

    /// Evicts least recently used files until committed files and fills in
    /// flight are at 90 % of the budget (hysteresis: one big blob does not
    /// trigger eviction on every commit), and the file system's free space
    /// is back above `cache.min_free`. Returns the number of files removed.
    pub fn evict(&self) -> usize {
        // A pass already running brings the cache within bounds.
        let Some(_pass) = self.eviction_pass() else {
            return 0;
        };
        let bytes = self.bytes();
        let budget_target = if self.over_budget() {
            (self.cfg.max_bytes / 10 * 9).saturating_sub(self.reserved_bytes())
        } else {
            u64::MAX
        };
        let short = self.free_shortfall();
        let floor_target = if short > 0 {
            // A tenth of the floor more, for the same hysteresis.
            bytes.saturating_sub(short + self.cfg.min_free / 10)
        } else {
            u64::MAX
        };
        let target = budget_target.min(floor_target);
        if bytes <= target {
            return 0;
        }
        match self.evict_to(target) {
            Ok(removed) => removed.len(),
            Err(e) => {
                tracing::error!(error = %e, "cannot list cache entries for eviction");
                0
            }
        }
    }

    /// Evicts least recently used files until the cache holds at most
    /// `max_bytes` (no hysteresis: `graft cache gc` is asked for a number),
    /// and returns what it removed, oldest access first.
    pub fn gc(&self, max_bytes: u64) -> Result<Vec<(Digest, CacheEntry)>, CacheError> {
        let _pass = loop {
            match self.eviction_pass() {
                Some(pass) => break pass,
                None => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        self.evict_to(max_bytes)
    }

    /// The right to run the eviction pass, if no other pass runs.
    fn eviction_pass(&self) -> Option<Pass<'_>> {
        self.evicting
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Pass(&self.evicting))
    }

    /// The eviction pass itself; the caller holds a [`Pass`].
    fn evict_to(&self, target: u64) -> Result<Vec<(Digest, CacheEntry)>, CacheError> {
        // Reads not yet written to the index would otherwise look old.
        self.flush_touches();
        let mut entries = self.index.cache_entries().all().map_err(index_err)?;
        entries.sort_by_key(|(_, e)| e.last_access_ms);
        let mut removed = Vec::new();
        for (d, e) in entries {
            if self.metrics.cache_bytes.load(Ordering::Relaxed) <= target {
                break;
            }
            // Unlinking leaves open readers their inode: a pull in progress
            // finishes; the next one is a miss.
            match self.store.remove(&d) {
                Ok(true) => {
                    self.index.cache_entries().remove(&d);
                    self.sub_bytes(e.size);
                    metrics::inc(&self.metrics.evictions);
                    tracing::debug!(digest = %d, size = e.size, "evicted");
                    removed.push((d, e));
                }
                Ok(false) => {
                    // Already gone (a verify removed it): the entry and its
                    // bytes must go too, or eviction would chase it forever.
                    self.index.cache_entries().remove(&d);
                    self.sub_bytes(e.size);
                }
                Err(err) => tracing::warn!(digest = %d, error = %err, "cannot evict"),
            }
        }
        Ok(removed)
    }

    /// Re-hashes every file; corrupt ones are removed. Returns
    /// `(checked, corrupt digests)`; a file that cannot be read is an error.
    pub fn verify_all(&self) -> Result<(usize, Vec<Digest>), CacheError> {
        let report = self.verify_each(|_, _| {})?;
        if let Some((d, why)) = report.unreadable.first() {
            return Err(CacheError::Io(std::io::Error::other(format!(
                "cannot read {d}: {why}"
            ))));
        }
        Ok((
            report.checked,
            report.corrupt.into_iter().map(|(d, _)| d).collect(),
        ))
    }

    /// Re-hashes every file, calling `on_file(digest, size)` after each (a
    /// progress bar). Corrupt files are removed with their entries; files
    /// that cannot be read are reported and left alone — an I/O error may be
    /// the disk's or a permission's, not the content's.
    pub fn verify_each(
        &self,
        mut on_file: impl FnMut(&Digest, u64),
    ) -> Result<VerifyReport, CacheError> {
        let mut report = VerifyReport::default();
        for (d, size) in self.store.list()? {
            match self.store.verify(&d) {
                Ok(true) => {}
                Ok(false) => {
                    self.store.remove(&d)?;
                    self.index.cache_entries().remove(&d);
                    self.sub_bytes(size);
                    report.corrupt.push((d.clone(), size));
                }
                // Evicted since the listing: nothing left to check.
                Err(CacheError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => report.unreadable.push((d.clone(), e.to_string())),
            }
            report.checked += 1;
            report.bytes += size;
            on_file(&d, size);
        }
        Ok(report)
    }

    /// What the cache holds: the index's entries against the files on disk.
    pub fn stats(&self) -> Result<CacheStats, CacheError> {
        self.flush_touches();
        let entries = self.index.cache_entries().all().map_err(index_err)?;
        let files = self.store.list()?;
        Ok(CacheStats {
            entries: entries.len(),
            entry_bytes: entries.iter().map(|(_, e)| e.size).sum(),
            files: files.len(),
            file_bytes: files.iter().map(|(_, size)| size).sum(),
            bytes_in_use: self.bytes(),
            max_bytes: self.cfg.max_bytes,
            oldest_access_ms: entries.iter().map(|(_, e)| e.last_access_ms).min(),
            newest_access_ms: entries.iter().map(|(_, e)| e.last_access_ms).max(),
        })
    }

    pub(super) fn sub_bytes(&self, n: u64) {
        let _ = self
            .metrics
            .cache_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            });
    }

    pub fn bytes(&self) -> u64 {
        self.metrics.cache_bytes.load(Ordering::Relaxed)
    }

    pub fn entries(&self) -> usize {
        self.index
            .cache_entries()
            .all()
            .map(|e| e.len())
            .unwrap_or_default()
    }
}

impl Drop for ContentCache {
    /// Access times still batched in memory are written on the way out:
    /// without this, reads in the seconds before a shutdown were lost, and
    /// `graft cache gc` right after evicted what had just been pulled.
    fn drop(&mut self) {
        let batch: Vec<(Digest, u64)> = match self.touched.get_mut() {
            Ok(map) => map.drain().collect(),
            Err(poisoned) => poisoned.into_inner().drain().collect(),
        };
        if batch.is_empty() {
            return;
        }
        // Best effort: the index logs and counts a failed write itself.
        self.index.cache_entries().touch(&batch);
    }
}

/// Runs the cache's upkeep — batched access times and eviction — until
/// `shutdown` turns `true` or its sender is dropped.
pub async fn upkeep(cache: Arc<ContentCache>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
                continue;
            }
        }
        let c = cache.clone();
        let _ = tokio::task::spawn_blocking(move || {
            c.flush_touches();
            c.sweep_uploads();
            c.evict();
        })
        .await;
    }
}

/// The one eviction pass running; ends when dropped.
struct Pass<'a>(&'a AtomicBool);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1024;

    /// A cache in a fresh directory with a budget too large to evict on
    /// its own, and the index it records into. Its clock is skewable: tests
    /// move time instead of sleeping.
    fn open_cache(dir: &std::path::Path) -> (Arc<ContentCache>, Index) {
        let index = Index::open(&dir.join("index")).expect("index");
        let cfg = CacheConfig {
            max_bytes: 1 << 30,
            ..crate::Config::default().cache
        };
        let cache = ContentCache::open(dir, index.clone(), Arc::default(), cfg, Clock::skewable())
            .expect("cache");
        (cache, index)
    }

    /// Stores `n` distinct blobs of one KiB, oldest first, each accessed a
    /// few milliseconds after the previous one.
    async fn fill(cache: &Arc<ContentCache>, n: u8) -> Vec<Digest> {
        let mut out = Vec::new();
        for i in 0..n {
            let bytes = bytes::Bytes::from(vec![i; KIB]);
            let d = Digest::sha256_of(&bytes);
            cache.store_bytes(&d, bytes, None).await;
            out.push(d);
            cache.clock.advance(std::time::Duration::from_millis(3));
        }
        out
    }

    #[tokio::test]
    async fn gc_removes_least_recently_used_files_until_within_the_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, _index) = open_cache(dir.path());
        let d = fill(&cache, 4).await;
        // A read of the oldest, still batched in memory, makes it the newest.
        cache.touch(&d[0]);

        assert!(cache.gc(4 * KIB as u64).expect("gc").is_empty());
        let removed: Vec<Digest> = cache
            .gc(2 * KIB as u64)
            .expect("gc")
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(removed, vec![d[1].clone(), d[2].clone()]);
        assert_eq!(cache.bytes(), 2 * KIB as u64);
        assert!(cache.store.contains(&d[0]) && cache.store.contains(&d[3]));
        assert!(!cache.store.contains(&d[1]) && !cache.store.contains(&d[2]));
        assert_eq!(cache.entries(), 2);
    }

    #[tokio::test]
    async fn stats_compare_the_index_with_the_files_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, index) = open_cache(dir.path());
        assert_eq!(
            cache.stats().expect("stats"),
            CacheStats {
                max_bytes: 1 << 30,
                ..CacheStats::default()
            }
        );
        let d = fill(&cache, 3).await;
        let first = index
            .cache_entries()
            .get(&d[0])
            .expect("read")
            .expect("entry");
        let last = index
            .cache_entries()
            .get(&d[2])
            .expect("read")
            .expect("entry");
        let s = cache.stats().expect("stats");
        assert_eq!((s.entries, s.entry_bytes), (3, 3 * KIB as u64));
        assert_eq!((s.files, s.file_bytes), (3, 3 * KIB as u64));
        assert_eq!(s.bytes_in_use, 3 * KIB as u64);
        assert_eq!(s.oldest_access_ms, Some(first.last_access_ms));
        assert_eq!(s.newest_access_ms, Some(last.last_access_ms));
    }

    #[tokio::test]
    async fn verify_removes_corrupt_files_with_their_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, index) = open_cache(dir.path());
        let d = fill(&cache, 3).await;
        std::fs::write(cache.store.path_of(&d[1]), vec![9u8; KIB]).expect("corrupt");
        let mut seen = Vec::new();
        let report = cache
            .verify_each(|d, size| seen.push((d.clone(), size)))
            .expect("verify");
        assert_eq!((report.checked, report.bytes), (3, 3 * KIB as u64));
        assert_eq!(report.corrupt, vec![(d[1].clone(), KIB as u64)]);
        assert!(report.unreadable.is_empty());
        assert_eq!(seen.len(), 3);
        assert!(!cache.store.contains(&d[1]));
        assert_eq!(index.cache_entries().get(&d[1]).expect("read"), None);
        assert_eq!(cache.bytes(), 2 * KIB as u64);
        assert_eq!(cache.verify_all().expect("verify"), (2, vec![]));
    }

    #[tokio::test]
    async fn batched_access_times_are_written_when_the_cache_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, index) = open_cache(dir.path());
        let d = fill(&cache, 1).await;
        let stored = index
            .cache_entries()
            .get(&d[0])
            .expect("read")
            .expect("entry");
        cache.clock.advance(std::time::Duration::from_millis(3));
        cache.touch(&d[0]);
        drop(cache);
        let after = index
            .cache_entries()
            .get(&d[0])
            .expect("read")
            .expect("entry");
        assert!(after.last_access_ms > stored.last_access_ms);
    }
}
