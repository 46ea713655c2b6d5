//! `POST /classify`: zero-shot labels for images, scored as the model's reference does (softmax over
//! labels for CLIP, a sigmoid per label for SigLIP) by `Encoder::zero_shot`.
//! `{"input": image | [images], "labels": [..], "template": "a photo of a {}."}` ->
//! `{"data": [{"index": 0, "labels": [{"label", "score"}, ...best first]}], "model"}`.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ErrorKind, OpenAiError};
use crate::inputs::{self, OneOrMany};
use crate::routes::embeddings::check_model;
use crate::AppState;

fn default_template() -> String {
    "a photo of a {}.".into()
}

#[derive(Debug, Deserialize)]
pub struct ClassifyRequest {
    input: OneOrMany,
    labels: Vec<String>,
    #[serde(default = "default_template")]
    template: String,
    model: Option<String>,
}

pub async fn classify(
    State(state): State<AppState>,
    body: Result<Json<ClassifyRequest>, JsonRejection>,
) -> Result<Json<Value>, OpenAiError> {
    let Json(req) = body?;
    check_model(&state, req.model.as_deref())?;
    if !state.encoder.has_text() {
        return Err(ApiError::validation(format!(
            "{} has no text tower: zero-shot labels need an image-text model such as CLIP or SigLIP",
            state.config.model_name
        ))
        .into());
    }
    if req.labels.iter().all(|l| l.trim().is_empty()) {
        return Err(ApiError::new(
            ErrorKind::Empty,
            "`labels` is empty: give at least one label",
        )
        .with_param("labels")
        .into());
    }
    let images = req.input.into_vec();
    inputs::check_count(&state, &images, "input")?;
    let pixels = inputs::decode_images(&state, images, "input").await?;
    let embeddings = inputs::embed_images(&state, pixels).await?;
    let enc = state.encoder.clone();
    let labels = req.labels.clone();
    let template = req.template;
    // The label prompts run through the text tower on the blocking pool, not the async runtime.
    let probs = tokio::task::spawn_blocking(move || -> Result<Vec<Vec<f32>>, ApiError> {
        let n = embeddings.len();
        let d = embeddings.first().map_or(0, Vec::len);
        let t =
            candle_core::Tensor::from_vec(embeddings.concat(), (n, d), &candle_core::Device::Cpu)
                .map_err(|e| ApiError::new(ErrorKind::Backend, e.to_string()))?;
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        enc.zero_shot(&t, &refs, &template)?
            .to_vec2::<f32>()
            .map_err(|e| ApiError::new(ErrorKind::Backend, e.to_string()))
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Backend, format!("classification failed: {e}")))??;
    let data: Vec<Value> = probs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let labels: Vec<Value> = order
                .iter()
                .map(|&j| json!({"label": req.labels[j], "score": p[j]}))
                .collect();
            json!({"index": i, "labels": labels})
        })
        .collect();
    Ok(Json(
        json!({"data": data, "model": state.config.model_name}),
    ))
}
