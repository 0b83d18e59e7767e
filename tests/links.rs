//! Opt-out links over real HTTP: issuing tokens and the mail headers,
//! RFC 8058 one-click (form-encoded and multipart), the recipient's page and
//! its forms, redemption by the web tier, escaping of hostile names and
//! reasons, the audit trail of token use, expiry, key rotation and the rate
//! limit of the recipient routes.

mod util;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use prefsd::auth::{ApiKey, Role, hash_key, parse_hash};
use prefsd::config::Cidr;
use prefsd::domain::{ChannelName, CustomerId, Scope};
use prefsd::token::{MAX_TOKEN_CHARS, Secret, TokenKey, Tokens};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------- helpers

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";
const UA: &str = "Mozilla/5.0 (prefsd links test) LinkChecker/1.0";
const DAY: u64 = 86_400;
const INVALID: &str = "this link is invalid or has expired";

/// A sidecar whose recipient-route rate limit is out of the way: every test
/// here talks from 127.0.0.1, and only the rate-limit tests want it near.
fn spawn() -> util::TestApp {
    util::spawn_with(|c| {
        c.rate_limit_burst = 1_000_000;
        c.rate_limit_per_minute = 1_000_000;
    })
}

/// An answer with every header (the crate's `Client` keeps only the content type).
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// A plain HTTP client that never follows redirects, so a redirect is seen.
struct Http {
    agent: ureq::Agent,
    base: String,
    key: Option<String>,
}

impl Http {
    fn new(app: &util::TestApp) -> Http {
        Http::with_key(app, None)
    }

    fn with_key(app: &util::TestApp, key: Option<&str>) -> Http {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(UA)
            .timeout_global(Some(Duration::from_secs(60)))
            .build();
        Http { agent: ureq::Agent::new_with_config(config), base: app.url(""), key: key.map(str::to_owned) }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Resp {
        let url = format!("{}{}", self.base, path);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(key) = &self.key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some((ct, bytes)) => {
                req = req.header("content-type", ct);
                bytes
            }
            None => Vec::new(),
        };
        let mut resp = self
            .agent
            .run(req.body(body).unwrap())
            .unwrap_or_else(|e| panic!("{method} {path}: cannot reach the sidecar: {e}"));
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = resp.body_mut().read_to_vec().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        Resp { status, headers, body }
    }

    fn get(&self, path: &str) -> Resp {
        self.send("GET", path, &[], None)
    }

    fn json(&self, method: &str, path: &str, body: &Value) -> Resp {
        self.send(method, path, &[], Some((JSON, body.to_string().into_bytes())))
    }

    fn form(&self, path: &str, fields: &[(&str, &str)]) -> Resp {
        self.form_with(path, &[], fields)
    }

    fn form_with(&self, path: &str, headers: &[(&str, &str)], fields: &[(&str, &str)]) -> Resp {
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish();
        self.send("POST", path, headers, Some((FORM, body.into_bytes())))
    }

    /// RFC 8058: the mailbox provider's POST, form-encoded.
    fn one_click(&self, path: &str) -> Resp {
        self.send("POST", path, &[], Some((FORM, b"List-Unsubscribe=One-Click".to_vec())))
    }

    /// RFC 8058 as `multipart/form-data`, which the RFC also allows.
    fn one_click_multipart(&self, path: &str) -> Resp {
        let boundary = "----prefsdBoundary7MA4YWxkTrZu0gW";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--{boundary}--\r\n"
        );
        let ct = format!("multipart/form-data; boundary={boundary}");
        self.send("POST", path, &[], Some((&ct, body.into_bytes())))
    }
}

/// Asserts a 2xx/4xx JSON answer with `status` and returns its body.
#[track_caller]
fn expect(r: Resp, status: u16) -> Value {
    assert_eq!(r.status, status, "unexpected status; body: {}", r.text());
    assert!(r.header("content-type").unwrap_or("").starts_with(JSON), "not JSON: {r:?}");
    r.json()
}

/// Asserts the error contract: exactly `{"error":{"code","message"}}`.
#[track_caller]
fn expect_error(r: &Resp, status: u16, code: &str) -> String {
    assert_eq!(r.status, status, "expected {status} {code}; body: {}", r.text());
    assert!(r.header("content-type").unwrap_or("").starts_with(JSON), "error is not JSON: {r:?}");
    let v = r.json();
    assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["error"], "{v}");
    let mut keys: Vec<&String> = v["error"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["code", "message"], "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let message = v["error"]["message"].as_str().unwrap().to_owned();
    assert!(!message.trim().is_empty(), "{v}");
    message
}

fn create_service(h: &Http, slug: &str, name: &str) {
    let v = expect(h.json("POST", "/v1/services", &json!({"slug": slug, "name": name})), 201);
    assert_eq!(v["name"], name);
}

/// `POST /v1/tokens`, asserting 200; returns the whole answer.
fn issue(h: &Http, customer: u64, service: &str, channel: &str) -> Value {
    expect(
        h.json("POST", "/v1/tokens", &json!({"customer": customer, "service": service, "channel": channel})),
        200,
    )
}

/// The `/u/TOKEN` path of a freshly issued token.
fn link(h: &Http, customer: u64, service: &str, channel: &str) -> String {
    format!("/u/{}", issue(h, customer, service, channel)["token"].as_str().unwrap())
}

#[track_caller]
fn allowed(h: &Http, customer: u64, service: &str, channel: &str) -> bool {
    let v = expect(h.get(&format!("/v1/check?customer={customer}&service={service}&channel={channel}")), 200);
    v["allowed"].as_bool().unwrap()
}

/// Every (service, channel, allowed) of a customer, as the API resolves it.
fn effective(h: &Http, customer: u64) -> Vec<(String, String, bool)> {
    let v = expect(h.get(&format!("/v1/customers/{customer}/preferences")), 200);
    let mut out: Vec<_> = v["effective"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["service"].as_str().unwrap().to_owned(),
                e["channel"].as_str().unwrap().to_owned(),
                e["allowed"] == true,
            )
        })
        .collect();
    out.sort();
    out
}

/// The pairs of `customer` that are not allowed, as `service/channel`.
fn suppressed(h: &Http, customer: u64) -> Vec<String> {
    effective(h, customer).into_iter().filter(|(_, _, a)| !a).map(|(s, c, _)| format!("{s}/{c}")).collect()
}

/// The explicit records of a customer.
fn records(h: &Http, customer: u64) -> Vec<Value> {
    expect(h.get(&format!("/v1/customers/{customer}/preferences")), 200)["records"]
        .as_array()
        .unwrap()
        .clone()
}

/// The whole audit log.
fn audit(h: &Http) -> Vec<Value> {
    let v = expect(h.get("/v1/audit?after=0&limit=10000"), 200);
    v["entries"].as_array().unwrap().clone()
}

/// The HTML answer of a recipient route: content type and protective headers.
#[track_caller]
fn assert_recipient_headers(r: &Resp) {
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"), "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{r:?}");
    assert!(r.header("x-robots-tag").unwrap_or("").contains("noindex"), "{r:?}");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{r:?}");
    let csp = r.header("content-security-policy").unwrap_or_else(|| panic!("no CSP: {r:?}"));
    let directive = |name: &str| {
        csp.split(';')
            .map(str::trim)
            .find_map(|d| d.strip_prefix(name).filter(|v| v.is_empty() || v.starts_with(' ')))
            .map(str::trim)
    };
    assert_eq!(directive("frame-ancestors"), Some("'none'"), "{csp}");
    // No script may run: script-src (or default-src standing in for it) is 'none'.
    match directive("script-src") {
        Some(v) => assert_eq!(v, "'none'", "{csp}"),
        None => assert_eq!(directive("default-src"), Some("'none'"), "{csp}"),
    }
    for loophole in ["script-src-elem", "script-src-attr", "unsafe-inline", "unsafe-eval", "strict-dynamic"] {
        assert!(!csp.contains(loophole), "{loophole} in {csp}");
    }
    assert!(r.header("location").is_none(), "{r:?}");
}

/// Asserts the page's inline stylesheet is the one its CSP allows by hash,
/// so a browser actually applies it.
#[track_caller]
fn assert_style_allowed(r: &Resp) {
    let html = r.text();
    let start = html.find("<style>").expect("an inline stylesheet") + "<style>".len();
    let end = start + html[start..].find("</style>").unwrap();
    let hash = STANDARD.encode(Sha256::digest(&html.as_bytes()[start..end]));
    let csp = r.header("content-security-policy").unwrap();
    assert!(csp.contains(&format!("'sha256-{hash}'")), "style hash {hash} not in {csp}");
}

/// Undoes the page's escaping of attribute values.
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// The `(name, value)` of every `<input>` with a value in `html`, in order,
/// and whether it is checked (hidden inputs count as checked).
fn inputs(html: &str) -> Vec<(String, String, String, bool)> {
    let mut out = Vec::new();
    for chunk in html.split("<input").skip(1) {
        let tag = &chunk[..chunk.find('>').unwrap()];
        let attr = |name: &str| {
            let pat = format!(" {name}=\"");
            tag.find(&pat).map(|i| {
                let rest = &tag[i + pat.len()..];
                unescape(&rest[..rest.find('"').unwrap()])
            })
        };
        let kind = attr("type").unwrap_or_default();
        let checked = kind == "hidden" || tag.contains(" checked");
        if let (Some(name), Some(value)) = (attr("name"), attr("value")) {
            out.push((kind, name, value, checked));
        }
    }
    out
}

/// The fields a browser submits for the `n`-th form of `html` as it stands.
fn form_fields(html: &str, n: usize) -> Vec<(String, String)> {
    let form = html.split("<form").nth(n + 1).unwrap_or_else(|| panic!("no form {n} in {html}"));
    let form = &form[..form.find("</form>").unwrap()];
    inputs(form).into_iter().filter(|(_, _, _, checked)| *checked).map(|(_, n, v, _)| (n, v)).collect()
}

fn as_refs(fields: &[(String, String)]) -> Vec<(&str, &str)> {
    fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn key(id: u8, fill: u8) -> TokenKey {
    TokenKey { id, secret: Secret::new(vec![fill; 32]).unwrap() }
}

fn scope(s: &str, c: &str) -> Scope {
    Scope::parse(s, c).unwrap()
}

/// Two services with display names, for most tests.
fn two_services(h: &Http) {
    create_service(h, "rating", "Ratings");
    create_service(h, "waitlist", "Waiting list");
}

/// The four pairs of [`two_services`] with the default channels.
const PAIRS: [&str; 4] = ["rating/email", "rating/sms", "waitlist/email", "waitlist/sms"];

// ----------------------------------------------------------------- issuing

#[test]
fn issuing_gives_a_short_url_safe_token_its_url_and_the_mail_headers() {
    let long = "c".repeat(64);
    let app = util::spawn_with(|c| {
        c.public_url = "https://prefs.example.test/mail".into();
        c.channels.push(ChannelName::parse(&long).unwrap());
    });
    let h = Http::new(&app);
    two_services(&h);
    let slug64 = "s".repeat(64);
    create_service(&h, &slug64, "Long");
    for (customer, service, channel) in [
        (1, "rating", "email"),
        (u64::MAX, "waitlist", "sms"),
        (0, "*", "email"),
        (7, "rating", "*"),
        (8, "*", "*"),
        (u64::MAX, slug64.as_str(), "email"),
    ] {
        let v = issue(&h, customer, service, channel);
        let token = v["token"].as_str().unwrap();
        assert!(!token.is_empty() && token.len() <= MAX_TOKEN_CHARS, "{} chars: {token}", token.len());
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{token}");
        let url = format!("https://prefs.example.test/mail/u/{token}");
        assert_eq!(v["url"], url.as_str());
        assert_eq!(v["headers"]["List-Unsubscribe"], format!("<{url}>"));
        assert_eq!(v["headers"]["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click");
        let expires = v["expires_at"].as_str().unwrap();
        assert!(expires.ends_with('Z') && expires.len() >= 20, "{expires}");
        // The token carries the customer id and nothing else personal: no
        // display name, only the slug the scope needs.
        let raw = URL_SAFE_NO_PAD.decode(token).unwrap();
        assert_eq!(raw[0], 1, "layout version");
        assert!(!raw.windows(4).any(|w| w == b"Rati" || w == b"Wait"), "display name inside the token");
    }
    // A typical token is short.
    assert!(issue(&h, 123_456_789, "rating", "email")["token"].as_str().unwrap().len() < 80);

    // Names too long for 200 characters are refused cleanly; unknown names are 404.
    let r = h.json("POST", "/v1/tokens", &json!({"customer": 1, "service": slug64, "channel": long}));
    expect_error(&r, 400, "token_too_long");
    let r = h.json("POST", "/v1/tokens", &json!({"customer": 1, "service": "nope", "channel": "email"}));
    expect_error(&r, 404, "unknown_service");
    let r = h.json("POST", "/v1/tokens", &json!({"customer": 1, "service": "rating", "channel": "fax"}));
    expect_error(&r, 404, "unknown_channel");
    let r = h.json("POST", "/v1/tokens", &json!({"customer": -1, "service": "rating", "channel": "email"}));
    expect_error(&r, 400, "invalid_field");
    let r = h.json("POST", "/v1/tokens", &json!({"customer": 1, "service": "rating"}));
    expect_error(&r, 400, "invalid_field");
    let r = h.send("POST", "/v1/tokens", &[], Some((FORM, b"customer=1".to_vec())));
    expect_error(&r, 415, "unsupported_media_type");
    // Issuing changes nothing.
    assert!(audit(&h).is_empty());
}

#[test]
fn issuing_needs_a_sender_key_but_the_link_needs_none() {
    let (admin_key, sender_key) = ("links-admin-k3y", "links-sender-k3y");
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
    let admin = Http::with_key(&app, Some(admin_key));
    let sender = Http::with_key(&app, Some(sender_key));
    let none = Http::new(&app);
    let wrong = Http::with_key(&app, Some("not-a-key"));
    create_service(&admin, "rating", "Ratings");

    let body = json!({"customer": 5, "service": "rating", "channel": "email"});
    expect_error(&none.json("POST", "/v1/tokens", &body), 401, "unauthorized");
    expect_error(&wrong.json("POST", "/v1/tokens", &body), 401, "unauthorized");
    let token = expect(sender.json("POST", "/v1/tokens", &body), 200)["token"].as_str().unwrap().to_owned();
    expect(admin.json("POST", "/v1/tokens", &body), 200);

    // The token is its own credential: page, one-click and redemption need no key.
    let page = none.get(&format!("/u/{token}"));
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains("Ratings"));
    assert_eq!(none.one_click(&format!("/u/{token}")).status, 200);
    assert!(!allowed(&admin, 5, "rating", "email"));
    let v = expect(none.json("POST", "/v1/tokens/redeem", &json!({"token": token, "action": "opt_in"})), 200);
    assert_eq!(v["status"], "opted_in");
    assert!(allowed(&admin, 5, "rating", "email"));
    // …but the rest of the API still does.
    expect_error(&none.get("/v1/check?customer=5&service=rating&channel=email"), 401, "unauthorized");
    expect_error(&sender.get("/v1/audit"), 403, "forbidden");
}

// --------------------------------------------------------------- one-click

#[test]
fn one_click_form_encoded_and_multipart_touch_only_the_tokens_scope() {
    let app = spawn();
    let h = Http::new(&app);
    two_services(&h);

    for (customer, multipart) in [(1u64, false), (2, true)] {
        let path = link(&h, customer, "rating", "email");
        let before = audit(&h).len();
        let r = if multipart { h.one_click_multipart(&path) } else { h.one_click(&path) };
        // Acts at once and answers without a redirect.
        assert_eq!(r.status, 200, "multipart={multipart}: {}", r.text());
        assert!(r.header("location").is_none(), "{r:?}");
        assert_recipient_headers(&r);
        assert!(r.text().contains("You are unsubscribed"), "{}", r.text());
        assert!(!r.text().contains("<script"));

        // Exactly the token's pair, nothing else of this customer…
        assert_eq!(suppressed(&h, customer), ["rating/email"], "multipart={multipart}");
        let recs = records(&h, customer);
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(
            (recs[0]["service"].as_str(), recs[0]["channel"].as_str()),
            (Some("rating"), Some("email"))
        );
        assert_eq!(recs[0]["status"], "opted_out");
        assert_eq!(recs[0]["source"], "one_click");
        // …and one audit entry.
        let log = audit(&h);
        assert_eq!(log.len(), before + 1);
        assert_eq!(log.last().unwrap()["customer"], customer);
    }
    // Other customers are untouched.
    for pair in PAIRS {
        let (s, c) = pair.split_once('/').unwrap();
        assert!(allowed(&h, 3, s, c), "{pair}");
    }
    assert!(allowed(&h, 1, "rating", "sms") && allowed(&h, 1, "waitlist", "email"));
    assert!(allowed(&h, 2, "rating", "sms") && allowed(&h, 2, "waitlist", "email"));

    // A POST that is neither one-click nor a page form changes nothing.
    let path = link(&h, 3, "rating", "email");
    let before = audit(&h);
    // Each is told to the person as a page that says it did not work, and
    // why, with nothing to submit.
    let refused = |r: &Resp, status: u16, why: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        assert_recipient_headers(r);
        let html = r.text();
        assert!(html.contains("That did not work"), "{html}");
        assert!(html.contains(why), "{why:?} is not said: {html}");
        assert!(!html.contains("unsubscribed") && !html.contains("<form"), "{html}");
    };
    for body in ["List-Unsubscribe=Nope", "", "list-unsubscribe=one-click"] {
        let r = h.send("POST", &path, &[], Some((FORM, body.as_bytes().to_vec())));
        refused(&r, 400, "The form could not be understood");
    }
    let r = h.send("POST", &path, &[], Some((JSON, br#"{"List-Unsubscribe":"One-Click"}"#.to_vec())));
    refused(&r, 415, "is not accepted here");
    let r = h.send("POST", &path, &[], Some(("multipart/form-data; boundary=x", b"--x\r\nbroken".to_vec())));
    refused(&r, 400, "the multipart body could not be read");
    assert_eq!(audit(&h), before);
    assert!(allowed(&h, 3, "rating", "email"));
}

#[test]
fn one_click_with_star_scopes_covers_exactly_what_the_star_says() {
    let app = spawn();
    let h = Http::new(&app);
    two_services(&h);
    let cases: [(u64, &str, &str, &[&str]); 4] = [
        (10, "*", "email", &["rating/email", "waitlist/email"]),
        (11, "rating", "*", &["rating/email", "rating/sms"]),
        (12, "*", "*", &PAIRS),
        (13, "waitlist", "sms", &["waitlist/sms"]),
    ];
    for (customer, s, c, expected) in cases {
        let r = h.one_click(&link(&h, customer, s, c));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(suppressed(&h, customer), expected, "token ({s}, {c})");
        let recs = records(&h, customer);
        assert_eq!(recs.len(), 1);
        assert_eq!((recs[0]["service"].as_str().unwrap(), recs[0]["channel"].as_str().unwrap()), (s, c));
    }
    // A service registered afterwards is covered by the broad scopes too.
    create_service(&h, "appointment", "Appointments");
    assert!(!allowed(&h, 10, "appointment", "email") && allowed(&h, 10, "appointment", "sms"));
    assert!(allowed(&h, 11, "appointment", "email"));
    assert!(!allowed(&h, 12, "appointment", "email") && !allowed(&h, 12, "appointment", "sms"));
    assert!(allowed(&h, 13, "appointment", "sms"));
}

#[test]
fn a_token_is_never_spent() {
    let app = spawn();
    let h = Http::new(&app);
    two_services(&h);
    let path = link(&h, 30, "rating", "email");
    let token = path.trim_start_matches("/u/").to_owned();
    let redeem = |action: &str| {
        expect(h.json("POST", "/v1/tokens/redeem", &json!({"token": token, "action": action})), 200)
    };
    for round in 0..3 {
        assert_eq!(h.one_click(&path).status, 200, "round {round}");
        assert!(!allowed(&h, 30, "rating", "email"));
        assert_eq!(h.one_click(&path).status, 200, "round {round}, repeated");
        assert!(!allowed(&h, 30, "rating", "email"));
        assert_eq!(redeem("opt_in")["status"], "opted_in");
        assert!(allowed(&h, 30, "rating", "email"));
        assert_eq!(redeem("opt_out")["status"], "opted_out");
        assert_eq!(h.form(&path, &[("action", "opt_in"), ("scope", "token")]).status, 200);
        assert!(allowed(&h, 30, "rating", "email"));
        assert_eq!(h.get(&path).status, 200, "the page still opens");
    }
    // Every change was a write with its own audit entry; the repeated
    // one-click found its choice in force and wrote nothing.
    assert_eq!(audit(&h).len(), 3 * 4);
}

// -------------------------------------------------------------------- page

#[test]
fn the_page_changes_nothing_and_is_sent_with_protective_headers() {
    const CUSTOMER: u64 = 4_040_404;
    let app = spawn();
    let h = Http::new(&app);
    two_services(&h);
    // Some state to show and to keep: waitlist by sms is off.
    let put = json!({"status": "opted_out", "reason": "api"});
    expect(h.json("PUT", &format!("/v1/customers/{CUSTOMER}/preferences/waitlist/sms"), &put), 200);
    let path = link(&h, CUSTOMER, "rating", "email");
    let (audit_before, effective_before, records_before) =
        (audit(&h), effective(&h, CUSTOMER), records(&h, CUSTOMER));

    // Scanners follow links, repeatedly, with GET and HEAD.
    for _ in 0..3 {
        let page = h.get(&path);
        assert_eq!(page.status, 200, "{}", page.text());
        assert_recipient_headers(&page);
        assert_style_allowed(&page);
        let html = page.text();
        assert!(html.contains("Ratings"), "the page names the service: {html}");
        assert!(html.contains("email"));
        assert!(!html.to_ascii_lowercase().contains("<script"), "{html}");
        for handler in ["onload=", "onclick=", "onsubmit=", "onerror=", "javascript:"] {
            assert!(!html.contains(handler), "{handler} in {html}");
        }
        assert!(html.contains("<form method=\"post\""));
        assert!(html.contains("name=\"viewport\""), "readable on phones");

        let head = h.send("HEAD", &path, &[], None);
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        assert_recipient_headers(&head);
    }
    assert_eq!(audit(&h), audit_before, "GET/HEAD wrote an audit entry");
    assert_eq!(effective(&h, CUSTOMER), effective_before);
    assert_eq!(records(&h, CUSTOMER), records_before);
    assert!(allowed(&h, CUSTOMER, "rating", "email"));

    // The page shows every pair of the customer with its current state, and
    // offers the channel-wide choice beside the token's own.
    let html = h.get(&path).text();
    let shown: Vec<(String, bool)> = inputs(&html)
        .into_iter()
        .filter(|(kind, name, _, _)| kind == "checkbox" && name == "allow")
        .map(|(_, _, value, checked)| (value, checked))
        .collect();
    assert_eq!(
        shown,
        [
            ("rating/email".to_owned(), true),
            ("rating/sms".to_owned(), true),
            ("waitlist/email".to_owned(), true),
            ("waitlist/sms".to_owned(), false),
        ]
    );
    assert!(html.contains("Waiting list"));
    let radios: Vec<String> = inputs(&html)
        .into_iter()
        .filter(|(k, n, _, _)| k == "radio" && n == "scope")
        .map(|(_, _, v, _)| v)
        .collect();
    assert_eq!(radios, ["token", "channel"]);
    // The customer id is not printed on the page.
    assert!(!html.contains(&CUSTOMER.to_string()));

    // Archived services are not offered.
    expect(h.json("PATCH", "/v1/services/waitlist", &json!({"archived": true})), 200);
    let html = h.get(&path).text();
    assert!(!html.contains("waitlist/"), "{html}");
    assert!(html.contains("rating/sms"));

    // Only GET, HEAD and POST are routes of a link.
    for method in ["PUT", "DELETE", "PATCH"] {
        let message = expect_error(&h.send(method, &path, &[], None), 405, "method_not_allowed");
        assert_eq!(message, "this route accepts GET, POST", "{method}");
    }
    assert_eq!(audit(&h), audit_before);
}

#[test]
fn hostile_names_and_reasons_are_escaped_and_reasons_stored_as_given() {
    let app = spawn();
    let h = Http::new(&app);
    let name = "<script>alert(1)</script>\"'&<img src=x onerror=alert(2)>";
    let escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;&lt;img src=x onerror=alert(2)&gt;";
    create_service(&h, "evil", name);
    let path = link(&h, 50, "evil", "email");

    // No raw copy of any part of the name, anywhere on the page; where the
    // page shows the name, it shows the escaped form.
    let check_html = |html: &str, shows_name: bool| {
        let lower = html.to_ascii_lowercase();
        assert!(!lower.contains("<script"), "{html}");
        assert!(!lower.contains("<img"), "{html}");
        assert!(!lower.contains("onerror=alert(2)>"), "a raw `>` of the name: {html}");
        assert!(!lower.contains("\"'&<"), "a raw copy of the name: {html}");
        if shows_name {
            assert!(lower.contains("onerror=alert(2)&gt;"), "the escaped name is missing: {html}");
        }
    };
    let page = h.get(&path);
    assert_eq!(page.status, 200);
    let html = page.text();
    check_html(&html, true);
    // In the heading and in the list of choices.
    assert!(html.matches(escaped).count() >= 3, "{html}");

    // A person's reason with markup, through the page's own form.
    let text = "  </p><script>alert(3)</script> & \"quotes\" 'too' <b>bold</b>  ";
    let r = h.form(
        &path,
        &[("action", "opt_out"), ("scope", "token"), ("reason", "Other"), ("reason_text", text)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_recipient_headers(&r);
    let confirmation = r.text();
    check_html(&confirmation, false);
    assert!(!confirmation.contains("<b>"));
    assert!(confirmation.contains("You are unsubscribed"));
    let stored = format!("Other: {}", text.trim());
    let entry = audit(&h).pop().unwrap();
    assert_eq!(entry["reason"], stored.as_str(), "{entry}");
    assert_eq!(entry["service"], "evil");
    assert_eq!(records(&h, 50)[0]["reason"], stored.as_str());
    // The page shown afterwards is still clean.
    check_html(&h.get(&path).text(), true);

    // Free text alone is kept as given (trimmed); a chosen reason alone too.
    let overlong = "é".repeat(700);
    for (fields, stored) in [
        (&[("action", "opt_out"), ("reason", ""), ("reason_text", "  <i>x</i>  ")][..], json!("<i>x</i>")),
        (
            &[("action", "opt_out"), ("reason", "I get too many messages"), ("reason_text", "  ")][..],
            json!("I get too many messages"),
        ),
        (&[("action", "opt_out")][..], Value::Null),
        // An overlong one is cut to 500 characters (not bytes).
        (&[("action", "opt_out"), ("reason_text", overlong.as_str())][..], json!("é".repeat(500))),
    ] {
        // Subscribed again first: an opt-out already in force writes nothing.
        assert_eq!(h.form(&path, &[("action", "opt_in"), ("scope", "token")]).status, 200);
        assert_eq!(h.form(&path, fields).status, 200, "{fields:?}");
        assert_eq!(audit(&h).pop().unwrap()["reason"], stored, "{fields:?}");
    }

    // Redemption stores its reason verbatim, and refuses an overlong one.
    let token = path.trim_start_matches("/u/");
    let hostile = "<script>alert(4)</script>\u{0}\"'&";
    expect(h.json("POST", "/v1/tokens/redeem", &json!({"token": token, "action": "opt_in"})), 200);
    let v =
        h.json("POST", "/v1/tokens/redeem", &json!({"token": token, "action": "opt_out", "reason": hostile}));
    expect(v, 200);
    assert_eq!(audit(&h).pop().unwrap()["reason"], hostile);
    let before = audit(&h).len();
    let r = h.json(
        "POST",
        "/v1/tokens/redeem",
        &json!({"token": token, "action": "opt_out", "reason": "x".repeat(501)}),
    );
    expect_error(&r, 400, "invalid_input");
    assert_eq!(audit(&h).len(), before);

    // A hostile token in the path is not reflected.
    let r = h.get("/u/%3Cscript%3Ealert(5)%3C%2Fscript%3E");
    assert_eq!(r.status, 404);
    assert!(!r.text().contains("alert(5)"), "{}", r.text());
}

#[test]
fn page_forms_opt_out_undo_and_update_exactly_what_changed() {
    let app = spawn();
    let h = Http::new(&app);
    two_services(&h);
    let path = link(&h, 60, "rating", "email");

    // Opt out of the token's own pair, then undo with the confirmation's form.
    let html = h.get(&path).text();
    let mut fields = form_fields(&html, 0);
    assert_eq!(fields.iter().find(|(k, _)| k == "action").unwrap().1, "opt_out");
    assert_eq!(
        fields.iter().find(|(k, _)| k == "scope").unwrap().1,
        "token",
        "the narrow choice is the default"
    );
    fields.retain(|(k, _)| k != "reason_text");
    let r = h.form(&path, &as_refs(&fields));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("You are unsubscribed"));
    assert_eq!(suppressed(&h, 60), ["rating/email"]);
    let undo = form_fields(&r.text(), 0);
    assert_eq!(undo, [("action".to_owned(), "opt_in".to_owned()), ("scope".to_owned(), "token".to_owned())]);
    assert!(r.text().contains(">Undo: subscribe me again</button>"), "{}", r.text());
    let r = h.form(&path, &as_refs(&undo));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("subscribed again"), "{}", r.text());
    assert!(suppressed(&h, 60).is_empty());
    assert!(allowed(&h, 60, "rating", "email"));
    // The "subscribed again" page offers to opt out once more, and its
    // button says so.
    assert_eq!(form_fields(&r.text(), 0)[0], ("action".to_owned(), "opt_out".to_owned()));
    assert!(r.text().contains(">Undo: unsubscribe me again</button>"), "{}", r.text());
    assert!(!r.text().contains(">Undo: subscribe me again<"), "{}", r.text());

    // Channel-wide: (*, email) is written, and undone.
    let r = h.form(&path, &[("action", "opt_out"), ("scope", "channel")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(suppressed(&h, 60), ["rating/email", "waitlist/email"]);
    let rec = records(&h, 60).into_iter().find(|r| r["status"] == "opted_out").unwrap();
    assert_eq!((rec["service"].as_str(), rec["channel"].as_str()), (Some("*"), Some("email")));
    let undo = form_fields(&r.text(), 0);
    assert_eq!(undo[1], ("scope".to_owned(), "channel".to_owned()));
    assert_eq!(h.form(&path, &as_refs(&undo)).status, 200);
    assert!(suppressed(&h, 60).is_empty());
    // Other customers never moved.
    assert!(suppressed(&h, 61).is_empty());

    // "Save my choices": only the pair whose box changed is written.
    let html = h.get(&path).text();
    let mut fields = form_fields(&html, 1);
    assert_eq!(fields[0], ("action".to_owned(), "update".to_owned()));
    let shown: Vec<&str> = fields.iter().filter(|(k, _)| k == "shown").map(|(_, v)| v.as_str()).collect();
    assert_eq!(shown, PAIRS);
    fields.retain(|(k, v)| !(k == "allow" && v == "waitlist/sms")); // untick one box
    let before = audit(&h).len();
    let r = h.form(&path, &as_refs(&fields));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("1 setting changed"), "{}", r.text());
    let log = audit(&h);
    assert_eq!(log.len(), before + 1, "only the changed box is written");
    let e = log.last().unwrap();
    assert_eq!(
        (e["service"].as_str(), e["channel"].as_str(), e["after"].as_str()),
        (Some("waitlist"), Some("sms"), Some("opted_out"))
    );
    assert_eq!(e["source"], "token");
    assert_eq!(suppressed(&h, 60), ["waitlist/sms"]);

    // Submitting the page as it now stands changes nothing.
    let fields = form_fields(&h.get(&path).text(), 1);
    let r = h.form(&path, &as_refs(&fields));
    assert!(r.text().contains("0 settings changed"), "{}", r.text());
    assert_eq!(audit(&h).len(), before + 1);

    // Ticking it again and unticking two others: three writes, exactly those.
    let mut fields = form_fields(&h.get(&path).text(), 1);
    fields.retain(|(k, v)| !(k == "allow" && (v == "rating/email" || v == "rating/sms")));
    fields.push(("allow".into(), "waitlist/sms".into()));
    assert!(h.form(&path, &as_refs(&fields)).text().contains("3 settings changed"));
    assert_eq!(suppressed(&h, 60), ["rating/email", "rating/sms"]);
    assert_eq!(audit(&h).len(), before + 4);

    // Only pairs the form says it showed are touched; bogus keys are ignored.
    let before = audit(&h).len();
    let r = h.form(
        &path,
        &[
            ("action", "update"),
            ("shown", "waitlist/email"),
            ("shown", "*/*"),
            ("shown", "rating/*"),
            ("shown", "nope/email"),
            ("shown", "rating/fax"),
            ("shown", "garbage"),
            ("allow", "*/*"),
        ],
    );
    assert!(r.text().contains("1 setting changed"), "{}", r.text());
    assert_eq!(suppressed(&h, 60), ["rating/email", "rating/sms", "waitlist/email"]);
    let log = audit(&h);
    assert_eq!(log.len(), before + 1, "an update writes only single pairs it showed");
    assert_eq!(log[before]["service"], "waitlist");
    assert_eq!(log[before]["channel"], "email");

    // A form that says nothing understandable changes nothing.
    let before = audit(&h);
    for fields in [&[("action", "delete_everything")][..], &[("scope", "channel")][..]] {
        let r = h.form(&path, fields);
        assert_eq!(r.status, 400, "{fields:?}: {}", r.text());
        assert_recipient_headers(&r);
        assert!(r.text().contains("did not work"));
    }
    assert_eq!(audit(&h), before);
}

// ------------------------------------------------------------------ audit

#[test]
fn token_use_is_audited_as_the_recipient_with_address_and_agent() {
    let app = spawn();
    let h = Http::new(&app);
    two_services(&h);
    let path = link(&h, 70, "rating", "email");
    let token = path.trim_start_matches("/u/").to_owned();
    // Without trusted proxies, X-Forwarded-For is a claim anyone can make.
    let spoof = [("x-forwarded-for", "203.0.113.66"), ("user-agent", "Spoofer/2.0")];

    assert_eq!(
        h.send("POST", &path, &spoof, Some((FORM, b"List-Unsubscribe=One-Click".to_vec()))).status,
        200
    );
    assert_eq!(h.form_with(&path, &spoof, &[("action", "opt_in")]).status, 200);
    let body = json!({"token": token, "action": "opt_out", "reason": "via web tier"});
    let r = h.send("POST", "/v1/tokens/redeem", &spoof, Some((JSON, body.to_string().into_bytes())));
    expect(r, 200);
    let long_agent = "A".repeat(1000);
    assert_eq!(h.form_with(&path, &[("user-agent", &long_agent)], &[("action", "opt_in")]).status, 200);
    // An admin's change is not the recipient's.
    expect(h.json("PUT", "/v1/customers/70/preferences/waitlist/sms", &json!({"status": "opted_out"})), 200);

    let log = audit(&h);
    assert_eq!(log.len(), 5);
    let sources: Vec<&str> = log.iter().map(|e| e["source"].as_str().unwrap()).collect();
    assert_eq!(sources, ["one_click", "token", "token", "token", "api"]);
    for e in &log[..4] {
        assert_eq!(e["actor"], "recipient", "{e}");
        assert_eq!(e["client_addr"], "127.0.0.1", "X-Forwarded-For believed from an untrusted peer: {e}");
        assert_eq!(
            (e["customer"].as_u64(), e["service"].as_str(), e["channel"].as_str()),
            (Some(70), Some("rating"), Some("email"))
        );
    }
    for e in &log[..3] {
        assert_eq!(e["user_agent"], "Spoofer/2.0", "{e}");
    }
    assert_eq!(log[3]["user_agent"], "A".repeat(256), "the agent is kept, cut to 256 characters");
    let afters: Vec<&str> = log.iter().map(|e| e["after"].as_str().unwrap()).collect();
    assert_eq!(afters, ["opted_out", "opted_in", "opted_out", "opted_in", "opted_out"]);
    assert_eq!(log[0]["before"], Value::Null);
    assert_eq!(log[1]["before"], "opted_out");
    assert_eq!(log[2]["reason"], "via web tier");
    assert_eq!(log[4]["actor"], "local");
    assert_eq!(log[4]["client_addr"], Value::Null);
    // The customer's own audit view says the same.
    let mine = expect(h.get("/v1/customers/70/audit"), 200);
    assert_eq!(mine["entries"].as_array().unwrap(), &log);
}

#[test]
fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
    let app = util::spawn_with(|c| {
        c.trusted_proxies = vec![Cidr::parse("127.0.0.1").unwrap()];
        c.rate_limit_burst = 1_000_000;
    });
    let h = Http::new(&app);
    two_services(&h);
    let cases = [
        (Some("198.51.100.7"), "198.51.100.7"),
        // Right-most untrusted entry: the trusted hop is skipped, the left
        // (client-supplied) entry is not believed.
        (Some("192.0.2.1, 198.51.100.8, 127.0.0.1"), "198.51.100.8"),
        (Some("2001:db8::9"), "2001:db8::9"),
        // Proxies that write a port: the address counts, the port does not.
        (Some("192.0.2.1, 203.0.113.5:443"), "203.0.113.5"),
        (Some("[2001:db8::7]:8443"), "2001:db8::7"),
        // An entry that is no address ends the walk at the hop that relayed
        // it; what the client wrote to its left is never believed.
        (Some("not-an-address"), "127.0.0.1"),
        (Some("192.0.2.1, unknown"), "127.0.0.1"),
        (Some("192.0.2.1, unknown, 127.0.0.1"), "127.0.0.1"),
        (None, "127.0.0.1"),
    ];
    // One link per case: a link used again for the choice in force writes nothing.
    for (i, (xff, _)) in cases.iter().enumerate() {
        let path = link(&h, 80 + i as u64, "rating", "email");
        let headers: Vec<(&str, &str)> = xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
        let r = h.send("POST", &path, &headers, Some((FORM, b"List-Unsubscribe=One-Click".to_vec())));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let addrs: Vec<String> =
        audit(&h).iter().map(|e| e["client_addr"].as_str().unwrap().to_owned()).collect();
    let expected: Vec<&str> = cases.iter().map(|(_, want)| *want).collect();
    assert_eq!(addrs, expected);
}

// ----------------------------------------------------------------- redeem

#[test]
fn redeem_acts_on_the_tokens_scope_and_refuses_bad_input() {
    let app = spawn();
    let h = Http::new(&app);
    two_services(&h);
    let token = issue(&h, 90, "*", "sms")["token"].as_str().unwrap().to_owned();
    let redeem = |body: Value| h.json("POST", "/v1/tokens/redeem", &body);

    let v = expect(redeem(json!({"token": token, "action": "opt_out", "reason": "too many"})), 200);
    assert_eq!(v["customer"], 90);
    assert_eq!(v["service"], "*");
    assert_eq!(v["channel"], "sms");
    assert_eq!(v["status"], "opted_out");
    assert!(v["seq"].as_u64().unwrap() > 0);
    assert_eq!(suppressed(&h, 90), ["rating/sms", "waitlist/sms"]);
    assert!(suppressed(&h, 91).is_empty());
    let v = expect(redeem(json!({"token": token, "action": "opt_in"})), 200);
    assert_eq!(v["status"], "opted_in");
    assert!(suppressed(&h, 90).is_empty());

    // Invalid and tampered tokens: one answer for all, naming nothing.
    let mut tampered = token.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
    let mut other_customer = raw.clone();
    other_customer[2] ^= 1; // the customer id's first byte, signature left as is
    let before = audit(&h);
    for bad in [
        tampered.clone(),
        URL_SAFE_NO_PAD.encode(&other_customer),
        String::new(),
        "not a token".into(),
        token[..token.len() - 1].to_owned(),
        format!("{token}A"),
        "A".repeat(201),
        "../../etc/passwd".into(),
    ] {
        for action in ["opt_out", "opt_in"] {
            let r = redeem(json!({"token": bad, "action": action}));
            let message = expect_error(&r, 400, "invalid_token");
            assert_eq!(message, INVALID);
            assert!(!r.text().contains("90"), "{}", r.text());
        }
    }
    // Bad actions and bodies.
    let message = expect_error(&redeem(json!({"token": token, "action": "delete"})), 400, "invalid_action");
    assert!(message.contains("delete"));
    expect_error(&redeem(json!({"token": token, "action": "OPT_OUT"})), 400, "invalid_action");
    expect_error(&redeem(json!({"token": token})), 400, "invalid_field");
    expect_error(&redeem(json!({"token": token, "action": "opt_out", "customer": 1})), 400, "invalid_field");
    expect_error(&redeem(json!({"action": "opt_out"})), 400, "invalid_field");
    expect_error(&redeem(json!({"token": 5, "action": "opt_out"})), 400, "invalid_field");
    let r = h.send("POST", "/v1/tokens/redeem", &[], Some((JSON, b"{\"token\":".to_vec())));
    expect_error(&r, 400, "invalid_json");
    let r = h.send(
        "POST",
        "/v1/tokens/redeem",
        &[],
        Some((FORM, format!("token={token}&action=opt_out").into_bytes())),
    );
    expect_error(&r, 415, "unsupported_media_type");
    expect_error(&h.get("/v1/tokens/redeem"), 405, "method_not_allowed");
    assert_eq!(audit(&h), before, "a refused redemption wrote something");
    assert!(suppressed(&h, 90).is_empty());
}

#[test]
fn an_invalid_link_shows_only_the_invalid_page() {
    let app = spawn();
    let h = Http::new(&app);
    create_service(&h, "rating", "Ratings");
    let token = issue(&h, 987_654_321, "rating", "email")["token"].as_str().unwrap().to_owned();
    let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 0x40; // the tag
    let tampered = URL_SAFE_NO_PAD.encode(&raw);

    let mut bodies = Vec::new();
    for path in [
        format!("/u/{tampered}"),
        "/u/garbage".to_owned(),
        format!("/u/{}", &token[..20]),
        "/u/%FF%FE".to_owned(),
        format!("/u/{}", "A".repeat(300)),
        format!("/u/{token}%00"),
    ] {
        let r = h.get(&path);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert_recipient_headers(&r);
        let html = r.text();
        assert!(html.contains("invalid or has expired"), "{html}");
        for secret in ["987654321", "Ratings", "rating", "email", "<form", "<script"] {
            assert!(!html.contains(secret), "{path}: the invalid page shows {secret:?}: {html}");
        }
        bodies.push(r.body);
        // A POST (one-click or form) to it changes nothing and says the same.
        let r = h.one_click(&path);
        assert_eq!(r.status, 404, "{path}");
        bodies.push(r.body);
        let r = h.form(&path, &[("action", "opt_out"), ("scope", "channel")]);
        assert_eq!(r.status, 404, "{path}");
        bodies.push(r.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "invalid pages differ");
    assert!(audit(&h).is_empty());
    assert!(allowed(&h, 987_654_321, "rating", "email"));
}

// -------------------------------------------------------- expiry and keys

#[test]
fn expired_tokens_still_opt_out_but_cannot_opt_in_or_show_the_page() {
    const LIFETIME: u64 = 30 * DAY;
    let app = util::spawn_with(|c| {
        c.token_keys = vec![key(1, 7)];
        c.token_lifetime = Duration::from_secs(LIFETIME);
        c.rate_limit_burst = 1_000_000;
    });
    let h = Http::new(&app);
    two_services(&h);
    let signer = Tokens::new(vec![key(1, 7)], LIFETIME).unwrap();
    let now = now_secs();

    // The app signs with the configured key: its tokens verify here, fresh.
    let issued = issue(&h, 100, "rating", "email")["token"].as_str().unwrap().to_owned();
    let claims = signer.verify(&issued, now_secs()).unwrap();
    assert_eq!(claims.customer, CustomerId(100));
    assert!(!claims.expired && claims.issued_at as u64 >= now.saturating_sub(60));

    // A token just inside its lifetime is fully usable.
    let young = signer.issue(CustomerId(101), &scope("rating", "email"), now - LIFETIME + DAY).unwrap();
    assert_eq!(h.get(&format!("/u/{young}")).status, 200);
    assert_eq!(h.form(&format!("/u/{young}"), &[("action", "opt_out")]).status, 200);
    assert!(!allowed(&h, 101, "rating", "email"));
    let r = h.json("POST", "/v1/tokens/redeem", &json!({"token": young, "action": "opt_in"}));
    expect(r, 200);
    assert!(allowed(&h, 101, "rating", "email"));

    // Issued a day past its lifetime (and one far in the past).
    for (customer, issued_at) in [(102u64, now - LIFETIME - DAY), (103, 1_000_000_000)] {
        let old = signer.issue(CustomerId(customer), &scope("rating", "email"), issued_at).unwrap();
        let path = format!("/u/{old}");
        let redeem =
            |action: &str| h.json("POST", "/v1/tokens/redeem", &json!({"token": old, "action": action}));

        // The page does not open.
        let r = h.get(&path);
        assert_eq!(r.status, 404, "{}", r.text());
        assert!(r.text().contains("invalid or has expired"));
        assert!(!r.text().contains("Ratings"));
        // One-click still opts out.
        let r = h.one_click(&path);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!allowed(&h, customer, "rating", "email"));
        // Opting in is refused everywhere, and changes nothing.
        let before = audit(&h);
        assert_eq!(expect_error(&redeem("opt_in"), 400, "invalid_token"), INVALID);
        let r = h.form(&path, &[("action", "opt_in"), ("scope", "token")]);
        assert_eq!(r.status, 404, "{}", r.text());
        assert!(r.text().contains("invalid or has expired"));
        let r = h.form(&path, &[("action", "update"), ("shown", "rating/email"), ("allow", "rating/email")]);
        assert_eq!(r.status, 404, "{}", r.text());
        assert_eq!(audit(&h), before);
        assert!(!allowed(&h, customer, "rating", "email"));
        // Redeem and the page form still opt out (the redeem finds the
        // one-click's choice in force and writes nothing); the confirmation
        // offers no undo.
        expect(redeem("opt_out"), 200);
        let r = h.form(&path, &[("action", "opt_out"), ("scope", "channel")]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("You are unsubscribed"));
        assert!(!r.text().contains("<form"), "an expired link offers an undo: {}", r.text());
        assert_eq!(suppressed(&h, customer), ["rating/email", "waitlist/email"]);
        assert_eq!(audit(&h).len(), before.len() + 1);
    }
}

#[test]
fn unlisted_keys_are_refused_and_rotation_keeps_old_tokens_valid() {
    let (old, new) = (key(1, 7), key(2, 9));
    let app = util::spawn_with(|c| {
        c.token_keys = vec![new.clone(), old.clone()];
        c.rate_limit_burst = 1_000_000;
    });
    let h = Http::new(&app);
    two_services(&h);
    let now = now_secs();
    let before_rotation = Tokens::new(vec![old.clone()], 180 * DAY).unwrap();

    // The first listed key signs what the app issues.
    let issued = issue(&h, 110, "rating", "email")["token"].as_str().unwrap().to_owned();
    assert_eq!(URL_SAFE_NO_PAD.decode(&issued).unwrap()[1], 2, "key id of an issued token");
    assert!(before_rotation.verify(&issued, now).is_err(), "the old key alone cannot verify it");

    // A token signed before the rotation still works everywhere.
    let legacy = before_rotation.issue(CustomerId(111), &scope("waitlist", "sms"), now - DAY).unwrap();
    let page = h.get(&format!("/u/{legacy}"));
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains("Waiting list"));
    assert_eq!(h.one_click(&format!("/u/{legacy}")).status, 200);
    assert_eq!(suppressed(&h, 111), ["waitlist/sms"]);
    expect(h.json("POST", "/v1/tokens/redeem", &json!({"token": legacy, "action": "opt_in"})), 200);
    assert!(suppressed(&h, 111).is_empty());

    // Unlisted key ids, and a listed id with another secret, are refused.
    let before = audit(&h);
    for stranger in [key(3, 7), key(1, 8), key(2, 7)] {
        let signer = Tokens::new(vec![stranger], 180 * DAY).unwrap();
        let forged = signer.issue(CustomerId(112), &scope("*", "*"), now).unwrap();
        let path = format!("/u/{forged}");
        // Both answer the invalid-link page, which shows nothing of the
        // token's scope and offers nothing to submit.
        for r in [h.get(&path), h.one_click(&path)] {
            assert_eq!(r.status, 404, "{}", r.text());
            assert_recipient_headers(&r);
            let html = r.text();
            assert!(html.contains("This link is invalid or has expired"), "{html}");
            for shown in ["unsubscribed", "<form", "Ratings", "Waiting list", "112"] {
                assert!(!html.contains(shown), "a forged link's page shows {shown:?}: {html}");
            }
        }
        let r = h.json("POST", "/v1/tokens/redeem", &json!({"token": forged, "action": "opt_out"}));
        assert_eq!(expect_error(&r, 400, "invalid_token"), INVALID);
    }
    assert_eq!(audit(&h), before);
    assert!(suppressed(&h, 112).is_empty());
}

// -------------------------------------------------------------- rate limit

#[test]
fn failed_link_attempts_are_rate_limited_per_client_address() {
    let app = util::spawn_with(|c| {
        c.rate_limit_burst = 3;
        c.rate_limit_per_minute = 1;
    });
    let h = Http::new(&app);
    two_services(&h);
    let path = link(&h, 120, "rating", "email");
    let token = path.trim_start_matches("/u/").to_owned();
    // The token with its last character changed.
    let last = if token.ends_with('A') { "B" } else { "A" };
    let forged = format!("/u/{}{last}", &token[..token.len() - 1]);

    let started = Instant::now();
    for i in 0..3 {
        assert_eq!(h.get(&forged).status, 404, "failed attempt {i} is within the burst");
    }
    let r = h.get(&forged);
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_recipient_headers(&r);
    assert!(r.text().contains("Too many requests"));
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    // One request a minute: the next is due in a minute, less the time this
    // test took. Retry-After must not promise it earlier than that.
    assert!(retry <= 60, "Retry-After {retry}");
    assert!(retry as f64 >= 60.0 - elapsed, "Retry-After {retry} is earlier than the bucket refills");

    // Forged redemptions and form posts share the address's budget.
    let r = h.json("POST", "/v1/tokens/redeem", &json!({"token": "AAAA", "action": "opt_out"}));
    expect_error(&r, 429, "rate_limited");
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    let r = h.send("POST", &forged, &[], Some((FORM, b"action=opt_out&scope=token".to_vec())));
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert!(audit(&h).is_empty(), "a limited request wrote");
    // A valid link is never limited: the page, its forms, one-click and
    // redemption all work from the same address.
    assert_eq!(h.get(&path).status, 200);
    let r = h.one_click(&path);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(audit(&h).len(), 1, "the one-click wrote");
    expect(h.json("POST", "/v1/tokens/redeem", &json!({"token": token, "action": "opt_in"})), 200);
    let r = h.send("POST", &path, &[], Some((FORM, b"action=opt_out&scope=token".to_vec())));
    assert_eq!(r.status, 200);
    assert_eq!(audit(&h).len(), 3);
    // An X-Forwarded-For from an untrusted peer does not buy a fresh budget.
    assert_eq!(h.send("GET", &forged, &[("x-forwarded-for", "198.51.100.1")], None).status, 429);
    // Senders' and admins' routes are not limited.
    for _ in 0..5 {
        assert!(!allowed(&h, 120, "rating", "email"), "opted out by the form above");
        issue(&h, 120, "rating", "email");
    }
}

#[test]
fn behind_a_trusted_proxy_each_client_address_has_its_own_budget() {
    let app = util::spawn_with(|c| {
        c.rate_limit_burst = 3;
        c.rate_limit_per_minute = 1;
        c.trusted_proxies = vec![Cidr::parse("127.0.0.0/8").unwrap()];
    });
    let h = Http::new(&app);
    create_service(&h, "rating", "Ratings");
    let path = link(&h, 130, "rating", "email");
    let last = if path.ends_with('A') { "B" } else { "A" };
    let forged = format!("{}{last}", &path[..path.len() - 1]);
    let from = |path: &str, ip: &str| h.send("GET", path, &[("x-forwarded-for", ip)], None).status;
    for _ in 0..3 {
        assert_eq!(from(&forged, "198.51.100.1"), 404);
    }
    assert_eq!(from(&forged, "198.51.100.1"), 429);
    assert_eq!(from(&forged, "198.51.100.2"), 404, "another client behind the proxy is not limited");
    assert_eq!(from(&forged, "198.51.100.1"), 429);
    assert_eq!(from(&path, "198.51.100.1"), 200, "a valid link is never limited");
}
