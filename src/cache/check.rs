//! Cache files are checked before they are trusted: a changed file is
//! dropped and refetched, never served.
//!
//! Hashing every hit would cap hits at sha256's speed (about 2 GB/s per
//! core here, against a page-cache `pread` several times faster), so the
//! check is made once per open file instead: its length against the size
//! the index recorded, and its seal (see `store.rs`) — a file anything
//! wrote to or truncated since graft committed it is no longer sealed, and
//! is re-hashed before it is served. Files opened for hits stay open (the
//! store's open-file cache), so a hot file is checked once, not per hit.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{ContentCache, Store};
use crate::oci::Digest;

impl ContentCache {
    /// Opens the committed file of `digest` for a hit, checked (blocking:
    /// file and sled I/O). A file that fails its check is removed with its
    /// entry, counted and logged; the caller then has a miss.
    pub(super) fn open_checked(&self, digest: &Digest) -> Option<(Arc<File>, u64)> {
        let opened = self.store.open_file(digest)?;
        // A file committed this instant may not be recorded yet: its seal
        // vouches for it.
        let recorded = match self.index.cache_entries().get(digest) {
            Ok(e) => e.map(|e| e.size),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot read a cache entry; checking the file's bytes");
                None
            }
        };
        let problem = match recorded {
            Some(size) if size != opened.len => Some(format!(
                "{} bytes on disk, {size} recorded when it was cached",
                opened.len
            )),
            _ if opened.sealed => None,
            _ => match Store::hash_matches(&opened.file, digest) {
                Ok(true) => {
                    // Verified: sealed again, so the next open trusts it.
                    if let Err(e) = Store::seal(&opened.file) {
                        tracing::debug!(%digest, error = %e, "cannot seal a verified cache file");
                    }
                    None
                }
                Ok(false) => Some("its bytes do not match its digest".to_string()),
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "cannot read a cache file; not serving it");
                    return None;
                }
            },
        };
        if let Some(why) = problem {
            self.drop_corrupt(digest, recorded.unwrap_or(opened.len), &why);
            return None;
        }
        self.store
            .keep_open(digest, opened.file.clone(), opened.len);
        Some((opened.file, opened.len))
    }

    /// Removes a changed file and its entry (blocking), with a warning and
    /// `graft_cache_corrupt_total`; `size` is what its entry counted.
    pub(super) fn drop_corrupt(&self, digest: &Digest, size: u64, why: &str) {
        tracing::warn!(%digest, why, "a cache file was changed behind graft's back; dropped, to be fetched again");
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.store.remove(digest) {
            tracing::error!(%digest, error = %e, "cannot remove a changed cache file");
            return;
        }
        self.index.cache_entries().remove(digest);
        self.sub_bytes(size);
    }

    /// Changed cache files found and dropped since startup (a counter for
    /// `/metrics`).
    pub fn corrupt_found(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }
}
