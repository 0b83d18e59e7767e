//! Cluster mode: PostgreSQL is the shared system of record.
//!
//! - **Writes** go to PostgreSQL ([`pg_writer`]): one group commit per batch
//!   under the `prefsd_head` row lock, answered once this sidecar has
//!   applied it, so a sender reads its own writes.
//! - **The follower** ([`follower`]) applies events in order to the local
//!   redb and index, woken by `LISTEN/NOTIFY` and polling. Every error is
//!   retried with capped backoff; a sidecar that cannot apply for longer
//!   than `follower_unhealthy` fails `/healthz`.
//! - **Divergence**: every event carries a chained checksum ([`chain`]); a
//!   sidecar whose last applied event's checksum is not PostgreSQL's at that
//!   sequence number stops taking writes and resynchronises, writing the
//!   acknowledged events PostgreSQL lost to a file in the data directory.
//! - **Deadlines**: every PostgreSQL call is bounded (connect timeout,
//!   keepalives, `tcp_user_timeout`, `statement_timeout`, and a timeout
//!   around each commit), so a write is answered 503 within
//!   `postgres_timeout` and checks keep answering from the local index.
//! - **Schema** ([`schema`]): created and upgraded by whichever sidecar
//!   starts first.

pub mod chain;
mod follower;
mod pg_writer;
pub mod schema;

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};

use crate::domain::ChannelName;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::writer::{Applied, Op, Reply, WriteError, Writer, submit, submit_many};

pub use schema::PG_SCHEMA_VERSION;

/// Settings of cluster mode.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// libpq-style URL or key=value string.
    pub url: String,
    /// How often the follower polls when not woken by NOTIFY.
    pub poll: Duration,
    /// Most writes in one PostgreSQL transaction.
    pub max_batch: usize,
    /// The configured channels, to refuse unknown ones before PostgreSQL.
    pub channels: Vec<ChannelName>,
    /// The bound on every PostgreSQL call, and on a write's answer.
    pub timeout: Duration,
    /// How long the follower may fail to apply before `/healthz` fails.
    pub unhealthy_after: Duration,
    /// Where the events PostgreSQL lost are written on a resynchronisation.
    pub data: std::path::PathBuf,
}

/// What the follower knows, for `/readyz`, `/healthz` and metrics.
#[derive(Debug, Default)]
pub struct ClusterStatus {
    /// Highest sequence PostgreSQL has, as last seen.
    pub head: AtomicU64,
    /// Whether the follower's connection is up.
    pub reachable: AtomicBool,
    /// Whether the follower is caught up: set when it has applied up to the
    /// head it read, cleared while it cannot follow.
    pub caught_up: AtomicBool,
    /// The follower's current problem, if any.
    problem: Mutex<Option<Problem>>,
    /// Since when local applies have been failing (cleared by one that works).
    apply_failing_since: Mutex<Option<Instant>>,
    /// Set while this sidecar's log and PostgreSQL's disagree: writes are refused.
    diverged: Mutex<Option<String>>,
    /// A reason this sidecar cannot follow at all (e.g. a foreign data dir).
    fatal: Mutex<Option<String>>,
    /// How long applies may fail before `/healthz` fails.
    unhealthy_after: Duration,
}

/// One kind of follower failure, as it was first seen.
#[derive(Debug, Clone)]
struct Problem {
    kind: &'static str,
    message: String,
}

impl ClusterStatus {
    fn new(unhealthy_after: Duration) -> ClusterStatus {
        ClusterStatus { unhealthy_after, ..ClusterStatus::default() }
    }

    /// Why this sidecar is not ready, if it is not: it cannot follow, has
    /// diverged, is failing, or is behind PostgreSQL (`applied` is the last
    /// applied sequence number).
    pub fn not_ready(&self, applied: u64) -> Option<String> {
        if let Some(fatal) = lock(&self.fatal).clone() {
            return Some(fatal);
        }
        if let Some(why) = lock(&self.diverged).clone() {
            return Some(why);
        }
        let lag = self.head.load(Ordering::Acquire).saturating_sub(applied);
        if let Some(p) = lock(&self.problem).clone() {
            return Some(format!("{} ({}); {lag} events behind as last seen", p.message, p.kind));
        }
        if !self.caught_up.load(Ordering::Acquire) {
            return Some(format!("catching up with postgres: {lag} events behind"));
        }
        None
    }

    /// Why `/healthz` must fail, if it must: the follower cannot follow at
    /// all, or local applies have failed for longer than the bound.
    pub fn unhealthy(&self) -> Option<String> {
        if let Some(fatal) = lock(&self.fatal).clone() {
            return Some(fatal);
        }
        let since = (*lock(&self.apply_failing_since))?;
        let failing = since.elapsed();
        (failing > self.unhealthy_after).then(|| {
            let why = lock(&self.problem).as_ref().map_or_else(String::new, |p| p.message.clone());
            format!(
                "the follower has not applied postgres's events for {}s (bound {}s): {why}",
                failing.as_secs(),
                self.unhealthy_after.as_secs()
            )
        })
    }

    /// Why writes are refused, while this sidecar's log and PostgreSQL's disagree.
    pub fn diverged(&self) -> Option<String> {
        lock(&self.diverged).clone()
    }

    /// The current problem's kind, for `/readyz`.
    pub fn problem_kind(&self) -> Option<&'static str> {
        lock(&self.problem).as_ref().map(|p| p.kind)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A cheap handle to the PostgreSQL writer.
#[derive(Clone)]
pub struct Cluster {
    tx: mpsc::Sender<(Op, Reply)>,
    status: Arc<ClusterStatus>,
    timeout: Duration,
}

impl Cluster {
    /// Starts the writer and follower tasks on the current tokio runtime.
    pub fn start(
        config: ClusterConfig,
        local: Writer,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, String> {
        let pg = pg_config(&config.url, config.timeout)?;
        let status = Arc::new(ClusterStatus::new(config.unhealthy_after));
        let nudge = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel(65_536);
        tokio::spawn(pg_writer::run(
            rx,
            pg.clone(),
            config.clone(),
            local.clone(),
            status.clone(),
            nudge.clone(),
        ));
        tokio::spawn(follower::run(follower::Follower {
            pg,
            config: config.clone(),
            local,
            store,
            status: status.clone(),
            nudge,
            metrics,
        }));
        Ok(Cluster { tx, status, timeout: config.timeout })
    }

    /// The follower's view.
    pub fn status(&self) -> &Arc<ClusterStatus> {
        &self.status
    }

    /// One write, acknowledged once committed in PostgreSQL and applied
    /// here; answered 503 when that takes longer than the bound.
    pub async fn write(&self, op: Op) -> Result<Applied, WriteError> {
        match tokio::time::timeout(self.timeout, submit(&self.tx, op, |op, reply| (op, reply))).await {
            Ok(result) => result,
            Err(_) => Err(too_slow(self.timeout)),
        }
    }

    /// Many writes; answers in order. A long batch may take longer than the
    /// bound as a whole; each of its group commits is bounded, and a failure
    /// refuses everything queued behind it at once.
    pub async fn write_many(&self, ops: Vec<Op>) -> Vec<Result<Applied, WriteError>> {
        submit_many(&self.tx, ops, |op, reply| (op, reply)).await
    }
}

fn too_slow(bound: Duration) -> WriteError {
    WriteError::Unavailable(format!(
        "postgres did not answer within {} ms; the write may or may not be stored (it is applied here if it was); \
         checks still answer, retry the write",
        bound.as_millis()
    ))
}

/// The connection settings, with a deadline on every step: connect
/// timeout, TCP keepalives and `tcp_user_timeout` (a blackholed link is
/// noticed), and `statement_timeout` (a stuck statement is cancelled by
/// the server), unless the URL sets them itself.
fn pg_config(url: &str, timeout: Duration) -> Result<tokio_postgres::Config, String> {
    let mut pg =
        tokio_postgres::Config::from_str(url).map_err(|e| format!("postgres URL is not valid: {e}"))?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(timeout.min(Duration::from_secs(5)));
    }
    let probe = (timeout / 4).max(Duration::from_secs(1));
    pg.keepalives(true).keepalives_idle(probe).keepalives_interval(probe).keepalives_retries(3);
    pg.tcp_user_timeout(timeout);
    let statement = format!("-c statement_timeout={}", timeout.as_millis());
    let options = match pg.get_options() {
        Some(o) if o.contains("statement_timeout") => o.to_owned(),
        Some(o) => format!("{o} {statement}"),
        None => statement,
    };
    pg.options(&options);
    pg.application_name("prefsd");
    Ok(pg)
}

fn unavailable(e: &dyn std::fmt::Display) -> WriteError {
    WriteError::Unavailable(format!("postgres is unreachable ({e}); checks still answer, writes are refused"))
}

/// Runs `f` within `bound`, a timeout reported as an error of its own.
async fn bounded<T, E: std::fmt::Display>(
    bound: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(bound, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer from postgres within {} ms", bound.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_has_deadlines() {
        let pg = pg_config("postgresql://prefsd@db1:5432,db2:5432/prefs", Duration::from_secs(10)).unwrap();
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(5)));
        assert!(pg.get_keepalives());
        assert_eq!(pg.get_keepalives_idle(), Duration::from_millis(2500));
        assert_eq!(pg.get_tcp_user_timeout(), Some(&Duration::from_secs(10)));
        assert_eq!(pg.get_options(), Some("-c statement_timeout=10000"));
        // The URL's own settings are kept.
        let url = "postgresql://db/prefs?connect_timeout=3&options=-c%20search_path%3Dp";
        let pg = pg_config(url, Duration::from_secs(10)).unwrap();
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(pg.get_options(), Some("-c search_path=p -c statement_timeout=10000"));
        let url = "postgresql://db/prefs?options=-c%20statement_timeout%3D500";
        assert_eq!(
            pg_config(url, Duration::from_secs(10)).unwrap().get_options(),
            Some("-c statement_timeout=500")
        );
    }
}
