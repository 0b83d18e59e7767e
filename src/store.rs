//! The redb store: services, explicit records, the event (audit) log with a
//! per-customer lookup, index snapshots and the schema version.
//!
//! Values are postcard-encoded. Every change arrives as a batch of
//! operations from the [`crate::writer`]; a batch is one write transaction,
//! committed with `Durability::Immediate` before anyone is told it happened.
//!
//! # Tables
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | name | u64 (`schema_version`, `last_seq`) |
//! | `services` | slug | [`Service`] |
//! | `records` | (customer, `service/channel`) | [`Record`] |
//! | `events` | seq | [`Event`] |
//! | `customer_events` | (customer, seq) | () |
//! | `snapshot` | `meta`, `t/CHANNEL`, `p/SERVICE/CHANNEL` | index sets at `meta.seq` |

use std::fmt;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::domain::{ChannelName, CustomerId, Event, PreferenceChange, Record, Scope, Service, ServiceSlug};
use crate::index::{IdSet, Index};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const RECORDS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("records");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const CUSTOMER_EVENTS: TableDefinition<(u64, u64), ()> = TableDefinition::new("customer_events");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// The on-disk layout this build reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

/// What went wrong in the store.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// redb failed (I/O, corruption, a full disk).
    Db(redb::Error),
    /// A stored value could not be decoded.
    Corrupt(String),
    /// The data directory was written by another schema version.
    Schema {
        /// What the file says.
        found: u64,
    },
    /// The data directory could not be created.
    Io(PathBuf, std::io::Error),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Db(e) => write!(f, "storage error: {e}"),
            StoreError::Corrupt(e) => write!(f, "stored data could not be decoded: {e}"),
            StoreError::Schema { found } => write!(
                f,
                "the data directory has schema version {found}, this prefsd reads version {SCHEMA_VERSION}"
            ),
            StoreError::Io(p, e) => write!(f, "cannot use data directory {}: {e}", p.display()),
        }
    }
}

impl std::error::Error for StoreError {}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<postcard::Error> for StoreError {
    fn from(e: postcard::Error) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard only fails on writers that run out of room; a Vec never does.
    postcard::to_allocvec(value).expect("postcard encodes into a Vec")
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    Ok(postcard::from_bytes(bytes)?)
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotMeta {
    seq: u64,
    channels: Vec<String>,
    services: Vec<String>,
}

/// The redb database behind a sidecar. Cheap to share: redb serializes
/// writers itself and readers never block.
pub struct Store {
    db: Database,
}

/// What the writer needs to validate a batch without reading it back.
pub struct Loaded {
    /// The index, current as of `last_seq`.
    pub index: Index,
    /// Every service, archived ones included.
    pub services: Vec<Service>,
    /// The sequence number of the last applied event.
    pub last_seq: u64,
    /// How the index was obtained, for the start-up log line.
    pub from_snapshot: bool,
}

/// A write transaction over one batch: the writer's view of the tables.
pub struct Batch {
    txn: redb::WriteTransaction,
    next_seq: u64,
}

impl Store {
    /// Opens (or creates) `prefsd.redb` in `dir`, creating `dir` if needed.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(dir.to_owned(), e))?;
        let db = Database::create(dir.join("prefsd.redb"))?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let version = meta.get("schema_version")?.map(|v| v.value());
            match version {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(found) => return Err(StoreError::Schema { found }),
            }
            txn.open_table(SERVICES)?;
            txn.open_table(RECORDS)?;
            txn.open_table(EVENTS)?;
            txn.open_table(CUSTOMER_EVENTS)?;
            txn.open_table(SNAPSHOT)?;
        }
        txn.commit()?;
        Ok(Store { db })
    }

    /// The sequence number of the last committed event (0 when none).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get("last_seq")?.map(|v| v.value()).unwrap_or(0))
    }

    /// Binds this data dir to a PostgreSQL cluster id on first use, and
    /// refuses a data dir that holds another cluster's (or single-node) events.
    pub fn bind_cluster(&self, id: u64) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            let known = meta.get("cluster_id").map_err(|e| e.to_string())?.map(|v| v.value());
            let last = meta.get("last_seq").map_err(|e| e.to_string())?.map(|v| v.value()).unwrap_or(0);
            match known {
                Some(k) if k == id => return Ok(()),
                Some(_) => {
                    return Err("this data directory belongs to another postgres cluster; start with an empty data directory".into());
                }
                None if last > 0 => {
                    return Err(format!(
                        "this data directory holds {last} single-node events; cluster mode needs an empty data directory \
                         (export the audit log and import it into the cluster instead)"
                    ));
                }
                None => {
                    meta.insert("cluster_id", id).map_err(|e| e.to_string())?;
                }
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }

    /// Every service, in slug order.
    pub fn services(&self) -> Result<Vec<Service>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SERVICES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, v) = row?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    /// One service.
    pub fn service(&self, slug: &str) -> Result<Option<Service>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SERVICES)?;
        match table.get(slug)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// A customer's explicit records, in scope-key order.
    pub fn records(&self, customer: CustomerId) -> Result<Vec<(Scope, Record)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let mut out = Vec::new();
        // Open-ended, stopped by the check below: an exclusive upper bound of
        // (customer + 1, "") would be empty for customer u64::MAX.
        for row in table.range((customer.0, "")..)? {
            let (k, v) = row?;
            let (c, scope) = k.value();
            if c != customer.0 {
                break;
            }
            let scope = Scope::from_key(scope).map_err(|e| StoreError::Corrupt(e.0))?;
            out.push((scope, decode(v.value())?));
        }
        Ok(out)
    }

    /// A customer's preference changes, oldest first.
    pub fn customer_events(&self, customer: CustomerId) -> Result<Vec<(u64, PreferenceChange)>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(CUSTOMER_EVENTS)?;
        let events = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in index.range((customer.0, 0)..=(customer.0, u64::MAX))? {
            let (k, _) = row?;
            let (_, seq) = k.value();
            let bytes = events
                .get(seq)?
                .ok_or_else(|| StoreError::Corrupt(format!("event {seq} is indexed but missing")))?;
            if let Event::Preference(change) = decode(bytes.value())? {
                out.push((seq, change));
            }
        }
        Ok(out)
    }

    /// Up to `limit` events with sequence numbers above `after`, in order.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>, StoreError> {
        let txn = self.db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        if after == u64::MAX {
            return Ok(out);
        }
        for row in events.range(after + 1..)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            out.push((k.value(), decode(v.value())?));
        }
        Ok(out)
    }

    /// Loads the index for `channels`: from the snapshot plus the events
    /// after it when the snapshot matches the configuration, otherwise by a
    /// sequential scan of the records.
    pub fn load(&self, channels: &[ChannelName]) -> Result<Loaded, StoreError> {
        let services = self.services()?;
        let last_seq = self.last_seq()?;
        if let Some((mut index, seq)) = self.load_snapshot(channels)? {
            let mut after = seq;
            loop {
                let events = self.events_after(after, 4096)?;
                let Some(&(last, _)) = events.last() else { break };
                for (_, event) in &events {
                    apply_event(&mut index, event);
                }
                after = last;
            }
            return Ok(Loaded { index, services, last_seq, from_snapshot: true });
        }
        let index = self.rebuild_index(channels)?;
        Ok(Loaded { index, services, last_seq, from_snapshot: false })
    }

    /// Builds the index from the stored services and records alone, ignoring
    /// any snapshot: records are read in key order (customer by customer), and
    /// each customer's records are applied oldest first.
    pub fn rebuild_index(&self, channels: &[ChannelName]) -> Result<Index, StoreError> {
        let mut index = Index::new(channels.to_vec());
        for service in self.services()? {
            index.add_service(&service.slug);
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let mut current: Option<u64> = None;
        let mut pending: Vec<(u64, Scope, crate::domain::Status)> = Vec::new();
        let flush =
            |index: &mut Index, customer: u64, pending: &mut Vec<(u64, Scope, crate::domain::Status)>| {
                pending.sort_unstable_by_key(|(seq, _, _)| *seq);
                for (_, scope, status) in pending.drain(..) {
                    // Records for a channel no longer configured are kept but not indexed.
                    let _ = index.apply(CustomerId(customer), &scope, status);
                }
            };
        for row in table.iter()? {
            let (k, v) = row?;
            let (customer, scope) = k.value();
            if current != Some(customer) {
                if let Some(prev) = current {
                    flush(&mut index, prev, &mut pending);
                }
                current = Some(customer);
            }
            let scope = Scope::from_key(scope).map_err(|e| StoreError::Corrupt(e.0))?;
            let record: Record = decode(v.value())?;
            pending.push((record.seq, scope, record.status));
        }
        if let Some(prev) = current {
            flush(&mut index, prev, &mut pending);
        }
        Ok(index)
    }

    fn load_snapshot(&self, channels: &[ChannelName]) -> Result<Option<(Index, u64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOT)?;
        let Some(meta) = table.get("meta")? else { return Ok(None) };
        let meta: SnapshotMeta = decode(meta.value())?;
        if meta.channels.iter().map(String::as_str).ne(channels.iter().map(ChannelName::as_str)) {
            return Ok(None);
        }
        let read = |key: String| -> Result<Option<IdSet>, StoreError> {
            match table.get(key.as_str())? {
                Some(v) => IdSet::deserialize_from(v.value())
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(format!("snapshot {key}: {e}"))),
                None => Ok(None),
            }
        };
        let mut templates = Vec::new();
        for c in channels {
            let Some(set) = read(format!("t/{c}"))? else { return Ok(None) };
            templates.push(set);
        }
        let mut rows = Vec::new();
        for s in &meta.services {
            let slug = ServiceSlug::parse(s).map_err(|e| StoreError::Corrupt(e.0))?;
            let mut sets = Vec::new();
            for c in channels {
                let Some(set) = read(format!("p/{s}/{c}"))? else { return Ok(None) };
                sets.push(set);
            }
            rows.push((slug, sets));
        }
        Ok(Index::from_parts(channels.to_vec(), rows, templates).map(|i| (i, meta.seq)))
    }

    /// Replaces the snapshot with `index` as of event `seq`.
    pub fn write_snapshot(&self, index: &Index, seq: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(SNAPSHOT)?;
            table.retain(|_, _| false)?;
            let meta = SnapshotMeta {
                seq,
                channels: index.channels().iter().map(|c| c.to_string()).collect(),
                services: index.services().iter().map(|s| s.to_string()).collect(),
            };
            table.insert("meta", encode(&meta).as_slice())?;
            let mut buf = Vec::new();
            for (c, set) in index.channels().iter().zip(index.templates()) {
                buf.clear();
                set.serialize_into(&mut buf);
                table.insert(format!("t/{c}").as_str(), buf.as_slice())?;
            }
            for (s, c, set) in index.iter_pairs() {
                buf.clear();
                set.serialize_into(&mut buf);
                table.insert(format!("p/{s}/{c}").as_str(), buf.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Starts the write transaction for one batch.
    pub fn begin(&self) -> Result<Batch, StoreError> {
        self.begin_with(true)
    }

    /// Starts a write transaction; a non-durable one is made durable by the
    /// next durable commit, and lost with everything after the last durable
    /// one if the process dies first — right for events whose system of
    /// record is elsewhere (cluster mode), which are fetched again.
    pub fn begin_with(&self, durable: bool) -> Result<Batch, StoreError> {
        let mut txn = self.db.begin_write()?;
        let durability = if durable { redb::Durability::Immediate } else { redb::Durability::None };
        txn.set_durability(durability).map_err(redb::Error::from)?;
        let last = {
            let meta = txn.open_table(META)?;
            meta.get("last_seq")?.map(|v| v.value()).unwrap_or(0)
        };
        Ok(Batch { txn, next_seq: last + 1 })
    }
}

/// Applies one event to an index, as start-up replay and the writer do.
pub fn apply_event(index: &mut Index, event: &Event) {
    match event {
        Event::Preference(change) => {
            let _ = index.apply(change.customer, &change.scope, change.after);
        }
        Event::Service(change) => index.add_service(&change.service.slug),
    }
}

impl Batch {
    /// The explicit record of one customer for one scope, as this batch sees it.
    pub fn record(&self, customer: CustomerId, scope: &Scope) -> Result<Option<Record>, StoreError> {
        let table = self.txn.open_table(RECORDS)?;
        let key = scope.key();
        match table.get((customer.0, key.as_str()))? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Appends `event` with the next sequence number and writes the state it
    /// implies: for a preference, the new record (keeping the first
    /// `created_at`); for a service, the service. Returns the sequence number
    /// and the record written.
    pub fn append(&mut self, event: &Event) -> Result<(u64, Option<Record>), StoreError> {
        let seq = self.next_seq;
        let mut written = None;
        match event {
            Event::Preference(change) => {
                let created_at =
                    self.record(change.customer, &change.scope)?.map_or(change.at, |r| r.created_at);
                let record = Record {
                    status: change.after,
                    reason: change.reason.clone(),
                    source: change.origin.source.clone(),
                    created_at,
                    updated_at: change.at,
                    seq,
                };
                let mut records = self.txn.open_table(RECORDS)?;
                let key = change.scope.key();
                records.insert((change.customer.0, key.as_str()), encode(&record).as_slice())?;
                let mut by_customer = self.txn.open_table(CUSTOMER_EVENTS)?;
                by_customer.insert((change.customer.0, seq), ())?;
                written = Some(record);
            }
            Event::Service(change) => {
                let mut services = self.txn.open_table(SERVICES)?;
                services.insert(change.service.slug.as_str(), encode(&change.service).as_slice())?;
            }
        }
        let mut events = self.txn.open_table(EVENTS)?;
        events.insert(seq, encode(event).as_slice())?;
        self.next_seq += 1;
        Ok((seq, written))
    }

    /// A value of the `meta` table.
    pub fn meta(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let meta = self.txn.open_table(META)?;
        Ok(meta.get(name)?.map(|v| v.value()))
    }

    /// Sets a value of the `meta` table.
    pub fn set_meta(&mut self, name: &str, value: u64) -> Result<(), StoreError> {
        let mut meta = self.txn.open_table(META)?;
        meta.insert(name, value)?;
        Ok(())
    }

    /// The sequence number the next appended event will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Commits durably: when this returns `Ok`, the batch survives a crash.
    pub fn commit(self) -> Result<(), StoreError> {
        {
            let mut meta = self.txn.open_table(META)?;
            meta.insert("last_seq", self.next_seq - 1)?;
        }
        self.txn.commit()?;
        Ok(())
    }
}
