//! The one place errors become HTTP: [`ApiError`] carries a status, a
//! snake_case code and a sentence, and renders the contract's
//! `{"error":{"code","message"}}` body.

use std::fmt;

use hyper::StatusCode;

use crate::auth::Denied;
use crate::domain::InvalidInput;
use crate::index::Unknown;
use crate::store::StoreError;
use crate::writer::WriteError;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// A sentence for the person reading it.
    pub message: String,
}

impl ApiError {
    /// Builds one.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 for a path no route matches.
    pub fn no_route(path: &str) -> ApiError {
        let shown: String = path.chars().take(200).collect();
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route for {shown}"))
    }

    /// 404 for an unregistered service.
    pub fn unknown_service(slug: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "unknown_service", format!("no service {slug:?} is registered"))
    }

    /// 404 for an unconfigured channel.
    pub fn unknown_channel(channel: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_channel",
            format!("channel {channel:?} is not configured"),
        )
    }

    /// Maps an index miss.
    pub fn unknown(kind: Unknown, service: &str, channel: &str) -> ApiError {
        match kind {
            Unknown::Service => ApiError::unknown_service(service),
            Unknown::Channel => ApiError::unknown_channel(channel),
        }
    }

    /// 500 for a storage failure; the message names no internals beyond the error.
    pub fn storage(e: &StoreError) -> ApiError {
        tracing::error!(error = %e, "storage error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", format!("the store failed: {e}"))
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({"error": {"code": self.code, "message": self.message}}).to_string()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl From<InvalidInput> for ApiError {
    fn from(e: InvalidInput) -> Self {
        ApiError::bad_request("invalid_input", e.0)
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Unauthenticated => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send a configured API key as `Authorization: Bearer KEY`",
            ),
            Denied::Forbidden => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this API key's role may not do this")
            }
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let message = e.to_string();
        match e {
            WriteError::UnknownService(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_service", message),
            WriteError::UnknownChannel(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_channel", message),
            WriteError::Archived(_) => ApiError::new(StatusCode::CONFLICT, "service_archived", message),
            WriteError::ServiceExists(_) => ApiError::new(StatusCode::CONFLICT, "service_exists", message),
            WriteError::Store(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", message)
            }
            WriteError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", message)
            }
            WriteError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::storage(&e)
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => {
                ApiError::bad_request("invalid_field", format!("the JSON body does not fit: {e}"))
            }
            _ => ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}")),
        }
    }
}
