//! CLIP: vision tower, text tower and projections, in the Hugging Face transformers layout
//! (`CLIPModel`, `CLIPVisionModel[WithProjection]`) and the open_clip layout.

use candle_core::{IndexOp, Module, Tensor};
use serde::Deserialize;
use serde_json::Value;
use visenc_weights::{Scope, Weights};

use crate::api::{EncodeOptions, ImageEncoder, ImageFeatures, ModelInfo, Scoring};
use crate::error::{config_err, ModelError, Result};
use crate::interpolate::PosInterp;
use crate::nn::{
    layer_norm, linear, Activation, BlockConfig, BlockKeys, Last, Projection, QkvKeys,
};
use crate::text_transformer::{TextConfig, TextKeys, TextPool, TextTransformer};
use crate::vision_transformer::{TrunkConfig, TrunkKeys, VisionTransformer};
use crate::{parse, LoadedModel};

// Reference: https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/clip/modeling_clip.py#L585
pub(crate) const HF_BLOCK: BlockKeys = BlockKeys {
    norm1: "layer_norm1",
    qkv: QkvKeys::Separate {
        q: "self_attn.q_proj",
        k: "self_attn.k_proj",
        v: "self_attn.v_proj",
    },
    out: "self_attn.out_proj",
    norm2: "layer_norm2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    ls1: None,
    ls2: None,
};

const HF_VISION: TrunkKeys = TrunkKeys {
    patch: "embeddings.patch_embedding",
    cls: Some("embeddings.class_embedding"),
    reg: None,
    pos: "embeddings.position_embedding.weight",
    batched: false,
    pre_norm: Some("pre_layrnorm"), // sic: the reference's spelling
    blocks: "encoder.layers",
    block: HF_BLOCK,
    final_norm: None,
};

pub(crate) const HF_TEXT: TextKeys = TextKeys {
    token: "embeddings.token_embedding.weight",
    pos: "embeddings.position_embedding.weight",
    blocks: "encoder.layers",
    block: HF_BLOCK,
    final_norm: "final_layer_norm",
};

// Reference: https://github.com/mlfoundations/open_clip/blob/v2.29.0/src/open_clip/transformer.py#L194
const OPEN_CLIP_BLOCK: BlockKeys = BlockKeys {
    norm1: "ln_1",
    qkv: QkvKeys::Fused {
        weight: "attn.in_proj_weight",
        bias: "attn.in_proj_bias",
    },
    out: "attn.out_proj",
    norm2: "ln_2",
    fc1: "mlp.c_fc",
    fc2: "mlp.c_proj",
    ls1: Some("ls_1.gamma"),
    ls2: Some("ls_2.gamma"),
};

const OPEN_CLIP_VISION: TrunkKeys = TrunkKeys {
    patch: "conv1",
    cls: Some("class_embedding"),
    reg: None,
    pos: "positional_embedding",
    batched: false,
    pre_norm: Some("ln_pre"),
    blocks: "transformer.resblocks",
    block: OPEN_CLIP_BLOCK,
    final_norm: None,
};

const OPEN_CLIP_TEXT: TextKeys = TextKeys {
    token: "token_embedding.weight",
    pos: "positional_embedding",
    blocks: "transformer.resblocks",
    block: OPEN_CLIP_BLOCK,
    final_norm: "ln_final",
};

/// CLIP's image side: the trunk, `post_layernorm` on the CLS token, and the projection.
pub struct ClipVision {
    pub(crate) trunk: VisionTransformer,
    post_norm: crate::nn::LayerNorm,
    projection: Option<Projection>,
}

impl ImageEncoder for ClipVision {
    // Reference: https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/clip/modeling_clip.py#L1080
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        // The pooled output reads the class token alone: without tokens, the last block runs for it.
        let last = if opts.tokens {
            Last::All
        } else {
            Last::First(1)
        };
        let out = self.trunk.forward(pixels, opts, last)?;
        let pooled = self.post_norm.forward(&out.last.i((.., 0))?)?;
        let projected = self
            .projection
            .as_ref()
            .map(|p| p.forward(&pooled))
            .transpose()?;
        let (prefix_tokens, patch_tokens) = if opts.tokens {
            let (p, t) = self.trunk.split_tokens(&out.last)?;
            (p, Some(t))
        } else {
            (None, None)
        };
        Ok(ImageFeatures {
            pooled,
            projected,
            logits: None,
            prefix_tokens,
            patch_tokens,
            grid: out.grid,
            hidden_states: out.hidden_states,
            feature_maps: vec![],
            latents: None,
        })
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct HfVisionConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: usize,
    patch_size: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    projection_dim: usize,
}

impl Default for HfVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct HfTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    eos_token_id: u32,
}

impl Default for HfTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

/// Loads a transformers CLIP checkpoint (`model_type` `clip` or `clip_vision_model`).
pub fn load_hf(cfg: &Value, w: &Weights, architecture: &str) -> Result<LoadedModel> {
    let vision_only = cfg.get("vision_config").is_none();
    let vc_json = if vision_only {
        cfg
    } else {
        &cfg["vision_config"]
    };
    let vc: HfVisionConfig = parse(vc_json, "vision_config")?;
    let root = w.root();
    w.ignore("text_model.embeddings.position_ids");
    let (mut vision, mut info) = load_hf_vision_tower(vc_json, &root.pp("vision_model"))?;
    let projection_dim: usize = cfg
        .get("projection_dim")
        .and_then(Value::as_u64)
        .map_or(vc.projection_dim, |v| v as usize);
    let projection = if root.contains("visual_projection.weight") || !vision_only {
        Some(Projection::Linear(linear(
            &root,
            "visual_projection",
            vc.hidden_size,
            projection_dim,
            false,
        )?))
    } else {
        None
    };
    let has_projection = projection.is_some();
    vision.projection = projection;
    let (text, scoring) = if vision_only {
        (None, None)
    } else {
        let tc: HfTextConfig = parse(&cfg["text_config"], "text_config")?;
        let text_cfg = TextConfig {
            block: BlockConfig::hf(
                tc.hidden_size,
                tc.intermediate_size,
                tc.num_attention_heads,
                tc.layer_norm_eps,
                &tc.hidden_act,
            )?,
            layers: tc.num_hidden_layers,
            vocab_size: tc.vocab_size,
            context_length: tc.max_position_embeddings,
            causal: true,
            // The reference keeps the legacy argmax pooling for checkpoints whose config says eos 2.
            pool: if tc.eos_token_id == 2 {
                TextPool::ArgMax
            } else {
                TextPool::FirstEos(tc.eos_token_id)
            },
        };
        let proj = Projection::Linear(linear(
            &root,
            "text_projection",
            tc.hidden_size,
            projection_dim,
            false,
        )?);
        let text = TextTransformer::load(&root.pp("text_model"), &HF_TEXT, text_cfg, proj)?;
        let scale = scalar(&root, "logit_scale")?;
        (Some(text), Some(Scoring::Softmax { logit_scale: scale }))
    };
    info.architecture = architecture.to_string();
    info.projection_dim = has_projection.then_some(projection_dim);
    info.scoring = scoring;
    Ok(LoadedModel {
        image: Box::new(vision),
        text: text.map(|t| Box::new(t) as _),
        info,
    })
}

/// Loads a transformers CLIP vision tower (`CLIPVisionTransformer`: embeddings, `pre_layrnorm`, encoder,
/// `post_layernorm`) from scope `vs`, without a projection; also used inside LLaVA checkpoints.
pub(crate) fn load_hf_vision_tower(vc: &Value, vs: &Scope) -> Result<(ClipVision, ModelInfo)> {
    let vc: HfVisionConfig = parse(vc, "vision_config")?;
    vs.ignore("embeddings.position_ids");
    let trunk_cfg = TrunkConfig {
        block: BlockConfig::hf(
            vc.hidden_size,
            vc.intermediate_size,
            vc.num_attention_heads,
            vc.layer_norm_eps,
            &vc.hidden_act,
        )?,
        layers: vc.num_hidden_layers,
        patch: vc.patch_size,
        patch_bias: false,
        image_size: (vc.image_size, vc.image_size),
        channels: vc.num_channels,
        class_token: true,
        registers: 0,
        pos_prefix: 1,
        interp: PosInterp::Bicubic,
    };
    let trunk = VisionTransformer::load(vs, &HF_VISION, trunk_cfg)?;
    let post_norm = layer_norm(vs, "post_layernorm", vc.hidden_size, vc.layer_norm_eps)?;
    let info = ModelInfo {
        family: "clip",
        image_size: (vc.image_size, vc.image_size),
        patch_size: vc.patch_size,
        num_layers: vc.num_hidden_layers,
        hidden_size: vc.hidden_size,
        prefix_tokens: 1,
        ..Default::default()
    };
    let vision = ClipVision {
        trunk,
        post_norm,
        projection: None,
    };
    Ok((vision, info))
}

/// Reads a scalar parameter stored as `[]` or `[1]`.
pub(crate) fn scalar(s: &Scope, name: &str) -> Result<f32> {
    let t = match s.shape_of(name).as_deref() {
        Some([1]) => s.get(1, name)?,
        _ => s.get((), name)?.reshape(1)?,
    };
    Ok(t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?[0])
}

#[derive(Deserialize)]
#[serde(default)]
struct OcVision {
    image_size: usize,
    layers: usize,
    width: usize,
    head_width: usize,
    mlp_ratio: f64,
    patch_size: usize,
    ls_init_value: Option<f64>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

impl Default for OcVision {
    fn default() -> Self {
        Self {
            image_size: 224,
            layers: 12,
            width: 768,
            head_width: 64,
            mlp_ratio: 4.0,
            patch_size: 16,
            ls_init_value: None,
            other: Default::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct OcText {
    context_length: usize,
    vocab_size: usize,
    width: usize,
    heads: usize,
    layers: usize,
    mlp_ratio: f64,
    ls_init_value: Option<f64>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

impl Default for OcText {
    fn default() -> Self {
        Self {
            context_length: 77,
            vocab_size: 49408,
            width: 512,
            heads: 8,
            layers: 12,
            mlp_ratio: 4.0,
            ls_init_value: None,
            other: Default::default(),
        }
    }
}

/// Options of open_clip towers that change the computation and that visenc does not implement yet;
/// a config that sets any of them to a non-default value is refused rather than run wrongly.
fn refuse_open_clip_options(
    tower: &str,
    other: &serde_json::Map<String, Value>,
    allowed_default: &[(&str, Value)],
) -> Result<()> {
    for (k, v) in other {
        let ok = match allowed_default.iter().find(|(name, _)| name == k) {
            Some((_, default)) => v == default || v.is_null(),
            None => {
                matches!(
                    k.as_str(),
                    "output_tokens"
                        | "patch_dropout"
                        | "pad_id"
                        | "proj_bias"
                        | "hf_tokenizer_name"
                        | "tokenizer_kwargs"
                        | "norm_kwargs"
                        | "act_kwargs"
                ) && (k != "proj_bias" || v == &Value::Bool(false))
            }
        };
        if !ok {
            return Err(ModelError::Unsupported {
                what: "open_clip option",
                name: format!("{tower}.{k} = {v}"),
            });
        }
    }
    Ok(())
}

/// Loads an open_clip checkpoint (`open_clip_config.json` + `open_clip_model.safetensors`).
// Reference: https://github.com/mlfoundations/open_clip/blob/v2.29.0/src/open_clip/model.py#L220
pub fn load_open_clip(cfg: &Value, w: &Weights) -> Result<LoadedModel> {
    let mc = cfg
        .get("model_cfg")
        .ok_or_else(|| config_err("model_cfg", "missing in open_clip_config.json"))?;
    let embed_dim = mc
        .get("embed_dim")
        .and_then(Value::as_u64)
        .ok_or_else(|| config_err("model_cfg.embed_dim", "missing"))? as usize;
    let quick_gelu = mc
        .get("quick_gelu")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let act = if quick_gelu {
        Activation::QuickGelu
    } else {
        Activation::Gelu
    };
    let vc: OcVision = parse(mc.get("vision_cfg").unwrap_or(&Value::Null), "vision_cfg")?;
    let tc: OcText = parse(mc.get("text_cfg").unwrap_or(&Value::Null), "text_cfg")?;
    refuse_open_clip_options(
        "vision_cfg",
        &vc.other,
        &[
            ("attentional_pool", Value::Bool(false)),
            ("no_ln_pre", Value::Bool(false)),
            ("pool_type", "tok".into()),
            ("final_ln_after_pool", Value::Bool(false)),
            ("output_tokens", Value::Bool(false)),
            ("global_average_pool", Value::Bool(false)),
            ("pos_embed_type", "learnable".into()),
            ("timm_model_name", Value::Null),
        ],
    )?;
    refuse_open_clip_options(
        "text_cfg",
        &tc.other,
        &[
            ("pool_type", "argmax".into()),
            ("no_causal_mask", Value::Bool(false)),
            ("embed_cls", Value::Bool(false)),
            ("final_ln_after_pool", Value::Bool(false)),
            ("hf_model_name", Value::Null),
        ],
    )?;
    let block = |width: usize, heads: usize, mlp_ratio: f64, ls: Option<f64>| BlockConfig {
        dim: width,
        heads,
        mlp_dim: (width as f64 * mlp_ratio) as usize,
        eps: 1e-5,
        act,
        qkv_bias: true,
        layer_scale: ls.is_some(),
    };
    let root = w.root();
    let vs = root.pp("visual");
    let trunk_cfg = TrunkConfig {
        block: block(
            vc.width,
            vc.width / vc.head_width.max(1),
            vc.mlp_ratio,
            vc.ls_init_value,
        ),
        layers: vc.layers,
        patch: vc.patch_size,
        patch_bias: false,
        image_size: (vc.image_size, vc.image_size),
        channels: 3,
        class_token: true,
        registers: 0,
        pos_prefix: 1,
        interp: PosInterp::Bicubic,
    };
    let trunk = VisionTransformer::load(&vs, &OPEN_CLIP_VISION, trunk_cfg)?;
    let post_norm = layer_norm(&vs, "ln_post", vc.width, 1e-5)?;
    let projection = Some(Projection::Matrix(vs.get((vc.width, embed_dim), "proj")?));
    let vision = ClipVision {
        trunk,
        post_norm,
        projection,
    };
    let text_cfg = TextConfig {
        block: block(tc.width, tc.heads, tc.mlp_ratio, tc.ls_init_value),
        layers: tc.layers,
        vocab_size: tc.vocab_size,
        context_length: tc.context_length,
        causal: true,
        pool: TextPool::ArgMax,
    };
    let text_proj = Projection::Matrix(root.get((tc.width, embed_dim), "text_projection")?);
    let text = TextTransformer::load(&root, &OPEN_CLIP_TEXT, text_cfg, text_proj)?;
    let logit_scale = scalar(&root, "logit_scale")?;
    let scoring = if root.contains("logit_bias") {
        Scoring::Sigmoid {
            logit_scale,
            logit_bias: scalar(&root, "logit_bias")?,
        }
    } else {
        Scoring::Softmax { logit_scale }
    };
    let info = ModelInfo {
        architecture: "open_clip".into(),
        family: "clip",
        image_size: (vc.image_size, vc.image_size),
        patch_size: vc.patch_size,
        num_layers: vc.layers,
        hidden_size: vc.width,
        projection_dim: Some(embed_dim),
        prefix_tokens: 1,
        scoring: Some(scoring),
        ..Default::default()
    };
    Ok(LoadedModel {
        image: Box::new(vision),
        text: Some(Box::new(text)),
        info,
    })
}
