//! ConvNeXt and ConvNeXt-V2 in the transformers layout (`ConvNextModel`,
//! `ConvNextForImageClassification`, `ConvNextV2*`) and timm's `convnext_*` / `convnextv2_*` models.
//!
//! Both references compute the same network; only the key names, the eps of the final norm and a few
//! timm options differ, so one trunk serves both through a key table per layout:
//! - stem: patchify convolution (kernel = stride = patch) + channels-first LayerNorm;
//! - stages 1-3 start with a channels-first LayerNorm + 2x2 stride-2 convolution (floor: an odd size
//!   drops its last row/column);
//! - block: 7x7 depthwise convolution, then per pixel (channels last) LayerNorm, Linear 4x, activation,
//!   GRN (V2 only), Linear back, layer scale (V1 only), residual;
//! - head: global average, LayerNorm over channels (`pooled`, timm `pre_logits`), classifier.

use candle_core::{DType, Device, Module, Tensor, D};
use serde::Deserialize;
use serde_json::Value;
use visenc_weights::{Scope, Weights};

use crate::api::{EncodeOptions, FeatureMap, ImageEncoder, ImageFeatures, ModelInfo};
use crate::conv::{global_avg_pool, layer_norm_2d, Conv, ConvSpec, Padding};
use crate::error::{config_err, ModelError, Result};
use crate::nn::{layer_norm, linear, optional_classifier, Activation};
use crate::vit::hf_labels;
use crate::{parse, LoadedModel};

mod nhwc;

/// eps of the norms inside the transformers trunk (stem, downsampling, blocks), fixed in the code.
const HF_INNER_EPS: f64 = 1e-6;
/// eps GRN adds to the mean response in both references.
const GRN_EPS: f64 = 1e-6;

/// Where one layout keeps each tensor, relative to the model root, a stage, or a block.
struct Keys {
    stem_conv: &'static str,
    stem_norm: &'static str,
    /// `{stages}.{i}`
    stages: &'static str,
    /// `{downsample}.0` is the norm, `{downsample}.1` the convolution.
    downsample: &'static str,
    /// `{blocks}.{j}` inside a stage.
    blocks: &'static str,
    dwconv: &'static str,
    norm: &'static str,
    fc1: &'static str,
    fc2: &'static str,
    gamma: &'static str,
    grn: &'static str,
    /// transformers stores GRN's weight and bias as [1, 1, 1, C], timm as [C].
    grn_4d: bool,
}

// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/convnext/modeling_convnext.py#L114
const HF_KEYS: Keys = Keys {
    stem_conv: "embeddings.patch_embeddings",
    stem_norm: "embeddings.layernorm",
    stages: "encoder.stages",
    downsample: "downsampling_layer",
    blocks: "layers",
    dwconv: "dwconv",
    norm: "layernorm",
    fc1: "pwconv1",
    fc2: "pwconv2",
    gamma: "layer_scale_parameter",
    grn: "grn",
    grn_4d: true,
};

// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/convnext.py#L123
const TIMM_KEYS: Keys = Keys {
    stem_conv: "stem.0",
    stem_norm: "stem.1",
    stages: "stages",
    downsample: "downsample",
    blocks: "blocks",
    dwconv: "conv_dw",
    norm: "norm",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    gamma: "gamma",
    grn: "mlp.grn",
    grn_4d: false,
};

/// The trunk's shape and options, whichever layout it came from.
struct TrunkConfig {
    in_chans: usize,
    patch: usize,
    dims: Vec<usize>,
    depths: Vec<usize>,
    /// Depthwise kernel size per stage.
    kernels: Vec<usize>,
    /// Whether stage 0 also downsamples (timm with a stride-2 stem).
    downsample_first: bool,
    layer_scale: bool,
    grn: bool,
    /// timm `conv_mlp`: the MLP is stored as 1x1 convolutions [out, in, 1, 1].
    conv_mlp: bool,
    conv_bias: bool,
    act: Activation,
    eps: f64,
}

/// A channels-first LayerNorm (`LayerNorm2d`, `ConvNextLayerNorm(data_format="channels_first")`).
struct Norm2d {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm2d {
    fn load(s: &Scope, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let s = s.pp(name);
        Ok(Self {
            weight: s.get(dim, "weight")?,
            bias: s.get(dim, "bias")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_2d(x, &self.weight, &self.bias, self.eps)
    }
}

/// Global Response Normalization on [B, N, C]: `x + bias + weight * x * Nx` with
/// `Nx = Gx / (mean_C(Gx) + 1e-6)` and `Gx` the L2 norm of each channel over the N positions.
// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/convnextv2/modeling_convnextv2.py#L39
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/layers/grn.py#L18
struct Grn {
    weight: Tensor,
    bias: Tensor,
}

impl Grn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gx = x.sqr()?.sum_keepdim(1)?.sqrt()?;
        let nx = gx.broadcast_div(&(gx.mean_keepdim(D::Minus1)? + GRN_EPS)?)?;
        let y = x
            .broadcast_mul(&nx)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?;
        Ok((y + x)?)
    }
}

// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/convnext/modeling_convnext.py#L142
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/convnext.py#L203
/// A block after its depthwise convolution (kept with the other convolutions, [`Convs`]).
struct Block {
    norm: crate::nn::LayerNorm,
    fc1: crate::linear::Linear,
    act: Activation,
    grn: Option<Grn>,
    /// With the layer scale (V1) folded in: `gamma * (W x + b) = (gamma W) x + gamma b`.
    fc2: crate::linear::Linear,
}

impl Block {
    /// The block and its depthwise convolution.
    fn load(
        s: &Scope,
        k: &Keys,
        c: &TrunkConfig,
        dim: usize,
        kernel: usize,
    ) -> Result<(Self, Conv)> {
        let hidden = 4 * dim;
        let dw = ConvSpec::new(dim, dim, kernel, 1)
            .groups(dim)
            .bias(c.conv_bias)
            .padding(Padding::Symmetric((kernel - 1) / 2));
        let grn = if c.grn {
            let g = s.pp(k.grn);
            let shape: Vec<usize> = if k.grn_4d {
                vec![1, 1, 1, hidden]
            } else {
                vec![hidden]
            };
            Some(Grn {
                weight: g.get(shape.clone(), "weight")?.flatten_all()?,
                bias: g.get(shape, "bias")?.flatten_all()?,
            })
        } else {
            None
        };
        let gamma = c.layer_scale.then(|| s.get(dim, k.gamma)).transpose()?;
        let dwconv = Conv::load(s, k.dwconv, dw)?;
        let block = Self {
            norm: layer_norm(s, k.norm, dim, c.eps)?,
            fc1: pointwise(s, k.fc1, dim, hidden, c.conv_mlp, None)?,
            act: c.act,
            grn,
            fc2: pointwise(s, k.fc2, hidden, dim, c.conv_mlp, gamma.as_ref())?,
        };
        Ok((block, dwconv))
    }

    /// `x + block(dwconv(x))`.
    fn forward(&self, x: &Tensor, dwconv: &Conv) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // Channels last, one row per pixel: [B, H*W, C].
        let y = dwconv
            .forward(x)?
            .permute((0, 2, 3, 1))?
            .reshape((b, h * w, c))?;
        let y = self
            .act
            .forward(&self.fc1.forward(&self.norm.forward(&y)?)?)?;
        let y = match &self.grn {
            Some(g) => g.forward(&y)?,
            None => y,
        };
        let y = self.fc2.forward(&y)?;
        Ok((x + y.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?)?)
    }
}

/// A Linear layer, or a 1x1 convolution used as one (timm `conv_mlp`), with bias; its outputs
/// multiplied by `scale` when given (folded into the weight and the bias).
fn pointwise(
    s: &Scope,
    name: &str,
    cin: usize,
    cout: usize,
    conv: bool,
    scale: Option<&Tensor>,
) -> Result<crate::linear::Linear> {
    let s = s.pp(name);
    let w = if conv {
        s.get((cout, cin, 1, 1), "weight")?.reshape((cout, cin))?
    } else {
        s.get((cout, cin), "weight")?
    };
    let b = s.get(cout, "bias")?;
    let (w, b) = match scale {
        Some(g) => {
            let scaled = w.broadcast_mul(&g.reshape((cout, 1))?)?;
            // The weight as read, freed before the scaled one is packed.
            drop(w);
            (scaled, (b * g)?)
        }
        None => (w, b),
    };
    crate::linear::Linear::load(&s, w, Some(b))
}

struct Stage {
    /// The norm before the stage's downsampling convolution, if it has one.
    downsample: Option<Norm2d>,
    blocks: Vec<Block>,
}

/// The convolutions, in the one form the forward pass uses ([`nhwc`] for channels last; candle's for
/// other devices and dtypes and ConvNeXt-V2). Norms and Linear layers serve both.
type Convs = crate::nhwc::Form<CandleConvs, nhwc::NhwcWeights>;

/// The convolutions as loaded: the patchify stem, each stage's downsampling, each block's
/// depthwise one.
struct CandleConvs {
    stem: Conv,
    downsample: Vec<Option<Conv>>,
    dwconv: Vec<Vec<Conv>>,
}

pub struct ConvNeXt {
    convs: Convs,
    stem_norm: Norm2d,
    patch: usize,
    stages: Vec<Stage>,
    /// timm `head_norm_first`: a channels-first norm on the final map before pooling.
    norm_pre: Option<Norm2d>,
    /// The LayerNorm on the pooled vector (HF `layernorm`, timm `head.norm`).
    head_norm: Option<crate::nn::LayerNorm>,
    head: Option<crate::linear::Linear>,
}

impl ConvNeXt {
    fn load_trunk(
        s: &Scope,
        k: &Keys,
        c: &TrunkConfig,
    ) -> Result<(CandleConvs, Norm2d, Vec<Stage>)> {
        let n = c.dims.len();
        if n == 0 || c.depths.len() != n || c.kernels.len() != n {
            return Err(config_err(
                "depths",
                format!(
                    "{} depths, {} widths and {} kernel sizes: need one of each per stage",
                    c.depths.len(),
                    n,
                    c.kernels.len()
                ),
            ));
        }
        if let Some(k) = c.kernels.iter().find(|&&k| k % 2 == 0) {
            return Err(ModelError::Unsupported {
                what: "ConvNeXt even depthwise kernel size",
                name: k.to_string(),
            });
        }
        let stem_spec = ConvSpec::new(c.in_chans, c.dims[0], c.patch, c.patch)
            .padding(Padding::Symmetric(0))
            .bias(c.conv_bias);
        let stem = Conv::load(s, k.stem_conv, stem_spec)?;
        let stem_norm = Norm2d::load(s, k.stem_norm, c.dims[0], c.eps)?;
        let mut stages = Vec::with_capacity(n);
        let (mut downsample_convs, mut dwconv) = (Vec::new(), Vec::new());
        let mut cin = c.dims[0];
        for (i, (&dim, &depth)) in c.dims.iter().zip(&c.depths).enumerate() {
            let ss = s.pp(k.stages).pp(i);
            let downsample = if i > 0 || c.downsample_first {
                let d = ss.pp(k.downsample);
                let spec = ConvSpec::new(cin, dim, 2, 2)
                    .padding(Padding::Symmetric(0))
                    .bias(c.conv_bias);
                Some((
                    Norm2d::load(&d, "0", cin, c.eps)?,
                    Conv::load(&d, "1", spec)?,
                ))
            } else {
                None
            };
            let (downsample, conv) = downsample.unzip();
            downsample_convs.push(conv);
            let (blocks, dws) = (0..depth)
                .map(|j| Block::load(&ss.pp(k.blocks).pp(j), k, c, dim, c.kernels[i]))
                .collect::<Result<(Vec<_>, Vec<_>)>>()?;
            dwconv.push(dws);
            stages.push(Stage { downsample, blocks });
            cin = dim;
        }
        let convs = CandleConvs {
            stem,
            downsample: downsample_convs,
            dwconv,
        };
        Ok((convs, stem_norm, stages))
    }

    /// The model on the channels-last path where it applies (see [`nhwc::NhwcWeights::prepare`];
    /// each channels-first convolution dropped once converted), else as it is.
    fn channels_last(self) -> Result<Self> {
        let stages = &self.stages;
        let convs = (self.convs).channels_last(|c| nhwc::NhwcWeights::prepare(stages, c))?;
        Ok(Self { convs, ..self })
    }
}

impl ImageEncoder for ConvNeXt {
    // Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/convnext/modeling_convnext.py#L266
    // Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/convnext.py#L619
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        opts.refuse_layers("ConvNeXt")?;
        let c = match &self.convs {
            Convs::ChannelsLast(w) => {
                // The weights are f32 or bf16 on the CPU: pixels come there as f32.
                let px = pixels.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let t = self.trunk_nhwc(w, &px, opts.features)?;
                let pooled = match &self.head_norm {
                    Some(n) => n.forward(&t.pooled)?,
                    None => t.pooled,
                };
                let logits = self.head.as_ref().map(|h| h.forward(&pooled)).transpose()?;
                return ImageFeatures::from_map(pooled, logits, &t.last, t.maps, opts);
            }
            Convs::Candle(c) => c,
        };
        let mut x = self.stem_norm.forward(&c.stem.forward(pixels)?)?;
        let mut reduction = self.patch;
        let mut maps = Vec::new();
        for ((stage, down), dws) in self.stages.iter().zip(&c.downsample).zip(&c.dwconv) {
            if let (Some(norm), Some(conv)) = (&stage.downsample, down) {
                x = conv.forward(&norm.forward(&x)?)?;
                reduction *= 2;
            }
            for (b, dw) in stage.blocks.iter().zip(dws) {
                x = b.forward(&x, dw)?;
            }
            if opts.features {
                maps.push(FeatureMap {
                    reduction,
                    map: x.clone(),
                });
            }
        }
        if let Some(n) = &self.norm_pre {
            x = n.forward(&x)?;
        }
        let mut pooled = global_avg_pool(&x)?;
        if let Some(n) = &self.head_norm {
            pooled = n.forward(&pooled)?;
        }
        let logits = self.head.as_ref().map(|h| h.forward(&pooled)).transpose()?;
        ImageFeatures::from_map(pooled, logits, &x, maps, opts)
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct HfConfig {
    num_channels: usize,
    patch_size: usize,
    num_stages: usize,
    hidden_sizes: Vec<usize>,
    depths: Vec<usize>,
    hidden_act: String,
    layer_norm_eps: f64,
    /// V1 only; layer scale is used when it is positive.
    layer_scale_init_value: f64,
    image_size: usize,
}

impl Default for HfConfig {
    fn default() -> Self {
        Self {
            num_channels: 3,
            patch_size: 4,
            num_stages: 4,
            hidden_sizes: vec![96, 192, 384, 768],
            depths: vec![3, 3, 9, 3],
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            layer_scale_init_value: 1e-6,
            image_size: 224,
        }
    }
}

/// Loads a transformers ConvNeXt (`model_type` "convnext").
pub fn load_hf(cfg: &Value, w: &Weights, architecture: &str) -> Result<LoadedModel> {
    load_hf_generation(cfg, w, architecture, false)
}

/// Loads a transformers ConvNeXt-V2 (`model_type` "convnextv2": GRN, no layer scale).
pub fn load_hf_v2(cfg: &Value, w: &Weights, architecture: &str) -> Result<LoadedModel> {
    load_hf_generation(cfg, w, architecture, true)
}

fn load_hf_generation(
    cfg: &Value,
    w: &Weights,
    architecture: &str,
    v2: bool,
) -> Result<LoadedModel> {
    let c: HfConfig = parse(cfg, "config.json")?;
    if c.hidden_sizes.len() < c.num_stages || c.depths.len() < c.num_stages {
        return Err(config_err(
            "num_stages",
            format!(
                "{} stages but {} hidden_sizes and {} depths",
                c.num_stages,
                c.hidden_sizes.len(),
                c.depths.len()
            ),
        ));
    }
    let n = c.num_stages;
    let trunk_cfg = TrunkConfig {
        in_chans: c.num_channels,
        patch: c.patch_size,
        dims: c.hidden_sizes[..n].to_vec(),
        depths: c.depths[..n].to_vec(),
        kernels: vec![7; n],
        downsample_first: false,
        layer_scale: !v2 && c.layer_scale_init_value > 0.0,
        grn: v2,
        conv_mlp: false,
        conv_bias: true,
        act: Activation::from_name(&c.hidden_act)?,
        eps: HF_INNER_EPS,
    };
    let root = w.root();
    let prefix = if v2 { "convnextv2" } else { "convnext" };
    let s = if root.contains(&format!("{prefix}.embeddings.patch_embeddings.weight")) {
        root.pp(prefix)
    } else {
        root.clone()
    };
    let (convs, stem_norm, stages) = ConvNeXt::load_trunk(&s, &HF_KEYS, &trunk_cfg)?;
    let width = trunk_cfg.dims[n - 1];
    let head_norm = Some(layer_norm(&s, "layernorm", width, c.layer_norm_eps)?);
    let head = optional_classifier(&root, "classifier", width)?;
    let info = ModelInfo {
        architecture: architecture.to_string(),
        family: if v2 { "convnextv2" } else { "convnext" },
        image_size: (c.image_size, c.image_size),
        patch_size: c.patch_size,
        num_layers: trunk_cfg.depths.iter().sum(),
        hidden_size: width,
        labels: head.as_ref().and(hf_labels(cfg)),
        ..Default::default()
    };
    let model = ConvNeXt {
        convs: Convs::Candle(convs),
        stem_norm,
        patch: c.patch_size,
        stages,
        norm_pre: None,
        head_norm,
        head,
    };
    finish(model, info)
}

/// timm accepts one depthwise kernel size or one per stage.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KernelSizes {
    One(usize),
    PerStage(Vec<usize>),
}

/// timm `ConvNeXt` constructor arguments (preset from the name, then the checkpoint's `model_args`).
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/convnext.py#L350
#[derive(Debug, Deserialize)]
struct TimmArgs {
    in_chans: usize,
    num_classes: usize,
    global_pool: String,
    output_stride: usize,
    depths: Vec<usize>,
    dims: Vec<usize>,
    kernel_sizes: KernelSizes,
    ls_init_value: Option<f64>,
    stem_type: String,
    patch_size: usize,
    head_norm_first: bool,
    head_hidden_size: Option<usize>,
    conv_mlp: bool,
    conv_bias: bool,
    use_grn: bool,
    act_layer: String,
    norm_layer: Option<String>,
    norm_eps: Option<f64>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// The constructor defaults merged with the architecture's preset.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/convnext.py#L1212
fn timm_preset(arch: &str) -> Result<serde_json::Map<String, Value>> {
    let small_v1 = serde_json::json!({"conv_mlp": true});
    let v2 = serde_json::json!({"use_grn": true, "ls_init_value": null});
    let small_v2 = serde_json::json!({"use_grn": true, "ls_init_value": null, "conv_mlp": true});
    let none = serde_json::json!({});
    let (depths, dims, extra): ([usize; 4], [usize; 4], &Value) = match arch {
        "convnext_atto" => ([2, 2, 6, 2], [40, 80, 160, 320], &small_v1),
        "convnext_femto" => ([2, 2, 6, 2], [48, 96, 192, 384], &small_v1),
        "convnext_pico" => ([2, 2, 6, 2], [64, 128, 256, 512], &small_v1),
        "convnext_nano" => ([2, 2, 8, 2], [80, 160, 320, 640], &small_v1),
        "convnext_tiny_hnf" => (
            [3, 3, 9, 3],
            [96, 192, 384, 768],
            &serde_json::json!({"conv_mlp": true, "head_norm_first": true}),
        ),
        "convnext_tiny" => ([3, 3, 9, 3], [96, 192, 384, 768], &none),
        "convnext_small" => ([3, 3, 27, 3], [96, 192, 384, 768], &none),
        "convnext_base" => ([3, 3, 27, 3], [128, 256, 512, 1024], &none),
        "convnext_large" => ([3, 3, 27, 3], [192, 384, 768, 1536], &none),
        "convnext_xlarge" => ([3, 3, 27, 3], [256, 512, 1024, 2048], &none),
        "convnext_xxlarge" => (
            [3, 4, 30, 3],
            [384, 768, 1536, 3072],
            &serde_json::json!({"norm_eps": 1e-5}),
        ),
        "convnextv2_atto" => ([2, 2, 6, 2], [40, 80, 160, 320], &small_v2),
        "convnextv2_femto" => ([2, 2, 6, 2], [48, 96, 192, 384], &small_v2),
        "convnextv2_pico" => ([2, 2, 6, 2], [64, 128, 256, 512], &small_v2),
        "convnextv2_nano" => ([2, 2, 8, 2], [80, 160, 320, 640], &small_v2),
        "convnextv2_tiny" => ([3, 3, 9, 3], [96, 192, 384, 768], &v2),
        "convnextv2_small" => ([3, 3, 27, 3], [96, 192, 384, 768], &v2),
        "convnextv2_base" => ([3, 3, 27, 3], [128, 256, 512, 1024], &v2),
        "convnextv2_large" => ([3, 3, 27, 3], [192, 384, 768, 1536], &v2),
        "convnextv2_huge" => ([3, 3, 27, 3], [352, 704, 1408, 2816], &v2),
        _ => {
            return Err(ModelError::Unsupported {
                what: "timm ConvNeXt architecture",
                name: arch.into(),
            })
        }
    };
    let mut m = serde_json::json!({
        "in_chans": 3, "num_classes": 1000, "global_pool": "avg", "output_stride": 32,
        "depths": depths, "dims": dims, "kernel_sizes": 7, "ls_init_value": 1e-6, "stem_type": "patch",
        "patch_size": 4, "head_norm_first": false, "head_hidden_size": null, "conv_mlp": false,
        "conv_bias": true, "use_grn": false, "act_layer": "gelu", "norm_layer": null, "norm_eps": null,
    });
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(extra.clone());
    }
    Ok(m.as_object().cloned().unwrap_or_default())
}

/// Prepares the channels-last weights (where the model qualifies) and wraps the loaded model.
fn finish(model: ConvNeXt, info: ModelInfo) -> Result<LoadedModel> {
    Ok(LoadedModel {
        image: Box::new(model.channels_last()?),
        text: None,
        info,
    })
}

/// Loads a timm ConvNeXt / ConvNeXt-V2 saved in timm's hub layout.
pub fn load_timm(arch: &str, cfg: &Value, w: &Weights) -> Result<LoadedModel> {
    let (model, info) = build_timm(arch, cfg, w)?;
    finish(model, info)
}

/// The model [`load_timm`] wraps (on candle's convolutions), and its info.
fn build_timm(arch: &str, cfg: &Value, w: &Weights) -> Result<(ConvNeXt, ModelInfo)> {
    let args = crate::timm_args(timm_preset(arch)?, cfg);
    let a: TimmArgs = serde_json::from_value(Value::Object(args))
        .map_err(|e| config_err("model_args", e.to_string()))?;
    for (k, v) in &a.other {
        let harmless = matches!(
            k.as_str(),
            "drop_rate" | "drop_path_rate" | "head_init_scale"
        ) || v.is_null();
        if !harmless {
            return Err(ModelError::Unsupported {
                what: "timm ConvNeXt argument",
                name: format!("{k} = {v}"),
            });
        }
    }
    let unsupported =
        |what: &'static str, name: String| Err(ModelError::Unsupported { what, name });
    if a.stem_type != "patch" {
        return unsupported("timm ConvNeXt stem_type", a.stem_type);
    }
    if a.output_stride != 32 {
        return unsupported(
            "timm ConvNeXt output_stride (dilated stages)",
            a.output_stride.to_string(),
        );
    }
    if let Some(h) = a.head_hidden_size {
        return unsupported("timm ConvNeXt head_hidden_size (MLP head)", h.to_string());
    }
    if let Some(n) = a
        .norm_layer
        .as_deref()
        .filter(|n| !matches!(*n, "layernorm" | "layernorm2d"))
    {
        return unsupported("timm ConvNeXt norm_layer", n.to_string());
    }
    if a.global_pool != "avg" {
        return unsupported("timm ConvNeXt global_pool", a.global_pool);
    }
    if a.depths.len() != 4 || a.dims.len() != 4 {
        return Err(config_err("depths", "timm ConvNeXt has exactly 4 stages"));
    }
    let kernels = match a.kernel_sizes {
        KernelSizes::One(k) => vec![k; 4],
        KernelSizes::PerStage(v) => v,
    };
    let eps = a.norm_eps.unwrap_or(1e-6);
    let trunk_cfg = TrunkConfig {
        in_chans: a.in_chans,
        patch: a.patch_size,
        dims: a.dims,
        depths: a.depths,
        kernels,
        // timm strides stage 0 when the stem alone reaches stride 2.
        downsample_first: a.patch_size == 2,
        layer_scale: a.ls_init_value.is_some(),
        grn: a.use_grn,
        conv_mlp: a.conv_mlp,
        conv_bias: a.conv_bias,
        act: Activation::from_name(&a.act_layer)?,
        eps,
    };
    let root = w.root();
    let (convs, stem_norm, stages) = ConvNeXt::load_trunk(&root, &TIMM_KEYS, &trunk_cfg)?;
    let width = trunk_cfg.dims[3];
    // head_norm_first: `norm_pre` normalises the map, the head only pools and classifies.
    let (norm_pre, head_norm) = if a.head_norm_first {
        (Some(Norm2d::load(&root, "norm_pre", width, eps)?), None)
    } else {
        (None, Some(layer_norm(&root, "head.norm", width, eps)?))
    };
    let head = (a.num_classes > 0)
        .then(|| linear(&root, "head.fc", width, a.num_classes, true))
        .transpose()?;
    // timm writes `label_names` at the top level of config.json and, loading, lets it override
    // `pretrained_cfg.label_names` (timm/models/_hub.py `_parse_model_cfg`).
    let labels = cfg
        .get("label_names")
        .or_else(|| cfg.pointer("/pretrained_cfg/label_names"))
        .and_then(Value::as_array)
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .filter(|v| v.len() == a.num_classes);
    let info = ModelInfo {
        architecture: arch.to_string(),
        family: if trunk_cfg.grn {
            "convnextv2"
        } else {
            "convnext"
        },
        image_size: timm_input_size(cfg).unwrap_or_default(),
        patch_size: a.patch_size,
        num_layers: trunk_cfg.depths.iter().sum(),
        hidden_size: width,
        labels: head.as_ref().and(labels),
        ..Default::default()
    };
    let model = ConvNeXt {
        convs: Convs::Candle(convs),
        stem_norm,
        patch: a.patch_size,
        stages,
        norm_pre,
        head_norm,
        head,
    };
    Ok((model, info))
}

/// The trained (height, width) from timm's `pretrained_cfg.input_size` ([C, H, W]).
fn timm_input_size(cfg: &Value) -> Option<(usize, usize)> {
    let s = cfg.pointer("/pretrained_cfg/input_size")?.as_array()?;
    Some((s.get(1)?.as_u64()? as usize, s.get(2)?.as_u64()? as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nhwc::tests::{assert_paths_agree, family_fixture};

    /// The channels-last trunk and the candle NCHW path agree on the timm fixture (pooled, logits,
    /// every stage's map) at odd sizes, where the patchify stem and the 2x2 downsampling drop a
    /// row or column. The fixture tests check the NHWC path against the reference; this keeps the
    /// NCHW one (other devices and dtypes) checked and shows the NHWC one is taken on the CPU.
    #[test]
    fn nhwc_and_nchw_paths_agree() {
        let (w, cfg, arch) = family_fixture("convnext_timm");
        let (nchw, _) = build_timm(&arch, &cfg, &w).unwrap();
        let nhwc = build_timm(&arch, &cfg, &w).unwrap().0.channels_last();
        let nhwc = nhwc.unwrap();
        assert!(
            matches!(nhwc.convs, Convs::ChannelsLast(_)),
            "an f32 CPU ConvNeXt takes the NHWC path"
        );
        // Every stage's map.
        assert_paths_agree(&nhwc, &nchw, &[(2, 71, 45), (1, 32, 39)], 4, "ConvNeXt");
    }
}
