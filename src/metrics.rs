//! Prometheus metrics, registered on an explicit registry (never global).
//!
//! Counting on the check path is one relaxed atomic add on a pre-resolved
//! counter; label lookups happen only on slower paths.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::domain::Event;
use crate::index::Index;

/// Labels of a served request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route pattern, e.g. `/v1/check`.
    pub route: &'static str,
    /// The HTTP status code.
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    service: String,
    channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Every metric prefsd exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    checks: Counter,
    writes: Family<SourceLabels, Counter>,
    commit_seconds: Histogram,
    commit_batch: Histogram,
    index_entries: Family<PairLabels, Gauge>,
    last_seq: Gauge<u64, AtomicU64>,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("prefsd");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests served, by route and status", requests.clone());
        let checks = Counter::default();
        registry.register(
            "checks",
            "Individual (customer, service, channel) checks answered",
            checks.clone(),
        );
        let writes = Family::<SourceLabels, Counter>::default();
        registry.register("preference_writes", "Committed preference writes, by source", writes.clone());
        let commit_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 14));
        registry.register(
            "commit_seconds",
            "Time to stage and durably commit one group of writes",
            commit_seconds.clone(),
        );
        let commit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        registry.register("commit_batch_size", "Writes sharing one durable commit", commit_batch.clone());
        let index_entries = Family::<PairLabels, Gauge>::default();
        registry.register(
            "index_opted_out",
            "Customers opted out, per (service, channel) pair",
            index_entries.clone(),
        );
        let last_seq = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "last_applied_sequence",
            "Sequence number of the last applied event",
            last_seq.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("build_info", "Build information; always 1", build);
        Metrics { registry, requests, checks, writes, commit_seconds, commit_batch, index_entries, last_seq }
    }

    /// Counts one served request.
    pub fn count_request(&self, route: &'static str, status: u16) {
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
    }

    /// Counts answered checks.
    #[inline]
    pub fn count_checks(&self, n: u64) {
        self.checks.inc_by(n);
    }

    /// Records one durable commit.
    pub fn observe_commit(&self, took: Duration, ops: usize) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.commit_batch.observe(ops as f64);
    }

    /// Records the sequence number of the last applied event.
    pub fn set_last_seq(&self, seq: u64) {
        self.last_seq.set(seq);
    }

    /// Counts one committed event.
    pub fn count_write(&self, event: &Event) {
        if let Event::Preference(change) = event {
            self.writes.get_or_create(&SourceLabels { source: change.origin.source.clone() }).inc();
        }
    }

    /// Renders the text exposition, refreshing the index gauges first.
    pub fn render(&self, index: &Index) -> String {
        for (s, c, set) in index.iter_pairs() {
            self.index_entries
                .get_or_create(&PairLabels { service: s.to_string(), channel: c.to_string() })
                .set(set.len() as i64);
        }
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
