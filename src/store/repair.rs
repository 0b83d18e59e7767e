//! `prefsd recover`: the way forward from a damaged write-ahead log. Run it
//! while prefsd is stopped (redb's file lock refuses it otherwise).
//!
//! What it does, each step durable before the next:
//!
//! 1. keeps a copy of the damaged log, `prefsd.wal.damaged-TIMESTAMP`;
//! 2. replays every intact frame — those before the damage and those the
//!    scan found after it — with their own sequence numbers, and appends one
//!    [`Event::Recovery`] audit event naming the sequence numbers the
//!    damaged bytes held (lost: nothing can be read back from them), in one
//!    durable redb commit; then empties the log.
//!
//! Sequence numbers were given to clients in their answers, so none is
//! given out twice: the lost ones stay unused (a gap in the event log), and
//! the recovery event takes the number after the highest replayed. Intact
//! frames after the damage may also be an append that was torn by a power
//! loss in a different order (never acknowledged); replaying them is what
//! a client that got no answer must expect anyway. A batch answered 500 is
//! never among them: [`super::Store::mark_broken`] records it for the
//! replay to drop, or zeroes it.
//!
//! An intact frame whose event cannot be decoded is reported and counted as
//! lost.

use std::fmt;
use std::fs::File;
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
    /// The damaged log was replayed around the damage and emptied.
    Recovered {
        /// The copy of the damaged log.
        copy: PathBuf,
        /// One line per intact frame that could not be replayed.
        undecodable: Vec<String>,
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
            Repair::Recovered { copy, undecodable, note, seq } => {
                writeln!(f, "the write-ahead log was damaged at byte {}", note.offset)?;
                writeln!(f, "kept a copy of the damaged log: {}", copy.display())?;
                writeln!(
                    f,
                    "replayed {} events: every intact frame before and after the damage",
                    note.replayed
                )?;
                for line in undecodable {
                    writeln!(f, "could not replay {line}")?;
                }
                match note.dropped_seqs {
                    Some((a, b)) => writeln!(
                        f,
                        "lost {} events (sequence numbers {a} to {b}) in {} unreadable bytes; \
                         their sequence numbers stay unused",
                        note.dropped, note.unreadable_bytes
                    )?,
                    None => writeln!(f, "lost no event; skipped {} unreadable bytes", note.unreadable_bytes)?,
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

    sync_dir(dir).map_err(io(dir))?;

    // 2. Replay every intact frame, note the loss, empty the log.
    let refused_from = store.meta(REFUSED_FROM)?;
    let refused = |seq: u64| refused_from.is_some_and(|r| seq >= r);
    let mut batch = store.start(Commit::Immediate)?;
    let mut tables = batch.tables()?;
    let mut replayed = 0u64;
    for frame in &scan.frames {
        if refused(frame.seq) || frame.seq < tables.next_seq() {
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
        replayed += 1;
    }
    // The events the damaged bytes held: the numbers skipped before each
    // intact frame after the damage, and frames that cannot be decoded.
    let mut lost = 0u64;
    let mut lost_seqs: Option<(u64, u64)> = None;
    let mut lose = |from: u64, to: u64, lost: &mut u64| {
        *lost += to + 1 - from;
        lost_seqs = Some(lost_seqs.map_or((from, to), |(a, _)| (a, to)));
    };
    let mut undecodable = Vec::new();
    let mut intact_bytes = 0u64;
    for frame in &damage.later {
        intact_bytes += 16 + frame.event.len() as u64;
        if refused(frame.seq) || frame.seq < tables.next_seq() {
            continue;
        }
        if frame.seq > tables.next_seq() {
            lose(tables.next_seq(), frame.seq - 1, &mut lost);
        }
        // Its own number: the lost ones before it stay unused.
        *tables.next_seq = frame.seq;
        match decode::<Event>(&frame.event) {
            Ok(event) => {
                tables.append(&event)?;
                replayed += 1;
            }
            Err(e) => {
                undecodable.push(format!("event {}: {e}", frame.seq));
                lose(frame.seq, frame.seq, &mut lost);
                *tables.next_seq += 1;
            }
        }
    }
    let note = RecoveryNote {
        at,
        copy: copy.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        offset: damage.offset,
        replayed,
        dropped: lost,
        dropped_seqs: lost_seqs,
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
    Ok(Repair::Recovered { copy, undecodable, note, seq })
}
