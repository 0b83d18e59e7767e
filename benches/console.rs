//! The support console on a 1M-opt-out store: how long a person waits for
//! the customer page, the services page and the overview.
//!
//! A sidecar is opened on a temporary data dir with three services; one
//! million customers (ids 0..1,000,000) each get one opt-out, their scopes
//! rotating over `rating`/`email`, `waitlist`/`sms`, `*`/`email` and
//! `appointment`/`*`; customer 42 also gets 40 changes of their own (the
//! timeline a support agent reads). Each iteration drives
//! `prefsd::http::handle` with a signed-in session's cookie, as a browser's
//! request would arrive, and reads the whole page.
//!
//! - `customer_page`: `GET /console/customers/42` (grid, deciding records,
//!   timeline);
//! - `services_page`: `GET /console/services` (opted-out counts per pair);
//! - `overview`: `GET /console/` (counts, and the 90-day chart: the first
//!   request reads every audit entry of those days, here all 1M; later
//!   ones only what was appended since, so this measures the steady state);
//! - `audit_rare_filter`: `GET /console/audit?actor=nobody`, a filter that
//!   matches nothing, so the page reads its whole scan budget.
//!
//! `cargo bench --bench console`; compare medians.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use prefsd::app::App;
use prefsd::auth::Role;
use prefsd::config::Config;
use prefsd::domain::{CustomerId, Origin, Scope, ServiceSlug, Status};
use prefsd::http::{Listener, handle};
use prefsd::writer::Op;

const CUSTOMERS: u64 = 1_000_000;

fn open(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> App {
    let app = App::open(Config::for_data_dir(dir.join("data"))).expect("open a sidecar");
    let origin =
        Origin { source: "import".into(), actor: "bench".into(), client_addr: None, user_agent: None };
    let started = Instant::now();
    rt.block_on(async {
        for slug in ["rating", "waitlist", "appointment"] {
            let op = Op::CreateService {
                slug: ServiceSlug::parse(slug).unwrap(),
                name: slug.into(),
                description: String::new(),
                actor: "bench".into(),
            };
            app.writer().write(op).await.expect("create a service");
        }
        let scopes = [("rating", "email"), ("waitlist", "sms"), ("*", "email"), ("appointment", "*")]
            .map(|(s, h)| Scope::parse(s, h).unwrap());
        for chunk in (0..CUSTOMERS).collect::<Vec<_>>().chunks(20_000) {
            let ops = chunk
                .iter()
                .map(|&id| Op::SetPreference {
                    customer: CustomerId(id),
                    scope: scopes[id as usize % scopes.len()].clone(),
                    status: Status::OptedOut,
                    reason: Some("bulk".into()),
                    origin: origin.clone(),
                })
                .collect();
            for r in app.writer().write_many(ops).await {
                r.expect("write an opt-out");
            }
        }
        for i in 0..40u64 {
            let status = if i % 2 == 0 { Status::OptedIn } else { Status::OptedOut };
            let op = Op::SetPreference {
                customer: CustomerId(42),
                scope: scopes[i as usize % scopes.len()].clone(),
                status,
                reason: Some(format!("call {i}")),
                origin: Origin {
                    source: "console".into(),
                    actor: "dana".into(),
                    client_addr: None,
                    user_agent: None,
                },
            };
            app.writer().write(op).await.expect("write");
        }
    });
    eprintln!("store with {CUSTOMERS} opt-outs written in {:.1} s", started.elapsed().as_secs_f64());
    app
}

fn get(rt: &tokio::runtime::Runtime, app: &App, path: &str, cookie: &str) -> usize {
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    rt.block_on(async {
        let req = Request::get(path)
            .header("cookie", format!("prefsd_console={cookie}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let reply = handle(app, req, peer, Listener::Api).await;
        assert_eq!(reply.status(), 200, "{path}");
        reply.into_body().collect().await.unwrap().to_bytes().len()
    })
}

fn bench_console(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = open(&rt, dir.path());
    let cookie = app.console().sessions().open("bench", Role::Admin, Instant::now()).unwrap();
    let mut group = c.benchmark_group("console_1m");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for (name, path) in [
        ("customer_page", "/console/customers/42"),
        ("services_page", "/console/services"),
        ("overview", "/console/"),
        ("audit_rare_filter", "/console/audit?actor=nobody"),
        ("audit_first_page", "/console/audit"),
    ] {
        let first = Instant::now();
        let bytes = get(&rt, &app, path, &cookie);
        eprintln!("{name}: {bytes} bytes, first request {:.1} ms", first.elapsed().as_secs_f64() * 1e3);
        group.bench_function(name, |b| b.iter(|| get(&rt, &app, path, &cookie)));
    }
    group.finish();
    rt.block_on(app.close());
}

criterion_group!(benches, bench_console);
criterion_main!(benches);
