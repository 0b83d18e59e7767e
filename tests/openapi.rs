//! The router and `openapi.json` stay in step: every route the router
//! serves is in the document with the same methods, every documented
//! operation is served (not 404 for want of a route, not 405, not a 5xx,
//! and with a status the document declares for it), and the
//! sidecar serves the document itself at `GET /openapi.json`.

mod util;

use std::collections::BTreeSet;

use prefsd::http::{OPENAPI, ROUTES, Route};
use serde_json::{Value, json};

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn document() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert_eq!(text, OPENAPI, "the served document is the file at the repository root");
    serde_json::from_str(&text).expect("openapi.json is JSON")
}

/// Every (METHOD, path) the document describes.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (key, _) in item.as_object().expect("path item") {
            if METHODS.contains(&key.as_str()) {
                out.insert((key.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

fn routes() -> BTreeSet<(String, String)> {
    ROUTES.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect()
}

#[test]
fn document_is_openapi_3_1_with_this_version() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
}

#[test]
fn every_route_is_documented_and_every_operation_routed() {
    let doc = documented(&document());
    let routes = routes();
    let missing: Vec<_> = routes.difference(&doc).collect();
    assert!(missing.is_empty(), "routes missing from openapi.json: {missing:?}");
    let extra: Vec<_> = doc.difference(&routes).collect();
    assert!(extra.is_empty(), "documented operations missing from http::ROUTES: {extra:?}");
}

/// `{customer}` → `C` and so on: the [`Route`] pattern of an OpenAPI path.
fn pattern(path: &str) -> String {
    path.replace("{customer}", "C")
        .replace("{service}", "S")
        .replace("{channel}", "H")
        .replace("{token}", "T")
}

#[test]
fn route_patterns_are_the_documented_paths() {
    let from_routes: BTreeSet<String> = ROUTES.iter().map(|(_, p)| pattern(p)).collect();
    let from_enum: BTreeSet<String> =
        Route::ALL.iter().filter(|r| **r != Route::Other).map(|r| r.pattern().to_owned()).collect();
    assert_eq!(from_routes, from_enum, "metrics and logs name exactly the documented routes");
}

/// A concrete path for an OpenAPI path, with the query a route needs.
fn concrete(path: &str, token: &str) -> String {
    let p = path
        .replace("{customer}", "1")
        .replace("{service}", "rating")
        .replace("{channel}", "email")
        .replace("{token}", token);
    match p.as_str() {
        "/v1/check" | "/v1/filter" => format!("{p}?customer=1&service=rating&channel=email"),
        _ => p,
    }
}

/// The status codes the document declares for one operation (`"4XX"`-style
/// ranges and `default` included as written).
fn declared(doc: &Value, method: &str, path: &str) -> Vec<String> {
    let responses = &doc["paths"][path][method.to_ascii_lowercase()]["responses"];
    responses
        .as_object()
        .unwrap_or_else(|| panic!("{method} {path} declares no responses"))
        .keys()
        .cloned()
        .collect()
}

/// Whether `status` is one the operation declares.
fn is_declared(declared: &[String], status: u16) -> bool {
    let exact = status.to_string();
    let range = format!("{}XX", status / 100);
    declared.iter().any(|d| *d == exact || d.eq_ignore_ascii_case(&range) || d == "default")
}

/// Whether the router answered as a route: not 405, not a `not_found` 404,
/// and no server error.
fn routed(a: &prefsd::client::Answer) -> bool {
    a.status != 405 && a.status < 500 && !(a.status == 404 && a.error_code().as_deref() == Some("not_found"))
}

#[test]
fn the_router_serves_exactly_the_documented_methods() {
    let app = util::spawn_app();
    let c = &app.client;
    let ok = |a: prefsd::client::Answer| {
        assert!(a.status < 300, "{} {}", a.status, String::from_utf8_lossy(&a.body));
        a.json()
    };
    let body = |v: Value| Some(serde_json::to_vec(&v).unwrap());
    ok(c.send("POST", "/v1/services", Some("application/json"), body(json!({"slug": "rating"}))).unwrap());
    let issued = ok(c
        .send(
            "POST",
            "/v1/tokens",
            Some("application/json"),
            body(json!({"customer": 1, "service": "rating", "channel": "email"})),
        )
        .unwrap());
    let token = issued["token"].as_str().unwrap().to_owned();

    let full = document();
    let doc = documented(&full);
    let paths: BTreeSet<&String> = doc.iter().map(|(_, p)| p).collect();
    for path in paths {
        let url = concrete(path, &token);
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            // Bodies are left empty: a 400 still shows the route exists, and
            // nothing is changed by probing.
            let a = c.send(method, &url, None, None).unwrap();
            let listed = doc.contains(&(method.to_owned(), path.clone()));
            if listed {
                assert!(
                    routed(&a),
                    "{method} {path} is documented but answered {} {:?}",
                    a.status,
                    a.error_code()
                );
                let declared = declared(&full, method, path);
                assert!(
                    is_declared(&declared, a.status),
                    "{method} {path} answered {} {:?}, which the document does not declare (it declares {declared:?})",
                    a.status,
                    a.error_code()
                );
            } else {
                assert_eq!(
                    a.status, 405,
                    "{method} {path} is not documented, so it must be refused with 405"
                );
                assert_eq!(a.error_code().as_deref(), Some("method_not_allowed"));
            }
        }
    }
    // Probing changed nothing: one service and no preference events.
    let audit = c.send("GET", "/v1/audit", None, None).unwrap().json();
    assert_eq!(audit["entries"], json!([]));
}

#[test]
fn the_document_is_served_on_the_api_listener_only() {
    let app = util::spawn_with(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap()));
    let a = app.client.send("GET", "/openapi.json", None, None).unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.content_type.as_deref(), Some("application/json"));
    assert_eq!(a.body, OPENAPI.as_bytes());
    let metrics = prefsd::client::Client::new(&format!("http://{}", app.metrics_addr.unwrap()), None);
    let a = metrics.send("GET", "/openapi.json", None, None).unwrap();
    assert_eq!(a.status, 404, "the metrics listener serves only /metrics, /healthz and /readyz");
}
