//! visenc: load a vision encoder as published and turn images (and text) into vectors.
//!
//! ```no_run
//! use visenc::{Encoder, LoadOptions, EncodeOptions};
//! let enc = Encoder::load("openai/clip-vit-base-patch32", &LoadOptions::default())?;
//! let px = enc.load_image("cat.jpg".as_ref())?;
//! let features = enc.encode_pixels(&[px], &EncodeOptions::default())?;
//! let probs = enc.zero_shot(features.embedding(), &["cat", "dog"], "a photo of a {}.")?;
//! # Ok::<(), visenc::Error>(())
//! ```

mod llava;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use visenc_image::{ImageError, Limits, Preprocess};
pub use visenc_text::TokenCount;
use visenc_text::{TextError, TextTokenizer};
use visenc_weights::{Checkpoint, Layout, LoadPolicy, LoadReport, WeightsError};

pub use visenc_image as image;
/// The model families and their building blocks (kernels included), for benchmarks and advanced use.
pub use visenc_models as models;
pub use visenc_models::{
    nn::l2_normalize, EncodeOptions, FeatureMap, ImageFeatures, Latents, ModelError, ModelInfo,
    Precision, Scoring, TextFeatures,
};
/// Tokenizers of the text towers.
pub use visenc_text as text;
pub use visenc_weights as weights;

pub use llava::{LlmTokens, TokenKind, TokenLayout};

/// Every error visenc's library can return.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Text(#[from] TextError),
    /// Text was given to a model without a text tower.
    #[error("{spec}: this model has no text tower (it is image-only)")]
    NoTextTower { spec: String },
    #[error("{spec}: no usable tokenizer: {reason}")]
    NoTokenizer { spec: String, reason: String },
    #[error("{spec}: no usable preprocessing config: {reason}")]
    NoPreprocess { spec: String, reason: String },
    /// Visual tokens for a language model were asked of a model without a multimodal projector.
    #[error("{spec}: not a LLaVA-style model (no multimodal projector to a language model)")]
    NotMultimodal { spec: String },
    #[error("the label list is empty")]
    EmptyLabels,
    #[error("bad input: {0}")]
    Input(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// What linear layers compute in: f32 (candle's product, any device), or bf16 / int8 on visenc's
    /// CPU kernels with weights packed at load (CPU only, f32 `dtype`).
    pub precision: Precision,
    /// Strict by default: missing, unexpected or mis-shaped tensors fail the load.
    pub policy: LoadPolicy,
    /// Guards for decoding untrusted images.
    pub limits: Limits,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            precision: Precision::F32,
            policy: LoadPolicy::Strict,
            limits: Limits::default(),
        }
    }
}

/// A loaded model with the preprocessing and tokenizer its checkpoint prescribes.
pub struct Encoder {
    spec: String,
    model: visenc_models::LoadedModel,
    preprocess: Preprocess,
    tokenizer: Option<TextTokenizer>,
    report: LoadReport,
    device: Device,
    precision: Precision,
    limits: Limits,
}

/// The preprocessing a checkpoint ships with, in its own library's convention.
fn preprocess_for(ckpt: &Checkpoint, info: &ModelInfo) -> Result<Preprocess> {
    let no = |reason: String| Error::NoPreprocess {
        spec: ckpt.spec.clone(),
        reason,
    };
    Ok(match ckpt.layout {
        // The image tower's own preprocessing.
        Layout::TwoTower => return preprocess_for(&ckpt.towers()?.image, info),
        Layout::Transformers => match &ckpt.preprocessor {
            Some(p) => Preprocess::from_hf_processor_json(p)?,
            None => {
                return Err(no(format!(
                    "{} has no preprocessor_config.json",
                    ckpt.dir.display()
                )))
            }
        },
        Layout::Timm | Layout::Bare => match ckpt
            .config
            .get("pretrained_cfg")
            .or(info.default_preprocess.as_ref())
        {
            Some(p) => Preprocess::from_timm_pretrained_cfg(p)?,
            None => return Err(no("config.json has no pretrained_cfg".into())),
        },
        // diffusers' VaeImageProcessor: pixels scaled to [-1, 1] (`2 * x - 1`), at the image's own size.
        Layout::Diffusers => Preprocess {
            rescale: Some(1.0 / 255.0),
            mean: [0.5; 3],
            std: [0.5; 3],
            ..Preprocess::default()
        },
        Layout::OpenClip => {
            let cfg = ckpt
                .config
                .get("preprocess_cfg")
                .cloned()
                .unwrap_or(Value::Object(Default::default()));
            Preprocess::from_open_clip(&cfg, info.image_size.0 as u32)?
        }
    })
}

fn tokenizer_for(ckpt: &Checkpoint, context_length: usize) -> Result<TextTokenizer> {
    if ckpt.layout == Layout::TwoTower {
        return tokenizer_for(&ckpt.towers()?.text, context_length);
    }
    if let Some(file) = &ckpt.tokenizer_file {
        return Ok(TextTokenizer::from_file(
            file,
            ckpt.tokenizer_config.as_ref(),
            context_length,
            0,
        )?);
    }
    match ckpt.layout {
        // open_clip checkpoints rely on the BPE vocabulary that ships with open_clip itself.
        Layout::OpenClip => Ok(TextTokenizer::clip_builtin(context_length, 0)?),
        _ => Err(Error::NoTokenizer {
            spec: ckpt.spec.clone(),
            reason: format!(
                "{} has no tokenizer.json (a sentencepiece-only checkpoint must be converted first, e.g. \
                 AutoTokenizer.from_pretrained(dir).save_pretrained(dir) in transformers)",
                ckpt.dir.display()
            ),
        }),
    }
}

impl Encoder {
    /// Loads a local checkpoint directory or a Hugging Face hub id.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        if opts.precision != Precision::F32 && (!opts.device.is_cpu() || opts.dtype != DType::F32) {
            return Err(Error::Input(format!(
                "precision {} runs on the CPU kernels with f32 weights (asked: {:?} on {:?})",
                opts.precision, opts.dtype, opts.device
            )));
        }
        let ckpt = Checkpoint::open(spec)?;
        // What the load frees (the tensors as read, the f32 copies of packed weights) goes back
        // to the kernel.
        let (mut model, report) = visenc_kernels::alloc::loading(|| -> Result<_> {
            let weights = ckpt
                .load_weights(opts.dtype, &opts.device)?
                .with_precision(opts.precision);
            Ok(visenc_models::load(&ckpt, &weights, opts.policy)?)
        })?;
        let preprocess = preprocess_for(&ckpt, &model.info)?;
        if model.info.image_size == (0, 0) {
            // Convolutional families take any size; report the one their preprocessing produces.
            let (h, w) = match (preprocess.crop, preprocess.resize) {
                (Some(c), _) => c,
                (None, Some(visenc_image::ResizeMode::Exact { height, width })) => (height, width),
                _ => (0, 0),
            };
            model.info.image_size = (h as usize, w as usize);
        }
        let tokenizer = match &model.text {
            Some(t) => Some(tokenizer_for(&ckpt, t.context_length())?),
            None => None,
        };
        Ok(Self {
            spec: spec.to_string(),
            model,
            preprocess,
            tokenizer,
            report,
            device: opts.device.clone(),
            precision: opts.precision,
            limits: opts.limits,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.model.info
    }

    /// What the linear layers compute in (as loaded).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    /// What the strict loader tolerated (non-empty only with `LoadPolicy::AllowMismatch`).
    pub fn load_report(&self) -> &LoadReport {
        &self.report
    }

    pub fn has_text(&self) -> bool {
        self.model.text.is_some()
    }

    /// Decodes and preprocesses an image file into normalised CHW pixels.
    pub fn load_image(&self, path: &Path) -> Result<Pixels> {
        let img = visenc_image::open_with(path, &self.limits, self.preprocess.alpha)?;
        self.pixels(&img)
    }

    /// Decodes and preprocesses encoded image bytes; `name` appears in errors.
    pub fn decode_image(&self, bytes: &[u8], name: &str) -> Result<Pixels> {
        let img = visenc_image::decode_with(bytes, name, &self.limits, self.preprocess.alpha)?;
        self.pixels(&img)
    }

    fn pixels(&self, img: &visenc_image::RgbImage) -> Result<Pixels> {
        let data = self.preprocess.apply(img)?;
        let (h, w) = self.preprocess.output_size(img.height(), img.width());
        Ok(Pixels {
            data,
            height: h as usize,
            width: w as usize,
        })
    }

    /// Encodes preprocessed images of equal size as one batch.
    pub fn encode_pixels(&self, batch: &[Pixels], opts: &EncodeOptions) -> Result<ImageFeatures> {
        let first = batch
            .first()
            .ok_or_else(|| Error::Input("empty image batch".into()))?;
        if let Some(p) = batch
            .iter()
            .find(|p| (p.height, p.width) != (first.height, first.width))
        {
            return Err(Error::Input(format!(
                "images of one batch must have one size: {}x{} and {}x{}",
                first.height, first.width, p.height, p.width
            )));
        }
        // One copy per image (collecting a flat_map of the values took 1.7 % of an EfficientNet-B0
        // batch, on one thread).
        let mut data = Vec::with_capacity(batch.iter().map(|p| p.data.len()).sum());
        for p in batch {
            data.extend_from_slice(&p.data);
        }
        let t = Tensor::from_vec(
            data,
            (batch.len(), 3, first.height, first.width),
            &self.device,
        )?;
        let image = self.model.image.as_ref();
        Ok(if self.device.is_cpu() {
            visenc_kernels::cpu::in_pool(|| image.encode(&t, opts))
        } else {
            image.encode(&t, opts)
        }?)
    }

    /// Tokenizes and encodes texts with the text tower.
    pub fn encode_texts(&self, texts: &[&str]) -> Result<TextFeatures> {
        let (Some(text), Some(tok)) = (&self.model.text, &self.tokenizer) else {
            return Err(Error::NoTextTower {
                spec: self.spec.clone(),
            });
        };
        encode_texts(text.as_ref(), tok, texts, &self.device)
    }

    /// How many tokens of each text the text tower sees (after truncation to its context length).
    pub fn count_tokens(&self, texts: &[&str]) -> Result<Vec<TokenCount>> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::NoTextTower {
            spec: self.spec.clone(),
        })?;
        Ok(tok.count(texts)?)
    }

    /// Zero-shot label probabilities [B, L] for image embeddings [B, P] (`ImageFeatures::embedding`):
    /// each label is put into `template` (`{}` marks the spot), and probabilities are computed as the
    /// reference does (softmax over labels for CLIP, an independent sigmoid per label for SigLIP).
    pub fn zero_shot(
        &self,
        image_embeddings: &Tensor,
        labels: &[&str],
        template: &str,
    ) -> Result<Tensor> {
        if labels.is_empty() || labels.iter().all(|l| l.trim().is_empty()) {
            return Err(Error::EmptyLabels);
        }
        let scoring = self.model.info.scoring.ok_or_else(|| Error::NoTextTower {
            spec: self.spec.clone(),
        })?;
        let prompts: Vec<String> = labels.iter().map(|l| template.replace("{}", l)).collect();
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let text = self.encode_texts(&prompts)?;
        let logits = scoring.logits(
            &l2_normalize(image_embeddings)?,
            &l2_normalize(&text.projected)?,
        )?;
        Ok(scoring.probabilities(&logits)?)
    }

    /// Cosine similarity [B, T] between image embeddings and texts.
    pub fn similarity(&self, image_embeddings: &Tensor, texts: &[&str]) -> Result<Tensor> {
        let text = self.encode_texts(texts)?;
        Ok(l2_normalize(image_embeddings)?.matmul(&l2_normalize(&text.projected)?.t()?)?)
    }
}

/// Tokenizes `texts` and runs them through `text`.
fn encode_texts(
    text: &dyn visenc_models::TextEncoder,
    tok: &TextTokenizer,
    texts: &[&str],
    device: &Device,
) -> Result<TextFeatures> {
    if texts.is_empty() {
        return Err(Error::Input("no texts to encode".into()));
    }
    let enc = tok.encode(texts)?;
    let n = tok.context_length();
    let ids = Tensor::from_vec(enc.ids.concat(), (texts.len(), n), device)?;
    let mask = Tensor::from_vec(enc.mask.concat(), (texts.len(), n), device)?;
    Ok(text.encode_text(&ids, &mask)?)
}

/// A text-only model (a sentence encoder such as all-MiniLM-L6-v2) with its tokenizer: the text tower
/// of a two-tower model, on its own.
pub struct TextModel {
    tower: visenc_models::TextTower,
    tokenizer: TextTokenizer,
    device: Device,
}

impl TextModel {
    /// Loads a local text checkpoint directory or a hub id (see [`visenc_models::load_text`]).
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        let ckpt = Checkpoint::open(spec)?;
        let weights = ckpt
            .load_weights(opts.dtype, &opts.device)?
            .with_precision(opts.precision);
        let (tower, _) = visenc_models::load_text(&ckpt, &weights, opts.policy)?;
        let tokenizer = tokenizer_for(&ckpt, tower.encoder.context_length())?;
        Ok(Self {
            tower,
            tokenizer,
            device: opts.device.clone(),
        })
    }

    /// Tokenizes and encodes texts; `projected` is the sentence embedding.
    pub fn encode_texts(&self, texts: &[&str]) -> Result<TextFeatures> {
        encode_texts(
            self.tower.encoder.as_ref(),
            &self.tokenizer,
            texts,
            &self.device,
        )
    }
}

/// One preprocessed image: normalised pixels, channel-major.
#[derive(Debug, Clone)]
pub struct Pixels {
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
}
