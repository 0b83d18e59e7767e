//! The send-time questions: one check, a batch of checks, and filtering a
//! recipient list (JSON or a 32-bit portable roaring bitmap).

use bytes::Bytes;
use hyper::StatusCode;
use hyper::body::Body;
use hyper::header;
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use super::{Incoming, Reply, Result, authorize, bulk, bytes_reply, json, required_param, unsupported};
use crate::app::App;
use crate::auth::Role;
use crate::domain::CustomerId;
use crate::error::ApiError;
use crate::index::split_into;

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

/// Ids (or checks) answered per hold of the index's read lock. A writer
/// waiting for the lock waits at most one chunk (about a millisecond or
/// two), and so do the readers queued behind it (std's `RwLock` lets no new
/// reader past a waiting writer).
pub const CHUNK: usize = 65_536;

/// Bodies up to this size are answered on the async worker; larger ones on
/// a blocking thread, so a long parse does not hold up other connections.
const INLINE_MAX_BYTES: usize = 64 * 1024;

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

/// Runs `f` here for a small body, else on a blocking thread.
async fn sized<T, F>(len: usize, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    if len <= INLINE_MAX_BYTES { f() } else { super::blocking(f).await }
}

/// `POST /v1/check` with `{"checks":[…]}` → `{"results":[…]}` in order.
pub async fn batch<B>(app: &App, req: Incoming<B>) -> Result<Reply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    authorize(app, &req, Role::Sender)?;
    let limit = app.config().max_bulk_body_bytes;
    super::require_json(req.header(header::CONTENT_TYPE))?;
    let bytes = req.bytes(limit).await?;
    let app = app.clone();
    sized(bytes.len(), move || {
        let max = app.config().max_batch_items;
        let checks: Vec<super::Object<OneCheck<'_>>> =
            bulk::parse_list(super::utf8(&bytes)?, "checks", max, "checks")?;
        let results = answer_checks(&app, &checks)?;
        Ok(json(StatusCode::OK, &BatchAnswer { results }))
    })
    .await
}

/// Answers checks in order, [`CHUNK`] per hold of the index lock.
fn answer_checks(app: &App, checks: &[super::Object<OneCheck<'_>>]) -> Result<Vec<bool>> {
    let mut results = Vec::with_capacity(checks.len());
    // Consecutive checks usually share a pair: resolve it once per run, and
    // count each run's answers (pair position, allowed, suppressed) once.
    let mut runs: Vec<(usize, u64, u64)> = Vec::new();
    for (n, chunk) in checks.chunks(CHUNK).enumerate() {
        let index = app.index();
        let mut last: Option<(&str, &str, &crate::index::IdSet)> = None;
        for (j, super::Object(c)) in chunk.iter().enumerate() {
            let set = match last {
                Some((s, h, set)) if s == c.service && h == c.channel => set,
                _ => {
                    let pos = index.pair_pos(&c.service, &c.channel).map_err(|u| {
                        let e = ApiError::unknown(u, &c.service, &c.channel);
                        ApiError { message: format!("checks[{}]: {}", n * CHUNK + j, e.message), ..e }
                    })?;
                    let set = index.pair_by_pos(pos);
                    last = Some((&c.service, &c.channel, set));
                    if runs.last().is_none_or(|r| r.0 != pos) {
                        runs.push((pos, 0, 0));
                    }
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
    }
    for (pos, allowed, suppressed) in runs {
        app.metrics().count_checks(pos, allowed, suppressed);
    }
    Ok(results)
}

/// The JSON body of `POST /v1/filter` (public for `benches/filter.rs`; the
/// handler parses it with its cap through [`bulk::parse_list`]).
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
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    authorize(app, &req, Role::Sender)?;
    let query = req.parts.uri.query().unwrap_or("");
    let service = required_param(query, "service")?.into_owned();
    let channel = required_param(query, "channel")?.into_owned();
    // Fail fast on an unknown pair, before reading a large body.
    app.index().pair(&service, &channel).map_err(|u| ApiError::unknown(u, &service, &channel))?;
    let limit = app.config().max_bulk_body_bytes;
    let max = app.config().max_batch_items;
    let content_type = req.header(header::CONTENT_TYPE).map(str::to_owned);
    let is_roaring = content_type
        .as_deref()
        .is_some_and(|ct| ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case(ROARING));
    if !is_roaring
        && let Some(ct) = content_type.as_deref()
        && super::require_json(Some(ct)).is_err()
    {
        return Err(unsupported(ct, "application/json or application/vnd.roaring"));
    }
    let bytes = req.bytes(limit).await?;
    let app = app.clone();
    if is_roaring {
        // The header says how many ids the bitmap holds: refuse before
        // building it.
        if let Some(n) = bulk::roaring_cardinality(&bytes)
            && n > max as u64
        {
            return Err(bulk::too_many("customers", max));
        }
        return sized(bytes.len(), move || filter_roaring(&app, &service, &channel, &bytes, max)).await;
    }
    sized(bytes.len(), move || {
        let customers: Vec<CustomerId> =
            bulk::parse_list(super::utf8(&bytes)?, "customers", max, "customers")?;
        drop(bytes);
        let mut allowed = Vec::with_capacity(customers.len());
        let mut suppressed = Vec::new();
        let mut pos = 0;
        for chunk in customers.chunks(CHUNK) {
            let index = app.index();
            pos = index.pair_pos(&service, &channel).map_err(|u| ApiError::unknown(u, &service, &channel))?;
            split_into(index.pair_by_pos(pos), chunk, &mut allowed, &mut suppressed);
        }
        app.metrics().count_checks(pos, allowed.len() as u64, suppressed.len() as u64);
        app.metrics().observe_filter(false, customers.len() as u64);
        Ok(json(StatusCode::OK, &FilterAnswer { allowed, suppressed }))
    })
    .await
}

/// The roaring form of a filter: the allowed part of the recipients, as a
/// bitmap; the opted-out ones are found [`CHUNK`] ids per lock hold.
fn filter_roaring(app: &App, service: &str, channel: &str, bytes: &[u8], max: usize) -> Result<Reply> {
    let recipients = RoaringBitmap::deserialize_from(bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_bitmap",
            format!("the body is not a 32-bit roaring bitmap in the portable format: {e}"),
        )
    })?;
    if recipients.len() > max as u64 {
        return Err(bulk::too_many("customers", max));
    }
    let mut ids = recipients.iter();
    let mut opted_out = Vec::new();
    let pos = loop {
        let index = app.index();
        let pos = index.pair_pos(service, channel).map_err(|u| ApiError::unknown(u, service, channel))?;
        let set = index.pair_by_pos(pos);
        let mut n = 0;
        for id in ids.by_ref() {
            if set.contains(u64::from(id)) {
                opted_out.push(id);
            }
            n += 1;
            if n == CHUNK {
                break;
            }
        }
        if n < CHUNK {
            break pos;
        }
    };
    let opted_out =
        RoaringBitmap::from_sorted_iter(opted_out).expect("a roaring bitmap iterates in ascending order");
    let allowed = &recipients - &opted_out;
    let suppressed = opted_out.len();
    app.metrics().count_checks(pos, allowed.len(), suppressed);
    app.metrics().observe_filter(true, recipients.len());
    let mut out = Vec::with_capacity(allowed.serialized_size());
    allowed.serialize_into(&mut out).expect("write to Vec");
    let mut reply = bytes_reply(StatusCode::OK, ROARING, out);
    reply.headers_mut().insert("x-prefsd-allowed", allowed.len().into());
    reply.headers_mut().insert("x-prefsd-suppressed", suppressed.into());
    Ok(reply)
}
