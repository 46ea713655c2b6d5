//! Tokenizers for the text towers: the checkpoint's own `tokenizer.json` through the `tokenizers`
//! crate, or CLIP's BPE vocabulary built in (open_clip checkpoints ship no tokenizer file), with
//! truncation and padding to the model's context length exactly as the reference processors do.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

/// Errors from building or running a tokenizer; each names the tokenizer's file.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{}: cannot load tokenizer: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("tokenizing {text:?}: {reason}")]
    Encode { text: String, reason: String },
}

/// Token ids and attention masks for a batch, each row exactly `context_length` long.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
}

/// How many tokens of a text the model sees (special tokens included, padding excluded), and whether
/// the text was cut to the context length to get there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCount {
    pub tokens: usize,
    pub truncated: bool,
}

/// A tokenizer set up for one text tower.
pub struct TextTokenizer {
    inner: Tokenizer,
    source: PathBuf,
    context_length: usize,
}

/// The CLIP BPE merges that open_clip ships (`bpe_simple_vocab_16e6.txt.gz`, MIT licence, OpenAI).
const CLIP_BPE_GZ: &[u8] = include_bytes!("../data/bpe_simple_vocab_16e6.txt.gz");

/// GPT-2's reversible byte-to-unicode table, in its order.
// Reference: https://github.com/mlfoundations/open_clip/blob/v2.29.0/src/open_clip/tokenizer.py#L41
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter().filter_map(char::from_u32).collect()
}

/// Builds the `tokenizer.json` of Hugging Face's `CLIPTokenizerFast` from a CLIP BPE merges file,
/// with the vocabulary constructed as open_clip's `SimpleTokenizer` does.
fn clip_tokenizer_json(bpe: &str) -> Value {
    let merges: Vec<&str> = bpe.lines().skip(1).take(49152 - 256 - 2).collect();
    let units = bytes_to_unicode();
    let mut vocab: Vec<String> = units.iter().map(|c| c.to_string()).collect();
    vocab.extend(units.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    let sot = vocab.len();
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let vocab_map: serde_json::Map<String, Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, Value::from(i)))
        .collect();
    let special = |id: usize, content: &str| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(sot, "<|startoftext|>"), special(sot + 1, "<|endoftext|>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", sot + 1], "cls": ["<|startoftext|>", sot],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map, "merges": merges}
    })
}

/// The pad token named by a `tokenizer_config.json` / `special_tokens_map.json` entry.
fn token_name(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v.get("content")?.as_str())
}

impl TextTokenizer {
    /// Loads `tokenizer.json`. Padding uses the pad token of `tokenizer_config` (if given), else
    /// `fallback_pad_id`; every sequence is truncated and padded to `context_length`.
    pub fn from_file(
        path: &Path,
        tokenizer_config: Option<&Value>,
        context_length: usize,
        fallback_pad_id: u32,
    ) -> Result<Self, TextError> {
        let inner = Tokenizer::from_file(path).map_err(|e| TextError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let pad = tokenizer_config
            .and_then(|c| c.get("pad_token"))
            .and_then(token_name);
        let pad_id = match pad {
            Some(name) => inner.token_to_id(name).ok_or_else(|| TextError::Config {
                path: path.to_path_buf(),
                reason: format!("pad token {name:?} is not in the vocabulary"),
            })?,
            None => fallback_pad_id,
        };
        Self::configure(inner, path.to_path_buf(), context_length, pad_id)
    }

    /// CLIP's tokenizer built from the BPE vocabulary open_clip ships, for checkpoints without a
    /// `tokenizer.json`. `pad_id` is 0 in open_clip and `<|endoftext|>` (49407) in transformers;
    /// the text embedding is the same either way.
    pub fn clip_builtin(context_length: usize, pad_id: u32) -> Result<Self, TextError> {
        let source = PathBuf::from("<built-in CLIP BPE vocabulary>");
        let err = |reason: String| TextError::Load {
            path: source.clone(),
            reason,
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(CLIP_BPE_GZ), &mut text)
            .map_err(|e| err(e.to_string()))?;
        let inner = Tokenizer::from_bytes(clip_tokenizer_json(&text).to_string())
            .map_err(|e| err(e.to_string()))?;
        Self::configure(inner, source, context_length, pad_id)
    }

    fn configure(
        mut inner: Tokenizer,
        source: PathBuf,
        context_length: usize,
        pad_id: u32,
    ) -> Result<Self, TextError> {
        let pad_token = inner.id_to_token(pad_id).unwrap_or_default();
        inner
            .with_truncation(Some(TruncationParams {
                max_length: context_length,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
                stride: 0,
            }))
            .map_err(|e| TextError::Config {
                path: source.clone(),
                reason: e.to_string(),
            })?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(context_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(Self {
            inner,
            source,
            context_length,
        })
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Where the tokenizer came from (for error messages).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Tokenizes a batch with special tokens, truncation and padding.
    pub fn encode(&self, texts: &[&str]) -> Result<Encoded, TextError> {
        let mut out = Encoded {
            ids: Vec::with_capacity(texts.len()),
            mask: Vec::with_capacity(texts.len()),
        };
        for t in texts {
            let e = self.inner.encode(*t, true).map_err(|e| TextError::Encode {
                text: t.to_string(),
                reason: e.to_string(),
            })?;
            out.ids.push(e.get_ids().to_vec());
            out.mask.push(e.get_attention_mask().to_vec());
        }
        Ok(out)
    }

    /// The token count of each text after truncation, as [`Self::encode`] would produce it.
    pub fn count(&self, texts: &[&str]) -> Result<Vec<TokenCount>, TextError> {
        texts
            .iter()
            .map(|t| {
                let e = self.inner.encode(*t, true).map_err(|e| TextError::Encode {
                    text: t.to_string(),
                    reason: e.to_string(),
                })?;
                Ok(TokenCount {
                    tokens: e.get_attention_mask().iter().filter(|&&m| m != 0).count(),
                    truncated: !e.get_overflowing().is_empty(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_permutation() {
        let t = bytes_to_unicode();
        assert_eq!(t.len(), 256);
        let mut s = t.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 256);
        assert_eq!(t[0], '!');
    }
}
