//! The HTTP API: one `match` over (method, path) and the plumbing every
//! handler shares — authentication, body limits, content types, JSON
//! answers and the error contract.
//!
//! # Endpoints
//!
//! | route | role | module |
//! | --- | --- | --- |
//! | `GET/POST /v1/check`, `POST /v1/filter` | sender | [`check`] |
//! | `GET /v1/customers/C/preferences`, `PUT …/preferences/S/H` (support: reason required), `GET …/audit`, `GET /v1/audit` | support | [`preferences`] |
//! | `POST /v1/preferences/import` | admin | [`preferences`] |
//! | `GET /v1/services[/S]`, `GET /v1/channels` | sender | [`services`] |
//! | `POST /v1/services`, `PATCH /v1/services/S` | admin | [`services`] |
//! | `POST /v1/tokens` | sender | [`unsubscribe`] |
//! | `POST /v1/tokens/redeem`, `GET/POST /u/TOKEN` | none (the token) | [`unsubscribe`] |
//! | `GET /healthz`, `/readyz`, `/metrics`, `/openapi.json` | none | here |
//! | `/console/…` (HTML, session cookie; not in OpenAPI, counted as `other`) | support | [`crate::console`] |
//!
//! [`ROUTES`] lists every (method, path) in the OpenAPI document's terms;
//! a test keeps it, the router and `openapi.json` in step. Each request is
//! counted by [`Route`] (its pattern, never the raw path, which may hold a
//! token) and logged at info level on target `prefsd::request`, with an
//! `X-Request-Id` taken from the request or generated, and echoed.
//!
//! Every route refuses a repeated query parameter (400 `invalid_parameter`
//! naming it): a proxy or WAF in front may read the other copy. An answer
//! given without reading the request body to its end says
//! `Connection: close` ([`body::Tracked`]).

pub mod body;
pub mod bulk;
pub mod check;
pub mod preferences;
pub mod services;
pub mod unsubscribe;

use std::borrow::Cow;
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::app::App;
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::metrics::Scrape;

/// What every handler answers with.
pub type Reply = Response<Full<Bytes>>;
/// What handlers return before the error contract is applied.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// The OpenAPI 3.1 description of this API, served at `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Every (method, path) the API listener serves, paths in OpenAPI syntax.
/// `HEAD` is also answered wherever `GET` is on `/healthz`, `/readyz`,
/// `/metrics`, `/openapi.json` and `/u/{token}`.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/check"),
    ("POST", "/v1/check"),
    ("POST", "/v1/filter"),
    ("GET", "/v1/customers/{customer}/preferences"),
    ("PUT", "/v1/customers/{customer}/preferences/{service}/{channel}"),
    ("GET", "/v1/customers/{customer}/audit"),
    ("GET", "/v1/audit"),
    ("POST", "/v1/preferences/import"),
    ("GET", "/v1/services"),
    ("POST", "/v1/services"),
    ("GET", "/v1/services/{service}"),
    ("PATCH", "/v1/services/{service}"),
    ("GET", "/v1/channels"),
    ("POST", "/v1/tokens"),
    ("POST", "/v1/tokens/redeem"),
    ("GET", "/u/{token}"),
    ("POST", "/u/{token}"),
];

/// A route pattern, as metrics and logs name a request: never the raw path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// `/healthz`
    Healthz,
    /// `/readyz`
    Readyz,
    /// `/metrics`
    Metrics,
    /// `/openapi.json`
    OpenApi,
    /// `/v1/check`
    Check,
    /// `/v1/filter`
    Filter,
    /// `/v1/customers/C/preferences`
    Preferences,
    /// `/v1/customers/C/preferences/S/H`
    Preference,
    /// `/v1/customers/C/audit`
    CustomerAudit,
    /// `/v1/audit`
    Audit,
    /// `/v1/preferences/import`
    Import,
    /// `/v1/services`
    Services,
    /// `/v1/services/S`
    Service,
    /// `/v1/channels`
    Channels,
    /// `/v1/tokens`
    Tokens,
    /// `/v1/tokens/redeem`
    Redeem,
    /// `/u/T`
    Page,
    /// Anything no route matches.
    Other,
}

impl Route {
    /// The route a path names on `listener`, whatever the method: how a
    /// request refused before routing is counted.
    pub fn of(listener: Listener, segments: &[&str]) -> Route {
        match (listener, segments) {
            (_, ["healthz"]) => Route::Healthz,
            (_, ["readyz"]) => Route::Readyz,
            (_, ["metrics"]) => Route::Metrics,
            (Listener::Metrics, _) => Route::Other,
            (_, ["openapi.json"]) => Route::OpenApi,
            (_, ["v1", "check"]) => Route::Check,
            (_, ["v1", "filter"]) => Route::Filter,
            (_, ["v1", "customers", _, "preferences"]) => Route::Preferences,
            (_, ["v1", "customers", _, "preferences", _, _]) => Route::Preference,
            (_, ["v1", "customers", _, "audit"]) => Route::CustomerAudit,
            (_, ["v1", "audit"]) => Route::Audit,
            (_, ["v1", "preferences", "import"]) => Route::Import,
            (_, ["v1", "services"]) => Route::Services,
            (_, ["v1", "services", _]) => Route::Service,
            (_, ["v1", "channels"]) => Route::Channels,
            (_, ["v1", "tokens"]) => Route::Tokens,
            (_, ["v1", "tokens", "redeem"]) => Route::Redeem,
            (_, ["u", _]) => Route::Page,
            _ => Route::Other,
        }
    }

    /// Every route, in [`Route::index`] order.
    pub const ALL: [Route; 18] = [
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::OpenApi,
        Route::Check,
        Route::Filter,
        Route::Preferences,
        Route::Preference,
        Route::CustomerAudit,
        Route::Audit,
        Route::Import,
        Route::Services,
        Route::Service,
        Route::Channels,
        Route::Tokens,
        Route::Redeem,
        Route::Page,
        Route::Other,
    ];

    /// Position in [`Route::ALL`].
    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The pattern: `C`, `S`, `H` and `T` stand for customer, service,
    /// channel and token.
    pub const fn pattern(self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::Check => "/v1/check",
            Route::Filter => "/v1/filter",
            Route::Preferences => "/v1/customers/C/preferences",
            Route::Preference => "/v1/customers/C/preferences/S/H",
            Route::CustomerAudit => "/v1/customers/C/audit",
            Route::Audit => "/v1/audit",
            Route::Import => "/v1/preferences/import",
            Route::Services => "/v1/services",
            Route::Service => "/v1/services/S",
            Route::Channels => "/v1/channels",
            Route::Tokens => "/v1/tokens",
            Route::Redeem => "/v1/tokens/redeem",
            Route::Page => "/u/T",
            Route::Other => "other",
        }
    }
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The API listener: every route.
    Api,
    /// The metrics listener: `/metrics`, `/healthz`, `/readyz` only.
    Metrics,
}

/// A request as the handlers see it: head parsed, body still unread.
pub struct Incoming<B> {
    /// Method, URI, headers.
    pub parts: hyper::http::request::Parts,
    /// The body, read on demand with a limit.
    pub body: B,
    /// The direct peer.
    pub peer: SocketAddr,
    /// Longest wait for the next part of the body.
    pub read_timeout: Duration,
}

impl<B> Incoming<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A header as text, if present and visible ASCII.
    pub fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Reads the body, refusing more than `limit` bytes with 413, and a
    /// client that sends nothing of it for `read_timeout` with 408.
    pub async fn bytes(self, limit: usize) -> Result<Bytes> {
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is larger than this route's limit of {limit} bytes"),
            )
        };
        let declared = self.header(header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(too_large());
        }
        let read_timeout = self.read_timeout;
        let mut body = Limited::new(self.body, limit);
        let mut first: Option<Bytes> = None;
        let mut rest: Vec<u8> = Vec::new();
        loop {
            let frame = match tokio::time::timeout(read_timeout, body.frame()).await {
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "body_timeout",
                        format!("no part of the request body arrived for {} s", read_timeout.as_secs()),
                    ));
                }
                Ok(None) => break,
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) if e.is::<LengthLimitError>() => return Err(too_large()),
                Ok(Some(Err(e))) => {
                    return Err(ApiError::bad_request(
                        "unreadable_body",
                        format!("the request body could not be read: {e}"),
                    ));
                }
            };
            let Ok(data) = frame.into_data() else { continue };
            // One frame (the usual small body) is kept as it came; more are
            // copied once into a buffer sized from Content-Length.
            match &first {
                None if rest.is_empty() => first = Some(data),
                _ => {
                    if let Some(f) = first.take() {
                        let expected = declared.map_or(0, |l| l as usize).max(f.len() + data.len());
                        rest.reserve(expected);
                        rest.extend_from_slice(&f);
                    }
                    rest.extend_from_slice(&data);
                }
            }
        }
        Ok(first.unwrap_or_else(|| Bytes::from(rest)))
    }

    /// Reads and parses a JSON body (415 for another content type).
    pub async fn json<T: serde::de::DeserializeOwned>(self, limit: usize) -> Result<T> {
        require_json(self.header(header::CONTENT_TYPE))?;
        let bytes = self.bytes(limit).await?;
        Ok(serde_json::from_str::<Object<T>>(utf8(&bytes)?)?.0)
    }
}

/// A JSON body as text. Validating it once here lets serde_json read
/// strings without checking each one again: `from_utf8` per string was 18%
/// of a 1,000-check batch in perf.
pub fn utf8(bytes: &[u8]) -> Result<&str> {
    std::str::from_utf8(bytes).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("the body is not valid JSON: it is not UTF-8 ({e})"))
    })
}

/// A JSON object deserialized into `T`. serde's derived structs also accept
/// an array of their fields in order; the contract's bodies are objects, so
/// this refuses anything but a map.
pub struct Object<T>(pub T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> std::result::Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Visitor(std::marker::PhantomData)).map(Object)
    }
}

/// JSON bodies must say so; a missing Content-Type is taken as JSON.
pub fn require_json(content_type: Option<&str>) -> Result<()> {
    match content_type {
        None => Ok(()),
        Some(ct) => {
            let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if mime == "application/json" || mime.ends_with("+json") {
                Ok(())
            } else {
                Err(unsupported(ct, "application/json"))
            }
        }
    }
}

/// 415 naming what was sent and what is accepted.
pub fn unsupported(sent: &str, accepted: &str) -> ApiError {
    let sent: String = sent.chars().take(100).collect();
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("Content-Type {sent:?} is not accepted here; send {accepted}"),
    )
}

/// A JSON answer.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    let mut body = serde_json::to_vec(value).expect("response types serialize");
    // A final newline keeps terminal output (curl) readable.
    body.push(b'\n');
    bytes_reply(status, "application/json", body)
}

/// Raw bytes with a content type.
pub fn bytes_reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The error contract's body.
pub fn error_reply(e: &ApiError) -> Reply {
    bytes_reply(e.status, "application/json", e.body())
}

/// Percent-decodes one path segment.
pub fn segment(s: &str) -> Result<std::borrow::Cow<'_, str>> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("invalid_path", "the path is not valid UTF-8 once decoded"))
}

/// The value of query parameter `name`, percent-decoded.
///
/// Pairs without `%` or `+` are compared and returned as they stand; only
/// encoded ones go through `form_urlencoded`. Decoding every pair up to the
/// match was a quarter of a `GET /v1/check` in perf.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let encoded = |s: &str| s.bytes().any(|b| b == b'%' || b == b'+');
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !encoded(pair) {
            if key == name {
                return Some(std::borrow::Cow::Borrowed(value));
            }
        } else if let Some((k, v)) = form_urlencoded::parse(pair.as_bytes()).next()
            && k == name
        {
            return Some(v);
        }
    }
    None
}

/// A query parameter's name, percent-decoded when it needs to be.
fn param_name(pair: &str) -> Cow<'_, str> {
    let name = pair.split_once('=').map_or(pair, |(k, _)| k);
    if name.bytes().any(|b| b == b'%' || b == b'+') {
        // No raw `=` is left in `name`: the first pair is (decoded name, "").
        form_urlencoded::parse(name.as_bytes()).next().map_or(Cow::Borrowed(""), |(k, _)| k)
    } else {
        Cow::Borrowed(name)
    }
}

/// The first query parameter given more than once (names compared after
/// percent-decoding), if any. A few parameters are compared pairwise with
/// no allocation; a long query through a set.
pub fn repeated_param(query: &str) -> Option<String> {
    let pairs = || query.split('&').filter(|p| !p.is_empty());
    if pairs().nth(32).is_none() {
        for (i, pair) in pairs().enumerate() {
            let name = param_name(pair);
            if pairs().take(i).any(|earlier| param_name(earlier) == name) {
                return Some(name.into_owned());
            }
        }
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    pairs().map(param_name).find(|name| !seen.insert(name.clone())).map(Cow::into_owned)
}

/// A required query parameter.
pub fn required_param<'a>(query: &'a str, name: &str) -> Result<std::borrow::Cow<'a, str>> {
    query_param(query, name).ok_or_else(|| {
        ApiError::bad_request("missing_parameter", format!("query parameter {name:?} is required"))
    })
}

/// The request id header, taken from the request or generated.
pub const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// A caller's `X-Request-Id`, if it is short and plain enough to log.
fn given_request_id(headers: &hyper::HeaderMap) -> Option<HeaderValue> {
    let v = headers.get(REQUEST_ID)?;
    let ok = (1..=128).contains(&v.len())
        && v.as_bytes().iter().all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b));
    ok.then(|| v.clone())
}

/// A new request id: 16 hex digits from a per-thread counter that starts
/// at a random value, so ids are unique without a shared atomic.
fn new_request_id() -> HeaderValue {
    thread_local! {
        static NEXT: Cell<u64> = Cell::new({
            let mut seed = [0u8; 8];
            // Without randomness, the clock is a good enough start.
            if getrandom::fill(&mut seed).is_err() {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                seed = nanos.to_le_bytes();
            }
            u64::from_le_bytes(seed)
        });
    }
    let n = NEXT.with(|c| {
        let n = c.get();
        c.set(n.wrapping_add(1));
        n
    });
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[(n >> (60 - 4 * i)) as usize & 0xf];
    }
    HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
}

/// Serves one request: routes it, applies the error contract, counts it,
/// logs one line for it and echoes its request id.
pub async fn handle<B>(app: &App, req: Request<B>, peer: SocketAddr, listener: Listener) -> Reply
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let request_id = given_request_id(&parts.headers).unwrap_or_else(new_request_id);
    let (body, ended) = body::Tracked::new(body);
    let req = Incoming { parts, body, peer, read_timeout: app.config().idle_timeout };
    let (route, result) = route(app, req, listener).await;
    let mut reply = match result {
        Ok(reply) => reply,
        Err(e) => error_reply(&e),
    };
    if body::left_unread(ended.as_ref()) {
        // hyper will not read the rest of the body, so it closes the
        // connection after this answer: say so.
        reply.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let status = reply.status().as_u16();
    let took = started.elapsed();
    app.metrics().count_request(route, status, took);
    if status == 429 {
        // Only the per-address limit of the recipient routes answers 429.
        app.metrics().count_rate_limited(route);
    }
    // Only the route pattern: a raw path may hold a token, a query string
    // customer ids. Fields are evaluated only when the line is enabled.
    tracing::info!(
        target: "prefsd::request",
        method = method.as_str(),
        route = route.pattern(),
        status,
        latency_us = took.as_micros() as u64,
        request_id = request_id.to_str().unwrap_or(""),
        "request"
    );
    reply.headers_mut().insert(REQUEST_ID, request_id);
    reply
}

fn method_not_allowed(allowed: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this route accepts {allowed}"),
    )
}

/// Checks the caller's key for `role`.
pub fn authorize<B>(app: &App, req: &Incoming<B>, role: Role) -> Result<Caller> {
    let header = req.parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    Ok(app.keys().authorize(header, role)?)
}

async fn route<B>(app: &App, req: Incoming<B>, listener: Listener) -> (Route, Result<Reply>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.parts.uri.path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let Some(name) = req.parts.uri.query().and_then(repeated_param) {
        let shown: String = name.chars().take(100).collect();
        return (
            Route::of(listener, &segments),
            Err(ApiError::bad_request(
                "invalid_parameter",
                format!("query parameter {shown:?} is given more than once; give each parameter once"),
            )),
        );
    }
    let method = req.parts.method.clone();
    let get = method == Method::GET || method == Method::HEAD;
    match (listener, segments.as_slice()) {
        (_, ["healthz"]) if get => (Route::Healthz, Ok(healthz(app))),
        (_, ["readyz"]) if get => (Route::Readyz, readyz(app)),
        (_, ["metrics"]) if get => (Route::Metrics, Ok(metrics(app, &req))),
        (_, ["healthz"]) => (Route::Healthz, Err(method_not_allowed("GET"))),
        (_, ["readyz"]) => (Route::Readyz, Err(method_not_allowed("GET"))),
        (_, ["metrics"]) => (Route::Metrics, Err(method_not_allowed("GET"))),
        (Listener::Metrics, _) => (Route::Other, Err(ApiError::no_route(&path))),
        (Listener::Api, ["openapi.json"]) if get => {
            (Route::OpenApi, Ok(bytes_reply(StatusCode::OK, "application/json", OPENAPI)))
        }
        (Listener::Api, ["openapi.json"]) => (Route::OpenApi, Err(method_not_allowed("GET"))),
        (Listener::Api, ["v1", rest @ ..]) => v1(app, req, &method, rest).await,
        (Listener::Api, ["u", token]) if get => (Route::Page, unsubscribe::page_get(app, &req, token).await),
        (Listener::Api, ["u", token]) if method == Method::POST => {
            let token = token.to_string();
            (Route::Page, unsubscribe::page_post(app, req, &token).await)
        }
        (Listener::Api, ["u", _]) => (Route::Page, Err(method_not_allowed("GET, POST"))),
        (Listener::Api, ["console", ..]) => (Route::Other, Ok(crate::console::handle(app, req).await)),
        _ => (Route::Other, Err(ApiError::no_route(&path))),
    }
}

/// The exposition: OpenMetrics when the scraper asks for it (Prometheus
/// does), else the Prometheus text format.
fn metrics<B>(app: &App, req: &Incoming<B>) -> Reply
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let openmetrics = req.header(header::ACCEPT).is_some_and(|a| a.contains("application/openmetrics-text"));
    // Copy what the exposition needs, so the index lock is not held while encoding.
    let pairs = Scrape::pairs_of(&app.index());
    if let Some(c) = app.cluster() {
        use std::sync::atomic::Ordering;
        let applied = *app.writer().applied().borrow();
        let lag = c.head.load(Ordering::Acquire).saturating_sub(applied);
        app.metrics().set_cluster(lag, c.reachable.load(Ordering::Acquire));
    }
    let text = app.metrics().render(Scrape { pairs, ready: app.is_ready() }, openmetrics);
    let content_type =
        if openmetrics { crate::metrics::OPENMETRICS } else { crate::metrics::PROMETHEUS_TEXT };
    bytes_reply(StatusCode::OK, content_type, text)
}

/// Liveness: 200 unless, in cluster mode, the follower has not been able to
/// apply events for longer than its bound (then a restart is the cure).
fn healthz(app: &App) -> Reply {
    match app.unhealthy() {
        None => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        Some(why) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "unhealthy", "error": {"code": "unhealthy", "message": why}}),
        ),
    }
}

fn readyz(app: &App) -> Result<Reply> {
    use std::sync::atomic::Ordering;
    let last_seq = *app.writer().applied().borrow();
    let mut body = serde_json::json!({"status": "ready", "last_seq": last_seq});
    let mut why = "prefsd is starting or shutting down".to_owned();
    if let Some(c) = app.cluster() {
        let head = c.head.load(Ordering::Acquire);
        body["postgres"] = serde_json::json!({
            "reachable": c.reachable.load(Ordering::Acquire),
            "head": head,
            "lag": head.saturating_sub(last_seq),
        });
        if let Some(kind) = c.problem_kind() {
            body["postgres"]["failing"] = kind.into();
        }
        if let Some(not_ready) = c.not_ready(last_seq) {
            why = not_ready;
        }
    }
    if app.is_ready() {
        return Ok(json(StatusCode::OK, &body));
    }
    // Not ready: the error contract, plus the same status fields.
    body["status"] = if app.cluster().is_some() { "catching_up" } else { "not_ready" }.into();
    body["error"] = serde_json::json!({"code": "not_ready", "message": why});
    Ok(json(StatusCode::SERVICE_UNAVAILABLE, &body))
}

async fn v1<B>(app: &App, req: Incoming<B>, method: &Method, rest: &[&str]) -> (Route, Result<Reply>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use Method as M;
    match (method, rest) {
        (&M::GET, ["check"]) => (Route::Check, check::get(app, &req)),
        (&M::POST, ["check"]) => (Route::Check, check::batch(app, req).await),
        (_, ["check"]) => (Route::Check, Err(method_not_allowed("GET, POST"))),
        (&M::POST, ["filter"]) => (Route::Filter, check::filter(app, req).await),
        (_, ["filter"]) => (Route::Filter, Err(method_not_allowed("POST"))),
        (&M::GET, ["customers", c, "preferences"]) => {
            (Route::Preferences, preferences::get(app, &req, c).await)
        }
        (_, ["customers", _, "preferences"]) => (Route::Preferences, Err(method_not_allowed("GET"))),
        (&M::PUT, ["customers", c, "preferences", s, h]) => {
            let (c, s, h) = (c.to_string(), s.to_string(), h.to_string());
            (Route::Preference, preferences::put(app, req, &c, &s, &h).await)
        }
        (_, ["customers", _, "preferences", _, _]) => (Route::Preference, Err(method_not_allowed("PUT"))),
        (&M::GET, ["customers", c, "audit"]) => {
            (Route::CustomerAudit, preferences::customer_audit(app, &req, c).await)
        }
        (_, ["customers", _, "audit"]) => (Route::CustomerAudit, Err(method_not_allowed("GET"))),
        (&M::GET, ["audit"]) => (Route::Audit, preferences::audit(app, &req).await),
        (_, ["audit"]) => (Route::Audit, Err(method_not_allowed("GET"))),
        (&M::POST, ["preferences", "import"]) => (Route::Import, preferences::import(app, req).await),
        (_, ["preferences", "import"]) => (Route::Import, Err(method_not_allowed("POST"))),
        (&M::GET, ["services"]) => (Route::Services, services::list(app, &req).await),
        (&M::POST, ["services"]) => (Route::Services, services::create(app, req).await),
        (_, ["services"]) => (Route::Services, Err(method_not_allowed("GET, POST"))),
        (&M::GET, ["services", s]) => (Route::Service, services::read(app, &req, s).await),
        (&M::PATCH, ["services", s]) => {
            let s = s.to_string();
            (Route::Service, services::update(app, req, &s).await)
        }
        (_, ["services", _]) => (Route::Service, Err(method_not_allowed("GET, PATCH"))),
        (&M::POST, ["tokens"]) => (Route::Tokens, unsubscribe::issue(app, req).await),
        (_, ["tokens"]) => (Route::Tokens, Err(method_not_allowed("POST"))),
        (&M::POST, ["tokens", "redeem"]) => (Route::Redeem, unsubscribe::redeem(app, req).await),
        (_, ["tokens", "redeem"]) => (Route::Redeem, Err(method_not_allowed("POST"))),
        (&M::GET, ["channels"]) => (Route::Channels, services::channels(app, &req)),
        (_, ["channels"]) => (Route::Channels, Err(method_not_allowed("GET"))),
        _ => (Route::Other, Err(ApiError::no_route(req.parts.uri.path()))),
    }
}

/// Runs blocking store work off the async worker threads.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("a task failed: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::{query_param, repeated_param};

    #[test]
    fn a_repeated_parameter_is_found_however_it_is_spelled() {
        assert_eq!(repeated_param("customer=1&service=a&channel=email"), None);
        assert_eq!(repeated_param("customer=1&customer=2"), Some("customer".into()));
        assert_eq!(repeated_param("service=a&ser%76ice=b"), Some("service".into()));
        assert_eq!(repeated_param("flag&x=1&flag"), Some("flag".into()));
        assert_eq!(repeated_param("a+b=1&a%20b=2"), Some("a b".into()));
        assert_eq!(repeated_param("&&a=1&&b=2&"), None, "empty pairs are no parameters");
        let many: Vec<String> = (0..100).map(|i| format!("p{i}=1")).collect();
        assert_eq!(repeated_param(&many.join("&")), None);
        assert_eq!(repeated_param(&format!("{}&p7=2", many.join("&"))), Some("p7".into()));
    }

    #[test]
    fn query_param_answers_as_form_urlencoded_does() {
        let queries = [
            "customer=42&service=rating&channel=email",
            "service=a%2Fb&service=second",
            "ser%76ice=encoded-key&service=plain",
            "channel=e+mail&customer=%34%32",
            "&&service&customer==x&channel=a=b",
            "customer=%FF%FE&service=%zz",
            "",
        ];
        for query in queries {
            for name in ["customer", "service", "channel", "missing", ""] {
                let expected =
                    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v);
                assert_eq!(query_param(query, name), expected, "{query:?} {name:?}");
            }
        }
    }
}
