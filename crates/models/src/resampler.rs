//! Attention-based fusion: the perceiver resampler of IDEFICS (after Flamingo). A fixed set of learned
//! latent queries cross-attends to any number of vision tokens (and to themselves), so an image of
//! any size becomes `n_latents` tokens for a language model.
//!
//! It takes any encoder's tokens of width `embed_dim`, e.g. `ImageFeatures::patch_tokens` or a
//! hidden state, and loads from an IDEFICS checkpoint (`config.json` with `vision_config.embed_dim`
//! and `perceiver_config`; weights under `model.perceiver_resampler.*`).

use crate::linear::Linear;
use crate::nn::LayerNorm;
use candle_core::{Module, Tensor};
use serde::Deserialize;
use serde_json::Value;
use visenc_weights::{Scope, Weights};

use crate::error::{config_err, ModelError, Result};
use crate::nn::{layer_norm, linear};
use crate::parse;

/// `nn.LayerNorm`'s default epsilon, which every norm of the resampler keeps.
const LN_EPS: f64 = 1e-5;

/// The sizes of a perceiver resampler (`IdeficsPerceiverConfig` + `vision_config.embed_dim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ResamplerConfig {
    /// Width of the tokens in and out (`vision_config.embed_dim`).
    pub embed_dim: usize,
    #[serde(rename = "resampler_depth")]
    pub depth: usize,
    #[serde(rename = "resampler_n_heads")]
    pub n_heads: usize,
    #[serde(rename = "resampler_head_dim")]
    pub head_dim: usize,
    #[serde(rename = "resampler_n_latents")]
    pub n_latents: usize,
    /// LayerNorm over each head's queries and keys.
    #[serde(rename = "qk_layer_norms_perceiver", default)]
    pub qk_layer_norms: bool,
}

// Reference: transformers v5.24.0 src/transformers/models/idefics/perceiver.py IdeficsPerceiverAttention
struct PerceiverAttention {
    context_layer_norm: LayerNorm,
    latents_layer_norm: LayerNorm,
    qk_layer_norms: Option<(LayerNorm, LayerNorm)>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    output_proj: Linear,
    n_heads: usize,
    head_dim: usize,
}

impl PerceiverAttention {
    fn load(s: &Scope, c: &ResamplerConfig) -> Result<Self> {
        let (d, inner) = (c.embed_dim, c.n_heads * c.head_dim);
        let qk_layer_norms = if c.qk_layer_norms {
            Some((
                layer_norm(s, "q_layer_norm", c.head_dim, LN_EPS)?,
                layer_norm(s, "k_layer_norm", c.head_dim, LN_EPS)?,
            ))
        } else {
            None
        };
        Ok(Self {
            context_layer_norm: layer_norm(s, "context_layer_norm", d, LN_EPS)?,
            latents_layer_norm: layer_norm(s, "latents_layer_norm", d, LN_EPS)?,
            qk_layer_norms,
            // No biases (Perceiver / Flamingo).
            q_proj: linear(s, "q_proj", d, inner, false)?,
            k_proj: linear(s, "k_proj", d, inner, false)?,
            v_proj: linear(s, "v_proj", d, inner, false)?,
            output_proj: linear(s, "output_proj", inner, d, false)?,
            n_heads: c.n_heads,
            head_dim: c.head_dim,
        })
    }

    /// [B, L, D] latents attend to [B, N, D] context followed by themselves.
    fn forward(&self, context: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let context = self.context_layer_norm.forward(context)?;
        let latents = self.latents_layer_norm.forward(latents)?;
        let b = context.dim(0)?;
        let both = Tensor::cat(&[&context, &latents], 1)?;
        // [B, S, H * hd] -> [B, H, S, hd]
        let heads = |x: Tensor| -> Result<Tensor> {
            let s = x.dim(1)?;
            Ok(x.reshape((b, s, self.n_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let mut q = heads(self.q_proj.forward(&latents)?)?;
        let mut k = heads(self.k_proj.forward(&both)?)?;
        let v = heads(self.v_proj.forward(&both)?)?;
        if let Some((qn, kn)) = &self.qk_layer_norms {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let scale = (self.head_dim as f64).powf(-0.5);
        // softmax_last_dim subtracts the row maximum, as the reference's "stable softmax" does.
        let scores = (q * scale)?.matmul(&k.t()?.contiguous()?)?;
        let attn = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.flatten_from(2)?;
        self.output_proj.forward(&out)
    }
}

// Reference: transformers v5.24.0 src/transformers/models/idefics/perceiver.py IdeficsMLP
struct Mlp {
    ln: LayerNorm,
    fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn load(s: &Scope, c: &ResamplerConfig) -> Result<Self> {
        // intermediate_dim = vision_config.embed_dim * 4
        let (d, hidden) = (c.embed_dim, 4 * c.embed_dim);
        Ok(Self {
            ln: layer_norm(s, "ln", d, LN_EPS)?,
            fc: linear(s, "fc", d, hidden, false)?,
            c_proj: linear(s, "c_proj", hidden, d, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc.forward(&self.ln.forward(x)?)?.relu()?;
        self.c_proj.forward(&h)
    }
}

/// IDEFICS's `IdeficsPerceiverResampler`: [B, N, D] tokens -> [B, n_latents, D].
pub struct PerceiverResampler {
    config: ResamplerConfig,
    /// [n_latents, D]
    latents: Tensor,
    blocks: Vec<(PerceiverAttention, Mlp)>,
    layer_norm: LayerNorm,
}

impl PerceiverResampler {
    /// Loads the resampler with `config` from scope `s` (the module's own keys: `latents`,
    /// `blocks.{i}.0.*` attention, `blocks.{i}.1.*` MLP, `layer_norm`).
    // Reference: transformers v5.24.0 src/transformers/models/idefics/perceiver.py IdeficsPerceiverResampler
    pub fn load(s: &Scope, config: ResamplerConfig) -> Result<Self> {
        let c = config;
        if [c.embed_dim, c.depth, c.n_heads, c.head_dim, c.n_latents].contains(&0) {
            return Err(config_err(
                "perceiver_config",
                format!("every size must be positive: {c:?}"),
            ));
        }
        let blocks = (0..c.depth)
            .map(|i| {
                let b = s.pp(format!("blocks.{i}"));
                Ok((
                    PerceiverAttention::load(&b.pp("0"), &c)?,
                    Mlp::load(&b.pp("1"), &c)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            latents: s.get((c.n_latents, c.embed_dim), "latents")?,
            blocks,
            layer_norm: layer_norm(s, "layer_norm", c.embed_dim, LN_EPS)?,
            config,
        })
    }

    /// From an IDEFICS checkpoint's `config.json` and weights: `vision_config.embed_dim` and
    /// `perceiver_config`, tensors under `model.perceiver_resampler.` (as `IdeficsForVisionText2Text`
    /// saves them) or `perceiver_resampler.`. Other tensors (the language model, the vision tower)
    /// are left to the caller's [`Weights::finish`] policy.
    pub fn from_idefics(cfg: &Value, w: &Weights) -> Result<Self> {
        let p = cfg
            .get("perceiver_config")
            .ok_or_else(|| config_err("perceiver_config", "missing"))?;
        if p.get("use_resampler").and_then(Value::as_bool) == Some(false) {
            return Err(config_err(
                "perceiver_config.use_resampler",
                "false: the checkpoint has no resampler",
            ));
        }
        let embed_dim = cfg
            .pointer("/vision_config/embed_dim")
            .and_then(Value::as_u64)
            .ok_or_else(|| config_err("vision_config.embed_dim", "missing"))?;
        let mut with_dim = p.clone();
        with_dim["embed_dim"] = Value::from(embed_dim);
        let config: ResamplerConfig = parse(&with_dim, "perceiver_config")?;
        let prefix = ["model.perceiver_resampler", "perceiver_resampler"]
            .into_iter()
            .find(|p| w.contains(&format!("{p}.latents")))
            .ok_or_else(|| {
                config_err(
                    "perceiver_resampler",
                    format!(
                        "{}: no `model.perceiver_resampler.latents` tensor",
                        w.source().display()
                    ),
                )
            })?;
        Self::load(&w.pp(prefix), config)
    }

    pub fn config(&self) -> &ResamplerConfig {
        &self.config
    }

    /// Resamples tokens [B, N, embed_dim] (N >= 1) to [B, n_latents, embed_dim].
    pub fn forward(&self, context: &Tensor) -> Result<Tensor> {
        let (b, n, d) = context.dims3().map_err(|_| {
            ModelError::Input(format!(
                "the perceiver resampler takes tokens [batch, tokens, {}], got shape {:?}",
                self.config.embed_dim,
                context.dims()
            ))
        })?;
        if d != self.config.embed_dim || n == 0 {
            return Err(ModelError::Input(format!(
                "the perceiver resampler takes tokens [batch, tokens >= 1, {}] \
                 (vision_config.embed_dim), got [{b}, {n}, {d}]",
                self.config.embed_dim
            )));
        }
        let latents = self.latents.to_dtype(context.dtype())?;
        let mut x = latents.unsqueeze(0)?.repeat((b, 1, 1))?;
        for (attn, ff) in &self.blocks {
            x = (attn.forward(context, &x)? + &x)?;
            x = (ff.forward(&x)? + &x)?;
        }
        Ok(self.layer_norm.forward(&x)?)
    }
}
