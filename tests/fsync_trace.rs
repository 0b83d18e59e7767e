//! Proof from the system calls that a write is durable before it is
//! acknowledged. The sidecar binary runs under `strace -f -ttt -T`, takes
//! concurrent writes, and the trace must show, for every acknowledged
//! write (matched by the `seq` in its response body):
//!
//! - single node: the log append (`pwrite64` on `prefsd.wal`) that holds the
//!   event's frame, then an `fdatasync` of the log that started after that
//!   append and returned before the response's first byte was written to
//!   the client's socket;
//! - cluster mode: the statement that sent the event's sequence number to
//!   PostgreSQL, then PostgreSQL's reply to that transaction's `COMMIT` read
//!   from the same connection, before the response was written.
//!
//! A SIGKILL test (`tests/crash.rs`) cannot see a missing fsync, since the
//! page cache survives the kill; this one can. Skipped (with a SKIP line)
//! where strace is missing or ptrace is refused, failed instead under
//! `PREFSD_TEST_REQUIRE_ALL=1`.

mod util;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use prefsd::client::Client;

/// One system call, with its entry and return times (seconds) and its
/// arguments' strings decoded (strace runs with `-xx`).
///
/// Order is judged by `first` and `last`, the trace lines where strace
/// reported the call's entry and its return: strace handles one stop at a
/// time, and a thread stopped at a syscall's exit goes on only once strace
/// has reported it, so whatever that thread causes next (an answer sent
/// after `fdatasync` returned) is reported on a later line.
#[derive(Debug, Clone)]
struct Call {
    name: String,
    entry: f64,
    exit: f64,
    /// Line where strace reported the entry.
    first: usize,
    /// Line where strace reported the return.
    last: usize,
    /// The first argument, for calls on a file descriptor.
    fd: Option<i64>,
    ret: i64,
    /// Every quoted string of the call, decoded and concatenated.
    data: Vec<u8>,
    /// The raw text, for messages.
    text: String,
}

/// Decodes strace's `-xx` strings (`"\x48\x54..."`) in `text`.
fn strings(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut in_string = false;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => in_string = !in_string,
            b'\\' if in_string && bytes.get(i + 1) == Some(&b'x') && i + 3 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                }
                i += 3;
            }
            b'\\' if in_string => {
                // `-xx` escapes everything, but be lenient with `\"` and `\\`.
                if let Some(&c) = bytes.get(i + 1) {
                    out.push(c);
                }
                i += 1;
            }
            c if in_string => out.push(c),
            _ => {}
        }
        i += 1;
    }
    out
}

fn parse_trace(trace: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    // Per thread: the unfinished call's name, entry time and text.
    let mut pending: HashMap<u32, (String, f64, usize, String)> = HashMap::new();
    for (n, line) in trace.lines().enumerate() {
        // `PID  TIMESTAMP call…`, with a variable run of spaces after the pid.
        let Some((pid, rest)) = line.trim_start().split_once(' ') else { continue };
        let Some((ts, rest)) = rest.trim_start().split_once(' ') else { continue };
        let (Ok(pid), Ok(ts)) = (pid.parse::<u32>(), ts.parse::<f64>()) else { continue };
        let finish = |name: String, entry: f64, exit: f64, first: usize, text: String| -> Call {
            let fd = text.split_once('(').and_then(|(_, a)| a.split([',', ')']).next()?.trim().parse().ok());
            // strace pads before ` = RET` to align; strings are all `\xHH`, so
            // the last ` = ` is the return value's.
            let ret =
                text.rsplit_once(" = ").and_then(|(_, r)| r.split(' ').next()?.parse().ok()).unwrap_or(-1);
            Call { name, entry, exit, first, last: n, fd, ret, data: strings(&text), text }
        };
        let duration = |text: &str| -> f64 {
            text.rsplit_once('<')
                .and_then(|(_, d)| d.trim_end().strip_suffix('>')?.parse().ok())
                .unwrap_or(0.0)
        };
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = resumed.split_once(" resumed>") else { continue };
            if let Some((call, entry, first, head)) = pending.remove(&pid)
                && call == name
            {
                calls.push(finish(call, entry, ts, first, format!("{head}{tail}")));
            }
        } else if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            let Some((name, _)) = head.split_once('(') else { continue };
            pending.insert(pid, (name.to_owned(), ts, n, head.to_owned()));
        } else if let Some((name, _)) = rest.split_once('(')
            && rest.contains(" = ")
        {
            let exit = ts + duration(rest);
            calls.push(finish(name.to_owned(), ts, exit, n, rest.to_owned()));
        }
    }
    calls.sort_by_key(|c| c.first);
    calls
}

/// Whether `strace` can run here; prints the SKIP line (or panics under
/// `PREFSD_TEST_REQUIRE_ALL=1`) when not.
fn strace_works(test: &str) -> bool {
    match Command::new("strace").args(["-f", "-o", "/dev/null", "--", "true"]).output() {
        Err(_) => {
            util::skip(test, "strace is not installed");
            false
        }
        Ok(out) if !out.status.success() => {
            util::skip(
                test,
                &format!(
                    "strace cannot trace here (ptrace refused?): {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            );
            false
        }
        Ok(_) => true,
    }
}

/// `prefsd serve` under strace.
struct Traced {
    strace: Child,
    client: Client,
    trace: std::path::PathBuf,
}

impl Traced {
    fn start(dir: &Path, env: &[(&str, &str)]) -> Traced {
        let trace = dir.join("trace.txt");
        let addr = format!("127.0.0.1:{}", util::free_port());
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-ttt", "-T", "-xx", "-s", "1000000", "-o"])
            .arg(&trace)
            .args([
                "-e",
                "trace=openat,accept4,connect,close,fdatasync,fsync,pwrite64,write,writev,sendto,sendmsg,read,recvfrom",
                "--",
                env!("CARGO_BIN_EXE_prefsd"),
                "serve",
                "--listen",
                &addr,
                "--data",
            ])
            .arg(dir.join("data"))
            .env_remove("PREFSD_CONFIG")
            .env("PREFSD_LOG", "warn")
            // Small groups keep every log append well inside strace's string limit.
            .env("PREFSD_COMMIT_BATCH_MAX", "16")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut strace = cmd.spawn().expect("spawn strace");
        let client = Client::new(&format!("http://{addr}"), None);
        util::wait_for("the traced sidecar to become ready", Duration::from_secs(120), || {
            if let Ok(Some(status)) = strace.try_wait() {
                panic!("strace or prefsd exited before becoming ready: {status}");
            }
            match client.send("GET", "/readyz", None, None) {
                Ok(a) if a.status == 200 => Some(()),
                _ => None,
            }
        });
        Traced { strace, client, trace }
    }

    /// Stops the sidecar (strace's child) with SIGTERM, waits for strace to
    /// finish, and returns the trace.
    fn stop(mut self) -> Vec<Call> {
        let pid = self.strace.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        let sidecar = children.split_whitespace().next().expect("strace runs the sidecar");
        let status = Command::new("kill").args(["-TERM", sidecar]).status().unwrap();
        assert!(status.success());
        let _ = self.strace.wait();
        parse_trace(&std::fs::read_to_string(&self.trace).expect("the trace"))
    }
}

/// PUTs from several threads at once; returns the acknowledged sequence numbers.
fn concurrent_writes(client: &Client, threads: u64, each: u64) -> BTreeSet<u64> {
    let acked = Mutex::new(BTreeSet::new());
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (client, acked) = (client.clone(), &acked);
            scope.spawn(move || {
                for i in 0..each {
                    let customer = 1000 + t * each + i;
                    let answer = client
                        .call(
                            "PUT",
                            &format!("/v1/customers/{customer}/preferences/rating/email"),
                            Some(&serde_json::json!({"status": "opted_out"})),
                        )
                        .unwrap();
                    let seq = answer["seq"].as_u64().expect("an acknowledged write has a seq");
                    assert!(acked.lock().unwrap().insert(seq));
                }
            });
        }
    });
    acked.into_inner().unwrap()
}

/// For each sequence number, the response write that carried it to the client.
fn responses(calls: &[Call], acked: &BTreeSet<u64>) -> BTreeMap<u64, Call> {
    let mut found = BTreeMap::new();
    for c in calls.iter().filter(|c| matches!(c.name.as_str(), "write" | "writev" | "sendto" | "sendmsg")) {
        let text = String::from_utf8_lossy(&c.data);
        if !text.starts_with("HTTP/1.1 200") {
            continue;
        }
        for (i, _) in text.match_indices("\"seq\":") {
            let digits: String = text[i + 6..].chars().take_while(char::is_ascii_digit).collect();
            if let Ok(seq) = digits.parse::<u64>()
                && acked.contains(&seq)
            {
                found.entry(seq).or_insert_with(|| c.clone());
            }
        }
    }
    let missing: Vec<_> = acked.iter().filter(|s| !found.contains_key(s)).collect();
    assert!(missing.is_empty(), "responses not found in the trace for seqs {missing:?}");
    found
}

/// Sequence numbers of the log frames in `data` (see `prefsd::wal`).
fn frame_seqs(data: &[u8]) -> Vec<u64> {
    let scan = prefsd::wal::scan(data);
    scan.frames.iter().map(|f| f.seq).collect()
}

fn create_service(client: &Client) {
    client
        .call("POST", "/v1/services", Some(&serde_json::json!({"slug": "rating", "name": "Ratings"})))
        .unwrap();
}

#[test]
fn every_acknowledgement_follows_an_fdatasync_of_the_log() {
    let test = "every_acknowledgement_follows_an_fdatasync_of_the_log";
    if !strace_works(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Traced::start(dir.path(), &[]);
    create_service(&sidecar.client);
    let acked = concurrent_writes(&sidecar.client, 8, 25);
    let calls = sidecar.stop();

    let wal_fds: BTreeSet<i64> = calls
        .iter()
        .filter(|c| c.name == "openat" && String::from_utf8_lossy(&c.data).ends_with("/prefsd.wal"))
        .map(|c| c.ret)
        .collect();
    assert_eq!(wal_fds.len(), 1, "one open of prefsd.wal: {wal_fds:?}");
    let wal = *wal_fds.first().unwrap();
    let appends: Vec<&Call> = calls.iter().filter(|c| c.name == "pwrite64" && c.fd == Some(wal)).collect();
    let syncs: Vec<&Call> = calls.iter().filter(|c| c.name == "fdatasync" && c.fd == Some(wal)).collect();
    let mut append_of: HashMap<u64, &Call> = HashMap::new();
    for a in &appends {
        for seq in frame_seqs(&a.data) {
            append_of.insert(seq, a);
        }
    }
    let answered = responses(&calls, &acked);
    for (seq, response) in &answered {
        let append =
            append_of.get(seq).unwrap_or_else(|| panic!("event {seq} was never appended to the log"));
        let sync = syncs
            .iter()
            .find(|s| s.first > append.last)
            .unwrap_or_else(|| panic!("no fdatasync of the log after the append of event {seq}"));
        assert!(
            sync.ret == 0 && sync.last < response.first,
            "event {seq} was acknowledged before the fdatasync of its append returned:\n  append {}\n  sync {}\n  response {}",
            append.text,
            sync.text,
            response.text.chars().take(200).collect::<String>()
        );
    }
    let first = answered.values().map(|c| c.entry).fold(f64::MAX, f64::min);
    println!(
        "{} acknowledged writes, {} log appends, {} fdatasyncs of the log (from the first response on, {:.1} s of trace)",
        answered.len(),
        appends.len(),
        syncs.len(),
        answered.values().map(|c| c.entry).fold(0.0, f64::max) - first
    );
}

/// The head of a one-dimensional binary `bigint[]` parameter: one
/// dimension, no nulls, element type 20 (int8).
const INT8_ARRAY: &[u8] = &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 20];

/// The bytes of `seq` as one element of a binary `bigint[]` parameter.
fn int8_element(seq: u64) -> Vec<u8> {
    let mut bytes = 8u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&seq.to_be_bytes());
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn cluster_mode_acknowledges_after_postgres_commits() {
    let test = "cluster_mode_acknowledges_after_postgres_commits";
    if !strace_works(test) {
        return;
    }
    let Some(pg) = util::pg::Postgres::start(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let keys = format!("1:{}", "A".repeat(43));
    let sidecar = Traced::start(dir.path(), &[("PREFSD_POSTGRES", &url), ("PREFSD_TOKEN_KEYS", &keys)]);
    create_service(&sidecar.client);
    let acked = concurrent_writes(&sidecar.client, 8, 25);
    let calls = sidecar.stop();

    // The PostgreSQL connections: sockets connected to its port.
    let port = format!("sin_port=htons({})", pg.port);
    let pg_fds: BTreeSet<i64> =
        calls.iter().filter(|c| c.name == "connect" && c.text.contains(&port)).filter_map(|c| c.fd).collect();
    assert!(!pg_fds.is_empty(), "no connection to PostgreSQL in the trace");
    let on_pg = |c: &&Call| c.fd.is_some_and(|fd| pg_fds.contains(&fd));
    let sends: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c.name.as_str(), "write" | "writev" | "sendto" | "sendmsg"))
        .filter(on_pg)
        .collect();
    let reads: Vec<&Call> =
        calls.iter().filter(|c| matches!(c.name.as_str(), "read" | "recvfrom")).filter(on_pg).collect();
    let answered = responses(&calls, &acked);
    for (seq, response) in &answered {
        // The last statement before the response that sent this event's
        // number in a `bigint[]` (the events' insert; the follower's scalar
        // `after` parameters do not count)…
        let element = int8_element(*seq);
        let insert = sends
            .iter()
            .rev()
            .find(|s| s.last < response.first && contains(&s.data, INT8_ARRAY) && contains(&s.data, &element))
            .unwrap_or_else(|| panic!("event {seq} was never sent to PostgreSQL before its response"));
        // …then that connection's COMMIT, and PostgreSQL's reply to it.
        let commit = sends
            .iter()
            .find(|s| s.fd == insert.fd && s.first > insert.last && contains(&s.data, b"COMMIT"))
            .unwrap_or_else(|| panic!("no COMMIT after event {seq} was sent"));
        let reply = reads
            .iter()
            .find(|r| {
                r.fd == insert.fd && r.first > commit.last && r.ret > 0 && contains(&r.data, b"COMMIT\0")
            })
            .unwrap_or_else(|| panic!("no reply to the COMMIT of event {seq}"));
        assert!(
            reply.last < response.first,
            "event {seq} was acknowledged before PostgreSQL's reply to its COMMIT was read:\n  commit {}\n  reply {}\n  response {}",
            commit.text.chars().take(200).collect::<String>(),
            reply.text.chars().take(200).collect::<String>(),
            response.text.chars().take(200).collect::<String>()
        );
    }
    println!("{} acknowledged writes, each after PostgreSQL's reply to its COMMIT", answered.len());
}

#[test]
fn the_trace_parser_reads_complete_and_split_calls() {
    let trace = "\
10  1.000000 fdatasync(7)   = 0 <0.002000>
11 1.001000 writev(9, [{iov_base=\"\\x48\\x54\", iov_len=2}, {iov_base=\"\\x50\", iov_len=1}], 2 <unfinished ...>
10 1.001500 read(5,  <unfinished ...>
11 1.003000 <... writev resumed>) = 3 <0.002000>
10 1.004000 <... read resumed>\"\\x43\\x4f\", 8192) = 2 <0.002500>
10 1.005000 +++ exited with 0 +++
";
    let calls = parse_trace(trace);
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!((calls[0].name.as_str(), calls[0].fd, calls[0].ret), ("fdatasync", Some(7), 0));
    assert!((calls[0].exit - 1.002).abs() < 1e-9);
    assert_eq!(
        (calls[1].name.as_str(), calls[1].data.as_slice(), calls[1].exit),
        ("writev", &b"HTP"[..], 1.003)
    );
    assert_eq!((calls[2].name.as_str(), calls[2].data.as_slice(), calls[2].ret), ("read", &b"CO"[..], 2));
}
