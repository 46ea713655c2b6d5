//! Swin Transformer in the transformers layout (`SwinModel`, `SwinForImageClassification`).
//!
//! Tokens live on a 2-D grid. Each block attends inside non-overlapping windows (every other block
//! shifts the grid by half a window first, with a mask so tokens wrapped around by the shift do not
//! see each other), with a learned bias per relative position; stages are joined by patch merging
//! (2x2 neighbours concatenated, LayerNorm, Linear 4C -> 2C). Sizes that are not multiples of the
//! patch, of the window or of 2 are zero-padded on the bottom/right exactly where the reference pads.
//!
//! The attention is [`nn::Attention`](crate::nn::Attention) with the relative position bias (plus the
//! shift mask) passed as its additive bias: the projections and softmax are the same math, only the
//! bias is Swin's, so it is built here rather than taught to the shared module.

use candle_core::{Module, Tensor};
use serde::Deserialize;
use serde_json::Value;
use visenc_weights::{Scope, Weights};

use crate::api::{EncodeOptions, FeatureMap, ImageEncoder, ImageFeatures, ModelInfo};
use crate::conv::{Conv, ConvSpec, Padding};
use crate::error::{config_err, ModelError, Result};
use crate::nn::{layer_norm, linear, optional_classifier, Activation, Attention, Mlp, QkvKeys};
use crate::vit::hf_labels;
use crate::{parse, LoadedModel};

/// eps of the norms the reference builds with `nn.LayerNorm`'s default (patch embedding, merging).
const TORCH_LN_EPS: f64 = 1e-5;
/// What the shift mask adds to the logits of token pairs from different regions (not -inf).
const MASK_VALUE: f32 = -100.0;

/// The names checkpoints are saved with (the hub's; transformers 5 renames them to `q_proj`.. and
/// `relative_position_bias.relative_position_bias_table` on load and back on save).
// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/swin/modeling_swin.py#L401
const QKV: QkvKeys = QkvKeys::Separate {
    q: "attention.self.query",
    k: "attention.self.key",
    v: "attention.self.value",
};

/// One Swin block (`SwinLayer`): `x + attn(window(norm1(x)))`, then `x + mlp(norm2(x))`.
// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/swin/modeling_swin.py#L508
struct Block {
    norm1: crate::nn::LayerNorm,
    attn: Attention,
    /// The relative position bias of one window, [1, heads, N, N] with N = window².
    rel_bias: Tensor,
    norm2: crate::nn::LayerNorm,
    mlp: Mlp,
    /// Half a window in odd blocks, 0 in even ones (before the small-grid rule).
    shift: usize,
}

/// `table[index]` as [1, heads, N, N], index[i, j] = (dh + w - 1) * (2w - 1) + (dw + w - 1) for the
/// row-major window coordinates (dh, dw) = coords_i - coords_j.
// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/swin/modeling_swin.py#L329
fn relative_position_bias(table: &Tensor, window: usize) -> Result<Tensor> {
    let n = window * window;
    let span = 2 * window - 1;
    let index: Vec<u32> = (0..n)
        .flat_map(|i| {
            (0..n).map(move |j| {
                ((i / window + window - 1 - j / window) * span
                    + (i % window + window - 1 - j % window)) as u32
            })
        })
        .collect();
    let index = Tensor::from_vec(index, n * n, table.device())?;
    let heads = table.dim(1)?;
    Ok(table
        .index_select(&index, 0)?
        .reshape((n, n, heads))?
        .permute((2, 0, 1))?
        .contiguous()?
        .unsqueeze(0)?)
}

/// The shifted-window mask over a padded `hp` x `wp` grid, [windows, 1, N, N]: each position gets a
/// region id `h_region * 3 + w_region` (h_region = [h >= hp - window] + [h >= hp - shift]), and two
/// tokens of one window with different ids get [`MASK_VALUE`].
// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/swin/modeling_swin.py#L584
fn shift_mask(
    hp: usize,
    wp: usize,
    window: usize,
    shift: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let region =
        |i: usize, size: usize| (i >= size - window) as usize + (i >= size - shift) as usize;
    let (nh, nw, n) = (hp / window, wp / window, window * window);
    let mut mask = Vec::with_capacity(nh * nw * n * n);
    for wi in 0..nh {
        for wj in 0..nw {
            let id = |t: usize| {
                region(wi * window + t / window, hp) * 3 + region(wj * window + t % window, wp)
            };
            for p in 0..n {
                for q in 0..n {
                    mask.push(if id(p) == id(q) { 0.0 } else { MASK_VALUE });
                }
            }
        }
    }
    Ok(Tensor::from_vec(mask, (nh * nw, 1, n, n), device)?)
}

/// [B, H, W, C] -> [B * windows, window², C], windows in row-major order.
// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/swin/modeling_swin.py#L486
fn window_partition(x: &Tensor, window: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let x = x
        .reshape(vec![b, h / window, window, w / window, window, c])?
        .transpose(2, 3)?;
    Ok(x.reshape((b * (h / window) * (w / window), window * window, c))?)
}

/// The inverse of [`window_partition`]: [B * windows, window², C] -> [B, H, W, C].
fn window_reverse(x: &Tensor, window: usize, b: usize, h: usize, w: usize) -> Result<Tensor> {
    let c = x.dim(2)?;
    let x = x
        .reshape(vec![b, h / window, w / window, window, window, c])?
        .transpose(2, 3)?;
    Ok(x.reshape((b, h, w, c))?)
}

impl Block {
    fn load(s: &Scope, dim: usize, heads: usize, c: &HfConfig, shift: usize) -> Result<Self> {
        let span = 2 * c.window_size - 1;
        let table = s.get(
            (span * span, heads),
            "attention.self.relative_position_bias_table",
        )?;
        // A buffer fully determined by the window size (rebuilt in `relative_position_bias`); hub
        // checkpoints carry it, transformers 5 no longer saves it.
        s.ignore("attention.self.relative_position_index");
        let hidden = (c.mlp_ratio * dim as f64) as usize;
        Ok(Self {
            norm1: layer_norm(s, "layernorm_before", dim, c.layer_norm_eps)?,
            attn: Attention::load(s, QKV, "attention.output.dense", dim, heads, c.qkv_bias)?,
            rel_bias: relative_position_bias(&table, c.window_size)?,
            norm2: layer_norm(s, "layernorm_after", dim, c.layer_norm_eps)?,
            mlp: Mlp::load(
                s,
                "intermediate.dense",
                "output.dense",
                dim,
                hidden,
                Activation::from_name(&c.hidden_act)?,
            )?,
            shift,
        })
    }

    /// `x`: [B, h*w, C] on an `h` x `w` grid; `shift` is this block's shift after the small-grid rule.
    // Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/swin/modeling_swin.py#L529
    fn forward(
        &self,
        x: &Tensor,
        (h, w): (usize, usize),
        window: usize,
        shift: usize,
    ) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        // Normalise, then pad with zeros to whole windows (padded tokens are attended to, unmasked).
        let (hp, wp) = (h.div_ceil(window) * window, w.div_ceil(window) * window);
        let y = self.norm1.forward(x)?.reshape((b, h, w, c))?;
        let mut y = y
            .pad_with_zeros(1, 0, hp - h)?
            .pad_with_zeros(2, 0, wp - w)?;
        let mut bias = self.rel_bias.clone();
        if shift > 0 {
            y = y.roll(-(shift as i32), 1)?.roll(-(shift as i32), 2)?;
            let mask = shift_mask(hp, wp, window, shift, x.device())?.to_dtype(x.dtype())?;
            let per_window = mask.broadcast_add(&self.rel_bias)?;
            let (nw, heads, n, _) = per_window.dims4()?;
            bias = per_window
                .unsqueeze(0)?
                .broadcast_as((b, nw, heads, n, n))?
                .reshape((b * nw, heads, n, n))?;
        }
        let attended = self
            .attn
            .forward(&window_partition(&y, window)?, None, Some(&bias))?;
        let mut y = window_reverse(&attended, window, b, hp, wp)?;
        if shift > 0 {
            y = y.roll(shift as i32, 1)?.roll(shift as i32, 2)?;
        }
        let y = y.narrow(1, 0, h)?.narrow(2, 0, w)?.reshape((b, h * w, c))?;
        let x = (x + y)?;
        Ok((&x + self.mlp.forward(&self.norm2.forward(&x)?)?)?)
    }
}

/// 2x2 patch merging: pad odd sizes, concatenate (row, col) = (0,0), (1,0), (0,1), (1,1), LayerNorm,
/// Linear 4C -> 2C without bias.
// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/swin/modeling_swin.py#L289
struct PatchMerging {
    norm: crate::nn::LayerNorm,
    reduction: crate::linear::Linear,
}

impl PatchMerging {
    fn forward(&self, x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let x = x
            .reshape((b, h, w, c))?
            .pad_with_zeros(1, 0, h % 2)?
            .pad_with_zeros(2, 0, w % 2)?;
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        // [b, i, row, j, col, c] -> [b, i, j, col, row, c]: the reference's column-major quad order.
        let x = x
            .reshape(vec![b, h2, 2, w2, 2, c])?
            .permute((0, 1, 3, 4, 2, 5))?
            .reshape((b, h2 * w2, 4 * c))?;
        self.reduction.forward(&self.norm.forward(&x)?)
    }
}

struct Stage {
    blocks: Vec<Block>,
    merge: Option<PatchMerging>,
}

pub struct Swin {
    patch_embed: Conv,
    patch: usize,
    embed_norm: crate::nn::LayerNorm,
    stages: Vec<Stage>,
    window: usize,
    norm: crate::nn::LayerNorm,
    head: Option<crate::linear::Linear>,
}

impl ImageEncoder for Swin {
    // Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/swin/modeling_swin.py#L848
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        opts.refuse_layers("Swin")?;
        let (_, _, ph, pw) = pixels.dims4()?;
        // Pad the pixels on the right/bottom to whole patches.
        let px = pixels.pad_with_zeros(2, 0, ph.next_multiple_of(self.patch) - ph)?;
        let px = px.pad_with_zeros(3, 0, pw.next_multiple_of(self.patch) - pw)?;
        let x = self.patch_embed.forward(&px)?;
        let mut grid = (x.dim(2)?, x.dim(3)?);
        let mut x = self
            .embed_norm
            .forward(&x.flatten_from(2)?.transpose(1, 2)?)?;
        let mut maps = Vec::new();
        let mut reduction = self.patch;
        for (i, stage) in self.stages.iter().enumerate() {
            // transformers' `set_shift_and_window_size`: on a grid no larger than the window, the
            // window covers the grid and nothing shifts. (transformers stores the clamped sizes in
            // the layer, so they leak into later calls; here every call stands alone, as on a freshly
            // loaded reference.) A grid smaller than the window fails in the reference (its relative
            // position bias is sized for the full window), so it is refused.
            let small = grid.0.min(grid.1) <= self.window;
            if grid.0.min(grid.1) < self.window {
                let enough = (self.patch * self.window) << (self.stages.len() - 1);
                return Err(ModelError::Input(format!(
                    "Swin stage {i} has a {}x{} token grid, smaller than its {w}x{w} window \
                     (transformers cannot run this size either); {enough} pixels per side suffice",
                    grid.0,
                    grid.1,
                    w = self.window
                )));
            }
            for b in &stage.blocks {
                x = b.forward(&x, grid, self.window, if small { 0 } else { b.shift })?;
            }
            if opts.features {
                let (bsz, _, c) = x.dims3()?;
                maps.push(FeatureMap {
                    reduction,
                    map: x.transpose(1, 2)?.reshape((bsz, c, grid.0, grid.1))?,
                });
            }
            if let Some(m) = &stage.merge {
                x = m.forward(&x, grid)?;
                grid = (grid.0.div_ceil(2), grid.1.div_ceil(2));
                reduction *= 2;
            }
        }
        let x = self.norm.forward(&x)?;
        let pooled = x.mean(1)?;
        let logits = self.head.as_ref().map(|h| h.forward(&pooled)).transpose()?;
        Ok(ImageFeatures {
            pooled,
            projected: None,
            logits,
            prefix_tokens: None,
            patch_tokens: opts.tokens.then_some(x),
            grid,
            hidden_states: vec![],
            feature_maps: maps,
            latents: None,
        })
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct HfConfig {
    image_size: usize,
    patch_size: usize,
    num_channels: usize,
    embed_dim: usize,
    depths: Vec<usize>,
    num_heads: Vec<usize>,
    window_size: usize,
    mlp_ratio: f64,
    qkv_bias: bool,
    hidden_act: String,
    use_absolute_embeddings: bool,
    layer_norm_eps: f64,
}

impl Default for HfConfig {
    fn default() -> Self {
        Self {
            image_size: 224,
            patch_size: 4,
            num_channels: 3,
            embed_dim: 96,
            depths: vec![2, 2, 6, 2],
            num_heads: vec![3, 6, 12, 24],
            window_size: 7,
            mlp_ratio: 4.0,
            qkv_bias: true,
            hidden_act: "gelu".into(),
            use_absolute_embeddings: false,
            layer_norm_eps: 1e-5,
        }
    }
}

/// Loads a transformers Swin (`SwinModel` or `SwinForImageClassification`).
pub fn load_hf(cfg: &Value, w: &Weights, architecture: &str) -> Result<LoadedModel> {
    let c: HfConfig = parse(cfg, "config.json")?;
    if c.use_absolute_embeddings {
        return Err(ModelError::Unsupported {
            what: "Swin use_absolute_embeddings",
            name: "true".into(),
        });
    }
    if c.depths.is_empty() || c.num_heads.len() != c.depths.len() {
        return Err(config_err(
            "depths",
            "depths and num_heads must have the same, non-zero length",
        ));
    }
    if c.window_size == 0 || c.patch_size == 0 {
        return Err(config_err(
            "window_size",
            "window_size and patch_size must be positive",
        ));
    }
    let root = w.root();
    let s = if root.contains("swin.embeddings.patch_embeddings.projection.weight") {
        root.pp("swin")
    } else {
        root.clone()
    };
    let spec = ConvSpec::new(c.num_channels, c.embed_dim, c.patch_size, c.patch_size)
        .padding(Padding::Symmetric(0))
        .bias(true);
    let patch_embed = Conv::load(&s, "embeddings.patch_embeddings.projection", spec)?;
    let embed_norm = layer_norm(&s, "embeddings.norm", c.embed_dim, TORCH_LN_EPS)?;
    let mut stages = Vec::new();
    let mut dim = c.embed_dim;
    for (i, (&depth, &heads)) in c.depths.iter().zip(&c.num_heads).enumerate() {
        let ss = s.pp(format!("encoder.layers.{i}"));
        let blocks = (0..depth)
            .map(|j| {
                Block::load(
                    &ss.pp(format!("blocks.{j}")),
                    dim,
                    heads,
                    &c,
                    if j % 2 == 1 { c.window_size / 2 } else { 0 },
                )
            })
            .collect::<Result<_>>()?;
        let merge = if i + 1 < c.depths.len() {
            let m = ss.pp("downsample");
            Some(PatchMerging {
                norm: layer_norm(&m, "norm", 4 * dim, TORCH_LN_EPS)?,
                reduction: linear(&m, "reduction", 4 * dim, 2 * dim, false)?,
            })
        } else {
            None
        };
        stages.push(Stage { blocks, merge });
        if i + 1 < c.depths.len() {
            dim *= 2;
        }
    }
    let norm = layer_norm(&s, "layernorm", dim, c.layer_norm_eps)?;
    let head = optional_classifier(&root, "classifier", dim)?;
    let info = ModelInfo {
        architecture: architecture.to_string(),
        family: "swin",
        image_size: (c.image_size, c.image_size),
        patch_size: c.patch_size,
        num_layers: c.depths.iter().sum(),
        hidden_size: dim,
        labels: head.as_ref().and(hf_labels(cfg)),
        ..Default::default()
    };
    let model = Swin {
        patch_embed,
        patch: c.patch_size,
        embed_norm,
        stages,
        window: c.window_size,
        norm,
        head,
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

    #[test]
    fn relative_index_matches_reference_layout() {
        // Table rows 0..9 for a 2x2 window, one head: the bias equals the index itself.
        let table = Tensor::arange(0f32, 9.0, &Device::Cpu)
            .unwrap()
            .reshape((9, 1))
            .unwrap();
        let b: Vec<Vec<f32>> = relative_position_bias(&table, 2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        // coords (0,0),(0,1),(1,0),(1,1); index = (dh+1)*3 + (dw+1).
        assert_eq!(b[0], vec![4.0, 3.0, 1.0, 0.0]);
        assert_eq!(b[3], vec![8.0, 7.0, 5.0, 4.0]);
    }

    #[test]
    fn shift_mask_separates_wrapped_regions() {
        // 4x4 grid, window 2, shift 1: the last window mixes regions 4, 5, 7, 8.
        let m = shift_mask(4, 4, 2, 1, &Device::Cpu).unwrap();
        assert_eq!(m.dims(), &[4, 1, 4, 4]);
        let first: Vec<f32> = m.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(first.iter().all(|&v| v == 0.0));
        let last: Vec<Vec<f32>> = m.get(3).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(last[0], vec![0.0, MASK_VALUE, MASK_VALUE, MASK_VALUE]);
    }
}
