//! Cluster mode: PostgreSQL is the shared system of record.
//!
//! - **Writes** go to PostgreSQL. A writer task takes every queued write and
//!   runs them in one transaction (group commit) that first locks the single
//!   `prefsd_head` row, so sequence numbers are assigned in commit order and
//!   no reader can ever see event N+1 before event N. The same transaction
//!   appends to `prefsd_events`, maintains the readable current-state tables
//!   `notification_services` and `notification_preferences`, and notifies
//!   `prefsd_events`. A write is acknowledged only once this sidecar has
//!   applied it locally, so a sender reads its own writes.
//! - **The follower** task applies events in order to the local redb and
//!   index (the last applied sequence is stored in the same redb transaction,
//!   so each event is applied exactly once, across crashes). It is woken by
//!   `LISTEN/NOTIFY` and also polls, for engines without `NOTIFY`.
//! - **Outages**: checks keep answering from the local index; writes fail
//!   fast with 503; both tasks reconnect on their own (a libpq-style URL
//!   with several hosts and `target_session_attrs=read-write` follows a
//!   promoted standby).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_postgres::{Client, NoTls, Statement};

use crate::domain::{
    ChannelName, Event, Micros, PreferenceChange, Record, Scope, Service, ServiceChange, Status, Target,
};
use crate::store::Store;
use crate::writer::{Applied, Op, WriteError, Writer};

/// The schema version this build creates and reads.
pub const PG_SCHEMA_VERSION: i32 = 1;
/// Events fetched per follower round trip.
const FETCH: i64 = 5_000;
/// How long a committed write waits to be applied locally before answering 503.
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// Serializes migrations of sidecars starting at once.
const MIGRATION_LOCK: i64 = 0x7072_6566_7364; // "prefsd"

const SCHEMA_V1: &str = "
CREATE TABLE prefsd_head (
    id integer PRIMARY KEY CHECK (id = 1),
    last_seq bigint NOT NULL,
    cluster_id bigint NOT NULL
);
INSERT INTO prefsd_head VALUES (1, 0, floor(random() * 9e18)::bigint);
CREATE TABLE prefsd_events (
    seq bigint PRIMARY KEY,
    body jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE notification_services (
    slug text PRIMARY KEY,
    name text NOT NULL,
    description text NOT NULL,
    archived boolean NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    body jsonb NOT NULL
);
CREATE TABLE notification_preferences (
    customer_id numeric(20, 0) NOT NULL,
    service text NOT NULL,
    notification_type text NOT NULL,
    status text NOT NULL CHECK (status IN ('opted_in', 'opted_out')),
    reason text,
    source text NOT NULL,
    actor text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (customer_id, service, notification_type)
);
";

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
}

/// What the follower knows, for readiness, `/readyz` and metrics.
#[derive(Debug, Default)]
pub struct ClusterStatus {
    /// Highest sequence PostgreSQL has, as last seen.
    pub head: AtomicU64,
    /// Whether the follower's connection is up.
    pub reachable: AtomicBool,
    /// Whether the follower has caught up at least once since start.
    pub caught_up: AtomicBool,
    /// A reason this sidecar cannot follow at all (e.g. foreign data dir).
    pub fatal: std::sync::Mutex<Option<String>>,
}

type Reply = oneshot::Sender<Result<Applied, WriteError>>;

/// A cheap handle to the PostgreSQL writer.
#[derive(Clone)]
pub struct Cluster {
    tx: mpsc::Sender<(Op, Reply)>,
    status: Arc<ClusterStatus>,
}

impl Cluster {
    /// Starts the writer and follower tasks on the current tokio runtime.
    pub fn start(config: ClusterConfig, local: Writer, store: Arc<Store>) -> Result<Cluster, String> {
        let mut pg = tokio_postgres::Config::from_str(&config.url)
            .map_err(|e| format!("postgres URL is not valid: {e}"))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(3));
        }
        pg.application_name("prefsd");
        let status = Arc::new(ClusterStatus::default());
        let nudge = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel(65_536);
        tokio::spawn(writer_task(rx, pg.clone(), config.clone(), local.clone(), nudge.clone()));
        tokio::spawn(follower_task(pg, config.poll, local, store, status.clone(), nudge));
        Ok(Cluster { tx, status })
    }

    /// The follower's view.
    pub fn status(&self) -> &Arc<ClusterStatus> {
        &self.status
    }

    /// One write, acknowledged once committed in PostgreSQL and applied here.
    pub async fn write(&self, op: Op) -> Result<Applied, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((op, reply)).await.map_err(|_| WriteError::Closed)?;
        rx.await.map_err(|_| WriteError::Closed)?
    }

    /// Many writes; answers in order.
    pub async fn write_many(&self, ops: Vec<Op>) -> Vec<Result<Applied, WriteError>> {
        let mut waits = Vec::with_capacity(ops.len());
        for op in ops {
            let (reply, rx) = oneshot::channel();
            if self.tx.send((op, reply)).await.is_err() {
                break;
            }
            waits.push(rx);
        }
        let mut out = Vec::with_capacity(waits.len());
        for rx in waits {
            out.push(rx.await.unwrap_or(Err(WriteError::Closed)));
        }
        out
    }
}

async fn connect(pg: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

/// Creates or upgrades the schema; safe when several sidecars start at once.
async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let txn = client.transaction().await?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    let exists: bool = txn.query_one("SELECT to_regclass('prefsd_schema') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        txn.batch_execute("CREATE TABLE prefsd_schema (version integer NOT NULL)").await?;
    }
    let version: Option<i32> = txn.query_one("SELECT max(version) FROM prefsd_schema", &[]).await?.get(0);
    if version.unwrap_or(0) < 1 {
        txn.batch_execute(SCHEMA_V1).await?;
        txn.execute("INSERT INTO prefsd_schema VALUES ($1)", &[&PG_SCHEMA_VERSION]).await?;
        tracing::info!(version = PG_SCHEMA_VERSION, "created the prefsd schema in postgres");
    }
    txn.commit().await
}

struct Statements {
    lock_head: Statement,
    set_head: Statement,
    service: Statement,
    preference: Statement,
    insert_event: Statement,
    upsert_preference: Statement,
    upsert_service: Statement,
    notify: Statement,
}

impl Statements {
    async fn prepare(c: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            lock_head: c.prepare("SELECT last_seq FROM prefsd_head WHERE id = 1 FOR UPDATE").await?,
            set_head: c.prepare("UPDATE prefsd_head SET last_seq = $1 WHERE id = 1").await?,
            service: c.prepare("SELECT body::text FROM notification_services WHERE slug = $1").await?,
            preference: c
                .prepare(
                    "SELECT status, (extract(epoch FROM created_at) * 1000000)::bigint FROM notification_preferences \
                     WHERE customer_id = $1::text::numeric AND service = $2 AND notification_type = $3",
                )
                .await?,
            insert_event: c.prepare("INSERT INTO prefsd_events (seq, body) VALUES ($1, $2::text::jsonb)").await?,
            upsert_preference: c
                .prepare(
                    "INSERT INTO notification_preferences \
                     (customer_id, service, notification_type, status, reason, source, actor, created_at, updated_at, seq) \
                     VALUES ($1::text::numeric, $2, $3, $4, $5, $6, $7, to_timestamp($8::float8 / 1e6), to_timestamp($8::float8 / 1e6), $9) \
                     ON CONFLICT (customer_id, service, notification_type) DO UPDATE SET \
                     status = excluded.status, reason = excluded.reason, source = excluded.source, \
                     actor = excluded.actor, updated_at = excluded.updated_at, seq = excluded.seq",
                )
                .await?,
            upsert_service: c
                .prepare(
                    "INSERT INTO notification_services (slug, name, description, archived, created_at, updated_at, body) \
                     VALUES ($1, $2, $3, $4, to_timestamp($5::float8 / 1e6), to_timestamp($6::float8 / 1e6), $7::text::jsonb) \
                     ON CONFLICT (slug) DO UPDATE SET name = excluded.name, description = excluded.description, \
                     archived = excluded.archived, updated_at = excluded.updated_at, body = excluded.body",
                )
                .await?,
            notify: c.prepare("SELECT pg_notify('prefsd_events', $1)").await?,
        })
    }
}

struct Conn {
    client: Client,
    statements: Statements,
}

async fn open(pg: &tokio_postgres::Config) -> Result<Conn, tokio_postgres::Error> {
    let mut client = connect(pg).await?;
    migrate(&mut client).await?;
    let statements = Statements::prepare(&client).await?;
    Ok(Conn { client, statements })
}

/// Why a sidecar ahead of PostgreSQL can neither follow nor write.
fn behind(head: u64, local_seq: u64) -> String {
    format!(
        "postgres holds events up to {head} but this sidecar has applied up to {local_seq}: postgres lost events \
         (a standby promoted before replaying them, or a restore from an older backup); writes are refused — \
         start this sidecar on an empty data directory to follow postgres as it is now"
    )
}

fn unavailable(e: &dyn std::fmt::Display) -> WriteError {
    WriteError::Unavailable(format!("postgres is unreachable ({e}); checks still answer, writes are refused"))
}

async fn writer_task(
    mut rx: mpsc::Receiver<(Op, Reply)>,
    pg: tokio_postgres::Config,
    config: ClusterConfig,
    local: Writer,
    nudge: Arc<Notify>,
) {
    let mut conn: Option<Conn> = None;
    let mut batch: Vec<(Op, Reply)> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < config.max_batch.max(1) {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            conn = match open(&pg).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "postgres unreachable; refusing writes");
                    for (_, reply) in batch.drain(..) {
                        let _ = reply.send(Err(unavailable(&e)));
                    }
                    continue;
                }
            };
        }
        let c = conn.as_mut().expect("connected above");
        let ops: Vec<&Op> = batch.iter().map(|(op, _)| op).collect();
        let local_seq = *local.applied().borrow();
        match commit(c, &ops, &config.channels, local_seq).await {
            Ok(results) => {
                nudge.notify_one();
                // Answer once applied locally, without holding up the next
                // group commit: PostgreSQL commits and local applies overlap.
                let max = results.iter().flatten().map(Applied::seq).max().unwrap_or(0);
                let mut applied = local.applied();
                let replies: Vec<(Reply, Result<Applied, WriteError>)> =
                    batch.drain(..).map(|(_, reply)| reply).zip(results).collect();
                tokio::spawn(async move {
                    let done = tokio::time::timeout(APPLY_WAIT, applied.wait_for(|seq| *seq >= max)).await;
                    let late = !matches!(done, Ok(Ok(_)));
                    for (reply, result) in replies {
                        let result = match result {
                            Ok(_) if late => Err(WriteError::Unavailable(
                                "the write is committed in postgres but not yet applied by this sidecar"
                                    .into(),
                            )),
                            other => other,
                        };
                        let _ = reply.send(result);
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "postgres transaction failed; refusing this batch");
                conn = None;
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(unavailable(&e)));
                }
            }
        }
    }
}

fn micros_param(m: Micros) -> f64 {
    m.0 as f64
}

/// One group commit. Validation happens here, under the head lock, against
/// the shared state, so every sidecar refuses the same writes. `local_seq`
/// is the last event this sidecar has applied: a head below it means
/// PostgreSQL has lost events this sidecar holds, so the sequence numbers it
/// would hand out are taken here already — the batch is refused (rolled
/// back) rather than acknowledged without being applied.
async fn commit(
    conn: &mut Conn,
    ops: &[&Op],
    channels: &[ChannelName],
    local_seq: u64,
) -> Result<Vec<Result<Applied, WriteError>>, tokio_postgres::Error> {
    let s = &conn.statements;
    let txn = conn.client.transaction().await?;
    let mut seq: i64 = txn.query_one(&s.lock_head, &[]).await?.get(0);
    if (seq as u64) < local_seq {
        let e = WriteError::Unavailable(behind(seq as u64, local_seq));
        return Ok(ops.iter().map(|_| Err(e.clone())).collect());
    }
    let start = seq;
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let now = Micros::now();
        let result = match op {
            Op::SetPreference { customer, scope, status, reason, origin } => {
                if let Err(e) = check_scope(&txn, s, scope, channels).await? {
                    results.push(Err(e));
                    continue;
                }
                let key_service = scope.service.to_string();
                let key_channel = scope.channel.to_string();
                let row = txn
                    .query_opt(&s.preference, &[&customer.0.to_string(), &key_service, &key_channel])
                    .await?;
                let before =
                    row.as_ref().map(|r| Status::parse(r.get::<_, &str>(0)).unwrap_or(Status::OptedIn));
                let created_at = row.as_ref().map_or(now, |r| Micros(r.get::<_, i64>(1)));
                seq += 1;
                let change = PreferenceChange {
                    customer: *customer,
                    scope: scope.clone(),
                    before,
                    after: *status,
                    reason: reason.clone(),
                    origin: origin.clone(),
                    at: now,
                };
                let body = serde_json::to_string(&Event::Preference(change)).expect("events serialize");
                txn.execute(&s.insert_event, &[&seq, &body]).await?;
                txn.execute(
                    &s.upsert_preference,
                    &[
                        &customer.0.to_string(),
                        &key_service,
                        &key_channel,
                        &status.as_str(),
                        reason,
                        &origin.source,
                        &origin.actor,
                        &micros_param(now),
                        &seq,
                    ],
                )
                .await?;
                let record = Record {
                    status: *status,
                    reason: reason.clone(),
                    source: origin.source.clone(),
                    created_at,
                    updated_at: now,
                    seq: seq as u64,
                };
                Ok(Applied::Preference { seq: seq as u64, scope: scope.clone(), record })
            }
            Op::CreateService { slug, name, description, actor } => {
                if txn.query_opt(&s.service, &[&slug.as_str()]).await?.is_some() {
                    Err(WriteError::ServiceExists(slug.to_string()))
                } else {
                    let service = Service {
                        slug: slug.clone(),
                        name: name.clone(),
                        description: description.clone(),
                        archived: false,
                        created_at: now,
                        updated_at: now,
                    };
                    seq += 1;
                    write_service(&txn, s, seq, service, true, actor).await?
                }
            }
            Op::UpdateService { slug, name, description, archived, actor } => {
                match txn.query_opt(&s.service, &[&slug.as_str()]).await? {
                    None => Err(WriteError::UnknownService(slug.to_string())),
                    Some(row) => {
                        let stored: Service = match serde_json::from_str(row.get::<_, &str>(0)) {
                            Ok(service) => service,
                            Err(e) => {
                                results.push(Err(WriteError::Store(format!(
                                    "stored service {slug} is unreadable: {e}"
                                ))));
                                continue;
                            }
                        };
                        let service = stored.updated(name.as_ref(), description.as_ref(), *archived, now);
                        seq += 1;
                        write_service(&txn, s, seq, service, false, actor).await?
                    }
                }
            }
        };
        results.push(result);
    }
    if seq != start {
        txn.execute(&s.set_head, &[&seq]).await?;
        txn.execute(&s.notify, &[&seq.to_string()]).await?;
    }
    txn.commit().await?;
    Ok(results)
}

async fn write_service(
    txn: &tokio_postgres::Transaction<'_>,
    s: &Statements,
    seq: i64,
    service: Service,
    created: bool,
    actor: &str,
) -> Result<Result<Applied, WriteError>, tokio_postgres::Error> {
    let body = serde_json::to_string(&service).expect("services serialize");
    let event = Event::Service(ServiceChange { service: service.clone(), created, actor: actor.to_owned() });
    let event_body = serde_json::to_string(&event).expect("events serialize");
    txn.execute(&s.insert_event, &[&seq, &event_body]).await?;
    txn.execute(
        &s.upsert_service,
        &[
            &service.slug.as_str(),
            &service.name,
            &service.description,
            &service.archived,
            &micros_param(service.created_at),
            &micros_param(service.updated_at),
            &body,
        ],
    )
    .await?;
    Ok(Ok(Applied::Service { seq: seq as u64, service }))
}

async fn check_scope(
    txn: &tokio_postgres::Transaction<'_>,
    s: &Statements,
    scope: &Scope,
    channels: &[ChannelName],
) -> Result<Result<(), WriteError>, tokio_postgres::Error> {
    if let Target::One(c) = &scope.channel
        && !channels.contains(c)
    {
        return Ok(Err(WriteError::UnknownChannel(c.to_string())));
    }
    if let Target::One(slug) = &scope.service {
        let Some(row) = txn.query_opt(&s.service, &[&slug.as_str()]).await? else {
            return Ok(Err(WriteError::UnknownService(slug.to_string())));
        };
        let service: Service = match serde_json::from_str(row.get::<_, &str>(0)) {
            Ok(s) => s,
            Err(e) => return Ok(Err(WriteError::Store(format!("stored service {slug} is unreadable: {e}")))),
        };
        if service.archived {
            return Ok(Err(WriteError::Archived(slug.to_string())));
        }
    }
    Ok(Ok(()))
}

/// Checks that the local data dir belongs to this PostgreSQL database
/// (remembering its id on first use).
async fn bind_cluster_id(client: &Client, store: &Arc<Store>) -> Result<(), String> {
    let id: i64 = client
        .query_one("SELECT cluster_id FROM prefsd_head WHERE id = 1", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.bind_cluster(id as u64)).await.map_err(|e| e.to_string())?
}

async fn follower_task(
    pg: tokio_postgres::Config,
    poll: Duration,
    local: Writer,
    store: Arc<Store>,
    status: Arc<ClusterStatus>,
    nudge: Arc<Notify>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match follow(&pg, poll, &local, &store, &status, &nudge).await {
            Ok(()) => return,
            Err(Fatal(e)) => {
                tracing::error!(error = %e, "cannot follow postgres");
                *status.fatal.lock().expect("status lock") = Some(e);
                return;
            }
            Err(Retry(e)) => {
                status.reachable.store(false, Ordering::Release);
                tracing::warn!(error = %e, "postgres follower disconnected; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(poll.max(Duration::from_millis(200)) * 4);
    }
}

enum FollowError {
    Retry(String),
    Fatal(String),
}
use FollowError::{Fatal, Retry};

async fn follow(
    pg: &tokio_postgres::Config,
    poll: Duration,
    local: &Writer,
    store: &Arc<Store>,
    status: &ClusterStatus,
    nudge: &Arc<Notify>,
) -> Result<(), FollowError> {
    let (mut client, mut connection) = pg.connect(NoTls).await.map_err(|e| Retry(e.to_string()))?;
    let waker = nudge.clone();
    let (closed_tx, mut closed) = oneshot::channel::<()>();
    tokio::spawn(async move {
        // Drive the connection; every notification wakes the follower.
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures_util::StreamExt;
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
    migrate(&mut client).await.map_err(|e| Retry(e.to_string()))?;
    bind_cluster_id(&client, store).await.map_err(Fatal)?;
    client.batch_execute("LISTEN prefsd_events").await.map_err(|e| Retry(e.to_string()))?;
    let fetch = client
        .prepare("SELECT seq, body::text FROM prefsd_events WHERE seq > $1 ORDER BY seq LIMIT $2")
        .await
        .map_err(|e| Retry(e.to_string()))?;
    let head = client
        .prepare("SELECT last_seq FROM prefsd_head WHERE id = 1")
        .await
        .map_err(|e| Retry(e.to_string()))?;
    status.reachable.store(true, Ordering::Release);
    tracing::info!("following postgres");
    loop {
        // The head is read before fetching, so the fetch sees every event up
        // to it: catching up is then reached even while writes keep coming.
        let head_seq: i64 = client.query_one(&head, &[]).await.map_err(|e| Retry(e.to_string()))?.get(0);
        status.head.store(head_seq as u64, Ordering::Release);
        let applied = *local.applied().borrow();
        if (head_seq as u64) < applied {
            // Events are never fetched at or below `applied` again, so
            // following on would silently skip what PostgreSQL now writes there.
            return Err(Fatal(behind(head_seq as u64, applied)));
        }
        let rows =
            client.query(&fetch, &[&(applied as i64), &FETCH]).await.map_err(|e| Retry(e.to_string()))?;
        let n = rows.len();
        if n > 0 {
            let mut events = Vec::with_capacity(n);
            for row in &rows {
                let seq: i64 = row.get(0);
                let event: Event = serde_json::from_str(row.get::<_, &str>(1))
                    .map_err(|e| Fatal(format!("event {seq} in postgres is unreadable: {e}")))?;
                events.push((seq as u64, event));
            }
            local.apply(events).await.map_err(Fatal)?;
        }
        if n < FETCH as usize {
            if *local.applied().borrow() >= head_seq as u64 {
                status.caught_up.store(true, Ordering::Release);
            }
            tokio::select! {
                () = nudge.notified() => {}
                () = tokio::time::sleep(poll) => {}
                _ = &mut closed => return Err(Retry("connection closed".into())),
            }
        }
    }
}
