//! A sentence encoder as sentence-transformers assembles one from a checkpoint directory: the
//! transformer (BERT), then the `Pooling` module (`1_Pooling/config.json`), then `Normalize` when
//! `modules.json` lists it, with the truncation length of `sentence_bert_config.json`. For
//! all-MiniLM-L6-v2 that is masked mean pooling, L2 normalisation and 256 tokens. A plain transformers
//! BERT directory (no `modules.json`) gets mean pooling without normalisation and its full
//! `max_position_embeddings`.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::Value;
use visenc_weights::{Checkpoint, Weights};

use crate::api::{TextEncoder, TextFeatures};
use crate::bert::{mean_pool, Bert};
use crate::error::{file_err, ModelError, Result};
use crate::nn::l2_normalize;

/// How token states become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The average of the states where the attention mask is 1.
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
}

/// A text tower of any kind, with the width of the embedding it returns (`TextFeatures::projected`).
pub struct TextTower {
    pub encoder: Box<dyn TextEncoder>,
    pub dim: usize,
    /// The architecture as the checkpoint names it (e.g. `BertModel`).
    pub architecture: String,
    pub parameters: usize,
}

/// One entry of sentence-transformers' `modules.json`.
#[derive(Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// The fields of `1_Pooling/config.json` that pick the mode.
// https://github.com/huggingface/sentence-transformers/blob/v6.2.0/sentence_transformers/sentence_transformer/modules/pooling.py#L92-L110
#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file_err(path, e.to_string()))
}

/// The pooling, normalisation and truncation a sentence-transformers directory prescribes.
fn pipeline(dir: &Path, max_positions: usize) -> Result<(Pooling, bool, usize)> {
    let modules_path = dir.join("modules.json");
    if !modules_path.is_file() {
        return Ok((Pooling::Mean, false, max_positions));
    }
    let modules: Vec<Module> = read_json(&modules_path)?;
    let (mut pooling, mut normalize) = (None, false);
    for m in &modules {
        let kind = m.kind.rsplit('.').next().unwrap_or_default();
        match kind {
            "Transformer" => {}
            "Normalize" => normalize = true,
            "Pooling" => {
                let path = dir.join(&m.path).join("config.json");
                let c: PoolingConfig = read_json(&path)?;
                let others = c.pooling_mode_max_tokens
                    || c.pooling_mode_mean_sqrt_len_tokens
                    || c.pooling_mode_weightedmean_tokens
                    || c.pooling_mode_lasttoken;
                pooling =
                    Some(
                        match (c.pooling_mode_mean_tokens, c.pooling_mode_cls_token, others) {
                            (true, false, false) => Pooling::Mean,
                            (false, true, false) => Pooling::Cls,
                            _ => return Err(file_err(
                                &path,
                                "only one of pooling_mode_mean_tokens / pooling_mode_cls_token is \
                                 supported (max, mean-sqrt-len, weighted-mean, last-token and \
                                 concatenated modes are not)",
                            )),
                        },
                    );
            }
            _ => {
                return Err(file_err(
                    &modules_path,
                    format!(
                        "sentence-transformers module {:?} is not supported (Transformer, Pooling, \
                         Normalize are)",
                        m.kind
                    ),
                ))
            }
        }
    }
    let pooling = pooling.ok_or_else(|| file_err(&modules_path, "lists no Pooling module"))?;
    let st_path = dir.join("sentence_bert_config.json");
    let max_len = if st_path.is_file() {
        let v: Value = read_json(&st_path)?;
        match v.get("max_seq_length") {
            Some(n) => n.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                file_err(
                    &st_path,
                    format!("max_seq_length {n} is not a positive integer"),
                )
            })? as usize,
            None => max_positions,
        }
    } else {
        max_positions
    };
    Ok((pooling, normalize, max_len.min(max_positions)))
}

/// BERT with sentence-transformers' pooling and normalisation.
pub struct SentenceBert {
    bert: Bert,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: usize,
}

impl SentenceBert {
    /// Builds from a BERT checkpoint and the sentence-transformers files beside its `config.json`.
    pub fn load(ckpt: &Checkpoint, w: &Weights) -> Result<Self> {
        let bert = Bert::load(&ckpt.config, w)?;
        let (pooling, normalize, max_seq_length) =
            pipeline(&ckpt.dir, bert.config().max_position_embeddings)?;
        Ok(Self {
            bert,
            pooling,
            normalize,
            max_seq_length,
        })
    }

    pub fn dim(&self) -> usize {
        self.bert.config().hidden_size
    }
}

/// Drops the columns after the last unmasked token of any row: their states never reach the pooled
/// result (their keys get zero attention weight, their rows are pooled out), so the result is the
/// same, computed on the texts' real length rather than the padded context.
fn trim_padding(ids: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, l) = mask.dims2()?;
    let cols = mask.ne(0u32)?.to_dtype(candle_core::DType::U32)?.max(0)?;
    let used = cols
        .to_vec1::<u32>()?
        .iter()
        .rposition(|&c| c != 0)
        .map_or(1, |i| i + 1);
    if used == l {
        return Ok((ids.clone(), mask.clone()));
    }
    Ok((ids.narrow(1, 0, used)?, mask.narrow(1, 0, used)?))
}

impl TextEncoder for SentenceBert {
    /// `pooled` is the pooled sentence vector; `projected` the sentence embedding (normalised when the
    /// pipeline normalises).
    // https://github.com/huggingface/sentence-transformers/blob/v6.2.0/sentence_transformers/sentence_transformer/modules/pooling.py#L195-L221
    fn encode_text(&self, ids: &Tensor, mask: &Tensor) -> Result<TextFeatures> {
        if mask.dims() != ids.dims() {
            return Err(ModelError::Input(format!(
                "attention mask {:?} does not match token ids {:?}",
                mask.dims(),
                ids.dims()
            )));
        }
        let (ids, mask) = trim_padding(ids, &mask.to_dtype(candle_core::DType::U32)?)?;
        let hidden = self.bert.forward(&ids, &mask)?;
        let pooled = match self.pooling {
            Pooling::Mean => mean_pool(&hidden, &mask)?,
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let projected = if self.normalize {
            l2_normalize(&pooled)?
        } else {
            pooled.clone()
        };
        Ok(TextFeatures { pooled, projected })
    }

    fn context_length(&self) -> usize {
        self.max_seq_length
    }
}
