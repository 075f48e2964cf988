//! What the status page (`GET /`, `GET /-/status.json`) shows, and the few
//! things graft keeps only for it: the last upstream probe, the last
//! errors graft answered with, and counts of what the index holds.
//!
//! Every figure on the page is read back from the `/metrics` exposition
//! ([`Snapshot::read`] parses [`crate::metrics::Metrics::render`]), so the
//! page and a Prometheus scrape cannot disagree: what the page adds is
//! registered as metrics too ([`Board::register_metrics`]).
//!
//! The page is as open as `/metrics` and shows no more: aggregate figures,
//! the upstream's origin, and for each recent error its time, request id,
//! route kind, status, code and the message the client was given (never a
//! path, repository, digest or credential).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::error::Blame;
use crate::index::{Index, IndexError};
use crate::metrics::Metrics;

/// Errors kept for the page: enough to see a pattern, bounded by design.
pub(crate) const RECENT_ERRORS: usize = 20;

/// Index counts are recounted at most this often: counting walks the
/// referrers tree, and a page refresh or a scrape must not do it each time.
const RECOUNT_AFTER: Duration = Duration::from_secs(5);

/// What [`crate::error::Error::into_response`] tells the status page about
/// an error it answered with, carried on the response's extensions.
#[derive(Clone, Debug)]
pub(crate) struct ErrorNote {
    pub(crate) status: u16,
    pub(crate) code: &'static str,
    /// The message the client was given (its public text: no causes).
    pub(crate) message: String,
    pub(crate) request_id: String,
    pub(crate) blame: Blame,
}

/// One recent error, as the page shows it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ErrorEntry {
    /// RFC 3339, UTC, to the second.
    pub(crate) time: String,
    pub(crate) request_id: String,
    /// The route kind (`blob`, `manifest`, …), never the path.
    pub(crate) route: &'static str,
    pub(crate) status: u16,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

/// The last upstream probe (`/readyz` or the status page's own).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ProbeResult {
    /// RFC 3339, UTC, to the second.
    pub(crate) checked_at: String,
    /// The upstream answered `/v2/` at all (a 401 counts: it is there).
    pub(crate) healthy: bool,
    /// The status it answered, if it did.
    pub(crate) status: Option<u16>,
    /// Round trip to the answer's head, in milliseconds.
    pub(crate) rtt_ms: f64,
    /// Why it is not healthy, in words safe to show (no addresses).
    pub(crate) problem: Option<String>,
}

/// State the status page keeps beside the metrics, shared by the server's
/// access-log layer (which records errors) and the handlers.
#[derive(Default)]
pub(crate) struct Board {
    errors: Mutex<VecDeque<ErrorEntry>>,
    probe: Mutex<Option<ProbeResult>>,
    /// `1` while the last probe found the upstream answering.
    upstream_up: AtomicU64,
    /// The last probe's round trip, in microseconds.
    probe_rtt_us: AtomicU64,
    counts: IndexCounts,
}

#[derive(Default)]
struct IndexCounts {
    subjects: AtomicU64,
    referrers: AtomicU64,
    owed_tag_writes: AtomicU64,
    pending_intents: AtomicU64,
    counted_at: Mutex<Option<Instant>>,
}

impl Board {
    /// Records an error graft answered with, when it is the upstream's or
    /// graft's own (a client's mistake is the client's to see, not noise
    /// for the operator).
    pub(crate) fn record_error(&self, route: &'static str, note: &ErrorNote) {
        if note.blame == Blame::Client {
            return;
        }
        let entry = ErrorEntry {
            time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            request_id: note.request_id.clone(),
            route,
            status: note.status,
            code: note.code,
            message: note.message.clone(),
        };
        let mut errors = self.errors.lock().expect("status errors poisoned");
        if errors.len() == RECENT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(entry);
    }

    /// The recent errors, newest first.
    pub(crate) fn recent_errors(&self) -> Vec<ErrorEntry> {
        let errors = self.errors.lock().expect("status errors poisoned");
        errors.iter().rev().cloned().collect()
    }

    pub(crate) fn record_probe(&self, probe: ProbeResult) {
        self.upstream_up
            .store(u64::from(probe.healthy), Ordering::Relaxed);
        self.probe_rtt_us
            .store((probe.rtt_ms * 1000.0) as u64, Ordering::Relaxed);
        *self.probe.lock().expect("status probe poisoned") = Some(probe);
    }

    pub(crate) fn last_probe(&self) -> Option<ProbeResult> {
        self.probe.lock().expect("status probe poisoned").clone()
    }

    /// Recounts what the index holds unless it was counted in the last
    /// few seconds; on the blocking pool. A failed count keeps the last.
    pub(crate) async fn recount(&self, index: &Index) {
        {
            let mut at = self.counts.counted_at.lock().expect("counts poisoned");
            if at.is_some_and(|t| t.elapsed() < RECOUNT_AFTER) {
                return;
            }
            *at = Some(Instant::now());
        }
        let counted = index
            .blocking(|i| -> Result<_, IndexError> {
                let (subjects, referrers) = i.referrers().counts()?;
                let (pending, owed) = i.intents().counts()?;
                Ok((subjects, referrers, pending, owed))
            })
            .await;
        match counted {
            Ok((subjects, referrers, pending, owed)) => {
                let c = &self.counts;
                c.subjects.store(subjects, Ordering::Relaxed);
                c.referrers.store(referrers, Ordering::Relaxed);
                c.pending_intents.store(pending, Ordering::Relaxed);
                c.owed_tag_writes.store(owed, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "cannot count the index for the status page"),
        }
    }

    /// Exposes what only the board knows as metrics, so the page can read
    /// every figure from `/metrics`.
    pub(crate) fn register_metrics(self: &Arc<Self>, metrics: &Metrics) {
        type Read = fn(&Board) -> u64;
        let gauges: [(&'static str, &'static str, Read); 6] = [
            (
                "graft_upstream_up",
                "1 when the last probe of the upstream's /v2/ got an answer (readyz, status page).",
                |b| b.upstream_up.load(Ordering::Relaxed),
            ),
            (
                "graft_upstream_probe_rtt_microseconds",
                "Round trip of the last probe of the upstream's /v2/.",
                |b| b.probe_rtt_us.load(Ordering::Relaxed),
            ),
            (
                "graft_referrers_subjects_indexed",
                "Subjects (repository, digest) with referrers in the index, counted at most every 5 s.",
                |b| b.counts.subjects.load(Ordering::Relaxed),
            ),
            (
                "graft_referrers_indexed",
                "Referrers in the index, counted at most every 5 s.",
                |b| b.counts.referrers.load(Ordering::Relaxed),
            ),
            (
                "graft_referrers_owed_tag_writes",
                "Fallback-tag writes owed to the upstream, counted at most every 5 s.",
                |b| b.counts.owed_tag_writes.load(Ordering::Relaxed),
            ),
            (
                "graft_referrers_pending_intents",
                "Referrer pushes and deletes recorded but not yet settled (recovery finishes them), counted at most every 5 s.",
                |b| b.counts.pending_intents.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, read) in gauges {
            // Weak: the metrics outlive nothing, but a strong reference
            // from the registry back to the board would never be dropped.
            let b = Arc::downgrade(self);
            metrics.register_gauge_fn(name, help, move || b.upgrade().map_or(0, |b| read(&b)));
        }
    }
}

/// Sample values of a Prometheus text exposition by series (name plus
/// labels as rendered), for reading the page's figures back.
pub(crate) fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Everything the page shows, serialised as `/-/status.json`.
#[derive(Debug, Serialize)]
pub(crate) struct Snapshot {
    pub(crate) version: &'static str,
    pub(crate) generated_at: String,
    pub(crate) upstreams: Vec<UpstreamStatus>,
    pub(crate) cache: CacheStatus,
    pub(crate) referrers: ReferrerStatus,
    pub(crate) recent_errors: Vec<ErrorEntry>,
}

#[derive(Debug, Serialize)]
pub(crate) struct UpstreamStatus {
    /// `scheme://host:port`, as configured (no credentials are ever part
    /// of it: they are separate config keys).
    pub(crate) origin: String,
    pub(crate) probe: Option<ProbeResult>,
    /// `referrers.mode` as configured.
    pub(crate) referrers_mode: &'static str,
    /// Whether the upstream serves the referrers API itself: `native`,
    /// `not native`, or `not yet detected` (`auto` before its first probe).
    pub(crate) referrers_api: &'static str,
}

#[derive(Debug, Serialize)]
pub(crate) struct CacheStatus {
    pub(crate) enabled: bool,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    /// hits / (hits + misses); `None` before the first cacheable request.
    pub(crate) hit_ratio: Option<f64>,
    pub(crate) bytes_from_cache: u64,
    pub(crate) bytes_from_upstream: u64,
    pub(crate) bytes_in_use: u64,
    /// `cache.max_bytes`; `None` when the cache is off.
    pub(crate) max_bytes: Option<u64>,
    pub(crate) evictions: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct ReferrerStatus {
    pub(crate) subjects_indexed: u64,
    pub(crate) referrers_indexed: u64,
    pub(crate) owed_tag_writes: u64,
    pub(crate) pending_intents: u64,
}

/// The metric each figure of the page is read from (the page labels its
/// cells with these names, and the test compares them with `/metrics`).
pub(crate) mod metric {
    pub(crate) const HITS: &str = "graft_cache_hits_total";
    pub(crate) const MISSES: &str = "graft_cache_misses_total";
    pub(crate) const BYTES_FROM_CACHE: &str = "graft_cache_bytes_served_total";
    pub(crate) const BYTES_FROM_UPSTREAM: &str = "graft_upstream_bytes_fetched_total";
    pub(crate) const BYTES_IN_USE: &str = "graft_cache_bytes";
    pub(crate) const MAX_BYTES: &str = "graft_cache_max_bytes";
    pub(crate) const EVICTIONS: &str = "graft_cache_evictions_total";
    pub(crate) const SUBJECTS: &str = "graft_referrers_subjects_indexed";
    pub(crate) const REFERRERS: &str = "graft_referrers_indexed";
    pub(crate) const OWED: &str = "graft_referrers_owed_tag_writes";
    pub(crate) const INTENTS: &str = "graft_referrers_pending_intents";
}

/// What the snapshot needs besides the metrics.
pub(crate) struct Context<'a> {
    pub(crate) origin: &'a str,
    pub(crate) referrers_mode: &'static str,
    pub(crate) native: Option<bool>,
    pub(crate) cache_enabled: bool,
    pub(crate) board: &'a Board,
}

impl Snapshot {
    /// Reads the page's figures from `exposition` (the `/metrics` text).
    pub(crate) fn read(exposition: &str, cx: &Context<'_>) -> Snapshot {
        let s = samples(exposition);
        let get = |name: &str| s.get(name).map_or(0, |v| *v as u64);
        let (hits, misses) = (get(metric::HITS), get(metric::MISSES));
        let hit_ratio = (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64);
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            generated_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            upstreams: vec![UpstreamStatus {
                origin: cx.origin.to_string(),
                probe: cx.board.last_probe(),
                referrers_mode: cx.referrers_mode,
                referrers_api: match cx.native {
                    Some(true) => "native",
                    Some(false) => "not native",
                    None => "not yet detected",
                },
            }],
            cache: CacheStatus {
                enabled: cx.cache_enabled,
                hits,
                misses,
                hit_ratio,
                bytes_from_cache: get(metric::BYTES_FROM_CACHE),
                bytes_from_upstream: get(metric::BYTES_FROM_UPSTREAM),
                bytes_in_use: get(metric::BYTES_IN_USE),
                max_bytes: s.get(metric::MAX_BYTES).map(|v| *v as u64),
                evictions: get(metric::EVICTIONS),
            },
            referrers: ReferrerStatus {
                subjects_indexed: get(metric::SUBJECTS),
                referrers_indexed: get(metric::REFERRERS),
                owed_tag_writes: get(metric::OWED),
                pending_intents: get(metric::INTENTS),
            },
            recent_errors: cx.board.recent_errors(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(n: usize, blame: Blame) -> ErrorNote {
        ErrorNote {
            status: 502,
            code: "UNAVAILABLE",
            message: format!("upstream registry unreachable {n}"),
            request_id: format!("req-{n}"),
            blame,
        }
    }

    #[test]
    fn the_error_ring_keeps_the_newest_and_skips_client_mistakes() {
        let board = Board::default();
        for n in 0..RECENT_ERRORS + 5 {
            board.record_error("blob", &note(n, Blame::Upstream));
        }
        board.record_error("manifest", &note(999, Blame::Client));
        let errors = board.recent_errors();
        assert_eq!(errors.len(), RECENT_ERRORS);
        assert_eq!(errors[0].request_id, format!("req-{}", RECENT_ERRORS + 4));
        assert_eq!(errors[RECENT_ERRORS - 1].request_id, "req-5");
        assert!(errors.iter().all(|e| e.route == "blob"));
    }

    #[test]
    fn figures_are_read_from_the_exposition() {
        let metrics = Metrics::default();
        let board = Arc::new(Board::default());
        board.register_metrics(&metrics);
        crate::metrics::add(&metrics.cache_hits, 3);
        crate::metrics::inc(&metrics.cache_misses);
        crate::metrics::add(&metrics.cache_bytes_served, 4096);
        board.counts.referrers.store(7, Ordering::Relaxed);
        let cx = Context {
            origin: "http://127.0.0.1:5000",
            referrers_mode: "auto",
            native: None,
            cache_enabled: true,
            board: &board,
        };
        let snap = Snapshot::read(&metrics.render(), &cx);
        assert_eq!(snap.cache.hits, 3);
        assert_eq!(snap.cache.misses, 1);
        assert_eq!(snap.cache.hit_ratio, Some(0.75));
        assert_eq!(snap.cache.bytes_from_cache, 4096);
        assert_eq!(snap.cache.max_bytes, None, "not registered here");
        assert_eq!(snap.referrers.referrers_indexed, 7);
        assert_eq!(snap.upstreams[0].referrers_api, "not yet detected");
    }
}
