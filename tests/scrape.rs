//! Prometheus scrapes prefsd for real: Debian's `prometheus` runs on a free
//! loopback port with a scrape config pointing at an in-process sidecar's
//! metrics listener, and its HTTP API is polled until the target is up and
//! prefsd's metrics have values. `promtool check metrics` accepts the
//! exposition, and the metrics listener serves only what it should.
//!
//! Without `prometheus` or `promtool` the tests needing them SKIP (and fail
//! under `PREFSD_TEST_REQUIRE_ALL=1`).

mod util;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prefsd::client::{Answer, Client};
use serde_json::{Value, json};

fn program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A sidecar with a metrics listener, a service and some traffic: one
/// allowed and one suppressed single check, a batch of three, a write.
fn busy_sidecar() -> (util::TestApp, Client) {
    let app = util::spawn_with(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap()));
    let c = &app.client;
    let send = |method: &str, path: &str, body: Option<Value>| -> Answer {
        let body = body.map(|v| serde_json::to_vec(&v).unwrap());
        let a = c.send(method, path, Some("application/json"), body).unwrap();
        assert!(a.status < 300, "{method} {path}: {} {}", a.status, String::from_utf8_lossy(&a.body));
        a
    };
    send("POST", "/v1/services", Some(json!({"slug": "rating"})));
    send("PUT", "/v1/customers/5/preferences/rating/email", Some(json!({"status": "opted_out"})));
    assert_eq!(
        send("GET", "/v1/check?customer=5&service=rating&channel=email", None).json()["allowed"],
        false
    );
    assert_eq!(
        send("GET", "/v1/check?customer=6&service=rating&channel=email", None).json()["allowed"],
        true
    );
    let batch = json!({"checks": [
        {"customer": 5, "service": "rating", "channel": "email"},
        {"customer": 5, "service": "rating", "channel": "sms"},
        {"customer": 6, "service": "rating", "channel": "sms"},
    ]});
    assert_eq!(send("POST", "/v1/check", Some(batch)).json()["results"], json!([false, true, true]));
    let metrics = Client::new(&format!("http://{}", app.metrics_addr.expect("a metrics listener")), None);
    (app, metrics)
}

fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn the_metrics_listener_serves_metrics_and_probes_only() {
    let (app, metrics) = busy_sidecar();
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(metrics.send("GET", path, None, None).unwrap().status, 200, "{path}");
    }
    for path in ["/v1/check?customer=5&service=rating&channel=email", "/v1/services", "/openapi.json", "/u/x"]
    {
        let a = metrics.send("GET", path, None, None).unwrap();
        assert_eq!((a.status, a.error_code().as_deref()), (404, Some("not_found")), "{path}");
    }
    let text = String::from_utf8(metrics.send("GET", "/metrics", None, None).unwrap().body).unwrap();
    let pair = |result: &str| {
        value(
            &text,
            &format!("prefsd_pair_checks_total{{service=\"rating\",channel=\"email\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(pair("allowed"), Some(1.0), "{text}");
    assert_eq!(pair("suppressed"), Some(2.0));
    let sms = "prefsd_pair_checks_total{service=\"rating\",channel=\"sms\",result=\"allowed\"}";
    assert_eq!(value(&text, sms), Some(2.0));
    assert_eq!(value(&text, "prefsd_checks_total"), Some(5.0));
    assert_eq!(value(&text, "prefsd_ready"), Some(1.0));
    assert_eq!(value(&text, "prefsd_index_opted_out{service=\"rating\",channel=\"email\"}"), Some(1.0));
    let gets = "prefsd_http_requests_total{route=\"/v1/check\",status=\"200\"}";
    assert_eq!(value(&text, gets), Some(3.0), "two GET checks and one batch");
    let latency = "prefsd_http_request_duration_seconds_count{route=\"/v1/check\"}";
    assert_eq!(value(&text, latency), Some(3.0));
    assert!(value(&text, "process_resident_memory_bytes").is_some_and(|v| v > 1e6));
    assert!(value(&text, "process_open_fds").is_some_and(|v| v > 3.0));
    // The requests to the metrics listener are counted too, by route.
    assert!(
        value(&text, "prefsd_http_requests_total{route=\"/healthz\",status=\"200\"}").is_some(),
        "{text}"
    );

    // OpenMetrics when asked for, as Prometheus does.
    let url = format!("http://{}/metrics", app.metrics_addr.unwrap());
    let mut resp = ureq::get(&url)
        .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .call()
        .unwrap();
    let ct = resp.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text; version=1.0.0"), "{ct}");
    let om = resp.body_mut().read_to_string().unwrap();
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE prefsd_pair_checks counter"), "OpenMetrics names the counter family");
}

#[test]
fn promtool_accepts_the_exposition() {
    let Some(promtool) = program("promtool") else {
        return util::skip(
            "promtool check metrics",
            "promtool is not installed (apt-get install prometheus)",
        );
    };
    let (_app, metrics) = busy_sidecar();
    let a = metrics.send("GET", "/metrics", None, None).unwrap();
    assert!(a.content_type.as_deref().unwrap().starts_with("text/plain; version=0.0.4"));
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&a.body).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics:\n{said}");
    assert!(said.trim().is_empty(), "promtool found problems:\n{said}");
}

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[test]
fn prometheus_scrapes_the_sidecar() {
    let Some(prometheus) = program("prometheus") else {
        return util::skip("real scrape", "prometheus is not installed (apt-get install prometheus)");
    };
    let (_app, metrics_client) = busy_sidecar();
    let target = _app.metrics_addr.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: prefsd\n    \
             static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = util::free_port();
    let log = dir.path().join("prometheus.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start prometheus");
    let prom = Prometheus { child, log, _dir: dir };
    let api = Client::new(&format!("http://127.0.0.1:{port}"), None);
    let get = |path: &str| -> Option<Value> {
        let a = api.send("GET", path, None, None).ok()?;
        (a.status == 200).then(|| a.json())
    };

    let health = util::wait_for("prometheus to find prefsd's target up", Duration::from_secs(90), || {
        let targets = get("/api/v1/targets")?;
        let t = targets["data"]["activeTargets"].as_array()?.first()?.clone();
        (t["health"] == "up").then_some(t)
    });
    assert_eq!(health["labels"]["job"], "prefsd", "{health}\n{}", prom.log());
    assert_eq!(health["scrapeUrl"], format!("http://{target}/metrics"));

    let query = |q: &str| -> Option<f64> {
        let path = format!("/api/v1/query?query={}", prefsd::client::encode(q));
        let answer = get(&path)?;
        let result = answer["data"]["result"].as_array()?.first()?.clone();
        result["value"][1].as_str()?.parse().ok()
    };
    let checks = util::wait_for("prefsd_checks_total to have a value", Duration::from_secs(60), || {
        query("prefsd_checks_total{job=\"prefsd\"}")
    });
    assert_eq!(checks, 5.0, "{}", prom.log());
    let suppressed =
        query("prefsd_pair_checks_total{service=\"rating\",channel=\"email\",result=\"suppressed\"}");
    assert_eq!(suppressed, Some(2.0));
    assert_eq!(query("prefsd_ready"), Some(1.0));
    assert_eq!(query("prefsd_index_opted_out{service=\"rating\",channel=\"email\"}"), Some(1.0));
    let p99 =
        query("histogram_quantile(0.99, prefsd_http_request_duration_seconds_bucket{route=\"/v1/check\"})")
            .expect("a check latency quantile");
    assert!(p99 > 0.0 && p99 < 10.0, "{p99}");
    assert!(query("process_resident_memory_bytes").is_some_and(|v| v > 1e6));

    // A new check shows up on a later scrape.
    assert_eq!(metrics_client.send("GET", "/readyz", None, None).unwrap().status, 200);
    _app.client.send("GET", "/v1/check?customer=1&service=rating&channel=sms", None, None).unwrap();
    util::wait_for("the next scrape to count the new check", Duration::from_secs(60), || {
        (query("prefsd_checks_total")? == 6.0).then_some(())
    });
}
