//! SigLIP: vision tower with the attention-pooling head, text tower with last-token pooling, and
//! sigmoid scoring with a learned bias (Hugging Face transformers layout).

use candle_core::{IndexOp, Module, Tensor};
use serde::Deserialize;
use serde_json::Value;
use visenc_weights::{Scope, Weights};

use crate::api::{EncodeOptions, ImageEncoder, ImageFeatures, ModelInfo, Scoring};
use crate::clip::scalar;
use crate::error::Result;
use crate::interpolate::PosInterp;
use crate::nn::{
    layer_norm, linear, Attention, BlockConfig, BlockKeys, Last, Mlp, Projection, QkvKeys,
};
use crate::text_transformer::{TextConfig, TextKeys, TextPool, TextTransformer};
use crate::vision_transformer::{TrunkConfig, TrunkKeys, VisionTransformer};
use crate::{parse, LoadedModel};

// SigLIP's encoder layers and text embeddings use CLIP's key names.
// Reference: https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/siglip/modeling_siglip.py#L760
const BLOCK: BlockKeys = crate::clip::HF_BLOCK;

const VISION: TrunkKeys = TrunkKeys {
    patch: "embeddings.patch_embedding",
    cls: None,
    reg: None,
    pos: "embeddings.position_embedding.weight",
    batched: false,
    pre_norm: None,
    blocks: "encoder.layers",
    block: BLOCK,
    final_norm: Some("post_layernorm"),
};

const TEXT: TextKeys = crate::clip::HF_TEXT;

/// `SiglipMultiheadAttentionPoolingHead`: a learned probe attends over the tokens, then a residual MLP.
// Reference: https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/siglip/modeling_siglip.py#L1110
struct AttentionPool {
    probe: Tensor,
    attention: Attention,
    norm: crate::nn::LayerNorm,
    mlp: Mlp,
}

impl AttentionPool {
    fn load(s: &Scope, c: &BlockConfig) -> Result<Self> {
        let qkv = QkvKeys::Fused {
            weight: "in_proj_weight",
            bias: "in_proj_bias",
        };
        Ok(Self {
            probe: s.get((1, 1, c.dim), "probe")?,
            attention: Attention::load(&s.pp("attention"), qkv, "out_proj", c.dim, c.heads, true)?,
            norm: layer_norm(s, "layernorm", c.dim, c.eps)?,
            mlp: Mlp::load(s, "mlp.fc1", "mlp.fc2", c.dim, c.mlp_dim, c.act)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let probe = self.probe.broadcast_as((b, 1, d))?.contiguous()?;
        let h = self.attention.forward(&probe, Some(x), None)?;
        let h = (&h + self.mlp.forward(&self.norm.forward(&h)?)?)?;
        Ok(h.i((.., 0))?)
    }
}

pub struct SiglipVision {
    trunk: VisionTransformer,
    head: Option<AttentionPool>,
}

impl ImageEncoder for SiglipVision {
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        let out = self.trunk.forward(pixels, opts, Last::All)?;
        let pooled = match &self.head {
            Some(h) => h.forward(&out.last)?,
            // Without the head the reference returns no pooler output; the mean token is timm's 'avg'.
            None => out.last.mean(1)?,
        };
        let patch_tokens = opts.tokens.then(|| out.last.clone());
        Ok(ImageFeatures {
            projected: self.head.as_ref().map(|_| pooled.clone()),
            pooled,
            logits: None,
            prefix_tokens: None,
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
struct VisionConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: usize,
    patch_size: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    vision_use_head: bool,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 16,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
            vision_use_head: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct TextCfg {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    projection_size: Option<usize>,
}

impl Default for TextCfg {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 64,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
            projection_size: None,
        }
    }
}

/// Loads a transformers SigLIP checkpoint (`model_type` `siglip` or `siglip_vision_model`).
pub fn load_hf(cfg: &Value, w: &Weights, architecture: &str) -> Result<LoadedModel> {
    let vision_only = cfg.get("vision_config").is_none();
    let vc: VisionConfig = parse(
        if vision_only {
            cfg
        } else {
            &cfg["vision_config"]
        },
        "vision_config",
    )?;
    let root = w.root();
    let vs = root.pp("vision_model");
    let bc = BlockConfig::hf(
        vc.hidden_size,
        vc.intermediate_size,
        vc.num_attention_heads,
        vc.layer_norm_eps,
        &vc.hidden_act,
    )?;
    let trunk_cfg = TrunkConfig {
        block: bc.clone(),
        layers: vc.num_hidden_layers,
        patch: vc.patch_size,
        patch_bias: true,
        image_size: (vc.image_size, vc.image_size),
        channels: vc.num_channels,
        class_token: false,
        registers: 0,
        pos_prefix: 0,
        interp: PosInterp::Bicubic,
    };
    let trunk = VisionTransformer::load(&vs, &VISION, trunk_cfg)?;
    let head = vc
        .vision_use_head
        .then(|| AttentionPool::load(&vs.pp("head"), &bc))
        .transpose()?;
    let has_head = head.is_some();
    let vision = SiglipVision { trunk, head };
    let (text, scoring) = if vision_only {
        (None, None)
    } else {
        let tc: TextCfg = parse(&cfg["text_config"], "text_config")?;
        let ts = root.pp("text_model");
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
            causal: false,
            pool: TextPool::Last,
        };
        let proj_dim = tc.projection_size.unwrap_or(tc.hidden_size);
        let head = Projection::Linear(linear(&ts, "head", tc.hidden_size, proj_dim, true)?);
        let text = TextTransformer::load(&ts, &TEXT, text_cfg, head)?;
        let scoring = Scoring::Sigmoid {
            logit_scale: scalar(&root, "logit_scale")?,
            logit_bias: scalar(&root, "logit_bias")?,
        };
        (Some(text), Some(scoring))
    };
    let info = ModelInfo {
        architecture: architecture.to_string(),
        family: "siglip",
        image_size: (vc.image_size, vc.image_size),
        patch_size: vc.patch_size,
        num_layers: vc.num_hidden_layers,
        hidden_size: vc.hidden_size,
        projection_dim: has_head.then_some(vc.hidden_size),
        prefix_tokens: 0,
        scoring,
        ..Default::default()
    };
    Ok(LoadedModel {
        image: Box::new(vision),
        text: text.map(|t| Box::new(t) as _),
        info,
    })
}
