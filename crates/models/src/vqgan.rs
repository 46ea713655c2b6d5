//! The VQGAN encoder (diffusers `VQModel`): the diffusers `Encoder` trunk (`vae.rs`), the 1x1
//! `quant_conv`, then the `VectorQuantizer` picking the nearest codebook vector at every latent
//! position.

use candle_core::{DType, Tensor, D};
use serde::Deserialize;
use serde_json::Value;
use visenc_weights::Weights;

use crate::api::{EncodeOptions, ImageEncoder, ImageFeatures, Latents, ModelInfo};
use crate::conv::{Conv, ConvSpec};
use crate::error::Result;
use crate::vae::{ignore_decoder, latent_features, Encoder, TrunkConfig};
use crate::{parse, LoadedModel};

/// `VQModel` options besides the trunk's.
// Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/vq_model.py#L40
#[derive(Debug, Deserialize)]
#[serde(default)]
struct VqConfig {
    latent_channels: usize,
    num_vq_embeddings: usize,
    /// Codebook width; `null` means `latent_channels`.
    vq_embed_dim: Option<usize>,
    scaling_factor: f32,
}

impl Default for VqConfig {
    fn default() -> Self {
        Self {
            latent_channels: 3,
            num_vq_embeddings: 256,
            vq_embed_dim: None,
            scaling_factor: 0.18215,
        }
    }
}

const VQ_KEYS: &[&str] = &[
    "latent_channels",
    "num_vq_embeddings",
    "vq_embed_dim",
    "scaling_factor",
];

/// Index of the nearest codebook row for each row of `z` [N, D] among `codebook` [K, D]: [N] u32.
///
/// `VectorQuantizer.forward` takes `torch.argmin(torch.cdist(z, codebook), dim=1)`. `VQModel` builds
/// it with `remap=None` and `legacy=True`; `legacy` only moves `beta` between the two terms of the
/// training loss, so it changes neither the distances nor the indices. For more than 25 rows on
/// either side (every real codebook), `cdist` computes the Euclidean distance through one matrix
/// product of augmented rows, `[-2z, |z|^2, 1] . [e, 1, |e|^2]`, clamped at 0 before the square
/// root; the same is done here for any size (torch takes plain differences when both sides
/// have at most 25 rows, which can differ only by rounding). Distances are computed in f32 whatever
/// the model dtype. `torch.argmin` returns the first index of the minimum, and the first NaN if a row
/// has one: the minimum is taken, then the smallest index holding it, so the answer is the same on
/// every device.
// Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/vae.py#L644
// Reference: https://github.com/pytorch/pytorch/blob/v2.5.0/aten/src/ATen/native/Distance.cpp (`_euclidean_dist`, `cdist_impl`)
fn nearest_code(z: &Tensor, codebook: &Tensor) -> Result<Tensor> {
    let z = z.to_dtype(DType::F32)?;
    let e = codebook.to_dtype(DType::F32)?;
    let (n, k) = (z.dim(0)?, e.dim(0)?);
    let ones = |rows: usize| Tensor::ones((rows, 1), DType::F32, z.device());
    let za = Tensor::cat(&[&(&z * -2.0)?, &z.sqr()?.sum_keepdim(1)?, &ones(n)?], 1)?;
    let ea = Tensor::cat(&[&e, &ones(k)?, &e.sqr()?.sum_keepdim(1)?], 1)?;
    let raw = za.matmul(&ea.t()?)?;
    let dist = raw.clamp(0f32, f32::INFINITY)?.sqrt()?;
    // NaN sorts first in torch.argmin: stand it in as -inf (a real distance is never negative).
    let neg_inf = Tensor::full(f32::NEG_INFINITY, (n, k), z.device())?;
    let key = raw.ne(&raw)?.where_cond(&neg_inf, &dist)?;
    let best = key.min_keepdim(D::Minus1)?;
    let index = Tensor::arange(0u32, k as u32, z.device())?
        .reshape((1, k))?
        .broadcast_as((n, k))?;
    let past_end = Tensor::full(k as u32, (n, k), z.device())?;
    Ok(key
        .broadcast_eq(&best)?
        .where_cond(&index, &past_end)?
        .min(D::Minus1)?)
}

/// `VQModel.encode` (encoder + `quant_conv`) followed by `VectorQuantizer`.
pub struct VqModel {
    encoder: Encoder,
    quant_conv: Conv,
    /// `quantize.embedding.weight` [num_vq_embeddings, vq_embed_dim]
    codebook: Tensor,
    scaling_factor: f32,
}

impl ImageEncoder for VqModel {
    // Reference: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/vq_model.py#L133
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        opts.refuse_layers("the VQGAN encoder")?;
        let z = self.quant_conv.forward(&self.encoder.forward(pixels)?)?;
        let (b, d, h, w) = z.dims4()?;
        let flat = z.permute((0, 2, 3, 1))?.reshape((b * h * w, d))?;
        let codes = nearest_code(&flat, &self.codebook)?;
        // The codebook rows themselves; the reference returns `z + (z_q - z)` (the straight-through
        // estimator), which equals them up to float rounding.
        let quantized = self
            .codebook
            .index_select(&codes, 0)?
            .reshape((b, h, w, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let latents = Latents {
            mean: z,
            logvar: None,
            scaling_factor: self.scaling_factor,
            shift_factor: 0.0,
            codes: Some(codes.reshape((b, h, w))?),
            quantized: Some(quantized),
        };
        latent_features(latents, opts)
    }
}

/// Loads a diffusers `VQModel` (`config.json` + `diffusion_pytorch_model.safetensors`).
pub fn load(cfg: &Value, w: &Weights) -> Result<LoadedModel> {
    let trunk = TrunkConfig::parse(cfg, VQ_KEYS)?;
    let c: VqConfig = parse(cfg, "config.json")?;
    let dim = c.vq_embed_dim.unwrap_or(c.latent_channels);
    let root = w.root();
    let encoder = Encoder::load(&root.pp("encoder"), &trunk, c.latent_channels)?;
    let quant_conv = Conv::load(
        &root,
        "quant_conv",
        ConvSpec::new(c.latent_channels, dim, 1, 1).bias(true),
    )?;
    let codebook = root.get((c.num_vq_embeddings, dim), "quantize.embedding.weight")?;
    ignore_decoder(w);
    let info = ModelInfo {
        architecture: cfg["_class_name"].as_str().unwrap_or("VQModel").to_string(),
        family: "vqgan",
        image_size: trunk.image_size()?,
        patch_size: trunk.downscale(),
        num_layers: trunk.num_resnets(),
        hidden_size: dim,
        ..Default::default()
    };
    let model = VqModel {
        encoder,
        quant_conv,
        codebook,
        scaling_factor: c.scaling_factor,
    };
    Ok(LoadedModel {
        image: Box::new(model),
        text: None,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn codes(z: &[f32], codebook: &[f32]) -> Vec<u32> {
        let z = Tensor::from_slice(z, (z.len() / 2, 2), &Device::Cpu).unwrap();
        let e = Tensor::from_slice(codebook, (codebook.len() / 2, 2), &Device::Cpu).unwrap();
        nearest_code(&z, &e).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn ties_go_to_the_first_index_like_torch_argmin() {
        // Codes 1 and 3 are the same vector; (0, 0) is equally far from codes 0 and 2.
        let book = [1.0, 0.0, 5.0, 5.0, -1.0, 0.0, 5.0, 5.0];
        assert_eq!(
            codes(&[5.0, 5.0, 0.0, 0.0, -0.9, 0.1], &book),
            vec![1, 0, 2]
        );
    }

    #[test]
    fn nan_picks_the_first_nan_like_torch_argmin() {
        let book = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(codes(&[f32::NAN, 0.0, 0.0, 0.9], &book), vec![0, 1]);
    }
}
