//! BERT as a sentence encoder: transformers' `BertModel` (post-norm blocks, absolute positions, token
//! types) followed by sentence-transformers' masked mean pooling, e.g. all-MiniLM-L6-v2 (384-d). The
//! checkpoint's `pooler` (the NSP head's tanh layer) is not used by sentence encoders and is ignored.

use candle_core::{DType, Module, Tensor, D};
use serde::Deserialize;
use visenc_weights::{Scope, Weights};

use crate::api::{TextEncoder, TextFeatures};
use crate::error::{config_err, ModelError, Result};
use crate::nn::{layer_norm, Activation, Attention, LayerNorm, Mlp, QkvKeys};

/// The fields of a BERT `config.json` the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn absolute() -> String {
    "absolute".into()
}

// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/bert/modeling_bert.py#L283-L355
struct BertLayer {
    attn: Attention,
    attn_norm: LayerNorm,
    mlp: Mlp,
    out_norm: LayerNorm,
}

impl BertLayer {
    fn load(s: &Scope, c: &BertConfig, act: Activation) -> Result<Self> {
        let (d, m, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let a = s.pp("attention");
        let qkv = QkvKeys::Separate {
            q: "self.query",
            k: "self.key",
            v: "self.value",
        };
        Ok(Self {
            attn: Attention::load(&a, qkv, "output.dense", d, c.num_attention_heads, true)?,
            attn_norm: layer_norm(&a.pp("output"), "LayerNorm", d, eps)?,
            mlp: Mlp::load(s, "intermediate.dense", "output.dense", d, m, act)?,
            out_norm: layer_norm(&s.pp("output"), "LayerNorm", d, eps)?,
        })
    }

    /// Post-norm: `x = norm(x + attn(x))`, then `norm(x + mlp(x))`. `x` [B, L, D]; `bias`
    /// [B, 1, 1, L] additive (0 for tokens, a large negative for padding).
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let x = self
            .attn_norm
            .forward(&(self.attn.forward(x, None, Some(bias))? + x)?)?;
        Ok(self.out_norm.forward(&(self.mlp.forward(&x)? + x)?)?)
    }
}

/// A BERT encoder with mean pooling.
pub struct Bert {
    cfg: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<BertLayer>,
}

impl Bert {
    /// Builds from the checkpoint's `config.json` and weights (keys as `BertModel.state_dict()`, with or
    /// without a `bert.` prefix); `pooler.*` and the `position_ids` buffer are marked ignored.
    pub fn load(config: &serde_json::Value, w: &Weights) -> Result<Self> {
        let cfg: BertConfig = crate::parse(config, "BERT config.json")?;
        if cfg.position_embedding_type != "absolute" {
            return Err(ModelError::Unsupported {
                what: "BERT position_embedding_type",
                name: cfg.position_embedding_type,
            });
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(config_err(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    cfg.num_attention_heads, cfg.hidden_size
                ),
            ));
        }
        let prefix = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let names: Vec<String> = w.names().map(str::to_string).collect();
        for n in names {
            let rest = n.strip_prefix(prefix).unwrap_or(&n);
            if rest.starts_with("pooler.") || rest == "embeddings.position_ids" {
                w.ignore(&n);
            }
        }
        let s = w.root();
        let s = if prefix.is_empty() { s } else { s.pp("bert") };
        let e = s.pp("embeddings");
        let d = cfg.hidden_size;
        let act = Activation::from_name(&cfg.hidden_act)?;
        Ok(Self {
            word: e.get((cfg.vocab_size, d), "word_embeddings.weight")?,
            position: e.get(
                (cfg.max_position_embeddings, d),
                "position_embeddings.weight",
            )?,
            token_type: e.get((cfg.type_vocab_size, d), "token_type_embeddings.weight")?,
            emb_norm: layer_norm(&e, "LayerNorm", d, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| BertLayer::load(&s.pp("encoder.layer").pp(i), &cfg, act))
                .collect::<Result<_>>()?,
            cfg,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The last hidden state [T, L, D] of token ids [T, L] with attention mask [T, L] (token type 0).
    // https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/bert/modeling_bert.py#L54-L110
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (t, l) = ids.dims2()?;
        if mask.dims() != ids.dims() {
            return Err(ModelError::Input(format!(
                "attention mask {:?} does not match token ids {:?}",
                mask.dims(),
                ids.dims()
            )));
        }
        if l > self.cfg.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "{l} tokens exceed BERT's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let ids = ids.to_dtype(DType::U32)?;
        if let Some(bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&i| i as usize >= self.cfg.vocab_size)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} >= vocabulary size {}",
                self.cfg.vocab_size
            )));
        }
        let x = self
            .word
            .embedding(&ids.flatten_all()?)?
            .reshape((t, l, ()))?;
        let x = x
            .broadcast_add(&self.token_type.narrow(0, 0, 1)?)?
            .broadcast_add(&self.position.narrow(0, 0, l)?)?;
        let mut x = self.emb_norm.forward(&x)?;
        // transformers' bidirectional mask: the dtype's minimum where the mask is 0.
        let keep = mask.to_dtype(x.dtype())?;
        let bias = ((keep.ones_like()? - &keep)? * f32::MIN as f64)?.reshape((t, 1, 1, l))?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias)?;
        }
        Ok(x)
    }
}

/// sentence-transformers' mean pooling: the average of the token states where the mask is 1.
// https://github.com/huggingface/sentence-transformers/blob/v6.2.0/sentence_transformers/sentence_transformer/modules/pooling.py#L207-L221
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.maximum(1e-9f32)?;
    Ok(sum.broadcast_div(&count)?)
}

impl TextEncoder for Bert {
    /// `pooled` is the mean-pooled sentence embedding; BERT has no projection, so `projected` is the same.
    fn encode_text(&self, ids: &Tensor, mask: &Tensor) -> Result<TextFeatures> {
        let pooled = mean_pool(&self.forward(ids, mask)?, mask)?;
        Ok(TextFeatures {
            projected: pooled.clone(),
            pooled,
        })
    }

    fn context_length(&self) -> usize {
        self.cfg.max_position_embeddings
    }
}
