//! `POST /search` over the index (`{"text"}` or `{"image"}`, `"k"`), and `GET /thumbnail?path=...`,
//! which serves an image only if the index recorded exactly that path: a request can name no
//! other file (no traversal, no symlink games beyond what was indexed).

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

use crate::error::{ApiError, ErrorKind, OpenAiError};
use crate::inputs;
use crate::{AppState, SearchIndex};

const MAX_K: usize = 1000;

fn ten() -> usize {
    10
}

#[derive(Debug, Deserialize)]
pub struct SearchRequest {
    text: Option<String>,
    image: Option<String>,
    #[serde(default = "ten")]
    k: usize,
}

fn index(state: &AppState) -> Result<Arc<dyn SearchIndex>, ApiError> {
    state.index.clone().ok_or_else(|| {
        ApiError::new(
            ErrorKind::NotFound,
            "this server has no index: start it with `visenc serve --db PATH`",
        )
    })
}

/// The thumbnail URL of an indexed image.
fn thumbnail_url(path: &str) -> String {
    let mut out = String::from("/thumbnail?path=");
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub async fn search(
    State(state): State<AppState>,
    body: Result<Json<SearchRequest>, JsonRejection>,
) -> Result<Json<Value>, OpenAiError> {
    let Json(req) = body?;
    let idx = index(&state)?;
    if req.k == 0 || req.k > MAX_K {
        return Err(
            ApiError::validation(format!("`k` must be between 1 and {MAX_K}"))
                .with_param("k")
                .into(),
        );
    }
    let query = match (req.text, req.image) {
        (Some(t), None) => inputs::embed_texts(&state, vec![t]).await?,
        (None, Some(img)) => {
            let px = inputs::decode_images(&state, vec![img], "image").await?;
            inputs::embed_images(&state, px).await?
        }
        _ => {
            return Err(ApiError::validation("give exactly one of `text` and `image`").into());
        }
    };
    let query = inputs::finish(query.into_iter().next().unwrap_or_default(), None, true)?;
    if query.len() != idx.dimensions() {
        return Err(ApiError::validation(format!(
            "the model gives {}-d embeddings but the index holds {}-d ones",
            query.len(),
            idx.dimensions()
        ))
        .into());
    }
    // An index may read its database or rebuild its graph: off the async runtime.
    let k = req.k;
    let hits = tokio::task::spawn_blocking(move || idx.search(&query, k))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|e| ApiError::new(ErrorKind::Backend, format!("search failed: {e}")))?;
    let results: Vec<Value> = hits
        .iter()
        .map(|h| {
            json!({
                "path": h.path,
                "score": h.score,
                "thumbnail": thumbnail_url(&h.path),
            })
        })
        .collect();
    Ok(Json(
        json!({"results": results, "model": state.config.model_name}),
    ))
}

#[derive(Debug, Deserialize)]
pub struct ThumbnailQuery {
    path: String,
}

/// The content type of an image file, from its first bytes.
fn content_type(bytes: &[u8]) -> &'static str {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => "image/png",
        [0xFF, 0xD8, 0xFF, ..] => "image/jpeg",
        [b'G', b'I', b'F', b'8', ..] => "image/gif",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "image/webp",
        [b'B', b'M', ..] => "image/bmp",
        _ => "application/octet-stream",
    }
}

pub async fn thumbnail(
    State(state): State<AppState>,
    query: Result<Query<ThumbnailQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, OpenAiError> {
    let Query(q) = query.map_err(|e| ApiError::validation(e.body_text()))?;
    let idx = index(&state)?;
    let not_found = || ApiError::new(ErrorKind::NotFound, "no such image in the index");
    let path = q.path.clone();
    let recorded = tokio::task::spawn_blocking(move || idx.contains(&path))
        .await
        .unwrap_or(false);
    if !recorded {
        return Err(not_found().into());
    }
    let bytes = tokio::fs::read(&q.path).await.map_err(|_| not_found())?;
    Ok((
        [
            (header::CONTENT_TYPE, content_type(&bytes)),
            (header::CACHE_CONTROL, "max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnail_urls_escape_everything_but_plain_path_characters() {
        assert_eq!(
            thumbnail_url("/photos/a b&c=d?.png"),
            "/thumbnail?path=/photos/a%20b%26c%3Dd%3F.png"
        );
    }
}
