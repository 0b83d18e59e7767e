//! The send-time questions: one check, a batch of checks, and filtering a
//! recipient list (JSON or a 32-bit portable roaring bitmap).

use bytes::Bytes;
use hyper::StatusCode;
use hyper::body::Body;
use hyper::header;
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use super::{Incoming, Reply, Result, authorize, bytes_reply, json, required_param, unsupported};
use crate::app::App;
use crate::auth::Role;
use crate::domain::CustomerId;
use crate::error::ApiError;
use crate::index::{allowed_bitmap, split};

/// Media type of portable roaring bitmap bodies.
pub const ROARING: &str = "application/vnd.roaring";

#[derive(Serialize)]
struct CheckAnswer<'a> {
    customer: u64,
    service: &'a str,
    channel: &'a str,
    allowed: bool,
}

/// `GET /v1/check?customer=C&service=S&channel=H`
pub fn get<B>(app: &App, req: &Incoming<B>) -> Result<Reply> {
    authorize(app, req, Role::Sender)?;
    let query = req.parts.uri.query().unwrap_or("");
    let customer = CustomerId::parse(&required_param(query, "customer")?)?;
    let service = required_param(query, "service")?;
    let channel = required_param(query, "channel")?;
    let (pos, allowed) = {
        let index = app.index();
        let pos = index.pair_pos(&service, &channel).map_err(|u| ApiError::unknown(u, &service, &channel))?;
        (pos, !index.pair_by_pos(pos).contains(customer.0))
    };
    app.metrics().count_checks(pos, u64::from(allowed), u64::from(!allowed));
    Ok(json(
        StatusCode::OK,
        &CheckAnswer { customer: customer.0, service: &service, channel: &channel, allowed },
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest<'a> {
    #[serde(borrow)]
    checks: Vec<super::Object<OneCheck<'a>>>,
}

/// Slugs borrow from the body when they hold no escapes: no allocation per
/// check on the batch path.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OneCheck<'a> {
    customer: CustomerId,
    #[serde(borrow)]
    service: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    channel: std::borrow::Cow<'a, str>,
}

#[derive(Serialize)]
struct BatchAnswer {
    results: Vec<bool>,
}

/// `POST /v1/check` with `{"checks":[…]}` → `{"results":[…]}` in order.
pub async fn batch<B>(app: &App, req: Incoming<B>) -> Result<Reply>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    authorize(app, &req, Role::Sender)?;
    let limit = app.config().max_bulk_body_bytes;
    super::require_json(req.header(header::CONTENT_TYPE))?;
    let bytes = req.bytes(limit).await?;
    let body: BatchRequest<'_> = serde_json::from_str::<super::Object<_>>(super::utf8(&bytes)?)?.0;
    too_many(app, body.checks.len(), "checks")?;
    let index = app.index();
    let mut results = Vec::with_capacity(body.checks.len());
    // Consecutive checks usually share a pair: resolve it once per run, and
    // count each run's answers (pair position, allowed, suppressed) once.
    let mut runs: Vec<(usize, u64, u64)> = Vec::new();
    let mut last: Option<(&str, &str, &crate::index::IdSet)> = None;
    for (i, super::Object(c)) in body.checks.iter().enumerate() {
        let set = match last {
            Some((s, h, set)) if s == c.service && h == c.channel => set,
            _ => {
                let pos = index.pair_pos(&c.service, &c.channel).map_err(|u| {
                    let e = ApiError::unknown(u, &c.service, &c.channel);
                    ApiError { message: format!("checks[{i}]: {}", e.message), ..e }
                })?;
                let set = index.pair_by_pos(pos);
                last = Some((&c.service, &c.channel, set));
                runs.push((pos, 0, 0));
                set
            }
        };
        let allowed = !set.contains(c.customer.0);
        results.push(allowed);
        if let Some(run) = runs.last_mut() {
            if allowed {
                run.1 += 1;
            } else {
                run.2 += 1;
            }
        }
    }
    drop(index);
    for (pos, allowed, suppressed) in runs {
        app.metrics().count_checks(pos, allowed, suppressed);
    }
    Ok(json(StatusCode::OK, &BatchAnswer { results }))
}

fn too_many(app: &App, n: usize, what: &str) -> Result<()> {
    let max = app.config().max_batch_items;
    if n > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_items",
            format!("{n} {what} in one request; at most {max} are accepted"),
        ));
    }
    Ok(())
}

/// The JSON body of `POST /v1/filter` (public for `benches/filter.rs`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterRequest {
    /// The recipients, in the caller's order.
    pub customers: Vec<CustomerId>,
}

/// The JSON answer of `POST /v1/filter`.
#[derive(Serialize)]
pub struct FilterAnswer {
    /// Recipients who may be sent to, in input order.
    pub allowed: Vec<CustomerId>,
    /// Recipients who opted out, in input order.
    pub suppressed: Vec<CustomerId>,
}

/// `POST /v1/filter?service=S&channel=H`: JSON lists or roaring bitmaps.
pub async fn filter<B>(app: &App, req: Incoming<B>) -> Result<Reply>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    authorize(app, &req, Role::Sender)?;
    let query = req.parts.uri.query().unwrap_or("").to_owned();
    let service = required_param(&query, "service")?;
    let channel = required_param(&query, "channel")?;
    // Fail fast on an unknown pair, before reading a large body.
    app.index().pair(&service, &channel).map_err(|u| ApiError::unknown(u, &service, &channel))?;
    let limit = app.config().max_bulk_body_bytes;
    let content_type = req.header(header::CONTENT_TYPE).map(str::to_owned);
    let is_roaring = content_type
        .as_deref()
        .is_some_and(|ct| ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case(ROARING));
    if is_roaring {
        let bytes = req.bytes(limit).await?;
        let recipients = RoaringBitmap::deserialize_from(&bytes[..]).map_err(|e| {
            ApiError::bad_request(
                "invalid_bitmap",
                format!("the body is not a 32-bit roaring bitmap in the portable format: {e}"),
            )
        })?;
        too_many(app, usize::try_from(recipients.len()).unwrap_or(usize::MAX), "customers")?;
        let (pos, allowed) = {
            let index = app.index();
            let pos =
                index.pair_pos(&service, &channel).map_err(|u| ApiError::unknown(u, &service, &channel))?;
            (pos, allowed_bitmap(index.pair_by_pos(pos), &recipients))
        };
        let suppressed = recipients.len() - allowed.len();
        app.metrics().count_checks(pos, allowed.len(), suppressed);
        app.metrics().observe_filter(true, recipients.len());
        let mut out = Vec::with_capacity(allowed.serialized_size());
        allowed.serialize_into(&mut out).expect("write to Vec");
        let mut reply = bytes_reply(StatusCode::OK, ROARING, out);
        reply.headers_mut().insert("x-prefsd-allowed", allowed.len().into());
        reply.headers_mut().insert("x-prefsd-suppressed", suppressed.into());
        return Ok(reply);
    }
    if let Some(ct) = content_type.as_deref()
        && super::require_json(Some(ct)).is_err()
    {
        return Err(unsupported(ct, "application/json or application/vnd.roaring"));
    }
    let body: FilterRequest = req.json(limit).await?;
    too_many(app, body.customers.len(), "customers")?;
    let (pos, (allowed, suppressed)) = {
        let index = app.index();
        let pos = index.pair_pos(&service, &channel).map_err(|u| ApiError::unknown(u, &service, &channel))?;
        (pos, split(index.pair_by_pos(pos), &body.customers))
    };
    app.metrics().count_checks(pos, allowed.len() as u64, suppressed.len() as u64);
    app.metrics().observe_filter(false, body.customers.len() as u64);
    Ok(json(StatusCode::OK, &FilterAnswer { allowed, suppressed }))
}
