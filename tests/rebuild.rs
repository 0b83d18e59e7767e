//! The index is derived state: rebuilt from the stored records, or loaded
//! from a snapshot plus the events after it, it equals the live one.
//!
//! How "equal" is meant: `Store::rebuild_index` registers services in slug
//! order (it reads the `services` table, which is keyed by slug), while the
//! live index — and a snapshot of it, and the replay after a snapshot —
//! registers them in the order they were created. `Index`'s derived
//! `PartialEq` compares that order (the `services` vector and the row-major
//! `pairs` behind it), so a rebuild is compared as sets: the same channels in
//! order, the same services, and for every (service, channel) pair and every
//! channel template the same opted-out set. Which row a service occupies
//! decides no answer. Snapshot loads keep the order, so those are compared
//! with `==` as well.

mod rule;
mod util;

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;

use prefsd::client::{Answer, Client};
use prefsd::config::Config;
use prefsd::domain::{ChannelName, CustomerId, ServiceSlug, Status};
use prefsd::index::Index;
use prefsd::store::Store;
use rule::{Rng, Rule, side};

const CHANNELS: [&str; 3] = ["email", "sms", "push"];
/// Not in slug order, so registration order and slug order differ.
const SERVICES: [&str; 4] = ["waitlist", "rating", "appointment", "billing"];
const CUSTOMERS: [u64; 9] =
    [0, 1, 2, 65_536, u32::MAX as u64, 1 << 32, (1 << 32) + 1, u64::MAX - 1, u64::MAX];

fn three_channels(config: &mut Config) {
    config.channels = CHANNELS.iter().map(|c| ChannelName::parse(c).unwrap()).collect();
}

fn channels() -> Vec<ChannelName> {
    CHANNELS.iter().map(|c| ChannelName::parse(c).unwrap()).collect()
}

#[derive(Debug, Clone)]
enum Op {
    CreateService(usize),
    Put { customer: u64, service: Option<usize>, channel: Option<usize>, status: Status },
}

fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        1 => (0..SERVICES.len()).prop_map(Op::CreateService),
        6 => (
            proptest::sample::select(CUSTOMERS.to_vec()),
            proptest::option::weighted(0.5, 0..SERVICES.len()),
            proptest::option::weighted(0.5, 0..CHANNELS.len()),
            prop_oneof![Just(Status::OptedOut), Just(Status::OptedIn)],
        )
            .prop_map(|(customer, service, channel, status)| Op::Put { customer, service, channel, status }),
    ];
    proptest::collection::vec(op, 1..max)
}

/// What the sidecar acknowledged: the writes (for the rule), the latest
/// status and sequence number of every explicit record, and the services.
#[derive(Default)]
struct Written {
    rule: Rule,
    /// (customer, scope key) → (status, seq) of the newest write.
    records: BTreeMap<(u64, String), (Status, u64)>,
    services: Vec<String>,
    last_seq: u64,
}

fn put(
    client: &Client,
    customer: u64,
    service: Option<&str>,
    channel: Option<&str>,
    status: Status,
) -> Answer {
    let path = format!("/v1/customers/{customer}/preferences/{}/{}", side(service), side(channel));
    let body = serde_json::json!({ "status": status.as_str() }).to_string().into_bytes();
    client.send("PUT", &path, Some("application/json"), Some(body)).unwrap()
}

fn create_service(client: &Client, slug: &str) -> Answer {
    let body = serde_json::json!({ "slug": slug, "name": slug }).to_string().into_bytes();
    client.send("POST", "/v1/services", Some("application/json"), Some(body)).unwrap()
}

impl Written {
    /// Sends one op and records what was acknowledged; refusals must be the
    /// documented ones (404 for a service not created yet, 409 for a second create).
    fn run(&mut self, client: &Client, op: &Op) {
        match op {
            Op::CreateService(i) => {
                let slug = SERVICES[*i];
                let answer = create_service(client, slug);
                if self.services.iter().any(|s| s == slug) {
                    assert_eq!(answer.status, 409, "second create of {slug}: {answer:?}");
                } else {
                    assert_eq!(answer.status, 201, "create {slug}: {answer:?}");
                    self.services.push(slug.to_owned());
                    self.last_seq += 1;
                }
            }
            Op::Put { customer, service, channel, status } => {
                let service = service.map(|i| SERVICES[i]);
                let channel = channel.map(|i| CHANNELS[i]);
                let answer = put(client, *customer, service, channel, *status);
                if service.is_some_and(|s| !self.services.iter().any(|r| r == s)) {
                    assert_eq!(answer.status, 404, "write to a service not created yet: {answer:?}");
                    return;
                }
                assert_eq!(answer.status, 200, "write: {answer:?}");
                let json = answer.json();
                let seq = json["seq"].as_u64().unwrap();
                assert_eq!(seq, self.last_seq + 1, "sequence numbers are dense: {json}");
                assert_eq!(json["customer"].as_u64(), Some(*customer));
                assert_eq!(json["status"].as_str(), Some(status.as_str()));
                self.last_seq = seq;
                self.rule.write(seq, *customer, service, channel, *status);
                let key = format!("{}/{}", side(service), side(channel));
                self.records.insert((*customer, key), (*status, seq));
            }
        }
    }

    /// A random valid op, for the tests that are not proptest-driven.
    fn random(&mut self, client: &Client, rng: &mut Rng) {
        let customer = *rng.pick(&CUSTOMERS);
        let service =
            if self.services.is_empty() || rng.coin() { None } else { Some(rng.pick(&self.services)) };
        let service = service.map(|s| SERVICES.iter().position(|x| x == s).unwrap());
        let channel = if rng.coin() { None } else { Some(rng.below(CHANNELS.len())) };
        self.run(client, &Op::Put { customer, service, channel, status: rng.status() });
    }
}

/// `a` and `b` hold the same opted-out sets for the same pairs and
/// templates, whatever order their services were registered in.
fn same_sets(a: &Index, b: &Index) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.channels(), b.channels());
    let mut sa: Vec<&ServiceSlug> = a.services().iter().collect();
    let mut sb: Vec<&ServiceSlug> = b.services().iter().collect();
    sa.sort();
    sb.sort();
    prop_assert_eq!(sa, sb);
    for s in a.services() {
        for c in a.channels() {
            let (x, y) = (a.pair(s.as_str(), c.as_str()).unwrap(), b.pair(s.as_str(), c.as_str()).unwrap());
            prop_assert_eq!(x, y, "pair ({}, {})", s, c);
        }
    }
    prop_assert_eq!(a.templates(), b.templates(), "templates");
    Ok(())
}

/// The index answers as the rule says for every customer, service and channel.
fn follows_rule(index: &Index, written: &Written) -> Result<(), TestCaseError> {
    prop_assert_eq!(index.services().len(), written.services.len());
    for &customer in &CUSTOMERS {
        for service in &written.services {
            for channel in CHANNELS {
                prop_assert_eq!(
                    index.allowed(CustomerId(customer), service, channel),
                    Ok(written.rule.allowed(customer, service, channel)),
                    "customer {} service {} channel {}",
                    customer,
                    service,
                    channel
                );
            }
        }
    }
    Ok(())
}

/// The stored records — what a rebuild reads — are exactly the newest
/// acknowledged write of every (customer, scope).
fn records_match(store: &Store, written: &Written) -> Result<(), TestCaseError> {
    for &customer in &CUSTOMERS {
        let stored: BTreeMap<(u64, String), (Status, u64)> = store
            .records(CustomerId(customer))
            .unwrap()
            .into_iter()
            .map(|(scope, r)| ((customer, scope.key()), (r.status, r.seq)))
            .collect();
        let expected: BTreeMap<(u64, String), (Status, u64)> = written
            .records
            .range((customer, String::new())..)
            .take_while(|((c, _), _)| *c == customer)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        prop_assert_eq!(stored, expected, "records of customer {}", customer);
    }
    Ok(())
}

/// Live index = rebuilt index = the rule, and the records are the newest writes.
fn check_live(app: &util::TestApp, written: &Written) -> Result<(), TestCaseError> {
    let live = app.app.index().clone();
    let rebuilt = app.app.store().rebuild_index(&channels()).unwrap();
    follows_rule(&live, written)?;
    same_sets(&rebuilt, &live)?;
    records_match(app.app.store(), written)?;
    prop_assert_eq!(app.app.store().last_seq().unwrap(), written.last_seq);
    Ok(())
}

/// Opens the (closed) store in `data` and loads it: from a snapshot, equal
/// to `expected` including service order, and equal as sets to a rebuild.
fn load_equals(data: &Path, expected: &Index, last_seq: u64) -> Result<(), TestCaseError> {
    let store = Store::open(data).unwrap();
    let loaded = store.load(&channels()).unwrap();
    prop_assert!(loaded.from_snapshot, "a snapshot was expected");
    prop_assert_eq!(loaded.last_seq, last_seq);
    prop_assert_eq!(&loaded.index, expected);
    same_sets(&store.rebuild_index(&channels()).unwrap(), expected)?;
    Ok(())
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config(5))]

    /// Random writes over HTTP — all four scope shapes, services created
    /// part-way — then: the rebuilt index equals the live one; a graceful
    /// stop and a reopen load an index equal to the live one from the
    /// snapshot; a stale snapshot plus the replay of the later events loads
    /// the same index; and the restarted sidecar keeps agreeing after more writes.
    #[test]
    fn rebuilt_and_reloaded_indexes_equal_the_live_one(
        first in ops(40),
        second in ops(20),
        capture in any::<proptest::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let app = util::spawn_on(&data, three_channels);
        let mut written = Written::default();
        // An (index, seq) pair taken between two acknowledged writes, for
        // the stale snapshot below. Writes are sequential, so nothing is in
        // flight when it is taken.
        let at = capture.index(first.len() + 1);
        let mut captured = (app.app.index().clone(), 0);
        for (i, op) in first.iter().enumerate() {
            written.run(&app.client, op);
            if i + 1 == at {
                captured = (app.app.index().clone(), app.app.store().last_seq().unwrap());
            }
        }
        check_live(&app, &written)?;
        let live = app.app.index().clone();
        app.stop();

        // A graceful stop snapshots the index at the last sequence number.
        load_equals(&data, &live, written.last_seq)?;

        // Put back an older snapshot: the load replays everything after it,
        // services created since included.
        {
            let store = Store::open(&data).unwrap();
            store.write_snapshot(&captured.0, captured.1).unwrap();
        }
        load_equals(&data, &live, written.last_seq)?;

        // The sidecar itself loads the same index, and keeps agreeing.
        let app = util::spawn_on(&data, three_channels);
        prop_assert_eq!(&*app.app.index(), &live);
        for op in &second {
            written.run(&app.client, op);
        }
        check_live(&app, &written)?;
        let live = app.app.index().clone();
        app.stop();
        load_equals(&data, &live, written.last_seq)?;
    }
}

/// The same with a real crash: writes after the last snapshot, then SIGKILL.
/// The snapshot on disk is stale (the one the earlier graceful stop wrote),
/// so the load is snapshot + replay, and it must equal both a rebuild and
/// what the killed sidecar answered just before it died.
#[test]
fn stale_snapshot_after_sigkill_loads_an_equal_index() {
    let mut rng = Rng::new(rule::seed("stale_snapshot_after_sigkill_loads_an_equal_index"));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // No periodic snapshot may run while the test writes.
    let env = [("PREFSD_CHANNELS", "email,sms,push"), ("PREFSD_SNAPSHOT_INTERVAL_SECS", "3600")];
    let mut written = Written::default();

    let mut child = util::ChildSidecar::start(&data, &env);
    written.run(&child.client, &Op::CreateService(0));
    written.run(&child.client, &Op::CreateService(1));
    for _ in 0..40 {
        written.random(&child.client, &mut rng);
    }
    assert!(child.terminate().success());
    let snapshot_seq = written.last_seq;

    let mut child = util::ChildSidecar::start(&data, &env);
    for i in 0..60 {
        if i == 20 {
            // A service created after the snapshot, after broad writes it must honour.
            written.run(&child.client, &Op::CreateService(2));
        }
        written.random(&child.client, &mut rng);
    }
    assert!(written.last_seq > snapshot_seq + 60);
    // What the live index answers, seen through the API just before the kill.
    let mut live: BTreeMap<(u64, String, String), bool> = BTreeMap::new();
    for &customer in &CUSTOMERS {
        let view = child.client.call("GET", &format!("/v1/customers/{customer}/preferences"), None).unwrap();
        for e in view["effective"].as_array().unwrap() {
            let (s, h) = (e["service"].as_str().unwrap(), e["channel"].as_str().unwrap());
            live.insert((customer, s.to_owned(), h.to_owned()), e["allowed"].as_bool().unwrap());
        }
    }
    assert_eq!(live.len(), CUSTOMERS.len() * 3 * CHANNELS.len());
    child.kill();

    let store = Store::open(&data).unwrap();
    let loaded = store.load(&channels()).unwrap();
    assert!(loaded.from_snapshot, "the snapshot of the graceful stop is still there");
    assert_eq!(loaded.last_seq, written.last_seq, "every acknowledged write survived");
    same_sets(&loaded.index, &store.rebuild_index(&channels()).unwrap()).unwrap();
    for ((customer, s, h), allowed) in &live {
        assert_eq!(loaded.index.allowed(CustomerId(*customer), s, h), Ok(*allowed), "{customer} {s} {h}");
        assert_eq!(written.rule.allowed(*customer, s, h), *allowed, "the rule for {customer} {s} {h}");
    }
    records_match(&store, &written).unwrap();
    drop(store);

    // And the sidecar loads exactly that index.
    let app = util::spawn_on(&data, three_channels);
    assert_eq!(*app.app.index(), loaded.index);
    check_live(&app, &written).unwrap();
    app.stop();
}
