//! Start-up with 10,000,000 stored opt-outs: what `prefsd serve` does
//! before it is ready, `Store::open` + `Store::load`.
//!
//! The data dir holds 10 services × 2 channels (`email`, `sms`) and
//! 10,000,000 opt-outs, 500,000 per (service, channel) pair: distinct random
//! customers in 0..20,000,000 per pair (2.5% density), fixed-seed
//! splitmix64. It is built through the public API as a sidecar would hold
//! it — `Writer::write_many` in calls of 200,000 ops, commits of up to 65,536
//! — in ascending customer order so each commit appends to the tables (the
//! order does not change what start-up reads: the snapshot), then
//! `Writer::close`, which writes the index snapshot, so `Store::load` starts
//! from it with no events to replay (about 2 GB on disk, a few minutes to build).
//!
//! The data dir is cached under `target/tmp/bench-startup-10m/KEY/`, KEY
//! naming this bench's data format and the store's schema version; later
//! runs reuse it after checking it (it must load from the snapshot with every
//! pair holding 500,000 ids), and a build removes what other keys left there.
//! Delete the directory to reclaim the space. Two runs of this bench at once
//! cannot share it: redb lets one process open a database.
//!
//! - `startup/open_load_10m`: `Store::open` (all it does: redb's open, the
//!   schema check's write transaction, any recovery) and `Store::load` until
//!   the `Loaded` index is in hand; dropping the store and the index is
//!   outside the timing. Ten samples, flat sampling; the page cache is warm
//!   (the data dir was just built or checked).
//!
//! Printed once, before measuring: the first open and load separately, the
//! index's entries and `Index::heap_bytes` per entry, and the size of
//! `prefsd.redb`.
//!
//! Run with `cargo bench --bench startup`. Outside `cargo bench` (e.g. `cargo
//! test --benches`) a 100,000-opt-out data dir is built in a temporary
//! directory instead and the cache is left alone.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::{CHANNELS, SERVICES, SplitMix64};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use prefsd::metrics::Metrics;
use prefsd::store::{SCHEMA_VERSION, Store};
use prefsd::writer::{Writer, WriterConfig};

/// Opt-outs per pair: 20 pairs × 500,000 = 10,000,000.
const PER_PAIR: u64 = 500_000;
/// Opt-outs per pair outside `cargo bench`.
const TEST_PER_PAIR: u64 = 5_000;
/// Bump when what the cached data dir holds changes.
const FORMAT: u32 = 1;
/// Ops per `write_many` while building.
const CHUNK: usize = 200_000;
/// The writer's settings while building: big commits.
const BUILD_WRITER: WriterConfig = WriterConfig { max_batch: 65_536, queue: CHUNK };

/// `per_pair` distinct random customers for each pair, as sorted
/// `customer << 8 | pair` rows: customer order, then pair order.
fn rows(per_pair: u64) -> Vec<u64> {
    let pairs = (SERVICES.len() * CHANNELS.len()) as u64;
    common::pair_rows(&mut SplitMix64(0x5EED_0010), pairs, per_pair)
}

/// Builds a data dir in `data` (which must not exist) and closes it, so the
/// index snapshot is written.
fn build(data: &Path, per_pair: u64) -> Result<(), String> {
    let started = Instant::now();
    let store = Arc::new(Store::open(data).map_err(|e| e.to_string())?);
    let loaded = store.load(&common::channels()).map_err(|e| e.to_string())?;
    if loaded.last_seq != 0 {
        return Err(format!("{} is not empty", data.display()));
    }
    let index = Arc::new(RwLock::new(loaded.index));
    let (writer, thread) =
        Writer::start(store, index, loaded.services, 0, BUILD_WRITER, Arc::new(Metrics::new()));
    let rows = rows(per_pair);
    let scopes = common::scopes();
    let origin = common::origin("import");
    let rt = tokio::runtime::Builder::new_current_thread().build().map_err(|e| e.to_string())?;
    let written = rt.block_on(async {
        for op in common::create_services() {
            writer.write(op).await.map_err(|e| e.to_string())?;
        }
        let mut done = 0usize;
        let mut report = Instant::now();
        for chunk in rows.chunks(CHUNK) {
            let ops = chunk.iter().map(|&row| common::opt_out(row, &scopes, &origin)).collect();
            for r in writer.write_many(ops).await {
                r.map_err(|e| e.to_string())?;
            }
            done += chunk.len();
            if report.elapsed() >= Duration::from_secs(10) {
                report = Instant::now();
                let s = started.elapsed().as_secs_f64();
                eprintln!(
                    "  {done} of {} opt-outs written, {s:.0} s, {:.0} writes/s",
                    rows.len(),
                    done as f64 / s
                );
            }
        }
        // Finishes the queue and writes the index snapshot.
        writer.close().await;
        Ok::<usize, String>(done)
    })?;
    // The thread owns the store: once it ends, redb is closed cleanly.
    thread.join().map_err(|_| "the writer thread panicked".to_owned())?;
    let s = started.elapsed().as_secs_f64();
    eprintln!(
        "built {} with {written} opt-outs in {s:.1} s = {:.0} writes/s",
        data.display(),
        written as f64 / s
    );
    Ok(())
}

/// Opens and loads `data` once, checks it holds what [`build`] writes, and
/// prints the figures. Answers why not, if it does not.
fn check(data: &Path, per_pair: u64) -> Result<(), String> {
    let started = Instant::now();
    // Not a reason to rebuild: another run may have it open (redb allows one process).
    let store = Store::open(data).unwrap_or_else(|e| {
        panic!("cannot open {}: {e} (delete the directory to build it again)", data.display())
    });
    let opened = started.elapsed();
    let loaded = store.load(&common::channels()).map_err(|e| e.to_string())?;
    let total = started.elapsed();
    if !loaded.from_snapshot {
        return Err("it has no usable index snapshot".into());
    }
    let index = &loaded.index;
    if index.services().len() != SERVICES.len() {
        return Err(format!("it holds {} services, not {}", index.services().len(), SERVICES.len()));
    }
    if let Some((s, c, set)) = index.iter_pairs().find(|(_, _, set)| set.len() != per_pair) {
        return Err(format!("{s}/{c} holds {} ids, not {per_pair}", set.len()));
    }
    let entries = index.entries();
    let heap = index.heap_bytes();
    let file = std::fs::metadata(data.join("prefsd.redb")).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "first open {:.1} ms + load {:.1} ms; {entries} index entries, last_seq {}, index heap {:.1} MiB = \
         {:.2} bytes per entry; prefsd.redb {:.0} MiB",
        opened.as_secs_f64() * 1e3,
        (total - opened).as_secs_f64() * 1e3,
        loaded.last_seq,
        heap as f64 / 1048576.0,
        heap as f64 / entries as f64,
        file as f64 / 1048576.0,
    );
    Ok(())
}

/// The cached data dir's parent, its key, and the data dir.
fn cache() -> (PathBuf, String) {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-startup-10m");
    (root, format!("v{FORMAT}-schema{SCHEMA_VERSION}"))
}

/// Removes what other keys and dead builds left in the cache.
fn sweep(root: &Path, key: &str) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let live_build = name
            .strip_prefix(&format!("{key}.build-"))
            .is_some_and(|pid| Path::new("/proc").join(pid).exists());
        if name != key && !live_build {
            eprintln!("removing {}", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The cached 10M data dir: checked and reused, or built now.
fn cached_data() -> PathBuf {
    let (root, key) = cache();
    let dir = root.join(&key);
    for attempt in 0..2 {
        if dir.join("complete").is_file() {
            match check(&dir.join("data"), PER_PAIR) {
                Ok(()) => {
                    if attempt == 0 {
                        eprintln!("reusing {}", dir.display());
                    }
                    return dir.join("data");
                }
                Err(why) if attempt == 0 => {
                    eprintln!("the cached {} is unusable ({why}); building it again", dir.display());
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(why) => panic!("the data dir just built is unusable: {why}"),
            }
        }
        sweep(&root, &key);
        let building = root.join(format!("{key}.build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&building);
        eprintln!("building the 10M data set in {} (once; later runs reuse it)", building.display());
        build(&building.join("data"), PER_PAIR).expect("build the data dir");
        std::fs::write(building.join("complete"), format!("{} opt-outs\n", PER_PAIR * 20)).unwrap();
        // A concurrent run may have finished first; then keep its copy.
        if std::fs::rename(&building, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&building);
        }
    }
    unreachable!("the loop returns or panics")
}

fn bench_startup(c: &mut Criterion) {
    let scratch;
    let data = if common::benchmarking() {
        cached_data()
    } else {
        scratch = tempfile::tempdir().expect("a temporary directory");
        let data = scratch.path().join("data");
        build(&data, TEST_PER_PAIR).expect("build the data dir");
        check(&data, TEST_PER_PAIR).expect("the data dir just built");
        data
    };
    let channels = common::channels();
    let mut group = c.benchmark_group("startup");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(20));
    group.bench_function("open_load_10m", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let store = Store::open(&data).expect("open the store");
                let loaded = store.load(&channels).expect("load the index");
                took += started.elapsed();
                assert!(loaded.from_snapshot);
                drop(loaded);
                drop(store);
            }
            took
        })
    });
    group.finish();
}

criterion_group!(benches, bench_startup);
criterion_main!(benches);
