//! The support console over HTTP, as a browser without JavaScript uses it:
//! sign in with a staff key, find a customer, read the grid and the record
//! that decides a cell, change a pair with a reason, see it in the grid and
//! the timeline, sign out. Plus the refusals: roles, wrong keys, rate
//! limits, CSRF, expiry, and markup shown as text everywhere.

mod util;

use std::time::{Duration, Instant};

use prefsd::auth::{ApiKey, Role, hash_key, parse_hash};
use prefsd::client::Client;
use serde_json::{Value, json};

const ADMIN: &str = "admin-secret-k3y";
const SUPPORT: &str = "support-secret-k3y";
const SENDER: &str = "sender-secret-k3y";

fn key(name: &str, role: Role, secret: &str) -> ApiKey {
    ApiKey { name: name.into(), role, hash: parse_hash(&hash_key(secret)).unwrap() }
}

fn staff_keys(c: &mut prefsd::config::Config) {
    c.keys = vec![
        key("ops", Role::Admin, ADMIN),
        key("dana", Role::Support, SUPPORT),
        key("mailer", Role::Sender, SENDER),
    ];
}

/// An answer: status, headers (lowercase names), body.
struct Page {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Page {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn location(&self) -> Option<&str> {
        self.header("location")
    }

    /// The value of the first `name="csrf"` hidden field.
    fn csrf(&self) -> String {
        let at = self.body.find("name=\"csrf\" value=\"").expect("a form with a csrf field") + 19;
        self.body[at..].split('"').next().unwrap().to_owned()
    }

    /// The text of the grid cell of (service, channel).
    fn cell(&self, service: &str, channel: &str) -> &str {
        let marker = format!("<td data-service=\"{service}\" data-channel=\"{channel}\">");
        let at =
            self.body.find(&marker).unwrap_or_else(|| panic!("no cell {service}/{channel}")) + marker.len();
        self.body[at..].split("</td>").next().unwrap()
    }

    /// The first row of the timeline's body.
    fn newest_timeline_row(&self) -> &str {
        let table = &self.body[self.body.find("id=\"timeline\"").expect("a timeline")..];
        let body = &table[table.find("<tbody>").unwrap() + 7..];
        body.split("</tr>").next().unwrap()
    }
}

/// A cookie-holding browser that follows no redirects.
struct Browser {
    agent: ureq::Agent,
    base: String,
    cookie: Option<String>,
    user_agent: String,
}

impl Browser {
    fn new(app: &util::TestApp) -> Browser {
        let config = ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).build();
        Browser {
            agent: ureq::Agent::new_with_config(config),
            base: format!("http://{}", app.addr),
            cookie: None,
            user_agent: "console-test".into(),
        }
    }

    fn take(&mut self, resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Page {
        let mut resp = resp.expect("the sidecar answers");
        let status = resp.status().as_u16();
        let headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        for (k, v) in &headers {
            if k == "set-cookie" {
                let pair = v.split(';').next().unwrap();
                let value = pair.strip_prefix("prefsd_console=").expect("the console's cookie");
                self.cookie = (!value.is_empty() && !v.contains("Max-Age=0")).then(|| value.to_owned());
            }
        }
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        Page { status, headers, body }
    }

    fn get(&mut self, path: &str) -> Page {
        let mut req = self.agent.get(format!("{}{path}", self.base)).header("user-agent", &self.user_agent);
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("prefsd_console={c}"));
        }
        let resp = req.call();
        self.take(resp)
    }

    fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let mut req = self.agent.post(format!("{}{path}", self.base)).header("user-agent", &self.user_agent);
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("prefsd_console={c}"));
        }
        let resp = req.send_form(fields.iter().copied());
        self.take(resp)
    }

    fn sign_in(&mut self, key: &str) -> Page {
        self.post("/console/sign-in", &[("key", key)])
    }
}

fn api(app: &util::TestApp, key: &str) -> Client {
    Client::new(&format!("http://{}", app.addr), Some(key.into()))
}

fn call(c: &Client, method: &str, path: &str, body: Option<Value>) -> Value {
    c.call(method, path, body.as_ref()).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn assert_protected(p: &Page) {
    let csp = p.header("content-security-policy").expect("a CSP");
    for part in ["default-src 'none'", "script-src 'none'", "frame-ancestors 'none'", "form-action 'self'"] {
        assert!(csp.contains(part), "{csp}");
    }
    assert_eq!(p.header("cache-control"), Some("no-store"));
    assert_eq!(p.header("x-frame-options"), Some("DENY"));
    assert_eq!(p.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(p.header("referrer-policy"), Some("same-origin"));
    assert!(!p.body.contains("<script"), "no script on any page");
}

fn audit_len(app: &util::TestApp) -> usize {
    call(&api(app, ADMIN), "GET", "/v1/audit", None)["entries"].as_array().unwrap().len()
}

#[test]
fn support_finds_reads_changes_with_a_reason_and_signs_out() {
    let app = util::spawn_with(staff_keys);
    let admin = api(&app, ADMIN);
    call(&admin, "POST", "/v1/services", Some(json!({"slug": "rating", "name": "Ratings"})));
    call(
        &admin,
        "PUT",
        "/v1/customers/42/preferences/*/email",
        Some(json!({"status": "opted_out", "reason": "asked by phone"})),
    );
    let mut b = Browser::new(&app);

    // Not signed in: every page sends to the sign-in form.
    for path in ["/console/", "/console/customers/42", "/console/customers/42/export.json"] {
        let p = b.get(path);
        assert_eq!((p.status, p.location()), (303, Some("/console/sign-in")), "{path}");
    }
    let form = b.get("/console/sign-in");
    assert_eq!(form.status, 200);
    assert_protected(&form);
    assert!(form.body.contains("<html lang=\"en\">") && form.body.contains("name=\"key\""));
    assert!(form.body.contains("<label for=\"key\">"));

    // Sign in: a session cookie scoped to the console.
    let p = b.sign_in(SUPPORT);
    assert_eq!((p.status, p.location()), (303, Some("/console/")));
    let cookie = p.header("set-cookie").unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/console/"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http public_url: no Secure flag");
    let old_cookie = b.cookie.clone().unwrap();
    assert_eq!(old_cookie.len(), 43, "256 random bits");
    let overview = b.get("/console/");
    assert_eq!(overview.status, 200);
    assert_protected(&overview);
    assert!(overview.body.contains("Signed in as dana (support)"));

    // Find, then read the grid: the blocked cell names the record deciding it.
    let p = b.get("/console/customers?q=42");
    assert_eq!((p.status, p.location()), (303, Some("/console/customers/42")));
    let p = b.get("/console/customers?q=not-a-number");
    assert_eq!(p.status, 404);
    assert!(p.body.contains("is not a customer id"));
    let page = b.get("/console/customers/42");
    assert_eq!(page.status, 200);
    assert_protected(&page);
    let cell = page.cell("rating", "email");
    assert!(cell.contains("blocked"), "{cell}");
    for part in ["all services / email", "source api", "by ops", "asked by phone"] {
        assert!(cell.contains(part), "{part} in {cell}");
    }
    let sms = page.cell("rating", "sms");
    assert!(sms.contains("allowed") && sms.contains("No record"), "{sms}");

    // Change one pair with a reason.
    let csrf = page.csrf();
    let p = b.post(
        "/console/customers/42",
        &[
            ("csrf", &csrf),
            ("service", "rating"),
            ("channel", "email"),
            ("status", "opted_in"),
            ("reason", "called in"),
        ],
    );
    assert_eq!((p.status, p.location()), (303, Some("/console/customers/42")), "{}", p.body);
    let page = b.get("/console/customers/42");
    let cell = page.cell("rating", "email");
    assert!(cell.contains("allowed"), "{cell}");
    for part in ["rating / email", "source console", "by dana", "called in"] {
        assert!(cell.contains(part), "{part} in {cell}");
    }
    let row = page.newest_timeline_row();
    for part in ["opted_in", "console", "dana", "called in", "127.0.0.1", "console-test"] {
        assert!(row.contains(part), "{part} in {row}");
    }
    // The API agrees.
    let check = call(&admin, "GET", "/v1/check?customer=42&service=rating&channel=email", None);
    assert_eq!(check["allowed"], true);
    let audit = call(&admin, "GET", "/v1/customers/42/audit", None);
    let last = audit["entries"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["actor"].as_str(), last["source"].as_str()), (Some("dana"), Some("console")));
    assert_eq!(last["user_agent"], "console-test");

    // A change without a reason changes nothing.
    let before = audit_len(&app);
    let p = b.post(
        "/console/customers/42",
        &[("csrf", &csrf), ("service", "*"), ("channel", "*"), ("status", "opted_out"), ("reason", " ")],
    );
    assert_eq!(p.status, 400);
    assert!(p.body.contains("Nothing was changed"));
    assert_eq!(audit_len(&app), before);

    // Exports: this customer's data.
    let json_export = b.get("/console/customers/42/export.json");
    assert_eq!(json_export.status, 200);
    assert!(json_export.header("content-disposition").unwrap().contains("attachment"));
    let v: Value = serde_json::from_str(&json_export.body).unwrap();
    assert_eq!(v["customer"], 42);
    assert_eq!(v["timeline"].as_array().unwrap().len(), 2);
    assert_eq!(v["timeline"][0]["actor"], "dana");
    let csv_export = b.get("/console/customers/42/export.csv");
    assert_eq!(csv_export.header("content-type"), Some("text/csv; charset=utf-8"));
    let lines: Vec<&str> = csv_export.body.lines().collect();
    assert_eq!(lines.len(), 3, "{}", csv_export.body);
    assert!(lines[2].contains("dana") && lines[2].contains("called in"));

    // Signing in again replaces the browser's earlier session.
    let earlier = b.cookie.clone().unwrap();
    assert_eq!(b.sign_in(SUPPORT).status, 303);
    assert_ne!(b.cookie.as_deref(), Some(earlier.as_str()));
    let mut stale = Browser::new(&app);
    stale.cookie = Some(earlier);
    assert_eq!(stale.get("/console/").location(), Some("/console/sign-in"));
    let old_cookie = b.cookie.clone().unwrap();

    // Sign out: the old cookie no longer works.
    let csrf = b.get("/console/").csrf();
    let p = b.post("/console/sign-out", &[("csrf", &csrf)]);
    assert_eq!((p.status, p.location()), (303, Some("/console/sign-in")));
    assert!(p.header("set-cookie").unwrap().contains("Max-Age=0"));
    b.cookie = Some(old_cookie);
    let p = b.get("/console/customers/42");
    assert_eq!((p.status, p.location()), (303, Some("/console/sign-in")));
}

#[test]
fn roles_wrong_keys_and_the_sign_in_rate_limit() {
    let app = util::spawn_with(|c| {
        staff_keys(c);
        c.rate_limit_per_minute = 1;
        c.rate_limit_burst = 4;
    });
    call(&api(&app, ADMIN), "POST", "/v1/services", Some(json!({"slug": "rating"})));

    // Support: no service management, not even its link.
    let mut support = Browser::new(&app);
    assert_eq!(support.sign_in(SUPPORT).status, 303);
    assert_eq!(app.app.console().sessions().len(), 1);
    let overview = support.get("/console/");
    assert!(!overview.body.contains("/console/services"));
    assert_eq!(support.get("/console/services").status, 403);

    // Admin: the services page with its opted-out counts.
    let mut admin = Browser::new(&app);
    assert_eq!(admin.sign_in(ADMIN).status, 303);
    let services = admin.get("/console/services");
    assert_eq!(services.status, 200);
    assert!(services.body.contains("(rating)"));
    assert!(admin.get("/console/").body.contains("/console/services"));

    // A sender key cannot sign in, nor a wrong one; no cookie is set.
    let mut other = Browser::new(&app);
    let p = other.sign_in(SENDER);
    assert_eq!(p.status, 403);
    assert!(p.header("set-cookie").is_none() && other.cookie.is_none());
    let p = other.sign_in("not-a-key");
    assert_eq!(p.status, 401);
    assert!(p.body.contains("not a configured key"));
    assert!(p.header("set-cookie").is_none());
    // Four attempts from this address so far (two good, two bad) spent the
    // burst: the next is refused before the key is even looked at.
    let p = other.sign_in(SUPPORT);
    assert_eq!(p.status, 429);
    assert!(p.header("retry-after").is_some());
    assert!(other.cookie.is_none());
    // Signed-in staff are not affected: pages are not rate limited.
    assert_eq!(support.get("/console/").status, 200);
}

#[test]
fn forms_without_the_sessions_csrf_token_change_nothing() {
    let app = util::spawn_with(staff_keys);
    call(&api(&app, ADMIN), "POST", "/v1/services", Some(json!({"slug": "rating"})));
    let mut b = Browser::new(&app);
    b.sign_in(SUPPORT);
    let mut other = Browser::new(&app);
    other.sign_in(SUPPORT);
    let others_token = other.get("/console/").csrf();
    fn change(csrf: Option<&str>) -> Vec<(&'static str, &str)> {
        let mut fields =
            vec![("service", "rating"), ("channel", "email"), ("status", "opted_out"), ("reason", "r")];
        if let Some(t) = csrf {
            fields.push(("csrf", t));
        }
        fields
    }
    for token in [None, Some(""), Some("x"), Some(others_token.as_str())] {
        let p = b.post("/console/customers/5", &change(token));
        assert_eq!(p.status, 403, "{token:?}");
        assert!(p.body.contains("nothing was changed"));
        let p = b.post("/console/sign-out", &token.map(|t| vec![("csrf", t)]).unwrap_or_default());
        assert_eq!(p.status, 403, "sign-out with {token:?}");
    }
    assert_eq!(audit_len(&app), 0);
    assert_eq!(b.get("/console/customers/5").status, 200, "the session still works");

    // A form sent from another site is refused, even with the right token,
    // and so is a sign-in (login CSRF); the page's own origin passes.
    let token = b.get("/console/").csrf();
    let cookie = b.cookie.clone().unwrap();
    let post = |path: &str, origin: &str, fields: &[(&str, &str)]| {
        b.agent
            .post(format!("{}{path}", b.base))
            .header("origin", origin)
            .header("cookie", format!("prefsd_console={cookie}"))
            .send_form(fields.iter().copied())
            .unwrap()
    };
    let fields = change(Some(&token));
    let evil = post("/console/customers/5", "https://evil.example", &fields);
    assert_eq!(evil.status(), 403);
    for origin in ["https://evil.example", "null"] {
        let evil = post("/console/sign-in", origin, &[("key", SUPPORT)]);
        assert_eq!(evil.status(), 403, "{origin}");
        assert!(evil.headers().get("set-cookie").is_none());
    }
    assert_eq!(audit_len(&app), 0);
    let own = b.base.clone();
    assert_eq!(post("/console/customers/5", &own, &fields).status(), 303, "the console's own origin");
    assert_eq!(audit_len(&app), 1);
    // Without a session, a POST goes to sign-in and changes nothing either.
    let mut stranger = Browser::new(&app);
    let p = stranger.post("/console/customers/5", &change(Some(&others_token)));
    assert_eq!((p.status, p.location()), (303, Some("/console/sign-in")));
    assert_eq!(audit_len(&app), 1, "only the one accepted change");
}

#[test]
fn an_idle_session_is_sent_to_sign_in_and_https_cookies_are_secure() {
    let idle = Duration::from_millis(400);
    let app = util::spawn_with(|c| {
        staff_keys(c);
        c.console_idle = idle;
        c.public_url = "https://prefs.example.test".into();
    });
    let mut b = Browser::new(&app);
    let p = b.sign_in(SUPPORT);
    assert!(p.header("set-cookie").unwrap().contains("; Secure"));
    assert_eq!(b.get("/console/").status, 200);
    let used = Instant::now();
    // The condition is the passage of time itself: wait until the idle
    // limit has passed since the last use, without touching the session.
    util::wait_for("the idle limit to pass", Duration::from_secs(10), || {
        (used.elapsed() > idle).then_some(())
    });
    let p = b.get("/console/");
    assert_eq!((p.status, p.location()), (303, Some("/console/sign-in")));
    assert!(app.app.console().sessions().get(b.cookie.as_deref().unwrap(), Instant::now()).is_none());
}

#[test]
fn markup_is_shown_as_text_on_every_page_and_in_both_exports() {
    const NAME: &str = "<img src=x onerror=alert(1)>";
    const REASON: &str = "<script>alert('reason')</script>";
    const UA: &str = "<b onmouseover=alert(2)>ua</b>";
    let app = util::spawn_with(|c| {
        c.keys = vec![key(NAME, Role::Admin, ADMIN), key("dana", Role::Support, SUPPORT)];
    });
    let admin = api(&app, ADMIN);
    call(&admin, "POST", "/v1/services", Some(json!({"slug": "xss", "name": NAME, "description": REASON})));
    call(
        &admin,
        "PUT",
        "/v1/customers/9/preferences/xss/*",
        Some(json!({"status": "opted_out", "reason": REASON})),
    );
    let mut b = Browser::new(&app);
    b.user_agent = UA.into();
    b.sign_in(ADMIN);
    let csrf = b.get("/console/").csrf();
    let p = b.post(
        "/console/customers/9",
        &[
            ("csrf", &csrf),
            ("service", "xss"),
            ("channel", "sms"),
            ("status", "opted_in"),
            ("reason", REASON),
        ],
    );
    assert_eq!(p.status, 303, "{}", p.body);

    let find = b.get(&format!("/console/customers?q={}", prefsd::client::encode(REASON)));
    for (path, p) in [
        ("/console/", b.get("/console/")),
        ("/console/services", b.get("/console/services")),
        ("/console/customers/9", b.get("/console/customers/9")),
        ("/console/audit", b.get("/console/audit")),
        ("filtered audit", b.get(&format!("/console/audit?actor={}", prefsd::client::encode(NAME)))),
        ("find", find),
    ] {
        assert!(p.status == 200 || p.status == 404, "{path}: {}", p.status);
        for raw in [NAME, REASON, UA] {
            assert!(!p.body.contains(raw), "{path} prints {raw} as markup");
        }
        assert!(!p.body.contains("<script") && !p.body.contains("<img") && !p.body.contains("<b "), "{path}");
    }
    let page = b.get("/console/customers/9");
    let audit = b.get(&format!("/console/audit?actor={}", prefsd::client::encode(NAME)));
    assert_eq!(audit_seqs(&audit).len(), 2, "the filter finds both entries by the marked-up name");
    let audit_csv = b.get("/console/audit.csv");
    assert!(audit_csv.header("content-disposition").unwrap().starts_with("attachment"));
    let mut reader = csv::Reader::from_reader(audit_csv.body.as_bytes());
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!((&rows[0][7], &rows[0][9], &rows[1][11]), (REASON, NAME, UA));
    for shown in [
        "&lt;img src=x onerror=alert(1)&gt;",
        "&lt;script&gt;alert(&#39;reason&#39;)&lt;/script&gt;",
        "&lt;b onmouseover=alert(2)&gt;ua&lt;/b&gt;",
    ] {
        assert!(page.body.contains(shown), "{shown} shown as text");
    }

    // JSON: no raw markup in the file, and the exact values once parsed.
    let json_export = b.get("/console/customers/9/export.json");
    assert_eq!(json_export.header("x-content-type-options"), Some("nosniff"));
    assert!(!json_export.body.contains('<') && !json_export.body.contains('>'));
    let v: Value = serde_json::from_str(&json_export.body).unwrap();
    assert_eq!(v["timeline"][0]["reason"], REASON);
    assert_eq!(v["timeline"][0]["user_agent"], UA);
    assert_eq!(v["timeline"][1]["actor"], NAME);
    assert_eq!(v["grid"][0]["name"], NAME);
    // CSV: a download, never rendered; values kept exactly as data.
    let csv_export = b.get("/console/customers/9/export.csv");
    assert_eq!(csv_export.header("content-type"), Some("text/csv; charset=utf-8"));
    assert!(csv_export.header("content-disposition").unwrap().starts_with("attachment"));
    assert_eq!(csv_export.header("x-content-type-options"), Some("nosniff"));
    let mut rows = csv::Reader::from_reader(csv_export.body.as_bytes());
    let rows: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!((&rows[0][7], &rows[0][9]), (REASON, NAME));
    assert_eq!((&rows[1][7], &rows[1][11]), (REASON, UA));
}

/// The sequence numbers of the audit page's rows, in order.
fn audit_seqs(p: &Page) -> Vec<u64> {
    p.body.split("<tr><td>").skip(1).filter_map(|r| r.split("</td>").next()?.parse().ok()).collect()
}

/// Every entry of `GET /v1/audit`, oldest first.
fn api_audit(app: &util::TestApp) -> Vec<Value> {
    let admin = api(app, ADMIN);
    let mut after = 0;
    let mut all = Vec::new();
    loop {
        let page = call(&admin, "GET", &format!("/v1/audit?after={after}&limit=1000"), None);
        let entries = page["entries"].as_array().unwrap().clone();
        if page["next_after"] == after {
            return all;
        }
        after = page["next_after"].as_u64().unwrap();
        all.extend(entries);
    }
}

#[test]
fn audit_filters_pages_and_csv_are_exactly_the_api_rows() {
    let app = util::spawn_with(staff_keys);
    let admin = api(&app, ADMIN);
    let support = api(&app, SUPPORT);
    call(&admin, "POST", "/v1/services", Some(json!({"slug": "rating"})));
    call(&admin, "POST", "/v1/services", Some(json!({"slug": "waitlist"})));
    let items: Vec<Value> = (0..150)
        .map(|i| json!({"customer": i, "service": "rating", "channel": "sms", "status": "opted_out"}))
        .collect();
    assert_eq!(
        call(&admin, "POST", "/v1/preferences/import", Some(json!({"items": items})))["accepted"],
        150
    );
    for (c, s, h) in [(1, "rating", "email"), (2, "waitlist", "*"), (3, "*", "*")] {
        let body = json!({"status": "opted_out", "reason": "asked"});
        call(&support, "PUT", &format!("/v1/customers/{c}/preferences/{s}/{h}"), Some(body));
    }
    call(&admin, "PUT", "/v1/customers/1/preferences/rating/email", Some(json!({"status": "opted_in"})));
    let mut b = Browser::new(&app);
    b.sign_in(SUPPORT);
    let csrf = b.get("/console/").csrf();
    let fields = [
        ("csrf", csrf.as_str()),
        ("service", "waitlist"),
        ("channel", "sms"),
        ("status", "opted_out"),
        ("reason", "r"),
    ];
    assert_eq!(b.post("/console/customers/4", &fields).status, 303);

    let all = api_audit(&app);
    let today = all[0]["at"].as_str().unwrap()[..10].to_owned();
    let tomorrow: jiff::civil::Date = today.parse::<jiff::civil::Date>().unwrap().tomorrow().unwrap();
    type Pred = Box<dyn Fn(&Value) -> bool>;
    let cases: Vec<(String, Pred)> = vec![
        ("source=api".into(), Box::new(|e| e["source"] == "api")),
        ("actor=dana".into(), Box::new(|e| e["actor"] == "dana")),
        ("source=api&actor=dana".into(), Box::new(|e| e["source"] == "api" && e["actor"] == "dana")),
        ("service=*".into(), Box::new(|e| e["service"] == "*")),
        (
            "service=waitlist&channel=sms".into(),
            Box::new(|e| e["service"] == "waitlist" && e["channel"] == "sms"),
        ),
        ("source=console".into(), Box::new(|e| e["source"] == "console")),
        (format!("from={today}&to={today}&actor=ops"), Box::new(|e| e["actor"] == "ops")),
        (format!("from={tomorrow}"), Box::new(|_| false)),
        (format!("to={today}&source=import"), Box::new(|e| e["source"] == "import")),
    ];
    for (query, pred) in &cases {
        let expected: Vec<u64> = all.iter().filter(|e| pred(e)).map(|e| e["seq"].as_u64().unwrap()).collect();
        // The pages, followed by their "Next page" links.
        let mut shown = Vec::new();
        let mut path = format!("/console/audit?{query}");
        loop {
            let p = b.get(&path);
            assert_eq!(p.status, 200, "{path}");
            let rows = audit_seqs(&p);
            assert!(rows.len() <= 100, "{path}: {} rows on one page", rows.len());
            shown.extend(rows);
            match p.body.find("<a href=\"/console/audit?") {
                Some(at) if p.body[at..].contains(">Next page<") => {
                    let href = p.body[at + 9..].split('"').next().unwrap();
                    path = href.replace("&amp;", "&");
                }
                _ => break,
            }
        }
        assert_eq!(shown, expected, "{query}");
        // The CSV: exactly the same rows, with the API's fields.
        let csv_page = b.get(&format!("/console/audit.csv?{query}"));
        assert_eq!(csv_page.status, 200);
        let mut reader = csv::Reader::from_reader(csv_page.body.as_bytes());
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        let seqs: Vec<u64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
        assert_eq!(seqs, expected, "csv {query}");
        for (row, seq) in rows.iter().zip(&expected) {
            let e = all.iter().find(|e| e["seq"] == *seq).unwrap();
            assert_eq!(&row[1], e["at"].as_str().unwrap());
            assert_eq!(row[2], e["customer"].to_string());
            assert_eq!((&row[3], &row[4]), (e["service"].as_str().unwrap(), e["channel"].as_str().unwrap()));
            assert_eq!(&row[6], e["after"].as_str().unwrap());
            assert_eq!(&row[7], e["reason"].as_str().unwrap_or(""));
            assert_eq!((&row[8], &row[9]), (e["source"].as_str().unwrap(), e["actor"].as_str().unwrap()));
        }
    }
    assert_eq!(b.get("/console/audit?from=someday").status, 400);
}

/// The metrics' `prefsd_index_opted_out` gauge of one pair.
fn gauge(app: &util::TestApp, service: &str, channel: &str) -> u64 {
    let text = String::from_utf8(app.client.send("GET", "/metrics", None, None).unwrap().body).unwrap();
    let name = format!("prefsd_index_opted_out{{service=\"{service}\",channel=\"{channel}\"}} ");
    let line = text.lines().find_map(|l| l.strip_prefix(name.as_str())).unwrap_or_else(|| panic!("{name}"));
    line.trim().parse::<f64>().unwrap() as u64
}

#[test]
fn the_overview_matches_the_index_and_the_audit_log() {
    let app = util::spawn_with(staff_keys);
    let admin = api(&app, ADMIN);
    for slug in ["rating", "waitlist"] {
        call(&admin, "POST", "/v1/services", Some(json!({"slug": slug})));
    }
    for (c, s, h, status) in [
        (1, "rating", "email", "opted_out"),
        (2, "*", "*", "opted_out"),
        (3, "waitlist", "*", "opted_out"),
        (2, "rating", "sms", "opted_in"),
        (4, "*", "sms", "opted_out"),
    ] {
        call(
            &admin,
            "PUT",
            &format!("/v1/customers/{c}/preferences/{s}/{h}"),
            Some(json!({"status": status})),
        );
    }
    let mut b = Browser::new(&app);
    b.sign_in(SUPPORT);
    let p = b.get("/console/");
    assert_eq!(p.status, 200);
    for slug in ["rating", "waitlist"] {
        let marker = format!("({slug})</span></th><td>active</td>");
        let at = p.body.find(&marker).unwrap() + marker.len();
        let cells: Vec<u64> = p.body[at..]
            .split("</tr>")
            .next()
            .unwrap()
            .split("<td>")
            .filter_map(|c| c.split("</td>").next()?.parse().ok())
            .collect();
        assert_eq!(cells, vec![gauge(&app, slug, "email"), gauge(&app, slug, "sms")], "{slug}");
    }
    assert_eq!(gauge(&app, "rating", "sms"), 1, "the fixture means something");
    // Today's row of the per-day table counts today's entries.
    let all = api_audit(&app);
    let today = &all[0]["at"].as_str().unwrap()[..10];
    let outs = all.iter().filter(|e| e["after"] == "opted_out").count();
    let ins = all.iter().filter(|e| e["after"] == "opted_in").count();
    let row = format!("<tr><th scope=\"row\">{today}</th><td>{outs}</td><td>{ins}</td></tr>");
    assert!(p.body.contains(&row), "{row}");
    // The tally kept between overviews counts what was written since.
    call(&admin, "PUT", "/v1/customers/9/preferences/*/*", Some(json!({"status": "opted_in"})));
    let p = b.get("/console/");
    let row = format!("<tr><th scope=\"row\">{today}</th><td>{outs}</td><td>{}</td></tr>", ins + 1);
    assert!(p.body.contains(&row), "{row}");
    assert!(p.body.contains("<svg role=\"img\""), "the chart is drawn");
    assert_eq!(p.body.matches("<tr><th scope=\"row\">20").count(), 90, "ninety days in the table");
}

#[test]
fn admins_manage_services_in_the_console_and_support_cannot() {
    let app = util::spawn_with(staff_keys);
    let admin_api = api(&app, ADMIN);
    let mut admin = Browser::new(&app);
    admin.sign_in(ADMIN);
    let csrf = admin.get("/console/services").csrf();
    let p = admin.post(
        "/console/services",
        &[("csrf", &csrf), ("slug", "rating"), ("name", "Ratings"), ("description", "After a visit")],
    );
    assert_eq!((p.status, p.location()), (303, Some("/console/services")), "{}", p.body);
    let s = call(&admin_api, "GET", "/v1/services/rating", None);
    assert_eq!((s["name"].as_str(), s["description"].as_str()), (Some("Ratings"), Some("After a visit")));
    let p = admin.post("/console/services", &[("csrf", &csrf), ("slug", "rating")]);
    assert_eq!(p.status, 409, "a second registration is refused");
    let p = admin.post("/console/services", &[("csrf", &csrf), ("slug", "Bad Slug")]);
    assert_eq!(p.status, 400);

    let edit = |action: &'static str| {
        vec![
            ("csrf", csrf.clone()),
            ("name", "Visit ratings".to_owned()),
            ("description", "d".to_owned()),
            ("action", action.to_owned()),
        ]
    };
    let post = |b: &mut Browser, fields: Vec<(&str, String)>| {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        b.post("/console/services/rating", &fields)
    };
    assert_eq!(post(&mut admin, edit("save")).status, 303);
    assert_eq!(call(&admin_api, "GET", "/v1/services/rating", None)["name"], "Visit ratings");
    assert_eq!(post(&mut admin, edit("archive")).status, 303);
    assert_eq!(call(&admin_api, "GET", "/v1/services/rating", None)["archived"], true);
    assert!(admin.get("/console/services").body.contains("value=\"restore\""));
    assert_eq!(post(&mut admin, edit("restore")).status, 303);
    assert_eq!(call(&admin_api, "GET", "/v1/services/rating", None)["archived"], false);

    // Without the token, or as support, nothing changes.
    let p = admin.post("/console/services", &[("slug", "waitlist")]);
    assert_eq!(p.status, 403);
    let mut support = Browser::new(&app);
    support.sign_in(SUPPORT);
    let token = support.get("/console/").csrf();
    assert_eq!(support.post("/console/services", &[("csrf", &token), ("slug", "waitlist")]).status, 403);
    let archive = [("csrf", token.as_str()), ("action", "archive")];
    assert_eq!(support.post("/console/services/rating", &archive).status, 403);
    let list = call(&admin_api, "GET", "/v1/services", None);
    assert_eq!(list["services"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(call(&admin_api, "GET", "/v1/services/rating", None)["archived"], false);
}

#[test]
fn a_long_timeline_shows_the_newest_thousand_and_the_export_holds_all() {
    let app = util::spawn_with(staff_keys);
    let admin = api(&app, ADMIN);
    call(&admin, "POST", "/v1/services", Some(json!({"slug": "rating"})));
    let items: Vec<Value> = (0..1005)
        .map(|i| {
            let status = if i % 2 == 0 { "opted_out" } else { "opted_in" };
            json!({"customer": 77, "service": "rating", "channel": "email", "status": status, "reason": format!("r{i}")})
        })
        .collect();
    assert_eq!(
        call(&admin, "POST", "/v1/preferences/import", Some(json!({"items": items})))["accepted"],
        1005
    );
    let mut b = Browser::new(&app);
    b.sign_in(SUPPORT);
    let page = b.get("/console/customers/77");
    let timeline = &page.body[page.body.find("id=\"timeline\"").unwrap()..];
    assert_eq!(timeline.matches("<tr><td>").count(), 1000);
    assert!(page.body.contains("Showing the newest 1000 of 1005 changes"));
    assert!(page.newest_timeline_row().contains("r1004"));
    assert_eq!(b.get("/console/customers/77/export.csv").body.lines().count(), 1006);
}
