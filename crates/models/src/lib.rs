//! Encoder families behind one API ([`ImageEncoder`], [`TextEncoder`]).
//!
//! One file per family; each mirrors its reference's state-dict keys through a small key table, so a
//! port reads side by side with the PyTorch file it came from.

pub mod api;
pub mod bert;
pub mod clip;
pub mod conv;
mod conv_lowp;
pub mod convnext;
pub mod dinov2;
pub mod efficientnet;
mod error;
pub mod interpolate;
pub mod linear;
pub mod llava;
pub mod maxvit;
mod nhwc;
pub mod nn;
pub mod ops;
pub mod resampler;
pub mod resnet;
pub mod sentence;
pub mod siglip;
pub mod swin;
pub mod text_transformer;
mod two_tower;
pub mod vae;
pub mod vision_transformer;
pub mod vit;
pub mod vqgan;

use serde::de::DeserializeOwned;
use serde_json::Value;
use visenc_weights::{Checkpoint, Layout, LoadPolicy, LoadReport, Weights};

pub use api::{
    EncodeOptions, FeatureMap, ImageEncoder, ImageFeatures, Latents, ModelInfo, MultimodalEncoder,
    Scoring, TextEncoder, TextFeatures, VisualTokens,
};
pub use error::{ModelError, Result};
pub use sentence::TextTower;
/// visenc's CPU kernels (for benchmarks and callers that run them on their own buffers).
pub use visenc_kernels as kernels;
pub use visenc_kernels::Precision;

/// A model ready to run: its image encoder, its text tower if it has one, and what it is.
pub struct LoadedModel {
    pub image: Box<dyn ImageEncoder>,
    pub text: Option<Box<dyn TextEncoder>>,
    pub info: ModelInfo,
}

/// What `timm.create_model` receives for a hub checkpoint: the architecture's preset, overridden by
/// config.json's `num_classes` and `global_pool`, then by its `model_args`.
pub(crate) fn timm_args(
    mut args: serde_json::Map<String, Value>,
    cfg: &Value,
) -> serde_json::Map<String, Value> {
    for k in ["num_classes", "global_pool"] {
        if let Some(v) = cfg.get(k) {
            args.insert(k.into(), v.clone());
        }
    }
    if let Some(Value::Object(extra)) = cfg.get("model_args") {
        args.extend(extra.clone());
    }
    args
}

/// Parses a config section, naming the section in the error.
pub(crate) fn parse<T: DeserializeOwned>(v: &Value, what: &str) -> Result<T> {
    let v = if v.is_null() {
        Value::Object(Default::default())
    } else {
        v.clone()
    };
    serde_json::from_value(v).map_err(|e| error::config_err(what, e.to_string()))
}

/// Builds the model a checkpoint describes from its weights, then checks the load report under
/// `policy`. Returns the model and the report (non-empty only under [`LoadPolicy::AllowMismatch`]).
pub fn load(
    ckpt: &Checkpoint,
    w: &Weights,
    policy: LoadPolicy,
) -> Result<(LoadedModel, LoadReport)> {
    let cfg = &ckpt.config;
    let mut model = match ckpt.layout {
        // Two checkpoints and a projection: loaded, checked and reported as a whole.
        Layout::TwoTower => return two_tower::load(ckpt, w, policy),
        Layout::OpenClip => clip::load_open_clip(cfg, w)?,
        // A weights file alone: recognised by its key names.
        Layout::Bare
            if w.contains("_conv_stem.weight")
                && w.contains("_blocks.0._depthwise_conv.weight") =>
        {
            efficientnet::load_lite(&Value::Null, w)?
        }
        Layout::Bare => {
            return Err(ModelError::Unsupported {
                what: "weights file without a config",
                name: format!(
                    "{}: only EfficientNet-Lite state dicts are recognised by their keys; put the \
                     checkpoint's config.json beside it",
                    w.source().display()
                ),
            })
        }
        Layout::Timm => {
            let arch = cfg["architecture"].as_str().unwrap_or_default();
            // The name before the pretrained tag picks the family (e.g. `resnet50.a1_in1k`).
            let base = arch.split('.').next().unwrap_or_default();
            // Not timm: a config.json naming a model of the EfficientNet-Lite PyTorch port.
            if arch.starts_with(efficientnet::LITE_ARCH_PREFIX) {
                efficientnet::load_lite(cfg, w)?
            } else if base.starts_with("vit_") {
                vit::load_timm(arch, cfg, w)?
            } else if base.starts_with("resnet") {
                resnet::load_timm(base, cfg, w)?
            } else if base.starts_with("convnext") {
                convnext::load_timm(base, cfg, w)?
            } else if base.starts_with("maxvit_") {
                maxvit::load_timm(arch, cfg, w)?
            } else if base.starts_with("efficientnet_")
                || base.starts_with("tf_efficientnet_")
                || base == "test_efficientnet"
            {
                efficientnet::load_timm(arch, cfg, w)?
            } else {
                return Err(ModelError::Unsupported {
                    what: "timm architecture",
                    name: arch.to_string(),
                });
            }
        }
        Layout::Diffusers => match cfg
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or_default()
        {
            "AutoencoderKL" => vae::load(cfg, w)?,
            "VQModel" => vqgan::load(cfg, w)?,
            other => {
                return Err(ModelError::Unsupported {
                    what: "diffusers model (config.json _class_name)",
                    name: format!("{other:?}; supported: AutoencoderKL, VQModel"),
                })
            }
        },
        Layout::Transformers => {
            let model_type = cfg
                .get("model_type")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let arch = cfg
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(Value::as_str)
                .unwrap_or(model_type)
                .to_string();
            match model_type {
                "clip" | "clip_vision_model" => clip::load_hf(cfg, w, &arch)?,
                "siglip" | "siglip_vision_model" => siglip::load_hf(cfg, w, &arch)?,
                "vit" => vit::load_hf(cfg, w, &arch)?,
                "resnet" => resnet::load_hf(cfg, w, &arch)?,
                "convnext" => convnext::load_hf(cfg, w, &arch)?,
                "convnextv2" => convnext::load_hf_v2(cfg, w, &arch)?,
                "swin" => swin::load_hf(cfg, w, &arch)?,
                "dinov2" | "dinov2_with_registers" => dinov2::load_hf(cfg, w, &arch)?,
                "efficientnet" => efficientnet::load_hf(cfg, w, &arch)?,
                "llava" | "llava_next" => llava::load_hf(cfg, w, &arch)?,
                "bert" => {
                    return Err(ModelError::Unsupported {
                        what: "text-only model as an image encoder",
                        name: format!(
                            "{}: {arch} has no image tower; it loads as the text tower of a two-tower \
                             model (`visenc train align --out DIR`, or visenc_models::load_text)",
                            ckpt.spec
                        ),
                    })
                }
                other => {
                    return Err(ModelError::Unsupported {
                        what: "architecture (config.json model_type)",
                        name: format!("{other:?} ({arch}); supported: clip, clip_vision_model, siglip, siglip_vision_model, vit, dinov2, dinov2_with_registers, resnet, convnext, convnextv2, swin, efficientnet, llava, llava_next"),
                    })
                }
            }
        }
    };
    let report = w.finish(policy)?;
    model.info.parameters = w.used_parameters();
    model.info.text_context_length = model.text.as_ref().map(|t| t.context_length());
    Ok((model, report))
}

/// Builds the text-only model a checkpoint describes (a sentence encoder: transformers' `BertModel`
/// with sentence-transformers' pooling), then checks the load report under `policy`.
pub fn load_text(
    ckpt: &Checkpoint,
    w: &Weights,
    policy: LoadPolicy,
) -> Result<(TextTower, LoadReport)> {
    let model_type = ckpt
        .config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let architecture = ckpt
        .config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or(model_type)
        .to_string();
    let tower = match (ckpt.layout, model_type) {
        (Layout::Transformers, "bert") => {
            let bert = sentence::SentenceBert::load(ckpt, w)?;
            let dim = bert.dim();
            let encoder: Box<dyn TextEncoder> = Box::new(bert);
            (encoder, dim)
        }
        (layout, other) => {
            let kind = match other {
                "" => format!("a {layout:?} checkpoint"),
                t => format!("a {layout:?} checkpoint of model_type {t:?}"),
            };
            return Err(ModelError::Unsupported {
                what: "text tower",
                name: format!(
                    "{}: {kind}; supported: bert (transformers / sentence-transformers directories)",
                    ckpt.spec
                ),
            });
        }
    };
    let report = w.finish(policy)?;
    Ok((
        TextTower {
            encoder: tower.0,
            dim: tower.1,
            architecture,
            parameters: w.used_parameters(),
        },
        report,
    ))
}
