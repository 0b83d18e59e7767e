//! Opt-out links: issuing tokens, the web tier's redemption call, the
//! recipient's page (`GET /u/TOKEN`, which never changes anything) and its
//! form posts, including RFC 8058 one-click (`POST /u/TOKEN` with
//! `List-Unsubscribe=One-Click`).
//!
//! Recipients come first. The per-address rate limit slows down guessing,
//! so only failed attempts (a token that does not verify, a request with no
//! readable token) take from an address's budget, and only they are refused
//! once it is spent: a valid link always works, from any address — the web
//! tier forwards every recipient from its own. And a link used again for
//! the choice already in force writes nothing ([`set_once`]).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use bytes::Bytes;
use hyper::StatusCode;
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use serde::Deserialize;

use super::{Incoming, Reply, Result, authorize, blocking, bytes_reply, json, segment};
use crate::app::App;
use crate::auth::Role;
use crate::domain::{CustomerId, Origin, Record, Scope, Status, Target, check_reason};
use crate::error::ApiError;
use crate::metrics::{Redemption, Via};
use crate::page::{self, Manage, PairRow};
use crate::token::Claims;
use crate::writer::{Applied, Op};

/// Longest user agent kept in the audit log.
const MAX_USER_AGENT: usize = 256;

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The client's address: the direct peer, unless that peer is a trusted
/// proxy, in which case the right-most untrusted `X-Forwarded-For` entry.
pub fn client_addr<B>(app: &App, req: &Incoming<B>) -> IpAddr {
    let peer = req.peer.ip();
    let trusted = |ip: IpAddr| app.config().trusted_proxies.iter().any(|c| c.contains(ip));
    if !trusted(peer) {
        return peer;
    }
    let chain: Vec<&str> = req
        .parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    // Walk from the right. Some proxies write `ADDR:PORT`; an entry that is
    // no address at all ends the walk at the trusted hop that relayed it, so
    // a client-written entry to its left is never believed.
    let mut last = peer;
    for entry in chain.into_iter().rev() {
        let ip = entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()));
        match ip {
            Some(ip) if trusted(ip) => last = ip,
            Some(ip) => return ip,
            None => return last,
        }
    }
    last
}

fn origin<B>(app: &App, req: &Incoming<B>, source: &str) -> Origin {
    let user_agent = req
        .parts
        .headers
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).chars().take(MAX_USER_AGENT).collect());
    Origin {
        source: source.into(),
        actor: "recipient".into(),
        client_addr: Some(client_addr(app, req).to_string()),
        user_agent,
    }
}

/// A failed attempt from the client: takes from its address's budget;
/// `Err(seconds to wait)` once the budget is spent. (Refusals are counted
/// where every 429 is: `http::handle`.)
fn failed_attempt(app: &App, addr: IpAddr) -> std::result::Result<(), u64> {
    app.limiter().check(addr, Instant::now()).map_err(|wait| {
        // Rounded up: a client that honours Retry-After is not refused again.
        (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
    })
}

/// The JSON answer to a failed redemption: `e`, or 429 once the address has
/// failed too often.
fn refuse(app: &App, addr: IpAddr, e: ApiError) -> Result<Reply> {
    match failed_attempt(app, addr) {
        Ok(()) => Err(e),
        Err(wait) => {
            let e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many failed attempts from this address; try again later",
            );
            let mut reply = super::error_reply(&e);
            reply.headers_mut().insert(header::RETRY_AFTER, wait.into());
            Ok(reply)
        }
    }
}

/// Writes `status` for `scope`, unless it is already in force: the scope's
/// own record has that status and nothing newer overrides it anywhere the
/// scope reaches (see [`crate::index::Index::holds`]). Then nothing is
/// written and the record as stored answers, with its sequence number — a
/// link replayed by a scanner or a double click adds no audit entry.
///
/// Two identical requests at the same moment can both find the choice not
/// yet in force and both write (two entries, the same outcome). In cluster
/// mode this sidecar's copy may lag the shared log, and skipping on a stale
/// copy could undo a newer choice made elsewhere, so every use writes.
pub async fn set_once(
    app: &App,
    customer: CustomerId,
    scope: Scope,
    status: Status,
    reason: Option<String>,
    origin: Origin,
) -> Result<(u64, Scope, Record)> {
    if app.cluster().is_none() {
        let store = app.store().clone();
        let key = scope.clone();
        let current =
            blocking(move || Ok(store.records(customer)?.into_iter().find(|(s, _)| *s == key))).await?;
        if let Some((stored, record)) = current
            && record.status == status
            && app.index().holds(customer, &stored, status)
        {
            return Ok((record.seq, stored, record));
        }
    }
    match app.writer().write(Op::SetPreference { customer, scope, status, reason, origin }).await? {
        Applied::Preference { seq, scope, record } => Ok((seq, scope, record)),
        Applied::Service { .. } => unreachable!("a preference write applies a preference"),
    }
}

/// How a redemption's answer counts: written, refused for the token or the
/// request, refused because the token expired, or failed on the write.
fn redemption_result(status: StatusCode, expired: bool) -> Redemption {
    if status.is_success() {
        Redemption::Ok
    } else if expired {
        Redemption::Expired
    } else if status.is_server_error() || status == StatusCode::CONFLICT {
        Redemption::Error
    } else {
        Redemption::Invalid
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueBody {
    customer: CustomerId,
    service: String,
    channel: String,
}

/// `POST /v1/tokens`: a signed link for one customer and scope, with the
/// headers a sender adds to the message.
pub async fn issue<B>(app: &App, req: Incoming<B>) -> Result<Reply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    authorize(app, &req, Role::Sender)?;
    let body: IssueBody = req.json(app.config().max_body_bytes).await?;
    let scope = super::preferences::parse_scope(app, &body.service, &body.channel)?;
    let now = now_secs();
    let token = app
        .tokens()
        .issue(body.customer, &scope, now)
        .map_err(|e| ApiError::bad_request("token_too_long", e))?;
    let url = format!("{}/u/{token}", app.config().public_url);
    let expires =
        jiff::Timestamp::from_second((now + app.tokens().lifetime_secs()).min(i64::MAX as u64) as i64)
            .map(|t| t.to_string())
            .unwrap_or_default();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "token": token,
            "url": url,
            "headers": {
                "List-Unsubscribe": format!("<{url}>"),
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
            "expires_at": expires,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedeemBody {
    token: String,
    action: String,
    #[serde(default)]
    reason: Option<String>,
}

fn invalid_token() -> ApiError {
    ApiError::bad_request("invalid_token", "this link is invalid or has expired")
}

/// `POST /v1/tokens/redeem`: what the web tier forwards.
pub async fn redeem<B>(app: &App, req: Incoming<B>) -> Result<Reply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut expired = false;
    let result = redeem_token(app, req, &mut expired).await;
    let status = match &result {
        Ok(reply) => reply.status(),
        Err(e) => e.status,
    };
    if status != StatusCode::TOO_MANY_REQUESTS {
        app.metrics().count_redemption(Via::Redeem, redemption_result(status, expired));
    }
    result
}

async fn redeem_token<B>(app: &App, req: Incoming<B>, expired: &mut bool) -> Result<Reply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = client_addr(app, &req);
    let origin = origin(app, &req, "token");
    let body: RedeemBody = match req.json(app.config().max_body_bytes).await {
        Ok(body) => body,
        Err(e) => return refuse(app, addr, e),
    };
    let Ok(claims) = app.tokens().verify(&body.token, now_secs()) else {
        return refuse(app, addr, invalid_token());
    };
    let status = match body.action.as_str() {
        "opt_out" => Status::OptedOut,
        "opt_in" if !claims.expired => Status::OptedIn,
        "opt_in" => {
            *expired = true;
            return Err(invalid_token());
        }
        other => {
            return Err(ApiError::bad_request(
                "invalid_action",
                format!(
                    "action {:?} is neither opt_out nor opt_in",
                    other.chars().take(40).collect::<String>()
                ),
            ));
        }
    };
    let reason = check_reason(body.reason)?;
    let (seq, scope, record) = set_once(app, claims.customer, claims.scope, status, reason, origin).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "customer": claims.customer,
            "service": scope.service.to_string(),
            "channel": scope.channel.to_string(),
            "status": record.status,
            "seq": seq,
        }),
    ))
}

/// An HTML answer with the recipient pages' headers.
fn html(status: StatusCode, body: String) -> Reply {
    let mut reply = bytes_reply(status, "text/html; charset=utf-8", body);
    let h = reply.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert("x-robots-tag", HeaderValue::from_static("noindex, nofollow"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if let Ok(csp) = HeaderValue::from_str(&page::CSP) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    reply
}

fn invalid_page() -> Reply {
    html(StatusCode::NOT_FOUND, page::invalid())
}

fn too_many(wait: u64) -> Reply {
    let mut reply = html(StatusCode::TOO_MANY_REQUESTS, page::rate_limited());
    reply.headers_mut().insert(header::RETRY_AFTER, wait.into());
    reply
}

/// What the page shows for a token: its scope in words and every pair of
/// the customer's (archived services left out).
async fn manage_model(app: &App, claims: &Claims) -> Result<Manage> {
    let store = app.store().clone();
    let services = blocking(move || Ok(store.services()?)).await?;
    let service_label = match &claims.scope.service {
        Target::All => "all services".to_owned(),
        Target::One(s) => {
            services.iter().find(|x| &x.slug == s).map_or_else(|| s.to_string(), |x| x.name.clone())
        }
    };
    let channel_label = match &claims.scope.channel {
        Target::All => "any channel".to_owned(),
        Target::One(c) => c.to_string(),
    };
    let index = app.index();
    let mut pairs = Vec::new();
    for s in services.iter().filter(|s| !s.archived) {
        for c in index.channels() {
            if let Ok(set) = index.pair(s.slug.as_str(), c.as_str()) {
                pairs.push(PairRow {
                    key: format!("{}/{}", s.slug, c),
                    service_name: s.name.clone(),
                    channel: c.to_string(),
                    allowed: !set.contains(claims.customer.0),
                });
            }
        }
    }
    let offers_channel_wide =
        matches!(claims.scope.channel, Target::One(_)) && matches!(claims.scope.service, Target::One(_));
    Ok(Manage { service_label, channel_label, offers_channel_wide, pairs })
}

/// The page for a link that does not verify: the invalid-link page, or 429
/// once the address has failed too often.
fn refuse_page<B>(app: &App, req: &Incoming<B>) -> Reply {
    match failed_attempt(app, client_addr(app, req)) {
        Ok(()) => invalid_page(),
        Err(wait) => too_many(wait),
    }
}

/// `GET /u/TOKEN`: the page. Never changes anything.
pub async fn page_get<B>(app: &App, req: &Incoming<B>, raw: &str) -> Result<Reply> {
    let claims = segment(raw).ok().and_then(|token| app.tokens().verify(&token, now_secs()).ok());
    let claims = match claims {
        Some(c) if !c.expired => c,
        // An expired link is no guess: no budget is taken for it.
        Some(_) => return Ok(invalid_page()),
        None => return Ok(refuse_page(app, req)),
    };
    let model = manage_model(app, &claims).await?;
    Ok(html(StatusCode::OK, page::manage(&model)))
}

/// Reads a form body: `application/x-www-form-urlencoded` (also assumed when
/// no type is given) or `multipart/form-data`.
async fn form_fields<B>(app: &App, req: Incoming<B>) -> Result<Vec<(String, String)>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let content_type = req.header(header::CONTENT_TYPE).unwrap_or("").to_owned();
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let bytes = req.bytes(app.config().max_body_bytes).await?;
    match mime.as_str() {
        "" | "application/x-www-form-urlencoded" => {
            Ok(form_urlencoded::parse(&bytes).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
        }
        "multipart/form-data" => {
            let bad = |e: multer::Error| {
                ApiError::bad_request("invalid_form", format!("the multipart body could not be read: {e}"))
            };
            let boundary = multer::parse_boundary(&content_type).map_err(bad)?;
            let mut multipart = multer::Multipart::with_reader(&bytes[..], boundary);
            let mut fields = Vec::new();
            while let Some(field) = multipart.next_field().await.map_err(bad)? {
                let name = field.name().unwrap_or("").to_owned();
                let value = field.text().await.map_err(bad)?;
                fields.push((name, value));
            }
            Ok(fields)
        }
        _ => {
            Err(super::unsupported(&content_type, "application/x-www-form-urlencoded or multipart/form-data"))
        }
    }
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The scope a page form means: the token's own, or everything on its channel.
fn chosen_scope(claims: &Claims, choice: Option<&str>) -> Scope {
    match (choice, &claims.scope.channel) {
        (Some("channel"), Target::One(_)) => {
            Scope { service: Target::All, channel: claims.scope.channel.clone() }
        }
        _ => claims.scope.clone(),
    }
}

fn describe(scope: &Scope) -> String {
    match (&scope.service, &scope.channel) {
        (Target::One(s), Target::One(c)) => format!("{s} messages by {c}"),
        (Target::All, Target::One(c)) => format!("every message by {c}"),
        (Target::One(s), Target::All) => format!("every {s} message"),
        (Target::All, Target::All) => "every message".to_owned(),
    }
}

/// `POST /u/TOKEN`: RFC 8058 one-click, or one of the page's forms.
pub async fn page_post<B>(app: &App, req: Incoming<B>, raw: &str) -> Result<Reply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut expired = false;
    let result = page_action(app, req, raw, &mut expired).await;
    let status = match &result {
        Ok(reply) => reply.status(),
        Err(e) => e.status,
    };
    if status != StatusCode::TOO_MANY_REQUESTS {
        app.metrics().count_redemption(Via::Link, redemption_result(status, expired));
    }
    // Whatever fails behind a form is told to the person as a page, not JSON.
    Ok(result.unwrap_or_else(|e| html(e.status, page::done("That did not work", &e.message, None))))
}

async fn page_action<B>(app: &App, req: Incoming<B>, raw: &str, expired: &mut bool) -> Result<Reply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let claims = segment(raw).ok().and_then(|token| app.tokens().verify(&token, now_secs()).ok());
    let Some(claims) = claims else {
        return Ok(refuse_page(app, &req));
    };
    // A valid link is never rate limited: RFC 8058 POSTs come from mailbox
    // providers' servers, and the page's forms through the web tier, many
    // recipients behind one address.
    let page_origin = origin(app, &req, "token");
    let fields = match form_fields(app, req).await {
        Ok(f) => f,
        Err(e) => return Ok(html(e.status, page::done("That did not work", &e.message, None))),
    };
    let action = field(&fields, "action");
    let one_click = action.is_none() && field(&fields, "List-Unsubscribe") == Some("One-Click");
    let write = |scope: Scope, status: Status, reason: Option<String>, origin: Origin| {
        set_once(app, claims.customer, scope, status, reason, origin)
    };
    if one_click {
        let origin = Origin { source: "one_click".into(), ..page_origin };
        write(claims.scope.clone(), Status::OptedOut, None, origin).await?;
        return Ok(html(
            StatusCode::OK,
            page::done(
                "You are unsubscribed",
                &format!("You will no longer get {}.", describe(&claims.scope)),
                None,
            ),
        ));
    }
    match action {
        Some("opt_out") => {
            let scope = chosen_scope(&claims, field(&fields, "scope"));
            let reason = match (
                field(&fields, "reason").filter(|r| !r.is_empty()),
                field(&fields, "reason_text").map(str::trim).filter(|r| !r.is_empty()),
            ) {
                (Some(r), Some(t)) => Some(format!("{r}: {t}")),
                (Some(r), None) => Some(r.to_owned()),
                (None, Some(t)) => Some(t.to_owned()),
                (None, None) => None,
            };
            let reason = reason.map(|r| r.chars().take(crate::domain::MAX_REASON_CHARS).collect());
            write(scope.clone(), Status::OptedOut, reason, page_origin).await?;
            let choice = if scope == claims.scope { "token" } else { "channel" };
            Ok(html(
                StatusCode::OK,
                page::done(
                    "You are unsubscribed",
                    &format!("You will no longer get {}.", describe(&scope)),
                    (!claims.expired).then_some(&[("action", "opt_in"), ("scope", choice)][..]),
                ),
            ))
        }
        Some("opt_in") if !claims.expired => {
            let scope = chosen_scope(&claims, field(&fields, "scope"));
            write(scope.clone(), Status::OptedIn, None, page_origin).await?;
            let choice = if scope == claims.scope { "token" } else { "channel" };
            Ok(html(
                StatusCode::OK,
                page::done(
                    "You are subscribed again",
                    &format!("You will get {} again.", describe(&scope)),
                    Some(&[("action", "opt_out"), ("scope", choice)][..]),
                ),
            ))
        }
        Some("update") if !claims.expired => {
            let allow: HashSet<&str> =
                fields.iter().filter(|(k, _)| k == "allow").map(|(_, v)| v.as_str()).collect();
            // Each pair once, however often the form names it, and only the
            // pairs whose effective status changes.
            let shown: HashSet<&str> =
                fields.iter().filter(|(k, _)| k == "shown").map(|(_, v)| v.as_str()).collect();
            let mut changes = Vec::new();
            {
                let index = app.index();
                for key in shown {
                    let Some((s, c)) = key.split_once('/') else { continue };
                    let Ok(scope) = Scope::parse(s, c) else { continue };
                    let (Target::One(_), Target::One(_)) = (&scope.service, &scope.channel) else { continue };
                    let Ok(set) = index.pair(s, c) else { continue };
                    let wanted = allow.contains(key);
                    if wanted == set.contains(claims.customer.0) {
                        let status = if wanted { Status::OptedIn } else { Status::OptedOut };
                        changes.push(Op::SetPreference {
                            customer: claims.customer,
                            scope,
                            status,
                            reason: None,
                            origin: page_origin.clone(),
                        });
                    }
                }
            }
            let n = changes.len();
            for outcome in app.writer().write_many(changes).await {
                outcome?;
            }
            Ok(html(
                StatusCode::OK,
                page::done(
                    "Your choices are saved",
                    &format!(
                        "{n} setting{} changed. Open the link again to review them.",
                        if n == 1 { "" } else { "s" }
                    ),
                    None,
                ),
            ))
        }
        Some("opt_in" | "update") => {
            *expired = true;
            Ok(invalid_page())
        }
        _ => Ok(html(
            StatusCode::BAD_REQUEST,
            page::done("That did not work", "The form could not be understood. Open the link again.", None),
        )),
    }
}
