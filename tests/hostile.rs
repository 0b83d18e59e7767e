//! Hostile clients and the recipients' side of the faults design: slow and
//! half-sent requests, connection floods, oversized and polluted requests,
//! forged and replayed opt-out links, and a long filter beside ordinary
//! traffic. Each test starts its own sidecar; timings are printed, never
//! asserted.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prefsd::client::Client;
use serde_json::{Value, json};

// ---------------------------------------------------------------- helpers

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";

fn body(v: &Value) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(v).unwrap())
}

#[track_caller]
fn ok(c: &Client, method: &str, path: &str, v: Option<Value>) -> Value {
    let a = c.send(method, path, v.as_ref().map(|_| JSON), v.as_ref().and_then(body)).unwrap();
    assert!(a.status < 300, "{method} {path}: {} {}", a.status, String::from_utf8_lossy(&a.body));
    a.json()
}

fn create_service(c: &Client, slug: &str) {
    ok(c, "POST", "/v1/services", Some(json!({"slug": slug})));
}

fn issue(c: &Client, customer: u64, service: &str, channel: &str) -> String {
    let v = ok(
        c,
        "POST",
        "/v1/tokens",
        Some(json!({"customer": customer, "service": service, "channel": channel})),
    );
    v["token"].as_str().unwrap().to_owned()
}

fn allowed(c: &Client, customer: u64, service: &str, channel: &str) -> bool {
    let path = format!("/v1/check?customer={customer}&service={service}&channel={channel}");
    ok(c, "GET", &path, None)["allowed"].as_bool().unwrap()
}

fn audit_of(c: &Client, customer: u64) -> Vec<Value> {
    ok(c, "GET", &format!("/v1/customers/{customer}/audit"), None)["entries"].as_array().unwrap().clone()
}

/// Percentile of sorted durations.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A raw HTTP/1.1 answer.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A connection whose reads give up after a short while, so tests can poll.
fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    s
}

/// Reads one answer (Content-Length framed) from `s`, waiting up to 30 s.
fn read_answer(s: &mut TcpStream) -> Raw {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut fill = |buf: &mut Vec<u8>| loop {
        assert!(
            Instant::now() < deadline,
            "no complete answer within 30 s: {:?}",
            String::from_utf8_lossy(buf)
        );
        match s.read(&mut chunk) {
            Ok(0) => {
                panic!("the connection closed before a complete answer: {:?}", String::from_utf8_lossy(buf))
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading the answer: {e}"),
        }
    };
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        fill(&mut buf);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize =
        headers.iter().find(|(k, _)| k == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
    while buf.len() < end + 4 + len {
        fill(&mut buf);
    }
    Raw { status, headers, body: buf[end + 4..end + 4 + len].to_vec() }
}

/// Sends `request` (head and body) and reads the answer. A failed write is
/// ignored: the server may answer before reading everything, as a 413 does.
fn exchange(s: &mut TcpStream, request: &[u8]) -> Raw {
    let _ = s.write_all(request);
    read_answer(s)
}

/// Whether the server closed `s` (end of stream or reset) within `within`;
/// bytes it still sends are skipped.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: prefsd\r\n\r\n").into_bytes()
}

fn post(path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: prefsd\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// The value of one sample in the sidecar's exposition.
fn metric(c: &Client, sample: &str) -> f64 {
    let text = String::from_utf8(c.send("GET", "/metrics", None, None).unwrap().body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{sample} is not in the exposition"))
}

// ------------------------------------------------------ long bulk requests

/// Ids of the big filter, and the customers opted out before it runs.
const FILTER_IDS: u64 = 5_000_000;
const OPTED_OUT: u64 = 50_000;

#[test]
fn a_5m_id_filter_does_not_stall_writes_and_checks() {
    let app = util::spawn_with(|c| c.max_bulk_body_bytes = 128 * 1024 * 1024);
    let c = app.client.clone();
    create_service(&c, "rating");
    // Opt-outs spread over the filter's id range, through one import each
    // 10,000 rows (the cap of a request).
    let stride = FILTER_IDS / OPTED_OUT;
    for start in (0..OPTED_OUT).step_by(10_000) {
        let items: Vec<Value> = (start..start + 10_000)
            .map(|i| json!({"customer": i * stride, "service": "rating", "channel": "email", "status": "opted_out"}))
            .collect();
        let v = ok(&c, "POST", "/v1/preferences/import", Some(json!({ "items": items })));
        assert_eq!(v["accepted"], 10_000);
    }
    let ids: Vec<u64> = (0..FILTER_IDS).collect();
    let filter_body = serde_json::to_vec(&json!({ "customers": ids })).unwrap();
    drop(ids);
    println!("filter body: {} MB", filter_body.len() / 1_000_000);

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let filters = {
        let (c, done) = (c.clone(), done.clone());
        std::thread::spawn(move || {
            let mut took = Vec::new();
            for _ in 0..2 {
                let started = Instant::now();
                let a = c
                    .send(
                        "POST",
                        "/v1/filter?service=rating&channel=email",
                        Some(JSON),
                        Some(filter_body.clone()),
                    )
                    .unwrap();
                took.push(started.elapsed());
                assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body[..a.body.len().min(300)]));
                #[derive(serde::Deserialize)]
                struct Split {
                    allowed: Vec<u64>,
                    suppressed: Vec<u64>,
                }
                let split: Split = serde_json::from_slice(&a.body).unwrap();
                assert_eq!(split.suppressed.len() as u64, OPTED_OUT);
                assert_eq!(split.allowed.len() as u64, FILTER_IDS - OPTED_OUT);
            }
            done.store(true, std::sync::atomic::Ordering::Release);
            took
        })
    };
    let checks = {
        let (c, done) = (Client::new(&app.url(""), None), done.clone());
        std::thread::spawn(move || {
            let mut took = Vec::new();
            let mut i = 0u64;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let started = Instant::now();
                let path = format!("/v1/check?customer={}&service=rating&channel=email", i * stride);
                let a = c.send("GET", &path, None, None).unwrap();
                took.push(started.elapsed());
                assert_eq!(a.status, 200);
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            took
        })
    };
    let writes = {
        let (c, done) = (Client::new(&app.url(""), None), done.clone());
        std::thread::spawn(move || {
            let mut took = Vec::new();
            let mut i = 0u64;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let started = Instant::now();
                let path = format!("/v1/customers/{}/preferences/rating/sms", 10_000_000 + i);
                let a = c.send("PUT", &path, Some(JSON), body(&json!({"status": "opted_out"}))).unwrap();
                took.push(started.elapsed());
                assert_eq!(a.status, 200);
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            took
        })
    };
    let filter_took = filters.join().unwrap();
    let mut check_took = checks.join().unwrap();
    let mut write_took = writes.join().unwrap();
    check_took.sort();
    write_took.sort();
    assert!(!check_took.is_empty() && !write_took.is_empty(), "checks and writes were answered meanwhile");
    println!("filters of {FILTER_IDS} ids took {filter_took:?}");
    for (what, took) in [("check", &check_took), ("write", &write_took)] {
        println!(
            "{what}s during the filters: {} answered, median {:?}, p99 {:?}, worst {:?}",
            took.len(),
            pct(took, 0.5),
            pct(took, 0.99),
            took.last().unwrap()
        );
    }
}

// ------------------------------------------------- slow and idle clients

#[test]
fn half_sent_request_heads_are_closed_within_the_head_timeout() {
    let app = util::spawn_with(|c| {
        c.header_read_timeout = Duration::from_secs(1);
        c.idle_timeout = Duration::from_secs(60);
    });
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = connect(app.addr);
            s.write_all(
                b"GET /v1/check?customer=1&service=rating&channel=email HTTP/1.1\r\nHost: x\r\nX-Slow:",
            )
            .unwrap();
            s
        })
        .collect();
    // Closed on the head clock, long before the idle one.
    for (i, s) in slow.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(20)), "half-sent head {i} is still open");
    }
    println!("20 half-sent heads closed after {:?} (head timeout 1 s)", started.elapsed());

    // The head clock starts with a head's first byte, not when a connection
    // goes idle: a keep-alive connection quiet for longer than the head
    // timeout still serves its next request.
    let mut s = connect(app.addr);
    assert_eq!(exchange(&mut s, &get("/healthz")).status, 200);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(exchange(&mut s, &get("/healthz")).status, 200);
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let app = util::spawn_with(|c| {
        c.header_read_timeout = Duration::from_secs(30);
        c.idle_timeout = Duration::from_secs(1);
    });
    // Connected and silent.
    let started = Instant::now();
    let mut silent = connect(app.addr);
    assert!(closed_within(&mut silent, Duration::from_secs(20)), "a silent connection is still open");
    println!("a silent connection closed after {:?} (idle timeout 1 s)", started.elapsed());
    // Served, then idle.
    let mut s = connect(app.addr);
    assert_eq!(exchange(&mut s, &get("/healthz")).status, 200);
    assert!(closed_within(&mut s, Duration::from_secs(20)), "an idle keep-alive connection is still open");
}

#[test]
fn connections_over_the_cap_are_refused_while_served_ones_keep_working() {
    let app = util::spawn_with(|c| {
        c.max_connections = 4;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let mut served: Vec<TcpStream> = (0..4).map(|_| connect(app.addr)).collect();
    for s in &mut served {
        assert_eq!(exchange(s, &get("/healthz")).status, 200);
    }
    // The fifth is closed at once, without an answer, even with a request.
    for _ in 0..3 {
        let mut extra = connect(app.addr);
        let _ = extra.write_all(&get("/healthz"));
        assert!(closed_within(&mut extra, Duration::from_secs(10)), "a connection over the cap was kept");
    }
    // The served ones are undisturbed, and the metrics listener has its own cap.
    for s in &mut served {
        assert_eq!(exchange(s, &get("/v1/channels")).status, 200);
    }
    let metrics = Client::new(&format!("http://{}", app.metrics_addr.unwrap()), None);
    assert_eq!(metric(&metrics, "prefsd_connections_refused_total{listener=\"api\"}"), 3.0);
    assert_eq!(metric(&metrics, "prefsd_connections{listener=\"api\"}"), 4.0);
    // A slot freed is a slot taken again.
    drop(served.pop());
    util::wait_for("a freed slot", Duration::from_secs(10), || {
        let mut s = connect(app.addr);
        let _ = s.write_all(&get("/healthz"));
        let mut first = [0u8; 12];
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(2);
        while got < first.len() && Instant::now() < deadline {
            match s.read(&mut first[got..]) {
                Ok(0) => return None,
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return None,
            }
        }
        (&first[..] == b"HTTP/1.1 200").then_some(())
    });
}

// ----------------------------------------------- answers that close the connection

#[test]
fn a_413_says_connection_close_and_a_pooled_client_goes_on() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    let token = issue(c, 1, "rating", "email");
    let big = vec![b'x'; 200 * 1024];
    let boundary = "----prefsd413";
    let mut multipart = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"pad\"\r\n\r\n"
    )
    .into_bytes();
    multipart.extend_from_slice(&big);
    multipart.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let multipart_type = format!("multipart/form-data; boundary={boundary}");
    let mut form = b"List-Unsubscribe=One-Click&pad=".to_vec();
    form.extend_from_slice(&big);
    let mut redeem = br#"{"action":"opt_out","token":""#.to_vec();
    redeem.extend_from_slice(&big);
    redeem.extend_from_slice(b"\"}");
    let page = format!("/u/{token}");
    let cases: [(&str, &str, &[u8]); 4] = [
        ("/v1/tokens", JSON, &big),
        ("/v1/tokens/redeem", JSON, &redeem),
        (&page, FORM, &form),
        (&page, &multipart_type, &multipart),
    ];
    for (path, content_type, body) in cases {
        let mut s = connect(app.addr);
        let a = exchange(&mut s, &post(path, content_type, body));
        assert_eq!(a.status, 413, "{path} {content_type}: {a:?}");
        assert_eq!(a.header("connection"), Some("close"), "{path} {content_type}: {a:?}");
        if path.starts_with("/v1/") {
            assert_eq!(a.json()["error"]["code"], "body_too_large", "{path}");
        }
        assert!(closed_within(&mut s, Duration::from_secs(10)), "{path}: the connection stayed open");
        // The same without Content-Length: refused while reading, chunk by chunk.
        let mut s = connect(app.addr);
        let mut chunked = format!(
            "POST {path} HTTP/1.1\r\nHost: prefsd\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for part in body.chunks(8192) {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let a = exchange(&mut s, &chunked);
        assert_eq!(a.status, 413, "{path} chunked: {a:?}");
        assert_eq!(a.header("connection"), Some("close"), "{path} chunked: {a:?}");
    }
    assert!(allowed(c, 1, "rating", "email"), "no refused one-click wrote");
    // A pooled client sends its next request on a fresh connection.
    for _ in 0..5 {
        let a = c.send("POST", "/v1/tokens", Some(JSON), Some(big.clone())).unwrap();
        assert_eq!(a.status, 413);
        assert_eq!(c.send("GET", "/healthz", None, None).unwrap().status, 200);
    }
    // An answer after the whole body was read keeps the connection.
    let mut s = connect(app.addr);
    let a = exchange(
        &mut s,
        &post("/v1/tokens", JSON, b"{\"customer\": 1, \"service\": \"rating\", \"channel\": \"x\"}"),
    );
    assert_eq!(a.status, 404, "{a:?}");
    assert_eq!(a.header("connection"), None);
    assert_eq!(exchange(&mut s, &get("/healthz")).status, 200);
}

#[test]
fn other_answers_that_close_the_connection_say_so() {
    let app = util::spawn_with(|c| c.idle_timeout = Duration::from_secs(1));
    // A body that stops arriving: 408 once nothing came for the idle period.
    let mut s = connect(app.addr);
    let head = "POST /v1/tokens HTTP/1.1\r\nHost: prefsd\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"customer\"";
    let a = exchange(&mut s, head.as_bytes());
    assert_eq!(a.status, 408, "{a:?}");
    assert_eq!(a.json()["error"]["code"], "body_timeout");
    assert_eq!(a.header("connection"), Some("close"));
    assert!(closed_within(&mut s, Duration::from_secs(10)));
    // hyper's own answers to heads it cannot take.
    let mut s = connect(app.addr);
    let huge = format!("GET /healthz HTTP/1.1\r\nHost: prefsd\r\nX-Big: {}\r\n\r\n", "x".repeat(1 << 20));
    let a = exchange(&mut s, huge.as_bytes());
    assert_eq!(a.status, 431, "{a:?}");
    assert_eq!(a.header("connection"), Some("close"));
    // A client that asks for close gets it said back.
    let mut s = connect(app.addr);
    let a = exchange(&mut s, b"GET /healthz HTTP/1.1\r\nHost: prefsd\r\nConnection: close\r\n\r\n");
    assert_eq!((a.status, a.header("connection")), (200, Some("close")));
    assert!(closed_within(&mut s, Duration::from_secs(10)));
}

// ------------------------------------------------------------------- input

#[test]
fn a_repeated_query_parameter_is_refused_naming_it() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    let cases = [
        ("GET", "/v1/check?customer=1&customer=2&service=rating&channel=email", "customer"),
        ("GET", "/v1/check?customer=1&service=rating&channel=email&ser%76ice=other", "service"),
        ("POST", "/v1/filter?service=rating&service=other&channel=email", "service"),
        ("POST", "/v1/filter?service=rating&channel=email&channel=sms", "channel"),
        ("GET", "/v1/audit?after=0&limit=5&after=9", "after"),
        ("GET", "/v1/services?x=1&x=2", "x"),
    ];
    for (method, path, name) in cases {
        let body = (method == "POST").then(|| b"{\"customers\": [1]}".to_vec());
        let a = c.send(method, path, body.as_ref().map(|_| JSON), body).unwrap();
        assert_eq!(a.status, 400, "{path}");
        let v = a.json();
        assert_eq!(v["error"]["code"], "invalid_parameter", "{path}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("\"{name}\"")), "{path}: {message}");
    }
    // Once each is fine.
    assert!(allowed(c, 1, "rating", "email"));
}

#[test]
fn bulk_caps_stop_the_parse_at_the_cap() {
    let app = util::spawn_with(|c| c.max_batch_items = 5);
    let c = &app.client;
    create_service(c, "rating");
    // Each body goes one item past the cap and then ends mid-list: a parser
    // that read it all would answer 400 for the broken JSON; stopping at the
    // cap answers 413 without reading on.
    let check = r#"{"customer": 1, "service": "rating", "channel": "email"}"#;
    let row = r#"{"customer": 1, "service": "rating", "channel": "email", "status": "opted_out"}"#;
    let cases = [
        ("/v1/check", format!("{{\"checks\": [{}", [check; 6].join(","))),
        ("/v1/filter?service=rating&channel=email", "{\"customers\": [1,2,3,4,5,6,7,".to_owned()),
        ("/v1/preferences/import", format!("{{\"items\": [{}", [row; 6].join(","))),
    ];
    for (path, text) in cases {
        let a = c.send("POST", path, Some(JSON), Some(text.into_bytes())).unwrap();
        assert_eq!(a.status, 413, "{path}: {}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.error_code().as_deref(), Some("too_many_items"), "{path}");
    }
    // At the cap, and broken: the usual 400.
    let a = c
        .send(
            "POST",
            "/v1/filter?service=rating&channel=email",
            Some(JSON),
            Some(b"{\"customers\": [1,2,3".to_vec()),
        )
        .unwrap();
    assert_eq!(a.status, 400);
    // A roaring body is counted from its header: here the header of a
    // million ids with no containers behind it.
    let mut bitmap = Vec::new();
    let full: roaring::RoaringBitmap = (0..1_000_000u32).collect();
    full.serialize_into(&mut bitmap).unwrap();
    bitmap.truncate(8 + 4 * 16);
    let a = c
        .send(
            "POST",
            "/v1/filter?service=rating&channel=email",
            Some("application/vnd.roaring"),
            Some(bitmap),
        )
        .unwrap();
    assert_eq!(a.status, 413, "{}", String::from_utf8_lossy(&a.body));
    assert!(audit_of(c, 1).is_empty(), "a refused import wrote nothing");
}

// -------------------------------------------------------------- recipients

#[test]
fn forged_tokens_are_limited_but_a_valid_link_from_the_same_address_is_not() {
    let app = util::spawn_app(); // the default budget: a burst of 20, 30 a minute
    let c = &app.client;
    create_service(c, "rating");
    let token = issue(c, 7, "rating", "email");
    // Tampered copies of a real token, and made-up ones.
    let forged = |i: usize| -> String {
        if i % 2 == 0 {
            let mut t = token.clone().into_bytes();
            let at = i % t.len();
            t[at] = if t[at] == b'A' { b'B' } else { b'A' };
            String::from_utf8(t).unwrap()
        } else {
            format!("AQ{i:0>40}")
        }
    };
    let mut refused = 0;
    for i in 0..300 {
        let a = c
            .send(
                "POST",
                "/v1/tokens/redeem",
                Some(JSON),
                body(&json!({"token": forged(i), "action": "opt_out"})),
            )
            .unwrap();
        match a.status {
            400 => assert_eq!(a.error_code().as_deref(), Some("invalid_token")),
            429 => {
                assert_eq!(a.error_code().as_deref(), Some("rate_limited"));
                refused += 1;
            }
            other => panic!("forged token {i}: {other}"),
        }
        if i < 20 {
            assert_eq!(a.status, 400, "attempt {i} is within the burst");
        }
    }
    assert!(refused >= 250, "only {refused} of 300 forged tokens were refused");
    // The forged page posts and views are limited too.
    assert_eq!(c.send("GET", &format!("/u/{}", forged(1)), None, None).unwrap().status, 429);
    assert_eq!(
        c.send(
            "POST",
            &format!("/u/{}", forged(1)),
            Some(FORM),
            Some(b"List-Unsubscribe=One-Click".to_vec())
        )
        .unwrap()
        .status,
        429
    );
    // The real link, from the same address: redeemed, and the customer is out.
    let a = c
        .send("POST", "/v1/tokens/redeem", Some(JSON), body(&json!({"token": token, "action": "opt_out"})))
        .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert!(!allowed(c, 7, "rating", "email"));
    // The page, its forms and one-click work as well.
    let page = format!("/u/{token}");
    assert_eq!(c.send("GET", &page, None, None).unwrap().status, 200);
    let form =
        |fields: &str| c.send("POST", &page, Some(FORM), Some(fields.as_bytes().to_vec())).unwrap().status;
    assert_eq!(form("action=opt_in&scope=token"), 200);
    assert!(allowed(c, 7, "rating", "email"));
    assert_eq!(form("List-Unsubscribe=One-Click"), 200);
    assert!(!allowed(c, 7, "rating", "email"));
    let a = c
        .send(
            "POST",
            "/v1/tokens/redeem",
            Some(JSON),
            body(&json!({"token": forged(3), "action": "opt_out"})),
        )
        .unwrap();
    assert_eq!(a.status, 429, "forged tokens are still refused");
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("failed attempts"));
}

#[test]
fn one_link_replayed_300_times_adds_at_most_one_audit_entry() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    create_service(c, "waitlist");

    // One-click, 300 times: the first writes, the rest find it in force.
    let page = format!("/u/{}", issue(c, 1, "rating", "email"));
    for i in 0..300 {
        let a = c.send("POST", &page, Some(FORM), Some(b"List-Unsubscribe=One-Click".to_vec())).unwrap();
        assert_eq!(a.status, 200, "one-click {i}");
    }
    assert_eq!(audit_of(c, 1).len(), 1);
    assert!(!allowed(c, 1, "rating", "email"));

    // Redeem, 300 times: one entry, and every answer names the same record.
    let token = issue(c, 2, "*", "email");
    let redeem = |action: &str| {
        let a = c
            .send("POST", "/v1/tokens/redeem", Some(JSON), body(&json!({"token": token, "action": action})))
            .unwrap();
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        a.json()
    };
    let first = redeem("opt_out");
    for _ in 1..300 {
        assert_eq!(redeem("opt_out"), first, "the same record, the same seq");
    }
    assert_eq!(audit_of(c, 2).len(), 1);
    assert_eq!(audit_of(c, 2)[0]["seq"], first["seq"]);

    // A newer, narrower choice undoes part of it: the same link writes again.
    let path = "/v1/customers/2/preferences/rating/email";
    ok(c, "PUT", path, Some(json!({"status": "opted_in"})));
    assert!(allowed(c, 2, "rating", "email"));
    let again = redeem("opt_out");
    assert_ne!(again["seq"], first["seq"]);
    assert!(!allowed(c, 2, "rating", "email"), "the link's broad opt-out is in force again");
    assert_eq!(audit_of(c, 2).len(), 3);

    // The page's update form: 2,800 fields (most of a 64 KiB body) naming
    // the same pairs write each changed pair once, and nothing for a pair
    // already as asked.
    let page = format!("/u/{}", issue(c, 3, "rating", "email"));
    let mut fields = Vec::new();
    for _ in 0..700 {
        fields.extend([
            "shown=rating%2Femail",
            "shown=rating%2Fsms",
            "shown=waitlist%2Femail",
            "allow=rating%2Femail",
        ]);
    }
    let form = format!("action=update&{}", fields.join("&"));
    let a = c.send("POST", &page, Some(FORM), Some(form.into_bytes())).unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let entries = audit_of(c, 3);
    let pairs: Vec<String> = entries
        .iter()
        .map(|e| format!("{}/{}", e["service"].as_str().unwrap(), e["channel"].as_str().unwrap()))
        .collect();
    assert_eq!(entries.len(), 2, "rating/sms and waitlist/email, once each: {pairs:?}");
    assert!(
        allowed(c, 3, "rating", "email")
            && !allowed(c, 3, "rating", "sms")
            && !allowed(c, 3, "waitlist", "email")
    );
}

// ------------------------------------------------------------ the process

#[test]
fn serving_a_public_address_without_keys_exits_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("0.0.0.0:{}", util::free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_prefsd"))
        .args(["serve", "--listen", &listen, "--data"])
        .arg(dir.path().join("data"))
        .env_remove("PREFSD_KEYS")
        .env_remove("PREFSD_CONFIG")
        .env_remove("PREFSD_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = util::wait_for("prefsd to exit", Duration::from_secs(30), || child.try_wait().unwrap());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "exit status {status}");
    assert!(stderr.contains(&format!("listen address {listen} is not loopback")), "{stderr}");
    assert!(stderr.contains("no API keys are configured"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing was created before refusing");
}
