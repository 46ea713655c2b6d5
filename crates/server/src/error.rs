//! The service's error type and the one place where an error kind becomes an HTTP status, in the
//! error shape of each API family: OpenAI / infinity (`{"error": {"message", "type", "param",
//! "code"}}`) and TEI (`{"error": "...", "error_type": "..."}`).

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use visenc::image::ImageError;

/// What went wrong, independent of the API that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or an input cannot be used (bad JSON, a corrupt image, ...).
    Validation,
    /// The request has no inputs.
    Empty,
    /// The body or an image is larger than the configured limits.
    TooLarge,
    /// Every request slot is taken (`--max-concurrent`).
    Overloaded,
    /// The request names a model this server does not serve.
    ModelNotFound,
    /// The thing asked for does not exist (no index, a file not in the index).
    NotFound,
    /// The model failed on valid input, or its worker is gone.
    Backend,
}

/// An error answer: its kind and a message that names the offending input.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault (OpenAI's `param`), if one is.
    pub param: Option<&'static str>,
}

/// The error format of an API family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    OpenAi,
    Tei,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Validation, message)
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// The HTTP status of this error in an API family's convention (TEI answers validation
    /// errors with 422 and backend errors with 424; OpenAI with 400 and 500).
    pub fn status(&self, shape: Shape) -> StatusCode {
        use ErrorKind::*;
        match (self.kind, shape) {
            (Validation, Shape::OpenAi) => StatusCode::BAD_REQUEST,
            (Validation, Shape::Tei) => StatusCode::UNPROCESSABLE_ENTITY,
            (Empty, _) => StatusCode::BAD_REQUEST,
            (TooLarge, _) => StatusCode::PAYLOAD_TOO_LARGE,
            (Overloaded, _) => StatusCode::TOO_MANY_REQUESTS,
            (ModelNotFound, Shape::OpenAi) | (NotFound, _) => StatusCode::NOT_FOUND,
            (ModelNotFound, Shape::Tei) => StatusCode::UNPROCESSABLE_ENTITY,
            (Backend, Shape::OpenAi) => StatusCode::INTERNAL_SERVER_ERROR,
            (Backend, Shape::Tei) => StatusCode::FAILED_DEPENDENCY,
        }
    }

    /// The response in an API family's error shape.
    pub fn into_shaped(self, shape: Shape) -> Response {
        use ErrorKind::*;
        let status = self.status(shape);
        let body = match shape {
            Shape::OpenAi => {
                let (kind, code) = match self.kind {
                    Validation | Empty => ("invalid_request_error", None),
                    TooLarge => ("invalid_request_error", Some("payload_too_large")),
                    Overloaded => ("rate_limit_error", Some("overloaded")),
                    ModelNotFound => ("invalid_request_error", Some("model_not_found")),
                    NotFound => ("invalid_request_error", Some("not_found")),
                    Backend => ("server_error", None),
                };
                json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": code}})
            }
            Shape::Tei => {
                let kind = match self.kind {
                    Validation | TooLarge | ModelNotFound | NotFound => "validation",
                    Empty => "empty",
                    Overloaded => "overloaded",
                    Backend => "backend",
                };
                json!({"error": self.message, "error_type": kind})
            }
        };
        (status, Json(body)).into_response()
    }
}

impl From<visenc::Error> for ApiError {
    fn from(e: visenc::Error) -> Self {
        let kind = match &e {
            visenc::Error::Image(
                ImageError::TooLarge { .. } | ImageError::InputTooLarge { .. },
            ) => ErrorKind::TooLarge,
            visenc::Error::Image(_)
            | visenc::Error::Text(_)
            | visenc::Error::Input(_)
            | visenc::Error::EmptyLabels
            | visenc::Error::NoTextTower { .. } => ErrorKind::Validation,
            _ => ErrorKind::Backend,
        };
        Self::new(kind, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let kind = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::TooLarge,
            _ => ErrorKind::Validation,
        };
        Self::new(kind, r.body_text())
    }
}

/// An error answered in OpenAI's shape (also used by this server's own routes).
pub struct OpenAiError(pub ApiError);

/// An error answered in TEI's shape.
pub struct TeiError(pub ApiError);

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl<E: Into<ApiError>> From<E> for TeiError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        self.0.into_shaped(Shape::OpenAi)
    }
}

impl IntoResponse for TeiError {
    fn into_response(self) -> Response {
        self.0.into_shaped(Shape::Tei)
    }
}
