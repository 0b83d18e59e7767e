//! A customer's preferences and the audit trail: view, change, export, import.

use bytes::Bytes;
use hyper::StatusCode;
use hyper::body::Body;
use serde::{Deserialize, Serialize};

use super::{Incoming, Reply, Result, authorize, blocking, json, query_param, segment};
use crate::app::App;
use crate::auth::Role;
use crate::domain::{CustomerId, Origin, PreferenceChange, Record, Scope, Status, check_reason};
use crate::error::ApiError;
use crate::writer::{Applied, Op};

/// Most audit entries in one page.
pub const MAX_AUDIT_PAGE: usize = 10_000;
/// Most rows in one import request.
pub const MAX_IMPORT_ROWS: usize = 10_000;

/// An explicit record as the API shows it.
#[derive(Serialize)]
pub struct RecordView {
    service: String,
    channel: String,
    status: Status,
    reason: Option<String>,
    source: String,
    created_at: String,
    updated_at: String,
    seq: u64,
}

impl RecordView {
    fn new(scope: &Scope, r: &Record) -> RecordView {
        RecordView {
            service: scope.service.to_string(),
            channel: scope.channel.to_string(),
            status: r.status,
            reason: r.reason.clone(),
            source: r.source.clone(),
            created_at: r.created_at.rfc3339(),
            updated_at: r.updated_at.rfc3339(),
            seq: r.seq,
        }
    }
}

/// An audit entry as the API (and the NDJSON export) shows it.
#[derive(Serialize)]
pub struct AuditView {
    seq: u64,
    at: String,
    customer: CustomerId,
    service: String,
    channel: String,
    before: Option<Status>,
    after: Status,
    reason: Option<String>,
    source: String,
    actor: String,
    client_addr: Option<String>,
    user_agent: Option<String>,
}

impl AuditView {
    /// The view of one stored change.
    pub fn new(seq: u64, c: PreferenceChange) -> AuditView {
        AuditView {
            seq,
            at: c.at.rfc3339(),
            customer: c.customer,
            service: c.scope.service.to_string(),
            channel: c.scope.channel.to_string(),
            before: c.before,
            after: c.after,
            reason: c.reason,
            source: c.origin.source,
            actor: c.origin.actor,
            client_addr: c.origin.client_addr,
            user_agent: c.origin.user_agent,
        }
    }
}

#[derive(Serialize)]
struct Effective {
    service: String,
    channel: String,
    status: Status,
    allowed: bool,
}

#[derive(Serialize)]
struct PreferencesView {
    customer: CustomerId,
    effective: Vec<Effective>,
    records: Vec<RecordView>,
}

fn customer(raw: &str) -> Result<CustomerId> {
    Ok(CustomerId::parse(&segment(raw)?)?)
}

/// `GET /v1/customers/C/preferences`: effective status of every pair, and
/// the explicit records behind it.
pub async fn get<B>(app: &App, req: &Incoming<B>, c: &str) -> Result<Reply> {
    authorize(app, req, Role::Support)?;
    let customer = customer(c)?;
    let store = app.store().clone();
    let records = blocking(move || Ok(store.records(customer)?)).await?;
    let effective = {
        let index = app.index();
        index
            .iter_pairs()
            .map(|(s, h, set)| {
                let out = set.contains(customer.0);
                Effective {
                    service: s.to_string(),
                    channel: h.to_string(),
                    status: if out { Status::OptedOut } else { Status::OptedIn },
                    allowed: !out,
                }
            })
            .collect()
    };
    let records = records.iter().map(|(scope, r)| RecordView::new(scope, r)).collect();
    Ok(json(StatusCode::OK, &PreferencesView { customer, effective, records }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Serialize)]
struct PutAnswer {
    customer: CustomerId,
    #[serde(flatten)]
    record: RecordView,
}

/// `PUT /v1/customers/C/preferences/S/H` with `{"status","reason"}`.
pub async fn put<B>(app: &App, req: Incoming<B>, c: &str, s: &str, h: &str) -> Result<Reply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let caller = authorize(app, &req, Role::Support)?;
    let customer = customer(c)?;
    let scope = parse_scope(app, &segment(s)?, &segment(h)?)?;
    let body: PutBody = req.json(app.config().max_body_bytes).await?;
    let status = Status::parse(&body.status)?;
    let reason = check_reason(body.reason)?;
    crate::auth::require_reason(&caller, reason.as_deref())?;
    let origin = Origin { source: "api".into(), actor: caller.name, client_addr: None, user_agent: None };
    match app.writer().write(Op::SetPreference { customer, scope, status, reason, origin }).await? {
        Applied::Preference { scope, record, .. } => {
            Ok(json(StatusCode::OK, &PutAnswer { customer, record: RecordView::new(&scope, &record) }))
        }
        Applied::Service { .. } => unreachable!("a preference write applies a preference"),
    }
}

/// Parses a scope and checks the named service and channel exist, so the
/// caller hears 404 before the write queue is involved.
pub fn parse_scope(app: &App, service: &str, channel: &str) -> Result<Scope> {
    let scope = Scope::parse(service, channel)?;
    let index = app.index();
    // In cluster mode a service created through another sidecar may not be
    // applied here yet: PostgreSQL validates it inside the write instead.
    if let Some(s) = scope.service.one()
        && app.cluster().is_none()
        && index.service_pos(s.as_str()).is_none()
    {
        return Err(ApiError::unknown_service(s.as_str()));
    }
    if let Some(h) = scope.channel.one()
        && index.channel_pos(h.as_str()).is_none()
    {
        return Err(ApiError::unknown_channel(h.as_str()));
    }
    Ok(scope)
}

#[derive(Serialize)]
struct AuditPage {
    entries: Vec<AuditView>,
    /// Pass as `after` to get the next page; equal to `after` when done.
    next_after: u64,
}

/// `GET /v1/customers/C/audit`: that customer's entries, oldest first.
pub async fn customer_audit<B>(app: &App, req: &Incoming<B>, c: &str) -> Result<Reply> {
    authorize(app, req, Role::Support)?;
    let customer = customer(c)?;
    let store = app.store().clone();
    let events = blocking(move || Ok(store.customer_events(customer)?)).await?;
    let entries: Vec<AuditView> = events.into_iter().map(|(seq, c)| AuditView::new(seq, c)).collect();
    #[derive(Serialize)]
    struct CustomerAudit {
        customer: CustomerId,
        entries: Vec<AuditView>,
    }
    Ok(json(StatusCode::OK, &CustomerAudit { customer, entries }))
}

/// `GET /v1/audit?after=SEQ&limit=N`: every preference change after SEQ.
pub async fn audit<B>(app: &App, req: &Incoming<B>) -> Result<Reply> {
    authorize(app, req, Role::Support)?;
    let query = req.parts.uri.query().unwrap_or("");
    let number = |name: &str, default: u64| -> Result<u64> {
        match query_param(query, name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                ApiError::bad_request(
                    "invalid_parameter",
                    format!("{name} must be an unsigned integer, not {v:?}"),
                )
            }),
        }
    };
    let after = number("after", 0)?;
    let limit = number("limit", 1000)?;
    if limit == 0 || limit > MAX_AUDIT_PAGE as u64 {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!("limit must be between 1 and {MAX_AUDIT_PAGE}"),
        ));
    }
    let store = app.store().clone();
    let events = blocking(move || Ok(store.events_after(after, limit as usize)?)).await?;
    let next_after = events.last().map_or(after, |(seq, _)| *seq);
    let entries = events
        .into_iter()
        .filter_map(|(seq, e)| match e {
            crate::domain::Event::Preference(c) => Some(AuditView::new(seq, c)),
            crate::domain::Event::Service(_) | crate::domain::Event::Recovery(_) => None,
        })
        .collect();
    Ok(json(StatusCode::OK, &AuditPage { entries, next_after }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportItem {
    customer: CustomerId,
    service: String,
    channel: String,
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/preferences/import` with `{"items":[{customer, service,
/// channel, status, reason}, …]}`: each item is validated and written on
/// its own (source `import`); the answer lists, in order, either the
/// item's sequence number or its error.
pub async fn import<B>(app: &App, req: Incoming<B>) -> Result<Reply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let caller = authorize(app, &req, Role::Admin)?;
    super::require_json(req.header(hyper::header::CONTENT_TYPE))?;
    let bytes = req.bytes(app.config().max_bulk_body_bytes).await?;
    // Both limits hold: the fixed per-request cap and the configured
    // `max_batch_items` ("rows in one import request"); the parse stops at
    // the first row over them.
    let max_rows = MAX_IMPORT_ROWS.min(app.config().max_batch_items);
    // Parsed on a blocking thread: a body of up to max_bulk_body_bytes
    // would otherwise hold an async worker.
    let items: Vec<serde_json::Value> =
        blocking(move || super::bulk::parse_list(super::utf8(&bytes)?, "items", max_rows, "items")).await?;
    let mut results: Vec<Option<serde_json::Value>> = vec![None; items.len()];
    let mut ops = Vec::new();
    let mut positions = Vec::new();
    for (i, raw) in items.into_iter().enumerate() {
        let op = serde_json::from_value::<super::Object<ImportItem>>(raw)
            .map(|o| o.0)
            .map_err(ApiError::from)
            .and_then(|item| {
                let scope = parse_scope(app, &item.service, &item.channel)?;
                Ok(Op::SetPreference {
                    customer: item.customer,
                    scope,
                    status: Status::parse(&item.status)?,
                    reason: check_reason(item.reason)?,
                    origin: Origin {
                        source: "import".into(),
                        actor: caller.name.clone(),
                        client_addr: None,
                        user_agent: None,
                    },
                })
            });
        match op {
            Ok(op) => {
                ops.push(op);
                positions.push(i);
            }
            Err(e) => results[i] = Some(error_value(&e)),
        }
    }
    for (i, outcome) in positions.into_iter().zip(app.writer().write_many(ops).await) {
        results[i] = Some(match outcome {
            Ok(Applied::Preference { seq, .. }) => serde_json::json!({ "seq": seq }),
            Ok(Applied::Service { .. }) => unreachable!("a preference write applies a preference"),
            Err(e) => error_value(&ApiError::from(e)),
        });
    }
    let results: Vec<serde_json::Value> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| error_value(&ApiError::from(crate::writer::WriteError::Closed))))
        .collect();
    let accepted = results.iter().filter(|r| r.get("seq").is_some()).count();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "accepted": accepted, "rejected": results.len() - accepted, "results": results }),
    ))
}

fn error_value(e: &ApiError) -> serde_json::Value {
    serde_json::json!({ "error": { "code": e.code, "message": e.message } })
}
