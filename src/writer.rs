//! Group commit: one thread owns every write.
//!
//! Requests queue on a bounded channel; the writer thread takes everything
//! queued (up to `max_batch`), validates and applies it in one redb write
//! transaction, commits durably (one write-ahead-log append and one fsync
//! for the whole batch, see [`crate::wal`]), then
//! applies the committed events to the index in sequence order and only
//! then answers each request. So an acknowledged write is on disk and
//! visible to checks, and concurrent writers share one commit.
//!
//! There is one write path: [`stage`] validates every write and turns it
//! into its event, in both modes. The local writer appends the staged events
//! to redb and the write-ahead log; in cluster mode the PostgreSQL writer
//! (`crate::cluster`) stages with the same function against the rows it read
//! under its lock and appends them to PostgreSQL's log, so the two modes
//! cannot drift apart. Events committed in PostgreSQL come back through
//! [`Writer::apply`], checksum-checked, in order.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use crate::domain::{
    ChannelName, CustomerId, Event, Micros, Origin, PreferenceChange, Record, Scope, Service, ServiceChange,
    ServiceSlug, Status, Target,
};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, apply_event};

/// One change a client asks for.
#[derive(Debug, Clone)]
pub enum Op {
    /// Write a customer's preference for a scope.
    SetPreference {
        /// Whose.
        customer: CustomerId,
        /// Which scope.
        scope: Scope,
        /// The new status.
        status: Status,
        /// Optional free text.
        reason: Option<String>,
        /// Who and how.
        origin: Origin,
    },
    /// Register a service.
    CreateService {
        /// Its slug.
        slug: ServiceSlug,
        /// Display name.
        name: String,
        /// Description.
        description: String,
        /// API key name.
        actor: String,
    },
    /// Rename, describe, archive or restore a service.
    UpdateService {
        /// Which.
        slug: ServiceSlug,
        /// New display name.
        name: Option<String>,
        /// New description.
        description: Option<String>,
        /// Archive (`true`) or restore (`false`).
        archived: Option<bool>,
        /// API key name.
        actor: String,
    },
}

/// What an accepted write became.
#[derive(Debug, Clone)]
pub enum Applied {
    /// The stored record and its event's sequence number.
    Preference {
        /// Audit sequence number.
        seq: u64,
        /// The scope written.
        scope: Scope,
        /// The record as stored.
        record: Record,
    },
    /// The service as stored and its event's sequence number.
    Service {
        /// Event sequence number.
        seq: u64,
        /// The service after the change.
        service: Service,
    },
}

impl Applied {
    /// The event's sequence number.
    pub fn seq(&self) -> u64 {
        match self {
            Applied::Preference { seq, .. } | Applied::Service { seq, .. } => *seq,
        }
    }
}

/// Why a write was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteError {
    /// No service by that slug.
    UnknownService(String),
    /// The channel is not configured.
    UnknownChannel(String),
    /// The service is archived and takes no new writes.
    Archived(String),
    /// A service by that slug exists already.
    ServiceExists(String),
    /// The store failed; nothing in the batch was committed.
    Store(String),
    /// The shared store (cluster mode) cannot be reached; nothing was acknowledged.
    Unavailable(String),
    /// prefsd is shutting down.
    Closed,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::UnknownService(s) => write!(f, "no service {s:?} is registered"),
            WriteError::UnknownChannel(c) => write!(f, "channel {c:?} is not configured"),
            WriteError::Archived(s) => {
                write!(f, "service {s:?} is archived and takes no new preferences")
            }
            WriteError::ServiceExists(s) => write!(f, "service {s:?} exists already"),
            WriteError::Store(e) => write!(f, "the write was not stored: {e}"),
            WriteError::Unavailable(e) => f.write_str(e),
            WriteError::Closed => f.write_str("prefsd is shutting down"),
        }
    }
}

impl std::error::Error for WriteError {}

/// Where the answer to one write goes.
pub(crate) type Reply = oneshot::Sender<Result<Applied, WriteError>>;

/// Queues one write on a writer's channel (`wrap` makes its message) and
/// waits for the answer.
pub(crate) async fn submit<C>(
    tx: &mpsc::Sender<C>,
    op: Op,
    wrap: impl FnOnce(Op, Reply) -> C,
) -> Result<Applied, WriteError> {
    let (reply, rx) = oneshot::channel();
    tx.send(wrap(op, reply)).await.map_err(|_| WriteError::Closed)?;
    rx.await.map_err(|_| WriteError::Closed)?
}

/// Queues many writes before waiting for any, so they can share a group
/// commit; answers come back in order.
pub(crate) async fn submit_many<C>(
    tx: &mpsc::Sender<C>,
    ops: Vec<Op>,
    wrap: impl Fn(Op, Reply) -> C,
) -> Vec<Result<Applied, WriteError>> {
    let mut waits = Vec::with_capacity(ops.len());
    for op in ops {
        let (reply, rx) = oneshot::channel();
        if tx.send(wrap(op, reply)).await.is_err() {
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

/// Why events committed elsewhere could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// The local store failed (a full disk, an I/O error); retry later.
    Store(String),
    /// The events do not follow the last applied one.
    Gap(String),
    /// An event's chained checksum differs from the one computed here: the
    /// log this sidecar applied is not the one PostgreSQL now holds.
    Diverged(String),
    /// prefsd is shutting down.
    Closed,
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyError::Store(e) => write!(f, "the local store failed: {e}"),
            ApplyError::Gap(e) | ApplyError::Diverged(e) => f.write_str(e),
            ApplyError::Closed => f.write_str("prefsd is shutting down"),
        }
    }
}

/// An event committed elsewhere, with its sequence number and chained checksum.
pub type Committed = (u64, Event, u64);

enum Command {
    Write(Op, Reply),
    Apply(Vec<Committed>, oneshot::Sender<Result<u64, ApplyError>>),
    Rewind(u64, u64, oneshot::Sender<Result<(), String>>),
    Snapshot,
    Close(oneshot::Sender<()>),
}

/// A cheap handle to the writer thread (and, in cluster mode, to the
/// PostgreSQL writer that takes client writes instead).
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Command>,
    applied: watch::Receiver<u64>,
    cluster: Option<crate::cluster::Cluster>,
}

/// Settings of the writer thread.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Most operations in one transaction.
    pub max_batch: usize,
    /// Queue length before callers wait.
    pub queue: usize,
}

impl Writer {
    /// Starts the writer thread over `store`, which it owns from now on;
    /// `services` and `last_seq` are what the store held at load.
    pub fn start(
        store: Arc<Store>,
        index: Arc<RwLock<Index>>,
        services: Vec<Service>,
        last_seq: u64,
        config: WriterConfig,
        metrics: Arc<Metrics>,
    ) -> (Writer, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let (applied_tx, applied) = watch::channel(last_seq);
        let services = services.into_iter().map(|s| (s.slug.clone(), s)).collect();
        let mut state = State {
            store,
            index,
            services,
            metrics,
            max_batch: config.max_batch.max(1),
            snapshot_seq: None,
            applied: applied_tx,
            last_durable: Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name("prefsd-writer".into())
            .spawn(move || state.run(rx))
            .expect("spawn the writer thread");
        (Writer { tx, applied, cluster: None }, handle)
    }

    /// Routes client writes to PostgreSQL from now on (cluster mode).
    pub fn set_cluster(&mut self, cluster: crate::cluster::Cluster) {
        self.cluster = Some(cluster);
    }

    /// Follows the sequence number of the last event applied locally.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Applies events that were committed elsewhere (PostgreSQL), in order,
    /// in one local transaction; events at or below the local sequence are
    /// skipped, so each is applied exactly once. Each event's chained
    /// checksum is checked against the one computed from the last applied
    /// event's, and the last is stored with `last_seq`. Returns the new
    /// local sequence.
    pub async fn apply(&self, events: Vec<Committed>) -> Result<u64, ApplyError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Apply(events, reply)).await.map_err(|_| ApplyError::Closed)?;
        rx.await.map_err(|_| ApplyError::Closed)?
    }

    /// Cluster mode's resynchronisation: drops every event after `keep`
    /// (whose checksum is `chain`), rebuilds records, services and the
    /// index from what is kept, and publishes `keep` as the applied sequence.
    pub async fn rewind(&self, keep: u64, chain: u64) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Rewind(keep, chain, reply)).await.map_err(|_| "prefsd is shutting down")?;
        rx.await.map_err(|_| "prefsd is shutting down".to_owned())?
    }

    /// Submits one operation and waits until it is durably committed and
    /// visible in the index (or refused).
    pub async fn write(&self, op: Op) -> Result<Applied, WriteError> {
        if let Some(cluster) = &self.cluster {
            return cluster.write(op).await;
        }
        submit(&self.tx, op, Command::Write).await
    }

    /// Submits many operations at once; answers come back in order.
    pub async fn write_many(&self, ops: Vec<Op>) -> Vec<Result<Applied, WriteError>> {
        if let Some(cluster) = &self.cluster {
            return cluster.write_many(ops).await;
        }
        submit_many(&self.tx, ops, Command::Write).await
    }

    /// Asks for a snapshot of the index at the next quiet moment.
    pub fn request_snapshot(&self) {
        let _ = self.tx.try_send(Command::Snapshot);
    }

    /// Finishes what is queued, writes a final snapshot and stops the thread.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Close(done)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct State {
    store: Arc<Store>,
    index: Arc<RwLock<Index>>,
    services: HashMap<ServiceSlug, Service>,
    metrics: Arc<Metrics>,
    max_batch: usize,
    /// Sequence number the stored snapshot is at, once known.
    snapshot_seq: Option<u64>,
    /// Published after every commit: the last locally applied sequence.
    applied: watch::Sender<u64>,
    /// When an applied batch was last committed durably (cluster mode).
    last_durable: Instant,
}

/// Cluster mode: the longest stretch of applied events not yet fsynced locally.
const LOCAL_FSYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl State {
    fn run(&mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<(Op, Reply)> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut close = None;
            let mut snapshot = false;
            let mut applies = Vec::new();
            let mut rewind = None;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Write(op, reply) => batch.push((op, reply)),
                    Command::Apply(events, reply) => applies.push((events, reply)),
                    Command::Rewind(keep, chain, reply) => rewind = Some((keep, chain, reply)),
                    Command::Snapshot => snapshot = true,
                    Command::Close(done) => close = Some(done),
                }
                if batch.len() < self.max_batch && close.is_none() {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            for (events, reply) in applies {
                let _ = reply.send(self.apply_events(events));
            }
            if let Some((keep, chain, reply)) = rewind {
                let _ = reply.send(self.rewind(keep, chain));
            }
            if snapshot || close.is_some() {
                self.snapshot();
            }
            if let Some(done) = close {
                if let Err(e) = self.store.checkpoint() {
                    tracing::warn!(error = %e, "final checkpoint failed; the next start replays the write-ahead log");
                }
                rx.close();
                // Anything queued behind the close is refused.
                while let Ok(cmd) = rx.try_recv() {
                    if let Command::Write(_, reply) = cmd {
                        let _ = reply.send(Err(WriteError::Closed));
                    }
                }
                let _ = done.send(());
                return;
            }
        }
    }

    fn apply_events(&mut self, events: Vec<Committed>) -> Result<u64, ApplyError> {
        let started = Instant::now();
        let store_error = |e: StoreError| ApplyError::Store(e.to_string());
        // PostgreSQL holds these durably: fsync locally at most once a
        // second; a crash loses at most that second, fetched again on start.
        let durable = self.last_durable.elapsed() >= LOCAL_FSYNC_INTERVAL;
        let mut txn = self.store.begin_with(durable).map_err(store_error)?;
        let mut chain = txn.chain().map_err(store_error)?;
        let mut applied = Vec::with_capacity(events.len());
        let mut tables = txn.tables().map_err(store_error)?;
        for (seq, event, theirs) in events {
            let next = tables.next_seq();
            if seq < next {
                continue;
            }
            if seq > next {
                return Err(ApplyError::Gap(format!(
                    "event {seq} arrived before event {next}: refusing to skip"
                )));
            }
            // A data directory from before checksums (or an empty one)
            // takes the first checksum it is given on trust.
            let ours = match chain {
                Some(prev) => crate::cluster::chain::next(prev, seq, &event),
                None if seq == 1 => crate::cluster::chain::next(0, seq, &event),
                None => theirs,
            };
            if ours != theirs {
                return Err(ApplyError::Diverged(format!(
                    "event {seq} in postgres does not follow the events this sidecar applied before it \
                     (checksum {theirs:016x}, expected {ours:016x})"
                )));
            }
            chain = Some(ours);
            tables.append(&event).map_err(store_error)?;
            applied.push(event);
        }
        drop(tables);
        let last = txn.next_seq() - 1;
        if applied.is_empty() {
            return Ok(last);
        }
        if let Some(chain) = chain {
            txn.set_chain(chain).map_err(store_error)?;
        }
        txn.commit().map_err(store_error)?;
        if durable {
            self.last_durable = Instant::now();
        }
        self.metrics.observe_commit(started.elapsed(), applied.len());
        let mut index = self.index.write().expect("index lock");
        for event in &applied {
            apply_event(&mut index, event);
        }
        drop(index);
        for event in &applied {
            if let Event::Service(change) = event {
                self.services.insert(change.service.slug.clone(), change.service.clone());
            }
            self.metrics.count_write(event);
        }
        self.metrics.set_last_seq(last);
        self.applied.send_replace(last);
        Ok(last)
    }

    fn rewind(&mut self, keep: u64, chain: u64) -> Result<(), String> {
        self.store.rewind(keep, chain).map_err(|e| e.to_string())?;
        let channels = self.index.read().expect("index lock").channels().to_vec();
        let index = self.store.rebuild_index(&channels).map_err(|e| e.to_string())?;
        let services = self.store.services().map_err(|e| e.to_string())?;
        *self.index.write().expect("index lock") = index;
        self.services = services.into_iter().map(|s| (s.slug.clone(), s)).collect();
        self.snapshot_seq = None;
        self.last_durable = Instant::now();
        self.metrics.set_last_seq(keep);
        self.applied.send_replace(keep);
        Ok(())
    }

    fn snapshot(&mut self) {
        let seq = match self.store.last_seq() {
            Ok(seq) => seq,
            Err(e) => return tracing::warn!(error = %e, "cannot read the sequence for a snapshot"),
        };
        if self.snapshot_seq == Some(seq) {
            return;
        }
        let started = Instant::now();
        let index = self.index.read().expect("index lock").clone();
        match self.store.write_snapshot(&index, seq) {
            Ok(()) => {
                self.snapshot_seq = Some(seq);
                tracing::debug!(seq, ms = started.elapsed().as_millis() as u64, "index snapshot written");
            }
            Err(e) => tracing::warn!(error = %e, "index snapshot failed; start-up will replay more events"),
        }
    }

    fn commit(&mut self, batch: &mut Vec<(Op, Reply)>) {
        let started = Instant::now();
        let saved_services = self.services.clone();
        let store = Arc::clone(&self.store);
        let outcome = self.stage(&store, batch);
        match outcome {
            Ok((txn, results)) => match txn.commit() {
                Ok(()) => {
                    let elapsed = started.elapsed();
                    self.metrics.observe_commit(elapsed, batch.len());
                    let mut index = self.index.write().expect("index lock");
                    for (event, _) in results.iter().flatten() {
                        apply_event(&mut index, event);
                    }
                    drop(index);
                    if let Some(seq) = results.iter().flatten().map(|(_, a)| a.seq()).max() {
                        self.metrics.set_last_seq(seq);
                        self.applied.send_replace(seq);
                    }
                    for ((_, reply), result) in batch.drain(..).zip(results) {
                        if let Ok((event, _)) = &result {
                            self.metrics.count_write(event);
                        }
                        let _ = reply.send(result.map(|(_, applied)| applied));
                    }
                }
                Err(e) => self.fail(batch, saved_services, e),
            },
            Err(e) => self.fail(batch, saved_services, e),
        }
    }

    fn fail(&mut self, batch: &mut Vec<(Op, Reply)>, saved: HashMap<ServiceSlug, Service>, e: StoreError) {
        tracing::error!(error = %e, ops = batch.len(), "commit failed; the batch was not stored");
        self.services = saved;
        let message = e.to_string();
        for (_, reply) in batch.drain(..) {
            let _ = reply.send(Err(WriteError::Store(message.clone())));
        }
    }

    #[allow(clippy::type_complexity)]
    fn stage<'s>(
        &mut self,
        store: &'s Store,
        batch: &[(Op, Reply)],
    ) -> Result<(crate::store::Batch<'s>, Vec<Result<(Event, Applied), WriteError>>), StoreError> {
        let mut txn = store.begin()?;
        let mut tables = txn.tables()?;
        let mut results = Vec::with_capacity(batch.len());
        let channels = self.index.read().expect("index lock").channels().to_vec();
        for (op, _) in batch {
            let mut local = LocalState { tables: &mut tables, services: &self.services, prior: None };
            let staged = match stage(&mut local, op, &channels, Micros::now())? {
                Ok(staged) => staged,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let prior = local.prior.take();
            let (seq, _) = tables.append_after(&staged.event, prior.as_ref())?;
            if let Event::Service(change) = &staged.event {
                self.services.insert(change.service.slug.clone(), change.service.clone());
            }
            let applied = staged.applied(seq);
            results.push(Ok((staged.event, applied)));
        }
        drop(tables);
        Ok((txn, results))
    }
}

/// The local writer's view for staging: the batch's redb tables and the
/// services as the batch has left them.
struct LocalState<'a, 't> {
    tables: &'a mut crate::store::Tables<'t>,
    services: &'a HashMap<ServiceSlug, Service>,
    /// The record [`Staging::prior`] read last, so appending does not read it again.
    prior: Option<Record>,
}

impl Staging for LocalState<'_, '_> {
    type Error = StoreError;

    fn service(&self, slug: &ServiceSlug) -> Option<Result<&Service, WriteError>> {
        self.services.get(slug).map(Ok)
    }

    fn prior(&mut self, customer: CustomerId, scope: &Scope) -> Result<Option<(Status, Micros)>, StoreError> {
        self.prior = self.tables.record(customer, scope)?;
        Ok(self.prior.as_ref().map(|r| (r.status, r.created_at)))
    }
}

/// What validating and staging a write reads: the services as the batch
/// has left them so far, and the current record of a customer's scope. The
/// local writer reads them from redb; the PostgreSQL writer from the rows
/// it read under the head lock. Either then hands the staged event to the
/// log that makes it durable.
pub(crate) trait Staging {
    /// Why reading failed: the whole batch fails.
    type Error;

    /// The service by that slug: `None` when none is registered, an error
    /// when it is stored but unreadable.
    fn service(&self, slug: &ServiceSlug) -> Option<Result<&Service, WriteError>>;

    /// The status and creation time of the customer's current record for
    /// exactly this scope, if there is one.
    fn prior(&mut self, customer: CustomerId, scope: &Scope)
    -> Result<Option<(Status, Micros)>, Self::Error>;
}

/// A write that passed validation: the event it becomes and the creation
/// time its record keeps (the first write's, for a preference).
pub(crate) struct Staged {
    /// The event to append.
    pub event: Event,
    /// For a preference, the record's `created_at`.
    pub created_at: Micros,
}

impl Staged {
    /// What the write is answered with once its event is durable as `seq`.
    pub fn applied(&self, seq: u64) -> Applied {
        match &self.event {
            Event::Preference(change) => Applied::Preference {
                seq,
                scope: change.scope.clone(),
                record: Record {
                    status: change.after,
                    reason: change.reason.clone(),
                    source: change.origin.source.clone(),
                    created_at: self.created_at,
                    updated_at: change.at,
                    seq,
                },
            },
            Event::Service(change) => Applied::Service { seq, service: change.service.clone() },
            Event::Recovery(_) => unreachable!("`stage` makes only preference and service events"),
        }
    }
}

/// The one validation of every write, in both modes: `Ok(Err(_))` is a
/// refused write, `Err(_)` a failure to read the state.
pub(crate) fn stage<S: Staging>(
    state: &mut S,
    op: &Op,
    channels: &[ChannelName],
    now: Micros,
) -> Result<Result<Staged, WriteError>, S::Error> {
    Ok(match op {
        Op::SetPreference { customer, scope, status, reason, origin } => {
            if let Err(e) = check_scope(state, scope, channels) {
                return Ok(Err(e));
            }
            let prior = state.prior(*customer, scope)?;
            Ok(Staged {
                event: Event::Preference(PreferenceChange {
                    customer: *customer,
                    scope: scope.clone(),
                    before: prior.map(|(status, _)| status),
                    after: *status,
                    reason: reason.clone(),
                    origin: origin.clone(),
                    at: now,
                }),
                created_at: prior.map_or(now, |(_, created)| created),
            })
        }
        Op::CreateService { slug, name, description, actor } => match state.service(slug) {
            Some(_) => Err(WriteError::ServiceExists(slug.to_string())),
            None => Ok(Staged {
                event: Event::Service(ServiceChange {
                    service: Service {
                        slug: slug.clone(),
                        name: name.clone(),
                        description: description.clone(),
                        archived: false,
                        created_at: now,
                        updated_at: now,
                    },
                    created: true,
                    actor: actor.clone(),
                }),
                created_at: now,
            }),
        },
        Op::UpdateService { slug, name, description, archived, actor } => match state.service(slug) {
            None => Err(WriteError::UnknownService(slug.to_string())),
            Some(Err(e)) => Err(e),
            Some(Ok(old)) => {
                let service = old.updated(name.as_ref(), description.as_ref(), *archived, now);
                let created_at = service.created_at;
                Ok(Staged {
                    event: Event::Service(ServiceChange { service, created: false, actor: actor.clone() }),
                    created_at,
                })
            }
        },
    })
}

/// A preference's scope must name a registered, unarchived service (or all
/// services) and a configured channel (or all channels).
fn check_scope<S: Staging>(state: &S, scope: &Scope, channels: &[ChannelName]) -> Result<(), WriteError> {
    if let Target::One(slug) = &scope.service {
        match state.service(slug) {
            None => return Err(WriteError::UnknownService(slug.to_string())),
            Some(Err(e)) => return Err(e),
            Some(Ok(service)) if service.archived => return Err(WriteError::Archived(slug.to_string())),
            Some(Ok(_)) => {}
        }
    }
    if let Target::One(c) = &scope.channel
        && !channels.contains(c)
    {
        return Err(WriteError::UnknownChannel(c.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state in memory: services by slug (`Err` for an unreadable one)
    /// and current records.
    #[derive(Default)]
    struct Memory {
        services: HashMap<ServiceSlug, Result<Service, WriteError>>,
        records: HashMap<(u64, String), (Status, Micros)>,
    }

    impl Staging for Memory {
        type Error = std::convert::Infallible;

        fn service(&self, slug: &ServiceSlug) -> Option<Result<&Service, WriteError>> {
            self.services.get(slug).map(|s| s.as_ref().map_err(Clone::clone))
        }

        fn prior(
            &mut self,
            customer: CustomerId,
            scope: &Scope,
        ) -> Result<Option<(Status, Micros)>, Self::Error> {
            Ok(self.records.get(&(customer.0, scope.key())).copied())
        }
    }

    fn service(slug: &str, archived: bool) -> Service {
        Service {
            slug: ServiceSlug::parse(slug).unwrap(),
            name: slug.into(),
            description: String::new(),
            archived,
            created_at: Micros(5),
            updated_at: Micros(5),
        }
    }

    fn set(customer: u64, service: &str, channel: &str) -> Op {
        Op::SetPreference {
            customer: CustomerId(customer),
            scope: Scope::parse(service, channel).unwrap(),
            status: Status::OptedOut,
            reason: None,
            origin: Origin { source: "api".into(), actor: "t".into(), client_addr: None, user_agent: None },
        }
    }

    fn refused(state: &mut Memory, op: &Op) -> WriteError {
        let channels = [ChannelName::parse("email").unwrap()];
        match stage(state, op, &channels, Micros(100)).unwrap() {
            Ok(staged) => panic!("{op:?} was staged as {:?}", staged.event),
            Err(e) => e,
        }
    }

    #[test]
    fn one_validation_in_one_order() {
        let mut state = Memory::default();
        for s in [service("rating", false), service("old", true)] {
            state.services.insert(s.slug.clone(), Ok(s));
        }
        let broken = ServiceSlug::parse("broken").unwrap();
        state.services.insert(broken, Err(WriteError::Store("unreadable".into())));
        assert_eq!(refused(&mut state, &set(1, "nope", "sms")), WriteError::UnknownService("nope".into()));
        assert_eq!(refused(&mut state, &set(1, "old", "email")), WriteError::Archived("old".into()));
        assert_eq!(refused(&mut state, &set(1, "rating", "sms")), WriteError::UnknownChannel("sms".into()));
        assert_eq!(refused(&mut state, &set(1, "broken", "email")), WriteError::Store("unreadable".into()));
        let create = Op::CreateService {
            slug: ServiceSlug::parse("old").unwrap(),
            name: "x".into(),
            description: String::new(),
            actor: "t".into(),
        };
        assert_eq!(refused(&mut state, &create), WriteError::ServiceExists("old".into()));
        let update = |slug: &str| Op::UpdateService {
            slug: ServiceSlug::parse(slug).unwrap(),
            name: None,
            description: None,
            archived: Some(false),
            actor: "t".into(),
        };
        assert_eq!(refused(&mut state, &update("nope")), WriteError::UnknownService("nope".into()));
        assert_eq!(refused(&mut state, &update("broken")), WriteError::Store("unreadable".into()));
    }

    #[test]
    fn a_preference_keeps_its_first_creation_time() {
        let mut state = Memory::default();
        let rating = service("rating", false);
        state.services.insert(rating.slug.clone(), Ok(rating));
        let scope = Scope::parse("rating", "*").unwrap();
        state.records.insert((7, scope.key()), (Status::OptedIn, Micros(3)));
        let channels = [ChannelName::parse("email").unwrap()];
        let staged = stage(&mut state, &set(7, "rating", "*"), &channels, Micros(100)).unwrap().unwrap();
        let Applied::Preference { seq, record, .. } = staged.applied(42) else { panic!("a preference") };
        assert_eq!((seq, record.seq, record.created_at, record.updated_at), (42, 42, Micros(3), Micros(100)));
        let Event::Preference(change) = &staged.event else { panic!("a preference event") };
        assert_eq!((change.before, change.after), (Some(Status::OptedIn), Status::OptedOut));
        let fresh = stage(&mut state, &set(8, "*", "email"), &channels, Micros(100)).unwrap().unwrap();
        assert_eq!(fresh.created_at, Micros(100), "a first write is created now");
    }

    /// Events applied from PostgreSQL carry their chained checksum: one that
    /// does not follow the last applied event's is refused as a divergence,
    /// and nothing of its batch is applied.
    #[tokio::test]
    async fn applied_events_must_follow_the_local_checksum() {
        use crate::cluster::chain;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let channels = vec![ChannelName::parse("email").unwrap()];
        let index = Arc::new(RwLock::new(Index::new(channels)));
        let config = WriterConfig { max_batch: 16, queue: 16 };
        let (writer, thread) =
            Writer::start(store.clone(), index, Vec::new(), 0, config, Arc::new(Metrics::new()));
        let event = |slug: &str| {
            Event::Service(ServiceChange { service: service(slug, false), created: true, actor: "t".into() })
        };
        let (one, two, three) = (event("a"), event("b"), event("c"));
        let c1 = chain::next(0, 1, &one);
        let c2 = chain::next(c1, 2, &two);
        assert_eq!(writer.apply(vec![(1, one.clone(), c1), (2, two.clone(), c2)]).await, Ok(2));
        assert_eq!(store.chain_state().unwrap(), (2, Some(c2)), "stored with last_seq");
        // Event 3 as a log with another event 2 would checksum it.
        let other = chain::next(chain::next(c1, 2, &three), 3, &three);
        match writer.apply(vec![(3, three.clone(), other)]).await {
            Err(ApplyError::Diverged(why)) => assert!(why.contains("event 3"), "{why}"),
            other => panic!("a divergence, not {other:?}"),
        }
        assert_eq!(store.chain_state().unwrap(), (2, Some(c2)), "nothing applied");
        // Rewinding to event 1 drops event 2 and its service.
        writer.rewind(1, c1).await.unwrap();
        assert_eq!(store.chain_state().unwrap(), (1, Some(c1)));
        assert_eq!(*writer.applied().borrow(), 1);
        assert_eq!(store.services().unwrap().iter().map(|s| s.slug.to_string()).collect::<Vec<_>>(), ["a"]);
        let c2 = chain::next(c1, 2, &three);
        assert_eq!(writer.apply(vec![(2, three, c2)]).await, Ok(2), "following again after the rewind");
        writer.close().await;
        thread.join().unwrap();
    }
}
