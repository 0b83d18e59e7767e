//! The check path through the real HTTP handler, without a socket: what
//! counting (metrics) and per-request logging add to a request.
//!
//! A sidecar is opened on a temporary data dir with three services and
//! 50,000 customers opted out of `rating`/`email` (5% of ids 0..1,000,000).
//! Each iteration builds a request and drives `prefsd::http::handle` to
//! completion by polling it with a no-op waker: the check routes never wait,
//! so the first poll finishes them.
//!
//! - `get`: `GET /v1/check?customer=…&service=rating&channel=email`, one
//!   check per request — the route where per-request overhead shows most;
//! - `batch_1000`: `POST /v1/check` with 1,000 checks over two pairs;
//! - `filter_roaring_100k`: `POST /v1/filter` with a 100,000-id roaring body;
//! - `get_logged`: `get` with the per-request log line enabled (JSON, written
//!   to a sink), to show what logging costs when it is on.
//!
//! All but `get_logged` run under a subscriber filtering at `warn`, as a
//! sidecar started with `PREFSD_LOG=warn` does: the per-request line is
//! filtered out.
//!
//! The `counting` group isolates what a check request pays for metrics and
//! logs, in nanoseconds, next to what a labelled `Family` lookup per request
//! (the way counting worked before) costs:
//!
//! - `request_and_check`: `Metrics::count_request` and `count_checks`, the
//!   two calls a `GET /v1/check` makes;
//! - `family_lookup`: `Family::get_or_create(&labels).inc()` with a
//!   (route, status) label set;
//! - `log_filtered`: the per-request `tracing::info!` with the level
//!   filtered out.
//!
//! Compare medians across builds (`cargo bench --bench http_check`).

use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{Empty, Full};
use hyper::Request;
use prefsd::app::App;
use prefsd::config::Config;
use prefsd::domain::{CustomerId, Origin, Scope, ServiceSlug, Status};
use prefsd::http::{Listener, Route, handle};
use prefsd::metrics::Metrics;
use prefsd::writer::Op;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use roaring::RoaringBitmap;

/// Ids range over 0..UNIVERSE.
const UNIVERSE: u64 = 1_000_000;
/// Opted out of rating/email.
const OPTED_OUT: u64 = 50_000;
/// Pre-generated probe ids; a power of two so cycling is a mask.
const PROBES: usize = 1 << 12;

/// Drives a future that never waits; panics if it does.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the check path waited"),
    }
}

/// The label set of the old per-request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: &'static str,
    status: u16,
}

/// splitmix64: fixed-seed benchmark data.
fn rng(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn open(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> App {
    let app = App::open(Config::for_data_dir(dir.join("data"))).expect("open a sidecar");
    let origin =
        Origin { source: "import".into(), actor: "bench".into(), client_addr: None, user_agent: None };
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
        let scope = Scope::parse("rating", "email").unwrap();
        let mut state = 7u64;
        let mut seen = RoaringBitmap::new();
        while seen.len() < OPTED_OUT {
            let mut ops = Vec::new();
            while seen.len() < OPTED_OUT && ops.len() < 10_000 {
                let id = rng(&mut state) % UNIVERSE;
                if seen.insert(id as u32) {
                    ops.push(Op::SetPreference {
                        customer: CustomerId(id),
                        scope: scope.clone(),
                        status: Status::OptedOut,
                        reason: None,
                        origin: origin.clone(),
                    });
                }
            }
            for r in app.writer().write_many(ops).await {
                r.expect("write an opt-out");
            }
        }
    });
    app
}

fn bench_http(c: &mut Criterion) {
    // The process-wide subscriber, as `prefsd serve` installs one, filtering
    // at warn: callsites below it are disabled once and stay so.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::sink)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = open(&rt, dir.path());
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let mut state = 11u64;
    let probes: Vec<u64> = (0..PROBES).map(|_| rng(&mut state) % UNIVERSE).collect();
    let uris: Vec<String> =
        probes.iter().map(|p| format!("/v1/check?customer={p}&service=rating&channel=email")).collect();

    // The handler answers as the index does.
    for (p, uri) in probes.iter().zip(&uris).take(64) {
        let req = Request::get(uri.as_str()).body(Empty::<Bytes>::new()).unwrap();
        let reply = now(handle(&app, req, peer, Listener::Api));
        assert_eq!(reply.status(), 200);
        let expect = !app.index().pair("rating", "email").unwrap().contains(*p);
        let body = now(http_body_util::BodyExt::collect(reply.into_body())).unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["allowed"], expect);
    }

    let batch: Bytes = {
        let checks: Vec<serde_json::Value> = probes[..1000]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let channel = if i < 500 { "email" } else { "sms" };
                serde_json::json!({"customer": p, "service": "rating", "channel": channel})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({ "checks": checks })).unwrap().into()
    };
    let roaring: Bytes = {
        let mut ids = RoaringBitmap::new();
        let mut s = 13u64;
        while ids.len() < 100_000 {
            ids.insert((rng(&mut s) % UNIVERSE) as u32);
        }
        let mut out = Vec::new();
        ids.serialize_into(&mut out).unwrap();
        out.into()
    };

    let mut group = c.benchmark_group("http_check");
    group.warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(5));

    group.bench_function("get", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let uri = uris[i & (PROBES - 1)].as_str();
            i = i.wrapping_add(1);
            let req = Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
            black_box(now(handle(&app, req, peer, Listener::Api)))
        })
    });

    group.bench_function("batch_1000", |b| {
        b.iter(|| {
            let req = Request::post("/v1/check").body(Full::new(batch.clone())).unwrap();
            let reply = now(handle(&app, req, peer, Listener::Api));
            debug_assert_eq!(reply.status(), 200);
            black_box(reply)
        })
    });

    group.bench_function("filter_roaring_100k", |b| {
        b.iter(|| {
            let req = Request::post("/v1/filter?service=rating&channel=email")
                .header("content-type", "application/vnd.roaring")
                .body(Full::new(roaring.clone()))
                .unwrap();
            let reply = now(handle(&app, req, peer, Listener::Api));
            debug_assert_eq!(reply.status(), 200);
            black_box(reply)
        })
    });

    group.finish();
    counting(c);

    // Last, because a second subscriber makes every callsite ask again.
    let logged = tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::sink)
        .finish();
    let mut group = c.benchmark_group("http_check");
    group.warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(5));
    tracing::subscriber::with_default(logged, || {
        group.bench_function("get_logged", |b| {
            let mut i = 0usize;
            b.iter(|| {
                let uri = uris[i & (PROBES - 1)].as_str();
                i = i.wrapping_add(1);
                let req = Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
                black_box(now(handle(&app, req, peer, Listener::Api)))
            })
        });
    });

    group.finish();
    rt.block_on(app.close());
}

/// What one check request pays for counting and for its filtered-out log
/// line, beside the per-request `Family` lookup counting used to cost.
fn counting(c: &mut Criterion) {
    let mut group = c.benchmark_group("counting");
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let metrics = Metrics::new();
    let took = Duration::from_micros(3);
    group.bench_function("request_and_check", |b| {
        b.iter(|| {
            metrics.count_request(black_box(Route::Check), black_box(200), black_box(took));
            metrics.count_checks(black_box(0), 1, 0);
        })
    });
    let family = Family::<RouteStatus, Counter>::default();
    group.bench_function("family_lookup", |b| {
        b.iter(|| {
            family.get_or_create(&RouteStatus { route: black_box("/v1/check"), status: black_box(200) }).inc()
        })
    });
    group.bench_function("log_filtered", |b| {
        b.iter(|| {
            tracing::info!(
                target: "prefsd::request",
                method = black_box("GET"),
                route = black_box("/v1/check"),
                status = black_box(200u16),
                latency_us = black_box(3u64),
                request_id = black_box("0123456789abcdef"),
                "request"
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench_http);
criterion_main!(benches);
