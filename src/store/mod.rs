//! The redb store: services, explicit records, the event (audit) log with a
//! per-customer lookup, index snapshots and the schema version.
//!
//! Values are postcard-encoded. Every change arrives as a batch of
//! operations from the [`crate::writer`]; a batch is one write transaction.
//! A durable batch is made durable by the [`crate::wal`] (one append and one
//! `fdatasync`) before redb commits it with `Durability::None`; checkpoints
//! make redb durable and empty the log, and [`Store::open`] replays what a
//! crash left in it — or, when the log is damaged, refuses to open (see
//! [`crate::wal`]); [`repair`] is `prefsd recover`.
//!
//! redb latches after an I/O error (every later operation fails until the
//! database is reopened): after a failed commit or checkpoint the next
//! write batch reopens it and replays the log, so writes resume once a full
//! disk has room again. Its cache (read cache and write buffer together)
//! is [`StoreOptions::cache_bytes`], which bounds the store's memory.
//!
//! # Tables
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | name | u64 (`schema_version`, `last_seq`, `cluster_id`, `wal_refused_from`) |
//! | `services` | slug | [`Service`] |
//! | `records` | (customer, `service/channel`) | [`Record`] |
//! | `events` | seq | [`Event`] |
//! | `customer_events` | (customer, seq) | () |
//! | `snapshot` | `meta`, `t/CHANNEL`, `p/SERVICE/CHANNEL` | index sets at `meta.seq` |

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::domain::{ChannelName, CustomerId, Event, PreferenceChange, Record, Scope, Service, ServiceSlug};
use crate::index::{IdSet, Index};
use crate::wal::{Frames, Wal, WrapFile, sync_dir};

mod backend;
mod repair;
pub use backend::WrapDb;
pub use repair::{Repair, repair};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const RECORDS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("records");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const CUSTOMER_EVENTS: TableDefinition<(u64, u64), ()> = TableDefinition::new("customer_events");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// The on-disk layout this build reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

/// The redb file's name inside the data directory.
pub const DB_FILE: &str = "prefsd.redb";

/// Default redb cache. Measured with the release binary importing 1M
/// opt-outs, then 20,000 more writes: 48.9 MB peak resident, against 150 MB
/// with redb's own default of 1 GiB (the issue saw 305 MB).
pub const DEFAULT_CACHE_BYTES: usize = 32 << 20;

/// `meta` key: the first sequence number of a refused batch that could not
/// be cut from the log; the next replay drops it and everything after it.
const REFUSED_FROM: &str = "wal_refused_from";

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// redb's cache size in bytes.
    pub cache_bytes: usize,
    /// Stands between the write-ahead log and its file (tests fail it on demand).
    pub wrap_log: Option<WrapFile>,
    /// Stands between redb and its file (tests fail it on demand).
    pub wrap_db: Option<WrapDb>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { cache_bytes: DEFAULT_CACHE_BYTES, wrap_log: None, wrap_db: None }
    }
}

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
    /// The write-ahead log could not be written or read.
    Wal(String),
    /// The write-ahead log has a damaged frame with intact frames after it.
    WalDamaged {
        /// The log file.
        path: PathBuf,
        /// Byte offset of the damaged frame.
        offset: u64,
        /// Intact frames after it.
        later: usize,
        /// Their lowest and highest sequence numbers.
        seqs: (u64, u64),
    },
    /// The database is closed for a reopen after an I/O error.
    Unavailable,
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
            StoreError::Wal(e) => write!(f, "write-ahead log: {e}"),
            StoreError::WalDamaged { path, offset, later, seqs } => write!(
                f,
                "the write-ahead log {} is damaged at byte {offset}, and {later} intact frames \
                 (events {} to {}) follow the damage: they may be acknowledged writes, so prefsd \
                 will not start and drop them silently. With prefsd stopped, run \
                 `prefsd recover --data {}`: it keeps a copy of the log, replays every intact frame \
                 before and after the damage, and records the events it lost in the audit log",
                path.display(),
                seqs.0,
                seqs.1,
                path.parent().unwrap_or(Path::new(".")).display()
            ),
            StoreError::Unavailable => {
                f.write_str("the store is being reopened after an I/O error; try again")
            }
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
/// writers itself, and readers block only while a reopen after an I/O
/// error swaps the database.
pub struct Store {
    dir: PathBuf,
    /// How it was opened; a reopen opens redb the same way.
    options: StoreOptions,
    /// `None` only while [`Store::reopen`] swaps it. Every transaction is
    /// opened on a clone of the `Arc`, kept until it ends, so a reopen can
    /// tell when nobody uses the old database any more.
    db: RwLock<Option<Arc<Database>>>,
    /// Only the writer thread appends; the lock also keeps a checkpoint
    /// from racing a commit.
    wal: Mutex<WalState>,
    /// Set after a failed redb commit: redb fails everything after an I/O
    /// error until it is reopened.
    needs_reopen: AtomicBool,
    /// Events the last open (or reopen) replayed from the log.
    replayed: AtomicU64,
}

struct WalState {
    wal: Wal,
    /// Set when the log could not be cut back after a refused batch: its
    /// tail may hold that batch, so nothing more is accepted until a restart
    /// drops it (see the `wal` module doc).
    broken: Option<String>,
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
pub struct Batch<'s> {
    txn: redb::WriteTransaction,
    /// Held while the transaction lives (see [`Store::reopen`]).
    _db: Arc<Database>,
    /// The first sequence number this batch gives out.
    first_seq: u64,
    next_seq: u64,
    commit: Commit,
    /// The batch's events, for the write-ahead log (kept only when `Logged`).
    frames: Frames,
    store: &'s Store,
}

/// How a batch is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// Through the write-ahead log.
    Logged,
    /// By redb's own durable commit.
    Immediate,
    /// Not until a later durable commit.
    Deferred,
}

/// The tables of one batch, open for its whole staging.
pub struct Tables<'b> {
    records: redb::Table<'b, (u64, &'static str), &'static [u8]>,
    by_customer: redb::Table<'b, (u64, u64), ()>,
    events: redb::Table<'b, u64, &'static [u8]>,
    services: redb::Table<'b, &'static str, &'static [u8]>,
    next_seq: &'b mut u64,
    /// Where appended events are logged; `None` when the batch bypasses the log.
    frames: Option<&'b mut Frames>,
}

impl Tables<'_> {
    /// The sequence number the next appended event will get.
    pub fn next_seq(&self) -> u64 {
        *self.next_seq
    }

    /// The explicit record of one customer for one scope, as this batch sees it.
    pub fn record(&self, customer: CustomerId, scope: &Scope) -> Result<Option<Record>, StoreError> {
        let key = scope.key();
        match self.records.get((customer.0, key.as_str()))? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Appends `event` with the next sequence number and writes the state it
    /// implies: for a preference, the new record (keeping the first
    /// `created_at`); for a service, the service. Returns the sequence number
    /// and the record written.
    pub fn append(&mut self, event: &Event) -> Result<(u64, Option<Record>), StoreError> {
        let prior = match event {
            Event::Preference(change) => self.record(change.customer, &change.scope)?,
            Event::Service(_) | Event::Recovery(_) => None,
        };
        self.append_after(event, prior.as_ref())
    }

    /// [`Tables::append`] for a caller that has just read the scope's
    /// record (`prior`), which saves reading it again.
    pub fn append_after(
        &mut self,
        event: &Event,
        prior: Option<&Record>,
    ) -> Result<(u64, Option<Record>), StoreError> {
        let seq = *self.next_seq;
        let mut written = None;
        match event {
            Event::Preference(change) => {
                let record = Record {
                    status: change.after,
                    reason: change.reason.clone(),
                    source: change.origin.source.clone(),
                    created_at: prior.map_or(change.at, |r| r.created_at),
                    updated_at: change.at,
                    seq,
                };
                let key = change.scope.key();
                self.records.insert((change.customer.0, key.as_str()), encode(&record).as_slice())?;
                self.by_customer.insert((change.customer.0, seq), ())?;
                written = Some(record);
            }
            Event::Service(change) => {
                self.services.insert(change.service.slug.as_str(), encode(&change.service).as_slice())?;
            }
            Event::Recovery(_) => {}
        }
        let bytes = encode(event);
        self.events.insert(seq, bytes.as_slice())?;
        if let Some(frames) = &mut self.frames {
            frames.push(seq, &bytes);
        }
        *self.next_seq += 1;
        Ok((seq, written))
    }
}

impl Store {
    /// Opens (or creates) `prefsd.redb` in `dir`, creating `dir` if needed,
    /// with the default options.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, StoreOptions::default())
    }

    /// Opens (or creates) the store in `dir` and replays what its
    /// write-ahead log holds beyond redb.
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let store = Store::open_unreplayed(dir, &options)?;
        let replayed = {
            let mut state = store.wal();
            store.replay(&mut state)?
        };
        store.replayed.store(replayed, Ordering::Relaxed);
        Ok(store)
    }

    /// Opens redb and the log without replaying it.
    fn open_unreplayed(dir: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(dir.to_owned(), e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(|e| StoreError::Io(parent.to_owned(), e))?;
            }
        }
        let db = open_db(dir, options)?;
        let wal = Wal::open(dir, options.wrap_log.as_ref())
            .map_err(|e| StoreError::Wal(format!("cannot open it: {e}")))?;
        Ok(Store {
            dir: dir.to_owned(),
            options: options.clone(),
            db: RwLock::new(Some(Arc::new(db))),
            wal: Mutex::new(WalState { wal, broken: None }),
            needs_reopen: AtomicBool::new(false),
            replayed: AtomicU64::new(0),
        })
    }

    /// How many events the last open (or reopen) replayed from the log.
    pub fn replayed(&self) -> u64 {
        self.replayed.load(Ordering::Relaxed)
    }

    /// The database, for one transaction: keep the `Arc` until it ends.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(StoreError::Unavailable)
    }

    /// Replays the log's events that redb lost in a crash, commits them
    /// durably and empties the log. A torn tail is dropped; damage is
    /// refused; a refused batch recorded by [`Store::mark_broken`] is dropped.
    fn replay(&self, state: &mut WalState) -> Result<u64, StoreError> {
        let refused_from = self.meta(REFUSED_FROM)?;
        if state.wal.is_empty() && refused_from.is_none() {
            return Ok(0);
        }
        let scan = state.wal.scan().map_err(|e| StoreError::Wal(format!("cannot read it: {e}")))?;
        if let Some(damage) = &scan.damage {
            return Err(StoreError::WalDamaged {
                path: state.wal.path().to_owned(),
                offset: damage.offset,
                later: damage.later.len(),
                seqs: (damage.later[0].seq, damage.later[damage.later.len() - 1].seq),
            });
        }
        if scan.torn_tail() {
            tracing::info!(
                offset = scan.end,
                bytes = scan.len - scan.end,
                "dropped a torn last frame of the write-ahead log: it was never acknowledged"
            );
        }
        let limit = refused_from.unwrap_or(u64::MAX);
        let mut batch = self.start(Commit::Immediate)?;
        let from = batch.next_seq;
        let mut refused = 0u64;
        let mut tables = batch.tables()?;
        for frame in scan.frames {
            if frame.seq >= limit {
                refused += 1;
                continue;
            }
            if frame.seq < tables.next_seq() {
                continue;
            }
            if frame.seq > tables.next_seq() {
                return Err(StoreError::Wal(format!(
                    "it jumps from event {} to event {}; refusing to skip events",
                    tables.next_seq() - 1,
                    frame.seq
                )));
            }
            tables.append(&decode::<Event>(&frame.event)?)?;
        }
        drop(tables);
        let replayed = batch.next_seq - from;
        batch.write_last_seq()?;
        let txn = batch.txn;
        drop(batch._db);
        self.commit_durably(txn, state)?;
        if refused > 0 {
            tracing::warn!(
                refused,
                from_seq = limit,
                "dropped a refused batch that could not be cut from the write-ahead log"
            );
        }
        if refused_from.is_some() {
            // Only now that the log is empty: earlier, a crash would let
            // the refused frames replay.
            let db = self.db()?;
            let txn = db.begin_write()?;
            txn.open_table(META)?.remove(REFUSED_FROM)?;
            txn.commit()?;
        }
        if replayed > 0 {
            tracing::info!(replayed, "replayed events from the write-ahead log");
        }
        Ok(replayed)
    }

    fn meta(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(key)?.map(|v| v.value()))
    }

    /// After a refused batch (first sequence number `first`, appended at
    /// `mark`) could not be cut from the log: refuses every later write
    /// until a restart, and makes sure that restart cannot replay it.
    fn mark_broken(&self, state: &mut WalState, first: u64, mark: u64, bytes: u64, why: &str) {
        state.broken = Some(format!(
            "a refused batch could not be cut from the write-ahead log ({why}); \
             writes are refused until prefsd is restarted, which drops that batch"
        ));
        tracing::error!(
            error = why,
            first_seq = first,
            "write-ahead log stuck: refusing writes until a restart"
        );
        let recorded = (|| -> Result<(), StoreError> {
            let db = self.db()?;
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                let known = meta.get(REFUSED_FROM)?.map(|v| v.value());
                meta.insert(REFUSED_FROM, known.map_or(first, |k| k.min(first)))?;
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = recorded {
            self.needs_reopen.store(true, Ordering::Relaxed);
            match state.wal.poison(mark, bytes) {
                Ok(()) => tracing::error!(
                    error = %e,
                    offset = mark,
                    "cannot record the refused batch in redb: overwrote it in the log with zeros, \
                     which the next start drops as a torn tail"
                ),
                Err(p) => tracing::error!(
                    error = %e,
                    poison = %p,
                    offset = mark,
                    first_seq = first,
                    "cannot record the refused batch anywhere: a restart may replay it; \
                     run `prefsd recover` and check events from first_seq on"
                ),
            }
        }
    }

    /// After an I/O error, closes redb and opens it again, then replays the
    /// log into it (redb lost its non-durable commits, the log has them).
    fn reopen(&self) -> Result<(), StoreError> {
        let mut state = self.wal();
        if let Some(why) = &state.broken {
            return Err(StoreError::Wal(why.clone()));
        }
        {
            let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
            let deadline = Instant::now() + Duration::from_secs(5);
            while slot.as_ref().is_some_and(|db| Arc::strong_count(db) > 1) {
                if Instant::now() > deadline {
                    return Err(StoreError::Unavailable);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            *slot = None;
            *slot = Some(Arc::new(open_db(&self.dir, &self.options)?));
        }
        let replayed = self.replay(&mut state)?;
        self.needs_reopen.store(false, Ordering::Relaxed);
        tracing::warn!(replayed, "reopened the database after an I/O error");
        Ok(())
    }

    fn wal(&self) -> MutexGuard<'_, WalState> {
        // A panic while holding the lock cannot leave the log half-updated
        // in a way its own checks do not catch.
        self.wal.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes every committed batch durable in redb and empties the log.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let mut state = self.wal();
        self.checkpoint_locked(&mut state)
    }

    fn checkpoint_locked(&self, state: &mut WalState) -> Result<(), StoreError> {
        if state.wal.is_empty() || state.broken.is_some() {
            return Ok(());
        }
        // An empty durable commit persists every non-durable one before it.
        let db = self.db()?;
        let txn = db.begin_write()?;
        self.commit_durably(txn, state)
    }

    /// Commits `txn` with redb's own durable commit, which persists every
    /// non-durable commit before it too, so the log is redundant from here
    /// on and starts over (unless it is broken and must be kept for repair).
    fn commit_durably(
        &self,
        mut txn: redb::WriteTransaction,
        state: &mut WalState,
    ) -> Result<(), StoreError> {
        txn.set_durability(redb::Durability::Immediate).map_err(redb::Error::from)?;
        if let Err(e) = txn.commit() {
            self.needs_reopen.store(true, Ordering::Relaxed);
            return Err(e.into());
        }
        if state.broken.is_none() {
            state.wal.reset().map_err(|e| StoreError::Wal(format!("cannot empty it: {e}")))?;
        }
        Ok(())
    }

    /// The sequence number of the last committed event (0 when none).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get("last_seq")?.map(|v| v.value()).unwrap_or(0))
    }

    /// Binds this data dir to a PostgreSQL cluster id on first use, and
    /// refuses a data dir that holds another cluster's (or single-node) events.
    pub fn bind_cluster(&self, id: u64) -> Result<(), String> {
        let db = self.db().map_err(|e| e.to_string())?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
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
        let db = self.db()?;
        let txn = db.begin_read()?;
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
        let db = self.db()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(SERVICES)?;
        match table.get(slug)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// A customer's explicit records, in scope-key order.
    pub fn records(&self, customer: CustomerId) -> Result<Vec<(Scope, Record)>, StoreError> {
        let db = self.db()?;
        let txn = db.begin_read()?;
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
        let db = self.db()?;
        let txn = db.begin_read()?;
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
        let db = self.db()?;
        let txn = db.begin_read()?;
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
        let db = self.db()?;
        let txn = db.begin_read()?;
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
        let db = self.db()?;
        let txn = db.begin_read()?;
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
        let db = self.db()?;
        let txn = db.begin_write()?;
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
        let mut state = self.wal();
        self.commit_durably(txn, &mut state)
    }

    /// Starts the write transaction for one batch of writes prefsd is the
    /// system of record for: [`Batch::commit`] makes it durable through the
    /// write-ahead log.
    pub fn begin(&self) -> Result<Batch<'_>, StoreError> {
        if self.needs_reopen.load(Ordering::Relaxed) {
            self.reopen()?;
        }
        self.start(Commit::Logged)
    }

    /// Starts a write transaction for events whose system of record is
    /// elsewhere (cluster mode), bypassing the write-ahead log. A durable
    /// one is committed by redb itself, and makes every earlier batch
    /// durable too; a non-durable one is lost, with everything after the
    /// last durable one, if the process dies first — the events are fetched
    /// again.
    pub fn begin_with(&self, durable: bool) -> Result<Batch<'_>, StoreError> {
        self.start(if durable { Commit::Immediate } else { Commit::Deferred })
    }

    fn start(&self, commit: Commit) -> Result<Batch<'_>, StoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::None).map_err(redb::Error::from)?;
        let last = {
            let meta = txn.open_table(META)?;
            meta.get("last_seq")?.map(|v| v.value()).unwrap_or(0)
        };
        Ok(Batch {
            txn,
            _db: db,
            first_seq: last + 1,
            next_seq: last + 1,
            commit,
            frames: Frames::default(),
            store: self,
        })
    }
}

/// Opens (or creates) redb in `dir` and checks its schema version.
fn open_db(dir: &Path, options: &StoreOptions) -> Result<Database, StoreError> {
    let path = dir.join(DB_FILE);
    let existed = path.exists();
    let mut builder = Database::builder();
    builder.set_cache_size(options.cache_bytes);
    let opened = match &options.wrap_db {
        None => builder.create(&path),
        Some(wrap) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| StoreError::Io(path.clone(), e))?;
            let backend = redb::backends::FileBackend::new(file)?;
            builder.create_with_backend(backend::Boxed((wrap.0)(backend)))
        }
    };
    let db = match opened {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(StoreError::Io(
                path,
                std::io::Error::other("another process has it open (is prefsd running?)"),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    if !existed {
        sync_dir(dir).map_err(|e| StoreError::Io(dir.to_owned(), e))?;
    }
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
    Ok(db)
}

/// Applies one event to an index, as start-up replay and the writer do.
pub fn apply_event(index: &mut Index, event: &Event) {
    match event {
        Event::Preference(change) => {
            let _ = index.apply(change.customer, &change.scope, change.after);
        }
        Event::Service(change) => index.add_service(&change.service.slug),
        Event::Recovery(_) => {}
    }
}

impl Batch<'_> {
    /// Opens the tables a batch writes, once for the whole batch: opening a
    /// redb table costs more than the insert itself.
    pub fn tables(&mut self) -> Result<Tables<'_>, StoreError> {
        let txn = &self.txn;
        Ok(Tables {
            records: txn.open_table(RECORDS)?,
            by_customer: txn.open_table(CUSTOMER_EVENTS)?,
            events: txn.open_table(EVENTS)?,
            services: txn.open_table(SERVICES)?,
            next_seq: &mut self.next_seq,
            frames: (self.commit == Commit::Logged).then_some(&mut self.frames),
        })
    }

    /// The sequence number the next appended event will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Commits. For a logged or immediate batch, when this returns `Ok`
    /// the batch survives a crash: its events are in the write-ahead log, or
    /// redb committed them durably.
    pub fn commit(self) -> Result<(), StoreError> {
        let store = self.store;
        match self.commit {
            Commit::Deferred => {
                self.write_last_seq()?;
                self.txn.commit()?;
                Ok(())
            }
            Commit::Immediate => {
                self.write_last_seq()?;
                store.commit_durably(self.txn, &mut store.wal())
            }
            Commit::Logged => {
                let mut state = store.wal();
                if let Some(why) = &state.broken {
                    return Err(StoreError::Wal(why.clone()));
                }
                if self.frames.is_empty() {
                    // Every operation was refused: nothing was written.
                    self.txn.abort()?;
                    return Ok(());
                }
                self.write_last_seq()?;
                let mark = state.wal.len();
                let Batch { txn, _db, first_seq, frames, .. } = self;
                if let Err(e) = state.wal.append(&frames) {
                    // The transaction must end before redb takes another.
                    drop(txn);
                    if e.stuck.is_some() {
                        store.mark_broken(&mut state, first_seq, mark, frames.bytes(), &e.to_string());
                    }
                    return Err(StoreError::Wal(e.to_string()));
                }
                if let Err(e) = txn.commit() {
                    store.needs_reopen.store(true, Ordering::Relaxed);
                    if let Err(cut) = state.wal.cut(mark) {
                        let why = format!("{e}; then {cut}");
                        store.mark_broken(&mut state, first_seq, mark, frames.bytes(), &why);
                    }
                    return Err(e.into());
                }
                if state.wal.due()
                    && let Err(e) = store.checkpoint_locked(&mut state)
                {
                    // The log still holds everything: retried at the next commit.
                    tracing::warn!(error = %e, "checkpoint failed; the write-ahead log keeps growing");
                }
                Ok(())
            }
        }
    }

    /// Records the last sequence number in the batch's own transaction.
    fn write_last_seq(&self) -> Result<(), StoreError> {
        let mut meta = self.txn.open_table(META)?;
        meta.insert("last_seq", self.next_seq - 1)?;
        Ok(())
    }
}

// Cluster mode: the chained checksum of the last applied event
// (see `crate::cluster::chain`), kept beside `last_seq` in `meta`.
impl Store {
    /// The last applied sequence number and its chained checksum (`None`
    /// for a data directory written before checksums existed), read together.
    pub fn chain_state(&self) -> Result<(u64, Option<u64>), StoreError> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let last = meta.get("last_seq")?.map(|v| v.value()).unwrap_or(0);
        Ok((last, meta.get("chain")?.map(|v| v.value())))
    }

    /// Cluster mode's resynchronisation: keeps events up to `keep` (which
    /// PostgreSQL holds too, with checksum `chain` at `keep`), drops every
    /// later one, and rebuilds records, services and the customer index from
    /// the kept events, in one durable commit. The snapshot is dropped: the
    /// caller rebuilds the index from the records.
    pub fn rewind(&self, keep: u64, chain: u64) -> Result<(), StoreError> {
        let kept = {
            let db = self.db()?;
            let txn = db.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let mut kept = Vec::new();
            for row in events.range(..=keep)? {
                let (k, v) = row?;
                kept.push((k.value(), decode::<Event>(v.value())?));
            }
            kept
        };
        let mut batch = self.start(Commit::Immediate)?;
        {
            let txn = &batch.txn;
            txn.open_table(RECORDS)?.retain(|_, _| false)?;
            txn.open_table(CUSTOMER_EVENTS)?.retain(|_, _| false)?;
            txn.open_table(SERVICES)?.retain(|_, _| false)?;
            txn.open_table(EVENTS)?.retain(|_, _| false)?;
            txn.open_table(SNAPSHOT)?.retain(|_, _| false)?;
        }
        batch.next_seq = 1;
        let mut tables = batch.tables()?;
        for (seq, event) in kept {
            if seq != tables.next_seq() {
                return Err(StoreError::Corrupt(format!(
                    "event {seq} follows event {}",
                    tables.next_seq() - 1
                )));
            }
            tables.append(&event)?;
        }
        drop(tables);
        batch.set_chain(chain)?;
        batch.commit()
    }
}

impl Batch<'_> {
    /// The chained checksum of the last event committed before this batch.
    pub fn chain(&self) -> Result<Option<u64>, StoreError> {
        let meta = self.txn.open_table(META)?;
        Ok(meta.get("chain")?.map(|v| v.value()))
    }

    /// Records the chained checksum of the batch's last event.
    pub fn set_chain(&self, chain: u64) -> Result<(), StoreError> {
        let mut meta = self.txn.open_table(META)?;
        meta.insert("chain", chain)?;
        Ok(())
    }
}
