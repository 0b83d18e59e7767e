//! The `prefsd` binary as a client of a running sidecar: services, prefs,
//! check (exit codes), audit export (NDJSON), import (CSV and NDJSON with bad
//! rows) and key generation.

mod util;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use prefsd::auth::{ApiKey, Role, parse_hash};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use util::TestApp;

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr)
        })
    }

    #[track_caller]
    fn success(self) -> Run {
        assert_eq!(self.code, 0, "exit code; stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

fn command(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prefsd"));
    cmd.arg("--url")
        .arg(url)
        .args(args)
        .env_remove("PREFSD_URL")
        .env_remove("PREFSD_KEY")
        .env_remove("PREFSD_CONFIG")
        .stdin(Stdio::null());
    cmd
}

fn finish(out: std::process::Output) -> Run {
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    }
}

/// Runs `prefsd --url http://ADDR ARGS…` against `app`.
fn prefsd(app: &TestApp, args: &[&str]) -> Run {
    finish(command(&format!("http://{}", app.addr), args).output().expect("run prefsd"))
}

/// Runs with `stdin` piped in.
fn prefsd_stdin(app: &TestApp, args: &[&str], stdin: &str) -> Run {
    let mut child = command(&format!("http://{}", app.addr), args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run prefsd");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    finish(child.wait_with_output().unwrap())
}

/// The API, asserting success.
fn api(app: &TestApp, method: &str, path: &str, body: Option<Value>) -> Value {
    app.client.call(method, path, body.as_ref()).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn allowed(app: &TestApp, customer: u64, service: &str, channel: &str) -> bool {
    let v =
        api(app, "GET", &format!("/v1/check?customer={customer}&service={service}&channel={channel}"), None);
    v["allowed"].as_bool().unwrap()
}

fn all_audit(app: &TestApp) -> Vec<Value> {
    let mut after = 0;
    let mut out = Vec::new();
    loop {
        let page = api(app, "GET", &format!("/v1/audit?after={after}&limit=10000"), None);
        out.extend(page["entries"].as_array().unwrap().iter().cloned());
        let next = page["next_after"].as_u64().unwrap();
        if next == after {
            return out;
        }
        after = next;
    }
}

/// The line numbers of `line L: …` messages on stderr.
fn rejected_lines(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .map(|rest| {
            let (n, message) = rest.split_once(": ").unwrap_or_else(|| panic!("no message in {rest:?}"));
            assert!(!message.trim().is_empty(), "empty message for line {n}");
            n.parse().unwrap()
        })
        .collect()
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn services_create_list_archive_and_restore() {
    let app = util::spawn_app();
    let created = prefsd(
        &app,
        &["services", "create", "rating", "--name", "Ratings", "--description", "Asks for a rating"],
    )
    .success()
    .json();
    assert_eq!(created["slug"], "rating");
    assert_eq!(created["name"], "Ratings");
    assert_eq!(created["description"], "Asks for a rating");
    assert_eq!(created["archived"], false);
    prefsd(&app, &["services", "create", "waitlist"]).success();

    let listed = prefsd(&app, &["services", "list"]).success().json();
    let slugs: Vec<&str> =
        listed["services"].as_array().unwrap().iter().map(|s| s["slug"].as_str().unwrap()).collect();
    assert_eq!(slugs, ["rating", "waitlist"]);
    assert_eq!(api(&app, "GET", "/v1/services/waitlist", None)["name"], "waitlist");

    // Errors exit with 2 and say what the server said.
    let dup = prefsd(&app, &["services", "create", "rating"]);
    assert_eq!(dup.code, 2);
    assert!(dup.stderr.contains("409 service_exists"), "{}", dup.stderr);
    let bad = prefsd(&app, &["services", "create", "Not A Slug"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("400"), "{}", bad.stderr);

    let archived = prefsd(&app, &["services", "archive", "rating"]).success().json();
    assert_eq!(archived["archived"], true);
    assert_eq!(api(&app, "GET", "/v1/services/rating", None)["archived"], true);
    let listed = prefsd(&app, &["services", "list"]).success().json();
    assert_eq!(listed["services"][0]["archived"], true);
    let refused = prefsd(&app, &["prefs", "set", "1", "rating", "email", "opted_out"]);
    assert_eq!(refused.code, 2);
    assert!(refused.stderr.contains("409 service_archived"), "{}", refused.stderr);
    let missing = prefsd(&app, &["services", "archive", "nope"]);
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.contains("404 unknown_service"), "{}", missing.stderr);

    let restored = prefsd(&app, &["services", "restore", "rating"]).success().json();
    assert_eq!(restored["archived"], false);
    prefsd(&app, &["prefs", "set", "1", "rating", "email", "opted_out"]).success();
    assert!(!allowed(&app, 1, "rating", "email"));
}

#[test]
fn prefs_set_get_and_check_with_exit_codes() {
    let app = util::spawn_app();
    prefsd(&app, &["services", "create", "rating"]).success();
    prefsd(&app, &["services", "create", "waitlist"]).success();

    // Unknown customers are allowed: exit 0.
    let check = prefsd(&app, &["check", "5", "rating", "email"]).success();
    assert_eq!(
        check.json(),
        json!({"customer": 5, "service": "rating", "channel": "email", "allowed": true})
    );

    let set = prefsd(&app, &["prefs", "set", "5", "*", "*", "opted_out", "--reason", "moved away"])
        .success()
        .json();
    assert_eq!(set["customer"], 5);
    assert_eq!((set["service"].as_str(), set["channel"].as_str()), (Some("*"), Some("*")));
    assert_eq!(set["status"], "opted_out");
    assert_eq!(set["reason"], "moved away");
    assert!(set["seq"].as_u64().unwrap() > 0);

    // Not allowed: exit 1, and the answer is still printed.
    let check = prefsd(&app, &["check", "5", "rating", "email"]);
    assert_eq!(check.code, 1, "{}{}", check.stdout, check.stderr);
    assert_eq!(check.json()["allowed"], false);

    prefsd(&app, &["prefs", "set", "5", "rating", "email", "opted_in"]).success();
    assert_eq!(prefsd(&app, &["check", "5", "rating", "email"]).code, 0);
    assert_eq!(prefsd(&app, &["check", "5", "rating", "sms"]).code, 1);
    assert_eq!(prefsd(&app, &["check", "5", "waitlist", "email"]).code, 1);
    assert_eq!(prefsd(&app, &["check", "6", "waitlist", "email"]).code, 0);
    // The CLI agrees with the API.
    assert!(allowed(&app, 5, "rating", "email"));
    assert!(!allowed(&app, 5, "rating", "sms"));

    let got = prefsd(&app, &["prefs", "get", "5"]).success().json();
    assert_eq!(got["customer"], 5);
    let records = got["records"].as_array().unwrap();
    assert_eq!(records.len(), 2);
    let all = records.iter().find(|r| r["service"] == "*" && r["channel"] == "*").unwrap();
    assert_eq!(all["reason"], "moved away");
    assert_eq!(all["source"], "api");
    let effective = got["effective"].as_array().unwrap();
    assert_eq!(effective.len(), 4);
    let allowed_pairs: Vec<(&str, &str)> = effective
        .iter()
        .filter(|e| e["allowed"] == true)
        .map(|e| (e["service"].as_str().unwrap(), e["channel"].as_str().unwrap()))
        .collect();
    assert_eq!(allowed_pairs, [("rating", "email")]);

    let audit = prefsd(&app, &["audit", "customer", "5"]).success().json();
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["after"], "opted_out");
    assert_eq!(entries[1]["after"], "opted_in");

    // Errors are exit code 2, never 1 (which means "not allowed").
    for args in [
        &["check", "abc", "rating", "email"][..],
        &["check", "5", "nope", "email"],
        &["check", "5", "rating", "fax"],
        &["prefs", "set", "5", "rating", "email", "maybe"],
        &["prefs", "set", "--", "-1", "rating", "email", "opted_out"],
        &["prefs", "set", "5", "nope", "email", "opted_out"],
        &["prefs", "get", "x"],
    ] {
        let run = prefsd(&app, args);
        assert_eq!(run.code, 2, "{args:?}: {}{}", run.stdout, run.stderr);
        assert!(run.stderr.starts_with("prefsd: "), "{args:?}: {}", run.stderr);
    }
    let unknown = prefsd(&app, &["check", "5", "nope", "email"]);
    assert!(unknown.stderr.contains("404 unknown_service"), "{}", unknown.stderr);
    let long_reason = "r".repeat(501);
    let long = prefsd(&app, &["prefs", "set", "5", "rating", "sms", "opted_out", "--reason", &long_reason]);
    assert_eq!(long.code, 2);
    assert!(long.stderr.contains("400 invalid_input"), "{}", long.stderr);
    assert_eq!(all_audit(&app).len(), 2, "refused writes stored nothing");

    // Nobody listening: exit 2 with a message.
    let port = util::free_port();
    let run = finish(
        command(&format!("http://127.0.0.1:{port}"), &["check", "1", "rating", "email"]).output().unwrap(),
    );
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("cannot reach prefsd"), "{}", run.stderr);
}

#[test]
fn audit_export_prints_every_entry_as_ndjson() {
    let app = util::spawn_app();
    prefsd(&app, &["services", "create", "rating"]).success();
    // More entries than one export page (10,000) holds.
    let total = 10_050u64;
    for chunk in [0..5_000u64, 5_000..total] {
        let items: Vec<Value> = chunk
            .map(|i| {
                json!({"customer": i % 4000, "service": if i % 3 == 0 { "*" } else { "rating" },
                       "channel": if i % 2 == 0 { "email" } else { "sms" },
                       "status": if i % 5 == 0 { "opted_in" } else { "opted_out" }})
            })
            .collect();
        let n = items.len() as u64;
        let answer = api(&app, "POST", "/v1/preferences/import", Some(json!({"items": items})));
        assert_eq!(answer["accepted"], n);
    }
    prefsd(&app, &["prefs", "set", "77", "rating", "email", "opted_out", "--reason", "last one"]).success();
    prefsd(&app, &["services", "create", "waitlist"]).success(); // service events are not audit entries

    let run = prefsd(&app, &["audit", "export"]).success();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len() as u64, total + 1, "one line per entry");
    let entries: Vec<Value> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("line is not JSON ({e}): {l}"));
            assert!(v.is_object(), "{l}");
            v
        })
        .collect();
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in sequence order");
    assert!(run.stderr.contains(&format!("exported {} audit entries", total + 1)), "{}", run.stderr);
    assert_eq!(entries, all_audit(&app), "exactly what the API holds");
    let last = entries.last().unwrap();
    assert_eq!(last["customer"], 77);
    assert_eq!(last["reason"], "last one");
    assert_eq!(last["source"], "api");
    assert!(entries[..total as usize].iter().all(|e| e["source"] == "import"));
    for field in ["seq", "at", "customer", "service", "channel", "before", "after", "source", "actor"] {
        assert!(entries.iter().all(|e| e.get(field).is_some()), "every entry has {field}");
    }

    // --after skips what came before.
    let cut = seqs[10_020];
    let run = prefsd(&app, &["audit", "export", "--after", &cut.to_string()]).success();
    let later: Vec<u64> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(later, seqs[10_021..]);
}

#[test]
fn import_csv_reports_accepted_and_rejected_rows_by_line() {
    let app = util::spawn_app();
    prefsd(&app, &["services", "create", "rating"]).success();
    let dir = tempfile::tempdir().unwrap();
    let long_reason = "x".repeat(501);
    let csv = format!(
        "customer,service,channel,status,reason\n\
         1,rating,email,opted_out,too many\n\
         \x20 2 , * , sms , opted_out ,\n\
         3,rating\n\
         4,nope,email,opted_out\n\
         5,rating,fax,opted_out\n\
         abc,rating,email,opted_out\n\
         6,rating,email,maybe\n\
         7,*,*,opted_out,\"moved, away\"\n\
         8,rating,email,opted_out,{long_reason}\n\
         -9,rating,email,opted_out\n\
         10,rating,sms,opted_out\n"
    );
    let file = write_file(dir.path(), "prefs.csv", &csv);
    let run = prefsd(&app, &["import", &file, "--chunk", "3"]);
    assert_eq!(run.code, 1, "some rows were rejected: {}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("4 rows accepted, 7 rejected"), "stdout: {}", run.stdout);
    assert_eq!(rejected_lines(&run.stderr), [4, 5, 6, 7, 8, 10, 11], "stderr: {}", run.stderr);
    let line =
        |n: u64| run.stderr.lines().find(|l| l.starts_with(&format!("line {n}: "))).unwrap().to_owned();
    assert!(line(5).contains("nope"), "{}", line(5));
    assert!(line(6).contains("fax"), "{}", line(6));
    assert!(line(8).contains("maybe"), "{}", line(8));
    assert!(line(10).contains("500"), "{}", line(10));

    // Accepted rows are visible through the API; rejected ones are not.
    assert!(!allowed(&app, 1, "rating", "email"));
    assert!(allowed(&app, 1, "rating", "sms"));
    assert!(!allowed(&app, 2, "rating", "sms"));
    assert!(allowed(&app, 2, "rating", "email"));
    assert!(!allowed(&app, 7, "rating", "email"));
    assert!(!allowed(&app, 10, "rating", "sms"));
    for customer in [3, 4, 5, 6, 8, 9] {
        assert!(allowed(&app, customer, "rating", "email"), "customer {customer}");
        assert!(allowed(&app, customer, "rating", "sms"), "customer {customer}");
    }
    let prefs = api(&app, "GET", "/v1/customers/7/preferences", None);
    assert_eq!(prefs["records"][0]["reason"], "moved, away");
    assert_eq!(prefs["records"][0]["source"], "import");
    let prefs = api(&app, "GET", "/v1/customers/1/preferences", None);
    assert_eq!(prefs["records"][0]["reason"], "too many");
    let audit = all_audit(&app);
    assert_eq!(audit.len(), 4);
    assert!(audit.iter().all(|e| e["source"] == "import"));
    let customers: BTreeSet<u64> = audit.iter().map(|e| e["customer"].as_u64().unwrap()).collect();
    assert_eq!(customers, BTreeSet::from([1, 2, 7, 10]));

    // A clean file exits 0.
    let file = write_file(
        dir.path(),
        "clean.csv",
        "customer,service,channel,status\n11,rating,email,opted_out\n12,rating,sms,opted_out\n",
    );
    let run = prefsd(&app, &["import", &file]).success();
    assert!(run.stdout.contains("2 rows accepted, 0 rejected"), "{}", run.stdout);
    assert!(rejected_lines(&run.stderr).is_empty(), "{}", run.stderr);
    assert!(!allowed(&app, 12, "rating", "sms"));

    // A file without the required columns is refused as a whole.
    let file = write_file(dir.path(), "bad.csv", "customer,service\n1,rating\n");
    let run = prefsd(&app, &["import", &file]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("channel"), "{}", run.stderr);
    assert_eq!(all_audit(&app).len(), 6);
}

#[test]
fn import_ndjson_reports_accepted_and_rejected_rows_by_line() {
    let app = util::spawn_app();
    prefsd(&app, &["services", "create", "rating"]).success();
    prefsd(&app, &["services", "create", "old"]).success();
    prefsd(&app, &["services", "archive", "old"]).success();
    let dir = tempfile::tempdir().unwrap();
    let ndjson = [
        r#"{"customer": 1, "service": "rating", "channel": "email", "status": "opted_out", "reason": "ndjson"}"#,
        r#"{"customer": "2", "service": "*", "channel": "*", "status": "opted_out"}"#,
        "",
        r#"{not json"#,
        "[1, 2]",
        r#"{"customer": 3, "service": "rating", "channel": "email", "status": "opted_out", "colour": "red"}"#,
        r#"{"customer": 4, "service": "old", "channel": "email", "status": "opted_out"}"#,
        r#"{"customer": 5, "service": "rating", "channel": "push", "status": "opted_out"}"#,
        r#"{"customer": 6, "service": "rating", "channel": "sms", "status": "opted_out"}"#,
        r#""just a string""#,
        r#"{"customer": 18446744073709551616, "service": "rating", "channel": "sms", "status": "opted_out"}"#,
        r#"{"customer": 7, "service": "rating", "channel": "sms"}"#,
        r#"{"customer": 18446744073709551615, "service": "rating", "channel": "sms", "status": "opted_out"}"#,
    ]
    .join("\n");
    let file = write_file(dir.path(), "prefs.ndjson", &format!("{ndjson}\n"));
    let run = prefsd(&app, &["import", &file, "--chunk", "2"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("4 rows accepted, 8 rejected"), "stdout: {}", run.stdout);
    assert_eq!(rejected_lines(&run.stderr), [4, 5, 6, 7, 8, 10, 11, 12], "stderr: {}", run.stderr);
    let line =
        |n: u64| run.stderr.lines().find(|l| l.starts_with(&format!("line {n}: "))).unwrap().to_owned();
    assert!(line(7).contains("archived"), "{}", line(7));
    assert!(line(8).contains("push"), "{}", line(8));

    assert!(!allowed(&app, 1, "rating", "email"));
    assert!(!allowed(&app, 2, "rating", "sms"));
    assert!(!allowed(&app, 6, "rating", "sms"));
    assert!(!allowed(&app, u64::MAX, "rating", "sms"));
    for customer in [3, 4, 5, 7] {
        assert!(allowed(&app, customer, "rating", "email"), "customer {customer}");
        assert!(allowed(&app, customer, "rating", "sms"), "customer {customer}");
    }
    let audit = all_audit(&app);
    assert_eq!(audit.len(), 4);
    assert_eq!(audit[0]["reason"], "ndjson");

    // Standard input works as well, with the format named.
    let stdin = r#"{"customer": 8, "service": "rating", "channel": "email", "status": "opted_out"}
{"customer": 9, "service": "nope", "channel": "email", "status": "opted_out"}
"#;
    let run = prefsd_stdin(&app, &["import", "-", "--format", "ndjson"], stdin);
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("1 rows accepted, 1 rejected"), "{}", run.stdout);
    assert_eq!(rejected_lines(&run.stderr), [2]);
    assert!(!allowed(&app, 8, "rating", "email"));
}

/// Regression test: CSV rows used to be numbered with the csv reader's
/// position before `read_record`, which still points at any blank line the
/// reader then skips, so a rejected row after a blank line was reported one
/// line early ("line 3" for the bad row on line 4).
#[test]
fn csv_line_numbers_count_blank_lines() {
    let app = util::spawn_app();
    prefsd(&app, &["services", "create", "rating"]).success();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "gaps.csv",
        "customer,service,channel,status\n1,rating,email,opted_out\n\n2,nope,email,opted_out\n",
    );
    let run = prefsd(&app, &["import", &file]);
    assert!(run.stdout.contains("1 rows accepted, 1 rejected"), "{}", run.stdout);
    assert_eq!(rejected_lines(&run.stderr), [4], "{}", run.stderr);
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn key_generate_prints_a_key_and_its_sha256() {
    let generate = |args: &[&str]| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_prefsd")).args(args).env_remove("PREFSD_KEY").output().unwrap();
        let run = finish(out).success();
        let field = |name: &str| {
            run.stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name:?} line in:\n{}", run.stdout))
                .trim()
                .to_owned()
        };
        (field("key:"), field("sha256:"), run.stdout.clone())
    };
    let (key, hash, stdout) = generate(&["key", "generate", "--name", "ops", "--role", "admin"]);
    assert_eq!(hash, sha256_hex(&key), "the printed hash is the key's sha256");
    assert_eq!(hash.len(), 64);
    assert!(key.len() >= 32, "a long random key: {key}");
    assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "URL-safe: {key}");
    assert!(stdout.contains(&format!("PREFSD_KEYS=ops:admin:{hash}")), "{stdout}");
    let (other, other_hash, _) = generate(&["key", "generate"]);
    assert_ne!(key, other, "keys are random");
    assert_eq!(other_hash, sha256_hex(&other));
    // `key hash` agrees.
    let out = Command::new(env!("CARGO_BIN_EXE_prefsd")).args(["key", "hash", &key]).output().unwrap();
    assert_eq!(finish(out).success().stdout.trim(), hash);

    // A sidecar configured with the hash accepts the key, and only the key.
    let app = util::spawn_with(|c| {
        c.keys = vec![ApiKey { name: "ops".into(), role: Role::Admin, hash: parse_hash(&hash).unwrap() }];
    });
    let run = prefsd(&app, &["--key", &key, "services", "create", "rating"]).success();
    assert_eq!(run.json()["slug"], "rating");
    let run = prefsd(&app, &["services", "list"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("401 unauthorized"), "{}", run.stderr);
    let run = prefsd(&app, &["--key", &other, "services", "list"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("401 unauthorized"), "{}", run.stderr);
    let out =
        command(&format!("http://{}", app.addr), &["prefs", "set", "1", "rating", "email", "opted_out"])
            .env("PREFSD_KEY", &key)
            .output()
            .unwrap();
    let set = finish(out).success().json();
    assert_eq!(set["status"], "opted_out");
    let out = command(&format!("http://{}", app.addr), &["audit", "customer", "1"])
        .env("PREFSD_KEY", &key)
        .output()
        .unwrap();
    assert_eq!(finish(out).success().json()["entries"][0]["actor"], "ops");
}
