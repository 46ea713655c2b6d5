//! Contrastive image-text losses, equal to open_clip's `ClipLoss` and `SigLipLoss` (single process) in value
//! and gradient, plus the learnable temperature/bias and the locked-image-tower (LiT) mode around them.

use candle_core::{DType, Device, Tensor, Var, D};

use crate::error::{data_err, Result};

/// CLIP's symmetric InfoNCE loss: the mean of the image-to-text and text-to-image cross-entropies over the
/// `[N, N]` logits `logit_scale * image @ text.T`, the i-th image matching the i-th text. The features are
/// used as given (open_clip normalises them in the model, before the loss); `logit_scale` is the scalar
/// multiplier itself (`exp` of the learnable log temperature), as open_clip passes it.
// https://github.com/mlfoundations/open_clip/blob/v3.3.0/src/open_clip/loss.py#L104-L155
pub fn clip_loss(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    let n = check_pair(image, text)?;
    let logits_per_image = image.matmul(&text.t()?)?.broadcast_mul(logit_scale)?;
    let logits_per_text = logits_per_image.t()?;
    let labels = Tensor::arange(0u32, n as u32, image.device())?;
    let a = candle_nn::loss::cross_entropy(&logits_per_image, &labels)?;
    let b = candle_nn::loss::cross_entropy(&logits_per_text.contiguous()?, &labels)?;
    Ok(((a + b)? * 0.5)?)
}

/// SigLIP's pairwise sigmoid loss: `-sum(log_sigmoid(labels * logits)) / N` with
/// `logits = logit_scale * image @ text.T + logit_bias` and labels +1 on the diagonal, -1 elsewhere.
// https://github.com/mlfoundations/open_clip/blob/v3.3.0/src/open_clip/loss.py#L358-L382
pub fn siglip_loss(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
) -> Result<Tensor> {
    let n = check_pair(image, text)?;
    let logits = image
        .matmul(&text.t()?)?
        .broadcast_mul(logit_scale)?
        .broadcast_add(logit_bias)?;
    let eye = Tensor::eye(n, image.dtype(), image.device())?;
    let labels = ((eye * 2.0)? - 1.0)?;
    let z = (labels * logits)?;
    Ok((log_sigmoid(&z)?.sum_all()? * (-1.0 / n as f64))?)
}

/// `log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|))`, stable for any `x` and made of ops with gradients.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0f32)? - softplus_neg_abs)?)
}

fn check_pair(image: &Tensor, text: &Tensor) -> Result<usize> {
    match (image.dims(), text.dims()) {
        ([n, d], [m, e]) if n == m && d == e && *n > 0 => Ok(*n),
        (a, b) => Err(data_err(format!(
            "contrastive loss needs image and text features of the same shape [N, D] with N > 0, \
             got {a:?} and {b:?}"
        ))),
    }
}

/// Which contrastive loss a [`Contrastive`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Softmax over the batch in both directions ([`clip_loss`]).
    Clip,
    /// Independent sigmoids per pair, with a learnable bias ([`siglip_loss`]).
    Siglip,
}

/// A contrastive loss with its learnable parameters: the log temperature and, for SigLIP, the bias.
/// open_clip's initial values: CLIP `log(1/0.07)`; SigLIP `log(10)` and bias `-10`.
#[derive(Debug)]
pub struct Contrastive {
    pub kind: LossKind,
    /// Learnable `log(logit_scale)` (open_clip's `logit_scale` parameter).
    pub log_logit_scale: Var,
    /// Learnable bias, SigLIP only.
    pub logit_bias: Option<Var>,
    /// Locked image tower (LiT, Zhai et al. 2022): image features are constants, so no gradient reaches
    /// whatever produced them; only the text side and the scale/bias learn.
    pub lock_image: bool,
}

/// The largest logit scale open_clip's training loop allows (it clamps the log to `[0, ln 100]`).
// https://github.com/mlfoundations/open_clip/blob/v3.3.0/src/open_clip_train/train.py#L187-L189
pub const MAX_LOGIT_SCALE: f64 = 100.0;

impl Contrastive {
    /// The loss with open_clip's initial temperature (and bias).
    pub fn new(kind: LossKind, lock_image: bool, device: &Device) -> Result<Self> {
        let (scale, bias) = match kind {
            LossKind::Clip => ((1.0f64 / 0.07).ln(), None),
            LossKind::Siglip => (10f64.ln(), Some(-10.0)),
        };
        Self::with_init(kind, lock_image, scale, bias, device)
    }

    /// The loss with a chosen initial `log(logit_scale)` and bias (the bias is required for SigLIP and
    /// refused for CLIP).
    pub fn with_init(
        kind: LossKind,
        lock_image: bool,
        log_logit_scale: f64,
        logit_bias: Option<f64>,
        device: &Device,
    ) -> Result<Self> {
        let scalar = |v: f64| Var::from_tensor(&Tensor::new(v as f32, device)?);
        let logit_bias = match (kind, logit_bias) {
            (LossKind::Siglip, Some(b)) => Some(scalar(b)?),
            (LossKind::Clip, None) => None,
            (k, b) => {
                return Err(data_err(format!(
                    "{k:?} loss {} a logit bias",
                    if b.is_some() { "takes no" } else { "needs" }
                )))
            }
        };
        Ok(Self {
            kind,
            log_logit_scale: scalar(log_logit_scale)?,
            logit_bias,
            lock_image,
        })
    }

    /// The learnable scalars, for an optimiser (open_clip applies no weight decay to them).
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.log_logit_scale.clone()];
        v.extend(self.logit_bias.clone());
        v
    }

    /// The loss of a batch of paired, not yet normalised features (row i of each is a pair): both sides are
    /// L2-normalised, the image side detached when the image tower is locked.
    pub fn loss(&self, image: &Tensor, text: &Tensor) -> Result<Tensor> {
        let image = if self.lock_image {
            image.detach()
        } else {
            image.clone()
        };
        let image = l2_normalize(&image)?;
        let text = l2_normalize(text)?;
        let scale = self.log_logit_scale.as_tensor().exp()?;
        match (&self.logit_bias, self.kind) {
            (Some(b), LossKind::Siglip) => siglip_loss(&image, &text, &scale, b.as_tensor()),
            _ => clip_loss(&image, &text, &scale),
        }
    }

    /// Keep `logit_scale` in `[1, 100]` after an optimiser step, as open_clip's training loop does.
    pub fn clamp(&self) -> Result<()> {
        let v = self
            .log_logit_scale
            .as_tensor()
            .clamp(0f32, MAX_LOGIT_SCALE.ln() as f32)?;
        Ok(self.log_logit_scale.set(&v)?)
    }

    /// Current `logit_scale` (the multiplier) and bias.
    pub fn values(&self) -> Result<(f32, Option<f32>)> {
        let s = self
            .log_logit_scale
            .as_tensor()
            .exp()?
            .to_dtype(DType::F32)?
            .to_scalar()?;
        let b = match &self.logit_bias {
            Some(b) => Some(b.as_tensor().to_dtype(DType::F32)?.to_scalar()?),
            None => None,
        };
        Ok((s, b))
    }
}

/// Rows divided by their L2 norm, like `torch.nn.functional.normalize(x, dim=-1)` (norm floored at 1e-12).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12f32)?;
    Ok(x.broadcast_div(&norm)?)
}
