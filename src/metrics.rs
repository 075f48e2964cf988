//! Prometheus metrics at `/metrics`, kept and rendered by `prometheus-client`
//! (text format 0.0.4, the one every scraper reads).
//!
//! Counters are the crate's atomics, so the hot path pays one relaxed add;
//! `graft_requests_total` is a labelled family keyed by route and status.
//! Values another component owns (index write failures, connection caps…)
//! are read at scrape time through [`Metrics::register_counter_fn`] and
//! [`Metrics::register_gauge_fn`] rather than copied in here.
//!
//! Names are registered without the `_total` suffix: the encoder adds it to
//! counters, so `graft_cache_hits` renders as `graft_cache_hits_total`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of what [`Metrics::render`] returns.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the upstream latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Labels of `graft_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

/// graft's metrics. Fields are counters the proxy bumps with [`inc`] and
/// [`add`]; everything is registered once, in [`Metrics::default`].
pub struct Metrics {
    /// Guarded only so that collectors can be added after construction; a
    /// scrape holds it while encoding, never across an `.await`.
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    upstream_latency: Histogram,
    pub(crate) cache_hits: Counter,
    pub(crate) cache_misses: Counter,
    pub(crate) cache_stale_hits: Counter,
    pub(crate) cache_bytes_served: Counter,
    pub(crate) upstream_bytes_fetched: Counter,
    pub(crate) coalesced_waiters: Counter,
    pub(crate) cache_fills_failed: Counter,
    pub(crate) evictions: Counter,
    pub(crate) auth_checks: Counter,
    pub(crate) auth_remembered: Counter,
    pub(crate) tag_stale_served: Counter,
    /// Bytes in the cache now, rendered as the `graft_cache_bytes` gauge.
    /// The cache keeps its byte accounting in this one counter (eviction
    /// reads it), so the gauge can never disagree with what eviction sees.
    pub(crate) cache_bytes: Arc<AtomicU64>,
}

/// Something [`inc`] and [`add`] can count on.
pub trait Tally {
    fn add(&self, n: u64);
}

impl Tally for Counter {
    fn add(&self, n: u64) {
        self.inc_by(n);
    }
}

impl Tally for AtomicU64 {
    fn add(&self, n: u64) {
        self.fetch_add(n, Ordering::Relaxed);
    }
}

impl<T: Tally + ?Sized> Tally for Arc<T> {
    fn add(&self, n: u64) {
        (**self).add(n);
    }
}

pub fn inc(c: &impl Tally) {
    c.add(1);
}

pub fn add(c: &impl Tally, n: u64) {
    c.add(n);
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            upstream_latency: Histogram::new(BUCKETS),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_stale_hits: Counter::default(),
            cache_bytes_served: Counter::default(),
            upstream_bytes_fetched: Counter::default(),
            coalesced_waiters: Counter::default(),
            cache_fills_failed: Counter::default(),
            evictions: Counter::default(),
            auth_checks: Counter::default(),
            auth_remembered: Counter::default(),
            tag_stale_served: Counter::default(),
            cache_bytes: Arc::default(),
        };
        m.register_all();
        m
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric under today's names. The registry appends a
    /// period to each help text, so they are written without one.
    fn register_all(&self) {
        let mut r = self.registry();
        r.register(
            "graft_requests",
            "Requests answered, by route kind and status",
            self.requests.clone(),
        );
        for (name, help, c) in self.counters() {
            r.register(name, help, c.clone());
        }
        let bytes = self.cache_bytes.clone();
        r.register_collector(Box::new(FnMetric {
            name: "graft_cache_bytes",
            help: "Bytes in the cache now.",
            kind: Kind::Gauge,
            read: Box::new(move || bytes.load(Ordering::Relaxed)),
        }));
        r.register(
            "graft_upstream_latency_seconds",
            "Time to the upstream's response head",
            self.upstream_latency.clone(),
        );
    }

    /// The plain counters: name (without `_total`), help, counter.
    fn counters(&self) -> [(&'static str, &'static str, &Counter); 11] {
        [
            (
                "graft_cache_hits",
                "Blob and manifest requests served from the cache",
                &self.cache_hits,
            ),
            (
                "graft_cache_misses",
                "Requests that had to fetch content from the upstream",
                &self.cache_misses,
            ),
            (
                "graft_cache_stale_hits",
                "Hits served on a remembered authorization while the upstream was unreachable",
                &self.cache_stale_hits,
            ),
            (
                "graft_cache_bytes_served",
                "Bytes sent to clients from cache files",
                &self.cache_bytes_served,
            ),
            (
                "graft_upstream_bytes_fetched",
                "Content bytes fetched from the upstream into the cache",
                &self.upstream_bytes_fetched,
            ),
            (
                "graft_cache_coalesced_waiters",
                "Requests that joined a fetch already in flight",
                &self.coalesced_waiters,
            ),
            (
                "graft_cache_fills_failed",
                "Fetches discarded (digest mismatch, cut body, I/O error)",
                &self.cache_fills_failed,
            ),
            (
                "graft_cache_evictions",
                "Cache files evicted to hold the byte budget",
                &self.evictions,
            ),
            (
                "graft_auth_checks",
                "Authorization checks sent to the upstream",
                &self.auth_checks,
            ),
            (
                "graft_auth_remembered",
                "Authorization decisions answered from memory",
                &self.auth_remembered,
            ),
            (
                "graft_tag_stale_served",
                "Tag pulls answered with a last known digest while the upstream was unreachable",
                &self.tag_stale_served,
            ),
        ]
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().expect("metrics registry poisoned")
    }

    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }

    pub fn upstream_latency(&self, d: Duration) {
        self.upstream_latency.observe(d.as_secs_f64());
    }

    /// Exposes a counter whose value `read` gives at each scrape. `name` is
    /// given without `_total`, which the exposition adds; `help` is shown
    /// as it is.
    pub fn register_counter_fn(
        &self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.registry().register_collector(Box::new(FnMetric {
            name,
            help,
            kind: Kind::Counter,
            read: Box::new(read),
        }));
    }

    /// Exposes a gauge whose value `read` gives at each scrape.
    pub fn register_gauge_fn(
        &self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.registry().register_collector(Box::new(FnMetric {
            name,
            help,
            kind: Kind::Gauge,
            read: Box::new(read),
        }));
    }

    /// The Prometheus text exposition (see [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String fails only if an encoder bug does; what was
        // written so far is still the best answer.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry())
        {
            tracing::error!(error = %e, "cannot render the metrics");
        }
        out
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
}

/// A counter or gauge read from its owner at scrape time.
struct FnMetric {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl fmt::Debug for FnMetric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnMetric")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Collector for FnMetric {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let value = (self.read)();
        match self.kind {
            Kind::Counter => {
                let m = ConstCounter::new(value);
                m.encode(encoder.encode_descriptor(self.name, self.help, None, m.metric_type())?)
            }
            Kind::Gauge => {
                let m = ConstGauge::new(value);
                m.encode(encoder.encode_descriptor(self.name, self.help, None, m.metric_type())?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family graft exposed before prometheus-client, by name and type:
    /// dashboards and alerts depend on them.
    const TODAYS_NAMES: &[(&str, &str)] = &[
        ("graft_requests_total", "counter"),
        ("graft_cache_hits_total", "counter"),
        ("graft_cache_misses_total", "counter"),
        ("graft_cache_stale_hits_total", "counter"),
        ("graft_cache_bytes_served_total", "counter"),
        ("graft_upstream_bytes_fetched_total", "counter"),
        ("graft_cache_coalesced_waiters_total", "counter"),
        ("graft_cache_fills_failed_total", "counter"),
        ("graft_cache_evictions_total", "counter"),
        ("graft_auth_checks_total", "counter"),
        ("graft_auth_remembered_total", "counter"),
        ("graft_tag_stale_served_total", "counter"),
        ("graft_cache_bytes", "gauge"),
        ("graft_upstream_latency_seconds", "histogram"),
    ];

    #[test]
    fn every_metric_keeps_its_name_and_type() {
        let m = Metrics::default();
        m.request("blob", 200);
        let text = m.render();
        let mut types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        types.sort_unstable();
        let mut want: Vec<String> = TODAYS_NAMES
            .iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect();
        want.sort_unstable();
        assert_eq!(types, want, "{text}");
        for (name, _) in TODAYS_NAMES {
            let help = format!("# HELP {name} ");
            let line = text.lines().find(|l| l.starts_with(&help)).expect(name);
            assert!(line.ends_with('.') && !line.ends_with(".."), "{line}");
        }
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("blob", 200);
        m.request("blob", 200);
        m.request("manifest", 404);
        inc(&m.cache_hits);
        add(&m.cache_bytes_served, 5);
        m.upstream_latency(Duration::from_millis(3));
        m.cache_bytes.store(42, Ordering::Relaxed);
        let text = m.render();
        for line in [
            "graft_requests_total{route=\"blob\",status=\"200\"} 2",
            "graft_requests_total{route=\"manifest\",status=\"404\"} 1",
            "graft_cache_hits_total 1",
            "graft_cache_bytes_served_total 5",
            "graft_cache_misses_total 0",
            "graft_cache_bytes 42",
            "graft_upstream_latency_seconds_bucket{le=\"0.0025\"} 0",
            "graft_upstream_latency_seconds_bucket{le=\"0.005\"} 1",
            "graft_upstream_latency_seconds_bucket{le=\"+Inf\"} 1",
            "graft_upstream_latency_seconds_count 1",
            "graft_upstream_latency_seconds_sum 0.003",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("graft_upstream_latency_seconds_bucket"))
            .count();
        assert_eq!(buckets, BUCKETS.len() + 1, "same buckets plus +Inf");
    }

    #[test]
    fn the_legacy_cache_byte_counter_moves_the_gauge() {
        let m = Metrics::default();
        add(&m.cache_bytes, 7);
        assert!(m.render().lines().any(|l| l == "graft_cache_bytes 7"));
    }

    #[test]
    fn values_owned_elsewhere_are_read_at_scrape_time() {
        let m = Metrics::default();
        let failures = Arc::new(AtomicU64::new(0));
        let read = failures.clone();
        m.register_counter_fn(
            "graft_index_write_failures",
            "Index writes that failed.",
            move || read.load(Ordering::Relaxed),
        );
        m.register_gauge_fn("graft_connections", "Open client connections.", || 3);
        failures.store(2, Ordering::Relaxed);
        let text = m.render();
        for line in [
            "# TYPE graft_index_write_failures_total counter",
            "graft_index_write_failures_total 2",
            "# HELP graft_index_write_failures_total Index writes that failed.",
            "# TYPE graft_connections gauge",
            "graft_connections 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}
