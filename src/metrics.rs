//! Prometheus text metrics at `/metrics`. Counters are plain atomics so the
//! hot path pays one relaxed add; only the request counter keyed by route
//! and status takes a lock.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the upstream latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_stale_hits: AtomicU64,
    pub cache_bytes_served: AtomicU64,
    pub upstream_bytes_fetched: AtomicU64,
    pub coalesced_waiters: AtomicU64,
    pub cache_fills_failed: AtomicU64,
    pub evictions: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub auth_checks: AtomicU64,
    pub auth_remembered: AtomicU64,
    pub tag_stale_served: AtomicU64,
    upstream_latency: [AtomicU64; BUCKETS.len()],
    upstream_latency_count: AtomicU64,
    upstream_latency_sum_us: AtomicU64,
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .expect("metrics poisoned")
            .entry((route, status))
            .or_default() += 1;
    }

    pub fn upstream_latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                inc(&self.upstream_latency[i]);
            }
        }
        inc(&self.upstream_latency_count);
        add(&self.upstream_latency_sum_us, d.as_micros() as u64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.push_str("# HELP graft_requests_total Requests answered, by route kind and status.\n");
        out.push_str("# TYPE graft_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().expect("metrics poisoned").iter() {
            let _ = writeln!(
                out,
                "graft_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let counters: [(&str, &str, &AtomicU64); 12] = [
            (
                "graft_cache_hits_total",
                "Blob and manifest requests served from the cache.",
                &self.cache_hits,
            ),
            (
                "graft_cache_misses_total",
                "Requests that had to fetch content from the upstream.",
                &self.cache_misses,
            ),
            (
                "graft_cache_stale_hits_total",
                "Hits served on a remembered authorization while the upstream was unreachable.",
                &self.cache_stale_hits,
            ),
            (
                "graft_cache_bytes_served_total",
                "Bytes sent to clients from cache files.",
                &self.cache_bytes_served,
            ),
            (
                "graft_upstream_bytes_fetched_total",
                "Content bytes fetched from the upstream into the cache.",
                &self.upstream_bytes_fetched,
            ),
            (
                "graft_cache_coalesced_waiters_total",
                "Requests that joined a fetch already in flight.",
                &self.coalesced_waiters,
            ),
            (
                "graft_cache_fills_failed_total",
                "Fetches discarded (digest mismatch, cut body, I/O error).",
                &self.cache_fills_failed,
            ),
            (
                "graft_cache_evictions_total",
                "Cache files evicted to hold the byte budget.",
                &self.evictions,
            ),
            (
                "graft_auth_checks_total",
                "Authorization checks sent to the upstream.",
                &self.auth_checks,
            ),
            (
                "graft_auth_remembered_total",
                "Authorization decisions answered from memory.",
                &self.auth_remembered,
            ),
            (
                "graft_tag_stale_served_total",
                "Tag pulls answered with a last known digest while the upstream was unreachable.",
                &self.tag_stale_served,
            ),
            (
                "graft_cache_bytes",
                "Bytes in the cache now.",
                &self.cache_bytes,
            ),
        ];
        for (name, help, c) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                get(c)
            );
        }
        out.push_str(
            "# HELP graft_upstream_latency_seconds Time to the upstream's response head.\n",
        );
        out.push_str("# TYPE graft_upstream_latency_seconds histogram\n");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "graft_upstream_latency_seconds_bucket{{le=\"{b}\"}} {}",
                get(&self.upstream_latency[i])
            );
        }
        let count = get(&self.upstream_latency_count);
        let _ = writeln!(
            out,
            "graft_upstream_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "graft_upstream_latency_seconds_sum {}",
            get(&self.upstream_latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "graft_upstream_latency_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("blob", 200);
        m.request("blob", 200);
        inc(&m.cache_hits);
        m.upstream_latency(Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains("graft_requests_total{route=\"blob\",status=\"200\"} 2"));
        assert!(text.contains("graft_cache_hits_total 1"));
        assert!(text.contains("graft_upstream_latency_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("graft_upstream_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("graft_upstream_latency_seconds_count 1"));
        assert!(text.contains("# TYPE graft_cache_bytes gauge"));
    }
}
