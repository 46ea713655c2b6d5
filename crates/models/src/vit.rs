//! ViT in the Hugging Face transformers layout (`ViTModel`, `ViTForImageClassification`) and timm's
//! `vit_*` models; also the pooling/classifier stage that DINOv2 shares.

use candle_core::{IndexOp, Module, Tensor};
use serde::Deserialize;
use serde_json::Value;
use visenc_weights::Weights;

use crate::api::{EncodeOptions, ImageEncoder, ImageFeatures, ModelInfo};
use crate::error::{config_err, ModelError, Result};
use crate::interpolate::PosInterp;
use crate::nn::{
    layer_norm, linear, optional_classifier, Activation, BlockConfig, BlockKeys, Last, QkvKeys,
};
use crate::vision_transformer::{TrunkConfig, TrunkKeys, VisionTransformer};
use crate::{parse, LoadedModel};

/// How the pooled embedding is taken from the final sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// The first (CLS) token.
    Token,
    /// The mean of the patch tokens (prefix tokens excluded).
    Avg,
}

/// What the classifier reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadInput {
    /// The pooled embedding.
    Pooled,
    /// CLS token concatenated with the mean patch token (`Dinov2ForImageClassification`).
    ClsAndMeanPatch,
}

/// A ViT trunk with pooling, an optional pooled-feature norm (timm `fc_norm`) and classifier.
pub struct ViT {
    pub(crate) trunk: VisionTransformer,
    pub(crate) pool: Pool,
    pub(crate) fc_norm: Option<crate::nn::LayerNorm>,
    pub(crate) head: Option<crate::linear::Linear>,
    pub(crate) head_input: HeadInput,
}

impl ImageEncoder for ViT {
    // Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.11/timm/models/vision_transformer.py#L826
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        // A pooled class token read alone: without tokens, the last block runs for it only.
        let last = match (self.pool, self.head_input, opts.tokens) {
            (Pool::Token, HeadInput::Pooled, false) => Last::First(1),
            _ => Last::All,
        };
        let out = self.trunk.forward(pixels, opts, last)?;
        let (prefix, patches) = self.trunk.split_tokens(&out.last)?;
        let mut pooled = match self.pool {
            Pool::Token => out.last.i((.., 0))?,
            Pool::Avg => patches.mean(1)?,
        };
        if let Some(n) = &self.fc_norm {
            pooled = n.forward(&pooled)?;
        }
        let logits = match (&self.head, self.head_input) {
            (None, _) => None,
            (Some(h), HeadInput::Pooled) => Some(h.forward(&pooled)?),
            (Some(h), HeadInput::ClsAndMeanPatch) => {
                Some(h.forward(&Tensor::cat(&[out.last.i((.., 0))?, patches.mean(1)?], 1)?)?)
            }
        };
        let (prefix_tokens, patch_tokens) = if opts.tokens {
            (prefix, Some(patches))
        } else {
            (None, None)
        };
        Ok(ImageFeatures {
            pooled,
            projected: None,
            logits,
            prefix_tokens,
            patch_tokens,
            grid: out.grid,
            hidden_states: out.hidden_states,
            feature_maps: vec![],
            latents: None,
        })
    }
}

/// Class names of a timm hub checkpoint: `label_names` at the top of config.json (where timm's
/// `save_for_hf` writes them) or inside `pretrained_cfg`; only when they match the head.
pub(crate) fn timm_labels(cfg: &Value, num_classes: usize) -> Option<Vec<String>> {
    let names = cfg
        .get("label_names")
        .or_else(|| cfg.get("pretrained_cfg")?.get("label_names"))?
        .as_array()?;
    let names: Vec<String> = names
        .iter()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    (names.len() == num_classes && num_classes > 0).then_some(names)
}

/// Class names from an HF `id2label` map, in id order.
pub(crate) fn hf_labels(cfg: &Value) -> Option<Vec<String>> {
    let map = cfg.get("id2label")?.as_object()?;
    let mut v: Vec<(usize, String)> = map
        .iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
        .collect();
    v.sort();
    (v.iter().enumerate().all(|(i, (k, _))| i == *k))
        .then(|| v.into_iter().map(|(_, n)| n).collect())
}

// Reference: https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/vit/modeling_vit.py#L390
const HF_BLOCK: BlockKeys = BlockKeys {
    norm1: "layernorm_before",
    qkv: QkvKeys::Separate {
        q: "attention.attention.query",
        k: "attention.attention.key",
        v: "attention.attention.value",
    },
    out: "attention.output.dense",
    norm2: "layernorm_after",
    fc1: "intermediate.dense",
    fc2: "output.dense",
    ls1: None,
    ls2: None,
};

const HF_TRUNK: TrunkKeys = TrunkKeys {
    patch: "embeddings.patch_embeddings.projection",
    cls: Some("embeddings.cls_token"),
    reg: None,
    pos: "embeddings.position_embeddings",
    batched: true,
    pre_norm: None,
    blocks: "encoder.layer",
    block: HF_BLOCK,
    final_norm: Some("layernorm"),
};

#[derive(Deserialize)]
#[serde(default)]
struct HfConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    image_size: usize,
    patch_size: usize,
    num_channels: usize,
    qkv_bias: bool,
}

impl Default for HfConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
        }
    }
}

/// Loads a transformers ViT (`ViTModel` or `ViTForImageClassification`).
pub fn load_hf(cfg: &Value, w: &Weights, architecture: &str) -> Result<LoadedModel> {
    let c: HfConfig = parse(cfg, "config.json")?;
    let root = w.root();
    let s = if root.contains("vit.embeddings.cls_token") {
        root.pp("vit")
    } else {
        root.clone()
    };
    // The tanh pooler of ViTModel is not the pre-logits feature (the classifier reads the normed CLS
    // token), and the mask token is for masked-image-modelling only.
    for k in [
        "pooler.dense.weight",
        "pooler.dense.bias",
        "embeddings.mask_token",
    ] {
        s.ignore(k);
    }
    let trunk_cfg = TrunkConfig {
        block: BlockConfig {
            dim: c.hidden_size,
            heads: c.num_attention_heads,
            mlp_dim: c.intermediate_size,
            eps: c.layer_norm_eps,
            act: Activation::from_name(&c.hidden_act)?,
            qkv_bias: c.qkv_bias,
            layer_scale: false,
        },
        layers: c.num_hidden_layers,
        patch: c.patch_size,
        patch_bias: true,
        image_size: (c.image_size, c.image_size),
        channels: c.num_channels,
        class_token: true,
        registers: 0,
        pos_prefix: 1,
        interp: PosInterp::Bicubic,
    };
    let trunk = VisionTransformer::load(&s, &HF_TRUNK, trunk_cfg)?;
    let labels = hf_labels(cfg);
    let head = optional_classifier(&root, "classifier", c.hidden_size)?;
    let info = ModelInfo {
        architecture: architecture.to_string(),
        family: "vit",
        image_size: (c.image_size, c.image_size),
        patch_size: c.patch_size,
        num_layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        prefix_tokens: 1,
        labels: head.as_ref().and(labels),
        ..Default::default()
    };
    let model = ViT {
        trunk,
        pool: Pool::Token,
        fc_norm: None,
        head,
        head_input: HeadInput::Pooled,
    };
    Ok(LoadedModel {
        image: Box::new(model),
        text: None,
        info,
    })
}

// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.11/timm/models/vision_transformer.py#L120
const TIMM_BLOCK: BlockKeys = BlockKeys {
    norm1: "norm1",
    qkv: QkvKeys::Fused {
        weight: "attn.qkv.weight",
        bias: "attn.qkv.bias",
    },
    out: "attn.proj",
    norm2: "norm2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    ls1: Some("ls1.gamma"),
    ls2: Some("ls2.gamma"),
};

/// timm `VisionTransformer` constructor arguments that visenc honours, after the architecture
/// name's preset and the checkpoint's `model_args`.
#[derive(Debug, Deserialize)]
struct TimmArgs {
    img_size: ImgSize,
    patch_size: usize,
    in_chans: usize,
    num_classes: usize,
    global_pool: String,
    embed_dim: usize,
    depth: usize,
    num_heads: usize,
    mlp_ratio: f64,
    qkv_bias: bool,
    init_values: Option<f64>,
    class_token: bool,
    reg_tokens: usize,
    no_embed_class: bool,
    pre_norm: bool,
    final_norm: bool,
    fc_norm: Option<bool>,
    act_layer: Option<String>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// timm accepts `img_size` as one number or as `[height, width]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ImgSize {
    Square(usize),
    Rect([usize; 2]),
}

impl ImgSize {
    fn hw(&self) -> (usize, usize) {
        match *self {
            Self::Square(s) => (s, s),
            Self::Rect([h, w]) => (h, w),
        }
    }
}

/// The preset of a timm ViT architecture name: `vit_{tiny,small,base,large,huge}_patch{P}_..._{S}`.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.11/timm/models/vision_transformer.py#L2100
fn timm_preset(arch: &str) -> Result<serde_json::Map<String, Value>> {
    let unsupported = || ModelError::Unsupported {
        what: "timm architecture",
        name: arch.to_string(),
    };
    if !arch.starts_with("vit_")
        || ["siglip", "dinov2", "_map", "rope", "_mae"]
            .iter()
            .any(|s| arch.contains(s))
    {
        return Err(unsupported());
    }
    let parts: Vec<&str> = arch.split(['_', '.']).collect();
    let (dim, depth, heads) = match parts.get(1).copied() {
        Some("tiny") => (192, 12, 3),
        Some("small") => (384, 12, 6),
        Some("base") => (768, 12, 12),
        Some("large") => (1024, 24, 16),
        Some("huge") => (1280, 32, 16),
        _ => return Err(unsupported()),
    };
    let patch = parts
        .iter()
        .find_map(|p| p.strip_prefix("patch")?.parse::<usize>().ok())
        .ok_or_else(unsupported)?;
    let img = parts
        .iter()
        .rev()
        .find_map(|p| p.parse::<usize>().ok())
        .unwrap_or(224);
    let clip = arch.contains("_clip_");
    // `_reg{N}` adds register tokens; `_gap` means no class token, average pooling, no position
    // embedding for prefix tokens (e.g. `vit_base_patch16_reg4_gap_256`).
    let reg = parts
        .iter()
        .find_map(|p| p.strip_prefix("reg")?.parse::<usize>().ok())
        .unwrap_or(0);
    let gap = parts.contains(&"gap");
    let mut m = serde_json::json!({
        "img_size": img, "patch_size": patch, "in_chans": 3, "num_classes": 1000,
        "global_pool": if gap { "avg" } else { "token" },
        "embed_dim": dim, "depth": depth, "num_heads": heads, "mlp_ratio": 4.0, "qkv_bias": true,
        "init_values": null, "class_token": !gap, "reg_tokens": reg, "no_embed_class": gap,
        "pre_norm": clip, "final_norm": true, "fc_norm": null,
        "act_layer": if arch.contains("quickgelu") { Value::from("quick_gelu") } else { Value::Null },
    });
    if clip {
        m["norm_eps"] = 1e-5.into();
    }
    Ok(m.as_object().cloned().unwrap_or_default())
}

/// Loads a timm ViT saved in timm's hub layout (config.json with `architecture`, `model_args`,
/// `pretrained_cfg`; model.safetensors).
pub fn load_timm(arch: &str, cfg: &Value, w: &Weights) -> Result<LoadedModel> {
    let mut args = crate::timm_args(timm_preset(arch)?, cfg);
    let eps = args
        .remove("norm_eps")
        .and_then(|v| v.as_f64())
        .unwrap_or(1e-6);
    let a: TimmArgs = serde_json::from_value(Value::Object(args))
        .map_err(|e| config_err("model_args", e.to_string()))?;
    for (k, v) in &a.other {
        // Only arguments that do not change inference are accepted silently.
        let harmless = matches!(
            k.as_str(),
            "dynamic_img_size"
                | "dynamic_img_pad"
                | "drop_rate"
                | "pos_drop_rate"
                | "patch_drop_rate"
                | "proj_drop_rate"
                | "attn_drop_rate"
                | "drop_path_rate"
                | "weight_init"
                | "strict_img_size"
        ) || v.is_null()
            || v == &Value::Bool(false);
        if !harmless {
            return Err(ModelError::Unsupported {
                what: "timm model argument",
                name: format!("{k} = {v}"),
            });
        }
    }
    let pool = match a.global_pool.as_str() {
        "token" => Pool::Token,
        "avg" => Pool::Avg,
        other => {
            return Err(ModelError::Unsupported {
                what: "timm global_pool",
                name: other.to_string(),
            })
        }
    };
    if pool == Pool::Token && !a.class_token {
        return Err(config_err(
            "global_pool",
            "'token' pooling needs class_token",
        ));
    }
    let use_fc_norm = a.fc_norm.unwrap_or(pool == Pool::Avg);
    let act = match a.act_layer.as_deref() {
        None | Some("gelu") => Activation::Gelu,
        Some("quick_gelu") => Activation::QuickGelu,
        Some(other) => {
            return Err(ModelError::Unsupported {
                what: "timm act_layer",
                name: other.into(),
            })
        }
    };
    let prefix = a.class_token as usize + a.reg_tokens;
    let keys = TrunkKeys {
        patch: "patch_embed.proj",
        cls: Some("cls_token"),
        reg: Some("reg_token"),
        pos: "pos_embed",
        batched: true,
        pre_norm: a.pre_norm.then_some("norm_pre"),
        blocks: "blocks",
        block: TIMM_BLOCK,
        final_norm: (a.final_norm && !use_fc_norm).then_some("norm"),
    };
    let trunk_cfg = TrunkConfig {
        block: BlockConfig {
            dim: a.embed_dim,
            heads: a.num_heads,
            mlp_dim: (a.embed_dim as f64 * a.mlp_ratio) as usize,
            eps,
            act,
            qkv_bias: a.qkv_bias,
            layer_scale: a.init_values.is_some(),
        },
        layers: a.depth,
        patch: a.patch_size,
        patch_bias: !a.pre_norm,
        image_size: a.img_size.hw(),
        channels: a.in_chans,
        class_token: a.class_token,
        registers: a.reg_tokens,
        pos_prefix: if a.no_embed_class { 0 } else { prefix },
        interp: PosInterp::BicubicAntialias,
    };
    let root = w.root();
    let trunk = VisionTransformer::load(&root, &keys, trunk_cfg)?;
    let fc_norm = (a.final_norm && use_fc_norm)
        .then(|| layer_norm(&root, "fc_norm", a.embed_dim, eps))
        .transpose()?;
    let head = (a.num_classes > 0)
        .then(|| linear(&root, "head", a.embed_dim, a.num_classes, true))
        .transpose()?;
    let labels = timm_labels(cfg, a.num_classes);
    let info = ModelInfo {
        architecture: arch.to_string(),
        family: "vit",
        image_size: a.img_size.hw(),
        patch_size: a.patch_size,
        num_layers: a.depth,
        hidden_size: a.embed_dim,
        prefix_tokens: prefix,
        labels: head.as_ref().and(labels),
        ..Default::default()
    };
    let model = ViT {
        trunk,
        pool,
        fc_norm,
        head,
        head_input: HeadInput::Pooled,
    };
    Ok(LoadedModel {
        image: Box::new(model),
        text: None,
        info,
    })
}
