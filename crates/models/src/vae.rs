//! The Stable-Diffusion VAE encoder (diffusers `AutoencoderKL`) and the diffusers `Encoder` trunk it
//! shares with the VQGAN encoder (`VQModel`, see `vqgan.rs`): `conv_in`, `DownEncoderBlock2D`s of
//! `ResnetBlock2D`s with a `Downsample2D` (asymmetric (0,1,0,1) zero padding, then a stride-2 conv) after
//! all but the last, the `UNetMidBlock2D` (resnet, single-head attention, resnet), then GroupNorm, SiLU
//! and `conv_out`. Keys are the diffusers state-dict keys (`encoder.down_blocks.0.resnets.0.conv1`, ...).
//!
//! Only the encoder half runs: `decoder.*` and `post_quant_conv.*` are ignored on load.

use candle_core::{Module, Tensor};
use serde::Deserialize;
use serde_json::Value;
use visenc_weights::{Scope, Weights};

use crate::api::{EncodeOptions, ImageEncoder, ImageFeatures, Latents, ModelInfo};
use crate::conv::{global_avg_pool, Conv, ConvSpec, Padding};
use crate::error::{config_err, ModelError, Result};
use crate::nn::{Activation, Attention, QkvKeys};
use crate::{parse, LoadedModel};

/// GroupNorm eps everywhere in the encoder (`resnet_eps=1e-6`, `conv_norm_out` eps).
const EPS: f64 = 1e-6;

/// Config keys that only shape the decoder (or a pipeline's dtype choice): they never change what
/// the encoder computes, so they are accepted and not read.
const DECODER_ONLY: &[&str] = &[
    "out_channels",
    "up_block_types",
    "use_post_quant_conv",
    "force_upcast",
    "norm_type",
    "lookup_from_codebook",
];

/// The `Encoder` options both autoencoders pass through from their `config.json`.
// Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/vae.py#L62
#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct TrunkConfig {
    in_channels: usize,
    down_block_types: Vec<String>,
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    act_fn: String,
    norm_num_groups: usize,
    mid_block_add_attention: bool,
    /// Trained image size: an int or [height, width].
    sample_size: Value,
}

impl Default for TrunkConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            mid_block_add_attention: true,
            sample_size: Value::from(32),
        }
    }
}

const TRUNK_KEYS: &[&str] = &[
    "in_channels",
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "norm_num_groups",
    "mid_block_add_attention",
    "sample_size",
];

impl TrunkConfig {
    /// Parses the trunk options after checking that `config.json` holds no option outside the trunk,
    /// `model_keys` and the decoder-only ones (keys starting with `_` are metadata).
    pub(crate) fn parse(cfg: &Value, model_keys: &[&str]) -> Result<Self> {
        if let Some(map) = cfg.as_object() {
            let known = |k: &str| {
                k.starts_with('_')
                    || [TRUNK_KEYS, model_keys, DECODER_ONLY]
                        .iter()
                        .any(|l| l.contains(&k))
            };
            if let Some(k) = map.keys().find(|k| !known(k)) {
                return Err(ModelError::Unsupported {
                    what: "diffusers config option",
                    name: format!("{k} = {}", map[k]),
                });
            }
        }
        let c: Self = parse(cfg, "config.json")?;
        if c.block_out_channels.is_empty() || c.block_out_channels.len() != c.down_block_types.len()
        {
            return Err(config_err(
                "block_out_channels",
                "needs one entry per down_block_types entry (at least one)",
            ));
        }
        // `get_down_block` strips a `UNetRes` prefix before matching the name.
        if let Some(t) = c
            .down_block_types
            .iter()
            .find(|t| t.strip_prefix("UNetRes").unwrap_or(t) != "DownEncoderBlock2D")
        {
            return Err(ModelError::Unsupported {
                what: "down_block_types entry (only DownEncoderBlock2D)",
                name: t.clone(),
            });
        }
        Ok(c)
    }

    /// (height, width) from `sample_size`.
    pub(crate) fn image_size(&self) -> Result<(usize, usize)> {
        let n = |v: &Value| v.as_u64().map(|n| n as usize);
        match &self.sample_size {
            Value::Array(a) if a.len() == 2 => n(&a[0]).zip(n(&a[1])),
            v => n(v).map(|s| (s, s)),
        }
        .ok_or_else(|| {
            config_err(
                "sample_size",
                format!(
                    "expected an integer or [height, width], got {}",
                    self.sample_size
                ),
            )
        })
    }

    /// How much smaller the latent grid is than the image: one Downsample2D per block but the last.
    pub(crate) fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// `ResnetBlock2D`s in the encoder: `layers_per_block` per down block, two in the mid block.
    pub(crate) fn num_resnets(&self) -> usize {
        self.block_out_channels.len() * self.layers_per_block + 2
    }
}

fn group_norm(
    s: &Scope,
    name: &str,
    channels: usize,
    groups: usize,
) -> Result<candle_nn::GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(config_err(
            "norm_num_groups",
            format!("{groups} groups do not divide {channels} channels"),
        ));
    }
    let s = s.pp(name);
    Ok(candle_nn::GroupNorm::new(
        s.get(channels, "weight")?,
        s.get(channels, "bias")?,
        channels,
        groups,
        EPS,
    )?)
}

fn conv(s: &Scope, name: &str, cin: usize, cout: usize, k: usize) -> Result<Conv> {
    Conv::load(s, name, ConvSpec::new(cin, cout, k, 1).bias(true))
}

/// `ResnetBlock2D` without a time embedding: `norm1 -> act -> conv1 -> norm2 -> act -> conv2`, plus the
/// input (through the 1x1 `conv_shortcut` when the width changes); `output_scale_factor` is 1 here.
// Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/resnet.py#L319
struct ResnetBlock {
    norm1: candle_nn::GroupNorm,
    conv1: Conv,
    norm2: candle_nn::GroupNorm,
    conv2: Conv,
    conv_shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn load(s: &Scope, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(s, "norm1", cin, groups)?,
            conv1: conv(s, "conv1", cin, cout, 3)?,
            norm2: group_norm(s, "norm2", cout, groups)?,
            conv2: conv(s, "conv2", cout, cout, 3)?,
            conv_shortcut: (cin != cout)
                .then(|| conv(s, "conv_shortcut", cin, cout, 1))
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let h = self.conv1.forward(&act.forward(&self.norm1.forward(x)?)?)?;
        let h = self
            .conv2
            .forward(&act.forward(&self.norm2.forward(&h)?)?)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((x + h)?)
    }
}

/// The mid block's `Attention` (`_from_deprecated_attn_block`, one head as wide as the channels):
/// GroupNorm, q/k/v over the H*W positions, `to_out.0`, plus the input.
// Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/attention_processor.py#L2696
struct AttnBlock {
    group_norm: candle_nn::GroupNorm,
    attn: Attention,
}

impl AttnBlock {
    fn load(s: &Scope, c: usize, groups: usize) -> Result<Self> {
        // Checkpoints saved before diffusers 0.14 name the projections `query`/`key`/`value`/`proj_attn`;
        // diffusers renames them on load (`ModelMixin._fix_state_dict_keys_on_load`).
        let (qkv, out) = if s.contains("query.weight") {
            (
                QkvKeys::Separate {
                    q: "query",
                    k: "key",
                    v: "value",
                },
                "proj_attn",
            )
        } else {
            (
                QkvKeys::Separate {
                    q: "to_q",
                    k: "to_k",
                    v: "to_v",
                },
                "to_out.0",
            )
        };
        Ok(Self {
            group_norm: group_norm(s, "group_norm", c, groups)?,
            attn: Attention::load(s, qkv, out, c, 1, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let y = self
            .attn
            .forward(&t, None, None)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((y + x)?)
    }
}

/// `DownEncoderBlock2D`: resnets, then (all blocks but the last) `Downsample2D(padding=0)`.
// Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/unets/unet_2d_blocks.py#L1372
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsampler: Option<Conv>,
}

/// `Downsample2D` with `padding=0`: one zero column right and one zero row bottom, then a 3x3 stride-2
/// convolution without padding, so an odd size n gives ceil(n / 2).
// Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/downsampling.py#L130
fn downsample(conv: &Conv, x: &Tensor) -> Result<Tensor> {
    conv.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)
}

/// The diffusers `Encoder` (`double_z` decides `out_channels`, given by the caller).
// Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/vae.py#L155
pub(crate) struct Encoder {
    conv_in: Conv,
    down_blocks: Vec<DownBlock>,
    /// `mid_block.resnets.{0,1}` with `mid_block.attentions.0` between them (when enabled).
    mid_resnets: [ResnetBlock; 2],
    mid_attention: Option<AttnBlock>,
    conv_norm_out: candle_nn::GroupNorm,
    conv_out: Conv,
    act: Activation,
}

impl Encoder {
    /// Loads `s` = the `encoder` scope, producing `out_channels` channels.
    pub(crate) fn load(s: &Scope, c: &TrunkConfig, out_channels: usize) -> Result<Self> {
        let act_name = c.act_fn.to_lowercase();
        let act = match act_name.as_str() {
            "silu" | "swish" | "gelu" | "relu" => Activation::from_name(&act_name)?,
            _ => {
                return Err(ModelError::Unsupported {
                    what: "act_fn (silu, swish, gelu, relu)",
                    name: c.act_fn.clone(),
                })
            }
        };
        let g = c.norm_num_groups;
        let widths = &c.block_out_channels;
        let mut cin = widths[0];
        let conv_in = conv(s, "conv_in", c.in_channels, cin, 3)?;
        let mut down_blocks = Vec::new();
        for (i, &cout) in widths.iter().enumerate() {
            let bs = s.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock::load(
                        &bs.pp(format!("resnets.{j}")),
                        if j == 0 { cin } else { cout },
                        cout,
                        g,
                    )
                })
                .collect::<Result<_>>()?;
            let downsampler = (i + 1 < widths.len())
                .then(|| {
                    Conv::load(
                        &bs,
                        "downsamplers.0.conv",
                        ConvSpec::new(cout, cout, 3, 2)
                            .bias(true)
                            .padding(Padding::Symmetric(0)),
                    )
                })
                .transpose()?;
            down_blocks.push(DownBlock {
                resnets,
                downsampler,
            });
            cin = cout;
        }
        let mid = s.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::load(&mid.pp("resnets.0"), cin, cin, g)?,
            ResnetBlock::load(&mid.pp("resnets.1"), cin, cin, g)?,
        ];
        let mid_attention = c
            .mid_block_add_attention
            .then(|| AttnBlock::load(&mid.pp("attentions.0"), cin, g))
            .transpose()?;
        Ok(Self {
            conv_in,
            down_blocks,
            mid_resnets,
            mid_attention,
            conv_norm_out: group_norm(s, "conv_norm_out", cin, g)?,
            conv_out: conv(s, "conv_out", cin, out_channels, 3)?,
            act,
        })
    }

    pub(crate) fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(pixels)?;
        for block in &self.down_blocks {
            for r in &block.resnets {
                x = r.forward(&x, self.act)?;
            }
            if let Some(d) = &block.downsampler {
                x = downsample(d, &x)?;
            }
        }
        // Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/unets/unet_2d_blocks.py#L736
        x = self.mid_resnets[0].forward(&x, self.act)?;
        if let Some(a) = &self.mid_attention {
            x = a.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x, self.act)?;
        // `conv_act` is always `nn.SiLU`, whatever `act_fn` says.
        let x = Activation::Silu.forward(&self.conv_norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }
}

/// Marks the decoder half as deliberately unused: `decoder.*` and `post_quant_conv.*` turn latents back
/// into pixels, which an encoder never does.
pub(crate) fn ignore_decoder(w: &Weights) {
    let unused: Vec<String> = w
        .names()
        .filter(|n| n.starts_with("decoder.") || n.starts_with("post_quant_conv."))
        .map(str::to_string)
        .collect();
    for n in &unused {
        w.ignore(n);
    }
}

/// The features every generative encoder returns: `pooled` is the spatial mean of `latents.mean`, the
/// patch tokens (when asked for) the latent grid flattened row-major.
pub(crate) fn latent_features(latents: Latents, opts: &EncodeOptions) -> Result<ImageFeatures> {
    let m = &latents.mean;
    Ok(ImageFeatures {
        pooled: global_avg_pool(m)?,
        projected: None,
        logits: None,
        prefix_tokens: None,
        patch_tokens: opts
            .tokens
            .then(|| m.flatten_from(2)?.transpose(1, 2)?.contiguous())
            .transpose()?,
        grid: (m.dim(2)?, m.dim(3)?),
        hidden_states: vec![],
        feature_maps: vec![],
        latents: Some(latents),
    })
}

/// `AutoencoderKL` options besides the trunk's.
// Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl.py#L77
#[derive(Debug, Deserialize)]
#[serde(default)]
struct KlConfig {
    latent_channels: usize,
    scaling_factor: f32,
    shift_factor: Option<f32>,
    latents_mean: Option<Value>,
    latents_std: Option<Value>,
    use_quant_conv: bool,
}

impl Default for KlConfig {
    fn default() -> Self {
        Self {
            latent_channels: 4,
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            use_quant_conv: true,
        }
    }
}

const KL_KEYS: &[&str] = &[
    "latent_channels",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "use_quant_conv",
];

/// The posterior of the Stable-Diffusion VAE: `encoder` (double_z) then the 1x1 `quant_conv`.
pub struct AutoencoderKl {
    encoder: Encoder,
    quant_conv: Option<Conv>,
    latent_channels: usize,
    scaling_factor: f32,
    shift_factor: f32,
}

impl ImageEncoder for AutoencoderKl {
    // Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl.py#L158
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        opts.refuse_layers("the VAE encoder")?;
        let mut moments = self.encoder.forward(pixels)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        // `DiagonalGaussianDistribution`: the first half of the channels is the mean, the second the
        // log-variance, clamped to [-30, 20].
        // Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/vae.py#L690
        let l = self.latent_channels;
        let mean = moments.narrow(1, 0, l)?.contiguous()?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        let latents = Latents {
            mean,
            logvar: Some(logvar),
            scaling_factor: self.scaling_factor,
            shift_factor: self.shift_factor,
            codes: None,
            quantized: None,
        };
        latent_features(latents, opts)
    }
}

/// Loads a diffusers `AutoencoderKL` (`config.json` + `diffusion_pytorch_model.safetensors`).
pub fn load(cfg: &Value, w: &Weights) -> Result<LoadedModel> {
    let trunk = TrunkConfig::parse(cfg, KL_KEYS)?;
    let c: KlConfig = parse(cfg, "config.json")?;
    // Pipelines that set these normalise latents per channel, `(z - latents_mean) * scaling_factor /
    // latents_std`, which `Latents` cannot express; refusing beats handing out a wrong scaling.
    for (name, v) in [
        ("latents_mean", &c.latents_mean),
        ("latents_std", &c.latents_std),
    ] {
        if let Some(v) = v {
            return Err(ModelError::Unsupported {
                what: "AutoencoderKL option",
                name: format!("{name} = {v}"),
            });
        }
    }
    let l = c.latent_channels;
    let root = w.root();
    let encoder = Encoder::load(&root.pp("encoder"), &trunk, 2 * l)?;
    let quant_conv = c
        .use_quant_conv
        .then(|| conv(&root, "quant_conv", 2 * l, 2 * l, 1))
        .transpose()?;
    ignore_decoder(w);
    let info = ModelInfo {
        architecture: cfg["_class_name"]
            .as_str()
            .unwrap_or("AutoencoderKL")
            .to_string(),
        family: "vae",
        image_size: trunk.image_size()?,
        patch_size: trunk.downscale(),
        num_layers: trunk.num_resnets(),
        hidden_size: l,
        ..Default::default()
    };
    // SD 1.x/2.x/SDXL leave `shift_factor` unset: no shift.
    let shift_factor = c.shift_factor.unwrap_or(0.0);
    let model = AutoencoderKl {
        encoder,
        quant_conv,
        latent_channels: l,
        scaling_factor: c.scaling_factor,
        shift_factor,
    };
    Ok(LoadedModel {
        image: Box::new(model),
        text: None,
        info,
    })
}
