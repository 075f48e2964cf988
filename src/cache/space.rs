//! Room on disk for fills: the free space of the data directory's file
//! system against `cache.min_free`, and the bytes of fills in flight
//! reserved against both it and `cache.max_bytes`.
//!
//! A fill reserves its declared length before its temp file is created and
//! releases it when it ends, so concurrent fills cannot each see the same
//! free space, and temp files count against the budget while they grow:
//! fills in flight together never exceed `cache.max_bytes`, and committed
//! files are evicted at once to make room for them. A fill that does not
//! fit is not started: its client streams from the upstream uncached, and
//! eviction is started to make room for the next.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::store::free_bytes;
use super::{CacheError, ContentCache};

/// Bytes reserved for one fill in flight; released when dropped.
pub(super) struct Reservation {
    cache: Arc<ContentCache>,
    len: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.cache.reserved.fetch_sub(self.len, Ordering::Relaxed);
    }
}

impl ContentCache {
    /// Reserves room for a fill of `len` bytes (`None`: the upstream did
    /// not say; then only the floor is checked). Blocking: a `statvfs`.
    pub(super) fn reserve(self: &Arc<Self>, len: Option<u64>) -> Result<Reservation, CacheError> {
        let want = len.unwrap_or(0);
        let before = self.reserved.fetch_add(want, Ordering::Relaxed);
        let reservation = Reservation {
            cache: self.clone(),
            len: want,
        };
        let free = free_bytes(self.store.root())?;
        let room = free
            .saturating_sub(before)
            .saturating_sub(self.cfg.min_free);
        if want > room || room == 0 {
            self.evict_soon();
            return Err(CacheError::NoSpace(format!(
                "{want} bytes wanted, {free} free on the data directory's file system, \
                 {before} reserved by fills in flight, cache.min_free {}",
                self.cfg.min_free
            )));
        }
        // Temp files cannot be evicted: fills in flight alone never exceed
        // the budget, and committed files are evicted to make room for them.
        if before + want > self.cfg.max_bytes {
            return Err(CacheError::NoSpace(format!(
                "{want} bytes wanted, {before} reserved by fills in flight, \
                 cache.max_bytes {}",
                self.cfg.max_bytes
            )));
        }
        if self.over_budget() {
            self.evict_soon();
        }
        Ok(reservation)
    }

    /// Bytes reserved by fills in flight (a gauge for `/metrics`).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Whether committed files and fills in flight exceed `cache.max_bytes`.
    pub(super) fn over_budget(&self) -> bool {
        self.bytes() + self.reserved_bytes() > self.cfg.max_bytes
    }

    /// How many bytes must be freed to bring the file system's free space
    /// (less what fills in flight will still write) back to
    /// `cache.min_free`; 0 when it is there, or cannot be measured.
    pub(super) fn free_shortfall(&self) -> u64 {
        match free_bytes(self.store.root()) {
            Ok(free) => self
                .cfg
                .min_free
                .saturating_sub(free.saturating_sub(self.reserved_bytes())),
            Err(e) => {
                tracing::warn!(error = %e, "cannot measure free space on the data directory");
                0
            }
        }
    }

    /// Starts an eviction pass on the blocking pool (a pass already
    /// running makes this one return at once).
    pub(super) fn evict_soon(self: &Arc<Self>) {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.evict());
    }
}
