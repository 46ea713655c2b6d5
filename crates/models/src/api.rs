//! The one encoder API every family answers, modelled on timm's `forward_features` /
//! `forward_head(pre_logits=True)` / `forward_intermediates` and on CLIP's `get_image_features`.

use candle_core::Tensor;
use serde::Serialize;

use crate::error::Result;

/// What to compute besides the pooled embedding.
#[derive(Debug, Clone, Default)]
pub struct EncodeOptions {
    /// Hidden states to return, in Hugging Face's `hidden_states` indexing: 0 is the input of the
    /// first block, `i` the output of block `i`; negative values count from the end (-1 = last block,
    /// -2 = the penultimate one that LLaVA feeds its projector).
    pub layers: Vec<i64>,
    /// Return the final token sequence, split into prefix (CLS/register) and patch tokens.
    pub tokens: bool,
    /// Return the multi-scale feature maps of hierarchical models (CNNs, Swin, ConvNeXt, MaxViT):
    /// the stages timm's `features_only` returns for timm checkpoints, the HF backbone stages
    /// (`stem`, `stage1`..) for transformers checkpoints.
    pub features: bool,
}

impl EncodeOptions {
    /// Families without a single token sequence (CNNs, hierarchical and generative encoders) refuse
    /// hidden-state layers rather than ignore them; their intermediate outputs are the feature maps.
    pub(crate) fn refuse_layers(&self, family: &str) -> Result<()> {
        if self.layers.is_empty() {
            return Ok(());
        }
        Err(crate::error::ModelError::Unsupported {
            what: "hidden-state layers",
            name: format!("{family} has no single token sequence: ask for feature maps (`features`, `visenc embed --features`) instead"),
        })
    }
}

/// One map of a multi-scale feature pyramid.
#[derive(Debug, Clone)]
pub struct FeatureMap {
    /// How much smaller than the input this map is (4, 8, 16, 32, ...).
    pub reduction: usize,
    /// [B, C, H, W]
    pub map: Tensor,
}

/// What an image encoder returns for a batch of B images.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    /// The pooled embedding before any projection or classifier: timm's `pre_logits`, HF's
    /// `pooler_output` for CLIP/SigLIP/DINOv2, the normed CLS token for ViT. [B, D]
    pub pooled: Tensor,
    /// The image-text embedding where the checkpoint has a projection (CLIP, SigLIP). [B, P]
    pub projected: Option<Tensor>,
    /// Classifier logits where the checkpoint has a head. [B, C]
    pub logits: Option<Tensor>,
    /// Prefix tokens (CLS, registers) of the final sequence, when asked for. [B, R, D]
    pub prefix_tokens: Option<Tensor>,
    /// Patch tokens of the final sequence in row-major grid order, when asked for. [B, N, D]
    pub patch_tokens: Option<Tensor>,
    /// The patch grid (rows, columns) of this batch.
    pub grid: (usize, usize),
    /// The requested hidden states, as (index asked for, [B, S, D] with prefix tokens first).
    pub hidden_states: Vec<(i64, Tensor)>,
    /// Multi-scale feature maps, when asked for and the family is hierarchical.
    pub feature_maps: Vec<FeatureMap>,
    /// The latent code of generative encoders (VAE, VQGAN); `pooled` is then its spatial mean.
    pub latents: Option<Latents>,
}

/// What a generative encoder (Stable-Diffusion VAE, VQGAN) produces for a batch.
#[derive(Debug, Clone)]
pub struct Latents {
    /// VAE: the posterior mean; VQGAN: the pre-quantisation latents (encoder + quant_conv). [B, C, h, w]
    pub mean: Tensor,
    /// VAE: the posterior log-variance (clamped to [-30, 20] as diffusers does). [B, C, h, w]
    pub logvar: Option<Tensor>,
    /// Multiply latents by this (after subtracting `shift_factor`) before a diffusion model uses them.
    pub scaling_factor: f32,
    pub shift_factor: f32,
    /// VQGAN: codebook indices, a token grid [B, h, w] (u32); flatten row-major for a token sequence.
    pub codes: Option<Tensor>,
    /// VQGAN: the quantized latents (codebook vectors at `codes`). [B, C, h, w]
    pub quantized: Option<Tensor>,
}

impl Latents {
    /// A posterior sample `mean + exp(logvar / 2) * noise` for given standard-normal `noise`
    /// (diffusers `DiagonalGaussianDistribution.sample`); the mean itself without a logvar.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok(match &self.logvar {
            Some(lv) => (&self.mean + (lv * 0.5)?.exp()?.mul(noise)?)?,
            None => self.mean.clone(),
        })
    }
}

impl ImageFeatures {
    /// The features of a convolutional or hierarchical model from its final map `last` [B, C, H, W]:
    /// its positions (row-major) are the patch tokens when `opts.tokens` asks for them.
    pub fn from_map(
        pooled: Tensor,
        logits: Option<Tensor>,
        last: &Tensor,
        feature_maps: Vec<FeatureMap>,
        opts: &EncodeOptions,
    ) -> Result<Self> {
        let (_, _, h, w) = last.dims4()?;
        let patch_tokens = if opts.tokens {
            Some(last.flatten_from(2)?.transpose(1, 2)?)
        } else {
            None
        };
        Ok(Self {
            pooled,
            projected: None,
            logits,
            prefix_tokens: None,
            patch_tokens,
            grid: (h, w),
            hidden_states: vec![],
            feature_maps,
            latents: None,
        })
    }

    /// The embedding to compare with text or other images: projected if there is a projection.
    pub fn embedding(&self) -> &Tensor {
        self.projected.as_ref().unwrap_or(&self.pooled)
    }
}

/// What a text tower returns for a batch of T texts.
#[derive(Debug, Clone)]
pub struct TextFeatures {
    /// The pooled text feature before projection (EOS token for CLIP, last token for SigLIP). [T, D]
    pub pooled: Tensor,
    /// The projected text embedding, in the image embedding space. [T, P]
    pub projected: Tensor,
}

/// How an image-text model turns cosine similarities into probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scoring {
    /// CLIP: `softmax(exp(logit_scale) * cos)` over the labels.
    Softmax { logit_scale: f32 },
    /// SigLIP: `sigmoid(exp(logit_scale) * cos + logit_bias)`, each label on its own.
    Sigmoid { logit_scale: f32, logit_bias: f32 },
}

impl Scoring {
    /// Logits from L2-normalised image [B, P] and text [T, P] embeddings: [B, T].
    pub fn logits(&self, image: &Tensor, text: &Tensor) -> Result<Tensor> {
        let cos = image.matmul(&text.t()?)?;
        Ok(match *self {
            Self::Softmax { logit_scale } => (cos * (logit_scale as f64).exp())?,
            Self::Sigmoid {
                logit_scale,
                logit_bias,
            } => ((cos * (logit_scale as f64).exp())? + logit_bias as f64)?,
        })
    }

    /// Probabilities from logits [B, T].
    pub fn probabilities(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Softmax { .. } => candle_nn::ops::softmax_last_dim(logits)?,
            Self::Sigmoid { .. } => candle_nn::ops::sigmoid(logits)?,
        })
    }
}

/// Facts about a loaded model, for `visenc info` and for callers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelInfo {
    /// The architecture as the checkpoint names it (e.g. `CLIPModel`, `vit_base_patch16_224`).
    pub architecture: String,
    /// The visenc family that runs it.
    pub family: &'static str,
    /// Trained input size (height, width).
    pub image_size: (usize, usize),
    pub patch_size: usize,
    pub num_layers: usize,
    /// Width of `pooled` and of the tokens.
    pub hidden_size: usize,
    /// Width of `projected`, if any.
    pub projection_dim: Option<usize>,
    /// Prefix tokens before the patch tokens (CLS + registers).
    pub prefix_tokens: usize,
    /// Class names of the classifier head, if any.
    pub labels: Option<Vec<String>>,
    /// Parameters in the vision tower (and text tower, if any).
    pub parameters: usize,
    pub scoring: Option<Scoring>,
    pub text_context_length: Option<usize>,
    /// The preprocessing the family's reference uses, as a timm-style `pretrained_cfg`, for
    /// checkpoints that ship none (e.g. a bare EfficientNet-Lite `.pth`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_preprocess: Option<serde_json::Value>,
}

/// An image encoder of any family.
pub trait ImageEncoder: Send + Sync {
    /// Encodes normalised pixels [B, 3, H, W]. Any H, W that are at least one patch work.
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures>;

    /// The vision-to-language side (LLaVA projector) when the checkpoint has one.
    fn multimodal(&self) -> Option<&dyn MultimodalEncoder> {
        None
    }
}

/// The projected visual tokens of one image, ready to replace its image placeholder tokens in a
/// language model's input embeddings.
#[derive(Debug, Clone)]
pub struct VisualTokens {
    /// [N_tokens, D_llm], in the order the language model reads them (newline rows included).
    pub tokens: Tensor,
    /// Rows of `tokens` that are the learned `image_newline` vector (LLaVA-NeXT: one per row of the
    /// unpadded tile grid; empty for LLaVA).
    pub newlines: Vec<usize>,
    /// The first `base_tokens` rows come from the downscaled base image (LLaVA-NeXT), or are the
    /// whole sequence (LLaVA); the unpadded tile grid follows, row by row.
    pub base_tokens: usize,
}

/// A vision tower plus the projector into a language model's embedding space (LLaVA, LLaVA-NeXT).
pub trait MultimodalEncoder: Send + Sync {
    /// Width of the language model's embeddings (the projector's output).
    fn llm_hidden_size(&self) -> usize;
    /// Encodes one image. LLaVA: normalised pixels [1, 3, H, W]; LLaVA-NeXT: its tiles
    /// [1 + rows * cols, 3, T, T] (the downscaled base image first, then the grid row-major, as
    /// `LlavaNextImageProcessor` makes them) with the original `image_size` (height, width).
    fn encode_image(
        &self,
        pixels: &Tensor,
        image_size: Option<(usize, usize)>,
    ) -> Result<VisualTokens>;
    /// How many tokens [`Self::encode_image`] returns for an image of this original size (height, width)
    /// preprocessed for this checkpoint (the processor's count of image placeholder tokens). Fails for
    /// sizes the model refuses (see [`crate::llava::Anyres::checked_plan`]).
    fn num_tokens(&self, image_size: (usize, usize)) -> Result<usize>;
    /// LLaVA-NeXT: the tiles an image of this original size (height, width) needs (best pinpoint,
    /// resize, padding, grid), for the preprocessing that makes them; `None` without anyres. Fails
    /// for sizes the model refuses.
    fn anyres_plan(&self, image_size: (usize, usize)) -> Result<Option<crate::llava::AnyresPlan>> {
        let _ = image_size;
        Ok(None)
    }
    /// The id of the placeholder token the language model's prompt repeats once per visual token
    /// (`image_token_index` of the config), when the checkpoint says.
    fn image_token_index(&self) -> Option<u32> {
        None
    }
}

/// A text tower of an image-text model.
pub trait TextEncoder: Send + Sync {
    /// Encodes token ids [T, L] (u32) with an attention mask [T, L] (1 = token, 0 = padding).
    fn encode_text(&self, ids: &Tensor, mask: &Tensor) -> Result<TextFeatures>;
    /// The sequence length the tower was trained with.
    fn context_length(&self) -> usize;
}
