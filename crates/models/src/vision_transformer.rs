//! The trunk shared by every plain ViT (CLIP, SigLIP, ViT, DINOv2, timm `vit_*`): patch embedding,
//! prefix tokens, position embeddings resampled to any input size, pre-norm blocks, final norm.
//! Each family supplies its key table ([`TrunkKeys`]) and pooling.

use candle_core::{Module, Tensor};
use visenc_weights::Scope;

use crate::api::EncodeOptions;
use crate::error::{config_err, ModelError, Result};
use crate::interpolate::{resample_pos_embed, PosInterp};
use crate::nn::{layer_norm, resolve_layers, BlockConfig, BlockKeys, Encoder, Last};

/// State-dict keys of a ViT trunk, relative to the vision tower.
#[derive(Debug, Clone, Copy)]
pub struct TrunkKeys {
    /// The patch-embedding convolution module.
    pub patch: &'static str,
    pub cls: Option<&'static str>,
    pub reg: Option<&'static str>,
    pub pos: &'static str,
    /// Whether tokens are stored with leading unit dims (`[1,1,D]`, `[1,N,D]`, HF ViT/DINOv2/timm)
    /// or without (`[D]`, `[N,D]`, CLIP).
    pub batched: bool,
    pub pre_norm: Option<&'static str>,
    pub blocks: &'static str,
    pub block: BlockKeys,
    /// Norm applied to every token after the last block.
    pub final_norm: Option<&'static str>,
}

/// Sizes and options of a ViT trunk.
#[derive(Debug, Clone)]
pub struct TrunkConfig {
    pub block: BlockConfig,
    pub layers: usize,
    pub patch: usize,
    pub patch_bias: bool,
    /// The size the position embeddings were trained for (height, width).
    pub image_size: (usize, usize),
    pub channels: usize,
    pub class_token: bool,
    pub registers: usize,
    /// How many prefix tokens (counted from the first: CLS, then registers) have a position embedding.
    pub pos_prefix: usize,
    pub interp: PosInterp,
}

impl TrunkConfig {
    pub fn prefix_tokens(&self) -> usize {
        self.class_token as usize + self.registers
    }

    pub fn grid(&self) -> (usize, usize) {
        (
            self.image_size.0 / self.patch,
            self.image_size.1 / self.patch,
        )
    }
}

/// The trunk's results for a batch.
pub struct TrunkOutput {
    /// The final sequence (after the final norm, if the family has one). [B, R + N, D]
    pub last: Tensor,
    /// Requested hidden states in the order asked, paired with the asked index.
    pub hidden_states: Vec<(i64, Tensor)>,
    pub grid: (usize, usize),
}

pub struct VisionTransformer {
    pub cfg: TrunkConfig,
    /// The patch-embedding convolution as a linear layer over flattened patches (its weight
    /// [D, C, p, p] as [D, C p p]): a stride-`p` convolution with a `p` x `p` kernel.
    patch: crate::linear::Linear,
    prefix: Option<Tensor>,
    pos_prefix: Option<Tensor>,
    pos_patch: Tensor,
    pre_norm: Option<crate::nn::LayerNorm>,
    encoder: Encoder,
    final_norm: Option<crate::nn::LayerNorm>,
}

impl VisionTransformer {
    pub fn load(s: &Scope, keys: &TrunkKeys, cfg: TrunkConfig) -> Result<Self> {
        let d = cfg.block.dim;
        let p = cfg.patch;
        if p == 0 || cfg.image_size.0 < p || cfg.image_size.1 < p {
            return Err(config_err(
                "patch_size",
                format!("patch {p} does not fit image {:?}", cfg.image_size),
            ));
        }
        let ps = s.pp(keys.patch);
        let w = ps.get((d, cfg.channels, p, p), "weight")?;
        let b = if cfg.patch_bias {
            Some(ps.get(d, "bias")?)
        } else {
            None
        };
        // Kept in f32 in every precision (0.7 % of a ViT-B/16's products, next to the pixels).
        let w = w.reshape((d, cfg.channels * p * p))?;
        let patch = crate::linear::Linear::with_precision(w, b, visenc_kernels::Precision::F32)?;

        // [n, D] rows, stored as [1, n, D] (batched) or [n, D]; CLIP stores its CLS token as [D].
        let rows = |name: &str, n: usize| -> Result<Tensor> {
            Ok(if keys.batched {
                s.get((1, n, d), name)?.squeeze(0)?
            } else {
                s.get((n, d), name)?
            })
        };
        let mut prefix = Vec::new();
        if cfg.class_token {
            let name = keys
                .cls
                .ok_or_else(|| config_err("class_token", "layout has no CLS token"))?;
            prefix.push(if keys.batched {
                rows(name, 1)?
            } else {
                s.get(d, name)?.unsqueeze(0)?
            });
        }
        if cfg.registers > 0 {
            let name = keys
                .reg
                .ok_or_else(|| config_err("reg_tokens", "layout has no register tokens"))?;
            prefix.push(rows(name, cfg.registers)?);
        }
        let prefix = if prefix.is_empty() {
            None
        } else {
            Some(Tensor::cat(&prefix, 0)?)
        };
        let (gh, gw) = cfg.grid();
        let pos = rows(keys.pos, cfg.pos_prefix + gh * gw)?;
        let pos_prefix = (cfg.pos_prefix > 0)
            .then(|| pos.narrow(0, 0, cfg.pos_prefix))
            .transpose()?;
        let pos_patch = pos.narrow(0, cfg.pos_prefix, gh * gw)?;
        let pre_norm = keys
            .pre_norm
            .map(|n| layer_norm(s, n, d, cfg.block.eps))
            .transpose()?;
        let encoder = Encoder::load(s, keys.blocks, cfg.layers, &keys.block, &cfg.block)?;
        let final_norm = keys
            .final_norm
            .map(|n| layer_norm(s, n, d, cfg.block.eps))
            .transpose()?;
        Ok(Self {
            cfg,
            patch,
            prefix,
            pos_prefix,
            pos_patch,
            pre_norm,
            encoder,
            final_norm,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.encoder.len()
    }

    /// Patch embedding + prefix tokens + position embeddings (+ pre-norm): the encoder input.
    pub fn embed(&self, pixels: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch;
        if c != self.cfg.channels || h < p || w < p {
            return Err(ModelError::Input(format!(
                "pixels [{b}, {c}, {h}, {w}] do not fit a {}-channel model with patch {p}",
                self.cfg.channels
            )));
        }
        let grid = (h / p, w / p);
        // Each patch's values in (channel, row, column) order, as the convolution's weight; the
        // pixels past the last whole patch are dropped, as the convolution does.
        let x = pixels
            .to_dtype(self.pos_patch.dtype())?
            .narrow(2, 0, grid.0 * p)?
            .narrow(3, 0, grid.1 * p)?
            .reshape((b, c, grid.0, p, grid.1, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, grid.0 * grid.1, c * p * p))?;
        let x = self.patch.forward(&x)?; // [B, N, D]
        let pos = resample_pos_embed(&self.pos_patch, self.cfg.grid(), grid, self.cfg.interp)?;
        let mut x = x.broadcast_add(&pos)?;
        if let Some(prefix) = &self.prefix {
            let prefix = match &self.pos_prefix {
                Some(pp) => {
                    let with_pos = (prefix.narrow(0, 0, self.cfg.pos_prefix)? + pp)?;
                    let rest = prefix.dim(0)? - self.cfg.pos_prefix;
                    if rest > 0 {
                        Tensor::cat(&[with_pos, prefix.narrow(0, self.cfg.pos_prefix, rest)?], 0)?
                    } else {
                        with_pos
                    }
                }
                None => prefix.clone(),
            };
            let d = prefix.dim(1)?;
            let prefix = prefix.unsqueeze(0)?.broadcast_as((b, prefix.dim(0)?, d))?;
            x = Tensor::cat(&[&prefix, &x], 1)?;
        }
        if let Some(n) = &self.pre_norm {
            x = n.forward(&x)?;
        }
        Ok((x, grid))
    }

    /// Runs the trunk; `last` says what the caller needs of the final sequence (with
    /// [`Last::First`], `TrunkOutput::last` holds only those tokens).
    pub fn forward(
        &self,
        pixels: &Tensor,
        opts: &EncodeOptions,
        last: Last,
    ) -> Result<TrunkOutput> {
        let (x, grid) = self.embed(pixels)?;
        let keep = resolve_layers(&opts.layers, self.encoder.len())?;
        let (out, states) = self.encoder.forward(&x, None, &keep, last)?;
        let last = match &self.final_norm {
            Some(n) if last != Last::Skip => n.forward(&out)?,
            _ => out,
        };
        Ok(TrunkOutput {
            last,
            hidden_states: opts.layers.iter().copied().zip(states).collect(),
            grid,
        })
    }

    /// Splits a final sequence into (prefix tokens, patch tokens).
    pub fn split_tokens(&self, last: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        let r = self.cfg.prefix_tokens();
        let n = last.dim(1)? - r;
        let prefix = (r > 0).then(|| last.narrow(1, 0, r)).transpose()?;
        Ok((prefix, last.narrow(1, r, n)?))
    }
}
