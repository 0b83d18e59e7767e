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
//! - `index_pair_lookup`: `Index::pair("rating", "email")` alone, the slug
//!   and channel lookups without a probe;
//! - `index_allowed`: `Index::allowed(customer, "rating", "email")`, the full
//!   path with the slug and channel lookups;
//! - `idset_contains`: `IdSet::contains` on the resolved pair;
//! - `roaring_contains`: a plain `RoaringBitmap::contains` on the same ids;
//! - `flat_bitset_contains`: a `Vec<u64>` with one bit per id in 0..20M.
//!
//! The plain forms cycle through 65,536 random probes, independent of each
//! other, so the CPU overlaps the cache misses of successive probes: a
//! throughput figure, as in DESIGN.md's baselines. The `_hot` forms cycle
//! through 32 probes only, so everything they touch stays in L1/L2: the
//! instructions' own cost, without cache or TLB misses.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::{Clock, SplitMix64, UNIVERSE, distinct_ids};
use criterion::{Bencher, Criterion, criterion_group, criterion_main};
use prefsd::domain::{CustomerId, Scope, Status};
use roaring::RoaringBitmap;

/// Opted-out ids in the measured pair: 5% of the universe.
const OPTED_OUT: u64 = 1_000_000;
/// Pre-generated probes; a power of two so cycling is a mask.
const PROBES: usize = 1 << 16;
/// Probes of the cache-hot variant.
const HOT_PROBES: usize = 32;

fn bench_check(c: &mut Criterion<Clock>) {
    let mut rng = SplitMix64(0x00C0_FFEE);
    let opted_out = distinct_ids(&mut rng, OPTED_OUT);

    let mut index = common::rating_email_index(&opted_out);
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

    let hot = &probes[..HOT_PROBES];
    let allowed =
        |id: u64| matches!(index.allowed(CustomerId(id), black_box("rating"), black_box("email")), Ok(true));
    let in_bitset = |id: u64| bitset.get((id >> 6) as usize).is_some_and(|w| w >> (id & 63) & 1 == 1);

    let mut group = c.benchmark_group("check");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));

    group.bench_function("probe_only", |b| independent(b, &probes, |_| false));
    group.bench_function("index_pair_lookup", |b| {
        b.iter(|| black_box(index.pair(black_box("rating"), black_box("email")).is_ok()))
    });
    group.bench_function("index_allowed", |b| independent(b, &probes, allowed));
    group.bench_function("index_allowed_hot", |b| independent(b, hot, allowed));
    group.bench_function("idset_contains", |b| independent(b, &probes, |id| set.contains(id)));
    group.bench_function("idset_contains_hot", |b| independent(b, hot, |id| set.contains(id)));
    group.bench_function("roaring_contains", |b| independent(b, &probes, |id| plain.contains(id as u32)));
    group.bench_function("flat_bitset_contains", |b| independent(b, &probes, in_bitset));

    group.finish();
}

/// Times `f` on each probe in turn. The probes are independent, so the CPU
/// may overlap the cache misses of several: a throughput figure, the way a
/// batch or a filter runs.
fn independent(b: &mut Bencher<'_, Clock>, probes: &[u64], f: impl Fn(u64) -> bool) {
    let mask = probes.len() - 1;
    let mut i = 0usize;
    b.iter(|| {
        let id = black_box(probes[i & mask]);
        i = i.wrapping_add(1);
        black_box(f(id))
    })
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(Clock::from_env());
    targets = bench_check
}
criterion_main!(benches);
