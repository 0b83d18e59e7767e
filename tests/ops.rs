//! Operating prefsd: one log line per request (JSON when configured) that
//! names the route pattern and never a token, a key, a secret or a query;
//! request ids taken or generated and echoed; token redemptions and rate
//! limiting counted by result.

mod util;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use prefsd::client::Client;
use prefsd::domain::{CustomerId, Scope};
use serde_json::{Value, json};

/// A request with headers of our choosing: (status, x-request-id, body).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, Vec<u8>)>,
) -> (u16, String, Vec<u8>) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut req = ureq::http::Request::builder().method(method).uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (ct, bytes) = body.unwrap_or(("application/json", Vec::new()));
    if !bytes.is_empty() {
        req = req.header("content-type", ct);
    }
    let mut resp = agent.run(req.body(bytes).unwrap()).unwrap();
    let id = resp.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let status = resp.status().as_u16();
    (status, id, resp.body_mut().read_to_vec().unwrap())
}

#[test]
fn request_ids_are_echoed_or_generated() {
    let app = util::spawn_app();
    let (status, id, _) = request(app.addr, "GET", "/healthz", &[("x-request-id", "trace-42.a:b")], None);
    assert_eq!((status, id.as_str()), (200, "trace-42.a:b"), "a plain id is echoed");
    let (_, a, _) = request(app.addr, "GET", "/healthz", &[], None);
    let (_, b, _) = request(app.addr, "GET", "/nowhere", &[], None);
    for id in [&a, &b] {
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
    assert_ne!(a, b, "generated ids differ, on errors too");
    let (_, c, _) = request(app.addr, "GET", "/healthz", &[("x-request-id", "two words")], None);
    assert_ne!(c, "two words", "an id that is not plain enough to log is replaced");
    assert_eq!(c.len(), 16);
    let long = "x".repeat(129);
    let (_, d, _) = request(app.addr, "GET", "/healthz", &[("x-request-id", &long)], None);
    assert_eq!(d.len(), 16, "an over-long id is replaced");
}

#[test]
fn one_json_log_line_per_request_without_secrets() {
    const KEY: &str = "Kp1q2w3e4r5t6y7u8i9o0pAaSsDdFfGgHhJjKkLl";
    const TOKEN_SECRET: &str = "c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cy0wMTIzNDU2Nzg5";
    let dir = tempfile::tempdir().unwrap();
    let port = util::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let keys = format!("ops:admin:{}", prefsd::auth::hash_key(KEY));
    let token_keys = format!("1:{TOKEN_SECRET}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_prefsd"))
        .args(["serve", "--listen", &addr.to_string(), "--data"])
        .arg(dir.path().join("data"))
        .env_remove("PREFSD_CONFIG")
        .env("PREFSD_LOG", "info")
        .env("PREFSD_LOG_FORMAT", "json")
        .env("PREFSD_KEYS", &keys)
        .env("PREFSD_TOKEN_KEYS", &token_keys)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = Client::new(&format!("http://{addr}"), Some(KEY.to_owned()));
    util::wait_for("prefsd to become ready", Duration::from_secs(60), || {
        client.send("GET", "/readyz", None, None).ok().filter(|a| a.status == 200)
    });

    let auth = format!("Bearer {KEY}");
    let h = |id: &'static str| vec![("x-request-id", id), ("authorization", auth.as_str())];
    let body = |v: Value| Some(("application/json", serde_json::to_vec(&v).unwrap()));
    assert_eq!(request(addr, "POST", "/v1/services", &h("r1"), body(json!({"slug": "rating"}))).0, 201);
    let check = "/v1/check?customer=987654321&service=rating&channel=email";
    assert_eq!(request(addr, "GET", check, &h("r2"), None).0, 200);
    let issued = body(json!({"customer": 987654321, "service": "rating", "channel": "email"}));
    let (status, _, issued) = request(addr, "POST", "/v1/tokens", &h("r3"), issued);
    assert_eq!(status, 200);
    let token = serde_json::from_slice::<Value>(&issued).unwrap()["token"].as_str().unwrap().to_owned();
    let page = format!("/u/{token}");
    assert_eq!(request(addr, "GET", &page, &h("r4"), None).0, 200);
    let one_click = Some(("application/x-www-form-urlencoded", b"List-Unsubscribe=One-Click".to_vec()));
    assert_eq!(request(addr, "POST", &page, &h("r5"), one_click).0, 200);
    let redeem = body(json!({"token": token, "action": "opt_in"}));
    assert_eq!(request(addr, "POST", "/v1/tokens/redeem", &h("r6"), redeem).0, 200);
    assert_eq!(request(addr, "GET", "/v1/services", &[("x-request-id", "r7")], None).0, 401);

    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(child.wait().unwrap().success(), "{stderr}");

    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    let mut by_id: HashMap<String, Vec<&Value>> = HashMap::new();
    for line in lines.iter().filter(|l| l["target"] == "prefsd::request") {
        assert_eq!(line["level"], "INFO");
        let f = &line["fields"];
        assert!(f["latency_us"].is_u64(), "{line}");
        by_id.entry(f["request_id"].as_str().unwrap().to_owned()).or_default().push(f);
    }
    for (id, method, route, status) in [
        ("r1", "POST", "/v1/services", 201),
        ("r2", "GET", "/v1/check", 200),
        ("r3", "POST", "/v1/tokens", 200),
        ("r4", "GET", "/u/T", 200),
        ("r5", "POST", "/u/T", 200),
        ("r6", "POST", "/v1/tokens/redeem", 200),
        ("r7", "GET", "/v1/services", 401),
    ] {
        let seen = by_id.get(id).unwrap_or_else(|| panic!("no log line for request {id}:\n{stderr}"));
        assert_eq!(seen.len(), 1, "one line per request: {seen:?}");
        let f = seen[0];
        assert_eq!(
            (f["method"].as_str(), f["route"].as_str(), f["status"].as_u64()),
            (Some(method), Some(route), Some(status))
        );
    }
    for secret in [KEY, TOKEN_SECRET, token.as_str(), "987654321", "customer="] {
        assert!(!stderr.contains(secret), "the log shows {secret:?}:\n{stderr}");
    }
}

fn metric(app: &util::TestApp, series: &str) -> f64 {
    let text = String::from_utf8(app.client.send("GET", "/metrics", None, None).unwrap().body).unwrap();
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn redemptions_and_rate_limits_are_counted_by_result() {
    let app = util::spawn_with(|c| {
        c.rate_limit_burst = 6;
        c.rate_limit_per_minute = 1;
    });
    let c = &app.client;
    let ct = Some("application/json");
    let send = |method: &str, path: &str, v: Value| {
        c.send(method, path, ct, Some(serde_json::to_vec(&v).unwrap())).unwrap().status
    };
    let form = |path: &str, body: &str| {
        c.send("POST", path, Some("application/x-www-form-urlencoded"), Some(body.as_bytes().to_vec()))
            .unwrap()
            .status
    };
    assert_eq!(send("POST", "/v1/services", json!({"slug": "rating"})), 201);
    let tokens = app.app.tokens();
    let scope = Scope::parse("rating", "email").unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let fresh = tokens.issue(CustomerId(3), &scope, now).unwrap();
    let old = tokens.issue(CustomerId(4), &scope, now - 2 * tokens.lifetime_secs()).unwrap();

    assert_eq!(send("POST", "/v1/tokens/redeem", json!({"token": fresh, "action": "opt_out"})), 200);
    assert_eq!(send("POST", "/v1/tokens/redeem", json!({"token": old, "action": "opt_in"})), 400);
    assert_eq!(send("POST", "/v1/tokens/redeem", json!({"token": "AAAA", "action": "opt_out"})), 400);
    assert_eq!(
        form(&format!("/u/{old}"), "List-Unsubscribe=One-Click"),
        200,
        "an expired link still opts out"
    );
    assert_eq!(form(&format!("/u/{old}"), "action=opt_in&scope=token"), 404);
    assert_eq!(form("/u/AAAA", "List-Unsubscribe=One-Click"), 404);
    // Only failed attempts take from the budget of six: two above, four more.
    for _ in 0..4 {
        assert_eq!(c.send("GET", "/u/AAAA", None, None).unwrap().status, 404);
    }
    // Spent: failed attempts are refused and counted; a valid link is never
    // refused.
    assert_eq!(send("POST", "/v1/tokens/redeem", json!({"token": "AAAA", "action": "opt_out"})), 429);
    assert_eq!(form("/u/AAAA", "action=opt_out&scope=token"), 429);
    assert_eq!(c.send("GET", "/u/AAAA", None, None).unwrap().status, 429);
    assert_eq!(send("POST", "/v1/tokens/redeem", json!({"token": fresh, "action": "opt_in"})), 200);
    assert_eq!(form(&format!("/u/{fresh}"), "List-Unsubscribe=One-Click"), 200);

    let r = |via: &str, result: &str| {
        metric(&app, &format!("prefsd_token_redemptions_total{{via=\"{via}\",result=\"{result}\"}}"))
    };
    assert_eq!(r("redeem", "ok"), 2.0);
    assert_eq!(r("redeem", "expired"), 1.0);
    assert_eq!(r("redeem", "invalid"), 1.0);
    assert_eq!(r("redeem", "error"), 0.0);
    assert_eq!(r("link", "ok"), 2.0);
    assert_eq!(r("link", "expired"), 1.0);
    assert_eq!(r("link", "invalid"), 1.0);
    assert_eq!(metric(&app, "prefsd_rate_limited_total{route=\"/v1/tokens/redeem\"}"), 1.0);
    assert_eq!(metric(&app, "prefsd_rate_limited_total{route=\"/u/T\"}"), 2.0);
    assert_eq!(metric(&app, "prefsd_preference_writes_total{source=\"token\"}"), 2.0);
    assert_eq!(metric(&app, "prefsd_preference_writes_total{source=\"one_click\"}"), 2.0);
    let refused = "prefsd_http_requests_total{route=\"/u/T\",status=\"429\"}";
    assert_eq!(metric(&app, refused), 2.0, "every refusal is a 429");
}
