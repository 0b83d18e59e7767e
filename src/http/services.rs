//! Services (register, list, read, rename, archive) and the channel list.

use bytes::Bytes;
use hyper::StatusCode;
use hyper::body::Body;
use serde::{Deserialize, Serialize};

use super::{Incoming, Reply, Result, authorize, blocking, json, segment};
use crate::app::App;
use crate::auth::Role;
use crate::domain::{MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, Service, ServiceSlug};
use crate::error::ApiError;
use crate::writer::{Applied, Op};

/// A service as the API shows it.
#[derive(Serialize)]
pub struct ServiceView {
    slug: String,
    name: String,
    description: String,
    archived: bool,
    created_at: String,
    updated_at: String,
}

impl From<&Service> for ServiceView {
    fn from(s: &Service) -> Self {
        ServiceView {
            slug: s.slug.to_string(),
            name: s.name.clone(),
            description: s.description.clone(),
            archived: s.archived,
            created_at: s.created_at.rfc3339(),
            updated_at: s.updated_at.rfc3339(),
        }
    }
}

/// `GET /v1/services`
pub async fn list<B>(app: &App, req: &Incoming<B>) -> Result<Reply> {
    authorize(app, req, Role::Sender)?;
    let store = app.store().clone();
    let services = blocking(move || Ok(store.services()?)).await?;
    let views: Vec<ServiceView> = services.iter().map(ServiceView::from).collect();
    Ok(json(StatusCode::OK, &serde_json::json!({ "services": views })))
}

/// `GET /v1/services/S`
pub async fn read<B>(app: &App, req: &Incoming<B>, s: &str) -> Result<Reply> {
    authorize(app, req, Role::Sender)?;
    let slug = ServiceSlug::parse(&segment(s)?)?;
    let store = app.store().clone();
    let key = slug.clone();
    match blocking(move || Ok(store.service(key.as_str())?)).await? {
        Some(service) => Ok(json(StatusCode::OK, &ServiceView::from(&service))),
        None => Err(ApiError::unknown_service(slug.as_str())),
    }
}

fn text(what: &str, value: String, max: usize) -> Result<String> {
    let n = value.chars().count();
    if n > max {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("{what} is {n} characters long; at most {max} are allowed"),
        ));
    }
    Ok(value)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    slug: ServiceSlug,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

/// `POST /v1/services` with `{"slug","name","description"}` → 201.
pub async fn create<B>(app: &App, req: Incoming<B>) -> Result<Reply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let caller = authorize(app, &req, Role::Admin)?;
    let body: CreateBody = req.json(app.config().max_body_bytes).await?;
    let name = text("name", body.name.unwrap_or_else(|| body.slug.to_string()), MAX_NAME_CHARS)?;
    let description = text("description", body.description.unwrap_or_default(), MAX_DESCRIPTION_CHARS)?;
    let op = Op::CreateService { slug: body.slug, name, description, actor: caller.name };
    match app.writer().write(op).await? {
        Applied::Service { service, .. } => Ok(json(StatusCode::CREATED, &ServiceView::from(&service))),
        Applied::Preference { .. } => unreachable!("a service write applies a service"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    archived: Option<bool>,
}

/// `PATCH /v1/services/S` with any of `name`, `description`, `archived`.
pub async fn update<B>(app: &App, req: Incoming<B>, s: &str) -> Result<Reply>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let caller = authorize(app, &req, Role::Admin)?;
    let slug = ServiceSlug::parse(&segment(s)?)?;
    let body: UpdateBody = req.json(app.config().max_body_bytes).await?;
    let name = body.name.map(|n| text("name", n, MAX_NAME_CHARS)).transpose()?;
    let description = body.description.map(|d| text("description", d, MAX_DESCRIPTION_CHARS)).transpose()?;
    let op = Op::UpdateService { slug, name, description, archived: body.archived, actor: caller.name };
    match app.writer().write(op).await? {
        Applied::Service { service, .. } => Ok(json(StatusCode::OK, &ServiceView::from(&service))),
        Applied::Preference { .. } => unreachable!("a service write applies a service"),
    }
}

/// `GET /v1/channels`
pub fn channels<B>(app: &App, req: &Incoming<B>) -> Result<Reply> {
    authorize(app, req, Role::Sender)?;
    let channels: Vec<String> = app.config().channels.iter().map(|c| c.to_string()).collect();
    Ok(json(StatusCode::OK, &serde_json::json!({ "channels": channels })))
}
