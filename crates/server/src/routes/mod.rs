//! The routes, one file per API family.

mod classify;
mod embeddings;
mod meta;
mod search;
mod tei;

use axum::routing::{get, post};
use axum::Router;

use crate::AppState;

/// Routes that run the model: bounded by `--max-concurrent` and `--max-body-bytes`.
pub fn compute() -> Router<AppState> {
    Router::new()
        .route("/v1/embeddings", post(embeddings::openai))
        .route("/embeddings", post(embeddings::openai))
        .route("/embed", post(tei::embed))
        .route("/classify", post(classify::classify))
        .route("/search", post(search::search))
}

/// Everything else: never refused for load, so `/health` answers while the model is busy.
pub fn other() -> Router<AppState> {
    Router::new()
        .route("/", get(meta::page))
        .route("/health", get(meta::health))
        .route("/metrics", get(meta::metrics))
        .route("/openapi.json", get(meta::openapi))
        .route("/thumbnail", get(search::thumbnail))
}
