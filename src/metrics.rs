//! Prometheus metrics, registered on an explicit registry (never global).
//!
//! Two kinds of counting:
//!
//! - On the request and check paths, plain atomics that need no label
//!   lookup: a cell per (route, status), a latency histogram per route, and
//!   an allowed/suppressed pair of counters per (service, channel) position
//!   of the index. A [`Collector`] turns them into labelled series when
//!   Prometheus scrapes, naming each pair from the index as it is then.
//! - Everywhere else (writes, commits, tokens, rate limits, filters),
//!   ordinary prometheus-client metrics, their label sets resolved once at
//!   start-up where the set is fixed.
//!
//! Process metrics (`process_*`, unprefixed as Prometheus clients name
//! them) are read from `/proc/self` at scrape time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::domain::Event;
use crate::http::{Listener, Route};
use crate::index::Index;

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format (0.0.4).
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Statuses with a counting cell of their own; any other status is counted
/// in a map (it does not happen on the check path).
const STATUSES: [u16; 15] = [200, 201, 400, 401, 403, 404, 405, 409, 413, 415, 429, 500, 501, 503, 504];

/// Upper bounds of the request latency buckets, in nanoseconds: 25 µs to
/// 10 s. Checks answer in microseconds; filters and commits take longer.
const LATENCY_BOUNDS_NS: [u64; 18] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Pair counters come in chunks allocated on first use, so a new service's
/// pairs need no lock and no resize of what checks are reading.
const PAIR_CHUNK: usize = 512;
/// Chunks at most: 1,048,576 pairs, far beyond any real service list.
const PAIR_CHUNKS: usize = 2048;

/// A latency histogram of one route: non-cumulative bucket counts (the last
/// is +Inf) and the sum, each one relaxed atomic add per observation.
#[derive(Debug, Default)]
struct Latency {
    buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Latency {
    #[inline]
    fn observe(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(LATENCY_BOUNDS_NS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// Allowed and suppressed answers of one (service, channel) pair.
#[derive(Debug, Default)]
struct PairCell {
    allowed: AtomicU64,
    suppressed: AtomicU64,
}

/// What the collector names pairs by, refreshed from the index per scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairStat {
    /// Service slug.
    pub service: String,
    /// Channel name.
    pub channel: String,
    /// Customers opted out of the pair.
    pub opted_out: u64,
}

/// What a scrape reads from the rest of the sidecar.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Every pair in index position order (see [`Scrape::pairs_of`]).
    pub pairs: Vec<PairStat>,
    /// Whether the sidecar takes traffic (what `/readyz` says).
    pub ready: bool,
}

impl Scrape {
    /// The service, channel and opt-out count of every pair, in index
    /// position order. Take it under the index lock, then let the lock go
    /// before [`Metrics::render`].
    pub fn pairs_of(index: &Index) -> Vec<PairStat> {
        index
            .iter_pairs()
            .map(|(s, c, set)| PairStat {
                service: s.to_string(),
                channel: c.to_string(),
                opted_out: set.len(),
            })
            .collect()
    }
}

/// The atomics of the request and check paths, shared with the collector.
#[derive(Debug)]
struct Hot {
    /// `requests[route * STATUSES.len() + status slot]`.
    requests: Box<[AtomicU64]>,
    /// Requests whose status has no slot, by (route, status).
    rare: Mutex<HashMap<(usize, u16), u64>>,
    /// Per route.
    latency: Box<[Latency]>,
    /// By pair position, in chunks of `PAIR_CHUNK`.
    pairs: Box<[OnceLock<Box<[PairCell]>>]>,
    /// Names of the pair positions and readiness, as of the current scrape.
    scrape: Mutex<Scrape>,
}

impl Hot {
    fn new() -> Hot {
        Hot {
            requests: (0..Route::ALL.len() * STATUSES.len()).map(|_| AtomicU64::new(0)).collect(),
            rare: Mutex::new(HashMap::new()),
            latency: (0..Route::ALL.len()).map(|_| Latency::default()).collect(),
            pairs: (0..PAIR_CHUNKS).map(|_| OnceLock::new()).collect(),
            scrape: Mutex::new(Scrape::default()),
        }
    }

    #[inline]
    fn pair(&self, pos: usize) -> Option<&PairCell> {
        let chunk = self.pairs.get(pos / PAIR_CHUNK)?;
        let chunk = chunk.get_or_init(|| (0..PAIR_CHUNK).map(|_| PairCell::default()).collect());
        Some(&chunk[pos % PAIR_CHUNK])
    }

    /// A pair's counts without allocating its chunk.
    fn pair_counts(&self, pos: usize) -> (u64, u64) {
        self.pairs.get(pos / PAIR_CHUNK).and_then(OnceLock::get).map_or((0, 0), |chunk| {
            let cell = &chunk[pos % PAIR_CHUNK];
            (cell.allowed.load(Ordering::Relaxed), cell.suppressed.load(Ordering::Relaxed))
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatusLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

/// Encodes the hot-path atomics as labelled series at scrape time.
#[derive(Debug)]
struct HotCollector(Arc<Hot>);

impl Collector for HotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hot = &self.0;
        {
            let mut family = encoder.encode_descriptor(
                "http_requests",
                "HTTP requests served, by route pattern and status.",
                None,
                MetricType::Counter,
            )?;
            for route in Route::ALL {
                for (slot, &status) in STATUSES.iter().enumerate() {
                    let n = hot.requests[route.index() * STATUSES.len() + slot].load(Ordering::Relaxed);
                    if n > 0 {
                        let labels = RouteStatusLabels { route: route.pattern(), status };
                        family.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                    }
                }
            }
            let rare = hot.rare.lock().expect("metrics lock").clone();
            let mut rare: Vec<_> = rare.into_iter().collect();
            rare.sort_unstable();
            for ((route, status), n) in rare {
                let labels = RouteStatusLabels { route: Route::ALL[route].pattern(), status };
                family.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "http_request_duration_seconds",
                "Time from a request's head to its answer, by route pattern.",
                None,
                MetricType::Histogram,
            )?;
            let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(LATENCY_BOUNDS_NS.len() + 1);
            for route in Route::ALL {
                let cells = &hot.latency[route.index()];
                buckets.clear();
                let mut count = 0;
                for (i, cell) in cells.buckets.iter().enumerate() {
                    let n = cell.load(Ordering::Relaxed);
                    count += n;
                    let le = LATENCY_BOUNDS_NS.get(i).map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
                    buckets.push((le, n));
                }
                if count == 0 {
                    continue;
                }
                let sum = cells.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
                family
                    .encode_family(&RouteLabels { route: route.pattern() })?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        let Scrape { pairs: names, ready } = hot.scrape.lock().expect("metrics lock").clone();
        encoder
            .encode_descriptor(
                "ready",
                "1 while the sidecar takes traffic (as /readyz answers), 0 while starting or shutting down.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&i64::from(ready))?;
        let counts: Vec<(u64, u64)> = (0..names.len()).map(|pos| hot.pair_counts(pos)).collect();
        {
            let total: u64 = counts.iter().map(|(a, s)| a + s).sum();
            let metric = encoder.encode_descriptor(
                "checks",
                "Customers checked (single, batch and filter), over every pair.",
                None,
                MetricType::Counter,
            );
            metric?.encode_counter::<NoLabelSet, _, u64>(&total, None)?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "pair_checks",
                "Customers checked, by service, channel and result (allowed or suppressed).",
                None,
                MetricType::Counter,
            )?;
            for (stat, (allowed, suppressed)) in names.iter().zip(&counts) {
                for (result, n) in [("allowed", allowed), ("suppressed", suppressed)] {
                    let labels =
                        [("service", stat.service.as_str()), ("channel", &stat.channel), ("result", result)];
                    family.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(n, None)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "index_opted_out",
                "Customers opted out, per (service, channel) pair.",
                None,
                MetricType::Gauge,
            )?;
            for stat in &names {
                let labels = [("service", stat.service.as_str()), ("channel", &stat.channel)];
                family.encode_family(&labels)?.encode_gauge(&(stat.opted_out as i64))?;
            }
        }
        Ok(())
    }
}

/// Resident memory and open file descriptors, from `/proc/self`.
#[derive(Debug)]
struct ProcessCollector {
    /// Seconds since the epoch when metrics were set up (start-up).
    started: f64,
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Entries of `/proc/self/fd`, less the one reading it.
fn open_fds() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

/// The soft "Max open files" limit of `/proc/self/limits`.
fn max_fds() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                resident_bytes().map(|v| v as f64),
            ),
            ("process_open_fds", "Number of open file descriptors.", open_fds().map(|v| v as f64)),
            ("process_max_fds", "Maximum number of open file descriptors.", max_fds().map(|v| v as f64)),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch.",
                Some(self.started),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&v)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

/// The kinds of `prefsd_follower_errors_total`.
pub const FOLLOWER_ERROR_KINDS: [&str; 8] =
    ["connect", "fetch", "decode", "gap", "apply", "disk_full", "diverged", "resync"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FormatLabels {
    format: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RedemptionLabels {
    via: &'static str,
    result: &'static str,
}

/// Where a token was redeemed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `POST /v1/tokens/redeem`, from the web tier.
    Redeem,
    /// `POST /u/TOKEN`: RFC 8058 one-click or the page's forms.
    Link,
}

impl Via {
    const ALL: [Via; 2] = [Via::Redeem, Via::Link];

    fn label(self) -> &'static str {
        match self {
            Via::Redeem => "redeem",
            Via::Link => "link",
        }
    }
}

/// How a token redemption ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redemption {
    /// The change was written.
    Ok,
    /// The token did not verify, or the request was malformed.
    Invalid,
    /// The token verified but has expired, and the action needs a live one.
    Expired,
    /// The write failed or was refused.
    Error,
}

impl Redemption {
    const ALL: [Redemption; 4] =
        [Redemption::Ok, Redemption::Invalid, Redemption::Expired, Redemption::Error];

    fn label(self) -> &'static str {
        match self {
            Redemption::Ok => "ok",
            Redemption::Invalid => "invalid",
            Redemption::Expired => "expired",
            Redemption::Error => "error",
        }
    }
}

/// Every metric prefsd exports.
pub struct Metrics {
    registry: Registry,
    hot: Arc<Hot>,
    writes: Family<SourceLabels, Counter>,
    commit_seconds: Histogram,
    commit_batch: Histogram,
    last_seq: Gauge<u64, AtomicU64>,
    /// Events the start-up replayed from the write-ahead log.
    wal_replayed: Gauge<u64, AtomicU64>,
    /// Cluster mode: events PostgreSQL has that this sidecar has not applied.
    replication_lag: Gauge<u64, AtomicU64>,
    /// Cluster mode: 1 while the follower's PostgreSQL connection is up.
    postgres_up: Gauge,
    /// Cluster mode: the follower's errors, by kind.
    follower_errors: Family<KindLabels, Counter>,
    /// Ids per filter request: JSON, roaring.
    filter_sizes: [Histogram; 2],
    /// `[via][result]`, resolved once.
    redemptions: [[Counter; 4]; 2],
    /// `/u/T`, `/v1/tokens/redeem`.
    rate_limited: [Counter; 2],
    /// Open connections: API, metrics listener.
    connections: [Gauge; 2],
    /// Connections closed at once for the per-listener cap: API, metrics listener.
    connections_refused: [Counter; 2],
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        registry.register_collector(Box::new(ProcessCollector { started }));
        let hot = Arc::new(Hot::new());
        let sub = registry.sub_registry_with_prefix("prefsd");
        sub.register_collector(Box::new(HotCollector(hot.clone())));

        let writes = Family::<SourceLabels, Counter>::default();
        sub.register("preference_writes", "Committed preference writes, by source", writes.clone());
        let commit_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 14));
        sub.register(
            "commit_seconds",
            "Time to stage and durably commit one group of writes",
            commit_seconds.clone(),
        );
        let commit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        sub.register("commit_batch_size", "Writes sharing one durable commit", commit_batch.clone());
        let last_seq = Gauge::<u64, AtomicU64>::default();
        sub.register("last_applied_sequence", "Sequence number of the last applied event", last_seq.clone());
        let wal_replayed = Gauge::<u64, AtomicU64>::default();
        sub.register(
            "wal_replayed_events",
            "Events the last start replayed from the write-ahead log (redb had lost them in a crash)",
            wal_replayed.clone(),
        );
        let replication_lag = Gauge::<u64, AtomicU64>::default();
        sub.register(
            "replication_lag_events",
            "Cluster mode: events committed in PostgreSQL not yet applied by this sidecar",
            replication_lag.clone(),
        );
        let postgres_up = Gauge::default();
        sub.register(
            "postgres_up",
            "Cluster mode: 1 while the follower is connected to PostgreSQL",
            postgres_up.clone(),
        );

        let follower_errors = Family::<KindLabels, Counter>::default();
        // Every kind starts at zero, so rates and alerts see the first error.
        for kind in FOLLOWER_ERROR_KINDS {
            let _ = follower_errors.get_or_create(&KindLabels { kind });
        }
        sub.register(
            "follower_errors",
            "Cluster mode: errors of the PostgreSQL follower, by kind (connect, fetch, decode, gap, apply, disk_full, diverged, resync)",
            follower_errors.clone(),
        );
        let filters = Family::<FormatLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 10.0, 8))
        });
        let filter_sizes =
            ["json", "roaring"].map(|format| filters.get_or_create(&FormatLabels { format }).clone());
        sub.register("filter_size", "Recipients per filter request, by body format", filters);

        let redeemed = Family::<RedemptionLabels, Counter>::default();
        let redemptions = Via::ALL.map(|via| {
            Redemption::ALL.map(|result| {
                redeemed.get_or_create(&RedemptionLabels { via: via.label(), result: result.label() }).clone()
            })
        });
        sub.register(
            "token_redemptions",
            "Opt-out link redemptions, by where (redeem, link) and result (ok, invalid, expired, error)",
            redeemed,
        );

        let limited = Family::<RouteLabels, Counter>::default();
        let rate_limited = [Route::Page, Route::Redeem]
            .map(|r| limited.get_or_create(&RouteLabels { route: r.pattern() }).clone());
        sub.register("rate_limited", "Requests refused by the per-address rate limit, by route", limited);

        let listeners = ["api", "metrics"];
        let open = Family::<ListenerLabels, Gauge>::default();
        let connections = listeners.map(|listener| open.get_or_create(&ListenerLabels { listener }).clone());
        sub.register("connections", "Open client connections, by listener (api, metrics)", open);
        let refused = Family::<ListenerLabels, Counter>::default();
        let connections_refused =
            listeners.map(|listener| refused.get_or_create(&ListenerLabels { listener }).clone());
        sub.register(
            "connections_refused",
            "Connections closed at once because the listener had max_connections open, by listener",
            refused,
        );

        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        sub.register("build_info", "Build information; always 1", build);
        Metrics {
            registry,
            hot,
            writes,
            commit_seconds,
            commit_batch,
            last_seq,
            wal_replayed,
            replication_lag,
            postgres_up,
            follower_errors,
            filter_sizes,
            redemptions,
            rate_limited,
            connections,
            connections_refused,
        }
    }

    /// Counts a connection accepted on `listener`.
    pub fn connection_opened(&self, listener: Listener) {
        self.connections[listener as usize].inc();
    }

    /// Counts a connection of `listener` closed.
    pub fn connection_closed(&self, listener: Listener) {
        self.connections[listener as usize].dec();
    }

    /// Counts a connection closed at once for the listener's cap.
    pub fn count_refused_connection(&self, listener: Listener) {
        self.connections_refused[listener as usize].inc();
    }

    /// Counts one served request and its latency. Lock-free unless the
    /// status is one no handler answers with normally.
    #[inline]
    pub fn count_request(&self, route: Route, status: u16, took: Duration) {
        let hot = &*self.hot;
        match STATUSES.iter().position(|&s| s == status) {
            Some(slot) => {
                hot.requests[route.index() * STATUSES.len() + slot].fetch_add(1, Ordering::Relaxed);
            }
            None => *hot.rare.lock().expect("metrics lock").entry((route.index(), status)).or_default() += 1,
        }
        hot.latency[route.index()].observe(took);
    }

    /// Counts answered checks of the pair at `pos` (see [`Index::pair_pos`]).
    #[inline]
    pub fn count_checks(&self, pos: usize, allowed: u64, suppressed: u64) {
        if let Some(cell) = self.hot.pair(pos) {
            if allowed > 0 {
                cell.allowed.fetch_add(allowed, Ordering::Relaxed);
            }
            if suppressed > 0 {
                cell.suppressed.fetch_add(suppressed, Ordering::Relaxed);
            }
        }
    }

    /// Records the size of one filter request.
    pub fn observe_filter(&self, roaring: bool, ids: u64) {
        self.filter_sizes[usize::from(roaring)].observe(ids as f64);
    }

    /// Counts one token redemption.
    pub fn count_redemption(&self, via: Via, result: Redemption) {
        self.redemptions[via as usize][result as usize].inc();
    }

    /// Counts one request refused by the rate limit (of `/u/T` or
    /// `/v1/tokens/redeem`, the only limited routes).
    pub fn count_rate_limited(&self, route: Route) {
        match route {
            Route::Page => self.rate_limited[0].inc(),
            Route::Redeem => self.rate_limited[1].inc(),
            _ => 0,
        };
    }

    /// Records one durable commit.
    pub fn observe_commit(&self, took: Duration, ops: usize) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.commit_batch.observe(ops as f64);
    }

    /// Cluster mode: counts one follower error of `kind`.
    pub fn count_follower_error(&self, kind: &'static str) {
        self.follower_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Cluster mode: the replication lag and whether PostgreSQL is reachable.
    pub fn set_cluster(&self, lag: u64, reachable: bool) {
        self.replication_lag.set(lag);
        self.postgres_up.set(i64::from(reachable));
    }

    /// Records the sequence number of the last applied event.
    pub fn set_last_seq(&self, seq: u64) {
        self.last_seq.set(seq);
    }

    /// Records how many events the start-up replayed from the write-ahead log.
    pub fn set_wal_replayed(&self, events: u64) {
        self.wal_replayed.set(events);
    }

    /// Counts one committed event.
    pub fn count_write(&self, event: &Event) {
        if let Event::Preference(change) = event {
            self.writes.get_or_create(&SourceLabels { source: change.origin.source.clone() }).inc();
        }
    }

    /// Renders the exposition: OpenMetrics text, or the Prometheus text
    /// format (0.0.4) followed by a `# EOF` comment line.
    pub fn render(&self, scrape: Scrape, openmetrics: bool) -> String {
        *self.hot.scrape.lock().expect("metrics lock") = scrape;
        let mut out = String::new();
        // Encoding into a String cannot fail.
        if openmetrics {
            let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        } else {
            let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
            // A comment to the text format; it marks a complete exposition
            // as OpenMetrics' terminator does.
            out.push_str("# EOF\n");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next())
    }

    fn stats() -> Scrape {
        let pairs = ["email", "sms"]
            .iter()
            .map(|c| PairStat { service: "rating".into(), channel: (*c).into(), opted_out: 3 })
            .collect();
        Scrape { pairs, ready: true }
    }

    #[test]
    fn counts_become_labelled_series_at_scrape() {
        let m = Metrics::new();
        m.count_request(Route::Check, 200, Duration::from_micros(30));
        m.count_request(Route::Check, 200, Duration::from_millis(2));
        m.count_request(Route::Check, 418, Duration::from_micros(1));
        m.count_checks(0, 5, 2);
        m.count_checks(1, 1, 0);
        let text = m.render(stats(), false);
        assert_eq!(line(&text, "prefsd_http_requests_total{route=\"/v1/check\",status=\"200\"}"), Some("2"));
        assert_eq!(line(&text, "prefsd_http_requests_total{route=\"/v1/check\",status=\"418\"}"), Some("1"));
        let bucket = "prefsd_http_request_duration_seconds_bucket{route=\"/v1/check\",le=";
        assert_eq!(line(&text, &format!("{bucket}\"2.5e-05\"}}")), Some("1"), "{text}");
        assert_eq!(line(&text, &format!("{bucket}\"5e-05\"}}")), Some("2"));
        assert_eq!(line(&text, &format!("{bucket}\"+Inf\"}}")), Some("3"));
        assert_eq!(line(&text, "prefsd_http_request_duration_seconds_count{route=\"/v1/check\"}"), Some("3"));
        assert_eq!(line(&text, "prefsd_checks_total "), Some("8"));
        let pair = "prefsd_pair_checks_total{service=\"rating\",channel=\"email\",result=";
        assert_eq!(line(&text, &format!("{pair}\"allowed\"}}")), Some("5"));
        assert_eq!(line(&text, &format!("{pair}\"suppressed\"}}")), Some("2"));
        assert_eq!(line(&text, "prefsd_index_opted_out{service=\"rating\",channel=\"sms\"}"), Some("3"));
        assert_eq!(line(&text, "prefsd_ready "), Some("1"));
        assert!(text.ends_with("# EOF\n"));
        assert!(!text.contains("route=\"/v1/filter\""), "unused routes stay out:\n{text}");
    }

    #[test]
    fn process_metrics_come_from_proc() {
        let text = Metrics::new().render(Scrape::default(), true);
        let rss: f64 = line(&text, "process_resident_memory_bytes ").unwrap().parse().unwrap();
        assert!(rss > 1e6, "a test process holds more than a megabyte: {rss}");
        let fds: f64 = line(&text, "process_open_fds ").unwrap().parse().unwrap();
        assert!(fds >= 3.0, "at least stdin, stdout, stderr: {fds}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn redemptions_and_rate_limits_start_at_zero_and_count() {
        let m = Metrics::new();
        m.count_redemption(Via::Link, Redemption::Expired);
        m.count_rate_limited(Route::Redeem);
        m.observe_filter(true, 1000);
        let text = m.render(Scrape::default(), false);
        let r = "prefsd_token_redemptions_total{via=";
        assert_eq!(line(&text, &format!("{r}\"link\",result=\"expired\"}}")), Some("1"));
        assert_eq!(line(&text, &format!("{r}\"redeem\",result=\"ok\"}}")), Some("0"));
        assert_eq!(line(&text, "prefsd_rate_limited_total{route=\"/v1/tokens/redeem\"}"), Some("1"));
        assert_eq!(line(&text, "prefsd_rate_limited_total{route=\"/u/T\"}"), Some("0"));
        assert_eq!(line(&text, "prefsd_filter_size_count{format=\"roaring\"}"), Some("1"));
    }
}
