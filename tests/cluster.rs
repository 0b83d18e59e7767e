//! Cluster mode: several `prefsd serve` children sharing one PostgreSQL as
//! the system of record. Each test starts its own throwaway PostgreSQL
//! (`initdb`/`pg_ctl` on a free loopback port) so it can crash, restart or
//! fail it over, and checks what the sidecars then answer:
//!
//! - random concurrent writes spread over three sidecars converge: the same
//!   audit log, the same checks and records everywhere, equal to what the
//!   current-state tables in PostgreSQL say; a sender reads its own writes
//!   (and the time an opt-out takes to reach another sidecar is printed);
//! - a sidecar killed with SIGKILL mid-load and restarted catches up, and a
//!   late sidecar with an empty data dir catches up from nothing;
//! - while PostgreSQL is down checks and filters answer as before, writes
//!   get a quick 503 `store_unavailable`; once it is back writes resume with
//!   no sidecar restarted, and nothing acknowledged is lost;
//! - a streaming standby promoted after the primary crashes takes over the
//!   writes of sidecars configured with both hosts;
//! - the schema migration is idempotent and safe when sidecars start at once;
//! - a sidecar that has applied events PostgreSQL no longer has (a standby
//!   promoted before replaying them), or other events than PostgreSQL now
//!   has, detects it by the chained checksum, refuses writes meanwhile,
//!   saves the lost events to a file and resynchronises;
//! - a follower whose disk fills catches up by itself once space returns
//!   (and fails `/healthz` past its bound); a frozen link to PostgreSQL
//!   answers writes 503 within the bound; cluster mode needs shared token keys.
//!
//! Every test prints a SKIP line and passes when the PostgreSQL server
//! binaries are absent (and fails instead under `PREFSD_TEST_REQUIRE_ALL=1`).

mod rule;
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use prefsd::client::{Answer, Client};
use prefsd::domain::Status;
use rule::{Rng, Rule, target};
use serde_json::{Value, json};
use util::ChildSidecar;
use util::pg::Postgres;

const SERVICES: [&str; 3] = ["rating", "waitlist", "appointment"];
const CHANNELS: [&str; 2] = ["email", "sms"];
/// One token key shared by every sidecar (keys are shared configuration),
/// so any sidecar redeems a token another issued.
const TOKEN_KEYS: &str = "7:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";
/// Generous deadline for anything that should happen within a second or two.
const WAIT: Duration = Duration::from_secs(30);

/// Small ids, ids past 2^32 and the top of the range: few enough that each
/// customer gets many writes, through different sidecars.
fn customers() -> Vec<u64> {
    let mut ids: Vec<u64> = (0..40).collect();
    ids.extend((0..6).map(|k| (1u64 << 32) + k));
    ids.extend((0..3).map(|k| u64::MAX - k));
    ids
}

fn env(url: &str) -> [(&'static str, &str); 2] {
    [("PREFSD_POSTGRES", url), ("PREFSD_TOKEN_KEYS", TOKEN_KEYS)]
}

/// A sidecar child process with its own data dir.
struct Node {
    sidecar: ChildSidecar,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    /// A sidecar on a fresh, empty data dir, following `url`.
    fn start(url: &str) -> Node {
        Node::start_with(url, &[])
    }

    /// A sidecar on `data` (kept by the caller), following `url`.
    fn start_in(data: PathBuf, url: &str) -> Node {
        let sidecar = ChildSidecar::start(&data, &env(url));
        Node { sidecar, data, _dir: tempfile::tempdir().unwrap() }
    }

    /// [`Node::start`] with more settings (`PREFSD_…` variables).
    fn start_with(url: &str, extra: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut vars = env(url).to_vec();
        vars.extend_from_slice(extra);
        let sidecar = ChildSidecar::start(&data, &vars);
        Node { sidecar, data, _dir: dir }
    }

    /// SIGKILL, then a new process on the same data dir (a new port).
    fn restart_after_kill(&mut self, url: &str) {
        self.sidecar.kill();
        self.sidecar = ChildSidecar::start(&self.data, &env(url));
    }

    fn client(&self) -> &Client {
        &self.sidecar.client
    }
}

/// What one PUT was asked to write.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Write {
    customer: u64,
    service: String,
    channel: String,
    status: String,
    reason: Option<String>,
}

/// A write the sidecar acknowledged with 200, and its sequence number.
#[derive(Debug, Clone)]
struct Acked {
    seq: u64,
    write: Write,
}

enum Outcome {
    Acked(Acked),
    /// The sidecar answered, but not 200.
    Refused(Answer),
    /// No answer at all (the sidecar is gone): the outcome is unknown.
    Unreachable(String),
}

fn put(client: &Client, w: &Write) -> Outcome {
    let path = format!("/v1/customers/{}/preferences/{}/{}", w.customer, w.service, w.channel);
    let body = match &w.reason {
        Some(r) => json!({ "status": w.status, "reason": r }),
        None => json!({ "status": w.status }),
    };
    let answer =
        match client.send("PUT", &path, Some("application/json"), Some(body.to_string().into_bytes())) {
            Ok(a) => a,
            Err(e) => return Outcome::Unreachable(e),
        };
    if answer.status != 200 {
        return Outcome::Refused(answer);
    }
    let v = answer.json();
    let echoed = Write {
        customer: v["customer"].as_u64().unwrap_or(0),
        service: v["service"].as_str().unwrap_or("").to_owned(),
        channel: v["channel"].as_str().unwrap_or("").to_owned(),
        status: v["status"].as_str().unwrap_or("").to_owned(),
        reason: v["reason"].as_str().map(str::to_owned),
    };
    assert_eq!(&echoed, w, "PUT {path} answered a different record: {v}");
    let seq = v["seq"].as_u64().unwrap_or(0);
    assert!(seq > 0, "PUT {path} answered without a sequence number: {v}");
    Outcome::Acked(Acked { seq, write: echoed })
}

/// A random write: one of the four scope shapes, a random status, sometimes a reason.
fn random_write(rng: &mut Rng, customers: &[u64]) -> Write {
    let customer = *rng.pick(customers);
    let service = *rng.pick(&SERVICES);
    let channel = *rng.pick(&CHANNELS);
    let (service, channel) = match rng.below(4) {
        0 => (service, channel),
        1 => (service, "*"),
        2 => ("*", channel),
        _ => ("*", "*"),
    };
    let reason = rng.coin().then(|| format!("reason {}", rng.below(1000)));
    Write {
        customer,
        service: service.to_owned(),
        channel: channel.to_owned(),
        status: rng.status().as_str().to_owned(),
        reason,
    }
}

/// Writer threads' shared state: where to send, what was acknowledged.
struct Load {
    /// (target id, client): threads pick one at random for every write.
    targets: RwLock<Vec<(usize, Client)>>,
    /// Targets that were killed on purpose: no answer from them is expected.
    killed: RwLock<BTreeSet<usize>>,
    acked: Mutex<Vec<Acked>>,
    /// How long each acknowledged write took, from sending to the answer.
    latencies: Mutex<Vec<Duration>>,
    /// Writes sent to a killed target without an answer: they may or may not be committed.
    unknown: Mutex<Vec<Write>>,
    failures: Mutex<Vec<String>>,
    count: AtomicUsize,
    stop: AtomicBool,
}

impl Load {
    fn new(targets: Vec<(usize, Client)>) -> Load {
        Load {
            targets: RwLock::new(targets),
            killed: RwLock::new(BTreeSet::new()),
            acked: Mutex::new(Vec::new()),
            latencies: Mutex::new(Vec::new()),
            unknown: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        }
    }

    /// Writes random changes until `limit` are acknowledged (by all threads)
    /// or the load is stopped.
    fn run(&self, seed: u64, limit: usize) {
        let mut rng = Rng::new(seed);
        let customers = customers();
        while !self.stop.load(Ordering::SeqCst) && self.count.load(Ordering::SeqCst) < limit {
            let (id, client) = {
                let targets = self.targets.read().unwrap();
                targets[rng.below(targets.len())].clone()
            };
            let w = random_write(&mut rng, &customers);
            let sent = Instant::now();
            match put(&client, &w) {
                Outcome::Acked(a) => {
                    self.latencies.lock().unwrap().push(sent.elapsed());
                    self.acked.lock().unwrap().push(a);
                    self.count.fetch_add(1, Ordering::SeqCst);
                }
                Outcome::Refused(answer) => {
                    let body = String::from_utf8_lossy(&answer.body).into_owned();
                    self.failures
                        .lock()
                        .unwrap()
                        .push(format!("target {id} refused {w:?}: {} {body}", answer.status));
                    return;
                }
                Outcome::Unreachable(e) => {
                    if self.killed.read().unwrap().contains(&id) {
                        self.unknown.lock().unwrap().push(w);
                    } else {
                        self.failures.lock().unwrap().push(format!("target {id} unreachable: {e}"));
                        return;
                    }
                }
            }
        }
    }

    fn enough(&self, n: usize) -> impl FnMut() -> Option<()> + '_ {
        move || {
            (self.count.load(Ordering::SeqCst) >= n || !self.failures.lock().unwrap().is_empty())
                .then_some(())
        }
    }
}

/// Stops the load when dropped, so a panicking test thread does not leave writers running.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn create_service(client: &Client, slug: &str) -> Answer {
    let body = json!({ "slug": slug, "name": format!("The {slug} service") });
    client
        .send("POST", "/v1/services", Some("application/json"), Some(body.to_string().into_bytes()))
        .unwrap()
}

/// The body of `/readyz` (whatever its status), or `None` without an answer.
fn readyz(client: &Client) -> Option<(u16, Value)> {
    client.send("GET", "/readyz", None, None).ok().map(|a| (a.status, a.json()))
}

/// The last applied sequence number `/readyz` reports.
fn last_seq(client: &Client) -> Option<u64> {
    readyz(client).and_then(|(status, v)| if status == 200 { v["last_seq"].as_u64() } else { None })
}

/// `SELECT last_seq FROM prefsd_head`.
fn head(pg: &Postgres) -> u64 {
    let rows = pg.query("SELECT last_seq FROM prefsd_head");
    assert_eq!(rows.len(), 1, "prefsd_head has exactly one row");
    rows[0][0].as_deref().unwrap().parse().unwrap()
}

/// Waits until every sidecar reports the PostgreSQL head as its last
/// applied sequence number; returns that head.
fn wait_converged(pg: &Postgres, clients: &[&Client]) -> u64 {
    util::wait_for("every sidecar to apply up to the postgres head", WAIT, || {
        let head = head(pg);
        clients.iter().all(|c| last_seq(c) == Some(head)).then_some(head)
    })
}

/// The whole audit log, page by page (`after` / `next_after`).
fn audit(client: &Client) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0u64;
    loop {
        let page = client.call("GET", &format!("/v1/audit?after={after}&limit=500"), None).unwrap();
        out.extend(page["entries"].as_array().unwrap().iter().cloned());
        let next = page["next_after"].as_u64().unwrap();
        if next == after {
            return out;
        }
        assert!(next > after, "next_after went backwards: {after} then {next}");
        after = next;
    }
}

/// Every (customer, service, channel) to check.
fn triples(customers: &[u64]) -> Vec<(u64, &'static str, &'static str)> {
    let mut out = Vec::new();
    for &c in customers {
        for s in SERVICES {
            for h in CHANNELS {
                out.push((c, s, h));
            }
        }
    }
    out
}

/// `POST /v1/check` over every triple.
fn checks(client: &Client, triples: &[(u64, &str, &str)]) -> Vec<bool> {
    let checks: Vec<Value> =
        triples.iter().map(|(c, s, h)| json!({ "customer": c, "service": s, "channel": h })).collect();
    let answer = client.call("POST", "/v1/check", Some(&json!({ "checks": checks }))).unwrap();
    answer["results"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect()
}

/// `GET /v1/check` for one triple.
fn check(client: &Client, customer: u64, service: &str, channel: &str) -> bool {
    let path = format!("/v1/check?customer={customer}&service={service}&channel={channel}");
    client.call("GET", &path, None).unwrap()["allowed"].as_bool().unwrap()
}

/// `POST /v1/filter` (JSON) for every pair, over `customers`.
fn filters(client: &Client, customers: &[u64]) -> Vec<Value> {
    let mut out = Vec::new();
    for s in SERVICES {
        for h in CHANNELS {
            let path = format!("/v1/filter?service={s}&channel={h}");
            out.push(client.call("POST", &path, Some(&json!({ "customers": customers }))).unwrap());
        }
    }
    out
}

/// A customer's explicit records, keyed by (service, channel).
type Records = BTreeMap<(String, String), Value>;

fn records(client: &Client, customer: u64) -> Records {
    let v = client.call("GET", &format!("/v1/customers/{customer}/preferences"), None).unwrap();
    v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                (r["service"].as_str().unwrap().to_owned(), r["channel"].as_str().unwrap().to_owned()),
                r.clone(),
            )
        })
        .collect()
}

/// Everything a sidecar answers about the data: the audit log, the checks
/// of every triple, and every customer's records.
#[derive(Debug, PartialEq)]
struct View {
    audit: Vec<Value>,
    checks: Vec<bool>,
    records: BTreeMap<u64, Records>,
}

fn view(client: &Client, customers: &[u64]) -> View {
    View {
        audit: audit(client),
        checks: checks(client, &triples(customers)),
        records: customers.iter().map(|&c| (c, records(client, c))).collect(),
    }
}

/// Asserts every sidecar shows exactly the same view; returns it.
fn assert_identical(nodes: &[(&str, &Client)], customers: &[u64]) -> View {
    let (first_name, first) = nodes[0];
    let reference = view(first, customers);
    for &(name, client) in &nodes[1..] {
        let other = view(client, customers);
        assert_eq!(other.audit.len(), reference.audit.len(), "audit length of {name} vs {first_name}");
        for (a, b) in other.audit.iter().zip(&reference.audit) {
            assert_eq!(a, b, "audit entry of {name} vs {first_name}");
        }
        assert_eq!(other.checks, reference.checks, "checks of {name} vs {first_name}");
        assert_eq!(other.records, reference.records, "records of {name} vs {first_name}");
    }
    reference
}

/// Asserts the audit log is strictly increasing and holds every acknowledged
/// write exactly as acknowledged; every other entry must be one of `unknown`
/// (sent to a sidecar that was killed before it answered).
fn assert_acked_present(audit: &[Value], acked: &[Acked], unknown: &[Write], what: &str) {
    for pair in audit.windows(2) {
        assert!(pair[0]["seq"].as_u64() < pair[1]["seq"].as_u64(), "{what}: audit out of order");
    }
    let by_seq: BTreeMap<u64, Write> = audit
        .iter()
        .map(|e| {
            let w = Write {
                customer: e["customer"].as_u64().unwrap(),
                service: e["service"].as_str().unwrap().to_owned(),
                channel: e["channel"].as_str().unwrap().to_owned(),
                status: e["after"].as_str().unwrap().to_owned(),
                reason: e["reason"].as_str().map(str::to_owned),
            };
            (e["seq"].as_u64().unwrap(), w)
        })
        .collect();
    let mut seen = BTreeSet::new();
    for a in acked {
        assert!(seen.insert(a.seq), "{what}: sequence number {} acknowledged twice", a.seq);
        let entry = by_seq.get(&a.seq).unwrap_or_else(|| panic!("{what}: acknowledged write lost: {a:?}"));
        assert_eq!(entry, &a.write, "{what}: audit entry {} differs from the acknowledged write", a.seq);
    }
    for (seq, w) in &by_seq {
        if !seen.contains(seq) {
            assert!(unknown.contains(w), "{what}: audit entry {seq} was never written by this test: {w:?}");
        }
    }
}

/// What a current-state row and an explicit record both say: status,
/// reason, source and sequence number.
type Row = (String, Option<String>, String, u64);

/// The rows of `notification_preferences`: (customer, service, type) → row.
type PgRows = BTreeMap<(u64, String, String), Row>;

fn pg_rows(pg: &Postgres) -> PgRows {
    pg.query(
        "SELECT customer_id::text, service, notification_type, status, reason, source, seq::text \
         FROM notification_preferences",
    )
    .into_iter()
    .map(|r| {
        let text = |i: usize| r[i].clone().unwrap();
        (
            (text(0).parse().unwrap(), text(1), text(2)),
            (text(3), r[4].clone(), text(5), text(6).parse().unwrap()),
        )
    })
    .collect()
}

/// The resolution rule over the current-state rows: the latest of the (up
/// to four) rows covering (customer, service, channel) decides; with none,
/// the customer is opted in.
fn resolve(rows: &PgRows, customer: u64, service: &str, channel: &str) -> bool {
    [(service, channel), (service, "*"), ("*", channel), ("*", "*")]
        .iter()
        .filter_map(|(s, h)| rows.get(&(customer, (*s).to_owned(), (*h).to_owned())))
        .max_by_key(|row| row.3)
        .is_none_or(|row| row.0 == "opted_in")
}

/// Polls `f` until it holds or `timeout` passes; whether it held.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn create_services(pg: &Postgres, first: &Client, others: &[&Client]) {
    for slug in SERVICES {
        let answer = create_service(first, slug);
        assert_eq!(answer.status, 201, "create {slug}: {}", String::from_utf8_lossy(&answer.body));
    }
    let mut all = vec![first];
    all.extend_from_slice(others);
    wait_converged(pg, &all);
}

#[test]
fn three_sidecars_converge_on_one_postgres() {
    const TEST: &str = "three_sidecars_converge_on_one_postgres";
    let Some(pg) = Postgres::start(TEST) else { return };
    let seed = rule::seed(TEST);
    let url = pg.url();
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&url)).collect();
    let clients: Vec<&Client> = nodes.iter().map(Node::client).collect();

    // Services: two through the first sidecar; the third asked of two
    // sidecars at once, which PostgreSQL decides: exactly one creates it.
    for slug in &SERVICES[..2] {
        assert_eq!(create_service(clients[0], slug).status, 201);
    }
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| create_service(clients[1], SERVICES[2]));
        let b = s.spawn(|| create_service(clients[2], SERVICES[2]));
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409], "one creation wins, the other conflicts");
    let loser = if a.status == 409 { &a } else { &b };
    assert_eq!(
        loser.error_code().as_deref(),
        Some("service_exists"),
        "{}",
        String::from_utf8_lossy(&loser.body)
    );
    let head = wait_converged(&pg, &clients);
    assert_eq!(head, 3, "three service events");
    for c in &clients {
        let listed = c.call("GET", "/v1/services", None).unwrap();
        let slugs: BTreeSet<&str> =
            listed["services"].as_array().unwrap().iter().map(|s| s["slug"].as_str().unwrap()).collect();
        assert_eq!(slugs, SERVICES.into_iter().collect(), "every sidecar knows every service");
    }

    // Any sidecar redeems a token another issued; the redeeming one reads
    // its own write at once.
    let token = clients[0]
        .call("POST", "/v1/tokens", Some(&json!({ "customer": 7, "service": "rating", "channel": "email" })))
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let redeemed = clients[2]
        .call("POST", "/v1/tokens/redeem", Some(&json!({ "token": token, "action": "opt_out" })))
        .unwrap();
    assert_eq!(redeemed["status"], "opted_out", "{redeemed}");
    assert!(!check(clients[2], 7, "rating", "email"), "the redeeming sidecar reads its own write");
    let token_write = Acked {
        seq: redeemed["seq"].as_u64().unwrap(),
        write: Write {
            customer: 7,
            service: "rating".into(),
            channel: "email".into(),
            status: "opted_out".into(),
            reason: None,
        },
    };

    // Random concurrent writes, spread over all three sidecars.
    const THREADS: usize = 6;
    const WRITES: usize = 400;
    let load = Load::new(clients.iter().enumerate().map(|(i, c)| (i, (*c).clone())).collect());
    let started = Instant::now();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&load.stop);
        for t in 0..THREADS {
            let load = &load;
            let seed = seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            s.spawn(move || load.run(seed, WRITES));
        }
        util::wait_for("the random writes", Duration::from_secs(120), load.enough(WRITES));
    });
    let elapsed = started.elapsed();
    let failures = load.failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let mut acked = load.acked.into_inner().unwrap();
    assert!(acked.len() >= WRITES, "{} acknowledged", acked.len());
    let mut latencies = load.latencies.into_inner().unwrap();
    latencies.sort();
    println!(
        "{TEST}: {} writes through 3 sidecars by {THREADS} threads in {elapsed:.2?} ({:.0}/s); \
         latency median {:.2?}, p99 {:.2?}",
        acked.len(),
        acked.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    );

    acked.push(token_write);

    // Converged: every sidecar at the head, answering identically.
    let head = wait_converged(&pg, &clients);
    assert_eq!(head, 3 + acked.len() as u64, "the head counts the services and every acknowledged write");
    let customers = customers();
    let names = ["sidecar 0", "sidecar 1", "sidecar 2"];
    let pairs: Vec<(&str, &Client)> = names.iter().copied().zip(clients.iter().copied()).collect();
    let v = assert_identical(&pairs, &customers);
    assert_eq!(v.audit.len(), acked.len(), "one audit entry per acknowledged write");
    assert_acked_present(&v.audit, &acked, &[], "sidecar 0");

    // ... equal to the current-state tables: the same records, and checks
    // that follow the rows by the resolution rule (and the audit replayed).
    let rows = pg_rows(&pg);
    let mut rule = Rule::default();
    for e in &v.audit {
        let status = Status::parse(e["after"].as_str().unwrap()).unwrap();
        let (s, h) = (e["service"].as_str().unwrap(), e["channel"].as_str().unwrap());
        rule.write(e["seq"].as_u64().unwrap(), e["customer"].as_u64().unwrap(), target(s), target(h), status);
    }
    let pg_customers: BTreeSet<u64> = rows.keys().map(|k| k.0).collect();
    assert_eq!(pg_customers, rule.customers(), "customers in notification_preferences vs the audit");
    for &customer in &pg_customers {
        let from_pg: BTreeMap<(String, String), Row> = rows
            .iter()
            .filter(|(k, _)| k.0 == customer)
            .map(|(k, row)| ((k.1.clone(), k.2.clone()), row.clone()))
            .collect();
        for c in &clients {
            let from_sidecar: BTreeMap<(String, String), Row> = records(c, customer)
                .into_iter()
                .map(|(k, r)| {
                    let row = (
                        r["status"].as_str().unwrap().to_owned(),
                        r["reason"].as_str().map(str::to_owned),
                        r["source"].as_str().unwrap().to_owned(),
                        r["seq"].as_u64().unwrap(),
                    );
                    (k, row)
                })
                .collect();
            assert_eq!(from_sidecar, from_pg, "records of customer {customer} vs notification_preferences");
        }
    }
    let all = triples(&customers);
    let expected: Vec<bool> = all.iter().map(|(c, s, h)| resolve(&rows, *c, s, h)).collect();
    assert_eq!(v.checks, expected, "checks vs the resolution of notification_preferences");
    let replayed: Vec<bool> = all.iter().map(|(c, s, h)| rule.allowed(*c, s, h)).collect();
    assert_eq!(v.checks, replayed, "checks vs the audit replayed");
    for (i, (c, s, h)) in all.iter().enumerate().step_by(7) {
        assert_eq!(check(clients[i % 3], *c, s, h), expected[i], "GET /v1/check ({c}, {s}, {h})");
    }

    // A sender reads its own writes, and an opt-out reaches the others:
    // fresh customers, an opt-out on one sidecar, checked at once there and
    // polled (without pause) on the next one.
    const PROBES: u64 = 200;
    let mut propagation = Vec::new();
    let mut probe_latency = Vec::new();
    for i in 0..PROBES {
        let (a, b) = (clients[i as usize % 3], clients[(i as usize + 1) % 3]);
        let customer = 1_000_000 + i;
        let (service, channel) = (SERVICES[i as usize % 3], CHANNELS[i as usize % 2]);
        let w = Write {
            customer,
            service: service.to_owned(),
            channel: channel.to_owned(),
            status: "opted_out".into(),
            reason: None,
        };
        let sent = Instant::now();
        let Outcome::Acked(_) = put(a, &w) else { panic!("probe write {i} was not acknowledged") };
        let acked_at = Instant::now();
        probe_latency.push(acked_at - sent);
        assert!(!check(a, customer, service, channel), "sidecar {} must read its own write {i}", i % 3);
        let deadline = acked_at + Duration::from_secs(10);
        while check(b, customer, service, channel) {
            assert!(Instant::now() < deadline, "opt-out {i} did not reach sidecar {} in 10 s", (i + 1) % 3);
        }
        propagation.push(acked_at.elapsed());
    }
    propagation.sort();
    probe_latency.sort();
    println!(
        "{TEST}: one write at a time, acknowledged after median {:.2?}, p99 {:.2?}",
        percentile(&probe_latency, 0.5),
        percentile(&probe_latency, 0.99)
    );
    println!(
        "{TEST}: opt-out acknowledged on one sidecar until visible on another, {PROBES} writes: \
         median {:.2?}, p99 {:.2?}, max {:.2?}",
        percentile(&propagation, 0.5),
        percentile(&propagation, 0.99),
        propagation.last().unwrap()
    );
}

#[test]
fn killed_sidecar_and_late_sidecar_catch_up() {
    const TEST: &str = "killed_sidecar_and_late_sidecar_catch_up";
    let Some(pg) = Postgres::start(TEST) else { return };
    let seed = rule::seed(TEST);
    let url = pg.url();
    let mut a = Node::start(&url);
    let b = Node::start(&url);
    let c = Node::start(&url);
    create_services(&pg, a.client(), &[b.client(), c.client()]);

    // Writers through A and B; A is killed mid-load, the writers carry on
    // through B, and A is restarted on its data dir while they still write.
    const THREADS: usize = 6;
    const WRITES: usize = 450;
    const A1: usize = 0;
    const B: usize = 1;
    const A2: usize = 2;
    let load = Load::new(vec![(A1, a.client().clone()), (B, b.client().clone())]);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&load.stop);
        for t in 0..THREADS {
            let load = &load;
            let seed = seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            s.spawn(move || load.run(seed, WRITES));
        }
        util::wait_for("writes before the kill", WAIT, load.enough(150));
        load.killed.write().unwrap().insert(A1);
        load.targets.write().unwrap().retain(|(id, _)| *id != A1);
        a.sidecar.kill();
        util::wait_for("writes while A is down", WAIT, load.enough(250));
        // Restarting waits for readiness, which waits for catching up.
        a.restart_after_kill(&url);
        load.targets.write().unwrap().push((A2, a.client().clone()));
        util::wait_for("writes after the restart", WAIT, load.enough(WRITES));
    });
    let failures = load.failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let acked = load.acked.into_inner().unwrap();
    let unknown = load.unknown.into_inner().unwrap();
    assert!(acked.len() >= WRITES);
    println!("{TEST}: {} acknowledged, {} unanswered at the kill", acked.len(), unknown.len());

    let head = wait_converged(&pg, &[a.client(), b.client(), c.client()]);
    let customers = customers();
    let v =
        assert_identical(&[("restarted A", a.client()), ("B", b.client()), ("C", c.client())], &customers);
    assert_acked_present(&v.audit, &acked, &unknown, "restarted A");
    assert_eq!(head, 3 + v.audit.len() as u64, "every event is a service or an audit entry");

    // A fourth sidecar, started now with an empty data dir, is ready only
    // once it has caught up from nothing.
    let d = Node::start(&url);
    assert_eq!(last_seq(d.client()), Some(head), "ready means caught up");
    let late = view(d.client(), &customers);
    assert_eq!(late, v, "the late sidecar answers as the others");
}

#[test]
fn postgres_outage_keeps_checks_and_refuses_writes() {
    const TEST: &str = "postgres_outage_keeps_checks_and_refuses_writes";
    let Some(pg) = Postgres::start(TEST) else { return };
    let seed = rule::seed(TEST);
    let url = pg.url();
    let a = Node::start(&url);
    let b = Node::start(&url);
    let clients = [a.client(), b.client()];
    create_services(&pg, clients[0], &clients[1..]);
    let load = Load::new(clients.iter().enumerate().map(|(i, c)| (i, (*c).clone())).collect());
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&load.stop);
        for t in 0..4u64 {
            let load = &load;
            s.spawn(move || load.run(seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15), 200));
        }
        util::wait_for("the random writes", WAIT, load.enough(200));
    });
    assert!(load.failures.lock().unwrap().is_empty(), "{:?}", load.failures.lock().unwrap());
    let mut acked = std::mem::take(&mut *load.acked.lock().unwrap());
    wait_converged(&pg, &clients);
    let customers = customers();
    let all = triples(&customers);
    let before_checks = checks(clients[0], &all);
    let before_filters = filters(clients[0], &customers);
    assert_eq!(checks(clients[1], &all), before_checks);
    assert_eq!(filters(clients[1], &customers), before_filters);

    pg.crash();

    // Checks and filters answer from the local index, as before.
    for c in clients {
        assert_eq!(checks(c, &all), before_checks, "batch checks during the outage");
        assert_eq!(filters(c, &customers), before_filters, "filters during the outage");
        for (i, (cu, s, h)) in all.iter().enumerate().step_by(11) {
            assert_eq!(check(c, *cu, s, h), before_checks[i], "GET /v1/check during the outage");
        }
    }
    // Writes are refused with 503 store_unavailable, promptly rather than hanging.
    let mut rng = Rng::new(seed);
    for (i, c) in clients.iter().enumerate() {
        for _ in 0..3 {
            let w = random_write(&mut rng, &customers);
            let sent = Instant::now();
            match put(c, &w) {
                Outcome::Refused(answer) => {
                    assert_eq!(answer.status, 503, "{}", String::from_utf8_lossy(&answer.body));
                    assert_eq!(answer.error_code().as_deref(), Some("store_unavailable"));
                    let message = answer.json()["error"]["message"].as_str().unwrap_or("").to_owned();
                    assert!(!message.is_empty(), "the 503 explains itself");
                }
                Outcome::Acked(a) => panic!("sidecar {i} acknowledged a write with postgres down: {a:?}"),
                Outcome::Unreachable(e) => panic!("sidecar {i} did not answer a write: {e}"),
            }
            let took = sent.elapsed();
            assert!(took < Duration::from_secs(10), "a refused write took {took:?}");
        }
        let created = create_service(c, "newsletter");
        assert_eq!(created.status, 503, "service creation during the outage");
        assert_eq!(created.error_code().as_deref(), Some("store_unavailable"));
    }
    // /readyz says PostgreSQL is unreachable (asserted at the end, so a
    // missing report does not hide what follows).
    let reports_unreachable = clients.map(|c| {
        eventually(Duration::from_secs(10), || {
            readyz(c).is_some_and(|(_, v)| v["postgres"]["reachable"] == json!(false))
        })
    });
    let outage_readyz: Vec<_> = clients.iter().map(|c| readyz(c)).collect();

    pg.start_server();

    // Writes resume on their own, on every sidecar; none was restarted.
    for (i, c) in clients.iter().enumerate() {
        let a = util::wait_for("a write to succeed after postgres restarts", WAIT, || {
            match put(c, &random_write(&mut rng, &customers)) {
                Outcome::Acked(a) => Some(a),
                Outcome::Refused(answer) if answer.status == 503 => None,
                Outcome::Refused(answer) => {
                    panic!("sidecar {i}: {} {}", answer.status, String::from_utf8_lossy(&answer.body))
                }
                Outcome::Unreachable(e) => panic!("sidecar {i} did not answer: {e}"),
            }
        });
        acked.push(a);
    }
    wait_converged(&pg, &clients);
    let v = assert_identical(&[("A", clients[0]), ("B", clients[1])], &customers);
    assert_acked_present(&v.audit, &acked, &[], "after the outage");

    // /readyz reports PostgreSQL's state — `"postgres": {"reachable", "head",
    // "lag"}` — checked last, so a missing report does not hide the rest.
    assert!(
        reports_unreachable.iter().all(|r| *r),
        "/readyz never reported postgres reachable=false during the outage: {outage_readyz:?}"
    );
    let head = head(&pg);
    for (i, c) in clients.iter().enumerate() {
        let (status, v) = readyz(c).unwrap();
        assert_eq!(status, 200, "sidecar {i}: {v}");
        assert_eq!(v["last_seq"], json!(head), "sidecar {i}: {v}");
        assert_eq!(
            v["postgres"]["reachable"],
            json!(true),
            "sidecar {i}: /readyz once postgres is back: {v}"
        );
        assert_eq!(v["postgres"]["head"], json!(head), "sidecar {i}: /readyz reports the postgres head: {v}");
        assert_eq!(v["postgres"]["lag"], json!(0), "sidecar {i}: /readyz reports no lag once caught up: {v}");
        let metrics = c.send("GET", "/metrics", None, None).unwrap();
        let text = String::from_utf8_lossy(&metrics.body);
        assert!(
            text.lines().any(|l| l == "prefsd_replication_lag_events 0"),
            "sidecar {i}: lag metric:\n{text}"
        );
        assert!(text.lines().any(|l| l == "prefsd_postgres_up 1"), "sidecar {i}: postgres_up metric");
    }
}

/// A URL naming both servers, so sidecars follow whichever accepts writes.
fn failover_url(primary: &Postgres, standby: &Postgres) -> String {
    format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write&connect_timeout=3",
        primary.port, standby.port
    )
}

#[test]
fn failover_to_a_promoted_standby() {
    const TEST: &str = "failover_to_a_promoted_standby";
    let Some(primary) = Postgres::start(TEST) else { return };
    let seed = rule::seed(TEST);
    // Declared after the primary, so it is dropped (stopped) first: its
    // data dir lives in the primary's temporary directory.
    let standby = primary.standby();
    let url = failover_url(&primary, &standby);
    let a = Node::start(&url);
    let b = Node::start(&url);
    let clients = [a.client(), b.client()];
    create_services(&primary, clients[0], &clients[1..]);
    let load = Load::new(clients.iter().enumerate().map(|(i, c)| (i, (*c).clone())).collect());
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&load.stop);
        for t in 0..4u64 {
            let load = &load;
            s.spawn(move || load.run(seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15), 200));
        }
        util::wait_for("the random writes", WAIT, load.enough(200));
    });
    assert!(load.failures.lock().unwrap().is_empty(), "{:?}", load.failures.lock().unwrap());
    let mut acked = std::mem::take(&mut *load.acked.lock().unwrap());
    let head_before = wait_converged(&primary, &clients);

    // Replication is asynchronous: a write acknowledged just before the
    // primary dies could be missing on the standby — and the sidecars, which
    // applied it, would then disagree with the promoted server about what
    // that sequence number holds. That is the documented limit of async
    // replication (synchronous replicas close it), not what this test is
    // about; so the writers have stopped, and the standby must have replayed
    // everything the primary wrote before the primary is crashed.
    let lsn = primary.query("SELECT pg_current_wal_lsn()::text")[0][0].clone().unwrap();
    util::wait_for("the standby to replay the primary's WAL", WAIT, || {
        let rows = standby.query(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"));
        (rows[0][0].as_deref() == Some("t")).then_some(())
    });
    assert_eq!(head(&standby), head_before, "the standby has every event");

    primary.crash();
    standby.promote();

    // Both sidecars carry on writing, through the promoted standby, unrestarted.
    let customers = customers();
    let mut rng = Rng::new(seed);
    for (i, c) in clients.iter().enumerate() {
        let a = util::wait_for("a write to succeed after the failover", WAIT, || {
            match put(c, &random_write(&mut rng, &customers)) {
                Outcome::Acked(a) => Some(a),
                Outcome::Refused(answer) if answer.status == 503 => None,
                Outcome::Refused(answer) => {
                    panic!("sidecar {i}: {} {}", answer.status, String::from_utf8_lossy(&answer.body))
                }
                Outcome::Unreachable(e) => panic!("sidecar {i} did not answer: {e}"),
            }
        });
        assert!(a.seq > head_before, "sequence numbers continue after the failover");
        acked.push(a);
    }
    let load = Load::new(clients.iter().enumerate().map(|(i, c)| (i, (*c).clone())).collect());
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&load.stop);
        for t in 0..4u64 {
            let load = &load;
            s.spawn(move || load.run(seed ^ (t + 11).wrapping_mul(0x9e37_79b9_7f4a_7c15), 100));
        }
        util::wait_for("the random writes", WAIT, load.enough(100));
    });
    assert!(load.failures.lock().unwrap().is_empty(), "{:?}", load.failures.lock().unwrap());
    acked.extend(load.acked.into_inner().unwrap());

    // Every acknowledged write, before and after, is on both sidecars and in
    // the promoted server's events; a sidecar started now agrees.
    let head = wait_converged(&standby, &clients);
    let v = assert_identical(&[("A", clients[0]), ("B", clients[1])], &customers);
    assert_acked_present(&v.audit, &acked, &[], "after the failover");
    assert_eq!(head, 3 + acked.len() as u64);
    let seqs: BTreeSet<u64> = standby
        .query("SELECT seq::text FROM prefsd_events")
        .into_iter()
        .map(|r| r[0].as_deref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, (1..=head).collect(), "prefsd_events on the promoted server: 1..=head, no gaps");
    let c = Node::start(&url);
    assert_eq!(view(c.client(), &customers), v, "a sidecar started after the failover");
}

#[test]
fn schema_migration_is_idempotent_and_safe_at_once() {
    const TEST: &str = "schema_migration_is_idempotent_and_safe_at_once";
    let Some(pg) = Postgres::start(TEST) else { return };
    let url = pg.url();
    // Three sidecars on a fresh database, started at the same moment.
    let mut nodes: Vec<Node> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(|| Node::start(&url))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let schema = |pg: &Postgres| pg.query("SELECT version::text FROM prefsd_schema");
    assert_eq!(schema(&pg), vec![vec![Some("2".to_owned())]], "one schema row, version 2");
    assert_eq!(pg.query("SELECT count(*)::text FROM prefsd_head"), vec![vec![Some("1".to_owned())]]);
    assert_eq!(head(&pg), 0);

    // They work together: a service created on one is usable on the others.
    assert_eq!(create_service(nodes[0].client(), "rating").status, 201);
    let clients: Vec<&Client> = nodes.iter().map(Node::client).collect();
    wait_converged(&pg, &clients);
    let w = Write {
        customer: u64::MAX,
        service: "rating".into(),
        channel: "*".into(),
        status: "opted_out".into(),
        reason: Some("migration test".into()),
    };
    assert!(matches!(put(nodes[2].client(), &w), Outcome::Acked(_)));
    wait_converged(&pg, &clients);
    for c in &clients {
        assert!(!check(c, u64::MAX, "rating", "sms"));
    }

    // Starting again on the migrated schema changes nothing.
    nodes[1].restart_after_kill(&url);
    let extra = Node::start(&url);
    assert_eq!(schema(&pg), vec![vec![Some("2".to_owned())]], "still one schema row");
    assert_eq!(head(&pg), 2);
    assert_eq!(last_seq(nodes[1].client()), Some(2));
    assert_eq!(last_seq(extra.client()), Some(2));
    assert!(!check(extra.client(), u64::MAX, "rating", "email"));
}

#[test]
fn postgres_behind_a_sidecar_is_detected_and_resynchronised() {
    const TEST: &str = "postgres_behind_a_sidecar_is_detected_and_resynchronised";
    let Some(primary) = Postgres::start(TEST) else { return };
    let seed = rule::seed(TEST);
    let standby = primary.standby();
    let url = failover_url(&primary, &standby);
    let a = Node::start(&url);
    create_services(&primary, a.client(), &[]);
    let mut rng = Rng::new(seed);
    // Random writes, on the one service or on every service.
    let mut random = move || {
        let mut w = random_write(&mut rng, &customers());
        if w.service != "*" {
            w.service = "rating".into();
        }
        w
    };
    for _ in 0..20 {
        assert!(matches!(put(a.client(), &random()), Outcome::Acked(_)));
    }
    let lsn = primary.query("SELECT pg_current_wal_lsn()::text")[0][0].clone().unwrap();
    util::wait_for("the standby to replay the primary's WAL", WAIT, || {
        let rows = standby.query(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"));
        (rows[0][0].as_deref() == Some("t")).then_some(())
    });
    // The standby stops receiving; the primary takes (and the sidecar
    // applies) writes the standby will never see; then the primary dies and
    // the stale standby is promoted: PostgreSQL has lost events this sidecar
    // has — what an asynchronous standby promoted too early, or a restore
    // from an older backup, does.
    standby.crash();
    let mut lost_writes = Vec::new();
    for _ in 0..10 {
        match put(a.client(), &random()) {
            Outcome::Acked(x) => lost_writes.push(x),
            _ => panic!("a write before the loss was not acknowledged"),
        }
    }
    let sidecar_seq = last_seq(a.client()).unwrap();
    primary.crash();
    // With no server taking writes, a write is refused with the error contract.
    match put(a.client(), &random()) {
        Outcome::Refused(answer) => {
            assert_eq!(answer.status, 503, "{}", String::from_utf8_lossy(&answer.body));
            assert_eq!(
                answer.error_code().as_deref(),
                Some("store_unavailable"),
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
        }
        Outcome::Acked(x) => panic!("a write was acknowledged with no server up: {x:?}"),
        Outcome::Unreachable(e) => panic!("the sidecar did not answer: {e}"),
    }
    standby.start_server();
    standby.promote();
    let pg_head = head(&standby);
    assert!(pg_head < sidecar_seq, "the promoted server lacks events: {pg_head} < {sidecar_seq}");

    // The sidecar must not acknowledge a write whose sequence number it
    // holds for another change: until it is ready again a write is refused
    // (503 store_unavailable) or, if acknowledged, is in the promoted
    // server's log at that sequence number (checked below).
    let mut acked = Vec::new();
    util::wait_for("the sidecar to resynchronise and be ready", Duration::from_secs(60), || {
        match put(a.client(), &random()) {
            Outcome::Acked(x) => acked.push(x),
            Outcome::Refused(answer) => {
                assert_eq!(answer.status, 503, "{}", String::from_utf8_lossy(&answer.body));
                assert_eq!(answer.error_code().as_deref(), Some("store_unavailable"));
            }
            Outcome::Unreachable(e) => panic!("the sidecar did not answer: {e}"),
        }
        readyz(a.client()).is_some_and(|(status, _)| status == 200).then_some(())
    });
    let head = wait_converged(&standby, &[a.client()]);
    let (status, v) = readyz(a.client()).unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"status": "ready", "last_seq": head, "postgres": {"reachable": true, "head": head, "lag": 0}}),
        "/readyz once resynchronised"
    );

    // The acknowledged writes the promoted server lost are saved for the operator.
    let files: Vec<PathBuf> = std::fs::read_dir(&a.data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("lost-writes-"))
        .collect();
    assert_eq!(files.len(), 1, "one lost-writes file: {files:?}");
    let saved: Vec<Value> = std::fs::read_to_string(&files[0])
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let saved_seqs: Vec<u64> = saved.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(saved_seqs, (pg_head + 1..=sidecar_seq).collect::<Vec<_>>());
    for w in lost_writes.iter().filter(|w| w.seq > pg_head) {
        let entry = saved.iter().find(|l| l["seq"].as_u64() == Some(w.seq)).unwrap();
        let change = &entry["event"]["Preference"];
        assert_eq!(change["customer"].as_u64(), Some(w.write.customer), "{entry} vs {w:?}");
        assert_eq!(change["after"].as_str(), Some(w.write.status.as_str()), "{entry} vs {w:?}");
    }

    // It answers as a sidecar started from nothing on the promoted server.
    let fresh = Node::start(&url);
    wait_converged(&standby, &[a.client(), fresh.client()]);
    let v = assert_identical(&[("fresh", fresh.client()), ("resynchronised", a.client())], &customers());
    for x in &acked {
        let entry = v.audit.iter().find(|e| e["seq"].as_u64() == Some(x.seq));
        let entry = entry.unwrap_or_else(|| panic!("an acknowledged write is not in postgres: {x:?}"));
        assert_eq!(entry["customer"].as_u64(), Some(x.write.customer), "{entry} vs {x:?}");
        assert_eq!(entry["after"].as_str(), Some(x.write.status.as_str()), "{entry} vs {x:?}");
    }
}

/// A tmpfs mounted on a fresh directory for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it), or `None`
    /// after a SKIP line where mounting is not allowed.
    fn mount(test: &str, size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                util::skip(
                    test,
                    &format!("cannot mount a tmpfs: {}", String::from_utf8_lossy(&o.stderr).trim()),
                );
                None
            }
            Err(e) => {
                util::skip(test, &format!("cannot run mount: {e}"));
                None
            }
        }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the file system with `name` until a write fails for lack of space.
    fn fill(&self, name: &str) -> u64 {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.path().join(name)).unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Whatever is left in smaller pieces, to the last byte.
        for size in [4096usize, 512, 1] {
            while f.write(&chunk[..size]).is_ok_and(|n| n > 0) {
                written += size as u64;
            }
        }
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// A sidecar whose data directory fills up: it reports not ready, keeps
/// tracking PostgreSQL's head, fails `/healthz` once held broken past the
/// bound, and catches up by itself, without a restart, when space returns.
#[test]
fn a_follower_whose_disk_fills_recovers_without_a_restart() {
    const TEST: &str = "a_follower_whose_disk_fills_recovers_without_a_restart";
    let Some(pg) = Postgres::start(TEST) else { return };
    let Some(fs) = Tmpfs::mount(TEST, "24m") else { return };
    let url = pg.url();
    let a = Node::start(&url);
    let data = fs.path().join("data");
    // A short bound, so the test sees /healthz fail.
    let vars = [env(&url).as_slice(), &[("PREFSD_FOLLOWER_UNHEALTHY_SECS", "2")]].concat();
    let mut b = ChildSidecar::start(&data, &vars);
    create_services(&pg, a.client(), &[&b.client]);

    let filled = fs.fill("filler");
    println!("{TEST}: filled the tmpfs with {filled} bytes");
    // A takes 400 opt-outs B cannot store.
    let customers: Vec<u64> = (1000..1400).collect();
    let mut acked = Vec::new();
    for &customer in &customers {
        let w = Write {
            customer,
            service: "rating".into(),
            channel: "email".into(),
            status: "opted_out".into(),
            reason: None,
        };
        match put(a.client(), &w) {
            Outcome::Acked(x) => acked.push(x),
            Outcome::Refused(r) => {
                panic!("A refused a write: {} {}", r.status, String::from_utf8_lossy(&r.body))
            }
            Outcome::Unreachable(e) => panic!("A did not answer: {e}"),
        }
    }
    let pg_head = head(&pg);
    // B says it is behind, with the reason and a lag that follows the head.
    let (_, v) = util::wait_for("B's /readyz to report the failing disk", WAIT, || {
        readyz(&b.client)
            .filter(|(status, v)| *status == 503 && v["postgres"]["failing"] == json!("disk_full"))
    });
    assert_eq!(v["error"]["code"], json!("not_ready"), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("bytes free"), "the reason is given: {v}");
    // The head it reports keeps moving while it fails.
    let (_, v) = util::wait_for("B's /readyz to report postgres's head while failing", WAIT, || {
        readyz(&b.client).filter(|(status, v)| *status == 503 && v["postgres"]["head"] == json!(pg_head))
    });
    let lag = v["postgres"]["lag"].as_u64().unwrap();
    assert!(lag > 0 && lag == pg_head - v["last_seq"].as_u64().unwrap(), "{v}");
    let metrics =
        String::from_utf8_lossy(&b.client.send("GET", "/metrics", None, None).unwrap().body).into_owned();
    assert!(
        metrics.lines().any(|l| l.starts_with("prefsd_follower_errors_total{kind=\"disk_full\"}")),
        "the failures are counted:\n{metrics}"
    );
    assert!(metrics.lines().any(|l| l == format!("prefsd_replication_lag_events {lag}")), "{metrics}");
    // Checks still answer (from what B has).
    assert!(check(&b.client, 5, "rating", "email"));
    // Held broken past the bound, /healthz fails so an orchestrator restarts it.
    let (_, v) = util::wait_for("B's /healthz to fail past the bound", WAIT, || {
        b.client
            .send("GET", "/healthz", None, None)
            .ok()
            .filter(|a| a.status == 503)
            .map(|a| (a.status, a.json()))
    });
    assert_eq!(v["error"]["code"], json!("unhealthy"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("has not applied"), "{v}");

    // Space returns: B catches up by itself (same process) and is healthy.
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    let freed = Instant::now();
    util::wait_for("B to catch up after the disk is freed", Duration::from_secs(60), || {
        (last_seq(&b.client) == Some(pg_head)).then_some(())
    });
    println!("{TEST}: freed disk to caught up in {} ms", freed.elapsed().as_millis());
    assert!(b.child.try_wait().unwrap().is_none(), "B was not restarted");
    assert_eq!(b.client.send("GET", "/healthz", None, None).unwrap().status, 200);
    for &customer in &customers {
        assert!(!check(&b.client, customer, "rating", "email"), "B sees A's opt-out of {customer}");
    }
    let v = assert_identical(&[("A", a.client()), ("B", &b.client)], &customers);
    assert_acked_present(&v.audit, &acked, &[], "B after the disk fault");
    b.kill();
}

/// A frozen link to PostgreSQL (bytes held both ways, nothing closed): a
/// write is answered 503 within the bound, checks answer, `/readyz` and
/// `prefsd_postgres_up` show the connection gone, and writes resume after
/// the thaw. The time to the 503 is printed for a short bound and for the
/// default one (10 s).
#[test]
fn a_frozen_link_to_postgres_answers_writes_503_within_the_bound() {
    const TEST: &str = "a_frozen_link_to_postgres_answers_writes_503_within_the_bound";
    let Some(pg) = Postgres::start(TEST) else { return };
    let proxy = util::pg::Proxy::start(pg.port);
    let url = proxy.url();
    let short = Node::start_with(&url, &[("PREFSD_POSTGRES_TIMEOUT_MS", "2000")]);
    let default = Node::start(&url);
    let clients = [short.client(), default.client()];
    assert_eq!(create_service(clients[0], "rating").status, 201);
    let w = |customer: u64| Write {
        customer,
        service: "rating".into(),
        channel: "email".into(),
        status: "opted_out".into(),
        reason: None,
    };
    assert!(matches!(put(clients[1], &w(1)), Outcome::Acked(_)));
    wait_converged(&pg, &clients);

    proxy.freeze();
    let frozen = Instant::now();
    let (answers, noticed): (Vec<(Outcome, Duration)>, Vec<Duration>) = std::thread::scope(|s| {
        // When each sidecar's /readyz first shows the connection gone.
        let watchers: Vec<_> = clients
            .iter()
            .map(|c| {
                s.spawn(move || {
                    util::wait_for("/readyz to show postgres unreachable", WAIT, || {
                        readyz(c)
                            .filter(|(_, v)| v["postgres"]["reachable"] == json!(false))
                            .map(|_| frozen.elapsed())
                    })
                })
            })
            .collect();
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let w = w(10 + i as u64);
                s.spawn(move || {
                    let sent = Instant::now();
                    let outcome = put(c, &w);
                    (outcome, sent.elapsed())
                })
            })
            .collect();
        // Checks answer from the local index throughout.
        for c in clients {
            assert!(!check(c, 1, "rating", "email"), "a check during the freeze");
            assert!(check(c, 2, "rating", "email"), "a check during the freeze");
        }
        let answers = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (answers, watchers.into_iter().map(|h| h.join().unwrap()).collect())
    });
    for ((outcome, took), bound) in answers.iter().zip(["2 s", "10 s (default)"]) {
        match outcome {
            Outcome::Refused(answer) => {
                assert_eq!(answer.status, 503, "{}", String::from_utf8_lossy(&answer.body));
                assert_eq!(answer.error_code().as_deref(), Some("store_unavailable"));
            }
            Outcome::Acked(a) => panic!("a write was acknowledged through a frozen link: {a:?}"),
            Outcome::Unreachable(e) => panic!("the sidecar did not answer: {e}"),
        }
        println!("{TEST}: frozen link to 503 with a bound of {bound}: {} ms", took.as_millis());
    }
    // /readyz and the metric show the follower's connection gone.
    for c in clients {
        let (status, v) = util::wait_for("/readyz to show postgres unreachable", WAIT, || {
            readyz(c).filter(|(_, v)| v["postgres"]["reachable"] == json!(false))
        });
        assert_eq!(status, 503, "{v}");
        assert_eq!(v["error"]["code"], json!("not_ready"), "{v}");
        let metrics =
            String::from_utf8_lossy(&c.send("GET", "/metrics", None, None).unwrap().body).into_owned();
        assert!(metrics.lines().any(|l| l == "prefsd_postgres_up 0"), "{metrics}");
    }
    for (took, bound) in noticed.iter().zip(["2 s", "10 s (default)"]) {
        println!(
            "{TEST}: frozen link to /readyz reachable=false with a bound of {bound}: {} ms",
            took.as_millis()
        );
    }

    proxy.thaw();
    for (i, c) in clients.iter().enumerate() {
        util::wait_for("a write to succeed after the thaw", WAIT, || match put(c, &w(100 + i as u64)) {
            Outcome::Acked(a) => Some(a),
            Outcome::Refused(r) if r.status == 503 => None,
            Outcome::Refused(r) => panic!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
            Outcome::Unreachable(e) => panic!("the sidecar did not answer: {e}"),
        });
    }
    wait_converged(&pg, &clients);
    for c in clients {
        assert_eq!(readyz(c).unwrap().0, 200);
        assert!(!check(c, 100, "rating", "email") && !check(c, 101, "rating", "email"));
    }
}

/// A sidecar child whose log goes to a file, started without waiting.
struct Logged {
    child: std::process::Child,
    client: Client,
    log: PathBuf,
}

impl Logged {
    fn spawn(data: &std::path::Path, log: PathBuf, vars: &[(&str, &str)]) -> Logged {
        let port = util::free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_prefsd"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data)
            .env_remove("PREFSD_CONFIG")
            .env("PREFSD_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Logged { child, client: Client::new(&format!("http://127.0.0.1:{port}"), None), log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PostgreSQL's log rewritten under a stopped sidecar (what a promoted
/// lagging standby that then took other writes looks like): restarted, the
/// sidecar detects it by the chained checksum, refuses writes, saves the
/// events PostgreSQL lost to a file in its data directory, resynchronises
/// and ends identical to PostgreSQL. Its data directory is a tmpfs held
/// nearly full across the restart, so the resynchronisation waits for
/// space and the refusal can be seen; where no tmpfs can be mounted that
/// part is skipped and the rest runs on a plain directory.
#[test]
fn a_rewritten_postgres_log_is_detected_and_resynchronised() {
    const TEST: &str = "a_rewritten_postgres_log_is_detected_and_resynchronised";
    let Some(pg) = Postgres::start(TEST) else { return };
    let seed = rule::seed(TEST);
    let url = pg.url();
    let fs = Tmpfs::mount(TEST, "32m");
    let mut a = match &fs {
        Some(fs) => Node::start_in(fs.path().join("data"), &url),
        None => Node::start(&url),
    };
    create_services(&pg, a.client(), &[]);
    let customers = customers();
    let mut rng = Rng::new(seed);
    for _ in 0..30 {
        assert!(matches!(put(a.client(), &random_write(&mut rng, &customers)), Outcome::Acked(_)));
    }
    let sidecar_seq = wait_converged(&pg, &[a.client()]);
    let before = audit(a.client());
    assert!(a.sidecar.terminate().success());

    // PostgreSQL forgets events from `keep + 1` on; another sidecar then
    // writes more, different, events at those sequence numbers.
    let keep = sidecar_seq - 12;
    let chain_at_keep =
        pg.query(&format!("SELECT chain::text FROM prefsd_events WHERE seq = {keep}"))[0][0].clone().unwrap();
    pg.query(&format!(
        "DELETE FROM prefsd_events WHERE seq > {keep}; \
         UPDATE prefsd_head SET last_seq = {keep}, chain = {chain_at_keep}"
    ));
    let b = Node::start(&url);
    for _ in 0..20 {
        let mut w = random_write(&mut rng, &customers);
        w.reason = Some("written after the loss".into());
        assert!(matches!(put(b.client(), &w), Outcome::Acked(_)));
    }
    let pg_head = head(&pg);
    assert!(pg_head > sidecar_seq);

    // A restarts on its data dir, nearly full (below the free-space reserve
    // it keeps): it detects the divergence but cannot resynchronise yet.
    if let Some(fs) = &fs {
        fs.fill("filler");
        let filler = std::fs::OpenOptions::new().write(true).open(fs.path().join("filler")).unwrap();
        let len = filler.metadata().unwrap().len();
        filler.set_len(len.saturating_sub(2 << 20)).unwrap();
    }
    let log = a._dir.path().join("restart.log");
    let restarted = Logged::spawn(&a.data, log, &env(&url));
    if let Some(fs) = &fs {
        let (_, v) = util::wait_for("/readyz to report the divergence", WAIT, || {
            readyz(&restarted.client).filter(|(status, v)| {
                *status == 503 && v["error"]["message"].as_str().is_some_and(|m| m.contains("resynchronises"))
            })
        });
        assert_eq!(v["error"]["code"], json!("not_ready"), "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("is not the one this sidecar applied"),
            "{v}"
        );
        match put(&restarted.client, &random_write(&mut rng, &customers)) {
            Outcome::Refused(r) => {
                assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
                assert_eq!(r.error_code().as_deref(), Some("store_unavailable"));
                let message = r.json()["error"]["message"].as_str().unwrap_or("").to_owned();
                assert!(
                    message.contains("writes are refused while this sidecar resynchronises"),
                    "{message}"
                );
            }
            Outcome::Acked(x) => panic!("a diverged sidecar acknowledged a write: {x:?}"),
            Outcome::Unreachable(e) => panic!("the sidecar did not answer: {e}"),
        }
        let metrics =
            String::from_utf8_lossy(&restarted.client.send("GET", "/metrics", None, None).unwrap().body)
                .into_owned();
        assert!(
            metrics.lines().any(|l| l.starts_with("prefsd_follower_errors_total{kind=\"diverged\"}")),
            "{metrics}"
        );
        std::fs::remove_file(fs.path().join("filler")).unwrap();
    }
    // Writes sent until it is ready are refused or, if acknowledged, are in
    // postgres's log at the acknowledged seq.
    let mut acked_early = Vec::new();
    let mut refused = Vec::new();
    util::wait_for("the restarted sidecar to be ready", Duration::from_secs(60), || {
        match put(&restarted.client, &random_write(&mut rng, &customers)) {
            Outcome::Acked(x) => acked_early.push(x),
            Outcome::Refused(r) => refused.push((r.status, r.error_code())),
            Outcome::Unreachable(_) => {}
        }
        (readyz(&restarted.client).is_some_and(|(s, _)| s == 200)).then_some(())
    });
    println!(
        "{TEST}: before ready: {} writes refused {:?}, {} acknowledged",
        refused.len(),
        refused.first(),
        acked_early.len()
    );
    for (status, code) in &refused {
        assert_eq!(
            (*status, code.as_deref()),
            (503, Some("store_unavailable")),
            "a refusal while resynchronising"
        );
    }
    let log = restarted.log();
    assert!(log.contains("resynchronising"), "the divergence is logged:\n{log}");
    assert!(log.contains("writes are refused"), "the refusal is logged:\n{log}");

    // The events PostgreSQL lost are in a file in the data directory, named in the log.
    let files: Vec<PathBuf> = std::fs::read_dir(&a.data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("lost-writes-"))
        .collect();
    assert_eq!(files.len(), 1, "one lost-writes file: {files:?}");
    assert!(log.contains(&*files[0].to_string_lossy()), "the log names {:?}:\n{log}", files[0]);
    let lost: Vec<Value> = std::fs::read_to_string(&files[0])
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lost_seqs: Vec<u64> = lost.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(lost_seqs, (keep + 1..=sidecar_seq).collect::<Vec<_>>(), "the lost events, in order");
    for (entry, l) in before.iter().filter(|e| e["seq"].as_u64().unwrap() > keep).zip(&lost) {
        let change = &l["event"]["Preference"];
        assert_eq!(change["customer"].as_u64(), entry["customer"].as_u64(), "{l} vs {entry}");
        assert_eq!(change["after"], entry["after"], "{l} vs {entry}");
    }

    // It ends identical to postgres: what a sidecar started from nothing answers.
    let fresh = Node::start(&url);
    let head = wait_converged(&pg, &[&restarted.client, fresh.client()]);
    let v = assert_identical(&[("fresh", fresh.client()), ("resynchronised", &restarted.client)], &customers);
    for acked in &acked_early {
        let entry = v.audit.iter().find(|e| e["seq"].as_u64() == Some(acked.seq));
        let entry =
            entry.unwrap_or_else(|| panic!("a write acknowledged while restarting is lost: {acked:?}"));
        assert_eq!(entry["customer"].as_u64(), Some(acked.write.customer), "{entry} vs {acked:?}");
        assert_eq!(entry["after"].as_str(), Some(acked.write.status.as_str()), "{entry} vs {acked:?}");
    }
    assert_eq!(head, 3 + v.audit.len() as u64);
    // And it takes writes again.
    assert!(matches!(put(&restarted.client, &random_write(&mut rng, &customers)), Outcome::Acked(_)));
}

/// Cluster mode refuses to start without token keys, saying how to make
/// them; with shared keys, a link issued through one sidecar redeems
/// through another.
#[test]
fn cluster_mode_needs_shared_token_keys() {
    const TEST: &str = "cluster_mode_needs_shared_token_keys";
    let Some(pg) = Postgres::start(TEST) else { return };
    let url = pg.url();
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefsd"))
            .args(["serve", "--listen", &format!("127.0.0.1:{}", util::free_port()), "--data"])
            .arg(dir.path().join(name))
            .env_remove("PREFSD_CONFIG")
            .env_remove("PREFSD_TOKEN_KEYS")
            .env("PREFSD_POSTGRES", &url)
            .output()
            .unwrap();
        assert!(!out.status.success(), "sidecar {name} started in cluster mode without token keys");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("token keys") && stderr.contains("prefsd token generate"), "{stderr}");
    }
    assert!(!dir.path().join("a").join("token-keys").exists(), "no key was generated");

    let a = Node::start(&url);
    let b = Node::start(&url);
    assert_eq!(create_service(a.client(), "rating").status, 201);
    wait_converged(&pg, &[a.client(), b.client()]);
    let token = a
        .client()
        .call("POST", "/v1/tokens", Some(&json!({ "customer": 9, "service": "rating", "channel": "sms" })))
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let redeemed = b
        .client()
        .call("POST", "/v1/tokens/redeem", Some(&json!({ "token": token, "action": "opt_out" })))
        .unwrap();
    assert_eq!(redeemed["status"], "opted_out", "{redeemed}");
    assert!(!check(b.client(), 9, "rating", "sms"));
}

/// A database migrated by an earlier build (schema v1, no checksums) is
/// upgraded in place: the checksums of the events it holds are computed,
/// a sidecar that applied them before the upgrade agrees with them (no
/// divergence, nothing saved as lost), and a new sidecar catches up.
#[test]
fn a_v1_database_is_upgraded_with_checksums() {
    const TEST: &str = "a_v1_database_is_upgraded_with_checksums";
    let Some(pg) = Postgres::start(TEST) else { return };
    let seed = rule::seed(TEST);
    let url = pg.url();
    let mut a = Node::start(&url);
    create_services(&pg, a.client(), &[]);
    let mut rng = Rng::new(seed);
    let customers = customers();
    for _ in 0..25 {
        assert!(matches!(put(a.client(), &random_write(&mut rng, &customers)), Outcome::Acked(_)));
    }
    let head = wait_converged(&pg, &[a.client()]);
    assert!(a.sidecar.terminate().success());
    // What the v1 schema looked like.
    pg.query(
        "ALTER TABLE prefsd_events DROP COLUMN chain; ALTER TABLE prefsd_head DROP COLUMN chain; \
         UPDATE prefsd_schema SET version = 1",
    );

    a.sidecar = ChildSidecar::start(&a.data, &env(&url));
    assert_eq!(pg.query("SELECT version::text FROM prefsd_schema"), vec![vec![Some("2".to_owned())]]);
    let missing = pg.query("SELECT count(*)::text FROM prefsd_events WHERE chain IS NULL");
    assert_eq!(missing, vec![vec![Some("0".to_owned())]], "every event has its checksum");
    let head_chain =
        pg.query("SELECT h.chain = e.chain FROM prefsd_head h JOIN prefsd_events e ON e.seq = h.last_seq");
    assert_eq!(head_chain, vec![vec![Some("t".to_owned())]], "the head carries the last event's checksum");
    let b = Node::start(&url);
    assert!(matches!(put(b.client(), &random_write(&mut rng, &customers)), Outcome::Acked(_)));
    assert_eq!(wait_converged(&pg, &[a.client(), b.client()]), head + 1);
    assert_identical(&[("upgraded", a.client()), ("new", b.client())], &customers);
    let lost = std::fs::read_dir(&a.data)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("lost-writes-"))
        .count();
    assert_eq!(lost, 0, "the upgrade's checksums agree with the sidecar's");
    let (status, v) = readyz(a.client()).unwrap();
    assert_eq!(status, 200, "{v}");
}

/// A data directory of another PostgreSQL database cannot be followed, and
/// no retry fixes it: not ready, and `/healthz` fails at once, with the reason.
#[test]
fn a_data_directory_of_another_cluster_fails_health() {
    const TEST: &str = "a_data_directory_of_another_cluster_fails_health";
    let Some(first) = Postgres::start(TEST) else { return };
    let second = Postgres::start(TEST).unwrap();
    let mut a = Node::start(&first.url());
    assert_eq!(create_service(a.client(), "rating").status, 201);
    wait_converged(&first, &[a.client()]);
    assert!(a.sidecar.terminate().success());

    let url = second.url();
    let other = Logged::spawn(&a.data, a._dir.path().join("other.log"), &env(&url));
    let (status, v) = util::wait_for("/healthz to fail", WAIT, || {
        other
            .client
            .send("GET", "/healthz", None, None)
            .ok()
            .filter(|h| h.status == 503)
            .map(|h| (h.status, h.json()))
    });
    assert_eq!(status, 503);
    assert_eq!(v["error"]["code"], json!("unhealthy"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("another postgres cluster"), "{v}");
    let (status, v) = readyz(&other.client).unwrap();
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("another postgres cluster"), "{v}");
    assert_eq!(head(&second), 0, "nothing was written to the other database");
}
