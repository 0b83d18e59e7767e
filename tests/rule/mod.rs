//! DESIGN's resolution rule as a naive model, for the tests to compare the
//! sidecar against, and a small seeded random source.
//!
//! The model keeps every write with a logical timestamp. For (C, S, H) the
//! most recently written of C's writes to (S,H), (S,*), (*,H), (*,*)
//! decides; with none, C is opted in. Nothing here knows about bitmaps,
//! templates or when a service was registered.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use prefsd::domain::Status;

/// One write: when, whose, which scope (`None` is `*`), what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub at: u64,
    pub customer: u64,
    pub service: Option<String>,
    pub channel: Option<String>,
    pub status: Status,
}

/// Every write ever made, kept per customer in the order given.
#[derive(Debug, Clone, Default)]
pub struct Rule {
    writes: BTreeMap<u64, Vec<Write>>,
}

impl Rule {
    /// Records a write at logical time `at`; later times win.
    pub fn write(
        &mut self,
        at: u64,
        customer: u64,
        service: Option<&str>,
        channel: Option<&str>,
        status: Status,
    ) {
        self.writes.entry(customer).or_default().push(Write {
            at,
            customer,
            service: service.map(str::to_owned),
            channel: channel.map(str::to_owned),
            status,
        });
    }

    /// May `customer` be notified by `service` on `channel`?
    pub fn allowed(&self, customer: u64, service: &str, channel: &str) -> bool {
        let writes = self.writes.get(&customer).map_or(&[][..], Vec::as_slice);
        let covering = writes.iter().filter(|w| {
            w.service.as_deref().is_none_or(|s| s == service)
                && w.channel.as_deref().is_none_or(|h| h == channel)
        });
        match covering.max_by_key(|w| w.at) {
            None => true,
            Some(w) => w.status == Status::OptedIn,
        }
    }

    /// Every customer written to.
    pub fn customers(&self) -> BTreeSet<u64> {
        self.writes.keys().copied().collect()
    }
}

/// `"*"` for `None`: how a scope side is spelled in a path.
pub fn side(target: Option<&str>) -> &str {
    target.unwrap_or("*")
}

/// The inverse of [`side`].
pub fn target(side: &str) -> Option<&str> {
    (side != "*").then_some(side)
}

/// SplitMix64: enough randomness for choosing test inputs, reproducible
/// from one printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), up to a negligible bias.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    pub fn status(&mut self) -> Status {
        if self.coin() { Status::OptedOut } else { Status::OptedIn }
    }
}

/// The seed for this run: `PREFSD_TEST_SEED` if set, else the clock. Printed,
/// so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("PREFSD_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: PREFSD_TEST_SEED={seed}");
    seed
}
