//! The HTTP API: one `match` over (method, path) and the plumbing every
//! handler shares — authentication, body limits, content types, JSON
//! answers and the error contract.
//!
//! # Endpoints
//!
//! | route | role | module |
//! | --- | --- | --- |
//! | `GET/POST /v1/check`, `POST /v1/filter` | sender | [`check`] |
//! | `GET /v1/customers/C/preferences`, `PUT …/preferences/S/H`, `GET …/audit`, `GET /v1/audit`, `POST /v1/preferences/import` | admin | [`preferences`] |
//! | `GET /v1/services[/S]`, `GET /v1/channels` | sender | [`services`] |
//! | `POST /v1/services`, `PATCH /v1/services/S` | admin | [`services`] |
//! | `POST /v1/tokens` | sender | [`unsubscribe`] |
//! | `POST /v1/tokens/redeem`, `GET/POST /u/TOKEN` | none (the token) | [`unsubscribe`] |
//! | `GET /healthz`, `/readyz`, `/metrics` | none | here |

pub mod check;
pub mod preferences;
pub mod services;
pub mod unsubscribe;

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::app::App;
use crate::auth::{Caller, Role};
use crate::error::ApiError;

/// What every handler answers with.
pub type Reply = Response<Full<Bytes>>;
/// What handlers return before the error contract is applied.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

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
}

impl<B> Incoming<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A header as text, if present and visible ASCII.
    pub fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Reads the body, refusing more than `limit` bytes with 413.
    pub async fn bytes(self, limit: usize) -> Result<Bytes> {
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is larger than this route's limit of {limit} bytes"),
            )
        };
        if let Some(len) = self.header(header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok())
            && len > limit as u64
        {
            return Err(too_large());
        }
        match Limited::new(self.body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Err(e) => Err(ApiError::bad_request(
                "unreadable_body",
                format!("the request body could not be read: {e}"),
            )),
        }
    }

    /// Reads and parses a JSON body (415 for another content type).
    pub async fn json<T: serde::de::DeserializeOwned>(self, limit: usize) -> Result<T> {
        require_json(self.header(header::CONTENT_TYPE))?;
        let bytes = self.bytes(limit).await?;
        Ok(serde_json::from_slice(&bytes)?)
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
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v)
}

/// A required query parameter.
pub fn required_param<'a>(query: &'a str, name: &str) -> Result<std::borrow::Cow<'a, str>> {
    query_param(query, name).ok_or_else(|| {
        ApiError::bad_request("missing_parameter", format!("query parameter {name:?} is required"))
    })
}

/// Serves one request: routes it, applies the error contract and counts it.
pub async fn handle<B>(app: &App, req: Request<B>, peer: SocketAddr, listener: Listener) -> Reply
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    let req = Incoming { parts, body, peer };
    let (route, result) = route(app, req, listener).await;
    let reply = match result {
        Ok(reply) => reply,
        Err(e) => error_reply(&e),
    };
    app.metrics().count_request(route, reply.status().as_u16());
    tracing::debug!(
        %method,
        route,
        path = %path.chars().take(120).collect::<String>(),
        status = reply.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
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

async fn route<B>(app: &App, req: Incoming<B>, listener: Listener) -> (&'static str, Result<Reply>)
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.parts.uri.path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.parts.method.clone();
    let get = method == Method::GET || method == Method::HEAD;
    match (listener, segments.as_slice()) {
        (_, ["healthz"]) if get => {
            ("/healthz", Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"}))))
        }
        (_, ["readyz"]) if get => ("/readyz", readyz(app)),
        (_, ["metrics"]) if get => {
            let text = app.metrics().render(&app.index());
            ("/metrics", Ok(bytes_reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text)))
        }
        (_, ["healthz" | "readyz" | "metrics"]) => ("other", Err(method_not_allowed("GET"))),
        (Listener::Metrics, _) => ("other", Err(ApiError::no_route(&path))),
        (Listener::Api, ["v1", rest @ ..]) => v1(app, req, &method, rest).await,
        (Listener::Api, ["u", token]) if get => ("/u/T", unsubscribe::page_get(app, &req, token).await),
        (Listener::Api, ["u", token]) if method == Method::POST => {
            let token = token.to_string();
            ("/u/T", unsubscribe::page_post(app, req, &token).await)
        }
        (Listener::Api, ["u", _]) => ("/u/T", Err(method_not_allowed("GET, POST"))),
        _ => ("other", Err(ApiError::no_route(&path))),
    }
}

fn readyz(app: &App) -> Result<Reply> {
    if app.is_ready() {
        Ok(json(StatusCode::OK, &serde_json::json!({"status": "ready", "last_seq": app.store().last_seq()?})))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "prefsd is starting or shutting down",
        ))
    }
}

async fn v1<B>(app: &App, req: Incoming<B>, method: &Method, rest: &[&str]) -> (&'static str, Result<Reply>)
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use Method as M;
    match (method, rest) {
        (&M::GET, ["check"]) => ("/v1/check", check::get(app, &req)),
        (&M::POST, ["check"]) => ("/v1/check", check::batch(app, req).await),
        (_, ["check"]) => ("/v1/check", Err(method_not_allowed("GET, POST"))),
        (&M::POST, ["filter"]) => ("/v1/filter", check::filter(app, req).await),
        (_, ["filter"]) => ("/v1/filter", Err(method_not_allowed("POST"))),
        (&M::GET, ["customers", c, "preferences"]) => {
            ("/v1/customers/C/preferences", preferences::get(app, &req, c).await)
        }
        (_, ["customers", _, "preferences"]) => {
            ("/v1/customers/C/preferences", Err(method_not_allowed("GET")))
        }
        (&M::PUT, ["customers", c, "preferences", s, h]) => {
            let (c, s, h) = (c.to_string(), s.to_string(), h.to_string());
            ("/v1/customers/C/preferences/S/H", preferences::put(app, req, &c, &s, &h).await)
        }
        (_, ["customers", _, "preferences", _, _]) => {
            ("/v1/customers/C/preferences/S/H", Err(method_not_allowed("PUT")))
        }
        (&M::GET, ["customers", c, "audit"]) => {
            ("/v1/customers/C/audit", preferences::customer_audit(app, &req, c).await)
        }
        (_, ["customers", _, "audit"]) => ("/v1/customers/C/audit", Err(method_not_allowed("GET"))),
        (&M::GET, ["audit"]) => ("/v1/audit", preferences::audit(app, &req).await),
        (_, ["audit"]) => ("/v1/audit", Err(method_not_allowed("GET"))),
        (&M::POST, ["preferences", "import"]) => {
            ("/v1/preferences/import", preferences::import(app, req).await)
        }
        (_, ["preferences", "import"]) => ("/v1/preferences/import", Err(method_not_allowed("POST"))),
        (&M::GET, ["services"]) => ("/v1/services", services::list(app, &req).await),
        (&M::POST, ["services"]) => ("/v1/services", services::create(app, req).await),
        (_, ["services"]) => ("/v1/services", Err(method_not_allowed("GET, POST"))),
        (&M::GET, ["services", s]) => ("/v1/services/S", services::read(app, &req, s).await),
        (&M::PATCH, ["services", s]) => {
            let s = s.to_string();
            ("/v1/services/S", services::update(app, req, &s).await)
        }
        (_, ["services", _]) => ("/v1/services/S", Err(method_not_allowed("GET, PATCH"))),
        (&M::POST, ["tokens"]) => ("/v1/tokens", unsubscribe::issue(app, req).await),
        (_, ["tokens"]) => ("/v1/tokens", Err(method_not_allowed("POST"))),
        (&M::POST, ["tokens", "redeem"]) => ("/v1/tokens/redeem", unsubscribe::redeem(app, req).await),
        (_, ["tokens", "redeem"]) => ("/v1/tokens/redeem", Err(method_not_allowed("POST"))),
        (&M::GET, ["channels"]) => ("/v1/channels", services::channels(app, &req)),
        (_, ["channels"]) => ("/v1/channels", Err(method_not_allowed("GET"))),
        _ => ("other", Err(ApiError::no_route(req.parts.uri.path()))),
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
