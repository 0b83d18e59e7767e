//! The write-ahead log in front of redb: what makes a single-node write
//! durable.
//!
//! A redb commit with `Durability::Immediate` writes every B-tree page the
//! batch touched (about eight 4 KiB pages per preference write on a large
//! store) and waits for them all; measured, that bounds group commit at a
//! few thousand writes per second. So a batch's events go to this log
//! instead — one sequential append and one `fdatasync` — and redb commits
//! them with `Durability::None`. Every [`CHECKPOINT_BYTES`] or
//! [`CHECKPOINT_EVERY`] the store makes redb durable and empties the log.
//! On open, [`crate::store::Store::open`] replays the frames redb lost in a
//! crash.
//!
//! # Frame layout
//!
//! | bytes | field |
//! | --- | --- |
//! | 4 | payload length, little-endian u32 |
//! | 4 | CRC-32 (IEEE) of the payload, little-endian |
//! | 8 | event sequence number, little-endian u64 (first bytes of the payload) |
//! | n | the event, postcard-encoded as in the `events` table |
//!
//! # Reading it back
//!
//! [`scan`] reads the intact frames from the start. A frame cut short or
//! failing its checksum with nothing intact after it is a torn tail — the
//! append that was running when the process died, never acknowledged — and
//! is dropped. A bad frame with intact frames after it is damage: stopping
//! there would silently drop acknowledged writes, so the store refuses to
//! open and names the file, the offset and the frames after it;
//! `prefsd recover` ([`crate::store::repair`]) is the way forward: it
//! replays every intact frame, before and after the damage, and audits the
//! events the damaged bytes held.
//!
//! # Failures (fsyncgate)
//!
//! A failed `fdatasync` is never retried on the same data: after it the
//! page cache may hold bytes that never reached the disk and report them
//! clean. So when an append's write or sync fails, the batch is refused and
//! the log is cut back to where it was *before* anything else is appended:
//! `set_len` drops the refused bytes from the page cache (and from the
//! disk's view of the file), then one `fdatasync` makes the shorter length
//! durable. The log's own idea of its length follows the file at each step —
//! it becomes the mark as soon as `set_len` succeeds, whatever the sync then
//! does — so the next append never leaves a hole of zeros in front of it.
//!
//! If the cut-back itself fails, the refused frames may still be on disk,
//! and a restart would replay a batch that was answered 500. The log is then
//! *stuck* ([`AppendError::stuck`]): the store marks itself broken (no more
//! writes until a restart) and records, durably in redb, the first refused
//! sequence number, which the next open drops from the replay; if redb cannot
//! take that either, it overwrites the refused frames with zeros, which the
//! next open reads as a torn tail. If that fails too, it says so at `error`
//! level: only then could a restart replay a refused batch.

mod file;
mod scan;

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use file::{LogFile, WrapFile, sync_dir};
pub use scan::{Damage, Frame, Scan, scan};

/// The log's file name inside the data directory.
pub const FILE_NAME: &str = "prefsd.wal";

/// Log size at which the store checkpoints.
pub const CHECKPOINT_BYTES: u64 = 16 << 20;

/// Longest time between checkpoints while writes arrive, which bounds the
/// replay after a crash.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Largest frame payload read back; anything longer is a torn length field.
const MAX_FRAME: usize = 1 << 20;

const HEADER: usize = 8;

/// Frames of one batch, encoded before the append.
#[derive(Debug, Default)]
pub struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// Adds the event with sequence number `seq`, already encoded.
    pub fn push(&mut self, seq: u64, event: &[u8]) {
        let len = 8 + event.len();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(event);
        // Events are bounded far below 4 GiB by the API's body limits.
        self.buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        self.buf.extend_from_slice(&hasher.finalize().to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(event);
    }

    /// Whether no frame was added.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The frames' size in bytes.
    pub fn bytes(&self) -> u64 {
        self.buf.len() as u64
    }
}

/// A refused append.
#[derive(Debug)]
pub struct AppendError {
    /// Why the write or its sync failed.
    pub cause: io::Error,
    /// Set when the log could not be cut back either: the refused frames
    /// may still be in the file.
    pub stuck: Option<io::Error>,
}

impl fmt::Display for AppendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot append to it: {}", self.cause)?;
        if let Some(cut) = &self.stuck {
            write!(f, "; nor cut the refused batch from it: {cut}")?;
        }
        Ok(())
    }
}

/// The open log, owned by whoever commits (the writer thread).
#[derive(Debug)]
pub struct Wal {
    file: Box<dyn LogFile>,
    path: PathBuf,
    /// Where the next append goes: the file's length as far as the log
    /// knows it.
    len: u64,
    since: Instant,
}

impl Wal {
    /// Opens the log in `dir` for appending after whatever it holds,
    /// creating it (and syncing `dir`) if it is not there; `wrap`, if given,
    /// stands between the log and its file.
    pub fn open(dir: &Path, wrap: Option<&WrapFile>) -> io::Result<Wal> {
        let path = dir.join(FILE_NAME);
        let existed = path.exists();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        if !existed {
            sync_dir(dir)?;
        }
        let file: Box<dyn LogFile> = match wrap {
            Some(w) => (w.0)(file),
            None => Box::new(file),
        };
        let len = file.size()?;
        Ok(Wal { file, path, len, since: Instant::now() })
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the whole log back (see [`scan`]).
    pub fn scan(&self) -> io::Result<Scan> {
        Ok(scan(&self.file.read_all()?))
    }

    /// Appends a batch and waits until it is on disk. On failure the log is
    /// cut back to where it was, so a refused batch never replays — unless
    /// [`AppendError::stuck`] says even that failed.
    pub fn append(&mut self, frames: &Frames) -> Result<(), AppendError> {
        if frames.is_empty() {
            return Ok(());
        }
        let mark = self.len;
        let written = self.file.write_all_at(&frames.buf, mark).and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len = mark + frames.buf.len() as u64;
                Ok(())
            }
            // Never sync the same bytes again: drop them, then sync the cut.
            Err(cause) => Err(AppendError { cause, stuck: self.cut(mark).err() }),
        }
    }

    /// Cuts the log back to `len` bytes, durably: `set_len`, then one
    /// `fdatasync`. The log appends at `len` from the moment `set_len`
    /// succeeds; an error means the file on disk may still be longer.
    pub fn cut(&mut self, len: u64) -> io::Result<()> {
        if let Err(e) = self.file.set_len(len) {
            // Whatever the file now holds, append after it, never inside it.
            self.len = self.file.size().unwrap_or(self.len).max(self.len);
            return Err(e);
        }
        self.len = len;
        self.file.sync_data()
    }

    /// Overwrites `len` bytes at `offset` with zeros and syncs, so the
    /// frames there read as a torn tail and are dropped: the last resort
    /// when a refused batch could not be cut back and redb cannot record it
    /// either.
    pub fn poison(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.file.write_all_at(&vec![0u8; len as usize], offset)?;
        self.file.sync_data()
    }

    /// The log's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it is time to checkpoint.
    pub fn due(&self) -> bool {
        self.len >= CHECKPOINT_BYTES || (self.len > 0 && self.since.elapsed() >= CHECKPOINT_EVERY)
    }

    /// Empties the log once redb holds everything in it durably.
    pub fn reset(&mut self) -> io::Result<()> {
        self.cut(0)?;
        self.since = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn temp() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    fn raw(dir: &Path) -> std::fs::File {
        OpenOptions::new().write(true).open(dir.join(FILE_NAME)).unwrap()
    }

    fn events(scan: &Scan) -> Vec<(u64, Vec<u8>)> {
        scan.frames.iter().map(|f| (f.seq, f.event.clone())).collect()
    }

    #[test]
    fn frames_round_trip_and_a_torn_tail_ends_the_log() {
        let dir = temp();
        let mut wal = Wal::open(dir.path(), None).unwrap();
        let mut frames = Frames::default();
        frames.push(7, b"seven");
        frames.push(8, b"eight!");
        wal.append(&frames).unwrap();
        // A torn third frame: the header promises more than was written.
        let mut torn = Frames::default();
        torn.push(9, b"nine");
        FileExt::write_all_at(&raw(dir.path()), &torn.buf[..torn.buf.len() - 2], wal.len()).unwrap();
        let scan = Wal::open(dir.path(), None).unwrap().scan().unwrap();
        assert_eq!(events(&scan), vec![(7, b"seven".to_vec()), (8, b"eight!".to_vec())]);
        assert!(scan.torn_tail() && scan.damage.is_none(), "{scan:?}");
    }

    #[test]
    fn a_flipped_bit_in_the_last_frame_is_a_torn_tail() {
        let dir = temp();
        let mut wal = Wal::open(dir.path(), None).unwrap();
        let mut frames = Frames::default();
        frames.push(1, b"one");
        frames.push(2, b"two");
        wal.append(&frames).unwrap();
        let second = (HEADER + 8 + 3) as u64;
        FileExt::write_all_at(&raw(dir.path()), b"X", second + HEADER as u64 + 8).unwrap();
        let scan = Wal::open(dir.path(), None).unwrap().scan().unwrap();
        assert_eq!(events(&scan), vec![(1, b"one".to_vec())]);
        assert!(scan.torn_tail(), "{scan:?}");
    }

    #[test]
    fn a_damaged_middle_frame_is_damage_with_the_frames_after_it() {
        let dir = temp();
        let mut wal = Wal::open(dir.path(), None).unwrap();
        let mut frames = Frames::default();
        for seq in 1..=10u64 {
            frames.push(seq, format!("event {seq}").as_bytes());
        }
        wal.append(&frames).unwrap();
        let size = (HEADER + 8 + "event 1".len()) as u64;
        // A flipped byte in the payload of event 4, and zeroed header of event 5.
        FileExt::write_all_at(&raw(dir.path()), b"?", 3 * size + HEADER as u64 + 9).unwrap();
        FileExt::write_all_at(&raw(dir.path()), &[0; HEADER], 4 * size).unwrap();
        let scan = Wal::open(dir.path(), None).unwrap().scan().unwrap();
        assert_eq!(scan.frames.iter().map(|f| f.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let damage = scan.damage.expect("damage");
        assert_eq!(damage.offset, 3 * size);
        assert_eq!(damage.later.iter().map(|f| f.seq).collect::<Vec<_>>(), [6, 7, 8, 9, 10]);
        assert_eq!(damage.later[0].offset, 5 * size);
    }

    #[test]
    fn a_frame_inside_an_event_with_a_lower_sequence_is_not_taken_for_one() {
        let dir = temp();
        let mut wal = Wal::open(dir.path(), None).unwrap();
        let mut inner = Frames::default();
        inner.push(1, b"smuggled");
        let mut frames = Frames::default();
        frames.push(5, b"five");
        let mut carrier = b"xx".to_vec();
        carrier.extend_from_slice(&inner.buf);
        frames.push(6, &carrier);
        wal.append(&frames).unwrap();
        // Damage the carrier's header: the frame inside it has seq 1 < 5.
        let at = (HEADER + 8 + 4) as u64;
        FileExt::write_all_at(&raw(dir.path()), &[0xff; 4], at + 4).unwrap();
        let scan = Wal::open(dir.path(), None).unwrap().scan().unwrap();
        assert!(scan.torn_tail(), "{scan:?}");
    }

    #[test]
    fn reset_empties_and_appends_start_over() {
        let dir = temp();
        let mut wal = Wal::open(dir.path(), None).unwrap();
        let mut frames = Frames::default();
        frames.push(1, b"one");
        wal.append(&frames).unwrap();
        assert!(!wal.is_empty());
        wal.reset().unwrap();
        assert_eq!(wal.len(), 0);
        let mut next = Frames::default();
        next.push(2, b"two");
        wal.append(&next).unwrap();
        let scan = Wal::open(dir.path(), None).unwrap().scan().unwrap();
        assert_eq!(events(&scan), vec![(2, b"two".to_vec())]);
        assert!(!scan.torn_tail());
    }
}
