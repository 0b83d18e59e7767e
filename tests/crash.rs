//! Crash safety: a `prefsd serve` child under concurrent durable writes is
//! killed with SIGKILL, restarted on the same data directory, and must have
//! kept every write it acknowledged, with an intact audit log and checks
//! that follow the resolution rule over that log. Several cycles. Each
//! start after a kill must have replayed events from the write-ahead log
//! (`prefsd_wal_replayed_events` > 0), so the test cannot pass by never
//! needing the log.
//!
//! SIGKILL keeps the page cache: a write that reached the log file but was
//! never `fdatasync`ed survives it, so this test cannot notice a missing
//! fsync. `tests/fsync_trace.rs` covers that: it traces the sidecar's
//! syscalls and checks that every acknowledgement follows an `fdatasync` of
//! the log.

mod rule;
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use prefsd::client::Client;
use prefsd::domain::Status;
use rule::{Rng, Rule, target};

const WRITERS: usize = 16;
/// Acknowledged writes per cycle before the kill.
const ACKED_PER_CYCLE: usize = 300;
const CYCLES: usize = 3;
const CHANNELS: [&str; 2] = ["email", "sms"];
/// One service per cycle; each after the first is created while the writers run.
const SERVICES: [&str; CYCLES] = ["rating", "waitlist", "appointment"];

/// Small ids, ids past 2^32, and the top of the range: few enough that
/// customers get many writes each, from different threads.
fn customers() -> Vec<u64> {
    let mut ids: Vec<u64> = (0..48).collect();
    ids.extend((0..8).map(|k| (1u64 << 32) + k));
    ids.extend((0..4).map(|k| u64::MAX - k));
    ids
}

/// A write the sidecar acknowledged with 200.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Acked {
    seq: u64,
    customer: u64,
    service: String,
    channel: String,
    status: String,
}

/// An audit entry as `GET /v1/audit` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    seq: u64,
    customer: u64,
    service: String,
    channel: String,
    before: Option<String>,
    after: String,
}

/// What the writer threads share.
struct Load {
    client: Client,
    services: RwLock<Vec<String>>,
    acked: Mutex<Vec<Acked>>,
    count: AtomicUsize,
    /// Set just before SIGKILL: a transport error before it is a failure.
    killed: AtomicBool,
    failures: Mutex<Vec<String>>,
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Why a PUT was not acknowledged.
enum NotAcked {
    /// The sidecar answered, but not with the write: always a bug.
    Refused(String),
    /// No answer: the connection failed or broke.
    Unreachable(String),
}

fn put(
    client: &Client,
    customer: u64,
    service: &str,
    channel: &str,
    status: Status,
) -> Result<Acked, NotAcked> {
    let path = format!("/v1/customers/{customer}/preferences/{service}/{channel}");
    let body = serde_json::json!({ "status": status.as_str(), "reason": "crash test" });
    let answer = client
        .send("PUT", &path, Some("application/json"), Some(body.to_string().into_bytes()))
        .map_err(NotAcked::Unreachable)?;
    let json = answer.json();
    let acked = Acked {
        seq: json["seq"].as_u64().unwrap_or(0),
        customer: json["customer"].as_u64().unwrap_or(0),
        service: json["service"].as_str().unwrap_or("").to_owned(),
        channel: json["channel"].as_str().unwrap_or("").to_owned(),
        status: json["status"].as_str().unwrap_or("").to_owned(),
    };
    let sent = Acked {
        seq: acked.seq,
        customer,
        service: service.to_owned(),
        channel: channel.to_owned(),
        status: status.as_str().to_owned(),
    };
    if answer.status != 200 || acked != sent || acked.seq == 0 {
        return Err(NotAcked::Refused(format!("PUT {path}: {} {json}", answer.status)));
    }
    Ok(acked)
}

/// One writer thread: random customers, scope shapes and statuses until the kill.
fn write_until_killed(load: &Load, seed: u64) {
    let mut rng = Rng::new(seed);
    let customers = customers();
    while !load.killed.load(Ordering::SeqCst) {
        let customer = *rng.pick(&customers);
        let service = if rng.coin() {
            "*".to_owned()
        } else {
            let services = load.services.read().unwrap();
            rng.pick(&services).clone()
        };
        let channel = if rng.coin() { "*" } else { *rng.pick(&CHANNELS) };
        match put(&load.client, customer, &service, channel, rng.status()) {
            Ok(acked) => {
                load.acked.lock().unwrap().push(acked);
                load.count.fetch_add(1, Ordering::SeqCst);
            }
            Err(NotAcked::Refused(e)) => {
                load.failures.lock().unwrap().push(e);
                return;
            }
            Err(NotAcked::Unreachable(e)) => {
                // Transport error: expected once the child is gone, and only then.
                if !load.killed.load(Ordering::SeqCst) {
                    load.failures.lock().unwrap().push(format!("before the kill: {e}"));
                }
                return;
            }
        }
    }
}

fn create_service(client: &Client, slug: &str) {
    let body = serde_json::json!({ "slug": slug, "name": slug });
    client.call("POST", "/v1/services", Some(&body)).unwrap();
}

/// The whole audit log, page by page.
fn audit(client: &Client) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut after = 0u64;
    loop {
        let page = client.call("GET", &format!("/v1/audit?after={after}&limit=10000"), None).unwrap();
        let entries = page["entries"].as_array().unwrap();
        let next = page["next_after"].as_u64().unwrap();
        for e in entries {
            out.push(Entry {
                seq: e["seq"].as_u64().unwrap(),
                customer: e["customer"].as_u64().unwrap(),
                service: e["service"].as_str().unwrap().to_owned(),
                channel: e["channel"].as_str().unwrap().to_owned(),
                before: e["before"].as_str().map(str::to_owned),
                after: e["after"].as_str().unwrap().to_owned(),
            });
        }
        if next == after {
            return out;
        }
        after = next;
    }
}

/// The gauge whose name ends with `suffix` (whatever the prefix) from `/metrics`.
fn gauge(client: &Client, suffix: &str) -> u64 {
    let text = String::from_utf8(client.send("GET", "/metrics", None, None).unwrap().body).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.split_once(' ')?;
            name.ends_with(suffix).then(|| value.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("/metrics shows {suffix}"))
}

/// `prefsd_last_applied_sequence` from `/metrics`.
fn last_applied(client: &Client) -> u64 {
    gauge(client, "last_applied_sequence")
}

/// After a start that followed a SIGKILL: the events it replayed from the
/// write-ahead log, which must be some (the writers ran until the kill,
/// and a checkpoint empties the log at most every 2 s).
fn assert_replayed(client: &Client, cycle: usize) {
    let replayed = gauge(client, "wal_replayed_events");
    eprintln!("after kill {cycle}: {replayed} events replayed from the write-ahead log");
    assert!(replayed > 0, "the start after kill {cycle} replayed nothing: the test never needed the log");
}

/// After a restart: every acknowledged write is in the audit log as
/// acknowledged; the log is strictly increasing, without holes or
/// duplicates, and each entry's `before` is the previous `after` of its
/// scope; the services survived; and every check follows the rule replayed
/// from the log. `earlier` is the log as a previous start listed it: it
/// must still be there, unchanged. Returns the log.
fn verify(client: &Client, acked: &[Acked], services: &[String], earlier: &[Entry]) -> Vec<Entry> {
    let entries = audit(client);
    assert!(entries.starts_with(earlier), "the audit log changed what an earlier start listed");

    // Strictly increasing: no duplicates, no reordering.
    for pair in entries.windows(2) {
        assert!(pair[0].seq < pair[1].seq, "audit out of order: {} then {}", pair[0].seq, pair[1].seq);
    }
    // No holes: every event is a preference change or a service change.
    let listed = client.call("GET", "/v1/services", None).unwrap();
    let listed: BTreeSet<String> = listed["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["slug"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, services.iter().cloned().collect(), "services after restart");
    let last = last_applied(client);
    assert!(entries.last().map_or(0, |e| e.seq) <= last, "audit entries past the last sequence number");
    assert_eq!(
        entries.len() as u64 + services.len() as u64,
        last,
        "events 1..={last} are the audit entries and the service creations"
    );

    // Every acknowledged write, exactly as acknowledged.
    let by_seq: BTreeMap<u64, &Entry> = entries.iter().map(|e| (e.seq, e)).collect();
    let mut seqs = BTreeSet::new();
    for a in acked {
        assert!(seqs.insert(a.seq), "sequence number {} acknowledged twice", a.seq);
        let e = by_seq.get(&a.seq).unwrap_or_else(|| panic!("acknowledged write lost: {a:?}"));
        assert_eq!(
            (e.customer, e.service.as_str(), e.channel.as_str(), e.after.as_str()),
            (a.customer, a.service.as_str(), a.channel.as_str(), a.status.as_str()),
            "audit entry {} differs from the acknowledged write",
            a.seq
        );
    }

    // Replay the log: `before` chains, and the rule gives every answer.
    let mut rule = Rule::default();
    let mut current: BTreeMap<(u64, String, String), String> = BTreeMap::new();
    for e in &entries {
        let key = (e.customer, e.service.clone(), e.channel.clone());
        assert_eq!(e.before.as_ref(), current.get(&key), "before of audit entry {}", e.seq);
        current.insert(key, e.after.clone());
        let status = Status::parse(&e.after).unwrap();
        rule.write(e.seq, e.customer, target(&e.service), target(&e.channel), status);
    }
    let untouched = [1_000_000u64, (1 << 40) + 3];
    let mut checked: Vec<(u64, &str, &str)> = Vec::new();
    for customer in rule.customers().into_iter().chain(untouched) {
        for service in services {
            for channel in CHANNELS {
                checked.push((customer, service, channel));
            }
        }
    }
    // Single checks, from a few threads at once to keep the test quick.
    std::thread::scope(|scope| {
        for part in checked.chunks(checked.len().div_ceil(4).max(1)) {
            let rule = &rule;
            scope.spawn(move || {
                for &(customer, service, channel) in part {
                    let path = format!("/v1/check?customer={customer}&service={service}&channel={channel}");
                    let answer = client.call("GET", &path, None).unwrap();
                    assert_eq!(
                        answer["allowed"].as_bool(),
                        Some(rule.allowed(customer, service, channel)),
                        "GET /v1/check ({customer}, {service}, {channel}) against the replayed log"
                    );
                }
            });
        }
    });
    // The batch endpoint agrees with the single checks.
    let checks: Vec<serde_json::Value> = checked
        .iter()
        .map(|(c, s, h)| serde_json::json!({ "customer": c, "service": s, "channel": h }))
        .collect();
    let batch = client.call("POST", "/v1/check", Some(&serde_json::json!({ "checks": checks }))).unwrap();
    let expected: Vec<bool> = checked.iter().map(|(c, s, h)| rule.allowed(*c, s, h)).collect();
    let got: Vec<bool> = batch["results"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect();
    assert_eq!(got, expected, "POST /v1/check after replay");
    entries
}

#[test]
fn acknowledged_writes_survive_sigkill_under_load() {
    let seed = rule::seed("acknowledged_writes_survive_sigkill_under_load");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Snapshots only when shutting down: after a kill the load is always a
    // stale snapshot plus the replay of the events after it.
    let env = [("PREFSD_SNAPSHOT_INTERVAL_SECS", "3600")];
    let mut acked: Vec<Acked> = Vec::new();
    let mut services: Vec<String> = Vec::new();
    let mut log: Vec<Entry> = Vec::new();

    for (cycle, service) in SERVICES.into_iter().enumerate() {
        let mut child = util::ChildSidecar::start(&data, &env);
        if cycle == 0 {
            create_service(&child.client, service);
            services.push(service.to_owned());
        } else {
            assert_replayed(&child.client, cycle);
            log = verify(&child.client, &acked, &services, &log);
        }
        // A clean stop snapshots the index here, so the load after the kill
        // below is that snapshot plus the replay of everything written since.
        assert!(child.terminate().success());
        let mut child = util::ChildSidecar::start(&data, &env);

        let load = Load {
            client: child.client.clone(),
            services: RwLock::new(services.clone()),
            acked: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            killed: AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
        };
        std::thread::scope(|scope| {
            // Should this thread panic, the writers stop instead of running on.
            let _stop = StopOnDrop(&load.killed);
            for t in 0..WRITERS {
                let load = &load;
                let seed = seed ^ ((cycle * WRITERS + t) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                scope.spawn(move || write_until_killed(load, seed));
            }
            let enough = |n: usize| {
                let load = &load;
                move || {
                    (load.count.load(Ordering::SeqCst) >= n || !load.failures.lock().unwrap().is_empty())
                        .then_some(())
                }
            };
            if cycle > 0 {
                // A service created while the writers run; they start using it at once.
                util::wait_for("writes before the new service", Duration::from_secs(120), enough(100));
                create_service(&child.client, service);
                services.push(service.to_owned());
                load.services.write().unwrap().push(service.to_owned());
            }
            util::wait_for("acknowledged writes", Duration::from_secs(120), enough(ACKED_PER_CYCLE));
            load.killed.store(true, Ordering::SeqCst);
            child.kill();
        });
        let failures = load.failures.into_inner().unwrap();
        assert!(failures.is_empty(), "cycle {cycle}: {failures:?}");
        let new = load.acked.into_inner().unwrap();
        assert!(new.len() >= ACKED_PER_CYCLE, "cycle {cycle}: {} acknowledged", new.len());
        eprintln!("cycle {cycle}: {} writes acknowledged before SIGKILL", new.len());
        assert!(new.iter().all(|a| a.seq > log.last().map_or(0, |e| e.seq)), "sequence numbers reused");
        acked.extend(new);
    }

    // The last kill, checked; then a clean stop and a start from its snapshot.
    let mut child = util::ChildSidecar::start(&data, &env);
    assert_replayed(&child.client, CYCLES);
    log = verify(&child.client, &acked, &services, &log);
    assert!(log.len() >= acked.len());
    assert!(child.terminate().success());
    let child = util::ChildSidecar::start(&data, &env);
    // A clean stop checkpoints: the next start has nothing to replay.
    assert_eq!(gauge(&child.client, "wal_replayed_events"), 0, "replayed after a clean stop");
    assert_eq!(verify(&child.client, &acked, &services, &log), log);
}
