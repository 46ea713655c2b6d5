//! timm's `EfficientNet` class as its EfficientNet generators build it: the architecture is a list of
//! block strings per stage (`ir_r2_k3_s2_e6_c24_se0.25`), scaled by a channel and a depth multiplier.
//! We decode the same strings with the same rounding, so every weight shape follows from the name.

use serde::Deserialize;
use serde_json::Value;
use visenc_weights::{Scope, Weights};

use super::{make_divisible, Block, ConvBnAct, EfficientNet, Pool, SqueezeExcite, Tap};
use crate::api::ModelInfo;
use crate::conv::{Conv, ConvSpec, Padding};
use crate::error::{config_err, ModelError, Result};
use crate::nn::{linear, Activation};
use crate::vit::timm_labels;
use crate::LoadedModel;

/// Which timm generator builds the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generator {
    /// `_gen_efficientnet`: B0-B8, L2, with squeeze-excite and SiLU.
    EfficientNet,
    /// `_gen_efficientnet_lite`: no SE, ReLU6, stem/head and first/last stage depth not scaled.
    Lite,
    /// `_gen_test_efficientnet`: timm's tiny test model (cn/er/ir blocks).
    Test,
}

// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/efficientnet.py#L750
const EFFICIENTNET_ARCH: &[&[&str]] = &[
    &["ds_r1_k3_s1_e1_c16_se0.25"],
    &["ir_r2_k3_s2_e6_c24_se0.25"],
    &["ir_r2_k5_s2_e6_c40_se0.25"],
    &["ir_r3_k3_s2_e6_c80_se0.25"],
    &["ir_r3_k5_s1_e6_c112_se0.25"],
    &["ir_r4_k5_s2_e6_c192_se0.25"],
    &["ir_r1_k3_s1_e6_c320_se0.25"],
];

// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/efficientnet.py#L864
const LITE_ARCH: &[&[&str]] = &[
    &["ds_r1_k3_s1_e1_c16"],
    &["ir_r2_k3_s2_e6_c24"],
    &["ir_r2_k5_s2_e6_c40"],
    &["ir_r3_k3_s2_e6_c80"],
    &["ir_r3_k5_s1_e6_c112"],
    &["ir_r4_k5_s2_e6_c192"],
    &["ir_r1_k3_s1_e6_c320"],
];

// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/efficientnet.py#L1332
const TEST_ARCH: &[&[&str]] = &[
    &["cn_r1_k3_s1_e1_c16_skip"],
    &["er_r1_k3_s2_e4_c24"],
    &["er_r1_k3_s2_e4_c32"],
    &["ir_r1_k3_s2_e4_c48_se0.25"],
    &["ir_r1_k3_s2_e4_c64_se0.25"],
];

impl Generator {
    fn arch(self) -> &'static [&'static [&'static str]] {
        match self {
            Self::EfficientNet => EFFICIENTNET_ARCH,
            Self::Lite => LITE_ARCH,
            Self::Test => TEST_ARCH,
        }
    }
}

/// The registered model names we build: generator, channel and depth multipliers, and whether it
/// is a `tf_` port (BatchNorm eps 1e-3 and TF "SAME" padding by default).
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/efficientnet.py#L2107
fn preset(name: &str) -> Option<(Generator, f64, f64, bool)> {
    const B: [(f64, f64); 9] = [
        (1.0, 1.0),
        (1.0, 1.1),
        (1.1, 1.2),
        (1.2, 1.4),
        (1.4, 1.8),
        (1.6, 2.2),
        (1.8, 2.6),
        (2.0, 3.1),
        (2.2, 3.6),
    ];
    const LITE: [(f64, f64); 5] = [(1.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.4), (1.4, 1.8)];
    if name == "test_efficientnet" {
        return Some((Generator::Test, 1.0, 1.0, false));
    }
    let (tf, rest) = match name.strip_prefix("tf_") {
        Some(r) => (true, r),
        None => (false, name),
    };
    let rest = rest.strip_prefix("efficientnet_")?;
    let index = |s: &str, n: usize| s.parse::<usize>().ok().filter(|&i| i < n);
    let (g, (ch, depth)) = if rest == "l2" {
        (Generator::EfficientNet, (4.3, 5.3))
    } else if let Some(i) = rest.strip_prefix("lite").and_then(|s| index(s, LITE.len())) {
        (Generator::Lite, LITE[i])
    } else if let Some(i) = rest.strip_prefix('b').and_then(|s| index(s, B.len())) {
        (Generator::EfficientNet, B[i])
    } else {
        return None;
    };
    Some((g, ch, depth, tf))
}

/// The kinds of block in timm's block strings that EfficientNet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `DepthwiseSeparableConv`: conv_dw -> bn1(act) -> se -> conv_pw -> bn2.
    Ds,
    /// `InvertedResidual`: conv_pw -> bn1(act) -> conv_dw -> bn2(act) -> se -> conv_pwl -> bn3.
    Ir,
    /// `EdgeResidual`: conv_exp (k x k) -> bn1(act) -> se -> conv_pwl -> bn2.
    Er,
    /// `ConvBnAct`: conv -> bn1(act).
    Cn,
}

/// One decoded block string.
#[derive(Debug, Clone)]
struct BlockDef {
    kind: Kind,
    repeats: usize,
    kernel: usize,
    stride: usize,
    exp_ratio: f64,
    out_chs: usize,
    se_ratio: f64,
    /// `noskip` (ir/ds/er) or the absence of `skip` (cn).
    skip: bool,
}

/// Decodes a block string such as `ir_r2_k3_s2_e6_c24_se0.25`; options we do not implement
/// (activation overrides, group sizes, kernel lists, CondConv, space-to-depth) are refused.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/_efficientnet_builder.py#L81
fn decode_block(s: &str) -> Result<BlockDef> {
    let unsupported = |what: &str| ModelError::Unsupported {
        what: "timm EfficientNet block option",
        name: format!("{what} in {s:?}"),
    };
    let mut ops = s.split('_');
    let kind = match ops.next() {
        Some("ds") => Kind::Ds,
        Some("ir") => Kind::Ir,
        Some("er") => Kind::Er,
        Some("cn") => Kind::Cn,
        other => return Err(unsupported(&format!("block type {other:?}"))),
    };
    let mut def = BlockDef {
        kind,
        repeats: 0,
        kernel: 0,
        stride: 0,
        exp_ratio: 1.0,
        out_chs: 0,
        se_ratio: 0.0,
        skip: kind != Kind::Cn,
    };
    for op in ops {
        match op {
            "noskip" => def.skip = false,
            "skip" => def.skip = true,
            _ => {
                let at = op
                    .find(|c: char| c.is_ascii_digit())
                    .ok_or_else(|| unsupported(op))?;
                let (key, value) = op.split_at(at);
                let int = || value.parse::<usize>().map_err(|_| unsupported(op));
                let float = || value.parse::<f64>().map_err(|_| unsupported(op));
                match key {
                    "r" => def.repeats = int()?,
                    "k" => def.kernel = int()?,
                    "s" => def.stride = int()?,
                    "e" => def.exp_ratio = float()?,
                    "c" => def.out_chs = int()?,
                    "se" => def.se_ratio = float()?,
                    _ => return Err(unsupported(op)),
                }
            }
        }
    }
    if !matches!(def.stride, 1 | 2) || def.kernel == 0 {
        return Err(unsupported("stride or kernel"));
    }
    if matches!(kind, Kind::Ds | Kind::Cn) {
        // Only ir and er blocks read the expansion ratio (`e1` in ds/cn strings is ignored).
        def.exp_ratio = 1.0;
    }
    if kind == Kind::Cn {
        def.se_ratio = 0.0;
    }
    Ok(def)
}

/// Scales the repeats of one stage (ceil of the total, handed out in reverse) and expands it.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/_efficientnet_builder.py#L232
fn scale_stage(defs: Vec<BlockDef>, depth_multiplier: f64) -> Vec<BlockDef> {
    let mut num_repeat: usize = defs.iter().map(|d| d.repeats).sum();
    let mut scaled = (num_repeat as f64 * depth_multiplier).ceil() as usize;
    let mut reps = vec![0; defs.len()];
    for (i, d) in defs.iter().enumerate().rev() {
        let rs = ((d.repeats as f64 / num_repeat as f64 * scaled as f64).round_ties_even()
            as usize)
            .max(1);
        reps[i] = rs;
        num_repeat -= d.repeats;
        scaled = scaled.saturating_sub(rs);
    }
    defs.into_iter()
        .zip(reps)
        .flat_map(|(d, r)| std::iter::repeat_n(d, r))
        .collect()
}

/// timm constructor arguments visenc honours (preset from the name, then `model_args`).
#[derive(Debug, Deserialize)]
struct TimmArgs {
    channel_multiplier: f64,
    depth_multiplier: f64,
    num_classes: usize,
    in_chans: usize,
    global_pool: String,
    pad_type: String,
    bn_eps: Option<f64>,
    act_layer: Option<String>,
    output_stride: usize,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// (in channels, out channels, kernel, stride, groups) of a convolution.
type ConvShape = (usize, usize, usize, usize, usize);

/// How timm pads, normalises and activates the convolutions of one model.
struct Ctx {
    same: bool,
    eps: f64,
    act: Activation,
}

impl Ctx {
    /// `create_conv2d(padding=pad_type)`: PyTorch padding `((s - 1) + (k - 1)) // 2` for `''`;
    /// for `'same'` static symmetric padding where possible (stride 1, odd k), else TF "SAME".
    // Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/layers/padding.py#L67
    fn padding(&self, k: usize, stride: usize) -> Padding {
        if !self.same {
            Padding::Symmetric((stride - 1 + k - 1) / 2)
        } else if stride == 1 && k % 2 == 1 {
            Padding::Symmetric((k - 1) / 2)
        } else {
            Padding::TfSame
        }
    }

    /// `conv` + `bn` (folded) under `s`, with the activation when `act`.
    fn conv_bn(
        &self,
        s: &Scope,
        conv: &str,
        bn: &str,
        shape: ConvShape,
        act: bool,
    ) -> Result<ConvBnAct> {
        let (cin, cout, k, stride, groups) = shape;
        let spec = ConvSpec::new(cin, cout, k, stride)
            .groups(groups)
            .padding(self.padding(k, stride));
        let conv = Conv::load(s, conv, spec)?.fold_bn(s, bn, self.eps)?;
        Ok(ConvBnAct {
            pad: None,
            conv,
            act: act.then_some(self.act),
        })
    }

    /// `se.conv_reduce` / `se.conv_expand` on `chs` channels reduced to `round(chs * ratio)`.
    fn se(&self, s: &Scope, chs: usize, ratio: f64) -> Result<Option<SqueezeExcite>> {
        if ratio <= 0.0 {
            return Ok(None);
        }
        // Python's round (half to even), as `SqueezeExcite(rd_round_fn=round)`.
        let rd = (chs as f64 * ratio).round_ties_even() as usize;
        let s = s.pp("se");
        Ok(Some(SqueezeExcite {
            reduce: Conv::load(&s, "conv_reduce", ConvSpec::new(chs, rd, 1, 1).bias(true))?,
            expand: Conv::load(&s, "conv_expand", ConvSpec::new(rd, chs, 1, 1).bias(true))?,
            act: self.act,
        }))
    }
}

/// Builds one block of `d` from `cin` to `cout` channels at `stride`.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/_efficientnet_blocks.py#L133
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/_efficientnet_blocks.py#L218
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/_efficientnet_blocks.py#L324
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/_efficientnet_blocks.py#L751
fn block(
    c: &Ctx,
    s: &Scope,
    d: &BlockDef,
    cin: usize,
    cout: usize,
    stride: usize,
) -> Result<Block> {
    let k = d.kernel;
    let residual = d.skip && stride == 1 && cin == cout;
    // The builder divides the SE ratio by the expansion ratio (`se_from_exp=False`): SE widths follow
    // the block input, applied to the expanded channels.
    let se_ratio = d.se_ratio / d.exp_ratio;
    Ok(match d.kind {
        Kind::Cn => Block {
            convs: vec![c.conv_bn(s, "conv", "bn1", (cin, cout, k, stride, 1), true)?],
            se: None,
            project: None,
            residual,
        },
        Kind::Ds => Block {
            convs: vec![c.conv_bn(s, "conv_dw", "bn1", (cin, cin, k, stride, cin), true)?],
            se: c.se(s, cin, se_ratio)?,
            project: Some(c.conv_bn(s, "conv_pw", "bn2", (cin, cout, 1, 1, 1), false)?),
            residual,
        },
        Kind::Ir => {
            let mid = make_divisible(cin as f64 * d.exp_ratio, 8, 8, 0.9);
            Block {
                convs: vec![
                    c.conv_bn(s, "conv_pw", "bn1", (cin, mid, 1, 1, 1), true)?,
                    c.conv_bn(s, "conv_dw", "bn2", (mid, mid, k, stride, mid), true)?,
                ],
                se: c.se(s, mid, se_ratio)?,
                project: Some(c.conv_bn(s, "conv_pwl", "bn3", (mid, cout, 1, 1, 1), false)?),
                residual,
            }
        }
        Kind::Er => {
            let mid = make_divisible(cin as f64 * d.exp_ratio, 8, 8, 0.9);
            Block {
                convs: vec![c.conv_bn(s, "conv_exp", "bn1", (cin, mid, k, stride, 1), true)?],
                se: c.se(s, mid, se_ratio)?,
                project: Some(c.conv_bn(s, "conv_pwl", "bn2", (mid, cout, 1, 1, 1), false)?),
                residual,
            }
        }
    })
}

/// Loads a timm EfficientNet / EfficientNet-Lite (`efficientnet_b0`, `tf_efficientnet_b3`,
/// `efficientnet_lite0`, `tf_efficientnet_lite4`, ..., and timm's `test_efficientnet`).
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/efficientnet.py#L73
pub fn load_timm(arch: &str, cfg: &Value, w: &Weights) -> Result<LoadedModel> {
    let (model, info) = build_timm(arch, cfg, w)?;
    Ok(LoadedModel {
        image: Box::new(model.channels_last()?),
        text: None,
        info,
    })
}

/// The model [`load_timm`] wraps (channels first), and its info.
pub(super) fn build_timm(
    arch: &str,
    cfg: &Value,
    w: &Weights,
) -> Result<(EfficientNet, ModelInfo)> {
    let base = arch.split('.').next().unwrap_or_default();
    let (generator, ch, depth, tf) = preset(base).ok_or_else(|| ModelError::Unsupported {
        what: "timm EfficientNet architecture",
        name: arch.into(),
    })?;
    let defaults = serde_json::json!({
        "channel_multiplier": ch, "depth_multiplier": depth, "num_classes": 1000, "in_chans": 3,
        "global_pool": "avg", "pad_type": if tf { "same" } else { "" }, "bn_eps": if tf { Some(1e-3) } else { None },
        "act_layer": null, "output_stride": 32,
    });
    let args = crate::timm_args(defaults.as_object().cloned().unwrap_or_default(), cfg);
    let a: TimmArgs = serde_json::from_value(Value::Object(args))
        .map_err(|e| config_err("model_args", e.to_string()))?;
    for (k, v) in &a.other {
        if !matches!(
            k.as_str(),
            "drop_rate" | "drop_path_rate" | "bn_momentum" | "pretrained_cfg"
        ) {
            return Err(ModelError::Unsupported {
                what: "timm EfficientNet argument",
                name: format!("{k} = {v}"),
            });
        }
    }
    if a.global_pool != "avg" {
        return Err(ModelError::Unsupported {
            what: "timm EfficientNet global_pool",
            name: a.global_pool,
        });
    }
    if a.output_stride != 32 {
        return Err(ModelError::Unsupported {
            what: "timm EfficientNet output_stride (dilation)",
            name: a.output_stride.to_string(),
        });
    }
    let same = match a.pad_type.as_str() {
        "" => false,
        "same" => true,
        other => {
            return Err(ModelError::Unsupported {
                what: "timm EfficientNet pad_type",
                name: other.into(),
            })
        }
    };
    let default_act = if generator == Generator::Lite {
        "relu6"
    } else {
        "silu"
    };
    let act = Activation::from_name(a.act_layer.as_deref().unwrap_or(default_act))?;
    // `round_channels`: the test generator never rounds up (round_limit=0); a zero multiplier
    // leaves channels as they are.
    let round_limit = if generator == Generator::Test {
        0.0
    } else {
        0.9
    };
    let round_chs = |c: usize| {
        if a.channel_multiplier == 0.0 {
            c
        } else {
            make_divisible(c as f64 * a.channel_multiplier, 8, 8, round_limit)
        }
    };
    let (stem_chs, num_features) = match generator {
        Generator::EfficientNet => (round_chs(32), round_chs(1280)),
        Generator::Lite => (32, 1280),
        Generator::Test => (round_chs(24), round_chs(256)),
    };

    // decode_arch_def: depth scaling, with the first and last stage fixed for Lite.
    // Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/_efficientnet_builder.py#L270
    let arch_def = generator.arch();
    let stages_def = arch_def
        .iter()
        .enumerate()
        .map(|(i, strings)| {
            let defs = strings
                .iter()
                .map(|s| decode_block(s))
                .collect::<Result<Vec<_>>>()?;
            let fixed = generator == Generator::Lite && (i == 0 || i + 1 == arch_def.len());
            Ok(scale_stage(
                defs,
                if fixed { 1.0 } else { a.depth_multiplier },
            ))
        })
        .collect::<Result<Vec<_>>>()?;

    let root = w.root();
    let c = Ctx {
        same,
        eps: a.bn_eps.unwrap_or(1e-5),
        act,
    };
    let stem = c.conv_bn(
        &root,
        "conv_stem",
        "bn1",
        (a.in_chans, stem_chs, 3, 2, 1),
        true,
    )?;

    // EfficientNetBuilder.__call__: only a stage's first block strides; a feature level ends where
    // the next stage strides (or the network ends); a strided first block taps the stem.
    // Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/_efficientnet_builder.py#L433
    let mut taps = Vec::new();
    if stages_def
        .first()
        .and_then(|s| s.first())
        .is_some_and(|d| d.stride > 1)
    {
        taps.push(Tap {
            stage: None,
            reduction: 2,
        });
    }
    let mut cin = stem_chs;
    let mut reduction = 2;
    let mut stages = Vec::new();
    for (i, defs) in stages_def.iter().enumerate() {
        let mut blocks = Vec::new();
        for (j, d) in defs.iter().enumerate() {
            let stride = if j == 0 { d.stride } else { 1 };
            reduction *= stride;
            let cout = round_chs(d.out_chs);
            let s = root.pp(format!("blocks.{i}.{j}"));
            blocks.push(block(&c, &s, d, cin, cout, stride)?);
            cin = cout;
        }
        let next_strides = stages_def
            .get(i + 1)
            .and_then(|s| s.first())
            .is_none_or(|d| d.stride > 1);
        if next_strides {
            taps.push(Tap {
                stage: Some(i),
                reduction,
            });
        }
        stages.push(blocks);
    }
    // `features_only` keeps out_indices (0, 1, 2, 3, 4).
    taps.truncate(5);
    let head = c.conv_bn(
        &root,
        "conv_head",
        "bn2",
        (cin, num_features, 1, 1, 1),
        true,
    )?;
    let classifier = (a.num_classes > 0)
        .then(|| linear(&root, "classifier", num_features, a.num_classes, true))
        .transpose()?;
    let labels = timm_labels(cfg, a.num_classes);
    let image_size = cfg
        .get("pretrained_cfg")
        .and_then(|p| p.get("input_size"))
        .and_then(|s| serde_json::from_value::<[usize; 3]>(s.clone()).ok())
        .map(|[_, h, w]| (h, w))
        .unwrap_or_default();
    let info = ModelInfo {
        architecture: arch.to_string(),
        family: "efficientnet",
        image_size,
        num_layers: stages.iter().map(Vec::len).sum(),
        hidden_size: num_features,
        labels: classifier.as_ref().and(labels),
        ..Default::default()
    };
    let model = EfficientNet::new(stem, stages, head, Pool::Mean, classifier, taps);
    Ok((model, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_block_strings() {
        let d = decode_block("ir_r3_k5_s2_e6_c112_se0.25").unwrap();
        assert_eq!(
            (d.kind, d.repeats, d.kernel, d.stride, d.out_chs, d.skip),
            (Kind::Ir, 3, 5, 2, 112, true)
        );
        assert_eq!((d.exp_ratio, d.se_ratio), (6.0, 0.25));
        assert!(decode_block("cn_r1_k3_s1_e1_c16_skip").unwrap().skip);
        assert!(!decode_block("er_r1_k3_s1_e4_c24_noskip").unwrap().skip);
        assert!(matches!(
            decode_block("ir_r1_k3_s1_e6_c24_nre"),
            Err(ModelError::Unsupported { .. })
        ));
        assert!(matches!(
            decode_block("uir_r1_k3_s1_e6_c24"),
            Err(ModelError::Unsupported { .. })
        ));
    }

    #[test]
    fn scales_depth_like_timm() {
        // efficientnet_b3 (depth 1.4): repeats [1, 2, 2, 3, 3, 4, 1] -> [2, 3, 3, 5, 5, 6, 2].
        let got: Vec<usize> = EFFICIENTNET_ARCH
            .iter()
            .map(|s| scale_stage(vec![decode_block(s[0]).unwrap()], 1.4).len())
            .collect();
        assert_eq!(got, [2, 3, 3, 5, 5, 6, 2]);
    }

    #[test]
    fn presets() {
        assert_eq!(
            preset("tf_efficientnet_b3"),
            Some((Generator::EfficientNet, 1.2, 1.4, true))
        );
        assert_eq!(
            preset("efficientnet_lite4"),
            Some((Generator::Lite, 1.4, 1.8, false))
        );
        assert_eq!(preset("efficientnet_b9"), None);
        assert_eq!(preset("efficientnet_b0_gn"), None);
        assert_eq!(preset("efficientnetv2_s"), None);
    }
}
