//! The cache as the proxy uses it: the store, the fills in flight, the
//! entries in the index, the byte budget and least-recently-used eviction.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::fill::{Claim, OnCommit};
use super::{CacheError, Fills, Store, Uploads, Writer};
use crate::config::CacheConfig;
use crate::index::{CacheEntry, Index};
use crate::metrics::{self, Metrics};
use crate::oci::Digest;

/// A committed file ready to serve.
pub struct Hit {
    pub file: Arc<File>,
    pub len: u64,
    pub media_type: Option<String>,
}

pub struct ContentCache {
    pub store: Arc<Store>,
    pub fills: Arc<Fills>,
    pub uploads: Uploads,
    index: Index,
    metrics: Arc<Metrics>,
    cfg: CacheConfig,
    /// Last-access times not yet written to the index: the hit path only
    /// touches this map; a background task writes it in batches.
    touched: Mutex<HashMap<Digest, u64>>,
    /// One eviction pass at a time: concurrent passes would pick the same
    /// victims and count their bytes twice.
    evicting: Mutex<()>,
}

pub fn now_secs() -> u64 {
    now_millis() / 1000
}

pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
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
    ) -> Result<Arc<ContentCache>, CacheError> {
        let store = Store::open(data_dir)?;
        let cache = ContentCache {
            store,
            fills: Arc::new(Fills::default()),
            uploads: Uploads::default(),
            index,
            metrics,
            cfg,
            touched: Mutex::new(HashMap::new()),
            evicting: Mutex::new(()),
        };
        cache.reconcile()?;
        Ok(Arc::new(cache))
    }

    fn reconcile(&self) -> Result<(), CacheError> {
        let on_disk: HashMap<Digest, u64> = self.store.list()?.into_iter().collect();
        let entries = self.index.cache_entries().map_err(index_err)?;
        let mut total = 0;
        for (d, _) in &entries {
            if !on_disk.contains_key(d) {
                self.index.remove_cache_entry(d).map_err(index_err)?;
            }
        }
        let known: HashMap<&Digest, &CacheEntry> = entries.iter().map(|(d, e)| (d, e)).collect();
        for (d, size) in &on_disk {
            total += size;
            if !known.contains_key(d) {
                let e = CacheEntry {
                    size: *size,
                    media_type: None,
                    last_access_ms: now_millis(),
                };
                self.index.put_cache_entry(d, &e).map_err(index_err)?;
            }
        }
        self.metrics.cache_bytes.store(total, Ordering::Relaxed);
        Ok(())
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// A committed file for `digest`, opened (so eviction cannot take it
    /// from under the reader).
    pub fn hit(&self, digest: &Digest) -> Option<Hit> {
        let (file, len) = self.store.open_file(digest)?;
        let media_type = self
            .index
            .cache_entry(digest)
            .ok()
            .flatten()
            .and_then(|e| e.media_type);
        Some(Hit {
            file: Arc::new(file),
            len,
            media_type,
        })
    }

    /// Notes a read for LRU without writing to sled now.
    pub fn touch(&self, digest: &Digest) {
        self.touched
            .lock()
            .expect("touch map poisoned")
            .insert(digest.clone(), now_millis());
    }

    pub fn claim(&self, digest: &Digest, repo: &str, cred: [u8; 32]) -> Claim {
        self.fills.claim(digest, repo, cred)
    }

    /// What to do when a fill commits: record the entry, count the bytes,
    /// and evict if the budget is exceeded.
    pub fn on_commit(self: &Arc<Self>) -> OnCommit {
        let me = self.clone();
        Box::new(move |digest: &Digest, len: u64, media_type: Option<&str>| {
            me.record(digest, len, media_type);
            metrics::add(&me.metrics.upstream_bytes_fetched, len);
        })
    }

    fn record(self: &Arc<Self>, digest: &Digest, len: u64, media_type: Option<&str>) {
        let e = CacheEntry {
            size: len,
            media_type: media_type.map(str::to_string),
            last_access_ms: now_millis(),
        };
        let existed = self.index.cache_entry(digest).ok().flatten().is_some();
        if let Err(e) = self.index.put_cache_entry(digest, &e) {
            tracing::error!(%digest, error = %e, "cannot record a cache entry");
        }
        if !existed {
            metrics::add(&self.metrics.cache_bytes, len);
        }
        if self.metrics.cache_bytes.load(Ordering::Relaxed) > self.cfg.max_bytes {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.evict());
        }
    }

    /// Stores content graft already holds whole (a manifest that was
    /// pushed, a verified upload), when it matches `digest`.
    pub async fn store_bytes(
        self: &Arc<Self>,
        digest: &Digest,
        bytes: bytes::Bytes,
        media_type: Option<String>,
    ) {
        if !Store::cacheable(digest) || self.store.contains(digest) {
            return;
        }
        let me = self.clone();
        let d = digest.clone();
        let result = tokio::task::spawn_blocking(move || {
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
    pub async fn commit_upload(self: &Arc<Self>, writer: Writer, digest: &Digest) {
        if self.store.contains(digest) {
            return;
        }
        let me = self.clone();
        let d = digest.clone();
        let result = tokio::task::spawn_blocking(move || {
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
        if let Err(e) = self.index.touch_cache_entries(&batch) {
            tracing::warn!(error = %e, "cannot record cache access times");
        }
    }

    /// Evicts least recently used files until the cache is at 90 % of its
    /// budget (hysteresis: one big blob does not trigger eviction on every
    /// commit). Returns the number of files removed.
    pub fn evict(&self) -> usize {
        let budget = self.cfg.max_bytes;
        let _pass = self.evicting.lock().expect("eviction lock poisoned");
        if self.metrics.cache_bytes.load(Ordering::Relaxed) <= budget {
            return 0;
        }
        self.flush_touches();
        let target = budget / 10 * 9;
        let mut entries = match self.index.cache_entries() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot list cache entries for eviction");
                return 0;
            }
        };
        entries.sort_by_key(|(_, e)| e.last_access_ms);
        let mut removed = 0;
        for (d, e) in entries {
            if self.metrics.cache_bytes.load(Ordering::Relaxed) <= target {
                break;
            }
            // Unlinking leaves open readers their inode: a pull in progress
            // finishes; the next one is a miss.
            if let Ok(true) = self.store.remove(&d) {
                let _ = self.index.remove_cache_entry(&d);
                self.sub_bytes(e.size);
                metrics::inc(&self.metrics.evictions);
                removed += 1;
                tracing::debug!(digest = %d, size = e.size, "evicted");
            }
        }
        removed
    }

    /// Re-hashes every file; corrupt ones are removed. Returns
    /// `(checked, corrupt digests)`.
    pub fn verify_all(&self) -> Result<(usize, Vec<Digest>), CacheError> {
        let mut bad = Vec::new();
        let files = self.store.list()?;
        for (d, size) in &files {
            if !self.store.verify(d)? {
                self.store.remove(d)?;
                let _ = self.index.remove_cache_entry(d);
                self.sub_bytes(*size);
                bad.push(d.clone());
            }
        }
        Ok((files.len(), bad))
    }

    fn sub_bytes(&self, n: u64) {
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
            .map(|e| e.len())
            .unwrap_or_default()
    }
}

fn index_err(e: crate::index::IndexError) -> CacheError {
    CacheError::Io(std::io::Error::other(e.to_string()))
}

/// Runs the cache's upkeep until the process ends: batched access times and
/// eviction.
pub async fn upkeep(cache: Arc<ContentCache>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        let c = cache.clone();
        let _ = tokio::task::spawn_blocking(move || {
            c.flush_touches();
            c.evict();
        })
        .await;
    }
}
