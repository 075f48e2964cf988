//! Background pruning of the trees that grow with traffic: `present`,
//! `access`, `tags`, `tombstones`, `rejected`, `fallback_seen`, `native_answers`. Each has a
//! maximum age (judged by the stamp in its values) and a maximum count
//! (beyond it the oldest go first). Owed work (intents, owed tag writes)
//! and the referrers themselves are never pruned.
//!
//! Every entry pruned here is a memory of something graft can ask again:
//! losing one costs an upstream round trip, never a wrong answer — as long
//! as the bounds respect the floors [`PruneBounds::from_config`] enforces.

use std::time::Duration;

use tokio::sync::watch;

use super::{stamp_of, tags, Index};
use crate::clock::Clock;
use crate::config::{Config, TreeBounds};

/// The bounds of every pruned tree, and how often pruning runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneBounds {
    pub interval: Duration,
    pub present: TreeBounds,
    pub access: TreeBounds,
    pub tags: TreeBounds,
    pub tombstones: TreeBounds,
    pub rejected: TreeBounds,
    pub fallback_seen: TreeBounds,
    pub native_answers: TreeBounds,
}

/// What pruning one tree did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreePruned {
    tree: &'static str,
    by_age: usize,
    by_count: usize,
    kept: usize,
}

impl TreePruned {
    pub fn tree(&self) -> &'static str {
        self.tree
    }

    /// Entries removed for being older than the tree's maximum age.
    pub fn by_age(&self) -> usize {
        self.by_age
    }

    /// Entries removed, oldest first, to get under the maximum count.
    pub fn by_count(&self) -> usize {
        self.by_count
    }

    /// Entries left.
    pub fn kept(&self) -> usize {
        self.kept
    }
}

/// What one pruning pass did, tree by tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    trees: Vec<TreePruned>,
}

impl PruneReport {
    /// Entries removed, all trees together.
    pub fn removed(&self) -> usize {
        self.trees.iter().map(|t| t.by_age + t.by_count).sum()
    }

    pub fn trees(&self) -> &[TreePruned] {
        &self.trees
    }

    pub fn tree(&self, name: &str) -> Option<&TreePruned> {
        self.trees.iter().find(|t| t.tree == name)
    }
}

impl PruneBounds {
    /// The configured bounds, raised where a shorter one would break what
    /// the cache promises: presence and remembered yeses must last
    /// `cache.max_stale` (offline pulls), tag records `max(cache.tag_ttl,
    /// cache.max_stale)` (stale tag pulls), tombstones and rejections ten
    /// `referrers.tag_ttl` (a stale fallback tag seen within one TTL must
    /// not resurrect or recheck them).
    pub fn from_config(config: &Config) -> PruneBounds {
        let ix = &config.index;
        let stale = config.cache.max_stale;
        let tag_floor = config.cache.tag_ttl.max(stale);
        let ref_floor = config.referrers.tag_ttl.saturating_mul(10);
        let at_least = |b: TreeBounds, floor: Duration| TreeBounds {
            max_age: b.max_age.max(floor),
            ..b
        };
        PruneBounds {
            interval: ix.prune_interval,
            present: at_least(ix.present, stale),
            access: at_least(ix.access, stale),
            tags: at_least(ix.tags, tag_floor),
            tombstones: at_least(ix.tombstones, ref_floor),
            rejected: at_least(ix.rejected, ref_floor),
            fallback_seen: ix.fallback_seen,
            native_answers: at_least(ix.native_answers, config.referrers.max_stale),
        }
    }

    /// The same bounds for every tree (tests).
    pub fn uniform(max_age: Duration, max_entries: usize) -> PruneBounds {
        let b = TreeBounds {
            max_age,
            max_entries,
        };
        PruneBounds {
            interval: Duration::from_secs(600),
            present: b,
            access: b,
            tags: b,
            tombstones: b,
            rejected: b,
            fallback_seen: b,
            native_answers: b,
        }
    }
}

impl Index {
    /// One pruning pass at `now_secs`. Blocking (scans whole trees): run it
    /// on the blocking pool. A tree that fails is logged and skipped; the
    /// others are still pruned.
    pub fn prune(&self, bounds: &PruneBounds, now_secs: u64) -> PruneReport {
        let r = self.referrers();
        let trees: [(&'static str, &sled::Tree, TreeBounds, Stamp); 7] = [
            ("present", self.present().tree(), bounds.present, stamp_of),
            ("access", self.access().tree(), bounds.access, stamp_of),
            ("tags", self.tags().tree(), bounds.tags, tags::checked_of),
            (
                "tombstones",
                r.tombstones_tree(),
                bounds.tombstones,
                stamp_of,
            ),
            ("rejected", r.rejected_tree(), bounds.rejected, stamp_of),
            (
                "fallback_seen",
                r.fallback_seen_tree(),
                bounds.fallback_seen,
                stamp_of,
            ),
            (
                "native_answers",
                self.native_answers().tree(),
                bounds.native_answers,
                stamp_of,
            ),
        ];
        let mut report = PruneReport::default();
        for (name, tree, b, stamp) in trees {
            match prune_tree(tree, b, stamp, now_secs) {
                Ok(mut p) => {
                    p.tree = name;
                    self.shared.pruned.fetch_add(
                        (p.by_age + p.by_count) as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    report.trees.push(p);
                }
                Err(e) => tracing::warn!(tree = name, error = %e, "cannot prune index tree"),
            }
        }
        // What memory remembers of the pruned trees must not outlive them.
        self.present().forget_memo();
        self.tags().forget_memo();
        report
    }
}

/// Reads the stamp of a value; `None` (unreadable) counts as oldest.
type Stamp = fn(&[u8]) -> Option<u64>;

fn prune_tree(
    tree: &sled::Tree,
    b: TreeBounds,
    stamp: Stamp,
    now_secs: u64,
) -> Result<TreePruned, sled::Error> {
    let mut pruned = TreePruned::default();
    // Only the stamps of what stays are kept (8 bytes an entry, not the
    // keys): a million-entry tree costs 8 MB for one pass.
    let mut kept = Vec::new();
    for kv in tree.iter() {
        let (k, v) = kv?;
        let at = stamp(&v).unwrap_or(0);
        if now_secs.saturating_sub(at) >= b.max_age.as_secs() {
            pruned.by_age += remove_unchanged(tree, k, v)?;
        } else {
            kept.push(at);
        }
    }
    if kept.len() > b.max_entries {
        let excess = kept.len() - b.max_entries;
        pruned.by_count = evict_oldest(tree, stamp, &mut kept, excess)?;
    }
    pruned.kept = kept.len() - pruned.by_count;
    Ok(pruned)
}

/// Removes the `excess` oldest entries, given every entry's stamp: a second
/// pass takes all below the cut-off stamp and as many at it as needed.
fn evict_oldest(
    tree: &sled::Tree,
    stamp: Stamp,
    stamps: &mut [u64],
    excess: usize,
) -> Result<usize, sled::Error> {
    let (_, cutoff, _) = stamps.select_nth_unstable(excess - 1);
    let cutoff = *cutoff;
    let below = stamps.iter().filter(|s| **s < cutoff).count();
    let mut at_cutoff = excess - below;
    let mut removed = 0;
    for kv in tree.iter() {
        let (k, v) = kv?;
        let at = stamp(&v).unwrap_or(0);
        if at < cutoff || (at == cutoff && at_cutoff > 0) {
            if at == cutoff {
                at_cutoff -= 1;
            }
            removed += remove_unchanged(tree, k, v)?;
        }
    }
    Ok(removed)
}

/// Removes `k` only if it still holds `v`: an entry rewritten since the
/// scan is fresh again and stays.
fn remove_unchanged(tree: &sled::Tree, k: sled::IVec, v: sled::IVec) -> Result<usize, sled::Error> {
    Ok(match tree.compare_and_swap(k, Some(v), None::<&[u8]>)? {
        Ok(()) => 1,
        Err(_) => 0,
    })
}

/// Prunes every `bounds.interval` on the blocking pool until `shutdown`
/// turns true (or its sender is dropped).
pub(crate) async fn prune_periodically(
    index: Index,
    bounds: PruneBounds,
    clock: Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(bounds.interval) => {}
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
                continue;
            }
        }
        let (ix, b, now) = (index.clone(), bounds.clone(), clock.now_secs());
        match tokio::task::spawn_blocking(move || ix.prune(&b, now)).await {
            Ok(report) if report.removed() > 0 => {
                tracing::info!(removed = report.removed(), ?report, "index pruned")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "index pruning task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{test_support::desc, TagRecord};
    use crate::oci::{Digest, RepoName};

    const DAY: u64 = 86_400;

    fn fill(ix: &Index, a: &RepoName, n: u8) {
        let s = Digest::sha256_of(b"s");
        for i in 0..n {
            let d = desc(i).digest;
            ix.present().mark(a, &d);
            ix.access().remember(a, &[i; 32], ix.clock().now_secs());
            let r = TagRecord {
                digest: d.clone(),
                media_type: None,
                checked: ix.clock().now_secs(),
            };
            ix.tags().set(a, &format!("t{i}"), &r);
            ix.referrers().add(a, &s, &desc(i)).expect("add");
            ix.referrers().remove_referrer(a, &d).expect("tombstone");
            ix.referrers().reject(a, &s, &d);
            ix.referrers()
                .set_fallback_seen(a, &Digest::sha256_of(&[i]), "sha256:x");
        }
    }

    #[test]
    fn entries_older_than_the_bound_are_pruned_and_owed_work_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Clock::skewable();
        let ix = Index::open_with(
            dir.path(),
            clock.clone(),
            crate::config::DEFAULT_INDEX_CACHE_BYTES,
        )
        .expect("open");
        let a = RepoName::parse("a").expect("name");
        let s = Digest::sha256_of(b"s");
        fill(&ix, &a, 3);
        ix.referrers().add(&a, &s, &desc(9)).expect("add");
        ix.intents().add_intent(&a, &s, &desc(8)).expect("intent");
        ix.intents().owe_tag_write(&a, &s).expect("owe");
        let t0 = clock.now_secs();
        let bounds = PruneBounds::uniform(Duration::from_secs(DAY), 100);
        assert_eq!(ix.prune(&bounds, t0 + DAY - 1).removed(), 0);
        let report = ix.prune(&bounds, t0 + DAY);
        for tree in [
            "present",
            "access",
            "tags",
            "tombstones",
            "rejected",
            "fallback_seen",
        ] {
            let t = report.tree(tree).expect("tree pruned");
            assert_eq!((t.by_age, t.by_count, t.kept), (3, 0, 0), "{tree}");
        }
        assert_eq!(ix.pruned(), 18);
        assert!(!ix.present().contains(&a, &desc(0).digest).expect("read"));
        assert_eq!(ix.referrers().list(&a, &s).expect("list"), vec![desc(9)]);
        assert_eq!(ix.intents().push_intents().expect("intents").len(), 1);
        assert_eq!(ix.intents().owed_tag_writes().expect("owed").len(), 1);
    }

    #[test]
    fn beyond_the_count_bound_the_oldest_go_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Clock::skewable();
        let ix = Index::open_with(
            dir.path(),
            clock.clone(),
            crate::config::DEFAULT_INDEX_CACHE_BYTES,
        )
        .expect("open");
        let a = RepoName::parse("a").expect("name");
        for i in 0..5u8 {
            ix.present().mark(&a, &desc(i).digest);
            clock.advance(Duration::from_secs(10));
        }
        // Entry 1 is marked again: now the newest.
        ix.present().mark(&a, &desc(1).digest);
        let bounds = PruneBounds::uniform(Duration::from_secs(DAY), 3);
        let report = ix.prune(&bounds, clock.now_secs());
        let t = report.tree("present").expect("present");
        assert_eq!((t.by_age, t.by_count, t.kept), (0, 2, 3));
        let left: Vec<bool> = (0..5u8)
            .map(|i| ix.present().contains(&a, &desc(i).digest).expect("read"))
            .collect();
        assert_eq!(left, vec![false, true, false, true, true]);
    }

    #[test]
    fn entries_stamped_in_the_same_second_are_cut_to_the_exact_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Clock::skewable();
        let ix = Index::open_with(
            dir.path(),
            clock.clone(),
            crate::config::DEFAULT_INDEX_CACHE_BYTES,
        )
        .expect("open");
        let a = RepoName::parse("a").expect("name");
        for i in 0..5u8 {
            ix.present().mark(&a, &desc(i).digest);
        }
        let bounds = PruneBounds::uniform(Duration::from_secs(DAY), 3);
        let t = ix.prune(&bounds, clock.now_secs());
        let t = t.tree("present").expect("present");
        assert_eq!((t.by_age(), t.by_count(), t.kept()), (0, 2, 3));
        let left = (0..5u8)
            .filter(|i| ix.present().contains(&a, &desc(*i).digest).expect("read"))
            .count();
        assert_eq!(left, 3);
    }

    #[test]
    fn configured_bounds_never_undercut_what_the_cache_promises() {
        let mut c = Config::default();
        c.cache.max_stale = Duration::from_secs(7 * DAY);
        c.index.access.max_age = Duration::from_secs(DAY);
        c.index.present.max_age = Duration::from_secs(30 * DAY);
        c.referrers.tag_ttl = Duration::from_secs(DAY);
        c.index.tombstones.max_age = Duration::from_secs(DAY);
        let b = PruneBounds::from_config(&c);
        assert_eq!(b.access.max_age, Duration::from_secs(7 * DAY));
        assert_eq!(b.present.max_age, Duration::from_secs(30 * DAY));
        assert_eq!(b.tombstones.max_age, Duration::from_secs(10 * DAY));
    }

    #[tokio::test]
    async fn the_pruning_loop_prunes_every_interval_by_the_given_clock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Clock::skewable();
        let ix = Index::open_with(
            dir.path(),
            clock.clone(),
            crate::config::DEFAULT_INDEX_CACHE_BYTES,
        )
        .expect("open");
        let a = RepoName::parse("a").expect("name");
        ix.present().mark(&a, &desc(1).digest);
        clock.advance(Duration::from_secs(2 * DAY));
        let (tx, rx) = watch::channel(false);
        let mut bounds = PruneBounds::uniform(Duration::from_secs(DAY), 100);
        bounds.interval = Duration::from_millis(20);
        let task = tokio::spawn(prune_periodically(ix.clone(), bounds, clock, rx));
        // Waits for the pass's effect (it runs on the blocking pool).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while ix.pruned() == 0 {
            assert!(std::time::Instant::now() < deadline, "no pruning pass ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!ix.present().contains(&a, &desc(1).digest).expect("read"));
        tx.send(true).expect("send");
        task.await.expect("loop ended");
    }

    #[tokio::test]
    async fn the_pruning_loop_stops_on_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(prune_periodically(
            ix,
            PruneBounds::uniform(Duration::from_secs(DAY), 1),
            Clock::system(),
            rx,
        ));
        tx.send(true).expect("send");
        task.await.expect("loop ended");
    }
}
