//! The write-ahead log under faults, at the store and writer level:
//!
//! - a torn last frame is dropped silently; a damaged frame with intact
//!   frames after it refuses to open, naming the file and the offset;
//! - `prefsd recover` (the binary) brings such a directory back, keeps a copy
//!   of the log, lists and audits the loss, and `prefsd serve` then starts
//!   with every event from before the damage;
//! - injected write and fsync failures (a [`LogFile`] that fails on demand):
//!   the batch is refused, nothing refused comes back after a restart,
//!   nothing acknowledged is lost, and the writer goes on or refuses clearly.

mod util;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use prefsd::domain::{CustomerId, Event, Origin, Scope, ServiceSlug, Status};
use prefsd::metrics::Metrics;
use prefsd::store::{Store, StoreError, StoreOptions, WrapDb};
use prefsd::wal::{self, LogFile, WrapFile};
use prefsd::writer::{Op, WriteError, Writer, WriterConfig};

fn origin() -> Origin {
    Origin { source: "api".into(), actor: "test".into(), client_addr: None, user_agent: None }
}

fn opt_out(customer: u64) -> Op {
    Op::SetPreference {
        customer: CustomerId(customer),
        scope: Scope::parse("rating", "email").unwrap(),
        status: Status::OptedOut,
        reason: Some(format!("customer {customer}")),
        origin: origin(),
    }
}

/// A writer thread over `store`, as `App::open` starts one.
fn writer(store: &Arc<Store>) -> Writer {
    let loaded = store.load(&[prefsd::domain::ChannelName::parse("email").unwrap()]).unwrap();
    let (writer, _thread) = Writer::start(
        store.clone(),
        Arc::new(RwLock::new(loaded.index)),
        loaded.services,
        loaded.last_seq,
        WriterConfig { max_batch: 64, queue: 64 },
        Arc::new(Metrics::new()),
    );
    writer
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// Every stored event: (seq, customer) for preferences, (seq, 0) for the rest.
fn stored(store: &Store) -> Vec<(u64, u64)> {
    store
        .events_after(0, 1_000_000)
        .unwrap()
        .into_iter()
        .map(|(seq, e)| match e {
            Event::Preference(c) => (seq, c.customer.0),
            _ => (seq, 0),
        })
        .collect()
}

fn customers(events: &[(u64, u64)]) -> BTreeSet<u64> {
    events.iter().map(|&(_, c)| c).filter(|&c| c != 0).collect()
}

/// A store with service `rating` and one opt-out each for customers
/// `1..=n`, each its own batch (one log append), not checkpointed.
fn store_with(dir: &Path, n: u64) -> Arc<Store> {
    let store = Arc::new(Store::open(dir).unwrap());
    let w = writer(&store);
    block(async {
        w.write(Op::CreateService {
            slug: ServiceSlug::parse("rating").unwrap(),
            name: "Ratings".into(),
            description: String::new(),
            actor: "test".into(),
        })
        .await
        .unwrap();
        for c in 1..=n {
            w.write(opt_out(c)).await.unwrap();
        }
    });
    store
}

/// The data directory as a crash would leave it: redb's file as it is on
/// disk (without what redb holds only in memory) and the log.
fn crash_image(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["prefsd.redb", wal::FILE_NAME] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

fn frames(dir: &Path) -> Vec<wal::Frame> {
    wal::scan(&std::fs::read(dir.join(wal::FILE_NAME)).unwrap()).frames
}

#[test]
fn a_torn_last_frame_is_dropped_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let (live, image) = (tmp.path().join("live"), tmp.path().join("image"));
    let store = store_with(&live, 5);
    crash_image(&live, &image);
    drop(store);
    let log = frames(&image);
    assert_eq!(log.len(), 6, "the service and five opt-outs are in the log");
    // The last frame loses its last byte, as an append cut by a crash would.
    let path = image.join(wal::FILE_NAME);
    let len = std::fs::metadata(&path).unwrap().len();
    File::options().write(true).open(&path).unwrap().set_len(len - 1).unwrap();

    let store = Store::open(&image).unwrap();
    assert_eq!(store.replayed(), 5, "the service and four opt-outs replayed");
    assert_eq!(customers(&stored(&store)), (1..=4).collect());
    assert_eq!(store.last_seq().unwrap(), 5);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "the log was emptied after the replay");
}

/// Flips one byte inside the payload of the frame of customer `victim`.
fn damage(dir: &Path, victim: u64) -> u64 {
    let frame = frames(dir).into_iter().nth(victim as usize).expect("the victim's frame");
    let at = frame.offset + 16 + 2;
    let file = File::options().read(true).write(true).open(dir.join(wal::FILE_NAME)).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    FileExt::write_all_at(&file, &[byte[0] ^ 0x40], at).unwrap();
    frame.offset
}

#[test]
fn a_damaged_middle_frame_refuses_to_open_and_recover_brings_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (live, image) = (tmp.path().join("live"), tmp.path().join("image"));
    let store = store_with(&live, 30);
    crash_image(&live, &image);
    drop(store);
    let offset = damage(&image, 10);

    // Refused, with the file, the offset and the frames after it.
    let err = Store::open(&image).err().expect("a damaged log refuses to open");
    assert!(matches!(err, StoreError::WalDamaged { offset: o, later: 20, .. } if o == offset), "{err:?}");
    let message = err.to_string();
    for needle in [
        image.join(wal::FILE_NAME).display().to_string(),
        format!("at byte {offset}"),
        "20 intact frames".into(),
        "prefsd recover --data".into(),
    ] {
        assert!(message.contains(&needle), "{needle:?} missing from: {message}");
    }

    // `prefsd serve` refuses too, with that message, and exits non-zero.
    let port = util::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_prefsd"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(&image)
        .env_remove("PREFSD_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started on a damaged log: {stderr}");
    assert!(stderr.contains(&format!("at byte {offset}")) && stderr.contains("prefsd recover"), "{stderr}");

    // The operator's way forward.
    let out =
        Command::new(env!("CARGO_BIN_EXE_prefsd")).args(["recover", "--data"]).arg(&image).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "recover failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    // Frame 10 is customer 10's opt-out, event 11: the service and customers
    // 1 to 9 before it, 11 to 30 after it.
    assert!(stdout.contains("replayed 30 events"), "{stdout}");
    assert!(stdout.contains("lost 1 events (sequence numbers 11 to 11)"), "{stdout}");
    assert!(stdout.contains("recorded the loss as audit event 32"), "{stdout}");
    // A copy of the damaged log, byte for byte.
    let names: Vec<String> = std::fs::read_dir(&image)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let copy =
        names.iter().find(|n| n.starts_with("prefsd.wal.damaged-")).expect("a copy of the damaged log");
    let kept = wal::scan(&std::fs::read(image.join(copy)).unwrap()).damage.unwrap();
    assert_eq!(kept.offset, offset);

    // The store opens: every intact event, then the audit event.
    let store = Store::open(&image).unwrap();
    let events = store.events_after(0, 1000).unwrap();
    assert_eq!(customers(&stored(&store)), (1..=30).filter(|&c| c != 10).collect());
    assert!(events.iter().all(|(seq, _)| *seq != 11), "the lost number is never given to another event");
    let (seq, last) = events.last().unwrap();
    assert_eq!(*seq, 32);
    let Event::Recovery(note) = last else { panic!("the last event is {last:?}") };
    assert_eq!(
        (note.offset, note.replayed, note.dropped, note.dropped_seqs),
        (offset, 30, 1, Some((11, 11)))
    );
    assert_eq!(&note.copy, copy);
    assert_eq!(
        note.unreadable_bytes,
        kept.later[0].offset - offset,
        "exactly the damaged frame is unreadable"
    );
    assert_eq!(store.last_seq().unwrap(), 32);
    drop(store);

    // And the sidecar serves it: the replayed writes, and new ones after the note.
    let child = util::ChildSidecar::start(&image, &[]);
    for c in [9, 11, 30] {
        let prefs = child.client.call("GET", &format!("/v1/customers/{c}/preferences"), None).unwrap();
        assert_eq!(prefs["records"][0]["status"], "opted_out", "{prefs}");
    }
    let check = child.client.call("GET", "/v1/check?customer=10&service=rating&channel=email", None).unwrap();
    assert_eq!(check["allowed"], true, "{check}");
    let put = child
        .client
        .call(
            "PUT",
            "/v1/customers/99/preferences/rating/email",
            Some(&serde_json::json!({"status": "opted_out"})),
        )
        .unwrap();
    assert_eq!(put["seq"], 33, "{put}");
}

/// What the failing file fails next: each counter is the number of calls
/// still to fail.
#[derive(Debug, Default)]
struct Faults {
    writes: AtomicU32,
    syncs: AtomicU32,
    set_lens: AtomicU32,
}

fn take(counter: &AtomicU32) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

#[derive(Debug)]
struct FailingFile {
    file: File,
    faults: Arc<Faults>,
}

impl LogFile for FailingFile {
    fn read_all(&self) -> io::Result<Vec<u8>> {
        self.file.read_all()
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if take(&self.faults.writes) {
            // Half of it made it, as a write cut short by ENOSPC would.
            FileExt::write_all_at(&self.file, &buf[..buf.len() / 2], offset)?;
            return Err(io::Error::other("injected write failure"));
        }
        FileExt::write_all_at(&self.file, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        if take(&self.faults.syncs) {
            return Err(io::Error::other("injected fdatasync failure"));
        }
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if take(&self.faults.set_lens) {
            return Err(io::Error::other("injected ftruncate failure"));
        }
        self.file.set_len(len)
    }

    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }
}

fn failing_store(dir: &Path, faults: &Arc<Faults>) -> Arc<Store> {
    let faults = faults.clone();
    let wrap = WrapFile(Arc::new(move |file| Box::new(FailingFile { file, faults: faults.clone() })));
    Arc::new(Store::open_with(dir, StoreOptions { wrap_log: Some(wrap), ..StoreOptions::default() }).unwrap())
}

/// One fault scenario: customers 1..=3 acknowledged, customer 4 refused
/// under `inject`, then customer 5: acknowledged if `recovers`, refused
/// (with a message saying to restart) if not. After a crash image and a
/// restart, exactly the acknowledged ones are there, in an unbroken
/// sequence, and new writes work.
fn scenario(name: &str, inject: impl FnOnce(&Faults), recovers: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let (live, image) = (tmp.path().join("live"), tmp.path().join("image"));
    let faults = Arc::new(Faults::default());
    let store = failing_store(&live, &faults);
    let w = writer(&store);
    let mut acked = BTreeSet::new();
    block(async {
        w.write(Op::CreateService {
            slug: ServiceSlug::parse("rating").unwrap(),
            name: "Ratings".into(),
            description: String::new(),
            actor: "test".into(),
        })
        .await
        .unwrap();
        for c in 1..=3 {
            w.write(opt_out(c)).await.unwrap();
            acked.insert(c);
        }
        inject(&faults);
        let refused = w.write(opt_out(4)).await;
        assert!(matches!(refused, Err(WriteError::Store(_))), "{name}: customer 4 got {refused:?}");
        let next = w.write(opt_out(5)).await;
        match (recovers, next) {
            (true, Ok(applied)) => {
                assert_eq!(applied.seq(), 5, "{name}: the refused batch's number is given again");
                acked.insert(5);
            }
            (false, Err(WriteError::Store(m))) => {
                assert!(m.contains("restarted"), "{name}: the refusal says what to do: {m}")
            }
            (_, other) => panic!("{name}: customer 5 got {other:?}"),
        }
    });
    crash_image(&live, &image);
    drop(w);
    drop(store);

    let store = Store::open(&image).unwrap();
    let events = stored(&store);
    assert_eq!(customers(&events), acked, "{name}: exactly the acknowledged writes after a restart");
    let seqs: Vec<u64> = events.iter().map(|&(s, _)| s).collect();
    assert_eq!(seqs, (1..=acked.len() as u64 + 1).collect::<Vec<_>>(), "{name}: no holes");
    let store = Arc::new(store);
    let w = writer(&store);
    let applied = block(w.write(opt_out(6))).unwrap();
    assert_eq!(applied.seq(), acked.len() as u64 + 2, "{name}");
}

#[test]
fn a_failed_write_is_refused_cut_back_and_the_writer_goes_on() {
    scenario("partial write", |f| f.writes.store(1, Ordering::SeqCst), true);
}

#[test]
fn a_failed_fdatasync_is_refused_cut_back_and_the_writer_goes_on() {
    scenario("fdatasync", |f| f.syncs.store(1, Ordering::SeqCst), true);
}

#[test]
fn a_failed_fdatasync_then_a_failed_cut_refuses_until_a_restart_that_drops_the_batch() {
    scenario(
        "fdatasync then ftruncate",
        |f| {
            f.syncs.store(1, Ordering::SeqCst);
            f.set_lens.store(1, Ordering::SeqCst);
        },
        false,
    );
}

#[test]
fn a_failed_fdatasync_then_a_failed_sync_of_the_cut_refuses_until_a_restart_that_drops_the_batch() {
    scenario("fdatasync twice", |f| f.syncs.store(2, Ordering::SeqCst), false);
}

#[test]
fn a_checkpoint_whose_cut_fails_to_sync_leaves_no_hole_before_the_next_append() {
    let tmp = tempfile::tempdir().unwrap();
    let (live, image) = (tmp.path().join("live"), tmp.path().join("image"));
    let faults = Arc::new(Faults::default());
    let store = failing_store(&live, &faults);
    let w = writer(&store);
    block(async {
        w.write(Op::CreateService {
            slug: ServiceSlug::parse("rating").unwrap(),
            name: "Ratings".into(),
            description: String::new(),
            actor: "test".into(),
        })
        .await
        .unwrap();
        w.write(opt_out(1)).await.unwrap();
    });
    // redb commits durably, then emptying the log fails at its fdatasync:
    // the file is empty in the page cache, so the next append goes at 0.
    faults.syncs.store(1, Ordering::SeqCst);
    let err = store.checkpoint().expect_err("the injected failure is reported");
    assert!(err.to_string().contains("cannot empty it"), "{err}");
    block(async {
        for c in 2..=4 {
            w.write(opt_out(c)).await.unwrap();
        }
    });
    crash_image(&live, &image);
    drop(w);
    drop(store);
    let log = wal::scan(&std::fs::read(image.join(wal::FILE_NAME)).unwrap());
    assert_eq!((log.frames.first().map(|f| f.offset), &log.damage), (Some(0), &None), "no hole: {log:?}");
    let store = Store::open(&image).unwrap();
    assert_eq!(customers(&stored(&store)), (1..=4).collect());
}

/// The reported attack, end to end through the binary: 300 opt-outs
/// acknowledged over HTTP, SIGKILL inside the checkpoint interval, one byte
/// flipped a third of the way into the log. The sidecar refuses to start;
/// `prefsd recover` keeps every acknowledged write but the one whose frame
/// was damaged, and names that one's sequence number as lost.
#[test]
fn a_flipped_byte_after_sigkill_loses_nothing_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut child = util::ChildSidecar::start(&data, &[]);
    child
        .client
        .call("POST", "/v1/services", Some(&serde_json::json!({"slug": "rating", "name": "R"})))
        .unwrap();
    let acked = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for t in 0..10u64 {
            let (client, acked) = (child.client.clone(), &acked);
            scope.spawn(move || {
                for i in 0..30 {
                    let customer = 100 + t * 30 + i;
                    let answer = client
                        .call(
                            "PUT",
                            &format!("/v1/customers/{customer}/preferences/rating/email"),
                            Some(&serde_json::json!({"status": "opted_out"})),
                        )
                        .unwrap();
                    acked.lock().unwrap().push((answer["seq"].as_u64().unwrap(), customer));
                }
            });
        }
    });
    child.kill();
    let acked = acked.into_inner().unwrap();
    assert_eq!(acked.len(), 300);

    let log = frames(&data);
    assert!(log.len() >= 30, "the log holds {} frames: a checkpoint emptied it before the kill", log.len());
    let victim = &log[log.len() / 3];
    let at = victim.offset + 16 + 3;
    let file = File::options().read(true).write(true).open(data.join(wal::FILE_NAME)).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    FileExt::write_all_at(&file, &[!byte[0]], at).unwrap();
    drop(file);

    let port = util::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_prefsd"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(&data)
        .env_remove("PREFSD_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a damaged log: {stderr}");
    assert!(stderr.contains(&format!("damaged at byte {}", victim.offset)), "{stderr}");

    let out =
        Command::new(env!("CARGO_BIN_EXE_prefsd")).args(["recover", "--data"]).arg(&data).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}{}", String::from_utf8_lossy(&out.stderr));

    assert!(report.contains(&format!("lost 1 events (sequence numbers {0} to {0})", victim.seq)), "{report}");
    let child = util::ChildSidecar::start(&data, &[]);
    for &(seq, customer) in &acked {
        let opted_out = !allowed_over(&child.client, customer);
        assert_eq!(opted_out, seq != victim.seq, "acknowledged event {seq} (customer {customer})\n{report}");
    }
    println!("299 of 300 acknowledged writes kept, event {} lost and audited:\n{report}", victim.seq);
}

fn allowed_over(client: &prefsd::client::Client, customer: u64) -> bool {
    let answer = client
        .call("GET", &format!("/v1/check?customer={customer}&service=rating&channel=email"), None)
        .unwrap();
    answer["allowed"].as_bool().unwrap()
}

/// redb's file under [`Faults`]: only `sync_data` and `write` fail.
#[derive(Debug)]
struct FailingDb {
    inner: redb::backends::FileBackend,
    faults: Arc<Faults>,
}

impl redb::StorageBackend for FailingDb {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        if take(&self.faults.syncs) {
            return Err(io::Error::other("injected redb fsync failure"));
        }
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if take(&self.faults.writes) {
            return Err(io::Error::from_raw_os_error(28));
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(a, b)
    }

    fn try_lock_shared_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(a, b)
    }

    fn lock_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(a, b)
    }

    fn lock_shared_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(a, b)
    }

    fn unlock_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(a, b)
    }

    fn query_lock_range(&self, a: Bound<u64>, b: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(a, b)
    }
}

/// redb fails everything after an I/O error until it is reopened: a
/// checkpoint whose redb writes fail (a full disk) latches it, and the next
/// write reopens it, replays the log into it, and is acknowledged; nothing
/// acknowledged is lost.
#[test]
fn a_failed_redb_checkpoint_is_reopened_by_the_next_write() {
    let tmp = tempfile::tempdir().unwrap();
    let (live, image) = (tmp.path().join("live"), tmp.path().join("image"));
    let faults = Arc::new(Faults::default());
    let db_faults = faults.clone();
    let wrap = WrapDb(Arc::new(move |inner| Box::new(FailingDb { inner, faults: db_faults.clone() })));
    let options = StoreOptions { wrap_db: Some(wrap), ..StoreOptions::default() };
    let store = Arc::new(Store::open_with(&live, options).unwrap());
    let w = writer(&store);
    block(async {
        w.write(Op::CreateService {
            slug: ServiceSlug::parse("rating").unwrap(),
            name: "Ratings".into(),
            description: String::new(),
            actor: "test".into(),
        })
        .await
        .unwrap();
        for c in 1..=3 {
            w.write(opt_out(c)).await.unwrap();
        }
    });
    faults.writes.store(u32::MAX, Ordering::SeqCst);
    let err = store.checkpoint().expect_err("the checkpoint's redb writes fail");
    println!("checkpoint: {err}");
    // Still failing: the write is refused, the log keeps what was acknowledged.
    let refused = block(w.write(opt_out(4)));
    assert!(matches!(refused, Err(WriteError::Store(_))), "{refused:?}");
    // The disk has room again: the next write reopens redb.
    faults.writes.store(0, Ordering::SeqCst);
    let applied = block(w.write(opt_out(5))).expect("the write after the fault clears");
    assert_eq!(applied.seq(), 5, "the refused write's number is given again");
    let records = store.records(CustomerId(1)).expect("reads work after the reopen");
    assert_eq!(records.len(), 1);
    store.checkpoint().expect("checkpoints work after the reopen");
    crash_image(&live, &image);
    drop(w);
    drop(store);
    let store = Store::open(&image).unwrap();
    assert_eq!(customers(&stored(&store)), BTreeSet::from([1, 2, 3, 5]));
}
