//! prefsd against Redis and PostgreSQL, side by side, in one run.
//!
//! `cargo bench --bench compare` (full) or `cargo bench --bench compare --
//! --quick` (under a minute). The harness starts its own prefsd in-process on
//! `127.0.0.1:0` with a temporary data dir, loads the same opt-outs into
//! prefsd, Redis (`PREFSD_BENCH_REDIS`, default `redis://127.0.0.1:6379`) and
//! PostgreSQL (`PREFSD_BENCH_PG`, default
//! `postgresql://postgres@127.0.0.1:5432/test`), and drives each with the same
//! client design: one task per connection, each connection owned by one task
//! and used for one request at a time (a handle plus a spawned connection
//! driver: hyper's low-level `client::conn::http1`, a `redis`
//! `MultiplexedConnection`, a `tokio-postgres` client), 32 connections (64 for
//! writes), a fixed duration per run, three runs, medians quoted.
//!
//! Data (fixed-seed splitmix64, no `rand`): 1,000,000 opted-out ids out of
//! 0..20,000,000 for `rating`/`email`, plus opt-outs spread over 10 services
//! × 2 channels. Redis holds them as sets `prefsd:optout:{service}:{channel}`;
//! PostgreSQL as `prefsd_bench_optouts(service, channel, customer)` with that
//! primary key. Both are deleted afterwards. An unreachable peer prints
//! `SKIP <peer>` and the others carry on.
//!
//! prefsd is loaded through `POST /v1/preferences/import`, which takes minutes
//! for millions of rows, so the loaded data dir is cached under
//! `target/tmp/compare-cache/` (`PREFSD_BENCH_CACHE=0` turns that off) and
//! every run serves a private copy; `--quick` stays under a minute once the
//! cache exists. Start-up and memory are measured in a child process (this
//! binary re-executed with `PREFSD_COMPARE_OPEN=DIR`). `PREFSD_BENCH_ONLY=
//! single,batch,filter,writes,startup,cluster` runs a subset, for profiling;
//! `PREFSD_BENCH_ONLY=cluster` alone loads no bench data set and no peer.
//!
//! Cluster mode (`cluster`): a fresh database `prefsd_bench_cluster_<pid>` on
//! the PostgreSQL of `PREFSD_BENCH_PG` (leftovers of dead runs dropped first,
//! this one dropped afterwards), two sidecars started in-process like the
//! bench sidecar, each with an empty data dir and `postgres` set to that
//! database. Measured: the durable-write workload (64 writers) against
//! sidecar A, then split 32 + 32 over A and B, against the same PostgreSQL
//! upsert peer as `writes` (reused when `writes` measured it in this run);
//! and the time from an opt-out being acknowledged by A until `GET
//! /v1/check` on B answers `allowed=false` (B polled without pause, 5 s
//! deadline per write, a timeout is an error), then the same from B to A.
//!
//! Every comparison prints one line `compare <name>: prefsd=<v> <unit>
//! <peer>=<v> <unit> ratio=<x>`, ratio > 1 meaning prefsd is better (for
//! throughput prefsd/peer, for latencies peer/prefsd), then a summary table,
//! memory, start-up, and the DESIGN targets met or missed. See
//! `benches/README.md`.

mod common;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{CHANNELS, SplitMix64, UNIVERSE};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use prefsd::app::App;
use prefsd::config::Config;
use roaring::RoaringBitmap;
use serde::Deserialize;
use tokio::net::TcpStream;

/// Opted-out ids of the measured pair (5% density).
const MAIN_OUT: usize = 1_000_000;
/// The measured pair.
const MAIN_SERVICE: &str = "rating";
/// The measured pair's channel.
const MAIN_CHANNEL: &str = "email";
/// Services the other opt-outs are spread over, each on both channels.
const SPREAD_SERVICES: usize = 10;
/// Opt-outs in each of those pairs.
const SPREAD_PER_PAIR: usize = 100_000;
/// Connections (and client tasks) of the throughput workloads.
const CONNS: usize = 32;
/// Concurrent writers of the durable-write workload.
const WRITERS: usize = 64;
/// Checks per batch request.
const BATCH: usize = 1_000;
/// Recipients of one filter.
const FILTER_N: usize = 1_000_000;
/// Items per import request (the API's limit).
const IMPORT_CHUNK: usize = 10_000;
/// Import requests in flight.
const IMPORT_IN_FLIGHT: usize = 4;
/// Every Redis key this harness creates starts with this.
const REDIS_PREFIX: &str = "prefsd:optout:";
/// The temporary recipient set of the SADD + SDIFF filter.
const REDIS_TMP: &str = "prefsd:optout:_bench_tmp_recipients";
/// Opt-outs of the start-up data set, over 20 pairs.
const STARTUP_TOTAL: usize = 10_000_000;
/// Set in the environment of the child that times `App::open`.
const CHILD_ENV: &str = "PREFSD_COMPARE_OPEN";
/// The cluster workload's database is this plus the harness's process id.
const CLUSTER_DB_PREFIX: &str = "prefsd_bench_cluster_";
/// Opt-outs timed from one sidecar to the other, per direction (full run).
const PROPAGATION_N: usize = 300;
/// The same in `--quick`.
const PROPAGATION_N_QUICK: usize = 100;
/// How long one opt-out may take to become visible on the other sidecar.
const PROPAGATION_DEADLINE: Duration = Duration::from_secs(5);
/// How long sidecars may take to become ready, or to apply a backlog.
const CLUSTER_WAIT: Duration = Duration::from_secs(60);
/// Workloads that need the bench data set (and the loaded peers).
const DATA_WORKLOADS: [&str; 5] = ["single", "batch", "filter", "writes", "startup"];

// ---------------------------------------------------------------------------
// Options, data

struct Opts {
    quick: bool,
    run: Duration,
    warmup: Duration,
    runs: usize,
    filter_runs: usize,
    /// `PREFSD_BENCH_ONLY=single,batch,filter,writes,startup,cluster`: a subset, for profiling.
    only: Option<Vec<String>>,
}

fn only() -> Option<Vec<String>> {
    std::env::var("PREFSD_BENCH_ONLY").ok().map(|v| v.split(',').map(|w| w.trim().to_string()).collect())
}

impl Opts {
    fn wants(&self, workload: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|w| w == workload))
    }

    fn parse() -> Opts {
        let quick = std::env::args().skip(1).any(|a| a == "--quick");
        if quick {
            Opts {
                quick,
                run: Duration::from_secs(1),
                warmup: Duration::from_millis(100),
                runs: 3,
                filter_runs: 3,
                only: only(),
            }
        } else {
            Opts {
                quick,
                run: Duration::from_secs(5),
                warmup: Duration::from_secs(1),
                runs: 3,
                filter_runs: 5,
                only: only(),
            }
        }
    }
}

/// `n` distinct ids in 0..UNIVERSE, sorted, and their bitset.
fn distinct(seed: u64, n: usize) -> (Vec<u64>, Vec<u64>) {
    let mut bits = vec![0u64; (UNIVERSE as usize).div_ceil(64)];
    let mut rng = SplitMix64(seed);
    let mut count = 0;
    while count < n {
        let id = rng.scaled(UNIVERSE);
        let (w, b) = ((id / 64) as usize, id % 64);
        if bits[w] & (1 << b) == 0 {
            bits[w] |= 1 << b;
            count += 1;
        }
    }
    let mut ids = Vec::with_capacity(n);
    for (w, &word) in bits.iter().enumerate() {
        let mut x = word;
        while x != 0 {
            ids.push(w as u64 * 64 + u64::from(x.trailing_zeros()));
            x &= x - 1;
        }
    }
    (ids, bits)
}

fn has(bits: &[u64], id: u64) -> bool {
    bits[(id / 64) as usize] & (1 << (id % 64)) != 0
}

/// One (service, channel) pair's opted-out ids.
struct Pair {
    service: String,
    channel: &'static str,
    ids: Vec<u64>,
}

/// What every store is loaded with, and the filter's recipients.
struct Data {
    /// `pairs[0]` is the measured pair.
    pairs: Arc<Vec<Pair>>,
    main_bits: Vec<u64>,
    /// 1,000,000 distinct ids, in random order.
    recipients: Vec<u64>,
    /// How many recipients are not opted out of the measured pair.
    expected_allowed: usize,
}

impl Data {
    fn generate() -> Data {
        let (main, main_bits) = distinct(1, MAIN_OUT);
        let mut pairs = vec![Pair { service: MAIN_SERVICE.into(), channel: MAIN_CHANNEL, ids: main }];
        pairs.extend(spread_pairs(SPREAD_SERVICES, SPREAD_PER_PAIR, 1_000));
        let (mut recipients, _) = distinct(2, FILTER_N);
        let mut rng = SplitMix64(3);
        for i in (1..recipients.len()).rev() {
            let j = rng.scaled(i as u64 + 1) as usize;
            recipients.swap(i, j);
        }
        let expected_allowed = recipients.iter().filter(|&&id| !has(&main_bits, id)).count();
        Data { pairs: Arc::new(pairs), main_bits, recipients, expected_allowed }
    }

    fn rows(&self) -> usize {
        self.pairs.iter().map(|p| p.ids.len()).sum()
    }
}

/// `services` × both channels, `per_pair` ids each, seeds from `seed`.
fn spread_pairs(services: usize, per_pair: usize, seed: u64) -> Vec<Pair> {
    let mut pairs = Vec::new();
    for s in 0..services {
        for (c, channel) in CHANNELS.iter().enumerate() {
            let (ids, _) = distinct(seed + (s * CHANNELS.len() + c) as u64, per_pair);
            pairs.push(Pair { service: format!("svc{s}"), channel, ids });
        }
    }
    pairs
}

// ---------------------------------------------------------------------------
// Small helpers

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn list(v: &[f64], decimals: usize) -> String {
    v.iter().map(|x| format!("{x:.decimals$}")).collect::<Vec<_>>().join(", ")
}

/// A `/proc/self/status` field in kB.
fn proc_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l[field.len()..].trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok()
            })
        })
        .unwrap_or(0)
}

/// The 1-, 5- and 15-minute load averages: other work on the machine skews every figure.
fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string()))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("nproc={cpus} cpu=\"{model}\" mem={mem:.1} GiB kernel={}", kernel.trim())
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------
// prefsd in-process

struct Sidecar {
    addr: SocketAddr,
    app: Option<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sidecar {
    /// Opens `data` and serves it on 127.0.0.1:0 from its own two-worker
    /// runtime, as the tests do. Returns the time `App::open` took.
    fn start(data: &Path) -> Result<(Sidecar, Duration), String> {
        Sidecar::start_with(Config::for_data_dir(data.to_owned()))
    }

    /// [`Sidecar::start`] with a configuration of its own (cluster mode).
    fn start_with(config: Config) -> Result<(Sidecar, Duration), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("prefsd-server")
                .enable_all()
                .build();
            let rt = match rt {
                Ok(rt) => rt,
                Err(e) => return drop(tx.send(Err(e.to_string()))),
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(config.listen).await {
                    Ok(l) => l,
                    Err(e) => return drop(tx.send(Err(e.to_string()))),
                };
                let addr = listener.local_addr().expect("local addr");
                let started = Instant::now();
                let app = match App::open(config) {
                    Ok(app) => app,
                    Err(e) => return drop(tx.send(Err(e))),
                };
                let _ = tx.send(Ok((addr, app.clone(), started.elapsed())));
                prefsd::server::run(listener, None, app, async {
                    let _ = stop_rx.await;
                })
                .await;
            });
        });
        let (addr, app, took) = rx
            .recv_timeout(Duration::from_secs(600))
            .map_err(|e| format!("sidecar did not start: {e}"))??;
        Ok((Sidecar { addr, app: Some(app), stop: Some(stop_tx), thread: Some(thread) }, took))
    }

    fn app(&self) -> &App {
        self.app.as_ref().expect("running")
    }

    /// Graceful stop: drain, final snapshot, store closed. Returns how long.
    fn stop(mut self) -> Duration {
        let started = Instant::now();
        self.app = None;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        started.elapsed()
    }
}

/// One keep-alive HTTP/1.1 connection, one request at a time.
struct Http {
    tx: http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Http {
    async fn connect(addr: SocketAddr) -> Result<Http, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (tx, conn) =
            http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http { tx, host: addr.to_string() })
    }

    async fn connect_many(addr: SocketAddr, n: usize) -> Result<Vec<Http>, String> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(Http::connect(addr).await?);
        }
        Ok(v)
    }

    /// Sends one request and reads the whole answer; anything but 200 is an error.
    async fn send(
        &mut self,
        method: Method,
        uri: &str,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> Result<Bytes, String> {
        let (status, body) = self.request(method, uri, content_type, body).await?;
        if status != StatusCode::OK && status != StatusCode::CREATED {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(format!("{uri}: HTTP {status}: {text}"));
        }
        Ok(body)
    }

    /// Sends one request and reads the whole answer, whatever its status.
    async fn request(
        &mut self,
        method: Method,
        uri: &str,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), String> {
        self.tx.ready().await.map_err(|e| format!("prefsd connection: {e}"))?;
        let mut req = Request::builder().method(method).uri(uri).header(header::HOST, &self.host);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = self.tx.send_request(req).await.map_err(|e| format!("prefsd request: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| format!("prefsd body: {e}"))?.to_bytes();
        Ok((status, body))
    }
}

/// A plain hyper HTTP/1 server answering `GET /v1/check?customer=N…` from a
/// `HashSet`, on its own two-worker runtime like the sidecar: the floor of
/// hyper plus this client on this machine (DESIGN's "plain hyper" column).
struct Floor {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Floor {
    fn start(ids: &[u64]) -> Result<Floor, String> {
        let set: Arc<HashSet<u64>> = Arc::new(ids.iter().copied().collect());
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("floor-server")
                .enable_all()
                .build();
            let Ok(rt) = rt else { return };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else { return };
                let Ok(addr) = listener.local_addr() else { return };
                let _ = tx.send(addr);
                loop {
                    let stream = tokio::select! {
                        r = listener.accept() => match r {
                            Ok((stream, _)) => stream,
                            Err(_) => continue,
                        },
                        _ = &mut stop_rx => break,
                    };
                    let _ = stream.set_nodelay(true);
                    let set = set.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let id = req
                                .uri()
                                .query()
                                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("customer=")))
                                .and_then(|v| v.parse::<u64>().ok());
                            let reply = match id {
                                Some(id) => {
                                    let body = format!(
                                        r#"{{"customer":{id},"service":"{MAIN_SERVICE}","channel":"{MAIN_CHANNEL}","allowed":{}}}"#,
                                        !set.contains(&id)
                                    );
                                    hyper::Response::builder()
                                        .header(header::CONTENT_TYPE, "application/json")
                                        .body(Full::new(Bytes::from(body)))
                                }
                                None => hyper::Response::builder()
                                    .status(StatusCode::BAD_REQUEST)
                                    .body(Full::new(Bytes::new())),
                            };
                            std::future::ready(reply)
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).map_err(|e| format!("floor server: {e}"))?;
        Ok(Floor { addr, stop: Some(stop_tx), thread: Some(thread) })
    }

    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Group-commit figures from prefsd's `/metrics`: (commit seconds sum,
/// commits, writes committed).
async fn commit_stats(addr: SocketAddr) -> Result<(f64, f64, f64), String> {
    let mut http = Http::connect(addr).await?;
    let text = http.send(Method::GET, "/metrics", None, Bytes::new()).await?;
    let text = String::from_utf8_lossy(&text);
    let value = |suffix: &str| -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, v) = l.split_once(' ')?;
                name.ends_with(suffix).then(|| v.trim().parse::<f64>().ok()).flatten()
            })
            .unwrap_or(f64::NAN)
    };
    Ok((value("commit_seconds_sum"), value("commit_seconds_count"), value("commit_batch_size_sum")))
}

#[derive(Deserialize)]
struct ImportAnswer {
    accepted: usize,
    rejected: usize,
}

/// Registers every service of `pairs` and imports every id as `opted_out`,
/// `IMPORT_CHUNK` items per request, `IMPORT_IN_FLIGHT` requests in flight.
async fn prefsd_load(addr: SocketAddr, pairs: Arc<Vec<Pair>>, progress: bool) -> Result<(), String> {
    let mut http = Http::connect(addr).await?;
    let mut services: Vec<&str> = Vec::new();
    for p in pairs.iter() {
        if !services.contains(&p.service.as_str()) {
            services.push(&p.service);
        }
    }
    for s in services {
        let body = format!(r#"{{"slug":"{s}","name":"{s}"}}"#);
        http.send(Method::POST, "/v1/services", Some("application/json"), body.into()).await?;
    }
    let chunks: Vec<(usize, usize)> = pairs
        .iter()
        .enumerate()
        .flat_map(|(p, pair)| (0..pair.ids.len()).step_by(IMPORT_CHUNK).map(move |start| (p, start)))
        .collect();
    let chunks = Arc::new(chunks);
    let total = chunks.len();
    let mut tasks = Vec::new();
    for k in 0..IMPORT_IN_FLIGHT {
        let (pairs, chunks) = (pairs.clone(), chunks.clone());
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(addr).await?;
            let mut body = String::new();
            for (n, &(p, start)) in chunks.iter().enumerate().skip(k).step_by(IMPORT_IN_FLIGHT) {
                let pair = &pairs[p];
                let ids = &pair.ids[start..(start + IMPORT_CHUNK).min(pair.ids.len())];
                body.clear();
                body.push_str(r#"{"items":["#);
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    let _ = write!(
                        body,
                        r#"{{"customer":{id},"service":"{}","channel":"{}","status":"opted_out"}}"#,
                        pair.service, pair.channel
                    );
                }
                body.push_str("]}");
                let answer = http
                    .send(
                        Method::POST,
                        "/v1/preferences/import",
                        Some("application/json"),
                        body.clone().into(),
                    )
                    .await?;
                let answer: ImportAnswer = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
                if answer.rejected != 0 || answer.accepted != ids.len() {
                    return Err(format!(
                        "import: {} accepted, {} rejected",
                        answer.accepted, answer.rejected
                    ));
                }
                if progress && k == 0 && n % (IMPORT_IN_FLIGHT * 100) == 0 {
                    eprintln!("  … import {n}/{total} requests");
                }
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Where prefsd data dirs loaded through the API are kept between runs
/// (`PREFSD_BENCH_CACHE=0` turns it off): importing millions of rows takes
/// minutes, and `--quick` must finish in under one.
fn cache_root() -> Option<PathBuf> {
    if std::env::var("PREFSD_BENCH_CACHE").is_ok_and(|v| v == "0") {
        return None;
    }
    Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("compare-cache"))
}

/// A stopped prefsd data dir holding `pairs`, imported through the API:
/// the cached one if an earlier run left it complete, else imported now
/// (into the cache, or under `scratch` without one). Answers the data dir
/// and how it came to be.
async fn loaded_dir(
    name: &str,
    pairs: &Arc<Vec<Pair>>,
    scratch: &Path,
    progress: bool,
) -> Result<(PathBuf, String), String> {
    let rows: usize = pairs.iter().map(|p| p.ids.len()).sum();
    let dir = cache_root().map_or_else(|| scratch.join(name), |root| root.join(name));
    let marker = dir.join("complete");
    if let Ok(text) = std::fs::read_to_string(&marker) {
        return Ok((dir.join("data"), format!("reused from the cache {} — {}", dir.display(), text.trim())));
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let data = dir.join("data");
    let (sidecar, _) = tokio::task::spawn_blocking({
        let d = data.clone();
        move || Sidecar::start(&d)
    })
    .await
    .map_err(|e| e.to_string())??;
    let started = Instant::now();
    let loaded = prefsd_load(sidecar.addr, pairs.clone(), progress).await;
    let took = started.elapsed().as_secs_f64();
    tokio::task::spawn_blocking(move || sidecar.stop()).await.map_err(|e| e.to_string())?;
    loaded?;
    let note = format!(
        "{rows} rows imported via POST /v1/preferences/import ({IMPORT_CHUNK} per request, {IMPORT_IN_FLIGHT} \
         in flight) in {took:.1} s = {:.0} rows/s",
        rows as f64 / took
    );
    if cache_root().is_some() {
        std::fs::write(&marker, &note).map_err(|e| e.to_string())?;
    }
    Ok((data, format!("imported now: {note}")))
}

/// Forgets a cached data dir (its format no longer opens, or its content differs).
fn invalidate(name: &str) {
    if let Some(root) = cache_root() {
        let _ = std::fs::remove_dir_all(root.join(name));
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
            // Flushed now, so App::open does not wait for the copy's writeback.
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    Ok(())
}

/// Starts a sidecar on a private copy of the bench data set and checks
/// every pair holds what was generated. Answers the sidecar, the App::open
/// time and how the data came to be.
async fn bench_sidecar(data: &Data, scratch: &Path) -> Result<(Sidecar, Duration, String), String> {
    let name = format!("bench-{MAIN_OUT}-{SPREAD_SERVICES}x{}x{SPREAD_PER_PAIR}-v1", CHANNELS.len());
    for attempt in 0..2 {
        let (dir, how) = loaded_dir(&name, &data.pairs, scratch, false).await?;
        let run_dir = scratch.join("data");
        let _ = std::fs::remove_dir_all(&run_dir);
        if cache_root().is_some() {
            let (from, to) = (dir.clone(), run_dir.clone());
            tokio::task::spawn_blocking(move || copy_dir(&from, &to))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("copy {}: {e}", dir.display()))?;
        } else {
            std::fs::rename(&dir, &run_dir).map_err(|e| e.to_string())?;
        }
        let started = tokio::task::spawn_blocking({
            let d = run_dir.clone();
            move || Sidecar::start(&d)
        })
        .await
        .map_err(|e| e.to_string())?;
        let wrong = match &started {
            Err(e) => Some(e.clone()),
            Ok((sidecar, _)) => {
                let index = sidecar.app().index();
                data.pairs.iter().find_map(|p| match index.pair(&p.service, p.channel) {
                    Ok(set) if set.len() == p.ids.len() as u64 => None,
                    Ok(set) => Some(format!(
                        "{}/{} holds {} ids, not {}",
                        p.service,
                        p.channel,
                        set.len(),
                        p.ids.len()
                    )),
                    Err(_) => Some(format!("{}/{} is unknown", p.service, p.channel)),
                })
            }
        };
        match (started, wrong) {
            (Ok((sidecar, took)), None) => return Ok((sidecar, took, how)),
            (started, Some(why)) if attempt == 0 && cache_root().is_some() => {
                println!("load prefsd: the cached data dir is unusable ({why}); importing again");
                if let Ok((sidecar, _)) = started {
                    tokio::task::spawn_blocking(move || sidecar.stop()).await.map_err(|e| e.to_string())?;
                }
                invalidate(&name);
            }
            (_, Some(why)) => return Err(why),
            (Err(e), None) => return Err(e),
        }
    }
    Err("the bench data set could not be loaded".into())
}

// ---------------------------------------------------------------------------
// Redis and PostgreSQL connections

async fn redis_conn(url: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(None);
    client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| e.to_string())
}

async fn redis_conns(url: &str, n: usize) -> Result<Vec<redis::aio::MultiplexedConnection>, String> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(redis_conn(url).await?);
    }
    Ok(v)
}

fn redis_key(service: &str, channel: &str) -> String {
    format!("{REDIS_PREFIX}{service}:{channel}")
}

/// Deletes every key under the harness's prefix.
async fn redis_cleanup(conn: &mut redis::aio::MultiplexedConnection) -> Result<usize, String> {
    let mut cursor = 0u64;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{REDIS_PREFIX}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        if !keys.is_empty() {
            deleted += keys.len();
            redis::cmd("UNLINK").arg(&keys).query_async::<()>(conn).await.map_err(|e| e.to_string())?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

async fn redis_load(conn: &mut redis::aio::MultiplexedConnection, data: &Data) -> Result<(), String> {
    for pair in data.pairs.iter() {
        let key = redis_key(&pair.service, pair.channel);
        for group in pair.ids.chunks(200_000) {
            let mut pipe = redis::pipe();
            for chunk in group.chunks(10_000) {
                pipe.cmd("SADD").arg(&key).arg(chunk).ignore();
            }
            pipe.query_async::<()>(conn).await.map_err(|e| e.to_string())?;
        }
        let n: usize = redis::cmd("SCARD").arg(&key).query_async(conn).await.map_err(|e| e.to_string())?;
        if n != pair.ids.len() {
            return Err(format!("{key}: SCARD {n}, expected {}", pair.ids.len()));
        }
    }
    Ok(())
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, tokio_postgres::NoTls))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(pg_err)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A PostgreSQL error with the server's message, which `Display` leaves out.
fn pg_err(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

async fn pg_load(client: &tokio_postgres::Client, data: &Data) -> Result<(), String> {
    let e = pg_err;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS prefsd_bench_optouts; \
             CREATE TABLE prefsd_bench_optouts (service text NOT NULL, channel text NOT NULL, customer bigint NOT NULL)",
        )
        .await
        .map_err(e)?;
    let insert = client
        .prepare(
            "INSERT INTO prefsd_bench_optouts (service, channel, customer) SELECT $1::text, $2::text, unnest($3::bigint[])",
        )
        .await
        .map_err(e)?;
    for pair in data.pairs.iter() {
        for chunk in pair.ids.chunks(100_000) {
            let ids: Vec<i64> = chunk.iter().map(|&id| id as i64).collect();
            client.execute(&insert, &[&pair.service, &pair.channel, &ids]).await.map_err(e)?;
        }
    }
    client
        .batch_execute("ALTER TABLE prefsd_bench_optouts ADD PRIMARY KEY (service, channel, customer)")
        .await
        .map_err(e)?;
    // VACUUM refuses to run inside the implicit transaction of a multi-statement query.
    client.batch_execute("VACUUM ANALYZE prefsd_bench_optouts").await.map_err(e)?;
    Ok(())
}

async fn pg_cleanup(client: &tokio_postgres::Client) -> Result<(), String> {
    client
        .batch_execute("DROP TABLE IF EXISTS prefsd_bench_optouts; DROP TABLE IF EXISTS prefsd_bench_prefs")
        .await
        .map_err(pg_err)
}

// ---------------------------------------------------------------------------
// The closed-loop driver: every worker owns one connection and sends its next
// request when the previous answer is in, until the deadline.

/// One request of a workload.
trait Op: Send + 'static {
    /// Sends one request; answers (ids answered, ids opted out among them).
    fn once(&mut self, rng: &mut SplitMix64) -> impl Future<Output = Result<(u64, u64), String>> + Send;
}

/// Runs every worker for `dur`; returns them with units per second and the
/// fraction of answered ids that were opted out.
async fn closed_loop<W: Op>(workers: Vec<W>, dur: Duration, seed: u64) -> Result<(Vec<W>, f64, f64), String> {
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(i, mut w)| {
            tokio::spawn(async move {
                let mut rng = SplitMix64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (i as u64 + 1));
                let (mut units, mut hits) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let (u, h) = w.once(&mut rng).await?;
                    units += u;
                    hits += h;
                }
                Ok::<_, String>((w, units, hits))
            })
        })
        .collect();
    let mut back = Vec::new();
    let (mut units, mut hits) = (0u64, 0u64);
    let mut error = None;
    for t in tasks {
        match t.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((w, u, h)) => {
                back.push(w);
                units += u;
                hits += h;
            }
            Err(e) => error = Some(e),
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((back, units as f64 / secs, hits as f64 / units.max(1) as f64))
}

/// Warm-up, then `opts.runs` runs; prints them; answers the median rate.
async fn measure<W: Op>(
    label: &str,
    unit: &str,
    workers: Vec<W>,
    opts: &Opts,
    seed: u64,
) -> Result<f64, String> {
    let (mut workers, _, _) = closed_loop(workers, opts.warmup, seed).await?;
    let mut rates = Vec::new();
    let mut hit = 0.0;
    for run in 0..opts.runs {
        let (w, rate, h) = closed_loop(workers, opts.run, seed + 1 + run as u64).await?;
        workers = w;
        rates.push(rate);
        hit = h;
    }
    let m = median(rates.clone());
    println!(
        "  {label}: runs [{}] {unit} → median {m:.0} {unit} ({:.2}% opted out)",
        list(&rates, 0),
        hit * 100.0
    );
    Ok(m)
}

// --- single checks

struct HttpSingle(Http);

#[derive(Deserialize)]
struct CheckAnswer {
    allowed: bool,
}

impl Op for HttpSingle {
    async fn once(&mut self, rng: &mut SplitMix64) -> Result<(u64, u64), String> {
        let id = rng.scaled(UNIVERSE);
        let uri = format!("/v1/check?customer={id}&service={MAIN_SERVICE}&channel={MAIN_CHANNEL}");
        let body = self.0.send(Method::GET, &uri, None, Bytes::new()).await?;
        let answer: CheckAnswer = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok((1, u64::from(!answer.allowed)))
    }
}

struct RedisSingle {
    conn: redis::aio::MultiplexedConnection,
    key: Arc<str>,
}

impl Op for RedisSingle {
    async fn once(&mut self, rng: &mut SplitMix64) -> Result<(u64, u64), String> {
        let id = rng.scaled(UNIVERSE);
        let member: bool = redis::cmd("SISMEMBER")
            .arg(&*self.key)
            .arg(id)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| e.to_string())?;
        Ok((1, u64::from(member)))
    }
}

struct PgSingle {
    client: tokio_postgres::Client,
    stmt: tokio_postgres::Statement,
}

impl Op for PgSingle {
    async fn once(&mut self, rng: &mut SplitMix64) -> Result<(u64, u64), String> {
        let id = rng.scaled(UNIVERSE) as i64;
        let row =
            self.client.query_opt(&self.stmt, &[&MAIN_SERVICE, &MAIN_CHANNEL, &id]).await.map_err(pg_err)?;
        Ok((1, u64::from(row.is_some())))
    }
}

// --- batch checks

struct HttpBatch {
    http: Http,
    body: String,
}

#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<bool>,
}

impl Op for HttpBatch {
    async fn once(&mut self, rng: &mut SplitMix64) -> Result<(u64, u64), String> {
        self.body.clear();
        self.body.push_str(r#"{"checks":["#);
        for i in 0..BATCH {
            if i > 0 {
                self.body.push(',');
            }
            let _ = write!(
                self.body,
                r#"{{"customer":{},"service":"{MAIN_SERVICE}","channel":"{MAIN_CHANNEL}"}}"#,
                rng.scaled(UNIVERSE)
            );
        }
        self.body.push_str("]}");
        let body = Bytes::copy_from_slice(self.body.as_bytes());
        let answer = self.http.send(Method::POST, "/v1/check", Some("application/json"), body).await?;
        let answer: BatchAnswer = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
        if answer.results.len() != BATCH {
            return Err(format!("{} results for {BATCH} checks", answer.results.len()));
        }
        Ok((BATCH as u64, answer.results.iter().filter(|&&a| !a).count() as u64))
    }
}

struct RedisBatch {
    conn: redis::aio::MultiplexedConnection,
    key: Arc<str>,
    ids: Vec<u64>,
}

impl Op for RedisBatch {
    async fn once(&mut self, rng: &mut SplitMix64) -> Result<(u64, u64), String> {
        self.ids.clear();
        self.ids.extend((0..BATCH).map(|_| rng.scaled(UNIVERSE)));
        let members: Vec<bool> = redis::cmd("SMISMEMBER")
            .arg(&*self.key)
            .arg(&self.ids)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| e.to_string())?;
        if members.len() != BATCH {
            return Err(format!("{} answers for {BATCH} members", members.len()));
        }
        Ok((BATCH as u64, members.iter().filter(|&&m| m).count() as u64))
    }
}

struct PgBatch {
    client: tokio_postgres::Client,
    stmt: tokio_postgres::Statement,
    ids: Vec<i64>,
}

impl Op for PgBatch {
    async fn once(&mut self, rng: &mut SplitMix64) -> Result<(u64, u64), String> {
        self.ids.clear();
        self.ids.extend((0..BATCH).map(|_| rng.scaled(UNIVERSE) as i64));
        let rows = self
            .client
            .query(&self.stmt, &[&MAIN_SERVICE, &MAIN_CHANNEL, &self.ids])
            .await
            .map_err(pg_err)?;
        Ok((BATCH as u64, rows.len() as u64))
    }
}

// --- durable writes

struct HttpWrite(Http);

impl Op for HttpWrite {
    async fn once(&mut self, rng: &mut SplitMix64) -> Result<(u64, u64), String> {
        let id = rng.scaled(UNIVERSE);
        let out = rng.next() & 1 == 0;
        let uri = format!("/v1/customers/{id}/preferences/{MAIN_SERVICE}/sms");
        let body: &'static str = if out { r#"{"status":"opted_out"}"# } else { r#"{"status":"opted_in"}"# };
        self.0.send(Method::PUT, &uri, Some("application/json"), Bytes::from_static(body.as_bytes())).await?;
        Ok((1, u64::from(out)))
    }
}

struct PgWrite {
    client: tokio_postgres::Client,
    stmt: tokio_postgres::Statement,
}

impl Op for PgWrite {
    async fn once(&mut self, rng: &mut SplitMix64) -> Result<(u64, u64), String> {
        let id = rng.scaled(UNIVERSE) as i64;
        let out = rng.next() & 1 == 0;
        let status = if out { "opted_out" } else { "opted_in" };
        self.client.execute(&self.stmt, &[&MAIN_SERVICE, &"sms", &id, &status]).await.map_err(pg_err)?;
        Ok((1, u64::from(out)))
    }
}

// ---------------------------------------------------------------------------
// Filtering: one client, time per filter of 1,000,000 recipients

#[derive(Deserialize)]
struct FilterAnswer {
    allowed: Vec<u64>,
    suppressed: Vec<u64>,
}

/// Times `opts.filter_runs` filters after one warm-up; prints them; answers the median ms.
macro_rules! timed {
    ($label:expr, $opts:expr, $body:expr) => {{
        // One warm-up filter, except in --quick, which has no minute to spare.
        if !$opts.quick {
            $body;
        }
        let mut times = Vec::new();
        for _ in 0..$opts.filter_runs {
            let t = Instant::now();
            $body;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let m = median(times.clone());
        println!("  {}: runs [{}] ms → median {m:.1} ms", $label, list(&times, 1));
        m
    }};
}

async fn prefsd_filter_roaring(http: &mut Http, body: &Bytes, expected: usize) -> Result<(), String> {
    let uri = format!("/v1/filter?service={MAIN_SERVICE}&channel={MAIN_CHANNEL}");
    let answer = http.send(Method::POST, &uri, Some("application/vnd.roaring"), body.clone()).await?;
    let allowed = RoaringBitmap::deserialize_from(&answer[..]).map_err(|e| e.to_string())?;
    if allowed.len() as usize != expected {
        return Err(format!("roaring filter: {} allowed, expected {expected}", allowed.len()));
    }
    Ok(())
}

async fn prefsd_filter_json(http: &mut Http, body: &Bytes, expected: usize) -> Result<(), String> {
    let uri = format!("/v1/filter?service={MAIN_SERVICE}&channel={MAIN_CHANNEL}");
    let answer = http.send(Method::POST, &uri, Some("application/json"), body.clone()).await?;
    let answer: FilterAnswer = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
    if answer.allowed.len() != expected || answer.allowed.len() + answer.suppressed.len() != FILTER_N {
        return Err(format!("json filter: {} allowed, expected {expected}", answer.allowed.len()));
    }
    Ok(())
}

/// SMISMEMBER over prebuilt chunks, connection `j` taking chunks j, j+k, …;
/// the allowed ids come back in input order.
async fn redis_filter_chunks(
    conns: &[redis::aio::MultiplexedConnection],
    cmds: &Arc<Vec<redis::Cmd>>,
    chunks: &Arc<Vec<Vec<u64>>>,
    expected: usize,
) -> Result<(), String> {
    let k = conns.len();
    let tasks: Vec<_> = conns
        .iter()
        .cloned()
        .enumerate()
        .map(|(j, mut conn)| {
            let (cmds, chunks) = (cmds.clone(), chunks.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in (j..cmds.len()).step_by(k) {
                    let members: Vec<bool> =
                        cmds[i].query_async(&mut conn).await.map_err(|e| e.to_string())?;
                    let allowed: Vec<u64> =
                        chunks[i].iter().zip(members).filter(|(_, m)| !m).map(|(id, _)| *id).collect();
                    out.push((i, allowed));
                }
                Ok::<_, String>(out)
            })
        })
        .collect();
    let mut parts = Vec::new();
    for t in tasks {
        parts.extend(t.await.map_err(|e| e.to_string())??);
    }
    parts.sort_by_key(|(i, _)| *i);
    let allowed: Vec<u64> = parts.into_iter().flat_map(|(_, a)| a).collect();
    if allowed.len() != expected {
        return Err(format!("SMISMEMBER filter: {} allowed, expected {expected}", allowed.len()));
    }
    Ok(())
}

async fn redis_filter_sdiff(
    conn: &mut redis::aio::MultiplexedConnection,
    pipe: &redis::Pipeline,
    expected: usize,
) -> Result<(), String> {
    let (allowed,): (Vec<u64>,) = pipe.query_async(conn).await.map_err(|e| e.to_string())?;
    if allowed.len() != expected {
        return Err(format!("SDIFF filter: {} allowed, expected {expected}", allowed.len()));
    }
    Ok(())
}

async fn pg_filter_rows(
    client: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    ids: &Vec<i64>,
    expected: usize,
) -> Result<(), String> {
    let rows = client.query(stmt, &[ids, &MAIN_SERVICE, &MAIN_CHANNEL]).await.map_err(pg_err)?;
    let allowed: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    if allowed.len() != expected {
        return Err(format!("anti-join: {} allowed, expected {expected}", allowed.len()));
    }
    Ok(())
}

async fn pg_filter_array(
    client: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    ids: &Vec<i64>,
    expected: usize,
) -> Result<(), String> {
    let row = client.query_one(stmt, &[ids, &MAIN_SERVICE, &MAIN_CHANNEL]).await.map_err(pg_err)?;
    let allowed: Vec<i64> = row.get::<_, Option<Vec<i64>>>(0).unwrap_or_default();
    if allowed.len() != expected {
        return Err(format!("anti-join array: {} allowed, expected {expected}", allowed.len()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Results

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Redis,
    Postgres,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Redis => "redis",
            Peer::Postgres => "postgres",
        }
    }
}

/// One workload's medians.
struct Row {
    name: &'static str,
    title: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    prefsd: Option<f64>,
    redis: Option<f64>,
    postgres: Option<f64>,
    /// How the peers' figures were obtained.
    how: String,
}

impl Row {
    fn new(name: &'static str, title: &'static str, unit: &'static str, higher_is_better: bool) -> Row {
        Row {
            name,
            title,
            unit,
            higher_is_better,
            prefsd: None,
            redis: None,
            postgres: None,
            how: String::new(),
        }
    }

    fn peer(&self, p: Peer) -> Option<f64> {
        match p {
            Peer::Redis => self.redis,
            Peer::Postgres => self.postgres,
        }
    }

    fn ratio(&self, p: Peer) -> Option<f64> {
        let (ours, theirs) = (self.prefsd?, self.peer(p)?);
        Some(if self.higher_is_better { ours / theirs } else { theirs / ours })
    }

    fn fmt(&self, v: f64) -> String {
        if self.unit == "ms" { format!("{v:.1}") } else { format!("{v:.0}") }
    }

    /// Prints the `compare` line of each peer measured.
    fn print_compare(&self) {
        for p in [Peer::Redis, Peer::Postgres] {
            if let (Some(ours), Some(theirs), Some(r)) = (self.prefsd, self.peer(p), self.ratio(p)) {
                println!(
                    "compare {}_vs_{}: prefsd={} {u} {}={} {u} ratio={r:.2}",
                    self.name,
                    p.name(),
                    self.fmt(ours),
                    p.name(),
                    self.fmt(theirs),
                    u = self.unit
                );
            }
        }
    }
}

fn cell(row: &Row, v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{} {}", row.fmt(v), row.unit))
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("—".into(), |r| format!("{r:.2}×"))
}

// ---------------------------------------------------------------------------
// Start-up, timed in a child process so its peak RSS is prefsd's alone

/// In the child: open the data dir, report, close.
fn child_open(dir: &str) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let rss_before = proc_kb("VmRSS");
        let started = Instant::now();
        let app = match App::open(Config::for_data_dir(dir.into())) {
            Ok(app) => app,
            Err(e) => {
                println!("error {e}");
                return;
            }
        };
        let ready = app.is_ready();
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let (entries, bytes) = {
            let index = app.index();
            (index.entries(), index.heap_bytes())
        };
        println!(
            "open ms={ms:.1} ready={ready} entries={entries} index_bytes={bytes} hwm_kb={} rss_kb={} rss_before_kb={rss_before}",
            proc_kb("VmHWM"),
            proc_kb("VmRSS")
        );
        app.close().await;
    });
}

struct Opened {
    ms: f64,
    entries: u64,
    index_bytes: u64,
    hwm_kb: u64,
    rss_kb: u64,
    rss_before_kb: u64,
}

fn open_in_child(dir: &Path) -> Result<Opened, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .env(CHILD_ENV, dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("open ") || l.starts_with("error ")).unwrap_or("");
    if !line.starts_with("open ") {
        return Err(format!("child: {} {}", out.status, text.trim()));
    }
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    Ok(Opened {
        ms: field("ms"),
        entries: field("entries") as u64,
        index_bytes: field("index_bytes") as u64,
        hwm_kb: field("hwm_kb") as u64,
        rss_kb: field("rss_kb") as u64,
        rss_before_kb: field("rss_before_kb") as u64,
    })
}

/// Three child opens of `dir`; prints each; answers the median run.
fn startup_runs(label: &str, dir: &Path) -> Result<Opened, String> {
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(open_in_child(dir)?);
    }
    let times: Vec<f64> = runs.iter().map(|o| o.ms).collect();
    println!(
        "  {label}: App::open until ready, fresh process, 3 runs [{}] ms (page cache warm)",
        list(&times, 1)
    );
    runs.sort_by(|a, b| a.ms.total_cmp(&b.ms));
    Ok(runs.swap_remove(1))
}

fn print_opened(label: &str, o: &Opened) {
    println!(
        "  {label}: median ready in {:.0} ms; {} index entries, {} index bytes = {:.2} bytes/entry; \
         child peak RSS (VmHWM) {:.1} MiB, RSS {:.1} MiB after open ({:.1} MiB before)",
        o.ms,
        o.entries,
        o.index_bytes,
        o.index_bytes as f64 / o.entries.max(1) as f64,
        mib(o.hwm_kb),
        mib(o.rss_kb),
        mib(o.rss_before_kb)
    );
}

// ---------------------------------------------------------------------------
// main

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child_open(&dir);
        return;
    }
    let opts = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(opts));
}

struct Peers {
    redis_url: String,
    pg_url: String,
    redis: Option<redis::aio::MultiplexedConnection>,
    pg: Option<tokio_postgres::Client>,
}

async fn run(opts: Opts) {
    let all_started = Instant::now();
    println!("machine: {}", machine());
    println!("load average at start: {}", loadavg());
    println!(
        "mode: {} ({} s per run, {} runs, medians; {CONNS} connections, {WRITERS} writers; \
         filter: one client, median of {}{})",
        if opts.quick { "quick" } else { "full" },
        opts.run.as_secs_f64(),
        opts.runs,
        opts.filter_runs,
        if opts.quick { ", no warm-up" } else { " after a warm-up" }
    );
    println!(
        "client and prefsd share the machine's cores; Redis and PostgreSQL run as their own processes on loopback"
    );

    if !DATA_WORKLOADS.iter().any(|w| opts.wants(w)) {
        run_without_data(&opts, all_started).await;
        return;
    }

    let started = Instant::now();
    let data = Arc::new(Data::generate());
    println!(
        "data: {} opt-outs of {MAIN_SERVICE}/{MAIN_CHANNEL} out of 0..{UNIVERSE}, plus {} × {} pairs × {} = {} rows in {} pairs; \
         {FILTER_N} recipients ({} allowed); generated in {:.1} s",
        MAIN_OUT,
        SPREAD_SERVICES,
        CHANNELS.len(),
        SPREAD_PER_PAIR,
        data.rows(),
        data.pairs.len(),
        data.expected_allowed,
        started.elapsed().as_secs_f64()
    );

    // --- the peers load in the background (separate processes) while prefsd's data dir is copied
    let redis_url = std::env::var("PREFSD_BENCH_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let pg_url = std::env::var("PREFSD_BENCH_PG")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into());
    let redis_setup = tokio::spawn({
        let (url, data) = (redis_url.clone(), data.clone());
        async move { setup_redis(&url, &data).await }
    });
    let pg_setup = tokio::spawn({
        let (url, data) = (pg_url.clone(), data.clone());
        async move { setup_pg(&url, &data).await }
    });

    // --- prefsd
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let rss_start = proc_kb("VmRSS");
    let (sidecar, open_took, how) = match bench_sidecar(&data, dir.path()).await {
        Ok(s) => s,
        Err(e) => {
            println!("ERROR prefsd could not be loaded: {e}");
            return;
        }
    };
    let addr = sidecar.addr;
    let rss_after = proc_kb("VmRSS");
    let (entries, index_bytes) = {
        let index = sidecar.app().index();
        (index.entries(), index.heap_bytes())
    };
    println!("load prefsd: {how}");
    println!(
        "  prefsd serves a private copy ({:.1} MiB) from 127.0.0.1:{}; App::open took {:.0} ms",
        dir_bytes(&data_dir) as f64 / 1048576.0,
        addr.port(),
        open_took.as_secs_f64() * 1e3
    );
    println!(
        "memory prefsd (in-process): {entries} index entries, {index_bytes} index bytes = {:.2} bytes/entry; \
         process RSS {:.1} MiB before open, {:.1} MiB after (the harness's own data included)",
        index_bytes as f64 / entries.max(1) as f64,
        mib(rss_start),
        mib(rss_after)
    );

    // --- peers
    let mut peers = Peers { redis_url, pg_url, redis: None, pg: None };
    let (redis, redis_lines) = redis_setup.await.expect("redis setup");
    let (pg, pg_lines) = pg_setup.await.expect("postgres setup");
    for line in redis_lines.iter().chain(&pg_lines) {
        println!("{line}");
    }
    peers.redis = redis;
    peers.pg = pg;

    // --- all three give the same answers
    if let Err(e) = verify(addr, &mut peers, &data).await {
        println!("ERROR answers differ: {e}");
    } else {
        println!("verified: prefsd, and every peer loaded, answer 2,000 sample checks identically");
    }

    let mut rows = Vec::new();
    let mut phases = vec![("load", all_started.elapsed())];
    let mut mark = |name: &'static str| {
        let total = all_started.elapsed();
        let before: Duration = phases.iter().map(|(_, d)| *d).sum();
        phases.push((name, total.saturating_sub(before)));
    };
    if opts.wants("single") {
        rows.push(single_checks(addr, &peers, &data, &opts).await);
        mark("single");
    }
    if opts.wants("batch") {
        rows.push(batch_checks(addr, &peers, &opts).await);
        mark("batch");
    }
    if opts.wants("filter") {
        let (roaring, json) = filters(addr, &peers, &data, &opts).await;
        rows.push(roaring);
        rows.push(json);
        mark("filter");
    }
    if opts.wants("writes") {
        rows.push(writes(addr, &peers, &opts).await);
        mark("writes");
    }
    if opts.wants("cluster") {
        let cluster_rows = cluster(&peers.pg_url, &rows, &opts).await;
        rows.extend(cluster_rows);
        mark("cluster");
    }

    // --- clean up the peers
    if let Some(conn) = peers.redis.as_mut() {
        match redis_cleanup(conn).await {
            Ok(n) => println!("cleanup redis: {n} keys under {REDIS_PREFIX}* deleted"),
            Err(e) => println!("cleanup redis failed: {e}"),
        }
    }
    if let Some(client) = peers.pg.as_ref() {
        match pg_cleanup(client).await {
            Ok(()) => println!("cleanup postgres: prefsd_bench_optouts and prefsd_bench_prefs dropped"),
            Err(e) => println!("cleanup postgres failed: {e}"),
        }
    }

    // --- start-up and memory
    println!("start-up and memory:");
    let stop_took = tokio::task::spawn_blocking(move || sidecar.stop()).await.expect("join");
    println!(
        "  graceful stop of the bench sidecar (drain, final snapshot, close) took {:.0} ms; data dir {:.1} MiB",
        stop_took.as_secs_f64() * 1e3,
        dir_bytes(&data_dir) as f64 / 1048576.0
    );
    let small = if opts.quick && opts.wants("startup") && startup_cached() {
        println!("  bench data set: not reopened in --quick (the cached 10M data set is, below)");
        Err("skipped".to_string())
    } else {
        let small = tokio::task::spawn_blocking({
            let d = data_dir.clone();
            let label = format!("{} opt-outs, {} pairs", data.rows(), data.pairs.len());
            move || startup_runs(&label, &d)
        })
        .await
        .expect("join");
        match &small {
            Ok(o) => print_opened("bench data set", o),
            Err(e) => println!("  ERROR reopening: {e}"),
        }
        small
    };
    drop(dir);
    let big = if !opts.wants("startup") {
        None
    } else {
        match startup_10m(opts.quick).await {
            Ok(o) => o,
            Err(e) => {
                println!("  ERROR 10M start-up: {e}");
                None
            }
        }
    };

    mark("startup");

    summary(&rows);
    targets(&rows, big.as_ref(), small.as_ref().ok());
    println!("load average at end: {}", loadavg());
    let phases: Vec<String> = phases.iter().map(|(n, d)| format!("{n} {:.1} s", d.as_secs_f64())).collect();
    println!("total time {:.1} s ({})", all_started.elapsed().as_secs_f64(), phases.join(", "));
}

/// The summary table, how each peer figure was obtained, and every `compare` line.
fn summary(rows: &[Row]) {
    println!();
    println!("summary (medians; ratio > 1 means prefsd is better):");
    println!("| workload | prefsd | Redis | prefsd vs Redis | PostgreSQL | prefsd vs PostgreSQL |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.title,
            cell(r, r.prefsd),
            cell(r, r.redis),
            ratio_cell(r.ratio(Peer::Redis)),
            cell(r, r.postgres),
            ratio_cell(r.ratio(Peer::Postgres))
        );
    }
    for r in rows {
        if !r.how.is_empty() {
            println!("  {}: {}", r.title, r.how);
        }
    }
    println!();
    for r in rows {
        r.print_compare();
    }
    println!();
}

/// `PREFSD_BENCH_ONLY` without any workload of the bench data set: no data
/// generated, no peer loaded, only the cluster workload (when selected).
async fn run_without_data(opts: &Opts, all_started: Instant) {
    let pg_url = std::env::var("PREFSD_BENCH_PG")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into());
    println!("data: none loaded (no workload of the bench data set selected)");
    let mut rows = Vec::new();
    if opts.wants("cluster") {
        rows.extend(cluster(&pg_url, &rows, opts).await);
    }
    summary(&rows);
    println!("load average at end: {}", loadavg());
    println!("total time {:.1} s", all_started.elapsed().as_secs_f64());
}

/// Connects to Redis and loads the sets; `None` (with a SKIP line) when unreachable.
async fn setup_redis(url: &str, data: &Data) -> (Option<redis::aio::MultiplexedConnection>, Vec<String>) {
    let mut conn = match redis_conn(url).await {
        Ok(conn) => conn,
        Err(e) => return (None, vec![format!("SKIP redis: {url} unreachable: {e}")]),
    };
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await.unwrap_or_default();
    let version =
        info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("?").trim().to_string();
    let started = Instant::now();
    let loaded = async {
        redis_cleanup(&mut conn).await?;
        redis_load(&mut conn, data).await
    }
    .await;
    if let Err(e) = loaded {
        return (None, vec![format!("SKIP redis: loading failed: {e}")]);
    }
    let took = started.elapsed().as_secs_f64();
    let mem: String = redis::cmd("INFO").arg("memory").query_async(&mut conn).await.unwrap_or_default();
    let used = mem
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let line = format!(
        "load redis {version}: {} rows via pipelined SADD in {took:.1} s = {:.0} rows/s; \
         used_memory {:.1} MiB = {:.1} bytes/row",
        data.rows(),
        data.rows() as f64 / took,
        used / 1048576.0,
        used / data.rows() as f64
    );
    (Some(conn), vec![line])
}

/// Connects to PostgreSQL and loads the table; `None` (with a SKIP line) when unreachable.
async fn setup_pg(url: &str, data: &Data) -> (Option<tokio_postgres::Client>, Vec<String>) {
    let client = match pg_connect(url).await {
        Ok(client) => client,
        Err(e) => return (None, vec![format!("SKIP postgres: {url} unreachable: {e}")]),
    };
    let mut settings = Vec::new();
    for s in
        ["server_version", "fsync", "synchronous_commit", "shared_buffers", "max_parallel_workers_per_gather"]
    {
        let value: String = client
            .query_one(&format!("SHOW {s}"), &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or_else(|_| "?".into());
        settings.push(format!("{s}={value}"));
    }
    let started = Instant::now();
    if let Err(e) = pg_load(&client, data).await {
        let _ = pg_cleanup(&client).await;
        return (None, vec![format!("SKIP postgres: loading failed: {e}")]);
    }
    let took = started.elapsed().as_secs_f64();
    let size: i64 = client
        .query_one("SELECT pg_total_relation_size('prefsd_bench_optouts')", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    let line = format!(
        "load postgres ({}): {} rows via INSERT … SELECT unnest($3) (100k per statement), then primary key \
         and VACUUM ANALYZE, in {took:.1} s = {:.0} rows/s; table+index {:.1} MiB = {:.1} bytes/row",
        settings.join(" "),
        data.rows(),
        data.rows() as f64 / took,
        size as f64 / 1048576.0,
        size as f64 / data.rows() as f64
    );
    (Some(client), vec![line])
}

/// 2,000 probes: 1,000 opted-out ids and 1,000 random ones; every store
/// must answer each like the generated truth.
async fn verify(addr: SocketAddr, peers: &mut Peers, data: &Data) -> Result<(), String> {
    let mut rng = SplitMix64(99);
    let main = &data.pairs[0].ids;
    let mut probes: Vec<u64> = (0..1000).map(|_| main[rng.scaled(main.len() as u64) as usize]).collect();
    probes.extend((0..1000).map(|_| rng.scaled(UNIVERSE)));
    let mut http = Http::connect(addr).await?;
    let key = redis_key(MAIN_SERVICE, MAIN_CHANNEL);
    for &id in &probes {
        let truth = has(&data.main_bits, id);
        let uri = format!("/v1/check?customer={id}&service={MAIN_SERVICE}&channel={MAIN_CHANNEL}");
        let a: CheckAnswer = serde_json::from_slice(&http.send(Method::GET, &uri, None, Bytes::new()).await?)
            .map_err(|e| e.to_string())?;
        if a.allowed == truth {
            return Err(format!("prefsd says allowed={} for {id}", a.allowed));
        }
        if let Some(conn) = peers.redis.as_mut() {
            let m: bool = redis::cmd("SISMEMBER")
                .arg(&key)
                .arg(id)
                .query_async(conn)
                .await
                .map_err(|e| e.to_string())?;
            if m != truth {
                return Err(format!("redis says member={m} for {id}"));
            }
        }
        if let Some(client) = peers.pg.as_ref() {
            let row = client
                .query_opt(
                    "SELECT 1 FROM prefsd_bench_optouts WHERE service=$1 AND channel=$2 AND customer=$3",
                    &[&MAIN_SERVICE, &MAIN_CHANNEL, &(id as i64)],
                )
                .await
                .map_err(pg_err)?;
            if row.is_some() != truth {
                return Err(format!("postgres says opted out={} for {id}", row.is_some()));
            }
        }
    }
    Ok(())
}

fn report<T>(label: &str, r: Result<T, String>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            println!("  ERROR {label}: {e}");
            None
        }
    }
}

async fn single_checks(addr: SocketAddr, peers: &Peers, data: &Data, opts: &Opts) -> Row {
    println!(
        "single checks ({CONNS} connections, one request in flight per connection; load average {}):",
        loadavg()
    );
    let mut row = Row::new("single_check", "single checks", "checks/s", true);
    let key: Arc<str> = redis_key(MAIN_SERVICE, MAIN_CHANNEL).into();
    row.prefsd = report(
        "prefsd",
        async {
            let workers = Http::connect_many(addr, CONNS).await?.into_iter().map(HttpSingle).collect();
            measure("prefsd GET /v1/check", "checks/s", workers, opts, 10).await
        }
        .await,
    );
    if !opts.quick {
        let floor = async {
            let floor = tokio::task::spawn_blocking({
                let pairs = data.pairs.clone();
                move || Floor::start(&pairs[0].ids)
            })
            .await
            .map_err(|e| e.to_string())??;
            let workers =
                Http::connect_many(floor.addr, CONNS).await.map(|v| v.into_iter().map(HttpSingle).collect());
            let rate = match workers {
                Ok(workers) => {
                    measure("plain hyper + HashSet (the floor, not a peer)", "checks/s", workers, opts, 10)
                        .await
                }
                Err(e) => Err(e),
            };
            tokio::task::spawn_blocking(move || floor.stop()).await.map_err(|e| e.to_string())?;
            rate
        }
        .await;
        if let (Some(f), Some(p)) = (report("plain hyper floor", floor), row.prefsd) {
            row.how = format!(
                "a plain hyper server answering from a HashSet, same client: {f:.0} checks/s; prefsd reaches {:.0}% of it",
                p / f * 100.0
            );
        }
    }
    if peers.redis.is_some() {
        row.redis = report(
            "redis",
            async {
                let workers = redis_conns(&peers.redis_url, CONNS)
                    .await?
                    .into_iter()
                    .map(|conn| RedisSingle { conn, key: key.clone() })
                    .collect();
                measure("redis SISMEMBER", "checks/s", workers, opts, 10).await
            }
            .await,
        );
    }
    if peers.pg.is_some() {
        row.postgres = report(
            "postgres",
            async {
                let mut workers = Vec::new();
                for _ in 0..CONNS {
                    let client = pg_connect(&peers.pg_url).await?;
                    let stmt = client
                        .prepare(
                            "SELECT 1 FROM prefsd_bench_optouts WHERE service = $1 AND channel = $2 AND customer = $3",
                        )
                        .await
                        .map_err(pg_err)?;
                    workers.push(PgSingle { client, stmt });
                }
                measure("postgres prepared SELECT", "checks/s", workers, opts, 10).await
            }
            .await,
        );
    }
    row.print_compare();
    row
}

async fn batch_checks(addr: SocketAddr, peers: &Peers, opts: &Opts) -> Row {
    println!("batch checks ({BATCH} ids per request, {CONNS} connections; load average {}):", loadavg());
    let mut row = Row::new("batch_check", "batch checks (1,000 per request)", "ids/s", true);
    let key: Arc<str> = redis_key(MAIN_SERVICE, MAIN_CHANNEL).into();
    row.prefsd = report(
        "prefsd",
        async {
            let workers = Http::connect_many(addr, CONNS)
                .await?
                .into_iter()
                .map(|http| HttpBatch { http, body: String::with_capacity(64 * BATCH) })
                .collect();
            measure("prefsd POST /v1/check", "ids/s", workers, opts, 20).await
        }
        .await,
    );
    if peers.redis.is_some() {
        row.redis = report(
            "redis",
            async {
                let workers = redis_conns(&peers.redis_url, CONNS)
                    .await?
                    .into_iter()
                    .map(|conn| RedisBatch { conn, key: key.clone(), ids: Vec::with_capacity(BATCH) })
                    .collect();
                measure("redis SMISMEMBER", "ids/s", workers, opts, 20).await
            }
            .await,
        );
    }
    if peers.pg.is_some() {
        row.postgres = report(
            "postgres",
            async {
                let mut workers = Vec::new();
                for _ in 0..CONNS {
                    let client = pg_connect(&peers.pg_url).await?;
                    let stmt = client
                        .prepare(
                            "SELECT customer FROM prefsd_bench_optouts \
                             WHERE service = $1 AND channel = $2 AND customer = ANY($3)",
                        )
                        .await
                        .map_err(pg_err)?;
                    workers.push(PgBatch { client, stmt, ids: Vec::with_capacity(BATCH) });
                }
                measure("postgres = ANY($3)", "ids/s", workers, opts, 20).await
            }
            .await,
        );
    }
    row.print_compare();
    row
}

async fn filters(addr: SocketAddr, peers: &Peers, data: &Data, opts: &Opts) -> (Row, Row) {
    println!(
        "filter {FILTER_N} recipients against {MAIN_OUT} opt-outs, end to end (one client; request bodies and \
         commands built before timing, answers decoded and counted inside it; load average {}):",
        loadavg()
    );
    let mut roaring = Row::new("filter_roaring", "filter 1M, roaring bodies", "ms", false);
    let mut json = Row::new("filter_json", "filter 1M, JSON bodies", "ms", false);
    let expected = data.expected_allowed;

    // Bodies, with what building them costs the client (not in the timings).
    let t = Instant::now();
    let mut sorted: Vec<u32> = data.recipients.iter().map(|&id| id as u32).collect();
    sorted.sort_unstable();
    let bitmap = RoaringBitmap::from_sorted_iter(sorted).expect("sorted");
    let mut roaring_body = Vec::with_capacity(bitmap.serialized_size());
    bitmap.serialize_into(&mut roaring_body).expect("write to Vec");
    let roaring_ms = t.elapsed().as_secs_f64() * 1e3;
    let roaring_body = Bytes::from(roaring_body);
    let t = Instant::now();
    let mut json_body = String::with_capacity(FILTER_N * 10);
    json_body.push_str(r#"{"customers":["#);
    for (i, id) in data.recipients.iter().enumerate() {
        if i > 0 {
            json_body.push(',');
        }
        let _ = write!(json_body, "{id}");
    }
    json_body.push_str("]}");
    let json_ms = t.elapsed().as_secs_f64() * 1e3;
    let json_body = Bytes::from(json_body);
    println!(
        "  (bodies: roaring {} bytes, built from the unsorted list in {roaring_ms:.1} ms; JSON {} bytes, written in {json_ms:.1} ms)",
        roaring_body.len(),
        json_body.len()
    );

    let prefsd = async {
        let mut http = Http::connect(addr).await?;
        let r = timed!(
            "prefsd POST /v1/filter, application/vnd.roaring",
            opts,
            prefsd_filter_roaring(&mut http, &roaring_body, expected).await?
        );
        let j = timed!(
            "prefsd POST /v1/filter, application/json",
            opts,
            prefsd_filter_json(&mut http, &json_body, expected).await?
        );
        Ok::<_, String>((r, j))
    }
    .await;
    if let Some((r, j)) = report("prefsd filter", prefsd) {
        roaring.prefsd = Some(r);
        json.prefsd = Some(j);
    }

    if peers.redis.is_some() {
        let key = redis_key(MAIN_SERVICE, MAIN_CHANNEL);
        let redis = async {
            let configs: &[(usize, usize)] =
                if opts.quick { &[(10_000, 4)] } else { &[(1_000, 8), (10_000, 4), (50_000, 2)] };
            let mut best: Option<(f64, String)> = None;
            for &(chunk, k) in configs {
                let chunks: Vec<Vec<u64>> = data.recipients.chunks(chunk).map(<[u64]>::to_vec).collect();
                let cmds: Vec<redis::Cmd> = chunks
                    .iter()
                    .map(|c| {
                        let mut cmd = redis::cmd("SMISMEMBER");
                        cmd.arg(&key).arg(c);
                        cmd
                    })
                    .collect();
                let (cmds, chunks) = (Arc::new(cmds), Arc::new(chunks));
                let conns = redis_conns(&peers.redis_url, k).await?;
                let label = format!("redis SMISMEMBER, chunks of {chunk} over {k} connections");
                let m = timed!(label, opts, redis_filter_chunks(&conns, &cmds, &chunks, expected).await?);
                if best.as_ref().is_none_or(|(b, _)| m < *b) {
                    best = Some((m, label));
                }
            }
            if opts.quick {
                println!("  redis SADD temp set + SDIFF: not measured in --quick (about 3× slower than SMISMEMBER in full runs)");
            } else {
                let mut pipe = redis::pipe();
                for chunk in data.recipients.chunks(50_000) {
                    pipe.cmd("SADD").arg(REDIS_TMP).arg(chunk).ignore();
                }
                pipe.cmd("SDIFF").arg(REDIS_TMP).arg(&key);
                pipe.cmd("UNLINK").arg(REDIS_TMP).ignore();
                let mut conn = redis_conn(&peers.redis_url).await?;
                let label = "redis SADD temp set + SDIFF + UNLINK, one pipeline".to_string();
                let m = timed!(label, opts, redis_filter_sdiff(&mut conn, &pipe, expected).await?);
                if best.as_ref().is_none_or(|(b, _)| m < *b) {
                    best = Some((m, label));
                }
            }
            Ok::<_, String>(best.expect("measured"))
        }
        .await;
        if let Some((m, how)) = report("redis filter", redis) {
            roaring.redis = Some(m);
            json.redis = Some(m);
            roaring.how = format!("Redis: best of SMISMEMBER chunks and SDIFF = {how}");
        }
    }
    if peers.pg.is_some() {
        let pg = async {
            let client = pg_connect(&peers.pg_url).await?;
            let ids: Vec<i64> = data.recipients.iter().map(|&id| id as i64).collect();
            let anti = "FROM unnest($1::bigint[]) AS r(customer) WHERE NOT EXISTS \
                        (SELECT 1 FROM prefsd_bench_optouts o \
                         WHERE o.service = $2 AND o.channel = $3 AND o.customer = r.customer)";
            let rows_stmt =
                client.prepare(&format!("SELECT r.customer {anti}")).await.map_err(pg_err)?;
            let array_stmt = client
                .prepare(&format!("SELECT array_agg(r.customer) {anti}"))
                .await
                .map_err(pg_err)?;
            let a = timed!(
                "postgres unnest($1) NOT EXISTS anti-join, rows",
                opts,
                pg_filter_rows(&client, &rows_stmt, &ids, expected).await?
            );
            if opts.quick {
                println!("  postgres anti-join returning one array_agg: not measured in --quick (slower than rows in full runs)");
                return Ok((a, "anti-join returning rows".to_string()));
            }
            let b = timed!(
                "postgres unnest($1) NOT EXISTS anti-join, array_agg",
                opts,
                pg_filter_array(&client, &array_stmt, &ids, expected).await?
            );
            Ok::<_, String>(if a <= b {
                (a, "anti-join returning rows".to_string())
            } else {
                (b, "anti-join returning one array_agg".to_string())
            })
        }
        .await;
        if let Some((m, how)) = report("postgres filter", pg) {
            roaring.postgres = Some(m);
            json.postgres = Some(m);
            if !roaring.how.is_empty() {
                roaring.how.push_str("; ");
            }
            let _ = write!(roaring.how, "PostgreSQL: better of rows and array_agg = {how}");
            json.how = "peers as above".into();
        }
    }
    roaring.print_compare();
    json.print_compare();
    (roaring, json)
}

async fn writes(addr: SocketAddr, peers: &Peers, opts: &Opts) -> Row {
    println!(
        "durable writes ({WRITERS} concurrent writers, one write per round trip, acknowledged after fsync; \
         load average {}):",
        loadavg()
    );
    let mut row = Row::new("durable_write", "durable writes, 64 writers", "writes/s", true);
    row.prefsd = report(
        "prefsd",
        async {
            let workers = Http::connect_many(addr, WRITERS).await?.into_iter().map(HttpWrite).collect();
            let before = commit_stats(addr).await;
            let rate = measure("prefsd PUT /v1/customers/C/preferences/S/H", "writes/s", workers, opts, 30).await;
            if let (Ok(b), Ok(a)) = (before, commit_stats(addr).await) {
                let (secs, commits, writes) = (a.0 - b.0, a.1 - b.1, a.2 - b.2);
                println!(
                    "  prefsd group commit during warm-up and runs (from /metrics): {commits:.0} commits, \
                     {:.1} writes per commit, {:.2} ms per commit (stage + durable commit); the writer thread \
                     was committing {:.0}% of the time",
                    writes / commits,
                    secs / commits * 1e3,
                    secs / (opts.warmup + opts.run * opts.runs as u32).as_secs_f64() * 100.0
                );
            }
            rate
        }
        .await,
    );
    if let Some(client) = peers.pg.as_ref() {
        row.postgres = report("postgres", pg_durable_writes(client, &peers.pg_url, opts).await);
        row.how = "prefsd writes a record and an audit entry per write; PostgreSQL one upserted row".into();
    }
    row.print_compare();
    row
}

/// The PostgreSQL peer of durable writes: `WRITERS` connections, each an
/// autocommit `INSERT … ON CONFLICT DO UPDATE` with `synchronous_commit = on`,
/// into `prefsd_bench_prefs`, (re)created empty through `admin`.
async fn pg_durable_writes(admin: &tokio_postgres::Client, url: &str, opts: &Opts) -> Result<f64, String> {
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS prefsd_bench_prefs; \
             CREATE TABLE prefsd_bench_prefs (service text NOT NULL, channel text NOT NULL, \
             customer bigint NOT NULL, status text NOT NULL, updated_at timestamptz NOT NULL, \
             PRIMARY KEY (service, channel, customer))",
        )
        .await
        .map_err(pg_err)?;
    let mut workers = Vec::new();
    for _ in 0..WRITERS {
        let client = pg_connect(url).await?;
        client.batch_execute("SET synchronous_commit = on").await.map_err(pg_err)?;
        let stmt = client
            .prepare(
                "INSERT INTO prefsd_bench_prefs (service, channel, customer, status, updated_at) \
                 VALUES ($1, $2, $3, $4, now()) ON CONFLICT (service, channel, customer) \
                 DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at",
            )
            .await
            .map_err(pg_err)?;
        workers.push(PgWrite { client, stmt });
    }
    measure("postgres INSERT … ON CONFLICT DO UPDATE, autocommit", "writes/s", workers, opts, 30).await
}

// ---------------------------------------------------------------------------
// Cluster mode: two sidecars on one PostgreSQL database

/// `url` with its database replaced by `db`: a `postgres[ql]://` URL keeps
/// its authority and query; a `key=value` string gets `dbname=` appended
/// (the last value wins).
fn pg_url_with_db(url: &str, db: &str) -> String {
    for scheme in ["postgresql://", "postgres://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            let query = tail.find('?').map_or("", |q| &tail[q..]);
            return format!("{scheme}{authority}/{db}{query}");
        }
    }
    format!("{url} dbname={db}")
}

/// Drops the databases earlier cluster runs left behind, unless the process
/// named by the suffix still runs here (PostgreSQL also refuses to drop a
/// database someone is connected to).
async fn drop_leftover_dbs(admin: &tokio_postgres::Client, own: &str) -> Result<(), String> {
    let rows = admin
        .query("SELECT datname FROM pg_database WHERE left(datname, length($1)) = $1", &[&CLUSTER_DB_PREFIX])
        .await
        .map_err(pg_err)?;
    for row in rows {
        let name: String = row.get(0);
        let Ok(pid) = name[CLUSTER_DB_PREFIX.len()..].parse::<u32>() else { continue };
        if name != own && Path::new(&format!("/proc/{pid}")).exists() {
            println!("  database {name}: its process {pid} still runs; left alone");
            continue;
        }
        match admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\"")).await {
            Ok(()) => println!("  dropped the leftover database {name}"),
            Err(e) => println!("  leftover database {name} not dropped: {}", pg_err(e)),
        }
    }
    Ok(())
}

/// Drops this run's database, closing the sessions the stopped sidecars may
/// still hold (`WITH (FORCE)`; before PostgreSQL 13, by waiting for them).
async fn drop_db(admin: &tokio_postgres::Client, db: &str) -> Result<(), String> {
    let forced = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")).await;
    let mut last = match forced {
        Ok(()) => return Ok(()),
        Err(e) => pg_err(e),
    };
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\"")).await {
            Ok(()) => return Ok(()),
            Err(e) => last = pg_err(e),
        }
    }
    Err(last)
}

/// A sidecar's `/readyz`: whether it is ready, and its last applied sequence.
async fn readyz(http: &mut Http) -> Result<(bool, u64), String> {
    let (status, body) = http.request(Method::GET, "/readyz", None, Bytes::new()).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("/readyz: {e}"))?;
    Ok((status == StatusCode::OK, v["last_seq"].as_u64().unwrap_or(0)))
}

/// Waits until every sidecar answers `/readyz` with 200.
async fn wait_ready(addrs: &[SocketAddr]) -> Result<(), String> {
    let started = Instant::now();
    for &addr in addrs {
        let mut http = Http::connect(addr).await?;
        while !readyz(&mut http).await?.0 {
            if started.elapsed() > CLUSTER_WAIT {
                return Err(format!("{addr} not ready after {CLUSTER_WAIT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// The last sequence number PostgreSQL assigned.
async fn pg_head(pg: &tokio_postgres::Client) -> Result<u64, String> {
    let head: i64 = pg.query_one("SELECT last_seq FROM prefsd_head", &[]).await.map_err(pg_err)?.get(0);
    Ok(head as u64)
}

/// Waits until every sidecar has applied every event PostgreSQL holds now;
/// answers how long that took.
async fn wait_applied(pg: &tokio_postgres::Client, addrs: &[SocketAddr]) -> Result<Duration, String> {
    let head = pg_head(pg).await?;
    let started = Instant::now();
    for &addr in addrs {
        let mut http = Http::connect(addr).await?;
        loop {
            let (_, applied) = readyz(&mut http).await?;
            if applied >= head {
                break;
            }
            if started.elapsed() > CLUSTER_WAIT {
                return Err(format!("{addr} applied up to {applied}, not {head}, in {CLUSTER_WAIT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(started.elapsed())
}

/// Waits until `GET /v1/services/{slug}` answers 200 on `addr`.
async fn wait_service(addr: SocketAddr, slug: &str) -> Result<(), String> {
    let started = Instant::now();
    let mut http = Http::connect(addr).await?;
    let uri = format!("/v1/services/{slug}");
    while http.request(Method::GET, &uri, None, Bytes::new()).await?.0 != StatusCode::OK {
        if started.elapsed() > CLUSTER_WAIT {
            return Err(format!("service {slug} not visible on {addr} after {CLUSTER_WAIT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// The durable-write closed loop against sidecars of the cluster, then how
/// many writes shared each PostgreSQL transaction (events of one transaction
/// share `recorded_at`, the transaction's start) and how long both sidecars
/// took to apply the last of them.
async fn cluster_writes(
    label: &str,
    workers: Vec<HttpWrite>,
    opts: &Opts,
    pg: &tokio_postgres::Client,
    addrs: &[SocketAddr],
) -> Result<f64, String> {
    let before = pg_head(pg).await?;
    let rate = measure(label, "writes/s", workers, opts, 40).await?;
    let caught_up = wait_applied(pg, addrs).await?;
    let after = pg_head(pg).await?;
    let row = pg
        .query_one(
            "SELECT count(*), count(DISTINCT recorded_at) FROM prefsd_events WHERE seq > $1 AND seq <= $2",
            &[&(before as i64), &(after as i64)],
        )
        .await
        .map_err(pg_err)?;
    let (events, txns): (i64, i64) = (row.get(0), row.get(1));
    println!(
        "    {events} events in {txns} PostgreSQL transactions during warm-up and runs = {:.1} writes per \
         transaction; both sidecars had applied the last one {:.1} ms after the last run ended",
        events as f64 / txns.max(1) as f64,
        caught_up.as_secs_f64() * 1e3
    );
    Ok(rate)
}

async fn allowed(http: &mut Http, uri: &str) -> Result<bool, String> {
    let body = http.send(Method::GET, uri, None, Bytes::new()).await?;
    Ok(serde_json::from_slice::<CheckAnswer>(&body).map_err(|e| e.to_string())?.allowed)
}

/// `n` opt-outs written one at a time on `from`, customers `first..first+n`
/// of `MAIN_SERVICE`/`MAIN_CHANNEL` (allowed everywhere before), each checked
/// on `to` without pause until it answers `allowed=false`. Answers, per
/// write, the ms from the acknowledgement until `to` answered so, and the ms
/// the write took to be acknowledged. A write not visible within
/// `PROPAGATION_DEADLINE`, or not read back on `from`, is an error. Also
/// answers how many writes the first check after the acknowledgement saw.
async fn propagation(
    from: SocketAddr,
    to: SocketAddr,
    first: u64,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>, usize), String> {
    let mut writer = Http::connect(from).await?;
    let mut reader = Http::connect(to).await?;
    let (mut visible, mut acked) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut at_first_check = 0;
    for i in 0..n {
        let customer = first + i as u64;
        let check = format!("/v1/check?customer={customer}&service={MAIN_SERVICE}&channel={MAIN_CHANNEL}");
        if !allowed(&mut reader, &check).await? {
            return Err(format!("customer {customer} is already opted out on {to}"));
        }
        let put = format!("/v1/customers/{customer}/preferences/{MAIN_SERVICE}/{MAIN_CHANNEL}");
        let body = Bytes::from_static(br#"{"status":"opted_out"}"#);
        let sent = Instant::now();
        writer.send(Method::PUT, &put, Some("application/json"), body).await?;
        let at = Instant::now();
        let mut checks = 1u64;
        while allowed(&mut reader, &check).await? {
            if at.elapsed() > PROPAGATION_DEADLINE {
                return Err(format!(
                    "opt-out {i} (customer {customer}) acknowledged by {from} was not visible on {to} after \
                     {PROPAGATION_DEADLINE:?} ({checks} checks)"
                ));
            }
            checks += 1;
        }
        visible.push(at.elapsed().as_secs_f64() * 1e3);
        acked.push((at - sent).as_secs_f64() * 1e3);
        at_first_check += usize::from(checks == 1);
        if allowed(&mut writer, &check).await? {
            return Err(format!("{from} does not read its own opt-out of customer {customer}"));
        }
    }
    Ok((visible, acked, at_first_check))
}

/// The nearest-rank percentile `p` (0..=1) of `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// What the cluster workload measured.
#[derive(Default)]
struct ClusterFigures {
    /// 64 writers on A, writes/s.
    one: Option<f64>,
    /// 32 writers on A and 32 on B, writes/s.
    split: Option<f64>,
    /// Opt-out on A until visible on B, ms per write.
    a_to_b: Option<Vec<f64>>,
    /// Opt-out on B until visible on A, ms per write.
    b_to_a: Option<Vec<f64>>,
}

/// A sidecar of the cluster: an empty data dir under `dir`, `postgres = url`.
async fn cluster_sidecar(dir: &Path, url: &str) -> Result<Sidecar, String> {
    let mut config = Config::for_data_dir(dir.join("data"));
    config.postgres = Some(url.to_owned());
    // Cluster mode needs shared token keys.
    config.token_keys = prefsd::config::parse_token_keys("7:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8")?;
    let (sidecar, _) = tokio::task::spawn_blocking(move || Sidecar::start_with(config))
        .await
        .map_err(|e| e.to_string())??;
    Ok(sidecar)
}

/// Starts sidecars A and B on `url`, measures, stops them.
async fn cluster_run(url: &str, opts: &Opts) -> Result<ClusterFigures, String> {
    let dir_a = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir_b = tempfile::tempdir().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let a = cluster_sidecar(dir_a.path(), url).await?;
    let b = match cluster_sidecar(dir_b.path(), url).await {
        Ok(b) => b,
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || a.stop()).await;
            return Err(e);
        }
    };
    let measured = cluster_measure(a.addr, b.addr, url, opts, started).await;
    let stopped = Instant::now();
    let _ = tokio::task::spawn_blocking(move || a.stop()).await;
    let _ = tokio::task::spawn_blocking(move || b.stop()).await;
    println!("  sidecars A and B stopped in {:.0} ms", stopped.elapsed().as_secs_f64() * 1e3);
    measured
}

async fn cluster_measure(
    a: SocketAddr,
    b: SocketAddr,
    url: &str,
    opts: &Opts,
    started: Instant,
) -> Result<ClusterFigures, String> {
    let pg = pg_connect(url).await?;
    wait_ready(&[a, b]).await?;
    println!(
        "  sidecars A (127.0.0.1:{}) and B (127.0.0.1:{}), empty data dirs, ready (/readyz 200) {:.0} ms after \
         the start of A",
        a.port(),
        b.port(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let mut http = Http::connect(a).await?;
    let body = format!(r#"{{"slug":"{MAIN_SERVICE}","name":"{MAIN_SERVICE}"}}"#);
    let t = Instant::now();
    http.send(Method::POST, "/v1/services", Some("application/json"), body.into()).await?;
    let created = t.elapsed();
    wait_service(b, MAIN_SERVICE).await?;
    println!(
        "  service {MAIN_SERVICE} created through A in {:.1} ms, visible on B {:.1} ms later",
        created.as_secs_f64() * 1e3,
        (t.elapsed() - created).as_secs_f64() * 1e3
    );

    let mut f = ClusterFigures::default();
    let put = "PUT /v1/customers/C/preferences/S/H";
    f.one = report(
        "prefsd cluster writes on A",
        async {
            let workers = Http::connect_many(a, WRITERS).await?.into_iter().map(HttpWrite).collect();
            cluster_writes(
                &format!("prefsd cluster, {WRITERS} writers on A, {put}"),
                workers,
                opts,
                &pg,
                &[a, b],
            )
            .await
        }
        .await,
    );
    f.split = report(
        "prefsd cluster writes on A and B",
        async {
            let mut conns = Http::connect_many(a, WRITERS / 2).await?;
            conns.extend(Http::connect_many(b, WRITERS - WRITERS / 2).await?);
            let workers = conns.into_iter().map(HttpWrite).collect();
            let label = format!(
                "prefsd cluster, {} writers on A + {} on B, {put}",
                WRITERS / 2,
                WRITERS - WRITERS / 2
            );
            cluster_writes(&label, workers, opts, &pg, &[a, b]).await
        }
        .await,
    );

    let n = if opts.quick { PROPAGATION_N_QUICK } else { PROPAGATION_N };
    wait_applied(&pg, &[a, b]).await?;
    for (from, to, name, first) in [(a, b, "A", UNIVERSE), (b, a, "B", UNIVERSE + n as u64)] {
        let other = if name == "A" { "B" } else { "A" };
        let measured =
            report(&format!("propagation {name} to {other}"), propagation(from, to, first, n).await);
        let Some((visible, acked, at_first_check)) = measured else { continue };
        println!(
            "  {n} opt-outs of {MAIN_SERVICE}/{MAIN_CHANNEL} written one at a time on {name}, each for a fresh \
             customer: acknowledged after median {:.2} ms (p99 {:.2} ms); {other} polled without pause until \
             GET /v1/check answered allowed=false, which the first check after the acknowledgement did for \
             {at_first_check} of them (their figure is one check's round trip)",
            median(acked.clone()),
            percentile(&acked, 0.99)
        );
        let line = format!(
            "median={:.2} ms p99={:.2} ms max={:.2} ms n={n}",
            median(visible.clone()),
            percentile(&visible, 0.99),
            percentile(&visible, 1.0)
        );
        if name == "A" {
            println!("cluster propagation: {line}");
            f.a_to_b = Some(visible);
        } else {
            println!("cluster propagation B to A: {line}");
            f.b_to_a = Some(visible);
        }
    }
    Ok(f)
}

/// The cluster workload on the PostgreSQL of `pg_url`; answers its summary
/// rows. The PostgreSQL peer of the write rows is the `durable_write` row's
/// when `rows` holds one, else measured here the same way.
async fn cluster(pg_url: &str, rows: &[Row], opts: &Opts) -> Vec<Row> {
    println!(
        "cluster mode: two sidecars A and B on one PostgreSQL database ({WRITERS} concurrent writers, one write \
         per round trip, acknowledged once committed in PostgreSQL and applied locally; load average {}):",
        loadavg()
    );
    let mut one =
        Row::new("cluster_write", "cluster durable writes, 64 writers on sidecar A", "writes/s", true);
    let mut split =
        Row::new("cluster_write_split", "cluster durable writes, 32 on A + 32 on B", "writes/s", true);
    let mut med =
        Row::new("cluster_propagation_median", "cluster opt-out on A visible on B, median", "ms", false);
    let mut p99 = Row::new("cluster_propagation_p99", "cluster opt-out on A visible on B, p99", "ms", false);
    let admin = match pg_connect(pg_url).await {
        Ok(c) => c,
        Err(e) => {
            println!("SKIP postgres: {pg_url} unreachable: {e}");
            return vec![one, split, med, p99];
        }
    };
    let db = format!("{CLUSTER_DB_PREFIX}{}", std::process::id());
    if let Err(e) = drop_leftover_dbs(&admin, &db).await {
        println!("  ERROR looking for leftover databases: {e}");
    }
    let figures = match admin.batch_execute(&format!("CREATE DATABASE \"{db}\"")).await {
        Err(e) => Err(format!("CREATE DATABASE {db}: {}", pg_err(e))),
        Ok(()) => {
            println!("  database {db} created");
            let figures = cluster_run(&pg_url_with_db(pg_url, &db), opts).await;
            match drop_db(&admin, &db).await {
                Ok(()) => println!("cleanup cluster: database {db} dropped"),
                Err(e) => println!("cleanup cluster: database {db} NOT dropped: {e}"),
            }
            figures
        }
    };
    let f = report("cluster", figures).unwrap_or_default();

    let earlier = rows.iter().find(|r| r.name == "durable_write").and_then(|r| r.postgres);
    let (peer, how) = match earlier {
        Some(v) => (Some(v), "the durable_write workload's, this run"),
        None if f.one.is_some() || f.split.is_some() => {
            let v = report("postgres", pg_durable_writes(&admin, pg_url, opts).await);
            if let Err(e) = admin.batch_execute("DROP TABLE IF EXISTS prefsd_bench_prefs").await {
                println!("cleanup postgres failed: {}", pg_err(e));
            }
            (v, "measured here as the durable_write workload does, after the sidecars stopped")
        }
        None => (None, ""),
    };
    one.prefsd = f.one;
    one.postgres = peer;
    one.how = format!(
        "two in-process sidecars, empty data dirs, on a fresh PostgreSQL database; PostgreSQL peer: {WRITERS} \
         autocommit INSERT … ON CONFLICT DO UPDATE, synchronous_commit=on, {how}"
    );
    split.prefsd = f.split;
    split.postgres = peer;
    split.how = "peer as above".into();
    if let Some(v) = &f.a_to_b {
        med.prefsd = Some(median(v.clone()));
        p99.prefsd = Some(percentile(v, 0.99));
        med.how = format!(
            "from A acknowledging the PUT until B's GET /v1/check answers allowed=false, {} opt-outs one at a \
             time, max {:.2} ms",
            v.len(),
            percentile(v, 1.0)
        );
        if let Some(r) = &f.b_to_a {
            let _ = write!(
                med.how,
                "; B to A: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                median(r.clone()),
                percentile(r, 0.99),
                percentile(r, 1.0)
            );
        }
    }
    vec![one, split, med, p99]
}

/// 10,000,000 opt-outs over 10 services × 2 channels, imported through the
/// API (or cached from an earlier run), reopened three times in a child
/// process. `--quick` measures it only when the cache holds it.
fn startup_name() -> String {
    format!("startup-{STARTUP_TOTAL}-{SPREAD_SERVICES}x{}-v1", CHANNELS.len())
}

/// Whether a complete 10M data set is in the cache.
fn startup_cached() -> bool {
    cache_root().is_some_and(|root| root.join(startup_name()).join("complete").is_file())
}

async fn startup_10m(quick: bool) -> Result<Option<Opened>, String> {
    let name = startup_name();
    let cached = startup_cached();
    if quick && !cached {
        println!(
            "  10M data set: skipped in --quick (importing 10,000,000 opt-outs through the API takes minutes at the \
             import rate above); a full run imports and caches it, later --quick runs reuse it"
        );
        return Ok(None);
    }
    let per_pair = STARTUP_TOTAL / (SPREAD_SERVICES * CHANNELS.len());
    let pairs = Arc::new(spread_pairs(SPREAD_SERVICES, per_pair, 5_000));
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    for attempt in 0..2 {
        let (data_dir, how) = loaded_dir(&name, &pairs, scratch.path(), true).await?;
        println!("  10M data set: {how}; data dir {:.1} MiB", dir_bytes(&data_dir) as f64 / 1048576.0);
        let opened = tokio::task::spawn_blocking(move || startup_runs("10M data set", &data_dir))
            .await
            .map_err(|e| e.to_string())?;
        let why = match opened {
            Ok(o) if o.entries == STARTUP_TOTAL as u64 => {
                print_opened("10M data set", &o);
                return Ok(Some(o));
            }
            Ok(o) => format!("{} index entries, not {STARTUP_TOTAL}", o.entries),
            Err(e) => e,
        };
        if attempt == 0 && cached {
            println!("  10M data set: the cached data dir is unusable ({why}); importing again");
            invalidate(&name);
        } else {
            return Err(why);
        }
    }
    Err("the 10M data set could not be loaded".into())
}

/// DESIGN's "Numbers it must reach", met or missed.
fn targets(rows: &[Row], big: Option<&Opened>, small: Option<&Opened>) {
    println!("DESIGN targets:");
    let get = |name: &str| rows.iter().find(|r| r.name == name);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let line = |what: &str, measured: Option<String>, ok: Option<bool>| match (measured, ok) {
        (Some(m), Some(ok)) => println!("  target {what}: {m} — {}", verdict(ok)),
        _ => println!("  target {what}: not measured"),
    };
    if let Some(r) = get("single_check") {
        line(
            "single checks > Redis SISMEMBER",
            r.ratio(Peer::Redis).map(|x| format!("{x:.2}× Redis")),
            r.ratio(Peer::Redis).map(|x| x > 1.0),
        );
        line(
            "single checks ≥ 4× PostgreSQL",
            r.ratio(Peer::Postgres).map(|x| format!("{x:.2}× PostgreSQL")),
            r.ratio(Peer::Postgres).map(|x| x >= 4.0),
        );
    }
    if let Some(r) = get("batch_check") {
        line(
            "batch checks ≥ 5,000,000 ids/s",
            r.prefsd.map(|v| format!("{v:.0} ids/s")),
            r.prefsd.map(|v| v >= 5e6),
        );
        line(
            "batch checks ≥ 4× Redis",
            r.ratio(Peer::Redis).map(|x| format!("{x:.2}× Redis")),
            r.ratio(Peer::Redis).map(|x| x >= 4.0),
        );
    }
    if let Some(r) = get("filter_roaring") {
        line("filter roaring ≤ 25 ms", r.prefsd.map(|v| format!("{v:.1} ms")), r.prefsd.map(|v| v <= 25.0));
        line(
            "filter roaring ≥ 35× Redis",
            r.ratio(Peer::Redis).map(|x| format!("{x:.2}× Redis")),
            r.ratio(Peer::Redis).map(|x| x >= 35.0),
        );
    }
    if let Some(r) = get("filter_json") {
        line("filter JSON ≤ 100 ms", r.prefsd.map(|v| format!("{v:.1} ms")), r.prefsd.map(|v| v <= 100.0));
        line(
            "filter JSON ≥ 9× Redis",
            r.ratio(Peer::Redis).map(|x| format!("{x:.2}× Redis")),
            r.ratio(Peer::Redis).map(|x| x >= 9.0),
        );
    }
    if let Some(r) = get("durable_write") {
        line(
            "durable writes ≥ 20,000/s (64 writers)",
            r.prefsd.map(|v| format!("{v:.0} writes/s")),
            r.prefsd.map(|v| v >= 20_000.0),
        );
    }
    match big {
        Some(o) => {
            line("start-up with 10M opt-outs ≤ 2 s", Some(format!("{:.0} ms", o.ms)), Some(o.ms <= 2000.0));
            let b = o.index_bytes as f64 / o.entries.max(1) as f64;
            line(
                "≤ 4 bytes per index entry (10M, 20 pairs)",
                Some(format!("{b:.2} bytes/entry")),
                Some(b <= 4.0),
            );
        }
        None => {
            line("start-up with 10M opt-outs ≤ 2 s", None, None);
            if let Some(o) = small {
                let b = o.index_bytes as f64 / o.entries.max(1) as f64;
                println!(
                    "  (bench data set instead: ready in {:.0} ms, {b:.2} bytes per index entry — not the 10M figure)",
                    o.ms
                );
            }
        }
    }
}
