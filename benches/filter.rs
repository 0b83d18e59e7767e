//! Filtering 1,000,000 recipients against 1,000,000 opt-outs, minus the network.
//!
//! Both sets are distinct random ids in 0..20,000,000 drawn with a fixed seed;
//! the opt-outs fill the `rating`/`email` pair of an index with the default
//! two channels. What `POST /v1/filter` does after reading the body and before
//! writing the answer:
//!
//! - `allowed_bitmap`: the index's difference alone;
//! - `roaring_difference`: the peer — the same difference between two plain
//!   `RoaringBitmap`s (the roaring crate's container-wise difference);
//! - `roaring_end_to_end`: portable-format body → `RoaringBitmap` →
//!   difference → portable-format answer, as the handler does it;
//! - `json_end_to_end`: `{"customers":[…]}` → `Vec<CustomerId>` → `split` →
//!   `{"allowed":[…],"suppressed":[…]}`, with serde_json as the handler does it;
//! - `json_parse`, `json_split`, `json_serialize`: the three steps of the JSON
//!   path on their own, to show where its time goes.

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::{Clock, SplitMix64, distinct_ids};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use prefsd::domain::CustomerId;
use prefsd::http::check::{FilterAnswer, FilterRequest};
use prefsd::http::utf8;
use prefsd::index::{allowed_bitmap, split};
use roaring::RoaringBitmap;

/// Recipients in the list, and opt-outs in the pair.
const N: u64 = 1_000_000;

fn bench_filter(c: &mut Criterion<Clock>) {
    let mut rng = SplitMix64(0x00F1_17E4);
    let opted_out = distinct_ids(&mut rng, N);
    let recipients = distinct_ids(&mut rng, N);

    let index = common::rating_email_index(&opted_out);
    let set = index.pair("rating", "email").unwrap();

    // The roaring request body: what a client's serializer writes.
    let recipient_bitmap: RoaringBitmap = recipients.iter().copied().collect();
    // The peer: the same opt-outs in a plain roaring bitmap.
    let plain_opted_out: RoaringBitmap = opted_out.iter().copied().collect();
    let mut roaring_body = Vec::with_capacity(recipient_bitmap.serialized_size());
    recipient_bitmap.serialize_into(&mut roaring_body).unwrap();

    // The JSON request body, in the client's (random) order.
    let customers: Vec<CustomerId> = recipients.iter().map(|&id| CustomerId(u64::from(id))).collect();
    let json_body = serde_json::to_vec(&serde_json::json!({ "customers": customers })).unwrap();

    // Both paths must agree before anything is timed.
    let expected = allowed_bitmap(set, &recipient_bitmap);
    let (allowed, suppressed) = split(set, &customers);
    assert_eq!(expected, &recipient_bitmap - &plain_opted_out);
    assert_eq!(expected.len(), allowed.len() as u64);
    assert_eq!(allowed.len() + suppressed.len(), N as usize);
    println!(
        "filter: {} recipients, {} opted out, {} allowed; bodies: roaring {} bytes, JSON {} bytes",
        N,
        set.len(),
        expected.len(),
        roaring_body.len(),
        json_body.len()
    );

    let mut group = c.benchmark_group("filter");
    // Flat sampling: each of the 10 samples runs the same number of
    // iterations, so a path of a few hundred milliseconds needs 10 runs, not
    // the 55 of linear sampling, and the file finishes in about a minute.
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(N));

    group.bench_function("allowed_bitmap", |b| b.iter(|| allowed_bitmap(set, black_box(&recipient_bitmap))));

    group
        .bench_function("roaring_difference", |b| b.iter(|| black_box(&recipient_bitmap) - &plain_opted_out));

    group.bench_function("roaring_end_to_end", |b| {
        b.iter(|| {
            let recipients = RoaringBitmap::deserialize_from(black_box(&roaring_body[..])).unwrap();
            let allowed = allowed_bitmap(set, &recipients);
            let suppressed = recipients.len() - allowed.len();
            let mut out = Vec::with_capacity(allowed.serialized_size());
            allowed.serialize_into(&mut out).unwrap();
            (out, suppressed)
        })
    });

    group.bench_function("json_end_to_end", |b| {
        b.iter(|| {
            let body: FilterRequest = serde_json::from_str(utf8(black_box(&json_body)).unwrap()).unwrap();
            let (allowed, suppressed) = split(set, &body.customers);
            serde_json::to_vec(&FilterAnswer { allowed, suppressed }).unwrap()
        })
    });

    group.bench_function("json_parse", |b| {
        b.iter(|| serde_json::from_str::<FilterRequest>(utf8(black_box(&json_body)).unwrap()).unwrap())
    });

    group.bench_function("json_split", |b| b.iter(|| split(set, black_box(&customers))));

    let answer = FilterAnswer { allowed, suppressed };
    group.bench_function("json_serialize", |b| b.iter(|| serde_json::to_vec(black_box(&answer)).unwrap()));

    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(Clock::from_env());
    targets = bench_filter
}
criterion_main!(benches);
