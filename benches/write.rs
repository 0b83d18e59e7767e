//! Durable writes through the group-commit writer: one write, and a group of 64.
//!
//! Uses the library as `prefsd serve` does (see `App::open`): `Store::open`
//! on a fresh data dir, `Store::load`, then `Writer::start` with the default
//! writer settings (`commit_batch_max` 4,096, queue 65,536), driven from a
//! current-thread tokio runtime with `block_on`.
//!
//! The store is pre-filled once per run, before anything is timed: 10
//! services × 2 channels (`email`, `sms`), and 1,000,000 opt-outs — 50,000
//! distinct random customers in 0..20,000,000 per (service, channel) pair —
//! written through `Writer::write_many` in groups of 50,000 in ascending
//! customer order (an import; each commit appends, so building takes
//! seconds), so the store holds 1,000,010 events and 1,000,000 records.
//!
//! Measured writes are `Op::SetPreference` on random customers in
//! 0..20,000,000 and a random one of the 20 pairs (fixed-seed splitmix64),
//! alternating opted out and opted in; building the ops is outside the timing.
//!
//! - `write/one_durable`: one `Writer::write`, from submission until it is
//!   acknowledged: committed with an fsync and applied to the index;
//! - `write/group_64`: one `Writer::write_many` of 64 ops, until all 64 are
//!   acknowledged; the time is per group (criterion's throughput line gives
//!   writes/s). The writer thread wakes on the first op and commits whatever
//!   has arrived by then, so a group may take more than one commit; the bench
//!   prints how many commits the groups took (from the writer's
//!   `prefsd_commit_batch_size` histogram).
//!
//! The data dir is a temporary directory under `target/tmp` (cargo's
//! `CARGO_TARGET_TMPDIR`), not `/tmp`, which may be a tmpfs where an fsync
//! costs nothing. Wall-clock time only: a durable write waits on the disk, so
//! `PREFSD_BENCH_CLOCK=cpu` would not mean anything here and is ignored.
//!
//! Run with `cargo bench --bench write`. Outside `cargo bench` (e.g. `cargo
//! test --benches`) the pre-fill is 1,000 opt-outs per pair, so the test
//! pass stays quick.

mod common;

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::{SERVICES, SplitMix64, UNIVERSE};
use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use prefsd::domain::{CustomerId, Origin, Scope, Status};
use prefsd::metrics::{Metrics, Scrape};
use prefsd::store::Store;
use prefsd::writer::{Op, Writer, WriterConfig};
use tokio::runtime::Runtime;

/// Opt-outs per pair in the pre-filled store (under `cargo bench`).
const PREFILL_PER_PAIR: u64 = 50_000;
/// Opt-outs per pair outside `cargo bench`.
const TEST_PER_PAIR: u64 = 1_000;
/// Ops per `write_many` while pre-filling.
const PREFILL_GROUP: usize = 50_000;
/// Ops in the measured group.
const GROUP: usize = 64;
/// The writer's settings: `App::open`'s, with the default `commit_batch_max`.
const WRITER: WriterConfig = WriterConfig { max_batch: 4096, queue: 65_536 };

/// The writer over a store, started as `App::open` starts it.
struct Running {
    writer: Writer,
    thread: std::thread::JoinHandle<()>,
    metrics: Arc<Metrics>,
}

fn start(data: &Path) -> Running {
    let store = Arc::new(Store::open(data).expect("open the store"));
    let loaded = store.load(&common::channels()).expect("load the index");
    let metrics = Arc::new(Metrics::new());
    let index = Arc::new(RwLock::new(loaded.index));
    let (writer, thread) =
        Writer::start(store, index, loaded.services, loaded.last_seq, WRITER, metrics.clone());
    Running { writer, thread, metrics }
}

/// Registers the services and writes `per_pair` distinct random opt-outs in
/// every pair, in ascending customer order, `PREFILL_GROUP` ops per call.
fn prefill(rt: &Runtime, writer: &Writer, per_pair: u64) {
    let started = Instant::now();
    let scopes = common::scopes();
    let rows = common::pair_rows(&mut SplitMix64(0x5EED_0001), scopes.len() as u64, per_pair);
    let origin = common::origin("import");
    rt.block_on(async {
        for op in common::create_services() {
            writer.write(op).await.expect("create a service");
        }
        for chunk in rows.chunks(PREFILL_GROUP) {
            let ops = chunk.iter().map(|&row| common::opt_out(row, &scopes, &origin)).collect();
            for r in writer.write_many(ops).await {
                r.expect("pre-fill an opt-out");
            }
        }
    });
    let took = started.elapsed().as_secs_f64();
    eprintln!(
        "pre-filled {} services and {} opt-outs ({per_pair} per pair) in {took:.1} s = {:.0} writes/s",
        SERVICES.len(),
        rows.len(),
        rows.len() as f64 / took
    );
}

/// The measured writes: random customers and pairs, alternating status.
struct Ops {
    rng: SplitMix64,
    scopes: Vec<Scope>,
    origin: Origin,
    n: u64,
}

impl Ops {
    fn next(&mut self) -> Op {
        let customer = CustomerId(self.rng.below(UNIVERSE));
        let scope = self.scopes[self.rng.below(self.scopes.len() as u64) as usize].clone();
        let status = if self.n % 2 == 0 { Status::OptedOut } else { Status::OptedIn };
        self.n += 1;
        Op::SetPreference { customer, scope, status, reason: None, origin: self.origin.clone() }
    }
}

/// Commits so far and ops they held, from the writer's histogram.
fn commits(metrics: &Metrics) -> (f64, f64) {
    let text = metrics.render(Scrape::default(), false);
    let value = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("prefsd_commit_batch_size_count"), value("prefsd_commit_batch_size_sum"))
}

/// Prints how the writes of one bench were committed.
fn report(name: &str, metrics: &Metrics, before: (f64, f64), writes_per_call: usize) {
    let (count, sum) = commits(metrics);
    let (commits, writes) = (count - before.0, sum - before.1);
    if writes > 0.0 {
        let calls = writes / writes_per_call as f64;
        eprintln!(
            "{name}: {writes:.0} writes in {calls:.0} calls took {commits:.0} commits: \
             {:.2} commits per call, {:.1} writes per commit",
            commits / calls,
            writes / commits
        );
    }
}

fn bench_write(c: &mut Criterion) {
    let per_pair = if common::benchmarking() { PREFILL_PER_PAIR } else { TEST_PER_PAIR };
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).expect("create target/tmp");
    let dir = tempfile::Builder::new().prefix("bench-write-").tempdir_in(root).expect("a temporary data dir");
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("a tokio runtime");
    let Running { writer, thread, metrics } = start(&dir.path().join("data"));
    prefill(&rt, &writer, per_pair);

    let mut ops =
        Ops { rng: SplitMix64(0x5EED_0002), scopes: common::scopes(), origin: common::origin("api"), n: 0 };
    let mut group = c.benchmark_group("write");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(50)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15));

    let before = commits(&metrics);
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_durable", |b| {
        b.iter_batched(
            || ops.next(),
            |op| rt.block_on(writer.write(op)).expect("a durable write"),
            BatchSize::PerIteration,
        )
    });
    report("write/one_durable", &metrics, before, 1);

    let before = commits(&metrics);
    group.throughput(Throughput::Elements(GROUP as u64));
    group.bench_function("group_64", |b| {
        b.iter_batched(
            || (0..GROUP).map(|_| ops.next()).collect::<Vec<_>>(),
            |batch| {
                for r in rt.block_on(writer.write_many(batch)) {
                    r.expect("a durable write");
                }
            },
            BatchSize::PerIteration,
        )
    });
    report("write/group_64", &metrics, before, GROUP);
    group.finish();

    rt.block_on(writer.close());
    thread.join().expect("the writer thread");
}

criterion_group!(benches, bench_write);
criterion_main!(benches);
