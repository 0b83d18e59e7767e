//! The follower: applies PostgreSQL's events, in order, to the local redb
//! and index, remembering the last applied sequence number and its chained
//! checksum in the same redb transaction, so each event is applied exactly
//! once, across crashes. It is woken by `LISTEN/NOTIFY` and also polls, for
//! engines without `NOTIFY`.
//!
//! It never gives up: every error (connecting, fetching, decoding, a gap, a
//! failing or full local disk) is counted in `prefsd_follower_errors_total{kind}`,
//! logged once when it starts and once when it clears, and retried with a
//! capped backoff, while `/readyz` answers 503 with the reason and the lag.
//! Local applies failing for longer than `follower_unhealthy` fail
//! `/healthz` too. The only exception is a data directory that belongs to
//! another PostgreSQL database, which no retry can fix.
//!
//! On every (re)connect, every `VERIFY_EVERY`, and whenever an event's
//! checksum does not follow the local one, the last applied event's checksum
//! is compared with PostgreSQL's at that sequence number. On a mismatch (or
//! when PostgreSQL no longer has that event) the sidecar refuses writes,
//! finds the last event both logs agree on, writes every later local event
//! (acknowledged writes PostgreSQL lost) to `lost-writes-*.jsonl` in the
//! data directory, rewinds to the common event and follows again.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{Notify, oneshot};
use tokio_postgres::{Client, NoTls, Statement};

use super::{ClusterConfig, ClusterStatus, Problem, bounded, chain, lock, schema};
use crate::domain::Event;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::writer::{ApplyError, Writer};

/// Events fetched per round trip.
const FETCH: i64 = 5_000;
/// Events compared per round trip while looking for the last common one.
const COMPARE: u64 = 500;
/// How often the last applied event's checksum is compared with PostgreSQL's.
const VERIFY_EVERY: Duration = Duration::from_secs(10);
/// The longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Free space kept on the data directory's file system: events are not
/// applied below it. redb fails for good after an I/O error (every later
/// call answers "previous I/O error" until the database is reopened), so a
/// full disk is met before redb writes, and following resumes by itself
/// once space returns.
const DISK_RESERVE: u64 = 8 << 20;

/// Everything the follower task needs.
pub(super) struct Follower {
    pub pg: tokio_postgres::Config,
    pub config: ClusterConfig,
    pub local: Writer,
    pub store: Arc<Store>,
    pub status: Arc<ClusterStatus>,
    pub nudge: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

/// Why a connection was given up.
struct Failure {
    kind: &'static str,
    message: String,
}

fn failure(kind: &'static str) -> impl FnOnce(String) -> Failure {
    move |message| Failure { kind, message }
}

/// Doubling waits, capped.
struct Backoff(Duration);

impl Backoff {
    fn reset(&mut self) {
        self.0 = Duration::from_millis(50);
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }
}

/// The follower task: follows until prefsd shuts down.
pub(super) async fn run(f: Follower) {
    let mut backoff = Backoff(Duration::from_millis(50));
    loop {
        let e = f.follow(&mut backoff).await;
        f.status.reachable.store(false, Ordering::Release);
        match e.kind {
            "closed" => return,
            "fatal" => {
                tracing::error!(error = %e.message, "cannot follow postgres");
                f.status.caught_up.store(false, Ordering::Release);
                *lock(&f.status.fatal) = Some(e.message);
                return;
            }
            kind => f.fail(kind, e.message),
        }
        backoff.wait().await;
    }
}

impl Follower {
    /// Counts a failure, and logs it when the follower's state changes.
    fn fail(&self, kind: &'static str, message: String) {
        self.metrics.count_follower_error(kind);
        self.status.caught_up.store(false, Ordering::Release);
        if matches!(kind, "apply" | "disk_full" | "gap" | "decode" | "resync") {
            lock(&self.status.apply_failing_since).get_or_insert_with(Instant::now);
        }
        let mut problem = lock(&self.status.problem);
        if problem.as_ref().is_none_or(|p| p.kind != kind) {
            tracing::warn!(kind, error = %message, "the postgres follower is failing; retrying with backoff");
        }
        *problem = Some(Problem { kind, message });
    }

    /// A round that fetched and applied without error.
    fn succeeded(&self) {
        *lock(&self.status.apply_failing_since) = None;
        if let Some(p) = lock(&self.status.problem).take() {
            tracing::info!(was = p.kind, "the postgres follower recovered");
        }
    }

    async fn follow(&self, backoff: &mut Backoff) -> Failure {
        match self.follow_inner(backoff).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn follow_inner(&self, backoff: &mut Backoff) -> Result<std::convert::Infallible, Failure> {
        // A query starts at most one poll interval after the link froze: so
        // that /readyz shows it within the configured bound, each query gets
        // the bound less that interval, and a margin.
        let timeout = self.config.timeout;
        let bound = timeout.mul_f64(0.95).saturating_sub(self.config.poll).max(timeout / 2);
        let (mut client, mut connection) =
            bounded(bound, "connecting", self.pg.connect(NoTls)).await.map_err(failure("connect"))?;
        let waker = self.nudge.clone();
        let (closed_tx, mut closed) = oneshot::channel::<()>();
        tokio::spawn(async move {
            // Drive the connection; every notification wakes the follower.
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(_)) => waker.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "postgres follower connection failed");
                        break;
                    }
                }
            }
            let _ = closed_tx.send(());
            waker.notify_one();
        });
        bounded(bound, "migrating the schema", schema::migrate(&mut client))
            .await
            .map_err(failure("connect"))?;
        self.bind_cluster_id(&client).await?;
        bounded(bound, "listening", client.batch_execute("LISTEN prefsd_events"))
            .await
            .map_err(failure("connect"))?;
        let s = bounded(bound, "preparing statements", Queries::prepare(&client))
            .await
            .map_err(failure("connect"))?;
        self.status.reachable.store(true, Ordering::Release);
        tracing::info!("following postgres");
        // Compared on every (re)connect: a failover may have lost events.
        self.verify(&client, &s).await?;
        let mut verified = Instant::now();
        loop {
            // The head is read before fetching, so the fetch sees every event
            // up to it: catching up is then reached even while writes keep coming.
            let head: i64 = bounded(bound, "reading the head", client.query_one(&s.head, &[]))
                .await
                .map_err(failure("fetch"))?
                .get(0);
            let head = head as u64;
            self.status.head.store(head, Ordering::Release);
            let applied = *self.local.applied().borrow();
            if head < applied || verified.elapsed() >= VERIFY_EVERY {
                self.verify(&client, &s).await?;
                verified = Instant::now();
                continue;
            }
            let rows =
                bounded(bound, "fetching events", client.query(&s.fetch, &[&(applied as i64), &FETCH]))
                    .await
                    .map_err(failure("fetch"))?;
            let n = rows.len();
            let outcome = match decode(&rows) {
                Err(e) => Err(("decode", e)),
                Ok(events) if events.is_empty() => Ok(()),
                Ok(_) if let Some(why) = self.disk_short() => Err(("disk_full", why)),
                Ok(events) => match self.local.apply(events).await {
                    Ok(_) => Ok(()),
                    Err(ApplyError::Closed) => return Err(failure("closed")(String::new())),
                    Err(ApplyError::Diverged(why)) => {
                        self.resync(&client, &s, why).await?;
                        continue;
                    }
                    Err(ApplyError::Gap(e)) => Err(("gap", e)),
                    Err(e @ ApplyError::Store(_)) => Err(("apply", e.to_string())),
                },
            };
            if let Err((kind, message)) = outcome {
                self.fail(kind, message);
                tokio::select! {
                    () = backoff.wait() => {}
                    _ = &mut closed => return Err(failure("connect")("connection closed".into())),
                }
                continue;
            }
            self.succeeded();
            backoff.reset();
            if n < FETCH as usize {
                if *self.local.applied().borrow() >= head {
                    self.status.caught_up.store(true, Ordering::Release);
                }
                tokio::select! {
                    () = self.nudge.notified() => {}
                    () = tokio::time::sleep(self.config.poll) => {}
                    _ = &mut closed => return Err(failure("connect")("connection closed".into())),
                }
            }
        }
    }

    /// Why events must not be applied now for lack of space, if so.
    fn disk_short(&self) -> Option<String> {
        let fs = rustix::fs::statvfs(&self.config.data).ok()?;
        let free = fs.f_bavail.saturating_mul(fs.f_frsize);
        (free < DISK_RESERVE).then(|| {
            format!(
                "the data directory {} has {free} bytes free; events are applied again once {} MiB are free",
                self.config.data.display(),
                DISK_RESERVE >> 20
            )
        })
    }

    /// Checks that the local data dir belongs to this PostgreSQL database
    /// (remembering its id on first use).
    async fn bind_cluster_id(&self, client: &Client) -> Result<(), Failure> {
        let row = bounded(
            self.config.timeout,
            "reading the cluster id",
            client.query_one("SELECT cluster_id FROM prefsd_head WHERE id = 1", &[]),
        )
        .await
        .map_err(failure("connect"))?;
        let id: i64 = row.get(0);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.bind_cluster(id as u64))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(failure("fatal"))
    }

    /// Compares the last applied event's checksum with PostgreSQL's at that
    /// sequence number, and resynchronises when they differ.
    async fn verify(&self, client: &Client, s: &Queries) -> Result<(), Failure> {
        let store = self.store.clone();
        let (last, ours) = tokio::task::spawn_blocking(move || store.chain_state())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(failure("apply"))?;
        if last == 0 {
            return Ok(());
        }
        let row = bounded(
            self.config.timeout,
            "reading a checksum",
            client.query_opt(&s.chain_at, &[&(last as i64)]),
        )
        .await
        .map_err(failure("fetch"))?;
        let why = match (row.map(|r| chain::from_sql(r.get(0))), ours) {
            (Some(theirs), Some(ours)) if theirs == ours => return Ok(()),
            // A data directory from before checksums takes the next one on trust.
            (Some(_), None) => return Ok(()),
            (Some(theirs), Some(ours)) => format!(
                "event {last} in postgres is not the one this sidecar applied (checksum {theirs:016x}, \
                 this sidecar has {ours:016x}): postgres's log changed under it (a failover or a restore)"
            ),
            (None, _) => format!(
                "postgres no longer holds event {last}, which this sidecar applied: postgres lost events \
                 (a standby promoted before replaying them, or a restore from an older backup)"
            ),
        };
        self.resync(client, s, why).await
    }

    /// Stops writes, saves the local events PostgreSQL lost, rewinds to the
    /// last event both logs agree on and lets the follower go on from there.
    async fn resync(&self, client: &Client, s: &Queries, why: String) -> Result<(), Failure> {
        let refused = format!("{why}; writes are refused while this sidecar resynchronises from postgres");
        if lock(&self.status.diverged).replace(refused.clone()).is_none() {
            tracing::error!(reason = %why, "this sidecar's events and postgres's differ; writes are refused while resynchronising");
        }
        self.status.caught_up.store(false, Ordering::Release);
        self.metrics.count_follower_error("diverged");
        let (keep, chain) = self.common(client, s).await?;
        // Rewinding rewrites the kept events: not on a full disk, where
        // redb would fail for good; writes stay refused until space returns.
        if let Some(why) = self.disk_short() {
            return Err(failure("disk_full")(why));
        }
        let store = self.store.clone();
        let (lost, ours) = tokio::task::spawn_blocking(move || {
            Ok((store.events_after(keep, usize::MAX)?, store.chain_state()?.1))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r: Result<_, crate::store::StoreError>| r.map_err(|e| e.to_string()))
        .map_err(failure("resync"))?;
        if let (Some((first, _)), Some((last, _))) = (lost.first(), lost.last()) {
            let (first, last) = (*first, *last);
            let path = save_lost(&self.config.data, &lost, ours.unwrap_or(0)).map_err(failure("resync"))?;
            tracing::error!(
                file = %path.display(),
                first_seq = first,
                last_seq = last,
                events = lost.len(),
                "postgres lost events this sidecar had applied (acknowledged writes): saved to the file, \
                 replay them if they still apply"
            );
        }
        self.local.rewind(keep, chain).await.map_err(failure("resync"))?;
        tracing::warn!(
            kept_seq = keep,
            "resynchronised: following postgres again from the last common event"
        );
        *lock(&self.status.diverged) = None;
        Ok(())
    }

    /// The last sequence number at which this sidecar's events and
    /// PostgreSQL's are the same, and PostgreSQL's checksum there; found by
    /// comparing events backwards from the lower of both heads.
    async fn common(&self, client: &Client, s: &Queries) -> Result<(u64, u64), Failure> {
        let bound = self.config.timeout;
        let head: i64 = bounded(bound, "reading the head", client.query_one(&s.head, &[]))
            .await
            .map_err(failure("fetch"))?
            .get(0);
        let mut top = (head as u64).min(*self.local.applied().borrow());
        while top > 0 {
            let low = top.saturating_sub(COMPARE - 1).max(1);
            let store = self.store.clone();
            let ours =
                tokio::task::spawn_blocking(move || store.events_after(low - 1, (top - low + 1) as usize))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(failure("resync"))?;
            let rows =
                bounded(bound, "comparing events", client.query(&s.range, &[&(low as i64), &(top as i64)]))
                    .await
                    .map_err(failure("fetch"))?;
            let theirs = decode(&rows).map_err(failure("decode"))?;
            for (seq, event, chain) in theirs.iter().rev() {
                if ours.iter().any(|(q, e)| q == seq && e == event) {
                    return Ok((*seq, *chain));
                }
            }
            top = low - 1;
        }
        Ok((0, 0))
    }
}

/// The follower's prepared statements.
struct Queries {
    head: Statement,
    fetch: Statement,
    range: Statement,
    chain_at: Statement,
}

impl Queries {
    async fn prepare(c: &Client) -> Result<Queries, tokio_postgres::Error> {
        Ok(Queries {
            head: c.prepare("SELECT last_seq FROM prefsd_head WHERE id = 1").await?,
            fetch: c
                .prepare("SELECT seq, body::text, chain FROM prefsd_events WHERE seq > $1 ORDER BY seq LIMIT $2")
                .await?,
            range: c
                .prepare("SELECT seq, body::text, chain FROM prefsd_events WHERE seq BETWEEN $1 AND $2 ORDER BY seq")
                .await?,
            chain_at: c.prepare("SELECT chain FROM prefsd_events WHERE seq = $1").await?,
        })
    }
}

/// `(seq, body, chain)` rows as events.
fn decode(rows: &[tokio_postgres::Row]) -> Result<Vec<(u64, Event, u64)>, String> {
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let seq: i64 = row.get(0);
        let event: Event = serde_json::from_str(row.get::<_, &str>(1))
            .map_err(|e| format!("event {seq} in postgres is unreadable: {e}"))?;
        events.push((seq as u64, event, chain::from_sql(row.get(2))));
    }
    Ok(events)
}

/// Writes `lost` as JSON lines (`{"seq", "event"}`) to a file in the data
/// directory, synced, and returns its path. The name holds the range and
/// the local checksum at its end (`chain`), which identifies this history:
/// a resynchronisation retried after a failure writes the same file again.
fn save_lost(
    data: &std::path::Path,
    lost: &[(u64, Event)],
    chain: u64,
) -> Result<std::path::PathBuf, String> {
    let (first, last) = (lost[0].0, lost[lost.len() - 1].0);
    let path = data.join(format!("lost-writes-{first}-{last}-{chain:016x}.jsonl"));
    let mut text = String::new();
    for (seq, event) in lost {
        text.push_str(&serde_json::json!({ "seq": seq, "event": event }).to_string());
        text.push('\n');
    }
    let mut f = std::fs::File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}
