//! `graft cache stats`, `graft cache gc` and `graft cache verify`: the
//! content cache of a data directory, inspected and maintained offline.
//!
//! They open the data directory themselves — the sled index first, then the
//! store — and sled admits one process per index: while `graft serve` runs
//! on the same directory they fail with [`IndexError::Locked`] instead of
//! waiting. The order matters beyond the message: opening the store empties
//! `blobs/tmp/`, which would pull the temp files from under a running
//! graft's fills.
//!
//! The files are the truth and the index follows them: opening the cache
//! gives every file an entry and drops entries without a file, so a
//! removal here whose index update is lost in a crash is put right at the
//! next open.
//!
//! `graft cache warm`, which needs a running graft, is in [`super::warm`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;

use super::{Outcome, Progress, Unit};
use crate::cache::{CacheError, CacheStats, ContentCache, VerifyReport};
use crate::config::Config;
use crate::index::{CacheEntry, Index, IndexError};
use crate::oci::Digest;

/// A reason a cache command could not run.
#[derive(Debug, thiserror::Error)]
pub enum CacheCommandError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("no graft data directory at {0} (set --data-dir or storage.data_dir)")]
    NoDataDir(String),
}

/// Opens the index (failing at once when a running graft holds it), then
/// the cache.
fn open(config: &Config) -> Result<Arc<ContentCache>, CacheCommandError> {
    let dir = &config.storage.data_dir;
    // A mistyped --data-dir would otherwise be created and reported empty.
    if !dir.join("index").is_dir() {
        return Err(CacheCommandError::NoDataDir(dir.display().to_string()));
    }
    let index = Index::open(&dir.join("index"))?;
    Ok(ContentCache::open(
        dir,
        index,
        Arc::default(),
        config.cache.clone(),
        config.clock.clone(),
    )?)
}

/// Like [`open`], also on a full disk (sled writes when it opens), so
/// `gc`, `stats` and `verify` run there:
/// the index is read from a copy in a scratch directory of the system's
/// temp dir, files are deleted from the real store, and the real index
/// drops the entries of the deleted files when it next opens (the cache
/// reconciles its entries with the files at every open).
fn open_even_full(
    config: &Config,
) -> Result<(Arc<ContentCache>, Option<Scratch>), CacheCommandError> {
    match open(config) {
        Err(CacheCommandError::Index(e)) if e.is_no_space() => {
            let dir = &config.storage.data_dir;
            let scratch = Scratch(std::env::temp_dir().join(format!(
                "graft-gc-index-{}-{}",
                std::process::id(),
                config.clock.now_millis()
            )));
            eprintln!(
                "{}: the disk is full ({e}); reading a copy of the index from {}",
                dir.display(),
                scratch.0.display()
            );
            let index = Index::open_copy(&dir.join("index"), &scratch.0, config.clock.clone())?;
            let cache = ContentCache::open(
                dir,
                index,
                Arc::default(),
                config.cache.clone(),
                config.clock.clone(),
            )?;
            Ok((cache, Some(scratch)))
        }
        other => other.map(|c| (c, None)),
    }
}

/// A scratch directory removed when dropped.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `graft cache stats` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsReport {
    pub stats: CacheStats,
    /// When the report was made (Unix milliseconds), for "… ago".
    pub now_ms: u64,
}

/// Counts the entries and files of the cache under
/// `config.storage.data_dir`.
pub fn stats(config: &Config) -> Result<StatsReport, CacheCommandError> {
    let (cache, scratch) = open_even_full(config)?;
    let report = StatsReport {
        stats: cache.stats()?,
        now_ms: config.clock.now_millis(),
    };
    // The cache (and the index copy it reads) closes before the copy goes.
    drop(cache);
    drop(scratch);
    Ok(report)
}

impl fmt::Display for StatsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(f, "entries: {}", s.entries)?;
        writeln!(
            f,
            "bytes in use: {} ({})",
            s.bytes_in_use,
            human_bytes(s.bytes_in_use)
        )?;
        writeln!(
            f,
            "budget: {} ({}), {:.1}% used",
            s.max_bytes,
            human_bytes(s.max_bytes),
            percent(s.bytes_in_use, s.max_bytes)
        )?;
        for (what, at) in [
            ("oldest access", s.oldest_access_ms),
            ("newest access", s.newest_access_ms),
        ] {
            match at {
                Some(ms) => writeln!(f, "{what}: {}", when(ms, self.now_ms))?,
                None => writeln!(f, "{what}: -")?,
            }
        }
        write!(f, "files on disk: {} ({} bytes)", s.files, s.file_bytes)?;
        // Opening the cache gave every file an entry and dropped entries
        // without a file; sizes that still differ mean changed files.
        if s.files != s.entries || s.file_bytes != s.entry_bytes {
            write!(
                f,
                "\nthe index records {} bytes in {} entries: some files changed on disk \
                 (run `graft cache verify`)",
                s.entry_bytes, s.entries
            )?;
        }
        Ok(())
    }
}

/// What `graft cache gc` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcReport {
    /// Removed files, least recently used first.
    pub removed: Vec<(Digest, CacheEntry)>,
    /// The cache afterwards.
    pub after: CacheStats,
    pub now_ms: u64,
}

impl GcReport {
    /// Whether the cache is within its budget (a file that could not be
    /// removed may keep it above).
    pub fn within_budget(&self) -> bool {
        self.after.bytes_in_use <= self.after.max_bytes
    }

    pub fn removed_bytes(&self) -> u64 {
        self.removed.iter().map(|(_, e)| e.size).sum()
    }
}

/// Evicts least recently used files until the cache under
/// `config.storage.data_dir` fits `config.cache.max_bytes`.
pub fn gc(config: &Config) -> Result<GcReport, CacheCommandError> {
    let (cache, scratch) = open_even_full(config)?;
    let removed = cache.gc(config.cache.max_bytes)?;
    let report = GcReport {
        removed,
        after: cache.stats()?,
        now_ms: config.clock.now_millis(),
    };
    // The cache (and the index copy it reads) closes before the copy goes.
    drop(cache);
    drop(scratch);
    Ok(report)
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (d, e) in &self.removed {
            writeln!(
                f,
                "removed {d}  {} bytes  last access {}",
                e.size,
                when(e.last_access_ms, self.now_ms)
            )?;
        }
        let removed = self.removed_bytes();
        writeln!(
            f,
            "removed: {} files, {removed} bytes ({})",
            self.removed.len(),
            human_bytes(removed)
        )?;
        let a = &self.after;
        write!(
            f,
            "cache: {} entries, {} bytes ({}) of a {} ({}) budget",
            a.entries,
            a.bytes_in_use,
            human_bytes(a.bytes_in_use),
            a.max_bytes,
            human_bytes(a.max_bytes)
        )?;
        if !self.within_budget() {
            write!(
                f,
                "\nstill over budget: some files could not be removed (see the log)"
            )?;
        }
        Ok(())
    }
}

/// What `graft cache verify` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifySummary(pub VerifyReport);

impl VerifySummary {
    /// Every file matched its digest and could be read.
    pub fn is_clean(&self) -> bool {
        self.0.corrupt.is_empty() && self.0.unreadable.is_empty()
    }
}

/// Re-hashes every file of the cache under `config.storage.data_dir`,
/// removing the corrupt ones. `progress` counts bytes re-hashed; pass
/// [`super::Silent`] for none.
pub fn verify(
    config: &Config,
    progress: &dyn Progress,
) -> Result<VerifySummary, CacheCommandError> {
    let verified = verify_all(config, progress);
    // On every path, errors included: a display must stop before the error
    // is shown.
    progress.finish(Outcome::Clear);
    verified
}

fn verify_all(
    config: &Config,
    progress: &dyn Progress,
) -> Result<VerifySummary, CacheCommandError> {
    let (cache, scratch) = open_even_full(config)?;
    let total = cache.stats()?.file_bytes;
    progress.message("verifying");
    progress.count(total, Unit::Bytes);
    let report = cache.verify_each(|_, size| progress.advance(size))?;
    drop(cache);
    drop(scratch);
    Ok(VerifySummary(report))
}

impl fmt::Display for VerifySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.0;
        for (d, size) in &r.corrupt {
            writeln!(f, "corrupt, removed: {d}  {size} bytes")?;
        }
        for (d, why) in &r.unreadable {
            writeln!(f, "unreadable, left in place: {d}: {why}")?;
        }
        writeln!(
            f,
            "checked: {} files, {} bytes ({})",
            r.checked,
            r.bytes,
            human_bytes(r.bytes)
        )?;
        write!(f, "corrupt: {}", r.corrupt.len())?;
        if !r.unreadable.is_empty() {
            write!(f, "\nunreadable: {}", r.unreadable.len())?;
        }
        Ok(())
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    part as f64 * 100.0 / whole as f64
}

/// `3072` as `3.00 KiB`.
pub(super) fn human_bytes(n: u64) -> String {
    format!("{:.2}", ByteSize(n).display().iec())
}

/// `2025-06-01T12:00:00Z (3h 2m ago)`, to the second.
fn when(ms: u64, now_ms: u64) -> String {
    let age = Duration::from_secs(now_ms.saturating_sub(ms) / 1000);
    format!("{} ({} ago)", rfc3339(ms), humantime::format_duration(age))
}

/// Unix milliseconds as an RFC 3339 UTC time, to the second (no calendar
/// crate for one line of output; Howard Hinnant's `civil_from_days`).
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers whether it was finished.
    #[derive(Default)]
    struct Finished(std::sync::atomic::AtomicBool);

    impl Progress for Finished {
        fn finish(&self, _: Outcome<'_>) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn verify_finishes_its_progress_even_when_it_cannot_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.storage.data_dir = dir.path().join("missing");
        let progress = Finished::default();
        let e = verify(&config, &progress).expect_err("no data directory");
        assert!(matches!(e, CacheCommandError::NoDataDir(_)), "{e}");
        assert!(progress.0.load(std::sync::atomic::Ordering::Relaxed));
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_107_542_399_000), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn stats_print_counts_budget_and_ages() {
        let report = StatsReport {
            stats: CacheStats {
                entries: 2,
                entry_bytes: 3072,
                files: 2,
                file_bytes: 3072,
                bytes_in_use: 3072,
                max_bytes: 4096,
                oldest_access_ms: Some(1_700_000_000_000),
                newest_access_ms: Some(1_700_000_060_000),
            },
            now_ms: 1_700_000_120_000,
        };
        assert_eq!(
            report.to_string(),
            "entries: 2\n\
             bytes in use: 3072 (3.00 KiB)\n\
             budget: 4096 (4.00 KiB), 75.0% used\n\
             oldest access: 2023-11-14T22:13:20Z (2m ago)\n\
             newest access: 2023-11-14T22:14:20Z (1m ago)\n\
             files on disk: 2 (3072 bytes)"
        );
        let mut changed = report.clone();
        changed.stats.file_bytes = 3000;
        assert!(changed
            .to_string()
            .ends_with("files on disk: 2 (3000 bytes)\nthe index records 3072 bytes in 2 entries: some files changed on disk (run `graft cache verify`)"));
    }

    #[test]
    fn a_verify_with_a_corrupt_file_is_not_clean() {
        let d = Digest::sha256_of(b"x");
        let mut r = VerifyReport {
            checked: 2,
            bytes: 10,
            ..VerifyReport::default()
        };
        assert!(VerifySummary(r.clone()).is_clean());
        assert_eq!(
            VerifySummary(r.clone()).to_string(),
            "checked: 2 files, 10 bytes (10 B)\ncorrupt: 0"
        );
        r.corrupt.push((d.clone(), 5));
        let s = VerifySummary(r);
        assert!(!s.is_clean());
        assert!(s
            .to_string()
            .starts_with(&format!("corrupt, removed: {d}  5 bytes\n")));
    }
}
