//! OpenAI's `POST /v1/embeddings`, also served as infinity's `POST /embeddings` with its
//! `"modality": "image"` for images sent as data URLs or base64.
//! Shapes: https://platform.openai.com/docs/api-reference/embeddings/create and
//! https://github.com/michaelfeil/infinity (`OpenAIEmbeddingInput`, `modality`).

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ErrorKind, OpenAiError};
use crate::inputs::{self, OneOrMany};
use crate::AppState;

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    /// Little-endian f32, base64: the official OpenAI client's default.
    Base64,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    #[default]
    Text,
    Image,
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    input: OneOrMany,
    model: Option<String>,
    #[serde(default)]
    encoding_format: EncodingFormat,
    dimensions: Option<usize>,
    #[serde(default)]
    modality: Modality,
}

/// Refuses a request that names another model than the one served.
pub fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != state.config.model_name => Err(ApiError::new(
            ErrorKind::ModelNotFound,
            format!(
                "the model `{m}` is not served here; this server serves `{}`",
                state.config.model_name
            ),
        )
        .with_param("model")),
        _ => Ok(()),
    }
}

pub async fn openai(
    State(state): State<AppState>,
    body: Result<Json<EmbeddingsRequest>, JsonRejection>,
) -> Result<Json<Value>, OpenAiError> {
    let Json(req) = body?;
    check_model(&state, req.model.as_deref())?;
    let inputs = req.input.into_vec();
    inputs::check_count(&state, &inputs, "input")?;
    let (vectors, prompt_tokens) = match req.modality {
        Modality::Text => {
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            // Over-long texts are cut to the context length, as CLIP's processor does.
            let tokens: usize = if state.encoder.has_text() {
                state
                    .encoder
                    .count_tokens(&refs)
                    .map_err(ApiError::from)?
                    .iter()
                    .map(|c| c.tokens)
                    .sum()
            } else {
                0
            };
            (inputs::embed_texts(&state, inputs).await?, tokens)
        }
        Modality::Image => {
            let images = inputs::decode_images(&state, inputs, "input").await?;
            let usage: usize = images.iter().map(|i| inputs::image_usage(i.height)).sum();
            (inputs::embed_images(&state, images).await?, usage)
        }
    };
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let v = inputs::finish(v, req.dimensions, true)?;
            let embedding = match req.encoding_format {
                EncodingFormat::Float => json!(v),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            Ok(json!({"object": "embedding", "embedding": embedding, "index": i}))
        })
        .collect::<Result<Vec<Value>, ApiError>>()?;
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": state.config.model_name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })))
}
