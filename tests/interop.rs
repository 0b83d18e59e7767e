//! Roaring bodies of `POST /v1/filter` against another implementation:
//! pyroaring (CRoaring underneath), run in a Python subprocess.
//!
//! - What prefsd answers (`Content-Type: application/vnd.roaring`) is
//!   decoded by pyroaring and must be exactly the expected allowed set.
//! - What pyroaring writes — without run containers (cookie 12346) and
//!   after `run_optimize()` (cookie 12347, with and without the offset
//!   header) — is accepted by prefsd and filtered right.
//!
//! The sets exercise all three container kinds: a sparse chunk (array), a
//! chunk of 21,846 scattered values (bitmap), long runs, a chunk of 4,100
//! values that drops to 4,090 in the answer (bitmap in, array out), and the
//! top of the 32-bit range. Each body's layout is parsed here, so the test
//! knows which kinds it really sent and got.
//!
//! The Python found is the first `python3` on PATH that can import
//! pyroaring (`.ci/run` puts its venv, with `pyroaring` pinned, first),
//! else the one in `target/ci-venv`; with none, the tests print a SKIP line,
//! or fail under `PREFSD_TEST_REQUIRE_ALL=1`.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use prefsd::client::Client;
use roaring::RoaringBitmap;
use serde_json::{Value, json};

const ROARING: &str = "application/vnd.roaring";

/// What the Python side does: `write VALUES PLAIN RUNS` builds a bitmap
/// from little-endian u32 values and writes it without run containers and
/// again after `run_optimize()`; `read BODY VALUES` decodes a body and
/// writes its values. Each prints the bitmaps' container statistics.
const SCRIPT: &str = r#"
import array, json, sys
from pyroaring import BitMap

assert sys.byteorder == "little" and array.array("I").itemsize == 4

def values(path):
    a = array.array("I")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return a

mode = sys.argv[1]
if mode == "write":
    src, plain_path, runs_path = sys.argv[2:5]
    vals = values(src)
    # optimize=False: pyroaring would otherwise run-optimize on construction.
    plain = BitMap(vals, optimize=False)
    runs = BitMap(vals, optimize=False)
    runs.run_optimize()
    assert plain == runs and len(plain) == len(vals)
    with open(plain_path, "wb") as f:
        f.write(plain.serialize())
    with open(runs_path, "wb") as f:
        f.write(runs.serialize())
    print(json.dumps({"plain": plain.get_statistics(), "runs": runs.get_statistics()}))
elif mode == "read":
    body_path, out_path = sys.argv[2:4]
    with open(body_path, "rb") as f:
        bm = BitMap.deserialize(f.read())
    with open(out_path, "wb") as f:
        f.write(array.array("I", bm).tobytes())
    print(json.dumps(bm.get_statistics()))
else:
    sys.exit("unknown mode " + mode)
"#;

// ------------------------------------------------------------- python

/// A `python3` that can import pyroaring, with pyroaring's version.
fn python() -> Option<(PathBuf, String)> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("python3")).collect::<Vec<_>>())
        .unwrap_or_default();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    on_path.into_iter().chain([target.join("ci-venv/bin/python3")]).filter(|p| p.is_file()).find_map(|p| {
        let out = Command::new(&p)
            .args(["-c", "import pyroaring; print(pyroaring.__version__)"])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then(|| (p, String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    })
}

/// The Python with pyroaring, or `None` after a SKIP line.
fn python_or_skip(test: &str) -> Option<PathBuf> {
    match python() {
        Some((p, version)) => {
            println!("{test}: pyroaring {version} via {}", p.display());
            Some(p)
        }
        None => {
            util::skip(
                test,
                "no python3 that can import pyroaring (`pip install pyroaring==1.2.0`; .ci/run installs it)",
            );
            None
        }
    }
}

/// Runs [`SCRIPT`] with `args`; returns what it printed, as JSON.
fn script(python: &Path, args: &[&Path]) -> Value {
    let out = Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pyroaring {args:?} failed:\n{said}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {said}"))
}

fn write_values(path: &Path, set: &RoaringBitmap) {
    let bytes: Vec<u8> = set.iter().flat_map(u32::to_le_bytes).collect();
    std::fs::write(path, bytes).unwrap();
}

/// pyroaring's bodies for `set`: (without runs, after `run_optimize()`).
fn pyroaring_writes(python: &Path, dir: &Path, name: &str, set: &RoaringBitmap) -> (Vec<u8>, Vec<u8>) {
    let (values, plain, runs) = (
        dir.join(format!("{name}.u32")),
        dir.join(format!("{name}.plain")),
        dir.join(format!("{name}.runs")),
    );
    write_values(&values, set);
    let stats = script(python, &[Path::new("write"), &values, &plain, &runs]);
    println!("pyroaring wrote {name}: {stats}");
    assert_eq!(stats["plain"]["n_run_containers"], 0, "{stats}");
    (std::fs::read(plain).unwrap(), std::fs::read(runs).unwrap())
}

/// pyroaring's reading of `body`: the values, in order.
fn pyroaring_reads(python: &Path, dir: &Path, name: &str, body: &[u8]) -> Vec<u32> {
    let (input, output) = (dir.join(format!("{name}.answer")), dir.join(format!("{name}.decoded")));
    std::fs::write(&input, body).unwrap();
    let stats = script(python, &[Path::new("read"), &input, &output]);
    println!("pyroaring read {name}: {stats}");
    let bytes = std::fs::read(output).unwrap();
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

// ------------------------------------------------------------- layout

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Array,
    Bitmap,
    Run,
}

/// The portable layout of a 32-bit roaring body, as the RoaringFormatSpec
/// defines it.
#[derive(Debug)]
struct Layout {
    /// 12346 (no run containers) or 12347.
    cookie: u16,
    /// Whether the offset header is present.
    offsets: bool,
    /// (key, kind, cardinality) of each container, in order.
    containers: Vec<(u16, Kind, u32)>,
}

impl Layout {
    fn has(&self, kind: Kind) -> bool {
        self.containers.iter().any(|c| c.1 == kind)
    }

    fn kind_of(&self, key: u16) -> Option<Kind> {
        self.containers.iter().find(|c| c.0 == key).map(|c| c.1)
    }
}

/// Parses a body and checks that its parts add up to exactly its length.
fn layout(b: &[u8]) -> Layout {
    let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let first = u32_at(0);
    let (cookie, n, runs, mut pos) = if first == 12346 {
        let n = u32_at(4) as usize;
        (12346, n, vec![false; n], 8)
    } else if first & 0xFFFF == 12347 {
        let n = (first >> 16) as usize + 1;
        let bitset = &b[4..4 + n.div_ceil(8)];
        let runs = (0..n).map(|i| bitset[i / 8] >> (i % 8) & 1 == 1).collect();
        (12347, n, runs, 4 + n.div_ceil(8))
    } else {
        panic!("not a portable roaring cookie: {first}");
    };
    let header: Vec<(u16, u32)> =
        (0..n).map(|i| (u16_at(pos + 4 * i), u32::from(u16_at(pos + 4 * i + 2)) + 1)).collect();
    pos += 4 * n;
    // Offsets: always with cookie 12346; with 12347 from 4 containers on.
    let offsets = cookie == 12346 || n >= 4;
    let starts: Vec<usize> =
        if offsets { (0..n).map(|i| u32_at(pos + 4 * i) as usize).collect() } else { vec![] };
    if offsets {
        pos += 4 * n;
    }
    let mut containers = Vec::with_capacity(n);
    for (i, &(key, card)) in header.iter().enumerate() {
        if offsets {
            assert_eq!(starts[i], pos, "offset of container {i}");
        }
        let kind = if runs[i] {
            Kind::Run
        } else if card > 4096 {
            Kind::Bitmap
        } else {
            Kind::Array
        };
        pos += match kind {
            Kind::Array => 2 * card as usize,
            Kind::Bitmap => 8192,
            Kind::Run => {
                let n_runs = usize::from(u16_at(pos));
                let held: u32 = (0..n_runs).map(|r| u32::from(u16_at(pos + 4 + 4 * r)) + 1).sum();
                assert_eq!(held, card, "the runs of container {i} hold its cardinality");
                2 + 4 * n_runs
            }
        };
        containers.push((key, kind, card));
    }
    assert_eq!(pos, b.len(), "the containers end where the body ends");
    Layout { cookie, offsets, containers }
}

// ------------------------------------------------------------- the sets

const CHUNK: u32 = 1 << 16;

/// Recipients in six chunks: every container kind, both ways.
fn recipients() -> RoaringBitmap {
    let mut r = RoaringBitmap::new();
    r.extend((0..4000u32).step_by(7)); // key 0: 572 sparse values, an array
    r.extend((0..CHUNK).step_by(3).map(|v| CHUNK + v)); // key 1: 21,846 values, no runs: a bitmap
    r.insert_range(2 * CHUNK + 10..=2 * CHUNK + 30_000); // key 2: two long runs
    r.insert_range(2 * CHUNK + 40_000..3 * CHUNK);
    r.extend((0..4100u32).map(|i| 3 * CHUNK + 15 * i)); // key 3: 4,100 values, a bitmap
    r.insert_range(100 * CHUNK + 5..=100 * CHUNK + 20); // key 100: one short run
    r.insert_range(u32::MAX - 5..=u32::MAX); // key 65535: the top of the range
    assert_eq!(r.len(), 572 + 21_846 + 29_991 + 25_536 + 4100 + 16 + 6);
    r
}

/// Members of [`recipients`] opted out of rating email: some in every
/// chunk, run starts, middles and ends, and 10 of key 3 (4,100 → 4,090).
fn rating_email_opt_outs() -> Vec<u32> {
    let mut v = vec![0, 7, 3997, CHUNK, CHUNK + 300, 2 * CHUNK - 1];
    v.extend([2 * CHUNK + 10, 2 * CHUNK + 15_000, 2 * CHUNK + 30_000, 3 * CHUNK - 1]);
    v.extend((0..10u32).map(|i| 3 * CHUNK + 15 * 37 * i));
    v.extend([100 * CHUNK + 12, u32::MAX]);
    v
}

/// Opted out of everything by email: counts for rating email too.
const ALL_EMAIL: u32 = 2 * CHUNK + 20_000;

/// Customers that are not recipients but are opted out.
const OUTSIDERS: [u32; 4] = [1, CHUNK + 1, 2 * CHUNK + 35_000, 50 * CHUNK];

fn put(c: &Client, customer: u32, service: &str, channel: &str) {
    let path = format!("/v1/customers/{customer}/preferences/{service}/{channel}");
    let body = serde_json::to_vec(&json!({"status": "opted_out"})).unwrap();
    let a = c.send("PUT", &path, Some("application/json"), Some(body)).unwrap();
    assert_eq!(a.status, 200, "PUT {path}: {}", String::from_utf8_lossy(&a.body));
}

/// A sidecar with services `rating` and `waitlist` and the opt-outs above.
fn sidecar() -> util::TestApp {
    let app = util::spawn_app();
    let c = &app.client;
    for slug in ["rating", "waitlist"] {
        let body = serde_json::to_vec(&json!({"slug": slug})).unwrap();
        let a = c.send("POST", "/v1/services", Some("application/json"), Some(body)).unwrap();
        assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    }
    for id in rating_email_opt_outs().into_iter().chain(OUTSIDERS) {
        put(c, id, "rating", "email");
    }
    put(c, ALL_EMAIL, "*", "email");
    app
}

/// What `POST /v1/filter` for rating email must allow of `set`.
fn allowed_rating_email(set: &RoaringBitmap) -> RoaringBitmap {
    let mut suppressed: RoaringBitmap = rating_email_opt_outs().into_iter().chain(OUTSIDERS).collect();
    suppressed.insert(ALL_EMAIL);
    set - &suppressed
}

/// Posts a roaring body to the filter; returns the roaring answer.
fn filter(c: &Client, pair: &str, body: Vec<u8>) -> Vec<u8> {
    let (service, channel) = pair.split_once('/').unwrap();
    let path = format!("/v1/filter?service={service}&channel={channel}");
    let a = c.send("POST", &path, Some(ROARING), Some(body)).unwrap();
    assert_eq!(a.status, 200, "POST {path}: {}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.content_type.as_deref(), Some(ROARING));
    a.body
}

fn to_bytes(set: &RoaringBitmap) -> Vec<u8> {
    let mut out = Vec::new();
    set.serialize_into(&mut out).unwrap();
    out
}

// ------------------------------------------------------------- the tests

#[test]
fn pyroaring_reads_what_the_filter_answers() {
    let test = "pyroaring reads the filter's answers";
    let Some(python) = python_or_skip(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let app = sidecar();
    let c = &app.client;
    let set = recipients();
    let (_, with_runs) = pyroaring_writes(&python, dir.path(), "recipients", &set);

    let everyone_out: RoaringBitmap = rating_email_opt_outs().into_iter().collect();
    let cases: [(&str, &str, Vec<u8>, RoaringBitmap); 4] = [
        // Opt-outs in every chunk; key 3 drops from a bitmap to an array.
        ("mixed", "rating/email", to_bytes(&set), allowed_rating_email(&set)),
        // Nobody opted out of waitlist sms: the answer is the input, whose
        // runs came from pyroaring.
        ("untouched", "waitlist/sms", with_runs, set.clone()),
        // Only the ALL_EMAIL opt-out applies to waitlist email.
        ("broad", "waitlist/email", to_bytes(&set), {
            let mut s = set.clone();
            assert!(s.remove(ALL_EMAIL));
            s
        }),
        // Everyone is suppressed: an empty bitmap.
        ("empty", "rating/email", to_bytes(&everyone_out), RoaringBitmap::new()),
    ];
    for (name, pair, body, expected) in cases {
        let answer = filter(c, pair, body);
        let l = layout(&answer);
        println!("{name}: prefsd answered {} bytes, {l:?}", answer.len());
        let got = pyroaring_reads(&python, dir.path(), name, &answer);
        assert_eq!(got.len() as u64, expected.len(), "{name}: pyroaring read another cardinality");
        assert!(got.iter().copied().eq(expected.iter()), "{name}: pyroaring read another set");
        if name == "mixed" {
            // All three kinds are in what pyroaring read here (the `roaring`
            // crate keeps the runs of the body it was sent).
            assert!(l.has(Kind::Array) && l.has(Kind::Bitmap) && l.has(Kind::Run), "{l:?}");
            assert_eq!(l.cookie, 12347, "{l:?}");
            assert_eq!(l.kind_of(3), Some(Kind::Array), "4,090 values are an array container: {l:?}");
            assert_eq!(l.kind_of(1), Some(Kind::Bitmap), "{l:?}");
        }
        if name == "empty" {
            assert!(l.containers.is_empty(), "{l:?}");
        }
    }
}

#[test]
fn the_filter_accepts_what_pyroaring_writes_with_and_without_runs() {
    let test = "the filter accepts pyroaring's bodies";
    let Some(python) = python_or_skip(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let app = sidecar();
    let c = &app.client;

    // Six containers: the offset header is there in both layouts.
    let set = recipients();
    let (plain, runs) = pyroaring_writes(&python, dir.path(), "recipients", &set);
    let l = layout(&plain);
    assert_eq!((l.cookie, l.offsets), (12346, true), "{l:?}");
    assert!(!l.has(Kind::Run) && l.has(Kind::Array) && l.has(Kind::Bitmap), "{l:?}");
    assert_eq!(l.containers.len(), 6, "{l:?}");
    let l = layout(&runs);
    assert_eq!((l.cookie, l.offsets), (12347, true), "{l:?}");
    assert!(l.has(Kind::Run) && l.has(Kind::Array) && l.has(Kind::Bitmap), "{l:?}");
    for key in [2, 100, u16::MAX] {
        assert_eq!(l.kind_of(key), Some(Kind::Run), "key {key}: {l:?}");
    }
    let expected = allowed_rating_email(&set);
    for (name, body) in [("without runs", plain), ("with runs", runs)] {
        let answer = filter(c, "rating/email", body);
        let got = RoaringBitmap::deserialize_from(&answer[..]).expect("a portable roaring answer");
        assert_eq!(got.len(), expected.len(), "{name}");
        assert_eq!(got, expected, "{name}");
    }

    // Three containers, all runs: cookie 12347 without the offset header.
    let mut few = RoaringBitmap::new();
    few.insert_range(2 * CHUNK..3 * CHUNK);
    few.insert_range(100 * CHUNK + 5..=100 * CHUNK + 20);
    few.insert_range(u32::MAX - 5..=u32::MAX);
    let (plain, runs) = pyroaring_writes(&python, dir.path(), "few", &few);
    let l = layout(&runs);
    assert_eq!((l.cookie, l.offsets, l.containers.len()), (12347, false, 3), "{l:?}");
    assert!(l.containers.iter().all(|c| c.1 == Kind::Run), "{l:?}");
    assert_eq!(layout(&plain).cookie, 12346);
    let expected = allowed_rating_email(&few);
    for (name, body) in [("few without runs", plain), ("few with runs", runs)] {
        let answer = filter(c, "rating/email", body);
        let got = RoaringBitmap::deserialize_from(&answer[..]).expect("a portable roaring answer");
        assert_eq!(got, expected, "{name}");
    }

    // pyroaring's empty bitmap is an empty list of recipients.
    let (plain, _) = pyroaring_writes(&python, dir.path(), "nothing", &RoaringBitmap::new());
    assert!(layout(&plain).containers.is_empty());
    let answer = filter(c, "rating/email", plain);
    assert!(RoaringBitmap::deserialize_from(&answer[..]).unwrap().is_empty());
}
