//! transformers' `EfficientNetModel` / `EfficientNetForImageClassification`. Its padding differs from
//! timm's: the stem pads right/bottom only, stride-2 depthwise convolutions pad `correct_pad` (one less
//! on the left/top unless the block is listed in `depthwise_padding`), and only repeated blocks of a
//! stage add their input.

use serde::Deserialize;
use serde_json::Value;
use visenc_weights::{Scope, Weights};

use super::{make_divisible, Block, ConvBnAct, EfficientNet, Pad, Pool, SqueezeExcite, Tap};
use crate::api::ModelInfo;
use crate::conv::{Conv, ConvSpec, Padding};
use crate::error::{config_err, ModelError, Result};
use crate::nn::{optional_classifier, Activation};
use crate::vit::hf_labels;
use crate::{parse, LoadedModel};

// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/efficientnet/configuration_efficientnet.py#L68
#[derive(Deserialize)]
#[serde(default)]
struct HfConfig {
    num_channels: usize,
    image_size: ImageSize,
    width_coefficient: f64,
    depth_coefficient: f64,
    depth_divisor: usize,
    kernel_sizes: Vec<usize>,
    in_channels: Vec<usize>,
    out_channels: Vec<usize>,
    depthwise_padding: Vec<usize>,
    strides: Vec<usize>,
    num_block_repeats: Vec<usize>,
    expand_ratios: Vec<usize>,
    squeeze_expansion_ratio: f64,
    hidden_act: String,
    hidden_dim: usize,
    pooling_type: String,
    batch_norm_eps: f64,
}

impl Default for HfConfig {
    fn default() -> Self {
        Self {
            num_channels: 3,
            image_size: ImageSize::Square(600),
            width_coefficient: 2.0,
            depth_coefficient: 3.1,
            depth_divisor: 8,
            kernel_sizes: vec![3, 3, 5, 3, 5, 5, 3],
            in_channels: vec![32, 16, 24, 40, 80, 112, 192],
            out_channels: vec![16, 24, 40, 80, 112, 192, 320],
            depthwise_padding: vec![],
            strides: vec![1, 2, 2, 2, 1, 2, 1],
            num_block_repeats: vec![1, 2, 2, 3, 3, 4, 1],
            expand_ratios: vec![1, 6, 6, 6, 6, 6, 6],
            squeeze_expansion_ratio: 0.25,
            hidden_act: "swish".into(),
            hidden_dim: 2560,
            pooling_type: "mean".into(),
            batch_norm_eps: 1e-3,
        }
    }
}

/// `image_size`: an int or [height, width].
#[derive(Deserialize)]
#[serde(untagged)]
enum ImageSize {
    Square(usize),
    Rect([usize; 2]),
}

/// `conv` + `bn` (folded) under `s` with an activation; `pad` is a `ZeroPad2d` before a "valid" conv.
fn conv_bn(
    s: &Scope,
    conv: &str,
    bn: &str,
    spec: ConvSpec,
    eps: f64,
    pad: Option<Pad>,
    act: Option<Activation>,
) -> Result<ConvBnAct> {
    Ok(ConvBnAct {
        pad,
        conv: Conv::load(s, conv, spec)?.fold_bn(s, bn, eps)?,
        act,
    })
}

/// Loads a transformers EfficientNet.
// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/efficientnet/modeling_efficientnet.py#L340
pub fn load_hf(cfg: &Value, w: &Weights, architecture: &str) -> Result<LoadedModel> {
    let c: HfConfig = parse(cfg, "config.json")?;
    let n = c.in_channels.len();
    let lists = [
        c.out_channels.len(),
        c.kernel_sizes.len(),
        c.strides.len(),
        c.num_block_repeats.len(),
        c.expand_ratios.len(),
    ];
    if n == 0 || lists.iter().any(|&l| l != n) {
        return Err(config_err(
            "in_channels",
            "in_channels, out_channels, kernel_sizes, strides, num_block_repeats and expand_ratios must have one, equal, non-zero length",
        ));
    }
    let pool = match c.pooling_type.as_str() {
        "mean" => Pool::Window {
            window: c.hidden_dim,
            max: false,
        },
        "max" => Pool::Window {
            window: c.hidden_dim,
            max: true,
        },
        other => {
            return Err(ModelError::Unsupported {
                what: "EfficientNet pooling_type",
                name: other.into(),
            })
        }
    };
    let act = Activation::from_name(&c.hidden_act)?;
    let eps = c.batch_norm_eps;
    // Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/efficientnet/modeling_efficientnet.py#L36
    let round_filters = |ch: usize| {
        make_divisible(
            ch as f64 * c.width_coefficient,
            c.depth_divisor,
            c.depth_divisor,
            0.9,
        )
    };
    let round_repeats = |r: usize| (c.depth_coefficient * r as f64).ceil() as usize;

    let root = w.root();
    let s = if root.contains("efficientnet.embeddings.convolution.weight") {
        root.pp("efficientnet")
    } else {
        root.clone()
    };
    // Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/efficientnet/modeling_efficientnet.py#L87
    let stem_pad = Pad {
        left: 0,
        right: 1,
        top: 0,
        bottom: 1,
    };
    let stem_chs = round_filters(32);
    let stem_spec = ConvSpec::new(c.num_channels, stem_chs, 3, 2).padding(Padding::Symmetric(0));
    let stem = conv_bn(
        &s.pp("embeddings"),
        "convolution",
        "batchnorm",
        stem_spec,
        eps,
        Some(stem_pad),
        Some(act),
    )?;

    let mut stages = Vec::new();
    let mut taps = Vec::new();
    let mut reduction = 2;
    let mut block_num = 0;
    let mut out_dim = stem_chs;
    for i in 0..n {
        let (k, stride, expand_ratio) = (c.kernel_sizes[i], c.strides[i], c.expand_ratios[i]);
        let first_in = round_filters(c.in_channels[i]);
        out_dim = round_filters(c.out_channels[i]);
        let mut blocks = Vec::new();
        for j in 0..round_repeats(c.num_block_repeats[i]) {
            let (in_dim, stride) = if j == 0 {
                (first_in, stride)
            } else {
                (out_dim, 1)
            };
            let bs = s.pp(format!("encoder.blocks.{block_num}"));
            let expand = expand_ratio != 1;
            let mid = in_dim * expand_ratio;
            let mut convs = Vec::new();
            if expand {
                let spec = ConvSpec::new(in_dim, mid, 1, 1);
                convs.push(conv_bn(
                    &bs.pp("expansion"),
                    "expand_conv",
                    "expand_bn",
                    spec,
                    eps,
                    None,
                    Some(act),
                )?);
            }
            // Stride 2: `ZeroPad2d(correct_pad(k, adjust))` then "valid"; stride 1: PyTorch
            // `padding="same"`, which at stride 1 is TF "SAME".
            // Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/efficientnet/modeling_efficientnet.py#L51
            let dw = ConvSpec::new(mid, mid, k, stride).groups(mid);
            let (dw, pad) = match stride {
                1 => (dw.padding(Padding::TfSame), None),
                2 => {
                    let adjust = !c.depthwise_padding.contains(&block_num);
                    let before = if adjust {
                        (k / 2).checked_sub(1)
                    } else {
                        Some(k / 2)
                    };
                    let before = before.ok_or_else(|| {
                        config_err(
                            "kernel_sizes",
                            format!("a {k}x{k} stride-2 depthwise kernel cannot take correct_pad"),
                        )
                    })?;
                    (
                        dw.padding(Padding::Symmetric(0)),
                        Some(Pad {
                            left: before,
                            right: k / 2,
                            top: before,
                            bottom: k / 2,
                        }),
                    )
                }
                other => {
                    return Err(ModelError::Unsupported {
                        what: "EfficientNet stride",
                        name: other.to_string(),
                    })
                }
            };
            convs.push(conv_bn(
                &bs.pp("depthwise_conv"),
                "depthwise_conv",
                "depthwise_norm",
                dw,
                eps,
                pad,
                Some(act),
            )?);
            // Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/efficientnet/modeling_efficientnet.py#L187
            let dim_se = ((in_dim as f64 * c.squeeze_expansion_ratio) as usize).max(1);
            let se_s = bs.pp("squeeze_excite");
            let se = SqueezeExcite {
                reduce: Conv::load(&se_s, "reduce", ConvSpec::new(mid, dim_se, 1, 1).bias(true))?,
                expand: Conv::load(&se_s, "expand", ConvSpec::new(dim_se, mid, 1, 1).bias(true))?,
                act,
            };
            let project = conv_bn(
                &bs.pp("projection"),
                "project_conv",
                "project_bn",
                ConvSpec::new(mid, out_dim, 1, 1),
                eps,
                None,
                None,
            )?;
            // `apply_dropout = stride == 1 and not id_skip`: the first block of a stage never adds.
            // Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/efficientnet/modeling_efficientnet.py#L226
            blocks.push(Block {
                convs,
                se: Some(se),
                project: Some(project),
                residual: stride == 1 && j > 0,
            });
            block_num += 1;
        }
        reduction *= stride;
        taps.push(Tap {
            stage: Some(i),
            reduction,
        });
        stages.push(blocks);
    }
    let top_chs = round_filters(1280);
    if top_chs != c.hidden_dim {
        return Err(config_err(
            "hidden_dim",
            format!(
                "top_bn has hidden_dim = {} channels but top_conv has round_filters(1280) = {top_chs}",
                c.hidden_dim
            ),
        ));
    }
    let enc = s.pp("encoder");
    let head = conv_bn(
        &enc,
        "top_conv",
        "top_bn",
        ConvSpec::new(out_dim, top_chs, 1, 1),
        eps,
        None,
        Some(act),
    )?;
    let classifier = optional_classifier(&root, "classifier", top_chs)?;
    let image_size = match c.image_size {
        ImageSize::Square(s) => (s, s),
        ImageSize::Rect([h, w]) => (h, w),
    };
    let info = ModelInfo {
        architecture: architecture.to_string(),
        family: "efficientnet",
        image_size,
        num_layers: block_num,
        hidden_size: top_chs,
        labels: classifier.as_ref().and(hf_labels(cfg)),
        ..Default::default()
    };
    let model = EfficientNet::new(stem, stages, head, pool, classifier, taps).channels_last()?;
    Ok(LoadedModel {
        image: Box::new(model),
        text: None,
        info,
    })
}
