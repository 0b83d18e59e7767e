//! The HTTP contract (v1) over real HTTP: every route, its answers, and its
//! answers to bad input. Every error is checked against the contract
//! `{"error":{"code":"snake_case","message":"…"}}` with its status.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use prefsd::auth::{ApiKey, Role, hash_key, parse_hash};
use prefsd::client::{Answer, Client};
use roaring::RoaringBitmap;
use serde_json::{Value, json};

// ---------------------------------------------------------------- helpers

const JSON: &str = "application/json";
const ROARING: &str = "application/vnd.roaring";

/// Sends `body` as JSON (or nothing).
fn send(c: &Client, method: &str, path: &str, body: Option<&Value>) -> Answer {
    match body {
        Some(b) => c.send(method, path, Some(JSON), Some(b.to_string().into_bytes())),
        None => c.send(method, path, None, None),
    }
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Sends raw bytes with a content type.
fn send_raw(c: &Client, method: &str, path: &str, content_type: Option<&str>, body: Vec<u8>) -> Answer {
    c.send(method, path, content_type, Some(body)).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn text(a: &Answer) -> String {
    String::from_utf8_lossy(&a.body).into_owned()
}

/// Asserts a JSON success answer with `status` and returns its body.
fn expect(a: Answer, status: u16) -> Value {
    assert_eq!(a.status, status, "unexpected status; body: {}", text(&a));
    let ct = a.content_type.as_deref().unwrap_or("");
    assert!(ct.starts_with(JSON), "content type {ct:?}; body: {}", text(&a));
    let v: Value = serde_json::from_slice(&a.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&a)));
    v
}

fn is_snake_case(code: &str) -> bool {
    let b = code.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_lowercase()
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        && !code.ends_with('_')
        && !code.contains("__")
}

/// Asserts the error contract: `status`, a JSON body that is exactly
/// `{"error":{"code":code,"message":"non-empty sentence"}}`.
#[track_caller]
fn expect_error(a: &Answer, status: u16, code: &str) {
    let body = text(a);
    assert_eq!(a.status, status, "expected {status} {code}; body: {body}");
    let ct = a.content_type.as_deref().unwrap_or("");
    assert!(ct.starts_with(JSON), "error content type {ct:?}; body: {body}");
    let v: Value =
        serde_json::from_slice(&a.body).unwrap_or_else(|e| panic!("error body not JSON ({e}): {body}"));
    let top = v.as_object().unwrap_or_else(|| panic!("error body not an object: {body}"));
    assert_eq!(top.keys().collect::<Vec<_>>(), ["error"], "error body has other keys: {body}");
    let inner = v["error"].as_object().unwrap_or_else(|| panic!("error is not an object: {body}"));
    let mut keys: Vec<&String> = inner.keys().collect();
    keys.sort();
    assert_eq!(keys, ["code", "message"], "error object keys: {body}");
    let got = inner["code"].as_str().unwrap_or_else(|| panic!("code is not a string: {body}"));
    assert!(is_snake_case(got), "code {got:?} is not snake_case");
    assert_eq!(got, code, "wrong error code; body: {body}");
    let message = inner["message"].as_str().unwrap_or_else(|| panic!("message is not a string: {body}"));
    assert!(!message.trim().is_empty(), "empty message: {body}");
}

/// Registers a service and asserts 201.
fn create_service(c: &Client, slug: &str) -> Value {
    let v = expect(send(c, "POST", "/v1/services", Some(&json!({"slug": slug}))), 201);
    assert_eq!(v["slug"], slug);
    v
}

/// Writes a preference and returns the answer (asserting 200).
fn put(c: &Client, customer: &str, service: &str, channel: &str, status: &str) -> Value {
    let path = format!("/v1/customers/{customer}/preferences/{service}/{channel}");
    expect(send(c, "PUT", &path, Some(&json!({"status": status}))), 200)
}

/// `GET /v1/check`, asserting 200; returns `allowed`.
fn allowed(c: &Client, customer: u64, service: &str, channel: &str) -> bool {
    let v = expect(
        send(c, "GET", &format!("/v1/check?customer={customer}&service={service}&channel={channel}"), None),
        200,
    );
    assert_eq!(v["customer"], json!(customer));
    v["allowed"].as_bool().unwrap_or_else(|| panic!("allowed is not a bool: {v}"))
}

/// All audit entries via `/v1/audit` paging.
fn all_audit(c: &Client, limit: usize) -> Vec<Value> {
    let mut after = 0u64;
    let mut out = Vec::new();
    loop {
        let page = expect(send(c, "GET", &format!("/v1/audit?after={after}&limit={limit}"), None), 200);
        let entries = page["entries"].as_array().unwrap();
        assert!(entries.len() <= limit);
        out.extend(entries.iter().cloned());
        let next = page["next_after"].as_u64().unwrap();
        if next == after {
            assert!(entries.is_empty(), "a final page has entries: {page}");
            return out;
        }
        assert!(next > after, "next_after went backwards: {after} -> {next}");
        after = next;
    }
}

/// A parsed raw HTTP answer.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Writes `head` (which must ask for `Connection: close`) and `body` on a
/// fresh connection and reads the whole answer.
fn raw_http(addr: SocketAddr, head: &str, body: &[u8]) -> Raw {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Raw { status, headers, body: buf[end + 4..].to_vec() }
}

impl From<Raw> for Answer {
    fn from(r: Raw) -> Answer {
        Answer { status: r.status, content_type: r.header("content-type").map(str::to_owned), body: r.body }
    }
}

fn bitmap_bytes(b: &RoaringBitmap) -> Vec<u8> {
    let mut out = Vec::new();
    b.serialize_into(&mut out).unwrap();
    out
}

fn decode_bitmap(a: &Answer) -> RoaringBitmap {
    assert_eq!(a.status, 200, "filter answer: {}", text(a));
    assert_eq!(a.content_type.as_deref(), Some(ROARING));
    RoaringBitmap::deserialize_from(&a.body[..]).expect("the answer is a portable roaring bitmap")
}

// ------------------------------------------------------ health and routing

#[test]
fn healthz_readyz_and_metrics_answer() {
    let app = util::spawn_app();
    let c = &app.client;
    assert_eq!(expect(send(c, "GET", "/healthz", None), 200), json!({"status": "ok"}));
    let ready = expect(send(c, "GET", "/readyz", None), 200);
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["last_seq"], 0);

    create_service(c, "rating");
    let w = put(c, "1", "rating", "email", "opted_out");
    let ready = expect(send(c, "GET", "/readyz", None), 200);
    assert_eq!(ready["last_seq"], w["seq"], "readyz reports the last sequence number");
    assert!(!allowed(c, 1, "rating", "email"));
    // The batch answers each check in order: 1 is opted out of rating email,
    // 2 is not.
    let batch = json!({"checks": [{"customer": 1, "service": "rating", "channel": "email"},
                                  {"customer": 2, "service": "rating", "channel": "email"}]});
    assert_eq!(expect(send(c, "POST", "/v1/check", Some(&batch)), 200), json!({"results": [false, true]}));

    let m = send(c, "GET", "/metrics", None);
    assert_eq!(m.status, 200);
    assert!(m.content_type.as_deref().unwrap_or("").starts_with("text/plain"), "{:?}", m.content_type);
    let body = text(&m);
    let value = |prefix: &str| -> f64 {
        let line = body
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no metric line starting {prefix:?} in:\n{body}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("prefsd_checks_total "), 3.0, "one single check and a batch of two");
    assert_eq!(value("prefsd_preference_writes_total{source=\"api\"}"), 1.0);
    assert_eq!(value("prefsd_last_applied_sequence "), w["seq"].as_f64().unwrap());
    assert_eq!(value("prefsd_index_opted_out{service=\"rating\",channel=\"email\"}"), 1.0);
    assert_eq!(value("prefsd_index_opted_out{service=\"rating\",channel=\"sms\"}"), 0.0);
    assert!(body.contains("route=\"/v1/check\""), "requests are counted by route:\n{body}");
    assert!(body.contains("prefsd_build_info"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
}

#[test]
fn unknown_routes_are_json_404() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/v1"),
        ("GET", "/v1/"),
        ("GET", "/v2/check?customer=1&service=rating&channel=email"),
        ("GET", "/v1/nothing"),
        ("GET", "/v1/check/extra"),
        ("POST", "/v1/filter/"),
        ("GET", "/v1/customers/1"),
        ("GET", "/v1/customers/1/preferences/rating"),
        ("PUT", "/v1/customers/1/preferences/rating/email/extra"),
        ("GET", "/v1/services/rating/extra"),
        ("GET", "/healthz/deep"),
        ("DELETE", "/nowhere"),
        ("GET", &format!("/{}", "x".repeat(5000))),
    ] {
        expect_error(&send(c, method, path, None), 404, "not_found");
    }
    let a = send(c, "GET", "/v1/nothing", None);
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("/v1/nothing"));
}

#[test]
fn wrong_methods_are_json_405() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    for (method, path) in [
        ("DELETE", "/v1/check"),
        ("PUT", "/v1/check"),
        ("GET", "/v1/filter?service=rating&channel=email"),
        ("POST", "/v1/customers/1/preferences"),
        ("DELETE", "/v1/customers/1/preferences"),
        ("GET", "/v1/customers/1/preferences/rating/email"),
        ("POST", "/v1/customers/1/preferences/rating/email"),
        ("DELETE", "/v1/customers/1/preferences/rating/email"),
        ("POST", "/v1/customers/1/audit"),
        ("POST", "/v1/audit"),
        ("GET", "/v1/preferences/import"),
        ("PUT", "/v1/preferences/import"),
        ("DELETE", "/v1/services"),
        ("PUT", "/v1/services"),
        ("PUT", "/v1/services/rating"),
        ("DELETE", "/v1/services/rating"),
        ("POST", "/v1/channels"),
        ("POST", "/healthz"),
        ("PUT", "/readyz"),
        ("DELETE", "/metrics"),
    ] {
        expect_error(&send(c, method, path, None), 405, "method_not_allowed");
    }
    // The refused methods changed nothing.
    let s = expect(send(c, "GET", "/v1/services/rating", None), 200);
    assert_eq!(s["archived"], false);
    assert!(all_audit(c, 100).is_empty());
}

// ------------------------------------------------------ channels, services

#[test]
fn channels_are_the_configured_ones() {
    let app = util::spawn_app();
    assert_eq!(
        expect(send(&app.client, "GET", "/v1/channels", None), 200),
        json!({"channels": ["email", "sms"]})
    );

    let app = util::spawn_with(|c| {
        c.channels =
            ["email", "sms", "push"].iter().map(|h| prefsd::domain::ChannelName::parse(h).unwrap()).collect()
    });
    let c = &app.client;
    assert_eq!(
        expect(send(c, "GET", "/v1/channels", None), 200),
        json!({"channels": ["email", "sms", "push"]})
    );
    create_service(c, "rating");
    put(c, "3", "*", "push", "opted_out");
    assert!(!allowed(c, 3, "rating", "push"));
    assert!(allowed(c, 3, "rating", "email"));
    expect_error(
        &send(c, "GET", "/v1/check?customer=3&service=rating&channel=fax", None),
        404,
        "unknown_channel",
    );
}

#[test]
fn services_are_created_listed_read_and_updated() {
    let app = util::spawn_app();
    let c = &app.client;
    assert_eq!(expect(send(c, "GET", "/v1/services", None), 200), json!({"services": []}));

    let created = expect(
        send(
            c,
            "POST",
            "/v1/services",
            Some(&json!({"slug": "rating", "name": "Ratings", "description": "Asks for a rating"})),
        ),
        201,
    );
    assert_eq!(created["slug"], "rating");
    assert_eq!(created["name"], "Ratings");
    assert_eq!(created["description"], "Asks for a rating");
    assert_eq!(created["archived"], false);
    let created_at: jiff::Timestamp = created["created_at"].as_str().unwrap().parse().unwrap();
    let updated_at: jiff::Timestamp = created["updated_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(created_at, updated_at);

    // Name defaults to the slug, description to empty.
    let bare = create_service(c, "waitlist-2");
    assert_eq!(bare["name"], "waitlist-2");
    assert_eq!(bare["description"], "");

    let list = expect(send(c, "GET", "/v1/services", None), 200);
    let slugs: Vec<&str> =
        list["services"].as_array().unwrap().iter().map(|s| s["slug"].as_str().unwrap()).collect();
    assert_eq!(slugs, ["rating", "waitlist-2"]);
    assert_eq!(expect(send(c, "GET", "/v1/services/rating", None), 200), created);

    let renamed =
        expect(send(c, "PATCH", "/v1/services/rating", Some(&json!({"name": "Rating requests"}))), 200);
    assert_eq!(renamed["name"], "Rating requests");
    assert_eq!(renamed["description"], "Asks for a rating", "unspecified fields stay");
    assert_eq!(renamed["created_at"], created["created_at"]);
    let renamed_at: jiff::Timestamp = renamed["updated_at"].as_str().unwrap().parse().unwrap();
    assert!(renamed_at >= updated_at);
    assert_eq!(expect(send(c, "GET", "/v1/services/rating", None), 200), renamed);

    // Duplicates conflict and change nothing.
    let dup = send(c, "POST", "/v1/services", Some(&json!({"slug": "rating", "name": "Other"})));
    expect_error(&dup, 409, "service_exists");
    assert_eq!(expect(send(c, "GET", "/v1/services/rating", None), 200)["name"], "Rating requests");
}

#[test]
fn services_refuse_bad_input() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    let post = |body: &str| send_raw(c, "POST", "/v1/services", Some(JSON), body.as_bytes().to_vec());
    expect_error(&post("{\"slug\":"), 400, "invalid_json");
    expect_error(&post(""), 400, "invalid_json");
    expect_error(&post("{\"slug\":\"ok\"} trailing"), 400, "invalid_json");
    expect_error(&post("\"ok\""), 400, "invalid_field");
    expect_error(&post("{}"), 400, "invalid_field");
    expect_error(&post("{\"slug\": 5}"), 400, "invalid_field");
    expect_error(&post("{\"slug\": \"ok\", \"name\": 7}"), 400, "invalid_field");
    expect_error(&post("{\"slug\": \"ok\", \"colour\": \"red\"}"), 400, "invalid_field");
    for bad in ["Rating", "-x", "_x", "a b", "*", "a/b", "é", &"a".repeat(65), ""] {
        expect_error(&send(c, "POST", "/v1/services", Some(&json!({"slug": bad}))), 400, "invalid_field");
    }
    let long_name = json!({"slug": "ok", "name": "n".repeat(201)});
    expect_error(&send(c, "POST", "/v1/services", Some(&long_name)), 400, "invalid_field");
    let long_description = json!({"slug": "ok", "description": "d".repeat(2001)});
    expect_error(&send(c, "POST", "/v1/services", Some(&long_description)), 400, "invalid_field");
    expect_error(
        &send_raw(c, "POST", "/v1/services", Some("text/plain"), b"{\"slug\":\"ok\"}".to_vec()),
        415,
        "unsupported_media_type",
    );

    expect_error(&send(c, "GET", "/v1/services/nope", None), 404, "unknown_service");
    expect_error(&send(c, "GET", "/v1/services/Bad%20Slug", None), 400, "invalid_input");
    expect_error(&send(c, "GET", "/v1/services/%FF", None), 400, "invalid_path");
    expect_error(
        &send(c, "PATCH", "/v1/services/nope", Some(&json!({"archived": true}))),
        404,
        "unknown_service",
    );
    expect_error(
        &send(c, "PATCH", "/v1/services/NOPE", Some(&json!({"archived": true}))),
        400,
        "invalid_input",
    );
    let patch =
        |body: &str| send_raw(c, "PATCH", "/v1/services/rating", Some(JSON), body.as_bytes().to_vec());
    expect_error(&patch("{\"archived\": \"yes\"}"), 400, "invalid_field");
    expect_error(&patch("{\"archived\": true, \"slug\": \"other\"}"), 400, "invalid_field");
    expect_error(&patch("{\"name\": null, "), 400, "invalid_json");
    expect_error(&patch(&json!({"name": "n".repeat(201)}).to_string()), 400, "invalid_field");

    // Nothing of that was stored.
    let list = expect(send(c, "GET", "/v1/services", None), 200);
    assert_eq!(list["services"].as_array().unwrap().len(), 1);
    let rating = expect(send(c, "GET", "/v1/services/rating", None), 200);
    assert_eq!(rating["archived"], false);
    assert_eq!(rating["name"], "rating");
}

#[test]
fn archived_services_refuse_writes_keep_history_and_still_answer_checks() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    let w = put(c, "10", "rating", "email", "opted_out");

    let archived = expect(send(c, "PATCH", "/v1/services/rating", Some(&json!({"archived": true}))), 200);
    assert_eq!(archived["archived"], true);
    assert_eq!(expect(send(c, "GET", "/v1/services/rating", None), 200)["archived"], true);
    let list = expect(send(c, "GET", "/v1/services", None), 200);
    assert_eq!(list["services"][0]["archived"], true, "archived services are still listed");

    // New writes are refused with 409, for every scope naming the service.
    for (customer, channel) in [("10", "email"), ("10", "sms"), ("11", "*")] {
        let path = format!("/v1/customers/{customer}/preferences/rating/{channel}");
        expect_error(&send(c, "PUT", &path, Some(&json!({"status": "opted_in"}))), 409, "service_archived");
    }
    let import =
        json!({"items": [{"customer": 10, "service": "rating", "channel": "email", "status": "opted_in"}]});
    let answer = expect(send(c, "POST", "/v1/preferences/import", Some(&import)), 200);
    assert_eq!(answer["accepted"], 0);
    assert_eq!(answer["results"][0]["error"]["code"], "service_archived");

    // Checks still answer, from the history.
    assert!(!allowed(c, 10, "rating", "email"));
    assert!(allowed(c, 10, "rating", "sms"));
    assert!(allowed(c, 11, "rating", "email"));
    let f = expect(
        send(c, "POST", "/v1/filter?service=rating&channel=email", Some(&json!({"customers": [10, 11]}))),
        200,
    );
    assert_eq!(f, json!({"allowed": [11], "suppressed": [10]}));

    // History stays.
    let prefs = expect(send(c, "GET", "/v1/customers/10/preferences", None), 200);
    assert_eq!(prefs["records"].as_array().unwrap().len(), 1);
    assert_eq!(prefs["records"][0]["status"], "opted_out");
    let audit = expect(send(c, "GET", "/v1/customers/10/audit", None), 200);
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1);
    assert_eq!(audit["entries"][0]["seq"], w["seq"]);
    assert_eq!(all_audit(c, 100).len(), 1);

    // Restored, it takes writes again.
    let restored = expect(send(c, "PATCH", "/v1/services/rating", Some(&json!({"archived": false}))), 200);
    assert_eq!(restored["archived"], false);
    put(c, "10", "rating", "email", "opted_in");
    assert!(allowed(c, 10, "rating", "email"));
}

// ------------------------------------------------------------------ checks

#[test]
fn single_checks_answer_and_refuse_bad_input() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    put(c, "5", "rating", "sms", "opted_out");

    let v = expect(send(c, "GET", "/v1/check?customer=5&service=rating&channel=sms", None), 200);
    assert_eq!(v, json!({"customer": 5, "service": "rating", "channel": "sms", "allowed": false}));
    let v = expect(send(c, "GET", "/v1/check?customer=5&service=rating&channel=email", None), 200);
    assert_eq!(v, json!({"customer": 5, "service": "rating", "channel": "email", "allowed": true}));
    // An unknown customer is opted in to everything.
    assert!(allowed(c, 123_456_789, "rating", "sms"));
    // Parameter order does not matter; the largest id is fine and comes back as a number.
    let v = expect(
        send(c, "GET", "/v1/check?channel=email&service=rating&customer=18446744073709551615", None),
        200,
    );
    assert_eq!(v["customer"], json!(u64::MAX));
    assert!(v["customer"].is_u64());
    let v = expect(send(c, "GET", "/v1/check?customer=0005&service=rating&channel=sms", None), 200);
    assert_eq!(v["customer"], json!(5), "leading zeros are still decimal");
    assert_eq!(v["allowed"], false);

    for bad in
        ["-1", "abc", "1.5", "+1", "", "%201", "1e3", "18446744073709551616", "99999999999999999999999"]
    {
        let a = send(c, "GET", &format!("/v1/check?customer={bad}&service=rating&channel=sms"), None);
        expect_error(&a, 400, "invalid_input");
    }
    for missing in [
        "/v1/check",
        "/v1/check?service=rating&channel=sms",
        "/v1/check?customer=1&channel=sms",
        "/v1/check?customer=1&service=rating",
    ] {
        expect_error(&send(c, "GET", missing, None), 400, "missing_parameter");
    }
    expect_error(
        &send(c, "GET", "/v1/check?customer=1&service=nope&channel=sms", None),
        404,
        "unknown_service",
    );
    expect_error(
        &send(c, "GET", "/v1/check?customer=1&service=rating&channel=fax", None),
        404,
        "unknown_channel",
    );
    expect_error(&send(c, "GET", "/v1/check?customer=1&service=*&channel=sms", None), 404, "unknown_service");
}

#[test]
fn batch_checks_answer_in_order_and_refuse_bad_input() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    create_service(c, "waitlist");
    put(c, "1", "rating", "email", "opted_out");
    put(c, "2", "*", "sms", "opted_out");

    let checks = json!({"checks": [
        {"customer": 1, "service": "rating", "channel": "email"},
        {"customer": "1", "service": "rating", "channel": "sms"},
        {"customer": 2, "service": "waitlist", "channel": "sms"},
        {"customer": 2, "service": "rating", "channel": "sms"},
        {"customer": "2", "service": "rating", "channel": "email"},
        {"customer": 1, "service": "waitlist", "channel": "email"},
        {"customer": 3, "service": "rating", "channel": "email"},
        {"customer": "1", "service": "rating", "channel": "email"},
    ]});
    let v = expect(send(c, "POST", "/v1/check", Some(&checks)), 200);
    assert_eq!(v, json!({"results": [false, true, false, false, true, true, true, false]}));
    assert_eq!(
        expect(send(c, "POST", "/v1/check", Some(&json!({"checks": []}))), 200),
        json!({"results": []})
    );

    let post = |body: &str| send_raw(c, "POST", "/v1/check", Some(JSON), body.as_bytes().to_vec());
    expect_error(&post("{\"checks\": [ {\"customer\": 1, "), 400, "invalid_json");
    expect_error(&post("not json"), 400, "invalid_json");
    expect_error(&post(""), 400, "invalid_json");
    expect_error(&post("{}"), 400, "invalid_field");
    expect_error(&post("{\"checks\": {}}"), 400, "invalid_field");
    expect_error(&post("{\"checks\": [], \"extra\": 1}"), 400, "invalid_field");
    expect_error(&post("{\"checks\": [{\"customer\": 1, \"service\": \"rating\"}]}"), 400, "invalid_field");
    expect_error(
        &post("{\"checks\": [{\"customer\": 1, \"service\": \"rating\", \"channel\": \"sms\", \"x\": 1}]}"),
        400,
        "invalid_field",
    );
    expect_error(
        &post("{\"checks\": [{\"customer\": 1, \"service\": 5, \"channel\": \"sms\"}]}"),
        400,
        "invalid_field",
    );
    for bad in [
        "-1",
        "1.5",
        "\"-1\"",
        "\"abc\"",
        "true",
        "null",
        "18446744073709551616",
        "\"18446744073709551616\"",
        "[1]",
    ] {
        let body = format!(
            "{{\"checks\": [{{\"customer\": {bad}, \"service\": \"rating\", \"channel\": \"sms\"}}]}}"
        );
        expect_error(&post(&body), 400, "invalid_field");
    }
    let unknown = json!({"checks": [
        {"customer": 1, "service": "rating", "channel": "email"},
        {"customer": 1, "service": "nope", "channel": "email"},
    ]});
    let a = send(c, "POST", "/v1/check", Some(&unknown));
    expect_error(&a, 404, "unknown_service");
    assert!(
        a.json()["error"]["message"].as_str().unwrap().contains("checks[1]"),
        "names the item: {}",
        text(&a)
    );
    let unknown = json!({"checks": [{"customer": 1, "service": "rating", "channel": "fax"}]});
    expect_error(&send(c, "POST", "/v1/check", Some(&unknown)), 404, "unknown_channel");
}

#[test]
fn customer_ids_are_numbers_or_decimal_strings_and_come_back_as_numbers() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    // A string id and a number id name the same customer.
    let w = put(c, "42", "rating", "email", "opted_out");
    assert_eq!(w["customer"], json!(42));
    assert!(w["customer"].is_u64());
    let big = "18446744073709551615";
    let w = put(c, big, "rating", "email", "opted_out");
    assert_eq!(w["customer"], json!(u64::MAX));
    let w = put(c, "4294967296", "rating", "email", "opted_out");
    assert_eq!(w["customer"], json!(4_294_967_296u64), "ids above 2^32 work too");

    let body = json!({"customers": ["42", 43, big, "4294967296", 4294967297u64, "0043"]});
    let f = expect(send(c, "POST", "/v1/filter?service=rating&channel=email", Some(&body)), 200);
    assert_eq!(f, json!({"allowed": [43, 4294967297u64, 43], "suppressed": [42, u64::MAX, 4294967296u64]}));
    for id in f["allowed"].as_array().unwrap().iter().chain(f["suppressed"].as_array().unwrap()) {
        assert!(id.is_u64(), "{id} is not a number");
    }

    let prefs = expect(send(c, "GET", "/v1/customers/0042/preferences", None), 200);
    assert_eq!(prefs["customer"], json!(42));
    let audit = expect(send(c, "GET", &format!("/v1/customers/{big}/audit"), None), 200);
    assert_eq!(audit["customer"], json!(u64::MAX));
    assert_eq!(audit["entries"][0]["customer"], json!(u64::MAX));
    let import =
        json!({"items": [{"customer": "77", "service": "rating", "channel": "sms", "status": "opted_out"}]});
    assert_eq!(expect(send(c, "POST", "/v1/preferences/import", Some(&import)), 200)["accepted"], 1);
    assert!(!allowed(c, 77, "rating", "sms"));
    let entries = all_audit(c, 100);
    assert!(entries.iter().all(|e| e["customer"].is_u64()), "{entries:?}");
}

#[test]
fn json_filter_splits_in_input_order_and_refuses_bad_input() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    for id in [3, 7, 9] {
        put(c, &id.to_string(), "rating", "email", "opted_out");
    }
    put(c, "8", "*", "*", "opted_out");
    let path = "/v1/filter?service=rating&channel=email";
    let body = json!({"customers": [9, 1, 8, 3, 2, 7, 5, 3]});
    let f = expect(send(c, "POST", path, Some(&body)), 200);
    assert_eq!(f, json!({"allowed": [1, 2, 5], "suppressed": [9, 8, 3, 7, 3]}));
    // A missing content type is taken as JSON; a +json type and parameters are accepted.
    let raw = br#"{"customers":[7,1]}"#.to_vec();
    for ct in [None, Some("application/json; charset=utf-8"), Some("application/problem+json")] {
        let f = expect(send_raw(c, "POST", path, ct, raw.clone()), 200);
        assert_eq!(f, json!({"allowed": [1], "suppressed": [7]}), "content type {ct:?}");
    }
    assert_eq!(
        expect(send(c, "POST", path, Some(&json!({"customers": []}))), 200),
        json!({"allowed": [], "suppressed": []})
    );
    let other = expect(
        send(c, "POST", "/v1/filter?service=rating&channel=sms", Some(&json!({"customers": [3, 8]}))),
        200,
    );
    assert_eq!(other, json!({"allowed": [3], "suppressed": [8]}));

    let post = |body: &str| send_raw(c, "POST", path, Some(JSON), body.as_bytes().to_vec());
    expect_error(&post("{\"customers\": [1, 2"), 400, "invalid_json");
    expect_error(&post("{\"customers\": [1, 2]}}"), 400, "invalid_json");
    expect_error(&post("{\"customers\": \"1,2\"}"), 400, "invalid_field");
    expect_error(&post("{\"customers\": [1], \"service\": \"rating\"}"), 400, "invalid_field");
    expect_error(&post("{\"recipients\": [1]}"), 400, "invalid_field");
    for bad in ["-1", "1.5", "\"x\"", "\"-3\"", "\" 1\"", "null", "{}", "18446744073709551616"] {
        expect_error(&post(&format!("{{\"customers\": [1, {bad}]}}")), 400, "invalid_field");
    }
    let body = Some(&json!({"customers": [1]}));
    expect_error(&send(c, "POST", "/v1/filter?service=nope&channel=email", body), 404, "unknown_service");
    expect_error(&send(c, "POST", "/v1/filter?service=rating&channel=fax", body), 404, "unknown_channel");
    expect_error(&send(c, "POST", "/v1/filter?channel=email", body), 400, "missing_parameter");
    expect_error(&send(c, "POST", "/v1/filter?service=rating", body), 400, "missing_parameter");
    expect_error(&send(c, "POST", "/v1/filter", body), 400, "missing_parameter");
}

// ------------------------------------------------------------- preferences

#[test]
fn put_accepts_all_four_scope_shapes_including_percent_encoded_star() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    create_service(c, "waitlist");
    let pairs = [("rating", "email"), ("rating", "sms"), ("waitlist", "email"), ("waitlist", "sms")];
    let allowed_pairs = |customer: u64| -> Vec<bool> {
        pairs.iter().map(|(s, h)| allowed(c, customer, s, h)).collect::<Vec<_>>()
    };

    // (S, H), (S, *), (*, H), (*, *), each spelled literally and percent-encoded.
    let cases: [(&str, &str, &str, &str, [bool; 4]); 8] = [
        ("rating", "email", "rating", "email", [false, true, true, true]),
        ("rating", "*", "rating", "*", [false, false, true, true]),
        ("rating", "%2A", "rating", "*", [false, false, true, true]),
        ("*", "sms", "*", "sms", [true, false, true, false]),
        ("%2A", "sms", "*", "sms", [true, false, true, false]),
        ("%2a", "email", "*", "email", [false, true, false, true]),
        ("*", "*", "*", "*", [false, false, false, false]),
        ("%2A", "%2A", "*", "*", [false, false, false, false]),
    ];
    for (i, (s, h, shown_s, shown_h, expected)) in cases.iter().enumerate() {
        let customer = 100 + i as u64;
        let path = format!("/v1/customers/{customer}/preferences/{s}/{h}");
        let reason = format!("case {i}");
        let w = expect(send(c, "PUT", &path, Some(&json!({"status": "opted_out", "reason": reason}))), 200);
        assert_eq!(w["customer"], json!(customer));
        assert_eq!(w["service"], *shown_s, "{path}");
        assert_eq!(w["channel"], *shown_h, "{path}");
        assert_eq!(w["status"], "opted_out");
        assert_eq!(w["reason"], reason);
        assert_eq!(w["source"], "api");
        assert!(w["seq"].as_u64().unwrap() > 0);
        let created: jiff::Timestamp = w["created_at"].as_str().unwrap().parse().unwrap();
        let updated: jiff::Timestamp = w["updated_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(created, updated);
        assert!(w["created_at"].as_str().unwrap().ends_with('Z'), "UTC: {}", w["created_at"]);
        assert_eq!(allowed_pairs(customer), expected.to_vec(), "{path}");
        // The stored record names the scope with a literal `*`.
        let prefs = expect(send(c, "GET", &format!("/v1/customers/{customer}/preferences"), None), 200);
        assert_eq!(prefs["records"].as_array().unwrap().len(), 1);
        assert_eq!(prefs["records"][0]["service"], *shown_s);
        assert_eq!(prefs["records"][0]["channel"], *shown_h);
    }

    // Opting in again on the same scope: same record, created_at kept, new seq.
    let first = put(c, "100", "rating", "email", "opted_out");
    let again = put(c, "100", "rating", "email", "opted_in");
    assert_eq!(again["status"], "opted_in");
    assert_eq!(again["reason"], Value::Null);
    assert!(again["seq"].as_u64() > first["seq"].as_u64());
    assert_eq!(again["created_at"], first["created_at"]);
    let updated: jiff::Timestamp = again["updated_at"].as_str().unwrap().parse().unwrap();
    let created: jiff::Timestamp = again["created_at"].as_str().unwrap().parse().unwrap();
    assert!(updated >= created);
    assert!(allowed(c, 100, "rating", "email"));
}

#[test]
fn put_refuses_bad_input_and_stores_nothing() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    let ok = json!({"status": "opted_out"});
    let at = |customer: &str, s: &str, h: &str| format!("/v1/customers/{customer}/preferences/{s}/{h}");

    // Customer ids.
    for bad in ["-1", "abc", "1.5", "%2B1", "18446744073709551616", "123456789012345678901", "%20", "0x10"] {
        expect_error(&send(c, "PUT", &at(bad, "rating", "email"), Some(&ok)), 400, "invalid_input");
    }
    expect_error(&send(c, "PUT", &at("%FF", "rating", "email"), Some(&ok)), 400, "invalid_path");
    // Services and channels.
    expect_error(&send(c, "PUT", &at("1", "nope", "email"), Some(&ok)), 404, "unknown_service");
    expect_error(&send(c, "PUT", &at("1", "rating", "fax"), Some(&ok)), 404, "unknown_channel");
    expect_error(&send(c, "PUT", &at("1", "*", "fax"), Some(&ok)), 404, "unknown_channel");
    expect_error(&send(c, "PUT", &at("1", "Rating", "email"), Some(&ok)), 400, "invalid_input");
    expect_error(&send(c, "PUT", &at("1", "rating", "E%20mail"), Some(&ok)), 400, "invalid_input");
    expect_error(&send(c, "PUT", &at("1", "**", "email"), Some(&ok)), 400, "invalid_input");
    expect_error(&send(c, "PUT", &at("1", "rating%2Femail", "sms"), Some(&ok)), 400, "invalid_input");
    // Bodies.
    let path = at("1", "rating", "email");
    let raw = |body: &str| send_raw(c, "PUT", &path, Some(JSON), body.as_bytes().to_vec());
    expect_error(&raw("{\"status\": \"opted_out\""), 400, "invalid_json");
    expect_error(&raw("opted_out"), 400, "invalid_json");
    expect_error(&raw(""), 400, "invalid_json");
    expect_error(&raw("{\"status\": \"opted_out\"}\n{}"), 400, "invalid_json");
    expect_error(&raw("\"opted_out\""), 400, "invalid_field");
    expect_error(&raw("{}"), 400, "invalid_field");
    expect_error(&raw("{\"status\": true}"), 400, "invalid_field");
    expect_error(&raw("{\"status\": \"opted_out\", \"reason\": 5}"), 400, "invalid_field");
    expect_error(&raw("{\"status\": \"opted_out\", \"source\": \"admin\"}"), 400, "invalid_field");
    expect_error(&raw("{\"status\": \"opted_out\", \"customer\": 2}"), 400, "invalid_field");
    for status in ["opt_out", "OPTED_OUT", "", "opted_out ", "unsubscribed"] {
        expect_error(&send(c, "PUT", &path, Some(&json!({"status": status}))), 400, "invalid_input");
    }
    // Reasons: 500 characters (not bytes) are fine, 501 are not.
    let long = json!({"status": "opted_out", "reason": "x".repeat(501)});
    let a = send(c, "PUT", &path, Some(&long));
    expect_error(&a, 400, "invalid_input");
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("500"));
    let long = json!({"status": "opted_out", "reason": "é".repeat(501)});
    expect_error(&send(c, "PUT", &path, Some(&long)), 400, "invalid_input");
    expect_error(
        &send_raw(c, "PUT", &path, Some("text/plain"), ok.to_string().into_bytes()),
        415,
        "unsupported_media_type",
    );
    expect_error(
        &send_raw(c, "PUT", &path, Some("application/x-www-form-urlencoded"), b"status=opted_out".to_vec()),
        415,
        "unsupported_media_type",
    );

    // None of it was stored.
    assert!(all_audit(c, 100).is_empty());
    assert!(allowed(c, 1, "rating", "email"));
    let prefs = expect(send(c, "GET", "/v1/customers/1/preferences", None), 200);
    assert_eq!(prefs["records"], json!([]));

    // The limits themselves are accepted.
    let w =
        expect(send(c, "PUT", &path, Some(&json!({"status": "opted_out", "reason": "é".repeat(500)}))), 200);
    assert_eq!(w["reason"].as_str().unwrap().chars().count(), 500);
    let w = expect(send(c, "PUT", &path, Some(&json!({"status": "opted_in", "reason": ""}))), 200);
    assert_eq!(w["reason"], Value::Null, "an empty reason is no reason");
    let w = expect(send(c, "PUT", &path, Some(&json!({"status": "opted_out", "reason": null}))), 200);
    assert_eq!(w["reason"], Value::Null);
    assert_eq!(all_audit(c, 100).len(), 3);
}

#[test]
fn preferences_view_shows_every_pair_and_the_records_behind_it() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    create_service(c, "waitlist");
    let everything = expect(
        send(
            c,
            "PUT",
            "/v1/customers/9/preferences/*/*",
            Some(&json!({"status": "opted_out", "reason": "moved away"})),
        ),
        200,
    );
    let rating_email = put(c, "9", "rating", "email", "opted_in");

    let v = expect(send(c, "GET", "/v1/customers/9/preferences", None), 200);
    assert_eq!(v["customer"], 9);
    let effective: BTreeMap<(String, String), (String, bool)> = v["effective"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                (e["service"].as_str().unwrap().to_owned(), e["channel"].as_str().unwrap().to_owned()),
                (e["status"].as_str().unwrap().to_owned(), e["allowed"].as_bool().unwrap()),
            )
        })
        .collect();
    let expected: BTreeMap<(String, String), (String, bool)> = [
        ("rating", "email", "opted_in", true),
        ("rating", "sms", "opted_out", false),
        ("waitlist", "email", "opted_out", false),
        ("waitlist", "sms", "opted_out", false),
    ]
    .into_iter()
    .map(|(s, h, st, a)| ((s.to_owned(), h.to_owned()), (st.to_owned(), a)))
    .collect();
    assert_eq!(effective, expected);
    assert_eq!(v["effective"].as_array().unwrap().len(), 4, "one entry per pair");

    let records = v["records"].as_array().unwrap();
    assert_eq!(records.len(), 2);
    let by_scope: BTreeMap<(String, String), &Value> = records
        .iter()
        .map(|r| ((r["service"].as_str().unwrap().to_owned(), r["channel"].as_str().unwrap().to_owned()), r))
        .collect();
    let all = by_scope[&("*".to_owned(), "*".to_owned())];
    assert_eq!(all["status"], "opted_out");
    assert_eq!(all["reason"], "moved away");
    assert_eq!(all["source"], "api");
    assert_eq!(all["seq"], everything["seq"]);
    assert_eq!(all["created_at"], everything["created_at"]);
    let re = by_scope[&("rating".to_owned(), "email".to_owned())];
    assert_eq!(re["status"], "opted_in");
    assert_eq!(re["reason"], Value::Null);
    assert_eq!(re["seq"], rating_email["seq"]);
    for r in records {
        for field in ["created_at", "updated_at"] {
            let t: jiff::Timestamp = r[field].as_str().unwrap().parse().unwrap();
            assert!(t.as_second() > 1_600_000_000, "{field} is a recent RFC 3339 instant: {r}");
        }
    }

    // An unknown customer: everything allowed, no records.
    let v = expect(send(c, "GET", "/v1/customers/123/preferences", None), 200);
    assert_eq!(v["records"], json!([]));
    assert!(
        v["effective"].as_array().unwrap().iter().all(|e| e["allowed"] == true && e["status"] == "opted_in")
    );

    for bad in ["-1", "x", "18446744073709551616", "1.0"] {
        expect_error(
            &send(c, "GET", &format!("/v1/customers/{bad}/preferences"), None),
            400,
            "invalid_input",
        );
        expect_error(&send(c, "GET", &format!("/v1/customers/{bad}/audit"), None), 400, "invalid_input");
    }
    expect_error(&send(c, "GET", "/v1/customers/%C3%28/preferences", None), 400, "invalid_path");
}

#[test]
fn customer_audit_lists_that_customers_changes_oldest_first() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    let a1 = expect(
        send(
            c,
            "PUT",
            "/v1/customers/20/preferences/rating/email",
            Some(&json!({"status": "opted_out", "reason": "too many"})),
        ),
        200,
    );
    put(c, "21", "rating", "email", "opted_out");
    let a2 = put(c, "20", "rating", "email", "opted_in");
    let a3 = put(c, "20", "*", "*", "opted_out");

    let v = expect(send(c, "GET", "/v1/customers/20/audit", None), 200);
    assert_eq!(v["customer"], 20);
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(
        entries.iter().map(|e| e["seq"].clone()).collect::<Vec<_>>(),
        [a1["seq"].clone(), a2["seq"].clone(), a3["seq"].clone()]
    );
    let e = &entries[0];
    assert_eq!(e["customer"], 20);
    assert_eq!((e["service"].as_str(), e["channel"].as_str()), (Some("rating"), Some("email")));
    assert_eq!(e["before"], Value::Null, "no record before");
    assert_eq!(e["after"], "opted_out");
    assert_eq!(e["reason"], "too many");
    assert_eq!(e["source"], "api");
    assert_eq!(e["actor"], "local", "no keys configured: the local caller");
    let _: jiff::Timestamp = e["at"].as_str().unwrap().parse().unwrap();
    assert_eq!(entries[1]["before"], "opted_out");
    assert_eq!(entries[1]["after"], "opted_in");
    assert_eq!(entries[2]["before"], Value::Null, "(*,*) had no record of its own");
    assert_eq!((entries[2]["service"].as_str(), entries[2]["channel"].as_str()), (Some("*"), Some("*")));

    let none = expect(send(c, "GET", "/v1/customers/999/audit", None), 200);
    assert_eq!(none, json!({"customer": 999, "entries": []}));
}

#[test]
fn audit_pages_with_next_after() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    let mut seqs = Vec::new();
    for i in 0..23u64 {
        let status = if i % 2 == 0 { "opted_out" } else { "opted_in" };
        seqs.push(
            put(c, &(i % 5).to_string(), "rating", if i % 3 == 0 { "sms" } else { "email" }, status)["seq"]
                .as_u64()
                .unwrap(),
        );
        if i == 11 {
            create_service(c, "waitlist"); // a service event in the middle of the log
        }
    }

    for limit in [1usize, 4, 7, 23, 10_000] {
        let entries = all_audit(c, limit);
        let got: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(got, seqs, "limit {limit}");
    }

    // One page by hand: next_after is the last seq of the page.
    let page = expect(send(c, "GET", "/v1/audit?limit=5", None), 200);
    let entries = page["entries"].as_array().unwrap();
    assert!(!entries.is_empty() && entries.len() <= 5);
    assert!(page["next_after"].as_u64().unwrap() >= entries.last().unwrap()["seq"].as_u64().unwrap());
    let after = entries[2]["seq"].as_u64().unwrap();
    let page = expect(send(c, "GET", &format!("/v1/audit?after={after}&limit=2"), None), 200);
    let got: Vec<u64> =
        page["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(got, seqs[3..5]);
    assert_eq!(page["next_after"], json!(seqs[4]));
    // Past the end: nothing, and next_after stays.
    let last = *seqs.last().unwrap();
    let page = expect(send(c, "GET", &format!("/v1/audit?after={last}"), None), 200);
    assert_eq!(page, json!({"entries": [], "next_after": last}));
    let page = expect(send(c, "GET", &format!("/v1/audit?after={}", u64::MAX), None), 200);
    assert_eq!(page, json!({"entries": [], "next_after": u64::MAX}));

    for bad in [
        "after=-1",
        "after=x",
        "after=1.5",
        "after=18446744073709551616",
        "limit=0",
        "limit=-5",
        "limit=10001",
        "limit=ten",
        "limit=",
    ] {
        expect_error(&send(c, "GET", &format!("/v1/audit?{bad}"), None), 400, "invalid_parameter");
    }
}

#[test]
fn the_most_recently_written_record_decides() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    create_service(c, "waitlist");
    let pairs = [("rating", "email"), ("rating", "sms"), ("waitlist", "email"), ("waitlist", "sms")];
    let state = |customer: u64| pairs.iter().map(|(s, h)| allowed(c, customer, s, h)).collect::<Vec<_>>();

    // Unsubscribe from everything, then opt in to rating emails: only rating emails.
    put(c, "1", "*", "*", "opted_out");
    assert_eq!(state(1), [false, false, false, false]);
    put(c, "1", "rating", "email", "opted_in");
    assert_eq!(state(1), [true, false, false, false]);

    // The same two in the other order: nothing.
    put(c, "2", "rating", "email", "opted_in");
    put(c, "2", "*", "*", "opted_out");
    assert_eq!(state(2), [false, false, false, false]);

    // Broad opt-in after narrow opt-outs wins over them.
    put(c, "3", "rating", "sms", "opted_out");
    put(c, "3", "waitlist", "*", "opted_out");
    assert_eq!(state(3), [true, false, false, false]);
    put(c, "3", "*", "sms", "opted_in");
    assert_eq!(state(3), [true, true, false, true]);
    put(c, "3", "*", "*", "opted_in");
    assert_eq!(state(3), [true, true, true, true]);

    // The filter and the batch agree with the single checks.
    let f = expect(
        send(c, "POST", "/v1/filter?service=rating&channel=email", Some(&json!({"customers": [1, 2, 3, 4]}))),
        200,
    );
    assert_eq!(f, json!({"allowed": [1, 3, 4], "suppressed": [2]}));
    let batch = json!({"checks": [
        {"customer": 1, "service": "waitlist", "channel": "sms"},
        {"customer": 1, "service": "rating", "channel": "email"},
        {"customer": 2, "service": "rating", "channel": "email"},
    ]});
    assert_eq!(
        expect(send(c, "POST", "/v1/check", Some(&batch)), 200),
        json!({"results": [false, true, false]})
    );
}

#[test]
fn a_service_created_after_a_broad_opt_out_starts_opted_out() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    put(c, "1", "*", "sms", "opted_out");
    put(c, "2", "*", "*", "opted_out");
    put(c, "3", "rating", "*", "opted_out"); // names one service: not inherited
    put(c, "4", "*", "sms", "opted_out");
    put(c, "4", "*", "sms", "opted_in"); // undone before the new service exists
    put(c, "5", "*", "*", "opted_out");
    put(c, "5", "rating", "sms", "opted_in"); // names one service: not inherited
    put(c, "6", "*", "*", "opted_out");
    put(c, "6", "*", "email", "opted_in");

    create_service(c, "appointment");
    let expect_pairs = [
        (1, [true, false]),
        (2, [false, false]),
        (3, [true, true]),
        (4, [true, true]),
        (5, [false, false]),
        (6, [true, false]),
        (7, [true, true]),
    ];
    for (customer, [email, sms]) in expect_pairs {
        assert_eq!(allowed(c, customer, "appointment", "email"), email, "customer {customer} email");
        assert_eq!(allowed(c, customer, "appointment", "sms"), sms, "customer {customer} sms");
    }
    let f = expect(
        send(
            c,
            "POST",
            "/v1/filter?service=appointment&channel=sms",
            Some(&json!({"customers": [1, 2, 3, 4, 5, 6, 7]})),
        ),
        200,
    );
    assert_eq!(f, json!({"allowed": [3, 4, 7], "suppressed": [1, 2, 5, 6]}));
    let prefs = expect(send(c, "GET", "/v1/customers/1/preferences", None), 200);
    let sms = prefs["effective"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["service"] == "appointment" && e["channel"] == "sms")
        .unwrap()
        .clone();
    assert_eq!(sms["status"], "opted_out");
    // And the customer may opt in to it afterwards.
    put(c, "1", "appointment", "sms", "opted_in");
    assert!(allowed(c, 1, "appointment", "sms"));
    assert!(!allowed(c, 1, "rating", "sms"));
}

// ------------------------------------------------------------------ import

#[test]
fn import_writes_each_valid_item_and_reports_each_bad_one() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    create_service(c, "old");
    expect(send(c, "PATCH", "/v1/services/old", Some(&json!({"archived": true}))), 200);
    let items = json!({"items": [
        {"customer": 1, "service": "rating", "channel": "email", "status": "opted_out", "reason": "import"},
        {"customer": "2", "service": "*", "channel": "*", "status": "opted_out"},
        {"customer": 3, "service": "nope", "channel": "email", "status": "opted_out"},
        {"customer": 3, "service": "rating", "channel": "fax", "status": "opted_out"},
        {"customer": 3, "service": "rating", "channel": "email", "status": "gone"},
        {"customer": -3, "service": "rating", "channel": "email", "status": "opted_out"},
        {"customer": "x", "service": "rating", "channel": "email", "status": "opted_out"},
        {"customer": 3, "service": "rating", "channel": "email", "status": "opted_out", "extra": true},
        {"customer": 3, "service": "rating", "channel": "email"},
        {"customer": 3, "service": "rating", "channel": "email", "status": "opted_out", "reason": "r".repeat(501)},
        {"customer": 3, "service": "old", "channel": "email", "status": "opted_out"},
        "not an object",
        {"customer": 4, "service": "rating", "channel": "*", "status": "opted_out"},
    ]});
    let v = expect(send(c, "POST", "/v1/preferences/import", Some(&items)), 200);
    assert_eq!(v["accepted"], 3);
    assert_eq!(v["rejected"], 10);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 13, "one result per item, in order");
    let codes: Vec<String> = results
        .iter()
        .map(|r| match r.get("seq") {
            Some(seq) => {
                assert!(seq.as_u64().unwrap() > 0);
                "ok".to_owned()
            }
            None => {
                let code = r["error"]["code"].as_str().unwrap().to_owned();
                assert!(is_snake_case(&code));
                assert!(!r["error"]["message"].as_str().unwrap().is_empty());
                code
            }
        })
        .collect();
    assert_eq!(
        codes,
        [
            "ok",
            "ok",
            "unknown_service",
            "unknown_channel",
            "invalid_input",
            "invalid_field",
            "invalid_field",
            "invalid_field",
            "invalid_field",
            "invalid_input",
            "service_archived",
            "invalid_field",
            "ok",
        ]
    );
    let seqs: Vec<u64> = results.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "import writes in order: {seqs:?}");

    assert!(!allowed(c, 1, "rating", "email"));
    assert!(!allowed(c, 2, "rating", "sms"));
    assert!(allowed(c, 3, "rating", "email"));
    assert!(!allowed(c, 4, "rating", "sms"));
    let entries = all_audit(c, 100);
    assert_eq!(entries.len(), 3);
    assert!(entries.iter().all(|e| e["source"] == "import"), "{entries:?}");
    assert_eq!(entries[0]["reason"], "import");
    let prefs = expect(send(c, "GET", "/v1/customers/1/preferences", None), 200);
    assert_eq!(prefs["records"][0]["source"], "import");

    let post =
        |body: &str| send_raw(c, "POST", "/v1/preferences/import", Some(JSON), body.as_bytes().to_vec());
    expect_error(&post("{\"items\": ["), 400, "invalid_json");
    expect_error(&post("{\"items\": {}}"), 400, "invalid_field");
    expect_error(&post("{\"rows\": []}"), 400, "invalid_field");
    expect_error(&post("{\"items\": [], \"dry_run\": true}"), 400, "invalid_field");
    expect_error(&post("[]"), 400, "invalid_field");
    expect_error(
        &send_raw(
            c,
            "POST",
            "/v1/preferences/import",
            Some("text/csv"),
            b"customer,service\n1,rating\n".to_vec(),
        ),
        415,
        "unsupported_media_type",
    );
    assert_eq!(expect(post("{\"items\": []}"), 200), json!({"accepted": 0, "rejected": 0, "results": []}));
    assert_eq!(all_audit(c, 100).len(), 3, "refused imports wrote nothing");
}

// ------------------------------------------------------- limits and types

#[test]
fn oversized_bodies_are_refused_with_413_on_every_body_route() {
    let app = util::spawn_with(|c| {
        c.max_body_bytes = 1024;
        c.max_bulk_body_bytes = 4096;
    });
    let c = &app.client;
    create_service(c, "rating");
    let pad = |n: usize| " ".repeat(n);

    // Ordinary routes: 1 KiB.
    let small = format!("{{\"status\": \"opted_out\", \"reason\": \"ok\"}}{}", pad(900));
    assert!(small.len() <= 1024);
    expect(
        send_raw(c, "PUT", "/v1/customers/1/preferences/rating/email", Some(JSON), small.into_bytes()),
        200,
    );
    let big = format!("{{\"status\": \"opted_out\"}}{}", pad(1100));
    let a =
        send_raw(c, "PUT", "/v1/customers/2/preferences/rating/email", Some(JSON), big.clone().into_bytes());
    expect_error(&a, 413, "body_too_large");
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("1024"));
    let big_service = format!("{{\"slug\": \"big\"}}{}", pad(1100));
    expect_error(
        &send_raw(c, "POST", "/v1/services", Some(JSON), big_service.into_bytes()),
        413,
        "body_too_large",
    );
    let big_patch = format!("{{\"archived\": true}}{}", pad(1100));
    expect_error(
        &send_raw(c, "PATCH", "/v1/services/rating", Some(JSON), big_patch.into_bytes()),
        413,
        "body_too_large",
    );

    // Bulk routes: 4 KiB. A body above the ordinary limit is fine there.
    let ids: Vec<u64> = (0..500).collect();
    let body = json!({"customers": ids}).to_string();
    assert!(body.len() > 1024 && body.len() < 4096);
    let f = expect(
        send_raw(c, "POST", "/v1/filter?service=rating&channel=email", Some(JSON), body.into_bytes()),
        200,
    );
    assert_eq!(f["suppressed"], json!([1]));
    let ids: Vec<u64> = (0..2000).collect();
    let body = json!({"customers": ids}).to_string().into_bytes();
    assert!(body.len() > 4096);
    expect_error(
        &send_raw(c, "POST", "/v1/filter?service=rating&channel=email", Some(JSON), body),
        413,
        "body_too_large",
    );
    let recipients: RoaringBitmap = (0..5000u32).map(|i| i * 7).collect();
    let bytes = bitmap_bytes(&recipients);
    assert!(bytes.len() > 4096);
    expect_error(
        &send_raw(c, "POST", "/v1/filter?service=rating&channel=email", Some(ROARING), bytes),
        413,
        "body_too_large",
    );
    let checks: Vec<Value> =
        (0..200).map(|i| json!({"customer": i, "service": "rating", "channel": "email"})).collect();
    let body = json!({"checks": checks}).to_string().into_bytes();
    assert!(body.len() > 4096);
    expect_error(&send_raw(c, "POST", "/v1/check", Some(JSON), body), 413, "body_too_large");
    let items: Vec<Value> = (0..100)
        .map(|i| json!({"customer": i, "service": "rating", "channel": "email", "status": "opted_out"}))
        .collect();
    let body = json!({"items": items}).to_string().into_bytes();
    assert!(body.len() > 4096);
    expect_error(&send_raw(c, "POST", "/v1/preferences/import", Some(JSON), body), 413, "body_too_large");

    // A body without Content-Length (chunked) is cut off at the limit too.
    let chunk = format!("{{\"status\": \"opted_out\"}}{}", pad(1500));
    let head = format!(
        "PUT /v1/customers/3/preferences/rating/email HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        chunk.len()
    );
    let mut body = chunk.into_bytes();
    body.extend_from_slice(b"\r\n0\r\n\r\n");
    expect_error(&raw_http(app.addr, &head, &body).into(), 413, "body_too_large");
    // The same, under the limit, is fine.
    let chunk = "{\"status\": \"opted_out\"}";
    let head = format!(
        "PUT /v1/customers/4/preferences/rating/email HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    expect(raw_http(app.addr, &head, b"").into(), 200);

    // Only the accepted writes were stored, and the server still answers.
    let seen: BTreeSet<u64> = all_audit(c, 100).iter().map(|e| e["customer"].as_u64().unwrap()).collect();
    assert_eq!(seen, BTreeSet::from([1, 4]));
    expect(send(c, "GET", "/healthz", None), 200);
}

#[test]
fn too_many_items_are_refused_with_413() {
    let app = util::spawn_with(|c| c.max_batch_items = 5);
    let c = &app.client;
    create_service(c, "rating");
    let check = |n: u64| {
        let checks: Vec<Value> =
            (0..n).map(|i| json!({"customer": i, "service": "rating", "channel": "email"})).collect();
        send(c, "POST", "/v1/check", Some(&json!({"checks": checks})))
    };
    assert_eq!(expect(check(5), 200)["results"].as_array().unwrap().len(), 5);
    expect_error(&check(6), 413, "too_many_items");

    let path = "/v1/filter?service=rating&channel=email";
    let filter = |n: u64| send(c, "POST", path, Some(&json!({"customers": (0..n).collect::<Vec<_>>()})));
    assert_eq!(expect(filter(5), 200)["allowed"].as_array().unwrap().len(), 5);
    expect_error(&filter(6), 413, "too_many_items");

    let roaring = |n: u32| send_raw(c, "POST", path, Some(ROARING), bitmap_bytes(&(0..n).collect()));
    assert_eq!(decode_bitmap(&roaring(5)).len(), 5);
    expect_error(&roaring(6), 413, "too_many_items");
    let wide: RoaringBitmap = (0..100_000u32).collect(); // small as bytes, many as ids
    expect_error(&send_raw(c, "POST", path, Some(ROARING), bitmap_bytes(&wide)), 413, "too_many_items");

    let import = |n: u64| {
        let items: Vec<Value> = (0..n)
            .map(|i| json!({"customer": i, "service": "rating", "channel": "email", "status": "opted_out"}))
            .collect();
        send(c, "POST", "/v1/preferences/import", Some(&json!({"items": items})))
    };
    expect_error(&import(6), 413, "too_many_items");
    assert!(all_audit(c, 100).is_empty(), "a refused import writes nothing");
    assert_eq!(expect(import(5), 200)["accepted"], 5);
}

#[test]
fn imports_are_limited_to_10000_rows_per_request() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    let items: Vec<Value> = (0..10_001u64)
        .map(|i| json!({"customer": i, "service": "rating", "channel": "email", "status": "opted_out"}))
        .collect();
    expect_error(
        &send(c, "POST", "/v1/preferences/import", Some(&json!({"items": items}))),
        413,
        "too_many_items",
    );
    assert!(all_audit(c, 100).is_empty());
}

#[test]
fn wrong_content_types_are_refused_with_415() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    let json_body = b"{\"customers\": [1]}".to_vec();
    for ct in [
        "text/plain",
        "application/xml",
        "application/octet-stream",
        "multipart/form-data; boundary=x",
        "text/json",
    ] {
        let a = send_raw(c, "POST", "/v1/filter?service=rating&channel=email", Some(ct), json_body.clone());
        expect_error(&a, 415, "unsupported_media_type");
        let checks = br#"{"checks":[]}"#.to_vec();
        expect_error(&send_raw(c, "POST", "/v1/check", Some(ct), checks), 415, "unsupported_media_type");
        let put = br#"{"status":"opted_out"}"#.to_vec();
        let a = send_raw(c, "PUT", "/v1/customers/1/preferences/rating/email", Some(ct), put);
        expect_error(&a, 415, "unsupported_media_type");
        let svc = br#"{"slug":"other"}"#.to_vec();
        expect_error(&send_raw(c, "POST", "/v1/services", Some(ct), svc), 415, "unsupported_media_type");
        let patch = br#"{"archived":true}"#.to_vec();
        expect_error(
            &send_raw(c, "PATCH", "/v1/services/rating", Some(ct), patch),
            415,
            "unsupported_media_type",
        );
        let items = br#"{"items":[]}"#.to_vec();
        expect_error(
            &send_raw(c, "POST", "/v1/preferences/import", Some(ct), items),
            415,
            "unsupported_media_type",
        );
    }
    // Roaring bodies are for the filter only.
    let bytes = bitmap_bytes(&(0..3u32).collect());
    expect_error(
        &send_raw(c, "POST", "/v1/check", Some(ROARING), bytes.clone()),
        415,
        "unsupported_media_type",
    );
    expect_error(
        &send_raw(c, "POST", "/v1/preferences/import", Some(ROARING), bytes),
        415,
        "unsupported_media_type",
    );
    // And a JSON body sent as roaring is not a bitmap.
    let a = send_raw(c, "POST", "/v1/filter?service=rating&channel=email", Some(ROARING), json_body);
    expect_error(&a, 400, "invalid_bitmap");
    assert!(all_audit(c, 10).is_empty());
    assert_eq!(expect(send(c, "GET", "/v1/services/rating", None), 200)["archived"], false);
}

#[test]
fn hostile_bodies_do_not_crash_the_sidecar() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    put(c, "1", "rating", "email", "opted_out");
    let deep = format!("{{\"checks\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    // The first nested array is already the wrong type for a check.
    expect_error(&send_raw(c, "POST", "/v1/check", Some(JSON), deep.into_bytes()), 400, "invalid_field");
    // Import items are free-form values: there the parser's depth limit answers.
    let deep = format!("{{\"items\": [{}{}]}}", "[".repeat(100_000), "]".repeat(100_000));
    let a = send_raw(c, "POST", "/v1/preferences/import", Some(JSON), deep.into_bytes());
    expect_error(&a, 400, "invalid_json");
    let deep = format!("{{\"status\": \"opted_out\", \"reason\": {}}}", "{\"a\":".repeat(5000));
    let a = send_raw(c, "PUT", "/v1/customers/1/preferences/rating/email", Some(JSON), deep.into_bytes());
    expect_error(&a, 400, "invalid_field"); // a map where the reason string goes
    let bad_utf8 = b"{\"status\": \"opted_\xff\xfe\"}".to_vec();
    expect_error(
        &send_raw(c, "PUT", "/v1/customers/1/preferences/rating/email", Some(JSON), bad_utf8),
        400,
        "invalid_json",
    );
    let nul = b"\0\0\0\0".to_vec();
    expect_error(&send_raw(c, "POST", "/v1/check", Some(JSON), nul), 400, "invalid_json");
    // serde_json reports a number beyond f64 as a syntax error ("number out of range").
    let huge_number = format!("{{\"customers\": [{}]}}", "9".repeat(10_000));
    expect_error(
        &send_raw(c, "POST", "/v1/filter?service=rating&channel=email", Some(JSON), huge_number.into_bytes()),
        400,
        "invalid_json",
    );
    // Not even HTTP.
    let mut s = TcpStream::connect(app.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    // The sidecar still answers, and what it stored is intact.
    expect(send(c, "GET", "/healthz", None), 200);
    assert!(!allowed(c, 1, "rating", "email"));
    assert_eq!(all_audit(c, 10).len(), 1);
}

// -------------------------------------------------------------------- auth

#[test]
fn api_keys_and_roles() {
    let (admin_key, sender_key) = ("admin-secret-k3y", "sender-secret-k3y");
    let app = util::spawn_with(|c| {
        c.keys = vec![
            ApiKey { name: "ops".into(), role: Role::Admin, hash: parse_hash(&hash_key(admin_key)).unwrap() },
            ApiKey {
                name: "mailer".into(),
                role: Role::Sender,
                hash: parse_hash(&hash_key(sender_key)).unwrap(),
            },
        ];
    });
    let base = format!("http://{}", app.addr);
    let none = Client::new(&base, None);
    let wrong = Client::new(&base, Some("not-a-key".into()));
    let hashed = Client::new(&base, Some(hash_key(admin_key))); // the hash is not the key
    let sender = Client::new(&base, Some(sender_key.into()));
    let admin = Client::new(&base, Some(admin_key.into()));

    // Health, readiness and metrics need no key.
    for path in ["/healthz", "/readyz"] {
        expect(send(&none, "GET", path, None), 200);
    }
    assert_eq!(send(&none, "GET", "/metrics", None).status, 200);
    // …and a wrong key does not spoil them.
    expect(send(&wrong, "GET", "/healthz", None), 200);
    assert_eq!(send(&wrong, "GET", "/metrics", None).status, 200);

    // The admin may do everything.
    create_service(&admin, "rating");
    let w = put(&admin, "1", "rating", "email", "opted_out");
    assert_eq!(w["source"], "api");
    expect(send(&admin, "PATCH", "/v1/services/rating", Some(&json!({"description": "d"}))), 200);
    expect(send(&admin, "GET", "/v1/customers/1/preferences", None), 200);
    let audit = expect(send(&admin, "GET", "/v1/customers/1/audit", None), 200);
    assert_eq!(audit["entries"][0]["actor"], "ops", "the key's name is the actor");
    expect(send(&admin, "GET", "/v1/audit", None), 200);
    let import =
        json!({"items": [{"customer": 2, "service": "rating", "channel": "sms", "status": "opted_out"}]});
    assert_eq!(expect(send(&admin, "POST", "/v1/preferences/import", Some(&import)), 200)["accepted"], 1);
    assert!(!allowed(&admin, 1, "rating", "email"));

    // Sender-level routes: no key or a wrong key is 401; sender and admin pass.
    let bitmap = bitmap_bytes(&(0..4u32).collect());
    let sender_routes: Vec<(&str, &str, Option<Value>)> = vec![
        ("GET", "/v1/check?customer=1&service=rating&channel=email", None),
        (
            "POST",
            "/v1/check",
            Some(json!({"checks": [{"customer": 1, "service": "rating", "channel": "email"}]})),
        ),
        ("POST", "/v1/filter?service=rating&channel=email", Some(json!({"customers": [1, 2]}))),
        ("GET", "/v1/services", None),
        ("GET", "/v1/services/rating", None),
        ("GET", "/v1/channels", None),
    ];
    for (method, path, body) in &sender_routes {
        for client in [&none, &wrong, &hashed] {
            expect_error(&send(client, method, path, body.as_ref()), 401, "unauthorized");
        }
        expect(send(&sender, method, path, body.as_ref()), 200);
        expect(send(&admin, method, path, body.as_ref()), 200);
    }
    let filter = "/v1/filter?service=rating&channel=email";
    expect_error(&send_raw(&none, "POST", filter, Some(ROARING), bitmap.clone()), 401, "unauthorized");
    assert_eq!(
        decode_bitmap(&send_raw(&sender, "POST", filter, Some(ROARING), bitmap.clone())),
        [0u32, 2, 3].into_iter().collect()
    );
    let v = expect(send(&sender, "GET", "/v1/check?customer=1&service=rating&channel=email", None), 200);
    assert_eq!(v["allowed"], false);

    // Admin-only routes: no key 401, sender 403.
    let admin_routes: Vec<(&str, &str, Option<Value>)> = vec![
        ("PUT", "/v1/customers/3/preferences/rating/email", Some(json!({"status": "opted_out"}))),
        ("PUT", "/v1/customers/3/preferences/*/*", Some(json!({"status": "opted_out"}))),
        ("GET", "/v1/customers/1/preferences", None),
        ("GET", "/v1/customers/1/audit", None),
        ("GET", "/v1/audit?after=0&limit=10", None),
        ("POST", "/v1/preferences/import", Some(import.clone())),
        ("POST", "/v1/services", Some(json!({"slug": "waitlist"}))),
        ("PATCH", "/v1/services/rating", Some(json!({"archived": true}))),
    ];
    for (method, path, body) in &admin_routes {
        for client in [&none, &wrong] {
            expect_error(&send(client, method, path, body.as_ref()), 401, "unauthorized");
        }
        expect_error(&send(&sender, method, path, body.as_ref()), 403, "forbidden");
    }
    // Other authorization schemes are not a key.
    let raw = raw_http(
        app.addr,
        &format!(
            "GET /v1/services HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {admin_key}\r\nConnection: close\r\n\r\n"
        ),
        b"",
    );
    expect_error(&raw.into(), 401, "unauthorized");

    // Nothing refused was stored.
    assert!(allowed(&admin, 3, "rating", "email"));
    assert_eq!(expect(send(&admin, "GET", "/v1/services/rating", None), 200)["archived"], false);
    let list = expect(send(&admin, "GET", "/v1/services", None), 200);
    assert_eq!(list["services"].as_array().unwrap().len(), 1);
    assert_eq!(all_audit(&admin, 100).len(), 2);
}

// ------------------------------------------------------------- concurrency

#[test]
fn concurrent_writes_are_all_acknowledged_and_audited_in_order() {
    let app = util::spawn_app();
    let c = app.client.clone();
    create_service(&c, "rating");
    create_service(&c, "waitlist");
    const THREADS: u64 = 8;
    const EACH: u64 = 25;
    let shared = 999_999u64; // every thread also toggles this customer's (rating, email)
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                // (seq, customer, service, channel, status) of each acknowledged write.
                let mut mine = Vec::new();
                for i in 0..EACH {
                    let customer = t * 1000 + i;
                    let (s, h) =
                        [("rating", "email"), ("waitlist", "*"), ("*", "sms"), ("*", "*")][(i % 4) as usize];
                    let w = put(&c, &customer.to_string(), s, h, "opted_out");
                    assert_eq!(w["customer"], json!(customer));
                    let seq = w["seq"].as_u64().unwrap();
                    mine.push((seq, customer, s, h, "opted_out"));
                    let status = if (t + i) % 2 == 0 { "opted_out" } else { "opted_in" };
                    let w = put(&c, &shared.to_string(), "rating", "email", status);
                    assert_eq!(w["customer"], json!(shared));
                    mine.push((w["seq"].as_u64().unwrap(), shared, "rating", "email", status));
                }
                mine
            })
        })
        .collect();
    let mut writes = Vec::new();
    for h in handles {
        let mine = h.join().expect("writer thread");
        let seqs: Vec<u64> = mine.iter().map(|w| w.0).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one thread's writes get increasing seqs: {seqs:?}");
        writes.extend(mine);
    }
    let total = (THREADS * EACH * 2) as usize;
    assert_eq!(writes.len(), total);
    let distinct: BTreeSet<u64> = writes.iter().map(|w| w.0).collect();
    assert_eq!(distinct.len(), total, "every acknowledged write has its own seq");

    // Every acknowledged write, the shared customer's too, is the audit
    // entry of its seq: same customer, scope and resulting status.
    let entries = all_audit(&c, 37);
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "audit seqs strictly increase");
    assert_eq!(seqs.iter().copied().collect::<BTreeSet<_>>(), distinct, "every write is in the audit log");
    let by_seq: BTreeMap<u64, &Value> = entries.iter().map(|e| (e["seq"].as_u64().unwrap(), e)).collect();
    for (seq, customer, s, h, status) in &writes {
        let e = by_seq[seq];
        assert_eq!(e["customer"], json!(customer), "{e}");
        assert_eq!((e["service"].as_str(), e["channel"].as_str()), (Some(*s), Some(*h)), "{e}");
        assert_eq!(e["after"], *status, "{e}");
    }
    // Every other customer is opted out where the write said.
    for t in 0..THREADS {
        for i in 0..EACH {
            let (s, h) = [("rating", "email"), ("waitlist", "email"), ("rating", "sms"), ("waitlist", "sms")]
                [(i % 4) as usize];
            assert!(!allowed(&c, t * 1000 + i, s, h), "customer {} {s}/{h}", t * 1000 + i);
        }
    }
    // The shared customer's writes were applied one after another, in seq
    // order: the history is exactly those writes, each entry's `after` is
    // what that write set, its `before` the previous entry's `after`, and
    // the last decides.
    let mut ours: Vec<(u64, &str)> =
        writes.iter().filter(|w| w.1 == shared).map(|&(seq, _, _, _, status)| (seq, status)).collect();
    ours.sort_unstable();
    let history = expect(send(&c, "GET", &format!("/v1/customers/{shared}/audit"), None), 200);
    let history = history["entries"].as_array().unwrap();
    assert_eq!(history.len(), ours.len());
    let mut before = Value::Null;
    for (e, (seq, status)) in history.iter().zip(&ours) {
        assert_eq!(e["seq"], *seq, "{e}");
        assert_eq!(e["after"], *status, "{e}");
        assert_eq!(e["before"], before, "{e}");
        before = e["after"].clone();
    }
    assert_eq!(allowed(&c, shared, "rating", "email"), before == "opted_in");
}

// ----------------------------------------------------------------- roaring

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/roaring").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The set the fixtures' README describes.
fn fixture_set() -> RoaringBitmap {
    let mut set = RoaringBitmap::new();
    set.extend((0..100_000u32).step_by(1000));
    set.extend((100_000..200_000u32).map(|k| 3 * k));
    set.extend(700_000..800_000u32);
    set
}

#[test]
fn both_java_fixtures_decode_to_the_same_200100_values() {
    let expected = fixture_set();
    assert_eq!(expected.len(), 200_100);
    let without = RoaringBitmap::deserialize_from(&fixture("bitmapwithoutruns.bin")[..]).unwrap();
    let with = RoaringBitmap::deserialize_from(&fixture("bitmapwithruns.bin")[..]).unwrap();
    assert_eq!(without.len(), 200_100);
    assert_eq!(without, with);
    assert_eq!(without, expected);
    // The cookies are the two 32-bit portable layouts.
    assert_eq!(u32::from_le_bytes(fixture("bitmapwithoutruns.bin")[..4].try_into().unwrap()), 12346);
    assert_eq!(u16::from_le_bytes(fixture("bitmapwithruns.bin")[..2].try_into().unwrap()), 12347);
    // The no-runs layout is fully determined by the set: the hand-written
    // encoder below reproduces Java's bytes exactly.
    assert_eq!(portable_from_set(&expected), fixture("bitmapwithoutruns.bin"));
}

#[test]
fn the_filter_reads_java_written_bitmaps_and_answers_in_the_same_format() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    create_service(c, "waitlist");
    // Opted out of rating email: some members of the set, and some non-members.
    let members = [0u32, 1000, 99_000, 300_000, 300_003, 599_997, 700_000, 754_321, 799_999];
    let outsiders = [1u32, 2, 600_000, 800_000, 4_000_000];
    for id in members.iter().chain(&outsiders) {
        put(c, &id.to_string(), "rating", "email", "opted_out");
    }
    put(c, "750000", "*", "email", "opted_out"); // a broad scope counts too
    put(c, "5000", "*", "*", "opted_out");
    put(c, "5000", "rating", "email", "opted_in"); // …unless undone
    put(c, "1000", "waitlist", "email", "opted_out");

    let mut suppressed: RoaringBitmap = members.iter().copied().collect();
    suppressed.insert(750_000);
    let expected = &fixture_set() - &suppressed;
    assert_eq!(expected.len(), 200_100 - 10);
    for name in ["bitmapwithoutruns.bin", "bitmapwithruns.bin"] {
        let a = send_raw(c, "POST", "/v1/filter?service=rating&channel=email", Some(ROARING), fixture(name));
        let got = decode_bitmap(&a);
        assert_eq!(got.len(), expected.len(), "{name}");
        assert_eq!(got, expected, "{name}");
        // With charset-like parameters and odd case, it is still roaring.
        let a = send_raw(
            c,
            "POST",
            "/v1/filter?service=rating&channel=email",
            Some("Application/Vnd.Roaring; v=1"),
            fixture(name),
        );
        assert_eq!(decode_bitmap(&a), expected, "{name}");
    }
    // Another pair sees its own opt-outs only.
    let a = send_raw(
        c,
        "POST",
        "/v1/filter?service=waitlist&channel=email",
        Some(ROARING),
        fixture("bitmapwithruns.bin"),
    );
    let mut waitlist = fixture_set();
    for id in [1000, 750_000, 5000] {
        assert!(waitlist.remove(id));
    }
    assert_eq!(decode_bitmap(&a), waitlist);
    let a = send_raw(
        c,
        "POST",
        "/v1/filter?service=waitlist&channel=sms",
        Some(ROARING),
        fixture("bitmapwithruns.bin"),
    );
    let mut sms = fixture_set();
    sms.remove(5000);
    assert_eq!(decode_bitmap(&a), sms);

    // The counts are in headers too.
    let body = fixture("bitmapwithoutruns.bin");
    let head = format!(
        "POST /v1/filter?service=rating&channel=email HTTP/1.1\r\nHost: x\r\nContent-Type: {ROARING}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let raw = raw_http(app.addr, &head, &body);
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("x-prefsd-allowed"), Some(expected.len().to_string().as_str()));
    assert_eq!(raw.header("x-prefsd-suppressed"), Some("10"));
    assert_eq!(RoaringBitmap::deserialize_from(&raw.body[..]).unwrap(), expected);

    // Unknown pairs are refused before the body matters.
    let a = send_raw(
        c,
        "POST",
        "/v1/filter?service=nope&channel=email",
        Some(ROARING),
        fixture("bitmapwithruns.bin"),
    );
    expect_error(&a, 404, "unknown_service");
    let a = send_raw(
        c,
        "POST",
        "/v1/filter?service=rating&channel=fax",
        Some(ROARING),
        fixture("bitmapwithruns.bin"),
    );
    expect_error(&a, 404, "unknown_channel");
}

/// Containers by key, in key order.
type Containers = Vec<(u16, Container)>;

/// A container of the portable format, by what it holds.
enum Container {
    /// Sorted values, at most 4096.
    Array(Vec<u16>),
    /// Sorted values, more than 4096: written as 1024 64-bit words.
    Bitmap(Vec<u16>),
    /// Inclusive ranges `(start, end)`, sorted and apart.
    Run(Vec<(u16, u16)>),
}

impl Container {
    fn cardinality(&self) -> usize {
        match self {
            Container::Array(v) | Container::Bitmap(v) => v.len(),
            Container::Run(r) => r.iter().map(|&(s, e)| usize::from(e - s) + 1).sum(),
        }
    }

    fn values(&self) -> Vec<u16> {
        match self {
            Container::Array(v) | Container::Bitmap(v) => v.clone(),
            Container::Run(r) => r.iter().flat_map(|&(s, e)| s..=e).collect(),
        }
    }

    fn body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Container::Array(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            Container::Bitmap(v) => {
                let mut words = [0u64; 1024];
                for &x in v {
                    words[usize::from(x) / 64] |= 1 << (x % 64);
                }
                words.iter().for_each(|w| out.extend(w.to_le_bytes()));
            }
            Container::Run(r) => {
                out.extend((r.len() as u16).to_le_bytes());
                for &(s, e) in r {
                    out.extend(s.to_le_bytes());
                    out.extend((e - s).to_le_bytes()); // length minus one
                }
            }
        }
        out
    }
}

/// Writes containers in the portable format of the RoaringFormatSpec:
/// cookie 12346 (no run containers; size as u32; offsets always) or
/// cookie 12347 (size - 1 in the high 16 bits; a run bitset; offsets
/// only from 4 containers on).
fn portable(containers: &[(u16, Container)], with_runs: bool) -> Vec<u8> {
    let n = containers.len();
    let mut out = Vec::new();
    let offsets = if with_runs {
        out.extend((12347u32 | ((n as u32 - 1) << 16)).to_le_bytes());
        let mut runs = vec![0u8; n.div_ceil(8)];
        for (i, (_, c)) in containers.iter().enumerate() {
            if matches!(c, Container::Run(_)) {
                runs[i / 8] |= 1 << (i % 8);
            }
        }
        out.extend(runs);
        n >= 4
    } else {
        assert!(containers.iter().all(|(_, c)| !matches!(c, Container::Run(_))));
        out.extend(12346u32.to_le_bytes());
        out.extend((n as u32).to_le_bytes());
        true
    };
    for (key, c) in containers {
        out.extend(key.to_le_bytes());
        out.extend(((c.cardinality() - 1) as u16).to_le_bytes());
    }
    let bodies: Vec<Vec<u8>> = containers.iter().map(|(_, c)| c.body()).collect();
    if offsets {
        let mut at = out.len() + 4 * n;
        for b in &bodies {
            out.extend((at as u32).to_le_bytes());
            at += b.len();
        }
    }
    bodies.iter().for_each(|b| out.extend(b));
    out
}

/// The set the containers hold.
fn set_of(containers: &[(u16, Container)]) -> RoaringBitmap {
    containers
        .iter()
        .flat_map(|(key, c)| c.values().into_iter().map(move |v| (u32::from(*key) << 16) | u32::from(v)))
        .collect()
}

/// The no-runs portable encoding of `set`: arrays up to 4096 values, bitmaps above.
fn portable_from_set(set: &RoaringBitmap) -> Vec<u8> {
    let mut by_key: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
    for v in set {
        by_key.entry((v >> 16) as u16).or_default().push(v as u16);
    }
    let containers: Vec<(u16, Container)> = by_key
        .into_iter()
        .map(|(k, v)| (k, if v.len() <= 4096 { Container::Array(v) } else { Container::Bitmap(v) }))
        .collect();
    portable(&containers, false)
}

#[test]
fn hand_built_portable_bitmaps_are_read() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    let path = "/v1/filter?service=rating&channel=sms";
    let opted_out = [5u32, (3 << 16) | 2, (3 << 16) | 9999, 150, (7 << 16) | 4, 42];
    for id in opted_out {
        put(c, &id.to_string(), "rating", "sms", "opted_out");
    }
    let cases: Vec<(&str, Containers, bool)> = vec![
        (
            "cookie 12346: an array and a bitmap container",
            vec![
                (0, Container::Array(vec![1, 5, 1000, 65_535])),
                (3, Container::Bitmap((0..10_000u16).step_by(2).collect())), // 5000 values
            ],
            false,
        ),
        (
            "cookie 12347: a run, an array and a bitmap container (no offsets)",
            vec![
                (0, Container::Run(vec![(10, 20), (100, 199), (65_000, 65_535)])),
                (1, Container::Array(vec![7, 9])),
                (3, Container::Bitmap((0..12_000u16).step_by(2).collect())),
            ],
            true,
        ),
        (
            "cookie 12347 with 5 containers (offsets present)",
            vec![
                (0, Container::Array(vec![5, 42, 43])),
                (2, Container::Run(vec![(0, 65_535)])),
                (3, Container::Run(vec![(0, 0), (2, 2), (9_999, 10_001)])),
                (7, Container::Bitmap((0..4097u16).collect())),
                (65_535, Container::Run(vec![(65_535, 65_535)])),
            ],
            true,
        ),
    ];
    for (what, containers, with_runs) in &cases {
        let bytes = portable(containers, *with_runs);
        let set = set_of(containers);
        // The bytes are what the spec says: the reference reader agrees.
        assert_eq!(RoaringBitmap::deserialize_from(&bytes[..]).unwrap(), set, "{what}");
        let expected = &set - &opted_out.iter().copied().collect::<RoaringBitmap>();
        let a = send_raw(c, "POST", path, Some(ROARING), bytes);
        assert_eq!(decode_bitmap(&a), expected, "{what}");
        assert!(expected.len() < set.len(), "{what}: the case suppresses something");
    }
    // An empty bitmap (no containers) is a valid empty recipient list.
    let empty = portable(&[], false);
    assert_eq!(empty, [0x3a, 0x30, 0, 0, 0, 0, 0, 0]);
    assert!(decode_bitmap(&send_raw(c, "POST", path, Some(ROARING), empty)).is_empty());
}

#[test]
fn garbage_bitmaps_are_refused_with_400_invalid_bitmap() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    put(c, "1", "rating", "email", "opted_out");
    let fixture_bytes = fixture("bitmapwithruns.bin");
    let mut wrong_cookie = fixture("bitmapwithoutruns.bin");
    wrong_cookie[0] ^= 0xff;
    let mut trunc_no_runs = fixture("bitmapwithoutruns.bin");
    trunc_no_runs.truncate(trunc_no_runs.len() - 1);
    let unsorted = portable(&[(0, Container::Array(vec![9, 3, 5]))], false);
    let unsorted_keys = portable(&[(5, Container::Array(vec![1])), (2, Container::Array(vec![1]))], false);
    let overlapping_runs = portable(&[(0, Container::Run(vec![(10, 20), (15, 30)]))], true);
    let mut zero_runs = portable(&[(0, Container::Run(vec![(1, 2)]))], true);
    let at = zero_runs.len() - 6; // the run count
    zero_runs[at..at + 2].copy_from_slice(&0u16.to_le_bytes());
    let mut huge_size = 12346u32.to_le_bytes().to_vec();
    huge_size.extend(u32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", Vec::new()),
        ("text", b"hello, roaring".to_vec()),
        ("a cookie alone", 12346u32.to_le_bytes().to_vec()),
        ("wrong cookie", wrong_cookie),
        ("truncated fixture", fixture_bytes[..fixture_bytes.len() / 2].to_vec()),
        ("fixture less one byte", trunc_no_runs),
        ("unsorted array container", unsorted),
        ("unsorted container keys", unsorted_keys),
        ("overlapping runs", overlapping_runs),
        ("zero runs", zero_runs),
        ("absurd container count", huge_size),
        ("random bytes", (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
        // CRoaring's 64-bit portable format is not a 32-bit bitmap.
        ("portable_bitmap64.bin", fixture("portable_bitmap64.bin")),
    ];
    for (what, bytes) in cases {
        let a = send_raw(c, "POST", "/v1/filter?service=rating&channel=email", Some(ROARING), bytes);
        assert_eq!(a.status, 400, "{what}: {}", text(&a));
        expect_error(&a, 400, "invalid_bitmap");
    }
    // Still healthy, still correct.
    let a = send_raw(
        c,
        "POST",
        "/v1/filter?service=rating&channel=email",
        Some(ROARING),
        bitmap_bytes(&(0..3u32).collect()),
    );
    assert_eq!(decode_bitmap(&a), [0u32, 2].into_iter().collect());
}

/// Regression test: serde's derived `Deserialize` also accepts a struct
/// written as a JSON array of its fields in order, so every JSON body route
/// used to take `["opted_out"]` for `{"status":"opted_out"}` — and write it.
/// The bodies are objects; an array is a wrong type: 400 `invalid_field`,
/// nothing stored.
#[test]
fn positional_arrays_are_not_objects() {
    let app = util::spawn_app();
    let c = &app.client;
    create_service(c, "rating");
    for (method, path, body) in [
        ("PUT", "/v1/customers/1/preferences/rating/email", r#"["opted_out"]"#),
        ("POST", "/v1/services", r#"["ok"]"#),
        ("PATCH", "/v1/services/rating", r#"["Renamed"]"#),
        ("POST", "/v1/check", r#"[[{"customer": 1, "service": "rating", "channel": "email"}]]"#),
        ("POST", "/v1/filter?service=rating&channel=email", "[[1, 2]]"),
        (
            "POST",
            "/v1/preferences/import",
            r#"[[{"customer": 1, "service": "rating", "channel": "sms", "status": "opted_out"}]]"#,
        ),
        ("POST", "/v1/preferences/import", r#"{"items": [[1, "rating", "sms", "opted_out"]]}"#),
    ] {
        let a = send_raw(c, method, path, Some(JSON), body.as_bytes().to_vec());
        if method == "POST" && path == "/v1/preferences/import" && body.starts_with('{') {
            // The item is refused on its own.
            let v = expect(a, 200);
            assert_eq!(v["accepted"], 0, "{body}: {v}");
            assert_eq!(v["results"][0]["error"]["code"], "invalid_field", "{body}: {v}");
        } else {
            expect_error(&a, 400, "invalid_field");
        }
    }
    assert!(all_audit(c, 100).is_empty(), "nothing was written");
    assert_eq!(expect(send(c, "GET", "/v1/services", None), 200)["services"].as_array().unwrap().len(), 1);
    assert_eq!(expect(send(c, "GET", "/v1/services/rating", None), 200)["name"], "rating");
}
