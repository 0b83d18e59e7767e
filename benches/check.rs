//! One in-process check at 5% density over 20M ids.
//!
//! One (service, channel) pair — `rating`/`email` of an index with three
//! services and the default two channels — holds 1,000,000 opted-out ids drawn
//! from 0..20,000,000 with a fixed seed. Probes are random ids in the same
//! range, pre-generated and cycled through, so successive probes hit
//! unrelated containers as real traffic does.
//!
//! Measured in the same run, so the numbers read as ratios:
//!
//! - `probe_only`: fetching the next probe, nothing else (the loop's floor);
//! - `index_allowed`: `Index::allowed(customer, "rating", "email")`, the full
//!   path with the slug and channel lookups;
//! - `idset_contains`: `IdSet::contains` on the resolved pair;
//! - `roaring_contains`: a plain `RoaringBitmap::contains` on the same ids;
//! - `flat_bitset_contains`: a `Vec<u64>` with one bit per id in 0..20M;
//! - `index_pair_lookup`: `Index::pair("rating", "email")` alone, the slug
//!   and channel lookups without the probe;
//! - `idset_contains_hot`: `IdSet::contains` cycling over only 32 probes, so
//!   the containers it touches stay in L1/L2: the binary searches' own cost,
//!   without cache and TLB misses.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use prefsd::domain::{ChannelName, CustomerId, Scope, ServiceSlug, Status};
use prefsd::index::Index;
use roaring::RoaringBitmap;

/// Ids range over 0..UNIVERSE.
const UNIVERSE: u64 = 20_000_000;
/// Opted-out ids in the measured pair: 5% of the universe.
const OPTED_OUT: u64 = 1_000_000;
/// Pre-generated probes; a power of two so cycling is a mask.
const PROBES: usize = 1 << 16;
/// Probes of the cache-hot variant.
const HOT_PROBES: usize = 32;

/// splitmix64: a fixed-seed generator, enough for benchmark data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in 0..n for n far below 2^64.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Distinct random ids in 0..UNIVERSE, in drawing order.
fn distinct_ids(rng: &mut SplitMix64, n: u64) -> Vec<u32> {
    let mut seen = RoaringBitmap::new();
    let mut ids = Vec::with_capacity(n as usize);
    while (ids.len() as u64) < n {
        let id = rng.below(UNIVERSE) as u32;
        if seen.insert(id) {
            ids.push(id);
        }
    }
    ids
}

fn bench_check(c: &mut Criterion) {
    let mut rng = SplitMix64(0x00C0_FFEE);
    let opted_out = distinct_ids(&mut rng, OPTED_OUT);

    let channels = vec![ChannelName::parse("email").unwrap(), ChannelName::parse("sms").unwrap()];
    let mut index = Index::new(channels);
    for slug in ["rating", "waitlist", "appointment"] {
        index.add_service(&ServiceSlug::parse(slug).unwrap());
    }
    let scope = Scope::parse("rating", "email").unwrap();
    for &id in &opted_out {
        index.apply(CustomerId(u64::from(id)), &scope, Status::OptedOut).unwrap();
    }
    // A few opt-outs elsewhere, so the other pairs are not all empty.
    let sms = Scope::parse("waitlist", "sms").unwrap();
    for _ in 0..10_000 {
        index.apply(CustomerId(rng.below(UNIVERSE)), &sms, Status::OptedOut).unwrap();
    }
    let set = index.pair("rating", "email").unwrap();
    assert_eq!(set.len(), OPTED_OUT);

    let mut plain: RoaringBitmap = opted_out.iter().copied().collect();
    plain.optimize();

    let mut bitset = vec![0u64; UNIVERSE.div_ceil(64) as usize];
    for &id in &opted_out {
        bitset[(id >> 6) as usize] |= 1 << (id & 63);
    }

    let probes: Vec<u64> = (0..PROBES).map(|_| rng.below(UNIVERSE)).collect();
    // Every way of asking must agree on every probe.
    for &p in &probes {
        let out = !index.allowed(CustomerId(p), "rating", "email").unwrap();
        assert_eq!(out, set.contains(p));
        assert_eq!(out, plain.contains(p as u32));
        assert_eq!(out, bitset[(p >> 6) as usize] >> (p & 63) & 1 == 1);
    }

    let mut group = c.benchmark_group("check");
    group.warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(4));

    group.bench_function("probe_only", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let id = probes[i & (PROBES - 1)];
            i = i.wrapping_add(1);
            black_box(id)
        })
    });

    group.bench_function("index_allowed", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let id = black_box(probes[i & (PROBES - 1)]);
            i = i.wrapping_add(1);
            black_box(index.allowed(CustomerId(id), black_box("rating"), black_box("email")))
        })
    });

    group.bench_function("idset_contains", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let id = black_box(probes[i & (PROBES - 1)]);
            i = i.wrapping_add(1);
            black_box(set.contains(id))
        })
    });

    group.bench_function("roaring_contains", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let id = black_box(probes[i & (PROBES - 1)]);
            i = i.wrapping_add(1);
            black_box(plain.contains(id as u32))
        })
    });

    group.bench_function("flat_bitset_contains", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let id = black_box(probes[i & (PROBES - 1)]);
            i = i.wrapping_add(1);
            black_box(bitset.get((id >> 6) as usize).is_some_and(|w| w >> (id & 63) & 1 == 1))
        })
    });

    group.bench_function("index_pair_lookup", |b| {
        b.iter(|| black_box(index.pair(black_box("rating"), black_box("email")).is_ok()))
    });

    group.bench_function("idset_contains_hot", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let id = black_box(probes[i & (HOT_PROBES - 1)]);
            i = i.wrapping_add(1);
            black_box(set.contains(id))
        })
    });

    group.finish();
}

criterion_group!(benches, bench_check);
criterion_main!(benches);
