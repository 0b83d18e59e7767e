//! Reading the log back: the intact frames from the start, and what follows
//! them. A frame that is cut short or fails its checksum is either a torn
//! tail (nothing intact after it: the append that was running when the
//! process died, never acknowledged) or damage (intact frames after it:
//! acknowledged writes would be lost by stopping there).

use super::{HEADER, MAX_FRAME};

/// One intact frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Byte offset of its header.
    pub offset: u64,
    /// Its event's sequence number.
    pub seq: u64,
    /// The postcard-encoded event.
    pub event: Vec<u8>,
}

/// A damaged frame with intact frames after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Byte offset of the first bad frame.
    pub offset: u64,
    /// The intact frames found after it, in file order, with sequence
    /// numbers above every frame before it.
    pub later: Vec<Frame>,
}

/// What a log holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scan {
    /// The intact frames from the start, up to the first bad one.
    pub frames: Vec<Frame>,
    /// The offset where the intact frames end.
    pub end: u64,
    /// The file's length; bytes from `end` on are a torn tail or damage.
    pub len: u64,
    /// Set when the bytes after `end` hold intact frames.
    pub damage: Option<Damage>,
}

impl Scan {
    /// Whether bytes after the intact frames hold nothing intact: a torn
    /// tail, safe to drop.
    pub fn torn_tail(&self) -> bool {
        self.end < self.len && self.damage.is_none()
    }
}

/// The frame at `pos`, if one is intact there, and where the next begins.
fn frame_at(bytes: &[u8], pos: usize) -> Option<(Frame, usize)> {
    let rest = bytes.get(pos..)?;
    if rest.len() < HEADER {
        return None;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if !(8..=MAX_FRAME).contains(&len) || rest.len() < HEADER + len {
        return None;
    }
    let payload = &rest[HEADER..HEADER + len];
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(payload[..8].try_into().expect("eight bytes"));
    Some((Frame { offset: pos as u64, seq, event: payload[8..].to_vec() }, pos + HEADER + len))
}

/// Reads every intact frame from the start; past the first bad one, looks
/// at every byte offset for intact frames whose sequence numbers go on
/// increasing from the last good one (a frame-like run of bytes inside an
/// event, with a smaller sequence number, is not taken for one).
pub fn scan(bytes: &[u8]) -> Scan {
    let mut frames = Vec::new();
    let mut pos = 0;
    while let Some((frame, next)) = frame_at(bytes, pos) {
        frames.push(frame);
        pos = next;
    }
    let end = pos;
    let mut last = frames.last().map_or(0, |f| f.seq);
    let mut later = Vec::new();
    let mut at = end + 1;
    while at + HEADER <= bytes.len() {
        match frame_at(bytes, at) {
            Some((frame, next)) if frame.seq > last => {
                last = frame.seq;
                later.push(frame);
                at = next;
            }
            _ => at += 1,
        }
    }
    let damage = (!later.is_empty()).then_some(Damage { offset: end as u64, later });
    Scan { frames, end: end as u64, len: bytes.len() as u64, damage }
}
