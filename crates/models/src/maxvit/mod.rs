//! MaxViT from timm (`maxvit_*`: the TensorFlow ports `maxvit_{tiny,small,base,large,xlarge}_tf_*`
//! and timm's own `maxvit_{pico,nano,tiny}_rw_*`): a convolutional stem, then stages of MaxViT
//! blocks (an MBConv block, block attention over non-overlapping windows, grid attention over a
//! strided grid, both with a learned relative position bias), then timm's classifier head.
//!
//! Weight paths are timm's state-dict keys. BatchNorms that follow a convolution are folded into it
//! at load time. The partition (window and grid) size is fixed when the model is built, as in timm:
//! `img_size / partition_ratio` unless the checkpoint names it, so inputs must give stage maps that
//! those partitions divide (the trained size always does).

mod blocks;
mod config;

use candle_core::{Module, Tensor};
use serde_json::Value;
use visenc_weights::Weights;

use crate::api::{EncodeOptions, FeatureMap, ImageEncoder, ImageFeatures, ModelInfo};
use crate::conv::{global_avg_pool, layer_norm_2d, Conv, ConvSpec};
use crate::error::Result;
use crate::nn::{layer_norm, linear, Activation};
use crate::vit::timm_labels;
use crate::LoadedModel;
use blocks::{conv_padding, Block};

/// timm's two heads: `NormMlpClassifierHead` when `head_hidden_size` is set (pool, LayerNorm,
/// `pre_logits` fc + tanh, fc), else `ClassifierHead` (pool, fc) after the model's final `norm`.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/layers/classifier.py#L266
struct Head {
    norm: Option<crate::nn::LayerNorm>,
    pre_logits: Option<crate::linear::Linear>,
    fc: Option<crate::linear::Linear>,
}

/// `LayerNorm2d` over the channels of a [B, C, H, W] map.
struct LayerNorm2d {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

pub struct MaxVit {
    /// `stem.conv1` (BN folded), act, `stem.conv2`.
    stem: (Conv, Activation, Conv),
    stages: Vec<Vec<Block>>,
    /// The final `norm` of `forward_features` (only without `head_hidden_size`).
    norm: Option<LayerNorm2d>,
    head: Head,
}

impl ImageEncoder for MaxVit {
    // Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L1711
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        opts.refuse_layers("MaxViT")?;
        let (conv1, act, conv2) = &self.stem;
        let mut x = conv2.forward(&act.forward(&conv1.forward(pixels)?)?)?;
        // timm `features_only`: the stem output (reduction 2), then every stage's output.
        let mut maps = Vec::new();
        let mut reduction = 2;
        if opts.features {
            maps.push(FeatureMap {
                reduction,
                map: x.clone(),
            });
        }
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x)?;
            }
            reduction *= 2;
            if opts.features {
                maps.push(FeatureMap {
                    reduction,
                    map: x.clone(),
                });
            }
        }
        if let Some(n) = &self.norm {
            x = layer_norm_2d(&x, &n.weight, &n.bias, n.eps)?;
        }
        let mut pooled = global_avg_pool(&x)?;
        if let Some(n) = &self.head.norm {
            pooled = n.forward(&pooled)?;
        }
        if let Some(fc) = &self.head.pre_logits {
            pooled = fc.forward(&pooled)?.tanh()?;
        }
        let logits = self
            .head
            .fc
            .as_ref()
            .map(|fc| fc.forward(&pooled))
            .transpose()?;
        ImageFeatures::from_map(pooled, logits, &x, maps, opts)
    }
}

/// Loads a timm MaxViT saved in timm's hub layout (config.json with `architecture`, `model_args`,
/// `pretrained_cfg`; model.safetensors).
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L1448
pub fn load_timm(arch: &str, cfg: &Value, w: &Weights) -> Result<LoadedModel> {
    let base = arch.split('.').next().unwrap_or_default();
    let m = config::resolve(base, cfg)?;
    let (a, t) = (&m.a, &m.t);
    let root = w.root();
    let same = m.c.same();
    let (s0, s1) = a.stem_width.get();
    let stem1 = ConvSpec::new(a.in_chans, s0, 3, 2)
        .bias(a.stem_bias)
        .padding(conv_padding(same, 3, 2));
    let stem2 = ConvSpec::new(s0, s1, 3, 1)
        .bias(a.stem_bias)
        .padding(conv_padding(same, 3, 1));
    // Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L1367
    let stem = (
        Conv::load(&root, "stem.conv1", stem1)?.fold_bn(&root, "stem.norm1", m.c.eps())?,
        m.acts.conv,
        Conv::load(&root, "stem.conv2", stem2)?,
    );
    let mut cin = s1;
    let mut stages = Vec::new();
    for (i, (&cout, &depth)) in a.embed_dim.iter().zip(&a.depths).enumerate() {
        let mut blocks = Vec::new();
        for j in 0..depth {
            let stride = if j == 0 { 2 } else { 1 };
            blocks.push(Block::load(
                &root.pp(format!("stages.{i}.blocks.{j}")),
                cin,
                cout,
                stride,
                &m,
            )?);
            cin = cout;
        }
        stages.push(blocks);
    }
    let head_fc = |width: usize| {
        (a.num_classes > 0)
            .then(|| linear(&root, "head.fc", width, a.num_classes, true))
            .transpose()
    };
    let (norm, head, pooled_width) = match a.head_hidden_size {
        Some(hidden) => {
            let head = Head {
                norm: Some(layer_norm(&root, "head.norm", cin, t.norm_eps)?),
                pre_logits: Some(linear(&root, "head.pre_logits.fc", cin, hidden, true)?),
                fc: head_fc(hidden)?,
            };
            (None, head, hidden)
        }
        None => {
            let (weight, bias) = (root.get(cin, "norm.weight")?, root.get(cin, "norm.bias")?);
            let norm = LayerNorm2d {
                weight,
                bias,
                eps: t.norm_eps,
            };
            let head = Head {
                norm: None,
                pre_logits: None,
                fc: head_fc(cin)?,
            };
            (Some(norm), head, cin)
        }
    };
    let info = ModelInfo {
        architecture: arch.to_string(),
        family: "maxvit",
        image_size: a.img_size.get(),
        num_layers: a.depths.iter().sum(),
        hidden_size: pooled_width,
        labels: head.fc.as_ref().and(timm_labels(cfg, a.num_classes)),
        ..Default::default()
    };
    let model = MaxVit {
        stem,
        stages,
        norm,
        head,
    };
    Ok(LoadedModel {
        image: Box::new(model),
        text: None,
        info,
    })
}
