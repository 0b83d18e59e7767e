//! The `support` role beside `sender` and `admin`: staff read customers and
//! the audit log and change preferences with a reason; they manage no
//! services. `prefsd key generate --role support` makes such a key.

mod util;

use prefsd::auth::{ApiKey, Role, hash_key, parse_hash};
use prefsd::client::{Answer, Client};
use serde_json::{Value, json};

const ADMIN: &str = "admin-secret-k3y";
const SUPPORT: &str = "support-secret-k3y";
const SENDER: &str = "sender-secret-k3y";

fn key(name: &str, role: Role, secret: &str) -> ApiKey {
    ApiKey { name: name.into(), role, hash: parse_hash(&hash_key(secret)).unwrap() }
}

fn send(c: &Client, method: &str, path: &str, body: Option<&Value>) -> Answer {
    let body = body.map(|b| b.to_string().into_bytes());
    let ct = body.as_ref().map(|_| "application/json");
    c.send(method, path, ct, body).unwrap()
}

fn expect(a: Answer, status: u16) -> Value {
    assert_eq!(a.status, status, "{}", String::from_utf8_lossy(&a.body));
    a.json()
}

#[test]
fn support_reads_customers_and_changes_them_with_a_reason_but_manages_no_services() {
    let app = util::spawn_with(|c| {
        c.keys = vec![
            key("ops", Role::Admin, ADMIN),
            key("dana", Role::Support, SUPPORT),
            key("mailer", Role::Sender, SENDER),
        ];
    });
    let base = format!("http://{}", app.addr);
    let admin = Client::new(&base, Some(ADMIN.into()));
    let support = Client::new(&base, Some(SUPPORT.into()));
    let sender = Client::new(&base, Some(SENDER.into()));
    expect(send(&admin, "POST", "/v1/services", Some(&json!({"slug": "rating"}))), 201);

    // A change without a reason is refused, and nothing is stored.
    let put = "/v1/customers/7/preferences/rating/email";
    for body in [json!({"status": "opted_out"}), json!({"status": "opted_out", "reason": "  "})] {
        let a = send(&support, "PUT", put, Some(&body));
        assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.error_code().as_deref(), Some("reason_required"));
    }
    let audit = expect(send(&support, "GET", "/v1/customers/7/audit", None), 200);
    assert_eq!(audit["entries"].as_array().unwrap().len(), 0, "a refused change leaves no trace");

    // With a reason it is written, and the audit log names the person.
    let body = json!({"status": "opted_out", "reason": "patient called in"});
    let w = expect(send(&support, "PUT", put, Some(&body)), 200);
    assert_eq!(w["status"], "opted_out");
    let audit = expect(send(&support, "GET", "/v1/customers/7/audit", None), 200);
    assert_eq!(audit["entries"][0]["actor"], "dana");
    assert_eq!(audit["entries"][0]["reason"], "patient called in");
    let prefs = expect(send(&support, "GET", "/v1/customers/7/preferences", None), 200);
    assert_eq!(prefs["records"][0]["status"], "opted_out");
    assert_eq!(expect(send(&support, "GET", "/v1/audit", None), 200)["entries"].as_array().unwrap().len(), 1);

    // Admins keep the reason optional; sender-level routes stay open to support.
    expect(
        send(&admin, "PUT", "/v1/customers/8/preferences/*/*", Some(&json!({"status": "opted_out"}))),
        200,
    );
    let check = expect(send(&support, "GET", "/v1/check?customer=7&service=rating&channel=email", None), 200);
    assert_eq!(check["allowed"], false);
    expect(send(&support, "GET", "/v1/services", None), 200);

    // No service management, no imports.
    let import =
        json!({"items": [{"customer": 2, "service": "rating", "channel": "sms", "status": "opted_out"}]});
    for (method, path, body) in [
        ("POST", "/v1/services", json!({"slug": "waitlist"})),
        ("PATCH", "/v1/services/rating", json!({"archived": true})),
        ("POST", "/v1/preferences/import", import),
    ] {
        let a = send(&support, method, path, Some(&body));
        assert_eq!(a.status, 403, "{method} {path}: {}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.error_code().as_deref(), Some("forbidden"));
    }
    assert!(!expect(send(&admin, "GET", "/v1/services/rating", None), 200)["archived"].as_bool().unwrap());

    // Senders still read no customers.
    for path in ["/v1/customers/7/preferences", "/v1/customers/7/audit", "/v1/audit"] {
        assert_eq!(send(&sender, "GET", path, None).status, 403, "{path}");
    }
    assert_eq!(send(&sender, "PUT", put, Some(&body)).status, 403);
}

#[test]
fn key_generate_makes_a_support_key_that_the_config_accepts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefsd"))
        .args(["key", "generate", "--name", "dana", "--role", "support"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let env_line = stdout.lines().find_map(|l| l.strip_prefix("env:    PREFSD_KEYS=")).expect(&stdout);
    assert!(env_line.starts_with("dana:support:"), "{env_line}");
    let args = prefsd::config::ServeArgs {
        keys: Some(vec![env_line.to_owned()]),
        data: Some("unused".into()),
        ..Default::default()
    };
    let config = prefsd::config::Config::resolve(&args, Default::default()).unwrap();
    assert_eq!(config.keys[0].role, Role::Support);
    assert_eq!(config.keys[0].name, "dana");

    // An unknown role is refused, by the generator and by the configuration.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefsd"))
        .args(["key", "generate", "--name", "x", "--role", "root"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("support"));
    let args = prefsd::config::ServeArgs {
        keys: Some(vec![format!("x:root:{}", hash_key("k"))]),
        ..Default::default()
    };
    let err = prefsd::config::Config::resolve(&args, Default::default()).unwrap_err();
    assert!(err.contains("sender, support or admin"), "{err}");
}
