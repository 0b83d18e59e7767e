//! The PostgreSQL writer: one task takes every queued write and runs them
//! in one transaction (group commit) that first locks the single
//! `prefsd_head` row, so sequence numbers are assigned in commit order and
//! no reader can ever see event N+1 before event N. The same transaction
//! appends to `prefsd_events` (with each event's chained checksum),
//! maintains the readable current-state tables `notification_services` and
//! `notification_preferences`, and notifies `prefsd_events`. A write is
//! answered once this sidecar has applied it, so a sender reads its own
//! writes. Every step is bounded by the configured timeout; writes are
//! refused while the follower reports this sidecar diverged from PostgreSQL.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use super::{ClusterConfig, ClusterStatus, bounded, chain, schema, unavailable};
use crate::domain::{ChannelName, CustomerId, Event, Micros, Scope, Service, ServiceSlug, Status, Target};
use crate::writer::{Applied, Op, Reply, Staging, WriteError, Writer, stage};

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
            lock_head: c.prepare("SELECT last_seq, chain FROM prefsd_head WHERE id = 1 FOR UPDATE").await?,
            set_head: c.prepare("UPDATE prefsd_head SET last_seq = $1, chain = $2 WHERE id = 1").await?,
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
                .prepare(
                    "INSERT INTO prefsd_events (seq, body, chain) SELECT q, b::jsonb, c \
                     FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(q, b, c)",
                )
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
    let (mut client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    schema::migrate(&mut client).await?;
    let statements = Statements::prepare(&client).await?;
    Ok(Conn { client, statements })
}

/// Why a sidecar ahead of PostgreSQL cannot write.
fn behind(head: u64, local_seq: u64) -> String {
    format!(
        "postgres holds events up to {head} but this sidecar has applied up to {local_seq}: postgres lost events \
         (a standby promoted before replaying them, or a restore from an older backup); writes are refused \
         until this sidecar has resynchronised from postgres"
    )
}

/// The writer task: group commits until the queue closes.
pub(super) async fn run(
    mut rx: mpsc::Receiver<(Op, Reply)>,
    pg: tokio_postgres::Config,
    config: ClusterConfig,
    local: Writer,
    status: Arc<ClusterStatus>,
    nudge: Arc<Notify>,
) {
    let mut conn: Option<Conn> = None;
    let mut batch: Vec<(Op, Reply)> = Vec::new();
    // Whether the last attempt failed: logged once per change.
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < config.max_batch.max(1) {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        // A caller that gave up (its bound passed) is not written for:
        // nobody would be told the outcome.
        batch.retain(|(_, reply)| !reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        if let Some(why) = status.diverged() {
            for (_, reply) in batch.drain(..) {
                let _ = reply.send(Err(WriteError::Unavailable(why.clone())));
            }
            continue;
        }
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            conn = match bounded(config.timeout, "connecting", open(&pg)).await {
                Ok(c) => Some(c),
                Err(e) => {
                    failing = refuse(&mut batch, &mut rx, &e, failing);
                    continue;
                }
            };
        }
        let c = conn.as_mut().expect("connected above");
        let ops: Vec<&Op> = batch.iter().map(|(op, _)| op).collect();
        let local_seq = *local.applied().borrow();
        match bounded(config.timeout, "committing", commit(c, &ops, &config.channels, local_seq)).await {
            Ok(results) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("postgres takes writes again");
                }
                nudge.notify_one();
                // Answer once applied locally, without holding up the next
                // group commit: PostgreSQL commits and local applies overlap.
                let max = results.iter().flatten().map(Applied::seq).max().unwrap_or(0);
                let mut applied = local.applied();
                let replies: Vec<(Reply, Result<Applied, WriteError>)> =
                    batch.drain(..).map(|(_, reply)| reply).zip(results).collect();
                let wait = config.timeout;
                tokio::spawn(async move {
                    let done = tokio::time::timeout(wait, applied.wait_for(|seq| *seq >= max)).await;
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
                // A timed-out connection may be stuck mid-transaction: drop it.
                conn = None;
                failing = refuse(&mut batch, &mut rx, &e, failing);
            }
        }
    }
}

/// Refuses the batch and everything queued behind it (each would wait for
/// its own attempt to fail otherwise), logging when writes start failing;
/// returns that writes are failing.
fn refuse(
    batch: &mut Vec<(Op, Reply)>,
    rx: &mut mpsc::Receiver<(Op, Reply)>,
    e: &str,
    failing: bool,
) -> bool {
    if !failing {
        tracing::warn!(error = %e, "postgres unreachable; refusing writes until it answers again");
    }
    let error = unavailable(&e);
    for (_, reply) in batch.drain(..) {
        let _ = reply.send(Err(error.clone()));
    }
    while let Ok((_, reply)) = rx.try_recv() {
        let _ = reply.send(Err(error.clone()));
    }
    true
}

fn micros_param(m: Micros) -> f64 {
    m.0 as f64
}

/// One group commit. Validation happens here, under the head lock, by the
/// writer's one [`stage`] (the local writer validates with it too) against
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
    let head = txn.query_one(&s.lock_head, &[]).await?;
    let mut seq: i64 = head.get(0);
    if (seq as u64) < local_seq {
        let e = WriteError::Unavailable(behind(seq as u64, local_seq));
        return Ok(ops.iter().map(|_| Err(e.clone())).collect());
    }
    let mut events = Events { chain: chain::from_sql(head.get(1)), ..Events::default() };
    let start = seq;
    // Futures polled together are pipelined on the connection: one round trip.
    let (mut services, mut current) =
        tokio::try_join!(read_services(&txn, s, ops), read_preferences(&txn, s, ops))?;
    let mut rows: HashMap<PrefKey, PrefRow> = HashMap::new();
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let mut shared = SharedState { services: &services, current: &current };
        let staged = match stage(&mut shared, op, channels, Micros::now()) {
            Ok(Ok(staged)) => staged,
            Ok(Err(e)) => {
                results.push(Err(e));
                continue;
            }
            Err(never) => match never {},
        };
        seq += 1;
        events.push(seq, &staged.event);
        match &staged.event {
            Event::Preference(change) => {
                let key = pref_key(change.customer, &change.scope);
                current.insert(key.clone(), (change.after, staged.created_at));
                // The last write of a key in the batch is the row's state.
                rows.insert(
                    key,
                    PrefRow {
                        status: change.after,
                        reason: change.reason.clone(),
                        origin: change.origin.clone(),
                        created_at: staged.created_at,
                        updated_at: change.at,
                        seq,
                    },
                );
            }
            Event::Service(change) => {
                upsert_service(&txn, s, &change.service).await?;
                services.insert(change.service.slug.to_string(), Ok(change.service.clone()));
            }
            // Written only by `prefsd recover` on a single node; no row to keep.
            Event::Recovery(_) => {}
        }
        results.push(Ok(staged.applied(seq as u64)));
    }
    if seq != start {
        let head = seq.to_string();
        let head_chain = chain::to_sql(events.chain);
        let event_params: [&(dyn ToSql + Sync); 3] = [&events.seqs, &events.bodies, &events.chains];
        let head_params: [&(dyn ToSql + Sync); 2] = [&seq, &head_chain];
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

/// The batch's events, as `unnest` arrays, and the running checksum.
#[derive(Default)]
struct Events {
    seqs: Vec<i64>,
    bodies: Vec<String>,
    chains: Vec<i64>,
    /// The chained checksum of the last event pushed (or of the head).
    chain: u64,
}

impl Events {
    fn push(&mut self, seq: i64, event: &Event) {
        self.chain = chain::next(self.chain, seq as u64, event);
        self.seqs.push(seq);
        self.bodies.push(serde_json::to_string(event).expect("events serialize"));
        self.chains.push(chain::to_sql(self.chain));
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
            keys.insert(pref_key(*customer, scope));
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

/// Writes a service's current-state row.
async fn upsert_service(
    txn: &tokio_postgres::Transaction<'_>,
    s: &Statements,
    service: &Service,
) -> Result<(), tokio_postgres::Error> {
    let body = serde_json::to_string(service).expect("services serialize");
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
    Ok(())
}

/// The PostgreSQL writer's view for staging: the services and current
/// preference rows the batch names, as read under the head lock and updated
/// by the batch so far.
struct SharedState<'a> {
    services: &'a Known,
    current: &'a HashMap<PrefKey, (Status, Micros)>,
}

impl Staging for SharedState<'_> {
    type Error = std::convert::Infallible;

    fn service(&self, slug: &ServiceSlug) -> Option<Result<&Service, WriteError>> {
        self.services.get(slug.as_str()).map(|s| s.as_ref().map_err(Clone::clone))
    }

    fn prior(
        &mut self,
        customer: CustomerId,
        scope: &Scope,
    ) -> Result<Option<(Status, Micros)>, Self::Error> {
        Ok(self.current.get(&pref_key(customer, scope)).copied())
    }
}

fn pref_key(customer: CustomerId, scope: &Scope) -> PrefKey {
    (customer.0.to_string(), scope.service.to_string(), scope.channel.to_string())
}
