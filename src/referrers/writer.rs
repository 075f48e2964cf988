//! Serializes fallback-tag writes per (repository, tag), and lets a write
//! that already carried a change stand for the writes queued behind it: with
//! 50 concurrent pushes to one subject, the upstream sees a handful of tag
//! writes, not 50.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::oci::RepoName;

type Key = (RepoName, String);

#[derive(Default)]
struct Slot {
    /// Bumped by every change that needs writing (after it is indexed).
    wanted: AtomicU64,
    /// The highest `wanted` value a finished write is known to include.
    written: Arc<tokio::sync::Mutex<u64>>,
}

#[derive(Default)]
pub struct TagWriter {
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
}

/// Held while writing one fallback tag.
pub struct TagGuard {
    slot: Arc<Slot>,
    written: tokio::sync::OwnedMutexGuard<u64>,
}

impl TagWriter {
    fn slot(&self, repo: &RepoName, tag: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("tag writer map poisoned");
        // Drop idle slots past 4096 so the map does not grow with every
        // subject ever written: it holds at most 4096 entries plus those in
        // use right now. Losing an idle one only costs a redundant write.
        if slots.len() > 4096 {
            slots.retain(|_, s| Arc::strong_count(s) > 1);
        }
        slots
            .entry((repo.clone(), tag.to_string()))
            .or_default()
            .clone()
    }

    /// Announces a change to write; call after the change is in the index.
    pub fn want(&self, repo: &RepoName, tag: &str) -> u64 {
        self.slot(repo, tag).wanted.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub async fn lock(&self, repo: &RepoName, tag: &str) -> TagGuard {
        let slot = self.slot(repo, tag);
        let written = slot.written.clone().lock_owned().await;
        TagGuard { slot, written }
    }
}

impl TagGuard {
    /// Whether a finished write already carried change `ticket`.
    pub fn covers(&self, ticket: u64) -> bool {
        *self.written >= ticket
    }

    /// The generation a write starting now will carry: read before reading
    /// the index, so every change announced so far is included.
    pub fn current(&self) -> u64 {
        self.slot.wanted.load(Ordering::SeqCst)
    }

    pub fn done(mut self, generation: u64) {
        if *self.written < generation {
            *self.written = generation;
        }
    }
}
