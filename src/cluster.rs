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

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use crate::domain::{
    ChannelName, Event, Micros, PreferenceChange, Record, Scope, Service, ServiceChange, Status, Target,
};
use crate::store::Store;
use crate::writer::{Applied, Op, Reply, WriteError, Writer, submit, submit_many};

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
        submit(&self.tx, op, |op, reply| (op, reply)).await
    }

    /// Many writes; answers in order.
    pub async fn write_many(&self, ops: Vec<Op>) -> Vec<Result<Applied, WriteError>> {
        submit_many(&self.tx, ops, |op, reply| (op, reply)).await
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
    services: Statement,
    preferences: Statement,
    insert_events: Statement,
    upsert_preferences: Statement,
    upsert_service: Statement,
    notify: Statement,
}

impl Statements {
    async fn prepare(c: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            lock_head: c.prepare("SELECT last_seq FROM prefsd_head WHERE id = 1 FOR UPDATE").await?,
            set_head: c.prepare("UPDATE prefsd_head SET last_seq = $1 WHERE id = 1").await?,
            services: c.prepare("SELECT slug, body::text FROM notification_services WHERE slug = ANY($1)").await?,
            preferences: c
                .prepare(
                    // By the key's leading column alone: a join against
                    // unnest arrays is planned as a sequential scan.
                    "SELECT customer_id::text, service, notification_type, status, \
                     (extract(epoch FROM created_at) * 1000000)::bigint \
                     FROM notification_preferences WHERE customer_id = ANY($1::text[]::numeric[])",
                )
                .await?,
            insert_events: c
                .prepare("INSERT INTO prefsd_events (seq, body) SELECT q, b::jsonb FROM unnest($1::bigint[], $2::text[]) AS u(q, b)")
                .await?,
            upsert_preferences: c
                .prepare(
                    "INSERT INTO notification_preferences \
                     (customer_id, service, notification_type, status, reason, source, actor, created_at, updated_at, seq) \
                     SELECT c::numeric, s, t, st, r, src, a, to_timestamp(ca / 1e6), to_timestamp(ua / 1e6), q \
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
                     $8::float8[], $9::float8[], $10::bigint[]) AS u(c, s, t, st, r, src, a, ca, ua, q) \
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
///
/// The round trips do not grow with the batch: the services and current
/// preference rows the batch names are read with one query each, and its
/// events and preference rows are written with one `unnest` statement each.
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
    // Futures polled together are pipelined on the connection: one round trip.
    let (mut services, mut current) =
        tokio::try_join!(read_services(&txn, s, ops), read_preferences(&txn, s, ops))?;
    let mut events = Events::default();
    let mut rows: HashMap<PrefKey, PrefRow> = HashMap::new();
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let now = Micros::now();
        let result = match op {
            Op::SetPreference { customer, scope, status, reason, origin } => {
                if let Err(e) = check_scope(&services, scope, channels) {
                    results.push(Err(e));
                    continue;
                }
                let key = (customer.0.to_string(), scope.service.to_string(), scope.channel.to_string());
                let prior = current.get(&key).copied();
                let created_at = prior.map_or(now, |(_, created)| created);
                seq += 1;
                let change = PreferenceChange {
                    customer: *customer,
                    scope: scope.clone(),
                    before: prior.map(|(status, _)| status),
                    after: *status,
                    reason: reason.clone(),
                    origin: origin.clone(),
                    at: now,
                };
                events.push(seq, &Event::Preference(change));
                current.insert(key.clone(), (*status, created_at));
                // The last write of a key in the batch is the row's state.
                rows.insert(
                    key,
                    PrefRow {
                        status: *status,
                        reason: reason.clone(),
                        origin: origin.clone(),
                        created_at,
                        updated_at: now,
                        seq,
                    },
                );
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
                if services.contains_key(slug.as_str()) {
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
                    write_service(&txn, s, &mut events, seq, &mut services, service, true, actor).await?
                }
            }
            Op::UpdateService { slug, name, description, archived, actor } => {
                match services.get(slug.as_str()).cloned() {
                    None => Err(WriteError::UnknownService(slug.to_string())),
                    Some(Err(e)) => Err(e),
                    Some(Ok(stored)) => {
                        let service = stored.updated(name.as_ref(), description.as_ref(), *archived, now);
                        seq += 1;
                        write_service(&txn, s, &mut events, seq, &mut services, service, false, actor).await?
                    }
                }
            }
        };
        results.push(result);
    }
    if seq != start {
        let head = seq.to_string();
        let event_params: [&(dyn ToSql + Sync); 2] = [&events.seqs, &events.bodies];
        let head_params: [&(dyn ToSql + Sync); 1] = [&seq];
        let notify_params: [&(dyn ToSql + Sync); 1] = [&head];
        tokio::try_join!(
            txn.execute(&s.insert_events, &event_params),
            write_preferences(&txn, s, rows),
            txn.execute(&s.set_head, &head_params),
            txn.execute(&s.notify, &notify_params),
        )?;
    }
    txn.commit().await?;
    Ok(results)
}

/// `(customer_id, service, notification_type)` as the current-state table keys them.
type PrefKey = (String, String, String);

/// The batch's services as stored, or why one could not be read; a slug
/// that is absent is not registered.
type Known = HashMap<String, Result<Service, WriteError>>;

/// The batch's events, as `unnest` arrays.
#[derive(Default)]
struct Events {
    seqs: Vec<i64>,
    bodies: Vec<String>,
}

impl Events {
    fn push(&mut self, seq: i64, event: &Event) {
        self.seqs.push(seq);
        self.bodies.push(serde_json::to_string(event).expect("events serialize"));
    }
}

/// A preference row to upsert.
struct PrefRow {
    status: Status,
    reason: Option<String>,
    origin: crate::domain::Origin,
    created_at: Micros,
    updated_at: Micros,
    seq: i64,
}

/// Every service the batch names, in one query.
async fn read_services(
    txn: &tokio_postgres::Transaction<'_>,
    s: &Statements,
    ops: &[&Op],
) -> Result<Known, tokio_postgres::Error> {
    let mut slugs: Vec<&str> = ops
        .iter()
        .filter_map(|op| match op {
            Op::SetPreference { scope, .. } => match &scope.service {
                Target::One(slug) => Some(slug.as_str()),
                Target::All => None,
            },
            Op::CreateService { slug, .. } | Op::UpdateService { slug, .. } => Some(slug.as_str()),
        })
        .collect();
    slugs.sort_unstable();
    slugs.dedup();
    let mut known = Known::new();
    for row in txn.query(&s.services, &[&slugs]).await? {
        let slug: String = row.get(0);
        let service = serde_json::from_str::<Service>(row.get::<_, &str>(1))
            .map_err(|e| WriteError::Store(format!("stored service {slug} is unreadable: {e}")));
        known.insert(slug, service);
    }
    Ok(known)
}

/// The current status and creation time of every preference row the batch
/// writes, in one query.
async fn read_preferences(
    txn: &tokio_postgres::Transaction<'_>,
    s: &Statements,
    ops: &[&Op],
) -> Result<HashMap<PrefKey, (Status, Micros)>, tokio_postgres::Error> {
    let mut keys = std::collections::HashSet::new();
    for op in ops {
        if let Op::SetPreference { customer, scope, .. } = op {
            keys.insert((customer.0.to_string(), scope.service.to_string(), scope.channel.to_string()));
        }
    }
    let mut out = HashMap::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let mut customers: Vec<&str> = keys.iter().map(|(c, _, _)| c.as_str()).collect();
    customers.sort_unstable();
    customers.dedup();
    for row in txn.query(&s.preferences, &[&customers]).await? {
        let key: PrefKey = (row.get(0), row.get(1), row.get(2));
        if keys.contains(&key) {
            let status = Status::parse(row.get::<_, &str>(3)).unwrap_or(Status::OptedIn);
            out.insert(key, (status, Micros(row.get::<_, i64>(4))));
        }
    }
    Ok(out)
}

/// Upserts the batch's preference rows with one statement.
async fn write_preferences(
    txn: &tokio_postgres::Transaction<'_>,
    s: &Statements,
    rows: HashMap<PrefKey, PrefRow>,
) -> Result<(), tokio_postgres::Error> {
    let n = rows.len();
    if n == 0 {
        return Ok(());
    }
    let (mut customers, mut services, mut channels) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut statuses, mut reasons, mut sources, mut actors) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut created, mut seqs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut updated = Vec::with_capacity(n);
    for ((customer, service, channel), row) in rows {
        customers.push(customer);
        services.push(service);
        channels.push(channel);
        statuses.push(row.status.as_str());
        reasons.push(row.reason);
        sources.push(row.origin.source);
        actors.push(row.origin.actor);
        created.push(micros_param(row.created_at));
        updated.push(micros_param(row.updated_at));
        seqs.push(row.seq);
    }
    txn.execute(
        &s.upsert_preferences,
        &[
            &customers, &services, &channels, &statuses, &reasons, &sources, &actors, &created, &updated,
            &seqs,
        ],
    )
    .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn write_service(
    txn: &tokio_postgres::Transaction<'_>,
    s: &Statements,
    events: &mut Events,
    seq: i64,
    known: &mut Known,
    service: Service,
    created: bool,
    actor: &str,
) -> Result<Result<Applied, WriteError>, tokio_postgres::Error> {
    let body = serde_json::to_string(&service).expect("services serialize");
    events.push(
        seq,
        &Event::Service(ServiceChange { service: service.clone(), created, actor: actor.to_owned() }),
    );
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
    known.insert(service.slug.to_string(), Ok(service.clone()));
    Ok(Ok(Applied::Service { seq: seq as u64, service }))
}

fn check_scope(known: &Known, scope: &Scope, channels: &[ChannelName]) -> Result<(), WriteError> {
    if let Target::One(c) = &scope.channel
        && !channels.contains(c)
    {
        return Err(WriteError::UnknownChannel(c.to_string()));
    }
    if let Target::One(slug) = &scope.service {
        match known.get(slug.as_str()) {
            None => return Err(WriteError::UnknownService(slug.to_string())),
            Some(Err(e)) => return Err(e.clone()),
            Some(Ok(service)) if service.archived => {
                return Err(WriteError::Archived(slug.to_string()));
            }
            Some(Ok(_)) => {}
        }
    }
    Ok(())
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
