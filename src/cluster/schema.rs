//! The PostgreSQL schema cluster mode creates and upgrades.
//!
//! - **v1**: `prefsd_head` (the one row locked by every group commit),
//!   `prefsd_events` (the log) and the readable current-state tables
//!   `notification_services` and `notification_preferences`.
//! - **v2**: the chained checksum ([`super::chain`]) of every event
//!   (`prefsd_events.chain`) and of the head (`prefsd_head.chain`). A v1
//!   database is upgraded in place: the checksums of the events it holds
//!   are computed in the migration's own transaction.
//!
//! Migrations run under an advisory lock, so sidecars starting at once are safe.

use tokio_postgres::Client;

use super::chain;
use crate::domain::Event;

/// The schema version this build creates and reads.
pub const PG_SCHEMA_VERSION: i32 = 2;
/// Serializes migrations of sidecars starting at once.
const MIGRATION_LOCK: i64 = 0x7072_6566_7364; // "prefsd"
/// Events checksummed per round trip while upgrading to v2.
const BACKFILL: i64 = 5_000;

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

const SCHEMA_V2: &str = "
ALTER TABLE prefsd_events ADD COLUMN chain bigint;
ALTER TABLE prefsd_head ADD COLUMN chain bigint NOT NULL DEFAULT 0;
";

/// Creates or upgrades the schema; safe when several sidecars start at once.
pub async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let txn = client.transaction().await?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    let exists: bool = txn.query_one("SELECT to_regclass('prefsd_schema') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        txn.batch_execute("CREATE TABLE prefsd_schema (version integer NOT NULL)").await?;
    }
    let version: Option<i32> = txn.query_one("SELECT max(version) FROM prefsd_schema", &[]).await?.get(0);
    let version = version.unwrap_or(0);
    if version < 1 {
        txn.batch_execute(SCHEMA_V1).await?;
        tracing::info!(version = 1, "created the prefsd schema in postgres");
    }
    if version < 2 {
        txn.batch_execute(SCHEMA_V2).await?;
        let head = backfill_chain(&txn).await?;
        txn.execute("UPDATE prefsd_head SET chain = $1 WHERE id = 1", &[&chain::to_sql(head)]).await?;
        txn.batch_execute("ALTER TABLE prefsd_events ALTER COLUMN chain SET NOT NULL").await?;
        txn.execute("DELETE FROM prefsd_schema", &[]).await?;
        txn.execute("INSERT INTO prefsd_schema VALUES ($1)", &[&PG_SCHEMA_VERSION]).await?;
        tracing::info!(
            version = PG_SCHEMA_VERSION,
            "upgraded the prefsd schema in postgres: chained checksums"
        );
    }
    txn.commit().await
}

/// Computes the chained checksum of every event a v1 database holds, in
/// order; returns the last one (0 when there are none).
async fn backfill_chain(txn: &tokio_postgres::Transaction<'_>) -> Result<u64, tokio_postgres::Error> {
    let fetch =
        txn.prepare("SELECT seq, body::text FROM prefsd_events WHERE seq > $1 ORDER BY seq LIMIT $2").await?;
    let update = txn
        .prepare("UPDATE prefsd_events e SET chain = u.c FROM unnest($1::bigint[], $2::bigint[]) AS u(q, c) WHERE e.seq = u.q")
        .await?;
    let (mut after, mut prev) = (0i64, 0u64);
    loop {
        let rows = txn.query(&fetch, &[&after, &BACKFILL]).await?;
        let Some(last) = rows.last() else { return Ok(prev) };
        after = last.get(0);
        let (mut seqs, mut chains) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
        for row in &rows {
            let seq: i64 = row.get(0);
            // An unreadable event keeps a checksum of its own position, so
            // the chain still covers every event after it.
            let next = match serde_json::from_str::<Event>(row.get::<_, &str>(1)) {
                Ok(event) => chain::next(prev, seq as u64, &event),
                Err(_) => prev ^ (seq as u64),
            };
            seqs.push(seq);
            chains.push(chain::to_sql(next));
            prev = next;
        }
        txn.execute(&update, &[&seqs, &chains]).await?;
    }
}
