//! Shared by the benches: fixed-seed test data, the services and channels of
//! a pre-filled store, and the clock they are timed by.

// Each bench uses a different subset of what is here.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use prefsd::domain::{ChannelName, CustomerId, Origin, Scope, ServiceSlug, Status};
use prefsd::writer::Op;
use roaring::RoaringBitmap;

/// Ids range over 0..UNIVERSE.
pub const UNIVERSE: u64 = 20_000_000;

/// The services of a pre-filled store, in pair order.
pub const SERVICES: [&str; 10] = [
    "rating",
    "waitlist",
    "appointment",
    "reminder",
    "billing",
    "marketing",
    "survey",
    "security",
    "shipping",
    "newsletter",
];
/// The default channels.
pub const CHANNELS: [&str; 2] = ["email", "sms"];

/// Whether this is `cargo bench` measuring (not `--test`, `--list`, or `cargo test`).
pub fn benchmarking() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list")
}

/// [`CHANNELS`], parsed: what `Store::load` is given.
pub fn channels() -> Vec<ChannelName> {
    CHANNELS.iter().map(|c| ChannelName::parse(c).unwrap()).collect()
}

/// Every (service, channel) scope of [`SERVICES`] × [`CHANNELS`], in index
/// pair order: a pair's position is its number in [`pair_rows`].
pub fn scopes() -> Vec<Scope> {
    SERVICES.iter().flat_map(|s| CHANNELS.iter().map(move |c| Scope::parse(s, c).unwrap())).collect()
}

/// `per_pair` distinct random customers in 0..UNIVERSE for each of `pairs`
/// pairs, drawn pair after pair with [`distinct_ids`], as sorted
/// `customer << 8 | pair` rows: customer order, then pair order (an import
/// in that order appends to the store's tables).
pub fn pair_rows(rng: &mut SplitMix64, pairs: u64, per_pair: u64) -> Vec<u64> {
    let mut rows = Vec::with_capacity((per_pair * pairs) as usize);
    for pair in 0..pairs {
        rows.extend(distinct_ids(rng, per_pair).into_iter().map(|id| (u64::from(id) << 8) | pair));
    }
    rows.sort_unstable();
    rows
}

/// Where the benches' writes say they come from: `source`, actor `bench`.
pub fn origin(source: &str) -> Origin {
    Origin { source: source.into(), actor: "bench".into(), client_addr: None, user_agent: None }
}

/// `Op::CreateService` for each of [`SERVICES`], named by its slug, actor `bench`.
pub fn create_services() -> impl Iterator<Item = Op> {
    SERVICES.into_iter().map(|slug| Op::CreateService {
        slug: ServiceSlug::parse(slug).unwrap(),
        name: slug.into(),
        description: String::new(),
        actor: "bench".into(),
    })
}

/// The opt-out a [`pair_rows`] row stands for: `Op::SetPreference` of
/// customer `row >> 8` in `scopes[row & 0xff]`.
pub fn opt_out(row: u64, scopes: &[Scope], origin: &Origin) -> Op {
    Op::SetPreference {
        customer: CustomerId(row >> 8),
        scope: scopes[(row & 0xff) as usize].clone(),
        status: Status::OptedOut,
        reason: None,
        origin: origin.clone(),
    }
}

/// splitmix64: a fixed-seed generator, enough for benchmark data.
#[derive(Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in 0..n for n far below 2^64.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in 0..n: the next 64 bits scaled by n, `(bits × n) >> 64`.
    /// Not the numbers [`below`](Self::below) draws; what `compare` uses.
    pub fn scaled(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// `n` distinct random ids in 0..UNIVERSE, in drawing order.
pub fn distinct_ids(rng: &mut SplitMix64, n: u64) -> Vec<u32> {
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

/// What the benches are timed by: wall-clock time, criterion's default; or,
/// with `PREFSD_BENCH_CLOCK=cpu`, the CPU time of the benchmarking thread,
/// which leaves out the time it waited for a core. The development machine
/// has two cores that concurrent builds keep busy; there wall-clock numbers
/// of a single-threaded bench are inflated by whatever else runs.
pub struct Clock {
    cpu: bool,
    wall: WallTime,
}

impl Clock {
    /// The clock `PREFSD_BENCH_CLOCK` asks for: `cpu`, or wall time.
    pub fn from_env() -> Self {
        let cpu = std::env::var("PREFSD_BENCH_CLOCK").is_ok_and(|v| v.eq_ignore_ascii_case("cpu"));
        if cpu {
            // Fail before measuring anything if the kernel does not say.
            thread_cpu_ns();
        }
        eprintln!(
            "timing by {}",
            if cpu { "thread CPU time (PREFSD_BENCH_CLOCK=cpu)" } else { "wall-clock time" }
        );
        Clock { cpu, wall: WallTime }
    }
}

/// Where a measurement started, on the clock in use.
pub enum Start {
    /// Wall-clock start.
    Wall(Instant),
    /// Thread CPU nanoseconds at the start.
    Cpu(u64),
}

impl Measurement for Clock {
    type Intermediate = Start;
    type Value = Duration;

    fn start(&self) -> Start {
        if self.cpu { Start::Cpu(thread_cpu_ns()) } else { Start::Wall(Instant::now()) }
    }

    fn end(&self, start: Start) -> Duration {
        match start {
            Start::Wall(t) => t.elapsed(),
            Start::Cpu(ns) => Duration::from_nanos(thread_cpu_ns().saturating_sub(ns)),
        }
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

/// CPU time this thread has run, in nanoseconds: the first field of
/// `/proc/thread-self/schedstat`. The kernel brings that field up to date only
/// at a tick or a context switch, so yield first: `sched_yield` updates it.
fn thread_cpu_ns() -> u64 {
    std::thread::yield_now();
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("PREFSD_BENCH_CLOCK=cpu needs Linux /proc/thread-self/schedstat");
    stat.split_whitespace().next().and_then(|v| v.parse().ok()).expect("schedstat starts with run time in ns")
}

/// An index over `email` and `sms` with the services `rating`, `waitlist`
/// and `appointment`, where `opted_out` have opted out of `rating`/`email`.
pub fn rating_email_index(opted_out: &[u32]) -> prefsd::index::Index {
    let mut index = prefsd::index::Index::new(channels());
    for slug in ["rating", "waitlist", "appointment"] {
        index.add_service(&ServiceSlug::parse(slug).unwrap());
    }
    let scope = Scope::parse("rating", "email").unwrap();
    for &id in opted_out {
        index.apply(CustomerId(u64::from(id)), &scope, Status::OptedOut).unwrap();
    }
    index
}
