//! The support console: server-rendered pages under `/console/` on the API
//! listener, for the support and compliance staff who answer "I opted out
//! and you still texted me" (DESIGN.md, "Roles and the support console").
//!
//! A staff member signs in once with their own key (role `support` or
//! `admin`; sender keys cannot) and gets a server-side session
//! ([`session`]); every form carries the session's CSRF token
//! ([`csrf`]); every page is HTML without script, escaped throughout, with
//! the recipient page's protective headers ([`html`]).
//!
//! # Pages (stable URLs)
//!
//! | route | what |
//! | --- | --- |
//! | `GET /console/` | overview: opted-out customers per pair; opt-outs and opt-ins per day over 90 days ([`chart`]) |
//! | `GET/POST /console/sign-in` | the sign-in form (field `key`) |
//! | `POST /console/sign-out` | ends the session |
//! | `GET /console/customers?q=…` | find a customer |
//! | `GET/POST /console/customers/C` | grid, deciding records, change form, timeline ([`customer`]) |
//! | `GET /console/customers/C/export.json`, `.csv` | the customer's data |
//! | `GET/POST /console/services`, `POST /console/services/S` | list with opted-out counts; create, edit, archive, restore (admin only, [`services`]) |
//! | `GET /console/audit?…`, `/console/audit.csv?…` | the audit log, filtered and paged; CSV of the filtered rows ([`audit`]) |
//!
//! The overview's per-day chart is [`chart`]; other rendering lives in
//! [`pages`]; this file routes and handles.

pub mod audit;
pub mod chart;
pub mod csrf;
pub mod customer;
pub mod html;
pub mod pages;
pub mod services;
pub mod session;

pub use session::Sessions;

use std::time::Instant;

use bytes::Bytes;
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Method, StatusCode};

use crate::app::App;
use crate::auth::{Denied, Role};
use crate::domain::{CustomerId, Origin, Status, check_reason};
use crate::error::ApiError;
use crate::http::unsubscribe::client_addr;
use crate::http::{Incoming, Reply, blocking, query_param, segment};
use crate::writer::Op;
use customer::CustomerView;
use html::{message, page, redirect};
use session::Staff;

/// The console's state in a running sidecar: open sessions and the
/// overview's running per-day tally. In memory only.
#[derive(Debug)]
pub struct Console {
    sessions: Sessions,
    tally: std::sync::Mutex<chart::Tally>,
}

impl Console {
    /// Sessions ending after `idle` unused or `absolute` after sign-in.
    pub fn new(idle: std::time::Duration, absolute: std::time::Duration) -> Console {
        Console { sessions: Sessions::new(idle, absolute), tally: Default::default() }
    }

    /// The open sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }
}

/// Longest user agent kept in the audit log.
const MAX_USER_AGENT: usize = 256;

/// Serves one `/console/…` request. Errors are pages, not JSON.
pub async fn handle<B>(app: &App, req: Incoming<B>) -> Reply
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.parts.uri.path().to_owned();
    let rest: Vec<&str> = path.trim_start_matches('/').split('/').skip(1).collect();
    let method = req.parts.method.clone();
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    if post && !same_origin(app, &req) {
        return message(
            StatusCode::FORBIDDEN,
            None,
            "Form refused",
            "This form was sent from another site, so nothing was done.",
        );
    }
    match rest.as_slice() {
        [] => return redirect("/console/"),
        ["sign-in"] if get => return page(StatusCode::OK, pages::sign_in(None)),
        ["sign-in"] if post => return sign_in(app, req).await,
        ["sign-in"] => return not_allowed(None),
        _ => {}
    }
    let Some((id, staff)) = session(app, &req) else {
        // Unknown, ended or expired: sign in first. Nothing is done.
        return redirect("/console/sign-in");
    };
    let result = match rest.as_slice() {
        [""] if get => overview(app, &staff).await,
        ["sign-out"] if post => sign_out(app, req, &id, &staff).await,
        ["customers"] if get => Ok(find(&req, &staff)),
        ["customers", c] if get => customer_page(app, &staff, c, None, StatusCode::OK).await,
        ["customers", c] if post => {
            let c = c.to_string();
            change(app, req, &staff, &c).await
        }
        ["customers", c, "export.json"] if get => export(app, c, true).await,
        ["customers", c, "export.csv"] if get => export(app, c, false).await,
        ["services"] if get => services(app, &staff, None, StatusCode::OK).await,
        ["services"] if post => service_write(app, req, &staff, None).await,
        ["services", s] if post => {
            let s = s.to_string();
            service_write(app, req, &staff, Some(&s)).await
        }
        ["audit"] if get => audit_page(app, &req, &staff, false).await,
        ["audit.csv"] if get => audit_page(app, &req, &staff, true).await,
        [""] | ["customers", ..] | ["services", ..] | ["sign-out"] | ["audit"] | ["audit.csv"] => {
            Ok(not_allowed(Some(&staff)))
        }
        _ => {
            Ok(message(StatusCode::NOT_FOUND, Some(&staff), "Not found", "No console page has this address."))
        }
    };
    result.unwrap_or_else(|e| message(e.status, Some(&staff), "Something went wrong", &e.message))
}

fn not_allowed(staff: Option<&Staff>) -> Reply {
    message(StatusCode::METHOD_NOT_ALLOWED, staff, "Not allowed", "This page does not accept that method.")
}

/// Whether a POST comes from the console's own pages: browsers name the
/// page's origin in `Origin`, which must then be this host (as the request
/// or `public_url` names it); `Origin: null`, which any page can make a
/// browser send, is refused. Without the header (older browsers, scripts)
/// the session cookie's SameSite=Strict and the CSRF token still hold; this
/// check also covers the sign-in form, which has no session yet.
fn same_origin<B>(app: &App, req: &Incoming<B>) -> bool {
    let Some(origin) = req.parts.headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host_of = |url: &str| {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        rest.split('/').next().unwrap_or("").to_ascii_lowercase()
    };
    let origin = host_of(origin);
    let host = req.parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
    host.is_some_and(|h| h == origin) || host_of(&app.config().public_url) == origin
}

/// The session id from the request's cookie.
fn cookie<B>(req: &Incoming<B>) -> Option<String> {
    req.parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(html::COOKIE)?.strip_prefix('='))
        .find(|v| !v.is_empty())
        .map(str::to_owned)
}

fn session<B>(app: &App, req: &Incoming<B>) -> Option<(String, Staff)> {
    let id = cookie(req)?;
    let staff = app.console().sessions().get(&id, Instant::now())?;
    Some((id, staff))
}

fn secure(app: &App) -> bool {
    app.config().public_url.starts_with("https://")
}

/// Reads an `application/x-www-form-urlencoded` body (what a form posts).
async fn form<B>(app: &App, req: Incoming<B>) -> Result<Vec<(String, String)>, ApiError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let content_type = req.header(header::CONTENT_TYPE).unwrap_or("").to_owned();
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if !(mime.is_empty() || mime == "application/x-www-form-urlencoded") {
        return Err(crate::http::unsupported(&content_type, "application/x-www-form-urlencoded"));
    }
    let bytes = req.bytes(app.config().max_body_bytes).await?;
    Ok(form_urlencoded::parse(&bytes).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `POST /console/sign-in`: every attempt takes a token from the
/// per-address limiter before the key is looked at, so guessing is
/// throttled and a refusal says nothing about whether a key was right.
async fn sign_in<B>(app: &App, req: Incoming<B>) -> Reply
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = client_addr(app, &req);
    // A sign-in replaces the browser's earlier session, if any.
    let earlier = cookie(&req);
    if let Err(wait) = app.limiter().check(addr, Instant::now()) {
        let wait = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        let text = "Too many sign-in attempts from your address. Wait a minute and try again.";
        let mut reply = page(StatusCode::TOO_MANY_REQUESTS, pages::sign_in(Some(text)));
        reply.headers_mut().insert(header::RETRY_AFTER, wait.into());
        return reply;
    }
    let fields = match form(app, req).await {
        Ok(f) => f,
        Err(e) => return page(e.status, pages::sign_in(Some(&e.message))),
    };
    let key = field(&fields, "key").unwrap_or("").trim();
    if app.keys().is_empty() {
        let text = "The console needs API keys: configure a support or admin key, then sign in with it.";
        return page(StatusCode::FORBIDDEN, pages::sign_in(Some(text)));
    }
    let header = format!("Bearer {key}");
    match app.keys().authorize(Some(header.as_bytes()), Role::Support) {
        Ok(caller) => match app.console().sessions().open(&caller.name, caller.role, Instant::now()) {
            Ok(id) => {
                if let Some(earlier) = earlier {
                    app.console().sessions().close(&earlier);
                }
                let mut reply = redirect("/console/");
                let cookie =
                    html::session_cookie(&id, app.console().sessions().absolute().as_secs(), secure(app));
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    reply.headers_mut().insert(header::SET_COOKIE, v);
                }
                tracing::info!(staff = %caller.name, role = %caller.role, "console sign-in");
                reply
            }
            Err(e) => page(StatusCode::SERVICE_UNAVAILABLE, pages::sign_in(Some(&e))),
        },
        Err(Denied::Forbidden) => {
            tracing::warn!(client = %addr, "console sign-in refused: a sender key");
            page(
                StatusCode::FORBIDDEN,
                pages::sign_in(Some(
                    "This key cannot sign in: only support and admin keys may use the console.",
                )),
            )
        }
        Err(Denied::Unauthenticated) => {
            tracing::warn!(client = %addr, "console sign-in refused: not a configured key");
            page(StatusCode::UNAUTHORIZED, pages::sign_in(Some("That key is not a configured key.")))
        }
    }
}

/// Checks a posted form's CSRF token: `Some` is the refusal page.
fn csrf_refusal(staff: &Staff, fields: &[(String, String)]) -> Option<Reply> {
    if csrf::valid(staff, field(fields, "csrf")) {
        None
    } else {
        Some(message(
            StatusCode::FORBIDDEN,
            Some(staff),
            "Form refused",
            "This form did not carry this session's security token, so nothing was changed. \
             Reload the page and try again.",
        ))
    }
}

async fn sign_out<B>(app: &App, req: Incoming<B>, id: &str, staff: &Staff) -> Result<Reply, ApiError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let fields = form(app, req).await?;
    if let Some(refused) = csrf_refusal(staff, &fields) {
        return Ok(refused);
    }
    app.console().sessions().close(id);
    let mut reply = redirect("/console/sign-in");
    if let Ok(v) = HeaderValue::from_str(&html::cleared_cookie(secure(app))) {
        reply.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(reply)
}

/// What a search term names. Contact points (email, phone) slot in here
/// once they exist: they resolve to a customer id the same way.
enum Found {
    Customer(CustomerId),
    Nothing(String),
}

fn lookup(q: &str) -> Found {
    match CustomerId::parse(q.trim()) {
        Ok(c) => Found::Customer(c),
        Err(_) => {
            Found::Nothing(format!("{:?} is not a customer id: enter the customer's number.", q.trim()))
        }
    }
}

fn find<B>(req: &Incoming<B>, staff: &Staff) -> Reply {
    let query = req.parts.uri.query().unwrap_or("");
    match query_param(query, "q") {
        None => page(StatusCode::OK, pages::find(staff, "", None)),
        Some(q) => match lookup(&q) {
            Found::Customer(c) => redirect(&format!("/console/customers/{}", c.0)),
            Found::Nothing(why) => page(StatusCode::NOT_FOUND, pages::find(staff, &q, Some(&why))),
        },
    }
}

fn customer_id(raw: &str) -> Result<CustomerId, ApiError> {
    CustomerId::parse(&segment(raw)?).map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "not_found", e.0))
}

async fn customer_view(app: &App, customer: CustomerId) -> Result<CustomerView, ApiError> {
    let store = app.store().clone();
    let (services, records, events) =
        blocking(move || Ok((store.services()?, store.records(customer)?, store.customer_events(customer)?)))
            .await?;
    let index = app.index();
    Ok(CustomerView::build(customer, &services, &index, &records, events))
}

fn channel_names(app: &App) -> Vec<String> {
    app.index().channels().iter().map(ToString::to_string).collect()
}

async fn customer_page(
    app: &App,
    staff: &Staff,
    raw: &str,
    notice: Option<&str>,
    status: StatusCode,
) -> Result<Reply, ApiError> {
    let customer = customer_id(raw)?;
    let view = customer_view(app, customer).await?;
    Ok(page(status, pages::customer(staff, &view, &channel_names(app), notice)))
}

/// `POST /console/customers/C`: one change, reason required, the staff
/// member's name as actor, source `console`.
async fn change<B>(app: &App, req: Incoming<B>, staff: &Staff, raw: &str) -> Result<Reply, ApiError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let customer = customer_id(raw)?;
    let user_agent = req
        .parts
        .headers
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).chars().take(MAX_USER_AGENT).collect());
    let addr = client_addr(app, &req).to_string();
    let fields = form(app, req).await?;
    if let Some(refused) = csrf_refusal(staff, &fields) {
        return Ok(refused);
    }
    let parsed = (|| -> Result<Op, ApiError> {
        let scope = crate::http::preferences::parse_scope(
            app,
            field(&fields, "service").unwrap_or(""),
            field(&fields, "channel").unwrap_or(""),
        )?;
        let status = Status::parse(field(&fields, "status").unwrap_or(""))?;
        let reason = check_reason(field(&fields, "reason").map(|r| r.trim().to_owned()))?;
        if reason.is_none() {
            return Err(ApiError::bad_request(
                "reason_required",
                "Give a reason: it is recorded with the change.",
            ));
        }
        let origin = Origin {
            source: "console".into(),
            actor: staff.name.clone(),
            client_addr: Some(addr),
            user_agent,
        };
        Ok(Op::SetPreference { customer, scope, status, reason, origin })
    })();
    let written = match parsed {
        Ok(op) => app.writer().write(op).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match written {
        Ok(_) => Ok(redirect(&format!("/console/customers/{}", customer.0))),
        Err(e) => {
            let text = format!("Nothing was changed: {}", e.message);
            customer_page(app, staff, raw, Some(&text), e.status).await
        }
    }
}

async fn export(app: &App, raw: &str, json: bool) -> Result<Reply, ApiError> {
    let customer = customer_id(raw)?;
    let view = customer_view(app, customer).await?;
    Ok(if json {
        html::download("application/json", &format!("customer-{}.json", customer.0), view.to_json())
    } else {
        html::download("text/csv; charset=utf-8", &format!("customer-{}.csv", customer.0), view.to_csv())
    })
}

async fn services_list(app: &App) -> Result<Vec<crate::domain::Service>, ApiError> {
    let store = app.store().clone();
    blocking(move || Ok(store.services()?)).await
}

/// Opted-out customers per (service, channel): the index's cardinalities.
fn pair_counts(app: &App, services: &[crate::domain::Service]) -> Vec<pages::PairCount> {
    let index = app.index();
    services
        .iter()
        .map(|s| pages::PairCount {
            service: s.slug.to_string(),
            name: s.name.clone(),
            archived: s.archived,
            counts: index
                .channels()
                .iter()
                .map(|h| index.pair(s.slug.as_str(), h.as_str()).map_or(0, |p| p.len()))
                .collect(),
        })
        .collect()
}

fn last_seq(app: &App) -> u64 {
    *app.writer().applied().borrow()
}

async fn overview(app: &App, staff: &Staff) -> Result<Reply, ApiError> {
    let pairs = pair_counts(app, &services_list(app).await?);
    let (handle, last) = (app.clone(), last_seq(app));
    let days = blocking(move || {
        let mut tally = handle.console().tally.lock().expect("tally lock");
        Ok(tally.update(handle.store(), crate::domain::Micros::now(), last)?)
    })
    .await?;
    let body = pages::overview(staff, &channel_names(app), &pairs, &chart::render(&days));
    Ok(page(StatusCode::OK, body))
}

fn admin_only(staff: &Staff) -> Option<Reply> {
    (staff.role < Role::Admin).then(|| {
        message(StatusCode::FORBIDDEN, Some(staff), "Not allowed", "Service management needs an admin key.")
    })
}

/// `GET /console/services`: admin only; support staff are refused.
async fn services(
    app: &App,
    staff: &Staff,
    notice: Option<&str>,
    status: StatusCode,
) -> Result<Reply, ApiError> {
    if let Some(refused) = admin_only(staff) {
        return Ok(refused);
    }
    let list = services_list(app).await?;
    let counts = pair_counts(app, &list);
    let rows: Vec<services::ServiceRow<'_>> = list
        .iter()
        .zip(counts)
        .map(|(service, c)| services::ServiceRow { service, counts: c.counts })
        .collect();
    Ok(page(status, services::render(staff, &channel_names(app), &rows, notice)))
}

/// `POST /console/services` (create) and `POST /console/services/S`
/// (`action` = save, archive or restore); admin only, CSRF-checked.
async fn service_write<B>(
    app: &App,
    req: Incoming<B>,
    staff: &Staff,
    slug: Option<&str>,
) -> Result<Reply, ApiError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(refused) = admin_only(staff) {
        return Ok(refused);
    }
    let fields = form(app, req).await?;
    if let Some(refused) = csrf_refusal(staff, &fields) {
        return Ok(refused);
    }
    let (max_name, max_desc) = services::LIMITS;
    let op = (|| -> Result<Op, ApiError> {
        let name = field(&fields, "name").map(str::trim).filter(|n| !n.is_empty());
        let description = field(&fields, "description").map(str::trim);
        let actor = staff.name.clone();
        Ok(match slug {
            None => {
                let slug = crate::domain::ServiceSlug::parse(field(&fields, "slug").unwrap_or("").trim())?;
                let name = services::text("name", name.unwrap_or(slug.as_str()), max_name)?;
                let description = services::text("description", description.unwrap_or(""), max_desc)?;
                Op::CreateService { slug, name, description, actor }
            }
            Some(raw) => {
                let slug = crate::domain::ServiceSlug::parse(&segment(raw)?)?;
                let (name, description, archived) = match field(&fields, "action") {
                    Some("archive") => (None, None, Some(true)),
                    Some("restore") => (None, None, Some(false)),
                    _ => (
                        name.map(|n| services::text("name", n, max_name)).transpose()?,
                        description.map(|d| services::text("description", d, max_desc)).transpose()?,
                        None,
                    ),
                };
                Op::UpdateService { slug, name, description, archived, actor }
            }
        })
    })();
    match op {
        Ok(op) => match app.writer().write(op).await {
            Ok(_) => Ok(redirect("/console/services")),
            Err(e) => {
                let e = ApiError::from(e);
                services(app, staff, Some(&format!("Nothing was changed: {}", e.message)), e.status).await
            }
        },
        Err(e) => services(app, staff, Some(&format!("Nothing was changed: {}", e.message)), e.status).await,
    }
}

/// `GET /console/audit?…` and `/console/audit.csv?…`.
async fn audit_page<B>(app: &App, req: &Incoming<B>, staff: &Staff, csv: bool) -> Result<Reply, ApiError> {
    let filter = match audit::Filter::parse(req.parts.uri.query().unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return Ok(message(e.status, Some(staff), "Audit log", &e.message)),
    };
    let (store, last) = (app.store().clone(), last_seq(app));
    // The export reads the whole filtered log; a page reads a bounded part.
    let (limit, budget) =
        if csv { (audit::MAX_EXPORT, usize::MAX) } else { (audit::PAGE, audit::SCAN_BUDGET) };
    let scan_filter = filter.clone();
    let found = blocking(move || Ok(audit::scan(&store, &scan_filter, last, limit, budget)?)).await?;
    if csv {
        return Ok(html::download("text/csv; charset=utf-8", "audit.csv", audit::csv(&found.rows)));
    }
    Ok(page(StatusCode::OK, html::document("Audit log", Some(staff), &audit::render(&filter, &found))))
}
