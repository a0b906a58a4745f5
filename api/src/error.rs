//! The API's one error type and its HTTP mapping.
//!
//! Every refusal is `{"error": {"code", "message", …}}` with a status chosen in exactly one
//! place ([`ApiError::status_code`]); the match is exhaustive, so a new kind of error forces a
//! decision about what the client sees.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON or a malformed id in the path.
    #[error("{message}")]
    BadRequest {
        message: String,
        field: Option<String>,
    },
    /// A batch upload with bad lines (1-based numbers; `errors` says what is wrong with the
    /// first of them). Nothing was created.
    #[error("{message}")]
    BadUpload {
        message: String,
        lines: Vec<usize>,
        errors: Vec<(usize, String)>,
    },
    /// Well-formed input with an invalid field.
    #[error("{message}")]
    Validation { field: String, message: String },
    /// Missing or invalid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials for someone else.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("this method is not allowed here")]
    MethodNotAllowed,
    /// The conversation already has an active run.
    #[error("the conversation already has an active run")]
    Busy { active_run_id: String },
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused { run_id: String },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// Over a per-user limit.
    #[error("{message}")]
    RateLimited {
        retry_after_secs: u64,
        message: String,
    },
    /// A dependency (Postgres, Redis) is unreachable.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure; details are logged, not shown.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            field: None,
        }
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } | Self::BadUpload { .. } => StatusCode::BAD_REQUEST,
            Self::Validation { .. } | Self::IdempotencyKeyReused { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Busy { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } | Self::BadUpload { .. } => "bad_request",
            Self::Validation { .. } => "validation_failed",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Busy { .. } => "conflict",
            Self::IdempotencyKeyReused { .. } => "idempotency_key_reused",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let mut error = Map::new();
        error.insert("code".into(), json!(self.code()));
        error.insert("message".into(), json!(self.to_string()));
        match &self {
            Self::Validation { field, .. }
            | Self::BadRequest {
                field: Some(field), ..
            } => {
                error.insert("field".into(), json!(field));
            }
            Self::BadUpload { lines, errors, .. } => {
                error.insert("lines".into(), json!(lines));
                let errors: Vec<Value> = errors
                    .iter()
                    .map(|(line, message)| json!({"line": line, "message": message}))
                    .collect();
                error.insert("errors".into(), Value::Array(errors));
            }
            Self::Busy { active_run_id } => {
                error.insert("active_run_id".into(), json!(active_run_id));
            }
            Self::IdempotencyKeyReused { run_id } => {
                error.insert("run_id".into(), json!(run_id));
            }
            Self::Internal(detail) => tracing::error!(%detail, "internal error"),
            Self::Unavailable(detail) => tracing::warn!(%detail, "dependency unavailable"),
            _ => {}
        }
        let retry_after = match &self {
            Self::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Self::Unavailable(_) => Some(1),
            _ => None,
        };
        let mut response = (status, Json(json!({ "error": Value::Object(error) }))).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Self::Unavailable(format!("database unavailable: {error}"))
            }
            other => Self::Internal(format!("database: {other}")),
        }
    }
}

impl From<conveyor_shared::events::EventError> for ApiError {
    fn from(error: conveyor_shared::events::EventError) -> Self {
        Self::Unavailable(error.to_string())
    }
}

/// The API's result type.
pub type ApiResult<T> = Result<T, ApiError>;
