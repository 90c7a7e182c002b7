//! Error kinds of the embedding service, the one place where they become HTTP
//! statuses, and their two JSON shapes: TEI's `{"error", "error_type"}` and
//! OpenAI's `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use surf_engine::QueueError;

/// What went wrong, as clients tell errors apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is well-formed JSON but asks for something invalid.
    Validation,
    /// The body is larger than `--payload-limit`.
    PayloadTooLarge,
    /// The body is not JSON, or not of the expected shape.
    MalformedJson,
    /// An input the tokenizer cannot take.
    Tokenizer,
    /// No input at all.
    Empty,
    /// `--max-concurrent-requests` are in flight already.
    Overloaded,
    /// A missing or wrong API key.
    Unauthorized,
    /// The engine failed on the batch holding this request.
    Backend,
    /// The engine is failing or shutting down.
    Unhealthy,
    /// The request names a model the service does not serve.
    ModelNotFound,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::Validation | ErrorKind::Tokenizer => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::MalformedJson | ErrorKind::Empty => StatusCode::BAD_REQUEST,
            ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Backend => StatusCode::FAILED_DEPENDENCY,
            ErrorKind::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ModelNotFound => StatusCode::NOT_FOUND,
        }
    }

    /// TEI's `error_type`, the variant name as TEI writes it.
    pub fn tei_type(self) -> &'static str {
        match self {
            ErrorKind::Validation | ErrorKind::PayloadTooLarge | ErrorKind::MalformedJson => {
                "Validation"
            }
            ErrorKind::Tokenizer => "Tokenizer",
            ErrorKind::Empty => "Empty",
            ErrorKind::Overloaded => "Overloaded",
            ErrorKind::Unauthorized => "Unauthorized",
            ErrorKind::Backend => "Backend",
            ErrorKind::Unhealthy => "Unhealthy",
            ErrorKind::ModelNotFound => "NotFound",
        }
    }

    /// OpenAI's error `type` and `code`.
    pub fn openai_type_and_code(self) -> (&'static str, Option<&'static str>) {
        match self {
            ErrorKind::Validation
            | ErrorKind::PayloadTooLarge
            | ErrorKind::MalformedJson
            | ErrorKind::Tokenizer
            | ErrorKind::Empty => ("invalid_request_error", None),
            ErrorKind::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            ErrorKind::Overloaded => ("rate_limit_error", Some("rate_limit_exceeded")),
            ErrorKind::Backend | ErrorKind::Unhealthy => ("server_error", None),
            ErrorKind::ModelNotFound => ("invalid_request_error", Some("model_not_found")),
        }
    }

    /// The `error` label of `surf_http_requests_total` and logs.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Validation => "validation",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::MalformedJson => "malformed_json",
            ErrorKind::Tokenizer => "tokenizer",
            ErrorKind::Empty => "empty",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Backend => "backend",
            ErrorKind::Unhealthy => "unhealthy",
            ErrorKind::ModelNotFound => "model_not_found",
        }
    }
}

/// An error answer, before it takes one of the two JSON shapes.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, for OpenAI's `param`.
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub fn validation(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Validation,
            message: message.into(),
            param: Some(param),
        }
    }

    /// The TEI-shaped answer.
    pub fn tei(self) -> Response {
        let body = json!({ "error": self.message, "error_type": self.kind.tei_type() });
        (self.kind.status(), Json(body)).into_response()
    }

    /// The OpenAI-shaped answer.
    pub fn openai(self) -> Response {
        let (kind, code) = self.kind.openai_type_and_code();
        let body = json!({
            "error": { "message": self.message, "type": kind, "param": self.param, "code": code }
        });
        (self.kind.status(), Json(body)).into_response()
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        let kind = match &error {
            QueueError::Invalid(_) => ErrorKind::Validation,
            QueueError::Batch(_) | QueueError::Panicked(_) => ErrorKind::Backend,
            QueueError::Closed => ErrorKind::Unhealthy,
        };
        ApiError::new(kind, error.to_string())
    }
}

/// An error on a TEI route.
#[derive(Debug)]
pub struct TeiError(pub ApiError);

/// An error on an OpenAI route.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for TeiError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl IntoResponse for TeiError {
    fn into_response(self) -> Response {
        self.0.tei()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        self.0.openai()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_the_status_clients_expect() {
        let expected = [
            (ErrorKind::Validation, 422),
            (ErrorKind::Tokenizer, 422),
            (ErrorKind::PayloadTooLarge, 413),
            (ErrorKind::MalformedJson, 400),
            (ErrorKind::Empty, 400),
            (ErrorKind::Overloaded, 429),
            (ErrorKind::Unauthorized, 401),
            (ErrorKind::Backend, 424),
            (ErrorKind::Unhealthy, 503),
            (ErrorKind::ModelNotFound, 404),
        ];
        for (kind, status) in expected {
            assert_eq!(kind.status().as_u16(), status, "{kind:?}");
        }
    }
}
