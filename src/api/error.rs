//! The error bodies of the HTTP API: the auth server's documented envelope
//! `{"success": false, "error": {"code": ..., "message": ...}}` and its status codes.
//!
//! Owns what a client is told when a request fails. Internal causes (database errors) are
//! logged here and never put in a body: a client sees no SQL, no path and no stack trace.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

/// The documented message of a 401.
pub const UNAUTHORIZED_MESSAGE: &str = "Invalid or missing API key";
/// The documented message of a 403.
pub const FORBIDDEN_MESSAGE: &str = "API key does not have permission for this resource";

/// Why a request failed, as the client may know it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing, malformed, unknown or wrongly signed key (or admin token).
    #[error("{UNAUTHORIZED_MESSAGE}")]
    Unauthorized,
    #[error("API key has expired")]
    ExpiredKey,
    #[error("API key has been revoked")]
    RevokedKey,
    /// Another organization, an MCP outside the key's access, or a missing scope.
    #[error("{FORBIDDEN_MESSAGE}")]
    Forbidden,
    #[error("too many failed authentication attempts; retry after {retry_after} seconds")]
    RateLimited { retry_after: u64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request took too long")]
    Timeout,
    /// A failure of keywatch itself; the cause is logged, not shown.
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl ApiError {
    /// The documented code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::ExpiredKey => "expired_key",
            ApiError::RevokedKey => "revoked_key",
            ApiError::Forbidden => "forbidden",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Timeout => "timeout",
            ApiError::Internal(_) => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized | ApiError::ExpiredKey | ApiError::RevokedKey => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether this failure counts towards the per-IP limit of failed authentications.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            ApiError::Unauthorized | ApiError::ExpiredKey | ApiError::RevokedKey
        )
    }

    /// The body, with its fields in the documented order.
    pub fn body(&self) -> String {
        let text = |s: &str| serde_json::Value::from(s).to_string();
        format!(
            r#"{{"success":false,"error":{{"code":{},"message":{}}}}}"#,
            text(self.code()),
            text(&self.to_string())
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::Internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = %e, "An API request failed.");
        }
        let mut r = (
            self.status(),
            [(header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response();
        if let ApiError::RateLimited { retry_after } = self {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_documented_ones() {
        assert_eq!(
            ApiError::Unauthorized.body(),
            r#"{"success":false,"error":{"code":"unauthorized","message":"Invalid or missing API key"}}"#
        );
        assert_eq!(
            ApiError::Forbidden.body(),
            r#"{"success":false,"error":{"code":"forbidden","message":"API key does not have permission for this resource"}}"#
        );
        let internal = ApiError::Internal(StoreError::Invalid("SELECT secret FROM x".into()));
        assert!(!internal.body().contains("SELECT"));
    }
}
