//! Building a [`Preprocess`](crate::Preprocess) from the config a checkpoint ships with, in three dialects:
//! a Hugging Face `preprocessor_config.json`, a timm `pretrained_cfg`, an open_clip
//! `preprocess_cfg`. Each follows its library's eval transform; what a library would do but this
//! crate cannot is an [`ImageError::Config`], never a silent approximation.

use serde_json::Value;

use crate::error::ImageError;
use crate::resample::Filter;

mod hf;
mod timm_open_clip;

// The constants of `transformers.image_utils`, `timm.data.constants` and `open_clip.constants`,
// kept in f64 as Python holds them.
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const IMAGENET_DEFAULT_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_DEFAULT_STD: [f64; 3] = [0.229, 0.224, 0.225];
const IMAGENET_STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
const IMAGENET_STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];

/// Per-channel constants as the `float32` tensors numpy and torch build from them.
fn f32x3(v: [f64; 3]) -> [f32; 3] {
    v.map(|x| x as f32)
}

/// `value[key]`, with JSON `null` read as absent.
fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn bad(key: &str, want: &str, got: &Value) -> ImageError {
    ImageError::config(format!("`{key}` must be {want}, got {got}"))
}

fn get_bool(v: &Value, key: &str) -> Result<Option<bool>, ImageError> {
    field(v, key)
        .map(|x| x.as_bool().ok_or_else(|| bad(key, "a boolean", x)))
        .transpose()
}

fn get_f64(v: &Value, key: &str) -> Result<Option<f64>, ImageError> {
    field(v, key)
        .map(|x| x.as_f64().ok_or_else(|| bad(key, "a number", x)))
        .transpose()
}

fn get_str<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>, ImageError> {
    field(v, key)
        .map(|x| x.as_str().ok_or_else(|| bad(key, "a string", x)))
        .transpose()
}

fn as_size(key: &str, x: &Value) -> Result<u32, ImageError> {
    x.as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| bad(key, "a positive integer", x))
}

/// A filter given as a Pillow code or a name.
fn get_filter(v: &Value, key: &str) -> Result<Option<Filter>, ImageError> {
    field(v, key)
        .map(|x| {
            serde_json::from_value::<Filter>(x.clone())
                .map_err(|e| ImageError::config(format!("`{key}`: {e}")))
        })
        .transpose()
}

/// Per-channel values given as a number, a 1-list or a 3-list.
fn get_triple(v: &Value, key: &str) -> Result<Option<[f64; 3]>, ImageError> {
    let Some(x) = field(v, key) else {
        return Ok(None);
    };
    let want = "a number or a list of 1 or 3 numbers";
    let nums: Vec<f64> = match x {
        Value::Number(n) => vec![n.as_f64().ok_or_else(|| bad(key, want, x))?],
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_f64().ok_or_else(|| bad(key, want, x)))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad(key, want, x)),
    };
    match nums[..] {
        [a] => Ok(Some([a; 3])),
        [a, b, c] => Ok(Some([a, b, c])),
        _ => Err(bad(key, want, x)),
    }
}
