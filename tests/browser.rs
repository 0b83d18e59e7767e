//! The recipient's page in a real browser: headless Chromium, driven over
//! the W3C WebDriver protocol (plain HTTP and JSON to `chromedriver`), opens
//! an opt-out link, presses "Unsubscribe", sees the confirmation, presses
//! the undo button, and the API agrees at every step. Screenshots of every
//! page, at desktop and phone widths, are saved under
//! `target/browser-screenshots/`.
//!
//! Skipped (with a SKIP line) when `chromedriver` or `chromium` is not
//! installed, unless `PREFSD_TEST_REQUIRE_ALL=1`.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

/// The W3C WebDriver element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const DESKTOP: (u32, u32) = (1280, 900);
const PHONE: (u32, u32) = (390, 844);

fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("browser-screenshots")
}

/// `name` on `PATH`, else `fallback` if it exists.
fn find_program(name: &str, fallback: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .chain([PathBuf::from(fallback)])
        .find(|p| p.is_file())
}

/// A running chromedriver and (once created) its browser session. Dropping
/// it ends the session and kills the driver, whatever happened in between.
struct Driver {
    child: Child,
    agent: ureq::Agent,
    base: String,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start(chromedriver: &Path) -> Driver {
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
        driver
    }

    /// One WebDriver call; `Err` for transport errors and WebDriver errors.
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
        let text = resp.body_mut().read_to_string().map_err(|e| format!("{method} {path}: {e}"))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{method} {path}: {e}: {text}"))?;
        if status >= 400 {
            return Err(format!("{method} {path}: {status} {}", v["value"]));
        }
        Ok(v)
    }

    /// A call in the session; returns `value`, panics on any error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let session = self.session.as_deref().expect("a session");
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let v = self
            .raw(method, &format!("/session/{session}{path}"), body.as_ref())
            .unwrap_or_else(|e| panic!("{e}"));
        v["value"].clone()
    }

    fn new_session(&mut self, chromium: &Path) {
        let profile = format!("--user-data-dir={}", self._profile.path().display());
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", profile,
                ],
            },
        }}});
        let v = self.raw("POST", "/session", Some(&caps)).unwrap_or_else(|e| panic!("new session: {e}"));
        let id = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session id: {v}"));
        self.session = Some(id.to_owned());
    }

    fn navigate(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
    }

    fn resize(&self, (width, height): (u32, u32)) {
        self.call("POST", "/window/rect", Some(json!({"width": width, "height": height})));
    }

    /// Every element matching a CSS selector.
    fn find_all(&self, css: &str) -> Vec<String> {
        let v = self.call("POST", "/elements", Some(json!({"using": "css selector", "value": css})));
        v.as_array().unwrap().iter().map(|e| e[ELEMENT].as_str().unwrap().to_owned()).collect()
    }

    fn text(&self, element: &str) -> String {
        self.call("GET", &format!("/element/{element}/text"), None).as_str().unwrap_or("").to_owned()
    }

    /// The visible text of the page, once it contains `expected`.
    fn wait_for_text(&self, expected: &str) -> String {
        let session = self.session.as_deref().expect("a session");
        util::wait_for(&format!("the page to say {expected:?}"), Duration::from_secs(30), || {
            // While a form submission navigates, the body found may go stale
            // before its text is read: that is "not yet", not a failure.
            let find = json!({"using": "css selector", "value": "body"});
            let found = self.raw("POST", &format!("/session/{session}/elements"), Some(&find)).ok()?;
            let body = found["value"][0][ELEMENT].as_str()?.to_owned();
            let text = self.raw("GET", &format!("/session/{session}/element/{body}/text"), None).ok()?;
            let text = text["value"].as_str()?.to_owned();
            text.contains(expected).then_some(text)
        })
    }

    /// The one submit button whose text contains `label`.
    fn button(&self, label: &str) -> String {
        let matching: Vec<String> = self
            .find_all("form button[type=submit]")
            .into_iter()
            .filter(|b| self.text(b).contains(label))
            .collect();
        assert_eq!(matching.len(), 1, "buttons labelled {label:?}");
        matching.into_iter().next().unwrap()
    }

    /// The labels of every submit button on the page.
    fn button_labels(&self) -> Vec<String> {
        self.find_all("form button[type=submit]").iter().map(|b| self.text(b)).collect()
    }

    fn click(&self, element: &str) {
        self.call("POST", &format!("/element/{element}/click"), None);
    }

    fn rect(&self, element: &str) -> (f64, f64) {
        let r = self.call("GET", &format!("/element/{element}/rect"), None);
        (r["x"].as_f64().unwrap(), r["width"].as_f64().unwrap())
    }

    fn css(&self, element: &str, property: &str) -> String {
        self.call("GET", &format!("/element/{element}/css/{property}"), None)
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// Saves a PNG of the viewport as `name`.png and returns its path.
    fn screenshot(&self, name: &str) -> PathBuf {
        let data = self.call("GET", "/screenshot", None);
        let png = STANDARD.decode(data.as_str().expect("base64 screenshot")).expect("valid base64");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Screenshots at desktop and phone widths; at phone width, checks that
    /// nothing on the page is wider than the screen.
    fn shoot_both(&self, name: &str) {
        self.resize(DESKTOP);
        self.screenshot(&format!("{name}-desktop"));
        self.resize(PHONE);
        let viewport = self.rect(&self.find_all("html")[0]).1;
        assert!(viewport <= f64::from(PHONE.0), "the window did not narrow: {viewport}");
        for css in ["main", "h1", "form button[type=submit]", "p"] {
            for el in self.find_all(css) {
                let (x, width) = self.rect(&el);
                assert!(
                    x >= 0.0 && x + width <= viewport + 0.5,
                    "{name}: {css} spans {x}..{} of {viewport}",
                    x + width
                );
            }
        }
        self.screenshot(&format!("{name}-phone"));
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

/// `GET /v1/check`.
fn allowed(app: &util::TestApp, customer: u64, service: &str, channel: &str) -> bool {
    let v = app
        .client
        .call("GET", &format!("/v1/check?customer={customer}&service={service}&channel={channel}"), None)
        .unwrap();
    v["allowed"].as_bool().unwrap()
}

fn audit(app: &util::TestApp) -> Vec<Value> {
    app.client.call("GET", "/v1/audit?after=0&limit=1000", None).unwrap()["entries"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_person_unsubscribes_and_undoes_it_in_a_real_browser() {
    let Some(chromedriver) = find_program("chromedriver", "/usr/bin/chromedriver") else {
        util::skip("browser", "chromedriver is not installed (apt-get install chromium-driver)");
        return;
    };
    let Some(chromium) = find_program("chromium", "/usr/bin/chromium") else {
        util::skip("browser", "chromium is not installed (apt-get install chromium)");
        return;
    };

    // The link must name the address the browser can reach, so the sidecar
    // listens where its public_url says.
    let port = util::free_port();
    let app = util::spawn_with(|c| {
        c.listen = format!("127.0.0.1:{port}").parse().unwrap();
        c.public_url = format!("http://127.0.0.1:{port}");
    });
    let (customer, other) = (4242u64, 4343u64);
    for (slug, name) in [("rating", "Ratings"), ("waitlist", "Waiting list")] {
        app.client.call("POST", "/v1/services", Some(&json!({"slug": slug, "name": name}))).unwrap();
    }
    let issued = app
        .client
        .call(
            "POST",
            "/v1/tokens",
            Some(&json!({"customer": customer, "service": "rating", "channel": "email"})),
        )
        .unwrap();
    let url = issued["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&app.url("/u/")), "{url}");

    let mut driver = Driver::start(&chromedriver);
    driver.new_session(&chromium);
    driver.resize(DESKTOP);

    // The page: names the service, changes nothing by being opened.
    driver.navigate(&url);
    let text = driver.wait_for_text("Ratings");
    assert!(text.contains("Unsubscribe from Ratings by email?"), "{text}");
    assert!(text.contains("Waiting list"), "the other choices are listed: {text}");
    assert_eq!(driver.call("GET", "/title", None), "Manage your notifications");
    // The inline stylesheet is allowed by the CSP, so the browser applied it.
    let unsubscribe = driver.button("Unsubscribe");
    assert_eq!(driver.css(&unsubscribe, "background-color"), "rgba(11, 61, 145, 1)");
    driver.shoot_both("01-page");
    assert!(audit(&app).is_empty(), "opening the page changed something");
    assert!(allowed(&app, customer, "rating", "email"));

    // Unsubscribe, as a person would: the form's own button.
    driver.resize(PHONE);
    driver.click(&driver.button("Unsubscribe"));
    let text = driver.wait_for_text("You are unsubscribed");
    assert!(text.contains("no longer get"), "{text}");
    driver.shoot_both("02-unsubscribed");
    assert!(!allowed(&app, customer, "rating", "email"));
    assert!(allowed(&app, customer, "rating", "sms"));
    assert!(allowed(&app, customer, "waitlist", "email"));
    assert!(allowed(&app, other, "rating", "email"));
    let log = audit(&app);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["source"], "token");
    assert_eq!(log[0]["actor"], "recipient");
    assert_eq!(log[0]["after"], "opted_out");
    assert_eq!(log[0]["client_addr"], "127.0.0.1");
    assert!(log[0]["user_agent"].as_str().unwrap_or("").contains("Chrome"), "{}", log[0]);

    // Undo.
    assert_eq!(driver.button_labels(), ["Undo: subscribe me again"]);
    driver.click(&driver.button("Undo"));
    let text = driver.wait_for_text("subscribed again");
    assert!(text.contains("You will get"), "{text}");
    driver.shoot_both("03-subscribed-again");
    // Its undo opts out again, and says so.
    assert_eq!(driver.button_labels(), ["Undo: unsubscribe me again"]);
    assert!(allowed(&app, customer, "rating", "email"));
    let log = audit(&app);
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[1]["after"], "opted_in");
    assert_eq!((log[1]["service"].as_str(), log[1]["channel"].as_str()), (Some("rating"), Some("email")));

    // Reopening the link shows the state as it now is.
    driver.navigate(&url);
    driver.wait_for_text("Unsubscribe from Ratings by email?");
    let boxes = driver.find_all("input[type=checkbox]");
    assert_eq!(boxes.len(), 4);
    for b in &boxes {
        assert_eq!(driver.call("GET", &format!("/element/{b}/selected"), None), true);
    }
    eprintln!("screenshots in {}", screenshot_dir().display());
}
