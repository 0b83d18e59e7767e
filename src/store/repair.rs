//! `prefsd recover`: the way forward from a damaged write-ahead log. Run it
//! while prefsd is stopped (redb's file lock refuses it otherwise).
//!
//! What it does, each step durable before the next:
//!
//! 1. keeps a copy of the damaged log, `prefsd.wal.damaged-TIMESTAMP`;
//! 2. writes the preference changes of the intact frames it drops to
//!    `prefsd.wal.dropped-TIMESTAMP.ndjson`, in `prefsd import`'s format, so
//!    an operator can re-apply those that should stand;
//! 3. replays every event before the damage and appends one
//!    [`Event::Recovery`] audit event recording the loss, in one durable
//!    redb commit, then empties the log.
//!
//! The dropped events' sequence numbers were given to clients in their
//! answers, so they are never given out again: the recovery event takes the
//! number after the highest one dropped, and the numbers in between stay
//! unused.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Commit, DB_FILE, REFUSED_FROM, Store, StoreError, StoreOptions, decode};
use crate::domain::{Event, Micros, RecoveryNote};
use crate::wal::{self, sync_dir};

/// What `prefsd recover` did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Repair {
    /// The log was not damaged; `prefsd serve` replays it as usual.
    Intact {
        /// Intact frames in it.
        frames: usize,
        /// Bytes of a torn last frame, which the replay drops.
        torn: u64,
    },
    /// The damaged log was replayed up to the damage and emptied.
    Recovered {
        /// The copy of the damaged log.
        copy: PathBuf,
        /// The dropped preference changes, in import format, if any.
        dropped_file: Option<PathBuf>,
        /// One line per dropped frame, for the operator.
        dropped: Vec<String>,
        /// The audit event's content.
        note: RecoveryNote,
        /// The audit event's sequence number.
        seq: u64,
    },
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Repair::Intact { frames, torn } => {
                write!(f, "the write-ahead log is not damaged ({frames} intact frames")?;
                if *torn > 0 {
                    write!(f, ", then a torn last frame of {torn} bytes, never acknowledged")?;
                }
                write!(f, "); nothing to recover: `prefsd serve` replays it")
            }
            Repair::Recovered { copy, dropped_file, dropped, note, seq } => {
                writeln!(f, "the write-ahead log was damaged at byte {}", note.offset)?;
                writeln!(f, "kept a copy of the damaged log: {}", copy.display())?;
                writeln!(f, "replayed {} events from before the damage", note.replayed)?;
                match note.dropped_seqs {
                    Some((a, b)) => writeln!(
                        f,
                        "dropped {} intact frames after the damage (events {a} to {b}) and {} unreadable bytes:",
                        note.dropped, note.unreadable_bytes
                    )?,
                    None => writeln!(f, "dropped {} unreadable bytes", note.unreadable_bytes)?,
                }
                for line in dropped {
                    writeln!(f, "  {line}")?;
                }
                if let Some(file) = dropped_file {
                    writeln!(
                        f,
                        "their preference changes are in {}: once prefsd runs, re-apply those that \
                         should stand with `prefsd import {}`",
                        file.display(),
                        file.display()
                    )?;
                }
                write!(f, "recorded the loss as audit event {seq}")
            }
        }
    }
}

/// Recovers the data directory `dir` from a damaged write-ahead log (see
/// the module doc); does nothing to an intact one.
pub fn repair(dir: &Path) -> Result<Repair, StoreError> {
    if !dir.join(DB_FILE).is_file() {
        return Err(StoreError::Io(
            dir.to_owned(),
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("no {DB_FILE} in it")),
        ));
    }
    let store = Store::open_unreplayed(dir, &StoreOptions::default())?;
    let mut state = store.wal();
    let scan = state.wal.scan().map_err(|e| StoreError::Wal(format!("cannot read it: {e}")))?;
    let Some(damage) = scan.damage.clone() else {
        return Ok(Repair::Intact { frames: scan.frames.len(), torn: scan.len - scan.end });
    };
    let at = Micros::now();
    let stamp = jiff::Timestamp::from_microsecond(at.0)
        .map(|t| t.strftime("%Y%m%dT%H%M%S%.6fZ").to_string())
        .unwrap_or_else(|_| at.0.to_string());

    // 1. The copy, durably, before anything changes.
    let copy = dir.join(format!("{}.damaged-{stamp}", wal::FILE_NAME));
    let io = |p: &Path| {
        let p = p.to_owned();
        move |e: std::io::Error| StoreError::Io(p, e)
    };
    std::fs::copy(state.wal.path(), &copy).map_err(io(&copy))?;
    File::open(&copy).and_then(|f| f.sync_all()).map_err(io(&copy))?;

    // 2. What is dropped, for the operator.
    let mut dropped = Vec::new();
    let mut import = String::new();
    let mut intact_bytes = 0u64;
    for frame in &damage.later {
        intact_bytes += 16 + frame.event.len() as u64;
        match decode::<Event>(&frame.event) {
            Ok(Event::Preference(c)) => {
                dropped.push(format!(
                    "event {}: customer {} {}/{} {} (source {}, actor {})",
                    frame.seq,
                    c.customer,
                    c.scope.service,
                    c.scope.channel,
                    c.after.as_str(),
                    c.origin.source,
                    c.origin.actor
                ));
                let line = serde_json::json!({
                    "customer": c.customer.0,
                    "service": c.scope.service.to_string(),
                    "channel": c.scope.channel.to_string(),
                    "status": c.after.as_str(),
                    "reason": c.reason,
                });
                import.push_str(&line.to_string());
                import.push('\n');
            }
            Ok(Event::Service(c)) => dropped.push(format!(
                "event {}: service {} {} by {} (re-apply by hand)",
                frame.seq,
                c.service.slug,
                if c.created { "created" } else { "changed" },
                c.actor
            )),
            Ok(Event::Recovery(_)) => dropped.push(format!("event {}: an earlier recovery note", frame.seq)),
            Err(e) => dropped.push(format!("event {}: undecodable ({e})", frame.seq)),
        }
    }
    let dropped_file = if import.is_empty() {
        None
    } else {
        let path = dir.join(format!("{}.dropped-{stamp}.ndjson", wal::FILE_NAME));
        File::create_new(&path)
            .and_then(|mut f| f.write_all(import.as_bytes()).and_then(|()| f.sync_all()))
            .map_err(io(&path))?;
        Some(path)
    };
    sync_dir(dir).map_err(io(dir))?;

    // 3. Replay up to the damage, note the loss, empty the log.
    let refused_from = store.meta(REFUSED_FROM)?;
    let mut batch = store.start(Commit::Immediate)?;
    let from = batch.next_seq;
    let mut tables = batch.tables()?;
    for frame in &scan.frames {
        if refused_from.is_some_and(|r| frame.seq >= r) || frame.seq < tables.next_seq() {
            continue;
        }
        if frame.seq > tables.next_seq() {
            return Err(StoreError::Wal(format!(
                "it jumps from event {} to event {} before the damage; refusing to skip events",
                tables.next_seq() - 1,
                frame.seq
            )));
        }
        tables.append(&decode::<Event>(&frame.event)?)?;
    }
    let replayed = tables.next_seq() - from;
    let highest = damage.later.iter().map(|f| f.seq).max().unwrap_or(0);
    *tables.next_seq = (*tables.next_seq).max(highest + 1);
    let note = RecoveryNote {
        at,
        copy: copy.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        offset: damage.offset,
        replayed,
        dropped: damage.later.len() as u64,
        dropped_seqs: damage.later.first().map(|f| (f.seq, highest)),
        unreadable_bytes: (scan.len - scan.end).saturating_sub(intact_bytes),
    };
    let (seq, _) = tables.append(&Event::Recovery(note.clone()))?;
    drop(tables);
    batch.write_last_seq()?;
    let txn = batch.txn;
    store.commit_durably(txn, &mut state)?;
    if refused_from.is_some() {
        let db = store.db()?;
        let txn = db.begin_write()?;
        txn.open_table(super::META)?.remove(REFUSED_FROM)?;
        txn.commit()?;
    }
    tracing::warn!(seq, offset = note.offset, dropped = note.dropped, "recovered a damaged write-ahead log");
    Ok(Repair::Recovered { copy, dropped_file, dropped, note, seq })
}
