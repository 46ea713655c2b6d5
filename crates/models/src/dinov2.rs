//! DINOv2 and DINOv2 with registers in the Hugging Face transformers layout (`Dinov2Model`,
//! `Dinov2WithRegistersModel`, `Dinov2ForImageClassification`).

use serde::Deserialize;
use serde_json::Value;
use visenc_weights::Weights;

use crate::api::ModelInfo;
use crate::error::{ModelError, Result};
use crate::interpolate::PosInterp;
use crate::nn::{optional_classifier, Activation, BlockConfig, BlockKeys, QkvKeys};
use crate::vision_transformer::{TrunkConfig, TrunkKeys, VisionTransformer};
use crate::vit::{hf_labels, HeadInput, Pool, ViT};
use crate::{parse, LoadedModel};

// Reference: https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/dinov2/modeling_dinov2.py#L366
const BLOCK: BlockKeys = BlockKeys {
    norm1: "norm1",
    qkv: QkvKeys::Separate {
        q: "attention.attention.query",
        k: "attention.attention.key",
        v: "attention.attention.value",
    },
    out: "attention.output.dense",
    norm2: "norm2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    ls1: Some("layer_scale1.lambda1"),
    ls2: Some("layer_scale2.lambda1"),
};

const TRUNK: TrunkKeys = TrunkKeys {
    patch: "embeddings.patch_embeddings.projection",
    cls: Some("embeddings.cls_token"),
    reg: Some("embeddings.register_tokens"),
    pos: "embeddings.position_embeddings",
    batched: true,
    pre_norm: None,
    blocks: "encoder.layer",
    block: BLOCK,
    final_norm: Some("layernorm"),
};

#[derive(Deserialize)]
#[serde(default)]
struct Config {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    mlp_ratio: f64,
    hidden_act: String,
    layer_norm_eps: f64,
    image_size: usize,
    patch_size: usize,
    num_channels: usize,
    qkv_bias: bool,
    use_swiglu_ffn: bool,
    num_register_tokens: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            mlp_ratio: 4.0,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            qkv_bias: true,
            use_swiglu_ffn: false,
            num_register_tokens: 0,
        }
    }
}

/// Loads a transformers DINOv2 checkpoint, with or without registers.
pub fn load_hf(cfg: &Value, w: &Weights, architecture: &str) -> Result<LoadedModel> {
    let mut c: Config = parse(cfg, "config.json")?;
    let with_registers =
        cfg.get("model_type").and_then(Value::as_str) == Some("dinov2_with_registers");
    if with_registers && cfg.get("num_register_tokens").is_none() {
        c.num_register_tokens = 4;
    }
    if with_registers && cfg.get("patch_size").is_none() {
        c.patch_size = 16; // Dinov2WithRegistersConfig's default differs from Dinov2Config's
    }
    if c.use_swiglu_ffn {
        return Err(ModelError::Unsupported {
            what: "DINOv2 option",
            name: "use_swiglu_ffn = true (giant models)".into(),
        });
    }
    let root = w.root();
    let s = if root.contains("dinov2.embeddings.cls_token") {
        root.pp("dinov2")
    } else {
        root.clone()
    };
    s.ignore("embeddings.mask_token"); // masked-image-modelling only
    let trunk_cfg = TrunkConfig {
        block: BlockConfig {
            dim: c.hidden_size,
            heads: c.num_attention_heads,
            mlp_dim: (c.hidden_size as f64 * c.mlp_ratio) as usize,
            eps: c.layer_norm_eps,
            act: Activation::from_name(&c.hidden_act)?,
            qkv_bias: c.qkv_bias,
            layer_scale: true,
        },
        layers: c.num_hidden_layers,
        patch: c.patch_size,
        patch_bias: true,
        image_size: (c.image_size, c.image_size),
        channels: c.num_channels,
        class_token: true,
        registers: c.num_register_tokens,
        // Registers are inserted after the position embeddings are added: only CLS has one.
        pos_prefix: 1,
        // The two reference classes differ here: only the registers variant antialiases.
        interp: if with_registers {
            PosInterp::BicubicAntialias
        } else {
            PosInterp::Bicubic
        },
    };
    let trunk = VisionTransformer::load(&s, &TRUNK, trunk_cfg)?;
    let head = optional_classifier(&root, "classifier", 2 * c.hidden_size)?;
    let info = ModelInfo {
        architecture: architecture.to_string(),
        family: "dinov2",
        image_size: (c.image_size, c.image_size),
        patch_size: c.patch_size,
        num_layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        prefix_tokens: 1 + c.num_register_tokens,
        labels: head.as_ref().and(hf_labels(cfg)),
        ..Default::default()
    };
    let model = ViT {
        trunk,
        pool: Pool::Token,
        fc_norm: None,
        head,
        head_input: HeadInput::ClsAndMeanPatch,
    };
    Ok(LoadedModel {
        image: Box::new(model),
        text: None,
        info,
    })
}
