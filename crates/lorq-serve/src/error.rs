use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The `error_type` values LoRAX/TGI clients map to their exception classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    Validation,
    Generation,
    IncompleteGeneration,
    Overloaded,
    /// Not a LoRAX type: clients fall back on the status code (404 NotFound, 401, 503).
    NotFound,
    Unauthorized,
    Unavailable,
}

/// An error answered to the client as `{"error": ..., "error_type": ...}` with a status code.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub error_type: ErrorType,
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_type: ErrorType,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: ErrorType, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
        }
    }

    /// A request the server refuses as given (422, like TGI's validation errors).
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::Validation,
            message,
        )
    }

    /// A body that is not JSON at all (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorType::Validation, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorType::NotFound, message)
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorType::Overloaded,
            message,
        )
    }

    pub fn generation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::Generation,
            message,
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Unavailable,
            message,
        )
    }

    /// The `error_type` as it appears on the wire (also the `err` label of the failure metric).
    pub fn kind(&self) -> &'static str {
        match self.error_type {
            ErrorType::Validation => "validation",
            ErrorType::Generation => "generation",
            ErrorType::IncompleteGeneration => "incomplete_generation",
            ErrorType::Overloaded => "overloaded",
            ErrorType::NotFound => "not_found",
            ErrorType::Unauthorized => "unauthorized",
            ErrorType::Unavailable => "unavailable",
        }
    }

    /// The JSON text of the error (also sent as an SSE event when a stream fails midway).
    pub fn body(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: &self.message,
            error_type: self.error_type,
        })
        .expect("serializing a string and an enum cannot fail")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response()
    }
}
