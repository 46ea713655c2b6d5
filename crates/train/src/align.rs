//! Aligning a text encoder with a locked image space (LiT): a linear projection of text embeddings into the
//! image embedding space, trained with a contrastive loss against fixed image-side vectors (for example a
//! classifier's class vectors paired with the class names), full-batch AdamW; and the retrieval accuracy
//! (top-k) used to judge it on held-out pairs.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::contrastive::{l2_normalize, Contrastive, LossKind};
use crate::data::SplitMix64;
use crate::error::{data_err, Result};
use crate::optim::{AdamW, AdamWConfig};

/// Settings of [`train_projection`].
#[derive(Debug, Clone, Copy)]
pub struct AlignConfig {
    pub loss: LossKind,
    pub steps: usize,
    pub lr: f64,
    /// Decoupled weight decay on the projection (none on the temperature/bias, as open_clip).
    pub weight_decay: f64,
    /// Seed of the projection's initialisation.
    pub seed: u64,
}

impl Default for AlignConfig {
    fn default() -> Self {
        Self {
            loss: LossKind::Clip,
            steps: 300,
            lr: 1e-3,
            weight_decay: 0.1,
            seed: 0,
        }
    }
}

/// Where [`train_projection`] keeps a resumable state (the projection, the temperature/bias and their
/// AdamW moments; [`AdamW::save`]).
pub struct StateFile<'a> {
    pub path: &'a Path,
    /// Save after every this many steps, and after the last.
    pub every: usize,
    /// Continue from the state at `path` (written with the same `settings`) instead of starting afresh.
    pub resume: bool,
    /// Stop (with the state saved) after this step, to continue later with `resume`.
    pub stop_at: Option<usize>,
    /// What a resumed run must share (models, data, hyper-parameters); compared field by field.
    pub settings: &'a serde_json::Value,
}

/// A trained text-to-image projection: `image_space = text @ weight.T`.
#[derive(Debug)]
pub struct Aligned {
    /// [P, E], f32.
    pub weight: Tensor,
    /// The learnt `logit_scale` (the multiplier `exp(t)`) and (SigLIP) bias.
    pub logit_scale: f32,
    pub logit_bias: Option<f32>,
    /// Loss after each step.
    pub losses: Vec<f32>,
}

/// Trains the projection on pairs (row i of `text` [N, E] with row i of `image` [N, P]); the image side is
/// locked. With `state`, the run is checkpointed and can stop and resume exactly (full-batch training has
/// no data order to restore). `progress` gets (step, loss).
pub fn train_projection(
    text: &Tensor,
    image: &Tensor,
    cfg: &AlignConfig,
    state: Option<&StateFile>,
    mut progress: impl FnMut(usize, f32),
) -> Result<Aligned> {
    let (n, e) = text.dims2()?;
    let (m, p) = image.dims2()?;
    if n != m || n < 2 {
        return Err(data_err(format!(
            "alignment needs the same number (>= 2) of text and image rows, got {n} and {m}"
        )));
    }
    let dev = Device::Cpu;
    let text = text.to_device(&dev)?.to_dtype(DType::F32)?;
    let image = image.to_device(&dev)?.to_dtype(DType::F32)?;
    // Uniform(-1/sqrt(E), 1/sqrt(E)) like torch.nn.Linear's default, from a seeded generator.
    let mut rng = SplitMix64(cfg.seed);
    let bound = 1.0 / (e as f64).sqrt();
    let init: Vec<f32> = (0..p * e)
        .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound)
        .map(|v| v as f32)
        .collect();
    let w = Var::from_tensor(&Tensor::from_vec(init, (p, e), &dev)?)?;
    let loss_fn = Contrastive::new(cfg.loss, true, &dev)?;
    let mut params = vec![("text_projection".to_string(), w.clone())];
    params.extend(
        ["logit_scale", "logit_bias"]
            .into_iter()
            .map(str::to_string)
            .zip(loss_fn.vars()),
    );
    // Weight decay reaches the projection only (rank 2), not the temperature or bias, as open_clip.
    let adamw = AdamWConfig {
        weight_decay: cfg.weight_decay,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(params, adamw)?;
    if let Some(s) = state.filter(|s| s.resume) {
        opt.load(s.settings, s.path)?;
    }
    let last = state
        .and_then(|s| s.stop_at)
        .map_or(cfg.steps, |k| k.min(cfg.steps));
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in opt.step as usize + 1..=last {
        let loss = loss_fn.loss(&image, &text.matmul(&w.as_tensor().t()?)?)?;
        let grads = loss.backward()?;
        opt.step(&grads, cfg.lr)?;
        loss_fn.clamp()?;
        let l = loss.to_scalar::<f32>()?;
        losses.push(l);
        progress(step, l);
        if let Some(s) = state.filter(|s| step % s.every.max(1) == 0 || step == last) {
            opt.save(s.settings, s.path)?;
        }
    }
    let (logit_scale, logit_bias) = loss_fn.values()?;
    Ok(Aligned {
        weight: w.as_tensor().clone(),
        logit_scale,
        logit_bias,
        losses,
    })
}

impl Aligned {
    /// Writes `text_projection` [P, E], `logit_scale` as open_clip stores it (the logarithm of the
    /// multiplier) and, after SigLIP training, `logit_bias`, with `meta` (e.g. the models) as metadata.
    pub fn save(
        &self,
        path: &std::path::Path,
        meta: std::collections::HashMap<String, String>,
    ) -> Result<()> {
        let scale = Tensor::new(self.logit_scale.ln(), &Device::Cpu)?;
        let bias = self
            .logit_bias
            .map(|b| Tensor::new(b, &Device::Cpu))
            .transpose()?;
        let mut tensors = vec![("text_projection", &self.weight), ("logit_scale", &scale)];
        if let Some(b) = &bias {
            tensors.push(("logit_bias", b));
        }
        crate::io::save_f32(path, &tensors, meta)
    }
}

/// For each query row i (of `queries` [N, D]), whether row i of `keys` [N, D] is among the `k` keys most
/// cosine-similar to it; returns the fraction of hits for each `k` in `ks`.
pub fn top_k_accuracy(queries: &Tensor, keys: &Tensor, ks: &[usize]) -> Result<Vec<f64>> {
    let sim = l2_normalize(queries)?.matmul(&l2_normalize(keys)?.t()?)?;
    let sim: Vec<Vec<f32>> = sim.to_dtype(DType::F32)?.to_vec2()?;
    let n = sim.len();
    if n == 0 {
        return Err(data_err("top-k accuracy of an empty set"));
    }
    // Rank of the true key: how many keys score strictly higher.
    let ranks: Vec<usize> = sim
        .iter()
        .enumerate()
        .map(|(i, row)| row.iter().filter(|&&s| s > row[i]).count())
        .collect();
    Ok(ks
        .iter()
        .map(|&k| ranks.iter().filter(|&&r| r < k).count() as f64 / n as f64)
        .collect())
}
