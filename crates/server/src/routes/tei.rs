//! text-embeddings-inference's `POST /embed`: `{"inputs", "normalize", "truncate", "dimensions"}`
//! -> `[[f32, ...], ...]`, TEI's error shape, and its `x-compute-time` / `x-total-time` headers.
//! Reference: https://github.com/huggingface/text-embeddings-inference/blob/v1.8.0/router/src/http/types.rs
//! (`EmbedRequest`: `truncate` defaults to false, `normalize` to true; an over-long input without
//! `truncate` is a validation error).

use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;

use crate::batcher::Embedding;
use crate::error::{ApiError, TeiError};
use crate::inputs::{self, OneOrMany};
use crate::AppState;

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
pub struct EmbedRequest {
    inputs: OneOrMany,
    #[serde(default = "yes")]
    normalize: bool,
    #[serde(default)]
    truncate: bool,
    dimensions: Option<usize>,
}

pub async fn embed(
    State(state): State<AppState>,
    body: Result<Json<EmbedRequest>, JsonRejection>,
) -> Result<(HeaderMap, Json<Vec<Embedding>>), TeiError> {
    let started = Instant::now();
    let Json(req) = body?;
    let inputs = req.inputs.into_vec();
    inputs::check_count(&state, &inputs, "inputs")?;
    if !req.truncate && state.encoder.has_text() {
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let counts = state.encoder.count_tokens(&refs).map_err(ApiError::from)?;
        if let Some(i) = counts.iter().position(|c| c.truncated) {
            let context = state.encoder.info().text_context_length.unwrap_or(0);
            return Err(ApiError::validation(format!(
                "inputs[{i}] is longer than the model's context of {context} tokens; \
                 send \"truncate\": true to cut it"
            ))
            .into());
        }
    }
    let computing = Instant::now();
    let vectors = inputs::embed_texts(&state, inputs).await?;
    let compute_ms = computing.elapsed().as_millis();
    let out = vectors
        .into_iter()
        .map(|v| inputs::finish(v, req.dimensions, req.normalize))
        .collect::<Result<Vec<_>, _>>()?;
    let mut headers = HeaderMap::new();
    headers.insert("x-compute-time", (compute_ms as u64).into());
    headers.insert(
        "x-total-time",
        (started.elapsed().as_millis() as u64).into(),
    );
    Ok((headers, Json(out)))
}
