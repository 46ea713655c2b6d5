//! `GET /` (the web page), `/health`, `/metrics` (Prometheus) and `/openapi.json`. The page and the
//! OpenAPI document are embedded in the binary.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::AppState;

const PAGE: &str = include_str!("../../static/index.html");
const OPENAPI: &str = include_str!("../../static/openapi.json");

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// 200 while the model thread runs, 503 once it is gone.
pub async fn health(State(state): State<AppState>) -> Response {
    let alive = state.model_alive();
    let status = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if alive { "ok" } else { "model worker stopped" },
        "model": state.config.model_name,
        "index": state.index.is_some(),
        "queue_depth": state.metrics.queue_depth(),
    });
    (status, Json(body)).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
