//! The support console in a real browser: headless Chromium over the W3C
//! WebDriver protocol (as `tests/browser.rs` drives the recipient page).
//! A support agent signs in, finds a customer, reads why a cell is
//! blocked, changes it with a reason, sees it in the grid and timeline,
//! and signs out; an admin sees the services page. axe-core 4.x runs on
//! every page and must find no serious or critical violation. Screenshots
//! are saved under `target/browser-screenshots/console-*.png`.
//!
//! Needs `chromium`, `chromedriver` and axe-core's `axe.min.js` (from
//! `npm pack axe-core@4`, unpacked into `target/axe-core/package/`, or
//! named by `PREFSD_AXE_JS`); skipped with a SKIP line without them,
//! unless `PREFSD_TEST_REQUIRE_ALL=1`.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use prefsd::auth::{ApiKey, Role, hash_key, parse_hash};
use prefsd::client::Client;
use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const ADMIN: &str = "admin-secret-k3y";
const SUPPORT: &str = "support-secret-k3y";

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { Path::new(env!("CARGO_MANIFEST_DIR")).join(p) })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn find_program(name: &str, fallback: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .chain([PathBuf::from(fallback)])
        .find(|p| p.is_file())
}

fn axe_source() -> Option<String> {
    let path = std::env::var_os("PREFSD_AXE_JS")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("axe-core/package/axe.min.js"));
    std::fs::read_to_string(path).ok()
}

/// A chromedriver with one browser session; dropping it ends both.
struct Driver {
    child: Child,
    agent: ureq::Agent,
    base: String,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start(chromedriver: &Path, chromium: &Path) -> Driver {
        let port = util::free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build();
        let mut driver = Driver {
            child,
            agent: ureq::Agent::new_with_config(config),
            base: format!("http://127.0.0.1:{port}"),
            session: None,
            _profile: tempfile::tempdir().expect("profile dir"),
        };
        util::wait_for("chromedriver to be ready", Duration::from_secs(30), || {
            if let Ok(Some(status)) = driver.child.try_wait() {
                panic!("chromedriver exited before becoming ready: {status}");
            }
            driver.raw("GET", "/status", None).ok().filter(|v| v["value"]["ready"] == true)
        });
        let profile = format!("--user-data-dir={}", driver._profile.path().display());
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--window-size=1280,1000", profile,
                ],
            },
        }}});
        let v = driver.raw("POST", "/session", Some(&caps)).unwrap_or_else(|e| panic!("new session: {e}"));
        driver.session = Some(v["value"]["sessionId"].as_str().expect("a session id").to_owned());
        driver
    }

    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", "application/json; charset=utf-8")
            .body(body.map(Value::to_string).unwrap_or_default().into_bytes())
            .map_err(|e| e.to_string())?;
        let mut resp = self.agent.run(req).map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let text =
            resp.body_mut().with_config().limit(64 << 20).read_to_string().map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{method} {path}: {e}"))?;
        if status >= 400 {
            return Err(format!("{method} {path}: {status} {}", v["value"]));
        }
        Ok(v)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let session = self.session.as_deref().expect("a session");
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let v = self
            .raw(method, &format!("/session/{session}{path}"), body.as_ref())
            .unwrap_or_else(|e| panic!("{e}"));
        v["value"].clone()
    }

    fn navigate(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
    }

    fn find(&self, css: &str) -> String {
        let v = self.call("POST", "/elements", Some(json!({"using": "css selector", "value": css})));
        let all = v.as_array().unwrap();
        assert_eq!(all.len(), 1, "elements matching {css:?}");
        all[0][ELEMENT].as_str().unwrap().to_owned()
    }

    fn text_of(&self, css: &str) -> String {
        let el = self.find(css);
        self.call("GET", &format!("/element/{el}/text"), None).as_str().unwrap_or("").to_owned()
    }

    fn click(&self, css: &str) {
        let el = self.find(css);
        self.call("POST", &format!("/element/{el}/click"), None);
    }

    fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.call("POST", &format!("/element/{el}/value"), Some(json!({"text": text})));
    }

    /// The page's visible text, once it contains `expected`.
    fn wait_for_text(&self, expected: &str) -> String {
        let session = self.session.as_deref().expect("a session");
        util::wait_for(&format!("the page to say {expected:?}"), Duration::from_secs(30), || {
            let find = json!({"using": "css selector", "value": "body"});
            let found = self.raw("POST", &format!("/session/{session}/elements"), Some(&find)).ok()?;
            let body = found["value"][0][ELEMENT].as_str()?.to_owned();
            let text = self.raw("GET", &format!("/session/{session}/element/{body}/text"), None).ok()?;
            let text = text["value"].as_str()?.to_owned();
            text.contains(expected).then_some(text)
        })
    }

    fn screenshot(&self, name: &str) {
        let data = self.call("GET", "/screenshot", None);
        let png = STANDARD.decode(data.as_str().expect("base64 screenshot")).expect("valid base64");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        let dir = target_dir().join("browser-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("console-{name}.png")), png).unwrap();
    }

    /// Runs axe-core on the page; panics listing any serious or critical
    /// violation. (WebDriver scripts run outside the page's CSP.)
    fn axe(&self, axe: &str, page: &str) {
        let violations = self.violations(axe, page);
        let bad: Vec<&Value> =
            violations.iter().filter(|v| v["impact"] == "serious" || v["impact"] == "critical").collect();
        assert!(bad.is_empty(), "axe finds serious or critical violations on {page}: {bad:#?}");
    }

    /// axe-core's violations on the page.
    fn violations(&self, axe: &str, page: &str) -> Vec<Value> {
        let script = format!(
            "{axe}\n;const done = arguments[arguments.length - 1];\
             axe.run(document, {{resultTypes: ['violations']}}).then(r => done(JSON.stringify(r.violations.map(v => \
             ({{id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.html).slice(0, 3)}}))))).catch(e => done('error: ' + e));"
        );
        let v = self.call("POST", "/execute/async", Some(json!({"script": script, "args": []})));
        let text = v.as_str().unwrap_or_else(|| panic!("axe answered {v}"));
        let violations: Vec<Value> =
            serde_json::from_str(text).unwrap_or_else(|_| panic!("axe on {page} failed: {text}"));
        for v in &violations {
            eprintln!("axe {page}: {} ({}) {}", v["id"], v["impact"], v["help"]);
        }
        violations
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = self.raw("DELETE", &format!("/session/{session}"), None);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_support_agent_answers_why_and_fixes_it_in_a_real_browser() {
    let Some(chromedriver) = find_program("chromedriver", "/usr/bin/chromedriver") else {
        return util::skip(
            "console browser",
            "chromedriver is not installed (apt-get install chromium-driver)",
        );
    };
    let Some(chromium) = find_program("chromium", "/usr/bin/chromium") else {
        return util::skip("console browser", "chromium is not installed (apt-get install chromium)");
    };
    let Some(axe) = axe_source() else {
        return util::skip(
            "console browser",
            "axe-core is missing: npm pack axe-core@4 into target/axe-core/",
        );
    };
    let port = util::free_port();
    let _app = util::spawn_with(|c| {
        c.listen = format!("127.0.0.1:{port}").parse().unwrap();
        c.public_url = format!("http://127.0.0.1:{port}");
        c.keys = vec![
            ApiKey { name: "ops".into(), role: Role::Admin, hash: parse_hash(&hash_key(ADMIN)).unwrap() },
            ApiKey {
                name: "dana".into(),
                role: Role::Support,
                hash: parse_hash(&hash_key(SUPPORT)).unwrap(),
            },
        ];
    });
    let admin = Client::new(&format!("http://127.0.0.1:{port}"), Some(ADMIN.into()));
    for (slug, name) in [("rating", "Ratings"), ("waitlist", "Waiting list")] {
        admin.call("POST", "/v1/services", Some(&json!({"slug": slug, "name": name}))).unwrap();
    }
    let body = json!({"status": "opted_out", "reason": "asked by phone"});
    admin.call("PUT", "/v1/customers/42/preferences/*/email", Some(&body)).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let driver = Driver::start(&chromedriver, &chromium);

    // The checker itself finds what it should: an image without a text
    // alternative and an unlabelled field are critical.
    driver.navigate("data:text/html,<html lang=en><title>t</title><main><img src=x><input></main></html>");
    let found = driver.violations(&axe, "a bad page");
    assert!(found.iter().any(|v| v["id"] == "image-alt" && v["impact"] == "critical"), "{found:?}");

    // Not signed in: the console sends to the sign-in form.
    driver.navigate(&format!("{base}/console/customers/42"));
    driver.wait_for_text("Sign in to the support console");
    driver.axe(&axe, "sign-in");
    driver.screenshot("01-sign-in");
    driver.type_into("#key", SUPPORT);
    driver.click("form[action='/console/sign-in'] button");
    driver.wait_for_text("Signed in as dana (support)");
    driver.axe(&axe, "overview");
    driver.screenshot("02-overview");

    // Find the customer, and read why rating emails are blocked.
    driver.click("a[href='/console/customers']");
    driver.wait_for_text("Customer id");
    driver.axe(&axe, "find");
    driver.type_into("#q", "42");
    driver.click("form[role=search] button");
    driver.wait_for_text("Customer 42");
    let cell = driver.text_of("td[data-service=rating][data-channel=email]");
    assert!(cell.contains("blocked") && cell.contains("all services / email"), "{cell}");
    assert!(cell.contains("by ops") && cell.contains("asked by phone"), "{cell}");
    driver.axe(&axe, "customer");
    driver.screenshot("03-customer");

    // Change rating emails back with a reason.
    driver.click("#service option[value=rating]");
    driver.click("#channel option[value=email]");
    driver.click("input[name=status][value=opted_in]");
    driver.type_into("#reason", "called in: wants ratings");
    driver.click("form[action='/console/customers/42'] button");
    driver.wait_for_text("source console");
    let cell = driver.text_of("td[data-service=rating][data-channel=email]");
    assert!(cell.contains("allowed") && cell.contains("by dana"), "{cell}");
    assert!(cell.contains("called in: wants ratings"), "{cell}");
    let newest = driver.text_of("#timeline + table tbody tr:first-child");
    assert!(newest.contains("dana") && newest.contains("console") && newest.contains("Chrome"), "{newest}");
    driver.screenshot("04-changed");
    let check = admin.call("GET", "/v1/check?customer=42&service=rating&channel=email", None).unwrap();
    assert_eq!(check["allowed"], true);

    driver.click("a[href='/console/audit']");
    driver.wait_for_text("Audit log");
    driver.axe(&axe, "audit");
    driver.screenshot("05-audit");

    // Sign out; then the admin's services page.
    driver.click("form[action='/console/sign-out'] button");
    driver.wait_for_text("Sign in to the support console");
    driver.navigate(&format!("{base}/console/"));
    driver.wait_for_text("Sign in to the support console");
    driver.type_into("#key", ADMIN);
    driver.click("form[action='/console/sign-in'] button");
    driver.wait_for_text("Signed in as ops (admin)");
    driver.click("a[href='/console/services']");
    driver.wait_for_text("Register a service");
    driver.axe(&axe, "services");
    driver.screenshot("06-services");
    eprintln!("screenshots in {}", target_dir().join("browser-screenshots").display());
}
