//! [`IdSet`]: the set of opted-out customer ids of one (service, channel)
//! pair, laid out for the check path.
//!
//! Ids below 2^32 — the common case — are split like a roaring bitmap into a
//! 16-bit chunk number and a 16-bit value, but the chunks sit in a vector
//! indexed directly by chunk number (no search over keys), and a chunk is a
//! bitmap as soon as it holds more than 2,048 values (8 KiB, so at most 4
//! bytes per id) instead of roaring's 4,096. A probe is then one vector load
//! and one bit test for any pair denser than 1 in 32, and a short binary
//! search in a sorted array below that. Measured against the `roaring`
//! crate's `contains` in `benches/check.rs`; the README's Performance section
//! has the numbers.
//!
//! Ids of 2^32 and above go to a `roaring::RoaringTreemap` beside it.
//! Everything that leaves the process — snapshots, `application/vnd.roaring`
//! bodies — uses the portable roaring format through the `roaring` crate.

use roaring::{RoaringBitmap, RoaringTreemap};

/// An array chunk becomes a bitmap above this many values.
const ARRAY_MAX: usize = 2048;
/// A bitmap chunk becomes an array below this many values (hysteresis, so a
/// chunk near the threshold does not flip on every write).
const BITMAP_MIN: u32 = 1024;
const WORDS: usize = 1024;

#[derive(Debug, Clone)]
enum Chunk {
    /// Sorted, distinct.
    Array(Vec<u16>),
    /// One bit per value, and how many are set.
    Bitmap(Box<[u64; WORDS]>, u32),
}

impl Chunk {
    #[inline]
    fn contains(&self, lo: u16) -> bool {
        match self {
            Chunk::Bitmap(words, _) => words[usize::from(lo >> 6)] & (1 << (lo & 63)) != 0,
            Chunk::Array(values) => values.binary_search(&lo).is_ok(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Chunk::Array(values) => values.len(),
            Chunk::Bitmap(_, n) => *n as usize,
        }
    }

    /// Adds `lo`; true if it was absent.
    fn insert(&mut self, lo: u16) -> bool {
        match self {
            Chunk::Array(values) => {
                // Sorted input (loads, rebuilds) appends without a search.
                let pos = match values.last() {
                    Some(&last) if last < lo => values.len(),
                    None => 0,
                    _ => match values.binary_search(&lo) {
                        Ok(_) => return false,
                        Err(pos) => pos,
                    },
                };
                values.insert(pos, lo);
                if values.len() > ARRAY_MAX {
                    let mut words = Box::new([0u64; WORDS]);
                    for &v in values.iter() {
                        words[usize::from(v >> 6)] |= 1 << (v & 63);
                    }
                    *self = Chunk::Bitmap(words, (ARRAY_MAX + 1) as u32);
                }
                true
            }
            Chunk::Bitmap(words, n) => {
                let (word, bit) = (&mut words[usize::from(lo >> 6)], 1u64 << (lo & 63));
                if *word & bit != 0 {
                    return false;
                }
                *word |= bit;
                *n += 1;
                true
            }
        }
    }

    /// Removes `lo`; true if it was present.
    fn remove(&mut self, lo: u16) -> bool {
        match self {
            Chunk::Array(values) => match values.binary_search(&lo) {
                Ok(pos) => {
                    values.remove(pos);
                    true
                }
                Err(_) => false,
            },
            Chunk::Bitmap(words, n) => {
                let (word, bit) = (&mut words[usize::from(lo >> 6)], 1u64 << (lo & 63));
                if *word & bit == 0 {
                    return false;
                }
                *word &= !bit;
                *n -= 1;
                if *n < BITMAP_MIN {
                    let values = self.iter().collect();
                    *self = Chunk::Array(values);
                }
                true
            }
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = u16> + '_> {
        match self {
            Chunk::Array(values) => Box::new(values.iter().copied()),
            Chunk::Bitmap(words, _) => Box::new(words.iter().enumerate().flat_map(|(i, &w)| {
                let mut w = w;
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let bit = w.trailing_zeros();
                    w &= w - 1;
                    Some((i as u16) << 6 | bit as u16)
                })
            })),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Chunk::Array(values) => values.capacity() * 2 + 24,
            Chunk::Bitmap(..) => WORDS * 8 + 8,
        }
    }
}

/// A set of customer ids (u64), fast to probe; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct IdSet {
    /// Chunk `i` holds ids `i << 16 ..= i << 16 | 0xffff`; trailing chunks
    /// are never empty.
    chunks: Vec<Option<Box<Chunk>>>,
    /// Ids below 2^32.
    low_len: u64,
    /// Ids of 2^32 and above.
    high: RoaringTreemap,
}

impl PartialEq for IdSet {
    fn eq(&self, other: &Self) -> bool {
        // Chunk kinds depend on history (hysteresis); compare the ids.
        self.low_len == other.low_len && self.high == other.high && self.iter_low().eq(other.iter_low())
    }
}

impl IdSet {
    /// Whether `id` is in the set.
    #[inline]
    pub fn contains(&self, id: u64) -> bool {
        match u32::try_from(id) {
            Ok(low) => self.contains_low(low),
            Err(_) => self.high.contains(id),
        }
    }

    #[inline]
    fn contains_low(&self, id: u32) -> bool {
        match self.chunks.get((id >> 16) as usize) {
            Some(Some(chunk)) => chunk.contains(id as u16),
            _ => false,
        }
    }

    /// Adds `id`.
    pub fn insert(&mut self, id: u64) {
        let Ok(id) = u32::try_from(id) else {
            self.high.insert(id);
            return;
        };
        let i = (id >> 16) as usize;
        if self.chunks.len() <= i {
            self.chunks.resize_with(i + 1, || None);
        }
        let chunk = self.chunks[i].get_or_insert_with(|| Box::new(Chunk::Array(Vec::new())));
        if chunk.insert(id as u16) {
            self.low_len += 1;
        }
    }

    /// Removes `id`.
    pub fn remove(&mut self, id: u64) {
        let Ok(id) = u32::try_from(id) else {
            self.high.remove(id);
            return;
        };
        let i = (id >> 16) as usize;
        let Some(Some(chunk)) = self.chunks.get_mut(i) else { return };
        if chunk.remove(id as u16) {
            self.low_len -= 1;
            if chunk.len() == 0 {
                self.chunks[i] = None;
                while matches!(self.chunks.last(), Some(None)) {
                    self.chunks.pop();
                }
            }
        }
    }

    /// How many ids the set holds.
    pub fn len(&self) -> u64 {
        self.low_len + self.high.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids below 2^32, ascending.
    pub fn iter_low(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|c| (i, c))).flat_map(|(i, c)| {
            let base = (i as u32) << 16;
            c.iter().map(move |lo| base | u32::from(lo))
        })
    }

    /// The ids below 2^32 as a roaring bitmap.
    pub fn low_bitmap(&self) -> RoaringBitmap {
        RoaringBitmap::from_sorted_iter(self.iter_low()).expect("chunks iterate in ascending order")
    }

    /// Approximate heap bytes held, for the memory figures.
    pub fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * 8
            + self.chunks.iter().flatten().map(|c| c.heap_bytes()).sum::<usize>()
            + self.high.serialized_size()
    }

    /// Writes the set: the low ids as a roaring bitmap in the portable
    /// format, then the high ids as a treemap in its portable format.
    pub fn serialize_into(&self, out: &mut Vec<u8>) {
        let mut low = self.low_bitmap();
        low.optimize();
        // Writing into a Vec cannot fail.
        low.serialize_into(&mut *out).expect("write to Vec");
        self.high.serialize_into(&mut *out).expect("write to Vec");
    }

    /// Reads what [`IdSet::serialize_into`] wrote.
    pub fn deserialize_from(mut bytes: &[u8]) -> std::io::Result<Self> {
        let low = RoaringBitmap::deserialize_from(&mut bytes)?;
        let high = RoaringTreemap::deserialize_from(&mut bytes)?;
        let mut set = IdSet { high, ..IdSet::default() };
        for id in &low {
            set.insert(u64::from(id));
        }
        Ok(set)
    }

    /// The allowed part of a 32-bit roaring recipient set: every recipient
    /// not in this set.
    pub fn allowed_of(&self, recipients: &RoaringBitmap) -> RoaringBitmap {
        // Build the (usually small) suppressed part and subtract it: one
        // roaring difference, instead of rebuilding the allowed majority.
        let suppressed =
            RoaringBitmap::from_sorted_iter(recipients.iter().filter(|&id| self.contains_low(id)))
                .expect("a roaring bitmap iterates in ascending order");
        recipients - suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_switch_kind_and_keep_their_ids() {
        let mut set = IdSet::default();
        let ids: Vec<u64> = (0..5000u64).map(|i| i * 13 % 65_536).collect();
        for &id in &ids {
            set.insert(id);
        }
        let distinct: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
        assert_eq!(set.len(), distinct.len() as u64);
        assert!(matches!(set.chunks[0].as_deref(), Some(Chunk::Bitmap(..))));
        assert!(distinct.iter().all(|&id| set.contains(id)));
        assert!(!set.contains(1) || distinct.contains(&1));
        for &id in distinct.iter().take(4500) {
            set.remove(id);
        }
        assert!(matches!(set.chunks[0].as_deref(), Some(Chunk::Array(..))));
        assert_eq!(
            set.iter_low().map(u64::from).collect::<Vec<_>>(),
            distinct.iter().skip(4500).copied().collect::<Vec<_>>()
        );
        for &id in distinct.iter().skip(4500) {
            set.remove(id);
        }
        assert!(set.is_empty() && set.chunks.is_empty());
    }

    #[test]
    fn round_trips_and_equality_ignore_layout() {
        let mut a = IdSet::default();
        let mut b = IdSet::default();
        for id in (0..3000u64).map(|i| i * 7) {
            a.insert(id);
        }
        for id in (0..3000u64).map(|i| i * 7) {
            b.insert(id);
        }
        for id in (0..3000u64).map(|i| i * 7).skip(1100) {
            b.remove(id);
            b.insert(id);
        }
        for id in [u32::MAX as u64, u32::MAX as u64 + 1, u64::MAX] {
            a.insert(id);
            b.insert(id);
        }
        assert_eq!(a, b);
        let mut bytes = Vec::new();
        a.serialize_into(&mut bytes);
        assert_eq!(IdSet::deserialize_from(&bytes).unwrap(), a);
        let recipients: RoaringBitmap = (0..100u32).collect();
        let allowed: Vec<u32> = a.allowed_of(&recipients).iter().collect();
        assert_eq!(allowed, (0..100u32).filter(|i| i % 7 != 0).collect::<Vec<_>>());
    }
}
