//! The text tower of CLIP and SigLIP: token + position embeddings, pre-norm blocks, final norm,
//! pooling at the end-of-text token (CLIP) or the last position (SigLIP), projection.

use candle_core::{IndexOp, Module, Tensor};
use visenc_weights::Scope;

use crate::api::{TextEncoder, TextFeatures};
use crate::error::{ModelError, Result};
use crate::nn::{causal_mask, layer_norm, BlockConfig, BlockKeys, Encoder, Last, Projection};

/// State-dict keys of a text tower.
#[derive(Debug, Clone, Copy)]
pub struct TextKeys {
    /// `[V, D]` token embedding tensor (full name, e.g. `embeddings.token_embedding.weight`).
    pub token: &'static str,
    /// `[L, D]` position embedding tensor.
    pub pos: &'static str,
    pub blocks: &'static str,
    pub block: BlockKeys,
    pub final_norm: &'static str,
}

/// Where the pooled text feature is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPool {
    /// The first position holding `eos` (HF CLIP with a modern `eos_token_id`).
    FirstEos(u32),
    /// The position of the largest id (open_clip `argmax`, HF CLIP with the legacy `eos_token_id` 2).
    ArgMax,
    /// The last position (SigLIP).
    Last,
}

#[derive(Debug, Clone)]
pub struct TextConfig {
    pub block: BlockConfig,
    pub layers: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub causal: bool,
    pub pool: TextPool,
}

pub struct TextTransformer {
    cfg: TextConfig,
    token: Tensor,
    pos: Tensor,
    encoder: Encoder,
    final_norm: crate::nn::LayerNorm,
    projection: Projection,
}

impl TextTransformer {
    pub fn load(
        s: &Scope,
        keys: &TextKeys,
        cfg: TextConfig,
        projection: Projection,
    ) -> Result<Self> {
        let d = cfg.block.dim;
        Ok(Self {
            token: s.get((cfg.vocab_size, d), keys.token)?,
            pos: s.get((cfg.context_length, d), keys.pos)?,
            encoder: Encoder::load(s, keys.blocks, cfg.layers, &keys.block, &cfg.block)?,
            final_norm: layer_norm(s, keys.final_norm, d, cfg.block.eps)?,
            projection,
            cfg,
        })
    }
}

impl TextEncoder for TextTransformer {
    // Reference: https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/clip/modeling_clip.py#L1004
    fn encode_text(&self, ids: &Tensor, _mask: &Tensor) -> Result<TextFeatures> {
        // Padding follows the end-of-text token, so with a causal mask (CLIP) or last-token pooling
        // over fixed-length padding (SigLIP, which the reference runs without a mask) the padding
        // mask does not change the pooled output; the references pool exactly this way.
        let (t, l) = ids.dims2()?;
        if l > self.cfg.context_length {
            return Err(ModelError::Input(format!(
                "{l} tokens exceed the context length {}",
                self.cfg.context_length
            )));
        }
        let ids_v: Vec<Vec<u32>> = ids.to_dtype(candle_core::DType::U32)?.to_vec2()?;
        if let Some(bad) = ids_v
            .iter()
            .flatten()
            .find(|&&i| i as usize >= self.cfg.vocab_size)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} >= vocabulary size {}",
                self.cfg.vocab_size
            )));
        }
        let flat = ids.to_dtype(candle_core::DType::U32)?.flatten_all()?;
        let x = self.token.embedding(&flat)?.reshape((t, l, ()))?;
        let x = x.broadcast_add(&self.pos.narrow(0, 0, l)?)?;
        let mask = if self.cfg.causal {
            Some(causal_mask(l, x.dtype(), x.device())?)
        } else {
            None
        };
        let (x, _) = self.encoder.forward(&x, mask.as_ref(), &[], Last::All)?;
        let x = self.final_norm.forward(&x)?;
        let pos: Vec<usize> = ids_v
            .iter()
            .map(|row| match self.cfg.pool {
                TextPool::Last => l - 1,
                TextPool::FirstEos(eos) => row.iter().position(|&i| i == eos).unwrap_or(0),
                TextPool::ArgMax => {
                    // First occurrence of the maximum, as torch.argmax.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&i| i == max).unwrap_or(0)
                }
            })
            .collect();
        let pooled = Tensor::stack(
            &pos.iter()
                .enumerate()
                .map(|(i, &p)| x.i((i, p)))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let projected = self.projection.forward(&pooled)?;
        Ok(TextFeatures { pooled, projected })
    }

    fn context_length(&self) -> usize {
        self.cfg.context_length
    }
}
