//! The one error type at the edge. Each variant knows its HTTP status, OpenAI's error `type`
//! and `code`, and a static label for metrics; [`GatewayError::into_response`] is the single
//! place that turns an error into OpenAI's JSON shape. A provider's own JSON errors are not
//! here: those pass through with the provider's status and body; only a provider answer that
//! a client could not read as an error (no JSON, a redirect) becomes [`GatewayError::UpstreamAnswer`].

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the model `{0}` does not exist or you do not have access to it")]
    UnknownModel(String),
    #[error("no route for {0}")]
    NotFound(String),
    /// An admin change that the state of what it changes refuses (a name taken, a team that
    /// still has keys).
    #[error("{0}")]
    Conflict(String),
    /// A Responses API response this key may not see: unknown, expired or another key's.
    #[error("Response with id '{0}' not found.")]
    ResponseNotFound(String),
    #[error("incorrect API key provided")]
    InvalidApiKey,
    #[error("invalid admin token")]
    InvalidAdminToken,
    #[error("the admin API is disabled: set TOLLGATE_ADMIN_TOKEN to enable it")]
    AdminDisabled,
    #[error("the console session has ended (expired or signed out): sign in again")]
    SessionEnded,
    /// A console call that changes something without the session's CSRF token.
    #[error("{0}")]
    CsrfRefused(&'static str),
    #[error("cross-origin requests to the admin API with a console session are refused")]
    CrossOrigin,
    #[error("this key is not allowed to use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
        /// OpenAI's `type` for the limit that refused: `requests` or `tokens`.
        limit_kind: &'static str,
    },
    #[error("{message}")]
    InsufficientQuota { message: String },
    #[error("the upstream could not be reached: {0}")]
    UpstreamUnreachable(String),
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// The provider answered an error status without a JSON body, or a redirect. Keeps the
    /// provider's 4xx/5xx status (SDKs decide on retries by it); anything else is a 502.
    #[error("{message}")]
    UpstreamAnswer { status: StatusCode, message: String },
    /// The provider refused the gateway's own credentials (401/403): not the client's doing,
    /// and its body (about a key the client never sent) is for the operators' log only.
    #[error("the provider refused this gateway's credentials ({status}); the gateway's operators must fix its provider key — your API key is fine")]
    UpstreamCredentials { status: StatusCode },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// Too many client connections are open; this one serves operational endpoints only.
    #[error("the gateway is at its limit of open connections; please retry shortly")]
    AtConnectionBound,
    /// A request body paused longer than the gateway waits.
    #[error("the request body stopped arriving; send it without long pauses")]
    BodyTimeout,
    /// Strict durability: the answer is withheld because its usage record was not committed.
    #[error("the answer is withheld: its usage could not be recorded")]
    UsageNotRecorded,
    /// Shared state (Redis) is out of reach under `fail_closed`: no limit can be checked.
    #[error("the gateway cannot check this key's limits right now (shared state unreachable); please retry shortly")]
    StateUnavailable,
    #[error("internal error: {0}")]
    Internal(String),
}

/// The bodies of the admin API and outcome reports are read whole up to axum's default limit.
pub const SMALL_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// A small JSON body (admin, outcomes) as text, its refusals OpenAI-shaped like every other
/// error: too large is a 413, not UTF-8 or cut short a 400.
pub fn small_body(
    body: Result<String, axum::extract::rejection::StringRejection>,
) -> Result<String, GatewayError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => GatewayError::BodyTooLarge {
            limit: SMALL_BODY_LIMIT,
        },
        _ => GatewayError::bad_request(rejection.body_text()),
    })
}

impl GatewayError {
    pub fn bad_request(message: impl Into<String>) -> GatewayError {
        GatewayError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::UnknownModel(_)
            | GatewayError::NotFound(_)
            | GatewayError::ResponseNotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::InvalidApiKey
            | GatewayError::InvalidAdminToken
            | GatewayError::AdminDisabled
            | GatewayError::SessionEnded => StatusCode::UNAUTHORIZED,
            GatewayError::ModelNotAllowed(_)
            | GatewayError::CsrfRefused(_)
            | GatewayError::CrossOrigin => StatusCode::FORBIDDEN,
            GatewayError::RateLimited { .. } | GatewayError::InsufficientQuota { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            GatewayError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::UpstreamAnswer { status, .. }
                if status.is_client_error() || status.is_server_error() =>
            {
                *status
            }
            GatewayError::UpstreamAnswer { .. } | GatewayError::UpstreamCredentials { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::ShuttingDown
            | GatewayError::AtConnectionBound
            | GatewayError::UsageNotRecorded
            | GatewayError::StateUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    pub fn error_type(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. }
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::BodyTimeout
            | GatewayError::UnknownModel(_)
            | GatewayError::NotFound(_)
            | GatewayError::ResponseNotFound(_)
            | GatewayError::Conflict(_) => "invalid_request_error",
            GatewayError::InvalidApiKey
            | GatewayError::InvalidAdminToken
            | GatewayError::AdminDisabled
            | GatewayError::SessionEnded => "invalid_request_error",
            GatewayError::ModelNotAllowed(_)
            | GatewayError::CsrfRefused(_)
            | GatewayError::CrossOrigin => "permission_error",
            GatewayError::RateLimited { limit_kind, .. } => limit_kind,
            GatewayError::InsufficientQuota { .. } => "insufficient_quota",
            GatewayError::UpstreamAnswer { status, .. } if status.is_client_error() => {
                "invalid_request_error"
            }
            GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamAnswer { .. }
            | GatewayError::UpstreamCredentials { .. }
            | GatewayError::UpstreamTimeout
            | GatewayError::ShuttingDown
            | GatewayError::AtConnectionBound
            | GatewayError::UsageNotRecorded
            | GatewayError::StateUnavailable
            | GatewayError::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `error.code`; also the low-cardinality label used in metrics.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. } => "invalid_request",
            GatewayError::BodyTooLarge { .. } => "request_too_large",
            GatewayError::UnknownModel(_) => "model_not_found",
            GatewayError::NotFound(_) | GatewayError::ResponseNotFound(_) => "not_found",
            GatewayError::Conflict(_) => "conflict",
            GatewayError::InvalidApiKey => "invalid_api_key",
            GatewayError::InvalidAdminToken => "invalid_admin_token",
            GatewayError::AdminDisabled => "admin_disabled",
            GatewayError::SessionEnded => "session_ended",
            GatewayError::CsrfRefused(_) => "csrf_token_invalid",
            GatewayError::CrossOrigin => "cross_origin",
            GatewayError::ModelNotAllowed(_) => "model_not_allowed",
            GatewayError::RateLimited { .. } => "rate_limit_exceeded",
            GatewayError::InsufficientQuota { .. } => "insufficient_quota",
            GatewayError::UpstreamUnreachable(_) => "upstream_unreachable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::UpstreamAnswer { .. } => "upstream_error",
            GatewayError::UpstreamCredentials { .. } => "upstream_auth_failed",
            GatewayError::ShuttingDown => "shutting_down",
            GatewayError::AtConnectionBound => "connection_limit",
            GatewayError::BodyTimeout => "request_timeout",
            GatewayError::UsageNotRecorded => "usage_not_recorded",
            GatewayError::StateUnavailable => "state_unavailable",
            GatewayError::Internal(_) => "internal_error",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::BadRequest { param, .. } => *param,
            GatewayError::UnknownModel(_) | GatewayError::ModelNotAllowed(_) => Some("model"),
            _ => None,
        }
    }

    /// Whether retrying the same request later may succeed; drives `x-should-retry`.
    pub fn retryable(&self) -> bool {
        match self {
            GatewayError::UpstreamAnswer { .. } => {
                let status = self.status();
                status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
            }
            _ => matches!(
                self,
                GatewayError::RateLimited { .. }
                    | GatewayError::UpstreamUnreachable(_)
                    | GatewayError::UpstreamTimeout
                    | GatewayError::ShuttingDown
                    | GatewayError::AtConnectionBound
                    | GatewayError::StateUnavailable
            ),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.error_type(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        headers.insert(
            "x-should-retry",
            HeaderValue::from_static(if self.retryable() { "true" } else { "false" }),
        );
        if let GatewayError::RateLimited { retry_after, .. } = &self {
            // Whole seconds, rounded up: a client that waits exactly this long is admitted.
            let secs = retry_after.as_millis().div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                headers.insert(axum::http::header::RETRY_AFTER, value);
            }
            if let Ok(value) = HeaderValue::from_str(&retry_after.as_millis().to_string()) {
                headers.insert("retry-after-ms", value);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_errors_tell_sdks_not_to_retry() {
        let response = GatewayError::InsufficientQuota {
            message: "budget exhausted".into(),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["x-should-retry"], "false");
    }

    #[test]
    fn throttles_carry_retry_after_rounded_up() {
        let response = GatewayError::RateLimited {
            message: "slow down".into(),
            retry_after: Duration::from_millis(1200),
            limit_kind: "requests",
        }
        .into_response();
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["retry-after-ms"], "1200");
        assert_eq!(response.headers()["x-should-retry"], "true");
    }

    #[test]
    fn body_has_openai_shape() {
        let body = GatewayError::UnknownModel("x".into()).body();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}
