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
//! A frame that is cut short or fails its checksum ends the log: it was
//! being written when the process died, so it was never acknowledged.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

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
}

/// The open log, owned by whoever commits (the writer thread).
#[derive(Debug)]
pub struct Wal {
    file: File,
    len: u64,
    since: Instant,
}

impl Wal {
    /// Opens the log in `dir` for appending after whatever it holds.
    pub fn open(dir: &Path) -> std::io::Result<Wal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(FILE_NAME))?;
        let len = file.metadata()?.len();
        Ok(Wal { file, len, since: Instant::now() })
    }

    /// Every intact frame from the start, as `(seq, encoded event)`, in
    /// file order; stops at the first torn or corrupt frame.
    pub fn frames(&mut self) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        let mut bytes = Vec::new();
        (&self.file).read_to_end(&mut bytes)?;
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        while rest.len() >= HEADER {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            if !(8..=MAX_FRAME).contains(&len) || rest.len() < HEADER + len {
                break;
            }
            let payload = &rest[HEADER..HEADER + len];
            if crc32fast::hash(payload) != crc {
                break;
            }
            let seq = u64::from_le_bytes(payload[..8].try_into().expect("eight bytes"));
            out.push((seq, payload[8..].to_vec()));
            rest = &rest[HEADER + len..];
        }
        Ok(out)
    }

    /// Appends a batch and waits until it is on disk. On failure the log is
    /// cut back to where it was, so a failed batch never replays.
    pub fn append(&mut self, frames: &Frames) -> std::io::Result<()> {
        if frames.is_empty() {
            return Ok(());
        }
        let mark = self.len;
        let written = self.file.write_all_at(&frames.buf, mark).and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += frames.buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.cut(mark)?;
                Err(e)
            }
        }
    }

    /// Cuts the log back to `len` bytes, durably.
    pub fn cut(&mut self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_data()?;
        self.len = len;
        Ok(())
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
    pub fn reset(&mut self) -> std::io::Result<()> {
        self.cut(0)?;
        self.since = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn frames_round_trip_and_a_torn_tail_ends_the_log() {
        let dir = temp();
        let mut wal = Wal::open(dir.path()).unwrap();
        let mut frames = Frames::default();
        frames.push(7, b"seven");
        frames.push(8, b"eight!");
        wal.append(&frames).unwrap();
        // A torn third frame: the header promises more than was written.
        let mut torn = Frames::default();
        torn.push(9, b"nine");
        let cut = &torn.buf[..torn.buf.len() - 2];
        wal.file.write_all_at(cut, wal.len).unwrap();
        let mut reopened = Wal::open(dir.path()).unwrap();
        let read = reopened.frames().unwrap();
        assert_eq!(read, vec![(7, b"seven".to_vec()), (8, b"eight!".to_vec())]);
    }

    #[test]
    fn a_flipped_bit_ends_the_log_at_that_frame() {
        let dir = temp();
        let mut wal = Wal::open(dir.path()).unwrap();
        let mut frames = Frames::default();
        frames.push(1, b"one");
        frames.push(2, b"two");
        wal.append(&frames).unwrap();
        let second = (HEADER + 8 + 3) as u64;
        wal.file.write_all_at(b"X", second + HEADER as u64 + 8).unwrap();
        let read = Wal::open(dir.path()).unwrap().frames().unwrap();
        assert_eq!(read, vec![(1, b"one".to_vec())]);
    }

    #[test]
    fn reset_empties_and_appends_start_over() {
        let dir = temp();
        let mut wal = Wal::open(dir.path()).unwrap();
        let mut frames = Frames::default();
        frames.push(1, b"one");
        wal.append(&frames).unwrap();
        assert!(!wal.is_empty());
        wal.reset().unwrap();
        assert_eq!(wal.len(), 0);
        let mut next = Frames::default();
        next.push(2, b"two");
        wal.append(&next).unwrap();
        assert_eq!(Wal::open(dir.path()).unwrap().frames().unwrap(), vec![(2, b"two".to_vec())]);
    }
}
