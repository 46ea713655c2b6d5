//! Request inputs shared by the routes: one-or-many lists, images sent as data URLs or base64,
//! decoding off the async runtime, and the post-processing of embeddings (normalise, truncate).

use base64::Engine;
use serde::Deserialize;
use visenc::Pixels;

use crate::batcher::{Embedding, Item};
use crate::error::{ApiError, ErrorKind};
use crate::AppState;

/// `"x"` or `["x", "y"]`, as every embedding API accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Checks the number of inputs of a request; `field` names the list in errors.
pub fn check_count(
    state: &AppState,
    inputs: &[String],
    field: &'static str,
) -> Result<(), ApiError> {
    if inputs.is_empty() {
        return Err(ApiError::new(
            ErrorKind::Empty,
            format!("`{field}` is empty: give at least one input"),
        )
        .with_param(field));
    }
    if inputs.len() > state.config.max_inputs {
        return Err(ApiError::validation(format!(
            "`{field}` has {} items, more than this server's limit of {} per request",
            inputs.len(),
            state.config.max_inputs
        ))
        .with_param(field));
    }
    Ok(())
}

/// The bytes of an image sent as `data:image/...;base64,...` or as bare base64.
/// `name` (e.g. `input[2]`) appears in errors.
pub fn image_bytes(value: &str, name: &str) -> Result<Vec<u8>, ApiError> {
    let v = value.trim();
    if v.starts_with("http://") || v.starts_with("https://") {
        return Err(ApiError::validation(format!(
            "{name}: this server does not fetch URLs; send the image as a data URL \
             (data:image/png;base64,...) or as base64"
        )));
    }
    let payload = match v.strip_prefix("data:") {
        Some(rest) => {
            let (meta, data) = rest.split_once(',').ok_or_else(|| {
                ApiError::validation(format!("{name}: a data URL needs a comma before its data"))
            })?;
            if !meta.ends_with(";base64") {
                return Err(ApiError::validation(format!(
                    "{name}: only base64 data URLs are accepted (data:image/...;base64,...)"
                )));
            }
            data
        }
        None => v,
    };
    base64::engine::general_purpose::STANDARD
        .decode(payload.as_bytes())
        .map_err(|e| ApiError::validation(format!("{name}: not valid base64: {e}")))
}

/// A decoded request image: its pixels, preprocessed for the model, and the height of the image
/// as stored (before EXIF orientation), which usage counts.
pub struct DecodedImage {
    pub pixels: Pixels,
    pub height: u32,
}

/// Decodes and preprocesses images on the blocking pool (never on the async runtime). Each input
/// is named `{field}[i]` in errors; the first bad one fails the request.
pub async fn decode_images(
    state: &AppState,
    inputs: Vec<String>,
    field: &'static str,
) -> Result<Vec<DecodedImage>, ApiError> {
    let enc = state.encoder.clone();
    tokio::task::spawn_blocking(move || {
        inputs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let name = format!("{field}[{i}]");
                let bytes = image_bytes(s, &name)?;
                let pixels = enc
                    .decode_image(&bytes, &name)
                    .map_err(|e| ApiError::from(e).with_param(field))?;
                // The header decoded above, so reading its size again cannot fail in practice.
                let height = image::ImageReader::new(std::io::Cursor::new(&bytes))
                    .with_guessed_format()
                    .ok()
                    .and_then(|r| r.into_dimensions().ok())
                    .map_or(0, |(_, h)| h);
                Ok(DecodedImage { pixels, height })
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Backend, format!("image decoding failed: {e}")))?
}

/// What one image adds to `usage`, as infinity counts it: the length of its stand-in text
/// `"an image is worth a repeated " + "token" * height` (`ImageSingle.str_repr`), measured by
/// infinity's default `length_tokenizer` (`lengths_via_tokenize` is off by default), which counts
/// characters; so a taller image counts more. Texts are counted in tokens of the model's tokenizer.
/// https://github.com/michaelfeil/infinity/blob/052378fac6566adc2d5e51806937894cd63a8f27/libs/infinity_emb/infinity_emb/primitives.py
/// https://github.com/michaelfeil/infinity/blob/013dad91837202cc3ddc044f6144b289a154756a/libs/infinity_emb/infinity_emb/inference/batch_handler.py
pub fn image_usage(height: u32) -> usize {
    "an image is worth a repeated ".len() + "token".len() * height as usize
}

/// Embeds texts with the text tower (through the batching queue).
pub async fn embed_texts(state: &AppState, texts: Vec<String>) -> Result<Vec<Embedding>, ApiError> {
    if !state.encoder.has_text() {
        return Err(ApiError::validation(format!(
            "{} has no text tower: send images (\"modality\": \"image\")",
            state.config.model_name
        )));
    }
    state
        .batcher
        .embed(texts.into_iter().map(Item::Text).collect())
        .await
}

/// Embeds decoded images (through the batching queue).
pub async fn embed_images(
    state: &AppState,
    images: Vec<DecodedImage>,
) -> Result<Vec<Embedding>, ApiError> {
    state
        .batcher
        .embed(images.into_iter().map(|i| Item::Image(i.pixels)).collect())
        .await
}

/// Keeps the first `dimensions` values (Matryoshka-style, as OpenAI's `dimensions`), then scales
/// to unit length if asked.
pub fn finish(
    mut v: Embedding,
    dimensions: Option<usize>,
    normalize: bool,
) -> Result<Embedding, ApiError> {
    if let Some(d) = dimensions {
        if d == 0 || d > v.len() {
            return Err(ApiError::validation(format!(
                "`dimensions` must be between 1 and {} for this model, not {d}",
                v.len()
            ))
            .with_param("dimensions"));
        }
        v.truncate(d);
    }
    if normalize {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            v.iter_mut().for_each(|x| *x /= n);
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_and_bare_base64_decode_to_the_same_bytes() {
        let a = image_bytes("data:image/png;base64,AAEC", "input[0]").unwrap();
        let b = image_bytes("AAEC", "input[0]").unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(a, b);
    }

    #[test]
    fn bad_image_strings_name_the_input() {
        for bad in [
            "data:image/png;base64",
            "data:image/png,AAEC",
            "not base64!",
            "https://example.com/cat.jpg",
        ] {
            let e = image_bytes(bad, "input[3]").unwrap_err();
            assert_eq!(e.kind, ErrorKind::Validation);
            assert!(e.message.starts_with("input[3]: "), "{}", e.message);
        }
    }

    #[test]
    fn dimensions_truncate_then_normalise() {
        let v = finish(vec![3.0, 4.0, 12.0], Some(2), true).unwrap();
        assert_eq!(v, vec![0.6, 0.8]);
        assert!(finish(vec![1.0], Some(2), true).is_err());
        assert!(finish(vec![1.0], Some(0), true).is_err());
    }
}
