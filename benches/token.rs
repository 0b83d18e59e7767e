//! The cost of issuing and verifying one opt-out link token (HMAC-SHA256,
//! base64url, layout checks), as `POST /u/TOKEN` and redeem pay it.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use prefsd::domain::{CustomerId, Scope};
use prefsd::token::{Secret, TokenKey, Tokens};

fn bench(c: &mut Criterion) {
    let tokens =
        Tokens::new(vec![TokenKey { id: 1, secret: Secret::new(vec![7; 32]).unwrap() }], 180 * 86_400)
            .unwrap();
    let scope = Scope::parse("appointment", "email").unwrap();
    let now = 1_790_000_000;
    let token = tokens.issue(CustomerId(123_456_789), &scope, now).unwrap();
    assert_eq!(tokens.verify(&token, now).unwrap().customer, CustomerId(123_456_789));
    let mut group = c.benchmark_group("token");
    group.bench_function("verify", |b| b.iter(|| tokens.verify(black_box(&token), black_box(now))));
    group.bench_function("issue", |b| {
        b.iter(|| tokens.issue(black_box(CustomerId(123_456_789)), black_box(&scope), black_box(now)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
