//! Property tests of the pure index against a naive model of DESIGN's
//! resolution rule: keep every explicit write with a logical timestamp; for
//! (C, S, H) the most recently written among (S,H), (S,*), (*,H), (*,*)
//! decides, and with none C is opted in.
//!
//! The model knows nothing about templates, materialized bitmaps or service
//! registration order: a broad write made before a service existed covers it
//! simply because its scope does.

mod rule;
mod util;

use proptest::prelude::*;
use roaring::RoaringBitmap;

use prefsd::domain::{ChannelName, CustomerId, Scope, ServiceSlug, Status};
use prefsd::index::{Index, Unknown, allowed_bitmap, split};
use rule::Rule;

/// Ids on both sides of every boundary the index cares about: container
/// edges of the 32-bit bitmap, the 32/64-bit split, and the very top.
const CUSTOMERS: [u64; 10] =
    [0, 1, 7, 65_535, 65_536, u32::MAX as u64, 1 << 32, (1 << 32) + 5, u64::MAX - 1, u64::MAX];
const SERVICES: [&str; 4] = ["rating", "waitlist", "appointment", "billing"];
const CHANNELS: [&str; 3] = ["email", "sms", "push"];
/// A channel that is never configured.
const UNCONFIGURED: &str = "fax";

#[derive(Debug, Clone)]
enum Op {
    /// Register `SERVICES[i]` (a no-op when it is already registered).
    AddService(usize),
    /// Write `status` for `customer` in a scope; `None` is `*`. A service
    /// that is not registered yet, or a channel index past the configured
    /// ones (the unconfigured channel), must be refused without effect.
    Write { customer: u64, service: Option<usize>, channel: Option<usize>, status: Status },
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![Just(Status::OptedOut), Just(Status::OptedIn)]
}

fn customer() -> impl Strategy<Value = u64> {
    prop_oneof![4 => proptest::sample::select(CUSTOMERS.to_vec()), 1 => any::<u64>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..SERVICES.len()).prop_map(Op::AddService),
        // Channel index CHANNELS.len() stands for the unconfigured channel.
        8 => (
            customer(),
            proptest::option::weighted(0.6, 0..SERVICES.len()),
            proptest::option::weighted(0.6, 0..=CHANNELS.len()),
            status(),
        )
            .prop_map(|(customer, service, channel, status)| Op::Write { customer, service, channel, status }),
    ]
}

/// A random case: how many channels are configured (2 or 3), and the ops.
fn case() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (2..=3usize, proptest::collection::vec(op(), 1..60))
}

/// The naive model ([`rule::Rule`]: every accepted write with its logical
/// time) plus the registered services.
#[derive(Default)]
struct Model {
    rule: Rule,
    services: Vec<String>,
    clock: u64,
}

impl Model {
    fn write(&mut self, customer: u64, service: Option<&str>, channel: Option<&str>, status: Status) {
        self.clock += 1;
        self.rule.write(self.clock, customer, service, channel, status);
    }

    fn allowed(&self, customer: u64, service: &str, channel: &str) -> bool {
        self.rule.allowed(customer, service, channel)
    }

    /// Every customer the checks should probe: the fixed pool and every id written.
    fn customers(&self) -> Vec<u64> {
        let mut ids = self.rule.customers();
        ids.extend(CUSTOMERS);
        ids.into_iter().collect()
    }
}

fn channel_names(n: usize) -> Vec<ChannelName> {
    CHANNELS[..n].iter().map(|c| ChannelName::parse(c).unwrap()).collect()
}

fn scope(service: Option<&str>, channel: Option<&str>) -> Scope {
    Scope::parse(service.unwrap_or("*"), channel.unwrap_or("*")).unwrap()
}

/// Applies one op to both the index and the model, checking that refused
/// writes are refused with the right reason and leave the index untouched.
fn step(index: &mut Index, model: &mut Model, channels: usize, op: &Op) -> Result<(), TestCaseError> {
    match op {
        Op::AddService(i) => {
            let slug = SERVICES[*i];
            index.add_service(&ServiceSlug::parse(slug).unwrap());
            if !model.services.iter().any(|s| s == slug) {
                model.services.push(slug.to_owned());
            }
        }
        Op::Write { customer, service, channel, status } => {
            let service = service.map(|i| SERVICES[i]);
            let channel = channel.map(|i| CHANNELS.get(i).copied().unwrap_or(UNCONFIGURED));
            let unknown_service = service.is_some_and(|s| !model.services.iter().any(|m| m == s));
            let unknown_channel = channel.is_some_and(|c| !CHANNELS[..channels].contains(&c));
            let before = index.clone();
            let result = index.apply(CustomerId(*customer), &scope(service, channel), *status);
            if unknown_service {
                prop_assert_eq!(result, Err(Unknown::Service));
                prop_assert!(*index == before, "a refused write changed the index");
            } else if unknown_channel {
                prop_assert_eq!(result, Err(Unknown::Channel));
                prop_assert!(*index == before, "a refused write changed the index");
            } else {
                prop_assert_eq!(result, Ok(()));
                model.write(*customer, service, channel, *status);
            }
        }
    }
    Ok(())
}

/// Every (customer, service, channel) answer of the index equals the model's.
fn check_all(index: &Index, model: &Model, channels: usize) -> Result<(), TestCaseError> {
    let registered: Vec<&str> = index.services().iter().map(ServiceSlug::as_str).collect();
    prop_assert_eq!(&registered, &model.services, "services in registration order");
    for customer in model.customers() {
        for service in SERVICES {
            for channel in CHANNELS.iter().copied().chain([UNCONFIGURED]) {
                let got = index.allowed(CustomerId(customer), service, channel);
                let expected = if !model.services.iter().any(|s| s == service) {
                    Err(Unknown::Service)
                } else if !CHANNELS[..channels].contains(&channel) {
                    Err(Unknown::Channel)
                } else {
                    Ok(model.allowed(customer, service, channel))
                };
                prop_assert_eq!(
                    got,
                    expected,
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

/// `split` and `allowed_bitmap` of every registered pair agree with per-id
/// `allowed` (and so with the model) on `ids`.
fn check_filters(index: &Index, model: &Model, channels: usize, ids: &[u64]) -> Result<(), TestCaseError> {
    let customers: Vec<CustomerId> = ids.iter().copied().map(CustomerId).collect();
    let recipients: RoaringBitmap = ids.iter().filter_map(|&id| u32::try_from(id).ok()).collect();
    for service in &model.services {
        for channel in &CHANNELS[..channels] {
            let set = index.pair(service, channel).unwrap();
            let allowed = |c: &CustomerId| index.allowed(*c, service, channel).unwrap();
            for c in &customers {
                prop_assert_eq!(allowed(c), model.allowed(c.0, service, channel));
            }
            let expected_allowed: Vec<CustomerId> =
                customers.iter().copied().filter(|c| allowed(c)).collect();
            let expected_suppressed: Vec<CustomerId> =
                customers.iter().copied().filter(|c| !allowed(c)).collect();
            let (got_allowed, got_suppressed) = split(set, &customers);
            prop_assert_eq!(&got_allowed, &expected_allowed, "split allowed for ({}, {})", service, channel);
            prop_assert_eq!(&got_suppressed, &expected_suppressed, "split suppressed");

            let expected_bitmap: RoaringBitmap =
                expected_allowed.iter().filter_map(|c| u32::try_from(c.0).ok()).collect();
            let got_bitmap = allowed_bitmap(set, &recipients);
            prop_assert_eq!(got_bitmap, expected_bitmap, "allowed_bitmap for ({}, {})", service, channel);
        }
    }
    Ok(())
}

/// A recipient list for the filters: pool ids, written ids, random low and
/// high ids, with duplicates, in random order.
fn recipients() -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::vec(
        prop_oneof![
            4 => proptest::sample::select(CUSTOMERS.to_vec()),
            2 => any::<u32>().prop_map(u64::from),
            1 => 0..64u64,
            1 => any::<u64>(),
        ],
        0..80,
    )
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config(96))]

    /// After every op, every (customer, service, channel) answer equals the
    /// model's — services registered after broad writes included — and
    /// refused writes change nothing.
    #[test]
    fn index_follows_the_resolution_rule((channels, ops) in case()) {
        let mut index = Index::new(channel_names(channels));
        let mut model = Model::default();
        for op in &ops {
            step(&mut index, &mut model, channels, op)?;
            check_all(&index, &model, channels)?;
        }
        // Registering every remaining service at the end: rows built from the
        // templates must still follow every broad write made so far.
        for i in 0..SERVICES.len() {
            step(&mut index, &mut model, channels, &Op::AddService(i))?;
            check_all(&index, &model, channels)?;
        }
    }

    /// On the same random states, `split` and `allowed_bitmap` agree with
    /// per-id `allowed`, keeping input order and duplicates.
    #[test]
    fn filters_agree_with_single_checks(
        (channels, ops) in case(),
        lists in proptest::collection::vec(recipients(), 1..4),
    ) {
        let mut index = Index::new(channel_names(channels));
        let mut model = Model::default();
        for (i, op) in ops.iter().enumerate() {
            step(&mut index, &mut model, channels, op)?;
            // A few intermediate states as well as the final one.
            if i % 8 == 7 {
                check_filters(&index, &model, channels, &lists[i / 8 % lists.len()])?;
            }
        }
        for ids in &lists {
            // Every written id too, so suppressed ids certainly occur.
            let mut ids = ids.clone();
            ids.extend(model.rule.customers());
            check_filters(&index, &model, channels, &ids)?;
        }
    }
}

/// The examples DESIGN spells out, as a fixed anchor for the model itself.
#[test]
fn model_matches_the_design_examples() {
    let mut model = Model::default();
    model.write(1, None, None, Status::OptedOut);
    model.write(1, Some("rating"), Some("email"), Status::OptedIn);
    assert!(model.allowed(1, "rating", "email"));
    assert!(!model.allowed(1, "rating", "sms"));
    assert!(!model.allowed(1, "waitlist", "email"));
    model.write(2, Some("rating"), Some("email"), Status::OptedIn);
    model.write(2, None, None, Status::OptedOut);
    assert!(!model.allowed(2, "rating", "email"));
    assert!(model.allowed(3, "rating", "email"));
    // A broad write covers a service that did not exist when it was made.
    assert!(!model.allowed(1, "appointment", "sms"));
}
