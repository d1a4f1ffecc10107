//! The one place that turns failures into HTTP responses:
//! `{"error": {"code", "message"}}` with a stable code. Internal error
//! text is logged, never sent.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kindred_store::StoreError;
use serde_json::json;
use tracing::error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u64>,
    /// Extra top-level fields of the body, such as a batch's rejected events.
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
            details: None,
        }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "the space is over its ingest rate; retry later",
            )
        }
    }

    /// Over the space's Profile API rate (Segment's `rate_limit_error`).
    pub fn profile_rate_limited(retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "the space is over its Profile API rate; retry later",
            )
        }
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "an internal error occurred; the request can be retried",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::not_found("not found"),
            StoreError::AlreadyExists => {
                Self::new(StatusCode::CONFLICT, "already_exists", "it already exists")
            }
            StoreError::Conflict => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                "a concurrent change got there first; retry the request",
            ),
            StoreError::Invalid(m) => Self::bad_request(m),
            StoreError::Config(m) => {
                error!(error = %m, "not configured");
                Self::new(StatusCode::NOT_IMPLEMENTED, "not_configured", m)
            }
            StoreError::Definition(d) => Self::bad_request(d.to_string()),
            StoreError::Service(_) => {
                error!(error = %e, "storage service failure");
                let mut unavailable = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "storage is temporarily unavailable; retry the request",
                );
                unavailable.retry_after_secs = Some(1);
                unavailable
            }
            other => {
                error!(error = %other, source = ?std::error::Error::source(&other), "store failure");
                Self::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some(serde_json::Value::Object(details)) = self.details {
            if let Some(map) = body.as_object_mut() {
                map.extend(details);
            }
        }
        let body = Json(body);
        let mut response = (self.status, body).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert("Retry-After", HeaderValue::from(secs));
        }
        response
    }
}

/// A page size from a query's `limit`: `default` when absent, else a whole
/// number from 1 to `max` (anything else is a 400 that says so).
pub(crate) fn limit_param(
    params: &std::collections::HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match params.get("limit") {
        None => Ok(default),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be a whole number from 1 to {max}"))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_the_status_that_tells_the_truth() {
        let status = |e: StoreError| ApiError::from(e).status;
        assert_eq!(status(StoreError::AlreadyExists), StatusCode::CONFLICT);
        assert_eq!(status(StoreError::Conflict), StatusCode::CONFLICT);
        assert_eq!(status(StoreError::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            status(StoreError::Invalid("bad".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(StoreError::Service("down".into())),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(StoreError::Invariant("broken")),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        // What the server did wrong is never the client's 400.
        assert_eq!(
            status(StoreError::Internal("SQS refused a message".into())),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "no");
        assert_eq!(
            status(StoreError::Io(io)),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            status(StoreError::Config("no secrets key".into())),
            StatusCode::NOT_IMPLEMENTED
        );
    }
}
