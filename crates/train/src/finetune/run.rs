//! The fine-tuning loop: seeded epochs of augmented batches, the cosine schedule, a validation pass per
//! epoch, checkpoints every K steps that resume exactly, and the exported model at the end.
//!
//! Everything random is a function of (seed, epoch, position), not of how many steps this process has
//! run: epoch `e` visits the training set in the order `shuffle(seed, e)`, and the augmentation of the
//! `k`-th image of that order draws from its own generator seeded by (seed, e, k). A checkpoint
//! therefore only needs the trainable tensors, the AdamW moments and the step count.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use visenc::image::{Limits, Preprocess, RgbImage};

use super::FineTuner;
use crate::augment::train_view;
use crate::data::{LabelledImages, Split, SplitMix64};
use crate::error::{data_err, Result, TrainError};
use crate::io::file_err;
use crate::optim::CosineSchedule;

/// Name of the training-state file inside the output directory.
pub const STATE_FILE: &str = "train_state.safetensors";

/// How long and how fast to train.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    /// Linear warmup steps before the cosine decay.
    pub warmup: u64,
    pub seed: u64,
    /// Write the state every this many steps (0: only at the end).
    pub save_every: u64,
    /// Stop (after saving) once the run has reached this step, e.g. to continue later with resume.
    pub stop_at: Option<u64>,
}

/// What the loop reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Resumed {
        step: u64,
    },
    Step {
        step: u64,
        total: u64,
        epoch: usize,
        loss: f32,
        lr: f64,
    },
    /// The end of an epoch (1-based) with the validation accuracy, when there is a validation set.
    Epoch {
        epoch: usize,
        val: Option<Accuracy>,
    },
    Saved {
        path: PathBuf,
        step: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
}

impl Accuracy {
    pub fn value(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// The images, their preprocessing and the split the loop trains on.
pub struct Data<'a> {
    pub set: &'a LabelledImages,
    pub split: &'a Split,
    /// The checkpoint's eval preprocessing (validation, and the normalisation of training views).
    pub eval: &'a Preprocess,
    /// The model's input size (height, width) for the training views.
    pub size: (u32, u32),
    pub limits: Limits,
}

impl Data<'_> {
    fn open(&self, i: usize) -> Result<RgbImage> {
        let p = &self.set.paths[i];
        visenc::image::open_with(p, &self.limits, self.eval.alpha).map_err(|e| TrainError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Decodes every image once and fails naming all that cannot be used: training on a silently
    /// smaller set than asked would give numbers nobody asked for.
    pub fn check_images(&self) -> Result<()> {
        let bad: Vec<String> = (0..self.set.paths.len())
            .filter_map(|i| self.open(i).err().map(|e| e.to_string()))
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(data_err(format!(
            "{} of {} images cannot be read; fix or remove them:\n  {}",
            bad.len(),
            self.set.paths.len(),
            bad.join("\n  ")
        )))
    }

    fn batch(&self, pixels: Vec<f32>, n: usize, size: (usize, usize)) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            pixels,
            (n, 3, size.0, size.1),
            &Device::Cpu,
        )?)
    }
}

/// A generator for (seed, a, b), independent across its arguments.
fn rng_for(seed: u64, a: u64, b: u64) -> SplitMix64 {
    let mut r = SplitMix64(seed ^ a.wrapping_mul(0xD1B5_4A32_D192_ED03));
    r.0 ^= r.next_u64() ^ b.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
    r.next_u64();
    r
}

/// The settings a resumed run must share with the run that wrote the state.
fn settings(tuner: &FineTuner, cfg: &RunConfig, data: &Data) -> Value {
    json!({
        "method": tuner.method,
        "classes": tuner.classes,
        "train_images": data.split.train.len(),
        "epochs": cfg.epochs,
        "batch": cfg.batch,
        "lr": cfg.lr,
        "warmup": cfg.warmup,
        "seed": cfg.seed,
        "weight_decay": tuner.opt.cfg.weight_decay,
    })
}

/// Validation accuracy of the current weights with the checkpoint's eval preprocessing.
pub fn evaluate(tuner: &FineTuner, data: &Data, idx: &[usize], batch: usize) -> Result<Accuracy> {
    let mut correct = 0;
    for chunk in idx.chunks(batch.max(1)) {
        let mut px = Vec::new();
        let mut size = (0, 0);
        for &i in chunk {
            let img = data.open(i)?;
            px.extend(data.eval.apply(&img).map_err(|e| data_err(e.to_string()))?);
            let (h, w) = data.eval.output_size(img.height(), img.width());
            size = (h as usize, w as usize);
        }
        let logits = tuner.logits(&data.batch(px, chunk.len(), size)?, false)?;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        correct += chunk
            .iter()
            .zip(pred)
            .filter(|(&i, p)| data.set.labels[i] == *p)
            .count();
    }
    Ok(Accuracy {
        correct,
        total: idx.len(),
    })
}

/// What a call to [`fit`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Steps taken so far in the whole run, and the run's total.
    pub step: u64,
    pub total: u64,
    /// The last validation accuracy, if an epoch ended with a validation set.
    pub val: Option<Accuracy>,
}

/// Trains `tuner` for `cfg.epochs` epochs (or until `cfg.stop_at`), writing `out/train_state.safetensors`
/// every `cfg.save_every` steps and when it stops, and the trained model into `out` when the run is
/// complete. With `resume`, it first restores the state in `out` (which must exist).
pub fn fit(
    tuner: &mut FineTuner,
    data: &Data,
    cfg: &RunConfig,
    out: &Path,
    resume: bool,
    mut on: impl FnMut(Event),
) -> Result<Outcome> {
    if cfg.batch == 0 || cfg.epochs == 0 {
        return Err(data_err("--batch and --epochs must be at least 1"));
    }
    let n = data.split.train.len();
    if n == 0 {
        return Err(data_err("no training images"));
    }
    std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
    let state = out.join(STATE_FILE);
    let settings = settings(tuner, cfg, data);
    if resume {
        let step = tuner.opt.load(&settings, &state)?;
        on(Event::Resumed { step });
    }
    let per_epoch = n.div_ceil(cfg.batch) as u64;
    let total = per_epoch * cfg.epochs as u64;
    let sched = CosineSchedule {
        base_lr: cfg.lr,
        warmup: cfg.warmup,
        total,
    };
    let size = (data.size.0 as usize, data.size.1 as usize);
    let stop = cfg.stop_at.unwrap_or(total).min(total);
    let mut val = None;
    let save = |tuner: &FineTuner, on: &mut dyn FnMut(Event)| -> Result<()> {
        tuner.opt.save(&settings, &state)?;
        on(Event::Saved {
            path: state.clone(),
            step: tuner.opt.step,
        });
        Ok(())
    };
    while tuner.opt.step < stop {
        let s = tuner.opt.step;
        let epoch = s / per_epoch;
        let pos = (s % per_epoch) as usize;
        let mut order = data.split.train.clone();
        rng_for(cfg.seed, epoch, u64::MAX).shuffle(&mut order);
        let range = pos * cfg.batch..((pos + 1) * cfg.batch).min(n);
        let mut px = Vec::with_capacity(range.len() * 3 * size.0 * size.1);
        let mut labels = Vec::with_capacity(range.len());
        for k in range.clone() {
            let i = order[k];
            let mut rng = rng_for(cfg.seed, epoch, k as u64);
            px.extend(train_view(&data.open(i)?, data.eval, data.size, &mut rng)?);
            labels.push(data.set.labels[i]);
        }
        let lr = sched.lr(s);
        let loss = tuner.step(&data.batch(px, range.len(), size)?, &labels, lr)?;
        on(Event::Step {
            step: s + 1,
            total,
            epoch: epoch as usize + 1,
            loss,
            lr,
        });
        let step = tuner.opt.step;
        if step.is_multiple_of(per_epoch) {
            val = (!data.split.val.is_empty())
                .then(|| evaluate(tuner, data, &data.split.val, cfg.batch))
                .transpose()?;
            on(Event::Epoch {
                epoch: (step / per_epoch) as usize,
                val,
            });
        }
        if cfg.save_every > 0 && step.is_multiple_of(cfg.save_every) && step < stop {
            save(tuner, &mut on)?;
        }
    }
    save(tuner, &mut on)?;
    if tuner.opt.step == total {
        tuner.export(out)?;
    }
    Ok(Outcome {
        step: tuner.opt.step,
        total,
        val,
    })
}
