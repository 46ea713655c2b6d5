//! ResNet in the transformers layout (`ResNetModel`, `ResNetForImageClassification`) and the
//! timm / torchvision layout (`conv1`, `layer1.0.conv1`, `downsample.0`, `fc`), which are the same
//! keys. BatchNorms are folded into their convolutions at load time. With f32 weights on the CPU the
//! trunk runs channels last ([`nhwc`]), for every input (pixels come to the CPU as f32), and the
//! channels-first convolutions are dropped once the channels-last ones are made.

mod nhwc;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;
use visenc_kernels::Precision;
use visenc_weights::{Scope, Weights};

use crate::api::{EncodeOptions, FeatureMap, ImageEncoder, ImageFeatures, ModelInfo};
use crate::conv::{global_avg_pool, max_pool_3x3_s2_p1, Conv, ConvSpec};
use crate::error::{config_err, ModelError, Result};
use crate::nn::{linear, optional_classifier, Activation};
use crate::vit::{hf_labels, timm_labels};
use crate::{parse, LoadedModel};

/// BatchNorm eps of both references (`nn.BatchNorm2d` default).
const BN_EPS: f64 = 1e-5;

/// A residual block: convolutions (BN folded) with the activation after all but the last, the
/// shortcut, the sum, then the activation.
// Reference: https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/resnet/modeling_resnet.py#L140
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.11/timm/models/resnet.py#L131
struct Block {
    convs: Vec<Conv>,
    shortcut: Option<Conv>,
}

impl Block {
    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let residual = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        let mut y = x.clone();
        for (i, c) in self.convs.iter().enumerate() {
            // The last convolution adds the shortcut before the activation.
            let r = (i + 1 == self.convs.len()).then_some(&residual);
            y = c.forward_with(&y, r, Some(act))?;
        }
        Ok(y)
    }
}

/// Where the pyramid levels are taken, per reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Features {
    /// HF backbone `out_features=["stage1", ..]`: every stage.
    Hf,
    /// timm `features_only`: `act1` (the stem before the max-pool, reduction 2), then every stage.
    Timm,
}

pub struct ResNet {
    path: Path,
    act: Activation,
    head: Option<crate::linear::Linear>,
    features: Features,
}

/// The trunk's convolutions, in the one form its forward pass uses ([`nhwc`] for channels last).
type Path = crate::nhwc::Form<Convs, nhwc::NhwcWeights>;

/// The convolutions as loaded (BatchNorm folded).
struct Convs {
    stem: Conv,
    stages: Vec<Vec<Block>>,
}

impl ImageEncoder for ResNet {
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        opts.refuse_layers("ResNet")?;
        let convs = match &self.path {
            Path::ChannelsLast(w) => {
                // The weights are f32 or quantised on the CPU: pixels come there as f32.
                let px = pixels.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let t = w.trunk(&px, opts.features.then_some(self.features))?;
                let logits = self
                    .head
                    .as_ref()
                    .map(|h| h.forward(&t.pooled))
                    .transpose()?;
                return ImageFeatures::from_map(t.pooled, logits, &t.last, t.maps, opts);
            }
            Path::Candle(c) => c,
        };
        let mut maps = Vec::new();
        let stem = convs.stem.forward_with(pixels, None, Some(self.act))?;
        if opts.features && self.features == Features::Timm {
            maps.push(FeatureMap {
                reduction: 2,
                map: stem.clone(),
            });
        }
        let mut x = max_pool_3x3_s2_p1(&stem)?;
        let mut reduction = 4;
        for (i, stage) in convs.stages.iter().enumerate() {
            for b in stage {
                x = b.forward(&x, self.act)?;
            }
            if i > 0 {
                reduction *= 2;
            }
            if opts.features {
                maps.push(FeatureMap {
                    reduction,
                    map: x.clone(),
                });
            }
        }
        let pooled = global_avg_pool(&x)?;
        let logits = self.head.as_ref().map(|h| h.forward(&pooled)).transpose()?;
        ImageFeatures::from_map(pooled, logits, &x, maps, opts)
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct HfConfig {
    num_channels: usize,
    embedding_size: usize,
    hidden_sizes: Vec<usize>,
    depths: Vec<usize>,
    layer_type: String,
    hidden_act: String,
    downsample_in_first_stage: bool,
    downsample_in_bottleneck: bool,
}

impl Default for HfConfig {
    fn default() -> Self {
        Self {
            num_channels: 3,
            embedding_size: 64,
            hidden_sizes: vec![256, 512, 1024, 2048],
            depths: vec![3, 4, 6, 3],
            layer_type: "bottleneck".into(),
            hidden_act: "relu".into(),
            downsample_in_first_stage: false,
            downsample_in_bottleneck: false,
        }
    }
}

fn conv_bn(s: &Scope, conv: &str, bn: &str, spec: ConvSpec) -> Result<Conv> {
    Conv::load(s, conv, spec)?.fold_bn(s, bn, BN_EPS)
}

/// Loads a transformers ResNet.
pub fn load_hf(cfg: &Value, w: &Weights, architecture: &str) -> Result<LoadedModel> {
    let c: HfConfig = parse(cfg, "config.json")?;
    if c.hidden_sizes.len() != c.depths.len() || c.depths.is_empty() {
        return Err(config_err(
            "depths",
            "hidden_sizes and depths must have the same, non-zero length",
        ));
    }
    let bottleneck = match c.layer_type.as_str() {
        "bottleneck" => true,
        "basic" => false,
        other => {
            return Err(ModelError::Unsupported {
                what: "ResNet layer_type",
                name: other.into(),
            })
        }
    };
    let root = w.root();
    let s = if root.contains("resnet.embedder.embedder.convolution.weight") {
        root.pp("resnet")
    } else {
        root.clone()
    };
    let cl = |s: &Scope, name: &str, spec: ConvSpec| {
        conv_bn(
            s,
            &format!("{name}.convolution"),
            &format!("{name}.normalization"),
            spec,
        )
    };
    let stem = cl(
        &s.pp("embedder"),
        "embedder",
        ConvSpec::new(c.num_channels, c.embedding_size, 7, 2),
    )?;
    let mut stages = Vec::new();
    let mut cin = c.embedding_size;
    for (i, (&cout, &depth)) in c.hidden_sizes.iter().zip(&c.depths).enumerate() {
        let ss = s.pp(format!("encoder.stages.{i}.layers"));
        let mut blocks = Vec::new();
        for j in 0..depth {
            let stride = if j == 0 && (i > 0 || c.downsample_in_first_stage) {
                2
            } else {
                1
            };
            let bs = ss.pp(j);
            let shortcut = (cin != cout || stride != 1)
                .then(|| cl(&bs, "shortcut", ConvSpec::new(cin, cout, 1, stride)))
                .transpose()?;
            let convs = if bottleneck {
                let mid = cout / 4;
                let (s1, s2) = if c.downsample_in_bottleneck {
                    (stride, 1)
                } else {
                    (1, stride)
                };
                vec![
                    cl(&bs, "layer.0", ConvSpec::new(cin, mid, 1, s1))?,
                    cl(&bs, "layer.1", ConvSpec::new(mid, mid, 3, s2))?,
                    cl(&bs, "layer.2", ConvSpec::new(mid, cout, 1, 1))?,
                ]
            } else {
                vec![
                    cl(&bs, "layer.0", ConvSpec::new(cin, cout, 3, stride))?,
                    cl(&bs, "layer.1", ConvSpec::new(cout, cout, 3, 1))?,
                ]
            };
            blocks.push(Block { convs, shortcut });
            cin = cout;
        }
        stages.push(blocks);
    }
    let head = optional_classifier(&root, "classifier.1", cin)?;
    let info = ModelInfo {
        architecture: architecture.to_string(),
        family: "resnet",
        num_layers: c.depths.iter().sum(),
        hidden_size: cin,
        labels: head.as_ref().and(hf_labels(cfg)),
        ..Default::default()
    };
    let act = Activation::from_name(&c.hidden_act)?;
    let model = ResNet {
        path: Path::Candle(Convs { stem, stages }),
        act,
        head,
        features: Features::Hf,
    };
    finish(model, info, root.precision())
}

/// Prepares the channels-last convolutions (where the model qualifies) and wraps the loaded model.
fn finish(model: ResNet, info: ModelInfo, precision: Precision) -> Result<LoadedModel> {
    let model = channels_last(model, precision)?;
    Ok(LoadedModel {
        image: Box::new(model),
        text: None,
        info,
    })
}

/// The model on the channels-last path where every convolution qualifies (its channels-first
/// weights dropped), else as it is.
fn channels_last(model: ResNet, precision: Precision) -> Result<ResNet> {
    let act = model.act;
    let path = (model.path).channels_last(|c| nhwc::NhwcWeights::prepare(c, act, precision))?;
    Ok(ResNet { path, ..model })
}

/// timm `ResNet` constructor arguments visenc honours (preset from the name, then `model_args`).
#[derive(Debug, Deserialize)]
struct TimmArgs {
    block: String,
    layers: Vec<usize>,
    channels: Vec<usize>,
    num_classes: usize,
    in_chans: usize,
    cardinality: usize,
    base_width: usize,
    global_pool: String,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.11/timm/models/resnet.py#L1400
fn timm_preset(arch: &str) -> Result<serde_json::Map<String, Value>> {
    let (block, layers): (&str, [usize; 4]) = match arch {
        "resnet18" => ("basic", [2, 2, 2, 2]),
        "resnet34" => ("basic", [3, 4, 6, 3]),
        "resnet26" => ("bottleneck", [2, 2, 2, 2]),
        "resnet50" => ("bottleneck", [3, 4, 6, 3]),
        "resnet101" => ("bottleneck", [3, 4, 23, 3]),
        "resnet152" => ("bottleneck", [3, 8, 36, 3]),
        _ => {
            return Err(ModelError::Unsupported {
                what: "timm ResNet architecture",
                name: arch.into(),
            })
        }
    };
    let v = serde_json::json!({
        "block": block, "layers": layers, "channels": [64, 128, 256, 512], "num_classes": 1000, "in_chans": 3,
        "cardinality": 1, "base_width": 64, "stem_width": 64, "global_pool": "avg",
    });
    Ok(v.as_object().cloned().unwrap_or_default())
}

/// Loads a timm ResNet (hub layout) or a torchvision ResNet state dict (same keys).
pub fn load_timm(arch: &str, cfg: &Value, w: &Weights) -> Result<LoadedModel> {
    let (model, info) = build_timm(arch, cfg, w)?;
    finish(model, info, w.precision())
}

/// The timm / torchvision ResNet before its channels-last convolutions are prepared.
fn build_timm(arch: &str, cfg: &Value, w: &Weights) -> Result<(ResNet, ModelInfo)> {
    let args = crate::timm_args(timm_preset(arch)?, cfg);
    let a: TimmArgs = serde_json::from_value(Value::Object(args))
        .map_err(|e| config_err("model_args", e.to_string()))?;
    for (k, v) in &a.other {
        let harmless = matches!(
            k.as_str(),
            "drop_rate" | "drop_path_rate" | "zero_init_last" | "pretrained_cfg"
        ) || v.is_null()
            || v == &Value::Bool(false)
            || (k == "stem_type" && v == "")
            || k == "stem_width"
            || (k == "output_stride" && v == 32);
        if !harmless {
            return Err(ModelError::Unsupported {
                what: "timm ResNet argument",
                name: format!("{k} = {v}"),
            });
        }
    }
    if a.global_pool != "avg" {
        return Err(ModelError::Unsupported {
            what: "timm ResNet global_pool",
            name: a.global_pool,
        });
    }
    let bottleneck = a.block == "bottleneck";
    let root = w.root();
    // `stem_width` only sizes the deep stems (`stem_type="deep"`), which are refused above; the
    // plain 7x7 stem always has 64 channels.
    let stem = conv_bn(&root, "conv1", "bn1", ConvSpec::new(a.in_chans, 64, 7, 2))?;
    let mut cin = 64;
    let mut stages = Vec::new();
    for (i, (&planes, &depth)) in a.channels.iter().zip(&a.layers).enumerate() {
        let mut blocks = Vec::new();
        for j in 0..depth {
            let stride = if j == 0 && i > 0 { 2 } else { 1 };
            let s = root.pp(format!("layer{}.{j}", i + 1));
            let cout = if bottleneck { planes * 4 } else { planes };
            let shortcut = (cin != cout || stride != 1)
                .then(|| {
                    conv_bn(
                        &s,
                        "downsample.0",
                        "downsample.1",
                        ConvSpec::new(cin, cout, 1, stride),
                    )
                })
                .transpose()?;
            let convs = if bottleneck {
                let width = planes * a.base_width / 64 * a.cardinality;
                vec![
                    conv_bn(&s, "conv1", "bn1", ConvSpec::new(cin, width, 1, 1))?,
                    conv_bn(
                        &s,
                        "conv2",
                        "bn2",
                        ConvSpec::new(width, width, 3, stride).groups(a.cardinality),
                    )?,
                    conv_bn(&s, "conv3", "bn3", ConvSpec::new(width, cout, 1, 1))?,
                ]
            } else {
                vec![
                    conv_bn(&s, "conv1", "bn1", ConvSpec::new(cin, cout, 3, stride))?,
                    conv_bn(&s, "conv2", "bn2", ConvSpec::new(cout, cout, 3, 1))?,
                ]
            };
            blocks.push(Block { convs, shortcut });
            cin = cout;
        }
        stages.push(blocks);
    }
    let head = (a.num_classes > 0)
        .then(|| linear(&root, "fc", cin, a.num_classes, true))
        .transpose()?;
    let info = ModelInfo {
        architecture: arch.to_string(),
        family: "resnet",
        num_layers: a.layers.iter().sum(),
        hidden_size: cin,
        labels: head.as_ref().and(timm_labels(cfg, a.num_classes)),
        ..Default::default()
    };
    let model = ResNet {
        path: Path::Candle(Convs { stem, stages }),
        act: Activation::Relu,
        head,
        features: Features::Timm,
    };
    Ok((model, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nhwc::tests::{assert_paths_agree, family_fixture};

    /// The channels-last trunk and the candle NCHW path (other devices) agree on the timm fixture
    /// (pooled, logits, the stem and stage maps) at odd input sizes where padding and stride
    /// rounding matter. The fixture tests check the NHWC path against the reference; this keeps
    /// the NCHW one checked too, and shows the NHWC path is the one taken on the CPU.
    #[test]
    fn nhwc_and_nchw_paths_agree() {
        let (w, cfg, _) = family_fixture("resnet_timm");
        let (nchw, _) = build_timm("resnet50", &cfg, &w).unwrap();
        let nhwc = channels_last(build_timm("resnet50", &cfg, &w).unwrap().0, Precision::F32);
        let nhwc = nhwc.unwrap();
        assert!(
            matches!(nhwc.path, Path::ChannelsLast(_)),
            "an f32 CPU ResNet takes the NHWC path"
        );
        // The stem's map and the 4 stages'.
        assert_paths_agree(&nhwc, &nchw, &[(2, 97, 75), (1, 33, 18)], 5, "ResNet");
    }
}
