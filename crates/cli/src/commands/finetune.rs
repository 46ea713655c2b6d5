//! `visenc train finetune`: fine-tune a ViT classifier (last N blocks or LoRA adapters) on labelled
//! images, with checkpoints that resume exactly; the result is a checkpoint directory every command loads.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use visenc_train::finetune::run::{fit, Data, Event, RunConfig, STATE_FILE};
use visenc_train::finetune::{FineTuner, Method};
use visenc_train::optim::AdamWConfig;
use visenc_train::{stratified_split, LabelledImages};

#[derive(Args)]
pub struct FinetuneArgs {
    /// A transformers ViT (`ViTForImageClassification`, `ViTModel`) or timm `vit_*` checkpoint
    /// directory or hub id.
    #[arg(long, short)]
    model: String,
    /// Labelled images: a directory with one sub-directory per class, or a CSV of `path,label` rows.
    #[arg(long)]
    data: PathBuf,
    /// Train the last N transformer blocks and the final norm (0: the head alone), plus the head.
    #[arg(long, required_unless_present = "lora", conflicts_with = "lora")]
    last_n: Option<usize>,
    /// Train LoRA adapters of this rank on the attention projections (transformers ViT: query, key,
    /// value, attention.output.dense; timm: attn.qkv, attn.proj), plus the head.
    #[arg(long)]
    lora: Option<usize>,
    /// LoRA scale numerator: adapters are scaled by alpha / rank (default: the rank, i.e. scale 1).
    #[arg(long, requires = "lora")]
    lora_alpha: Option<f64>,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Images per optimisation step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Peak learning rate of the cosine schedule.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Linear warmup steps before the cosine decay.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// AdamW decoupled weight decay (on weights of rank >= 2 only).
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Fraction of each class held out for validation (seeded, stratified).
    #[arg(long, default_value_t = 0.2)]
    val: f64,
    /// Seed of the split, the shuffles, the augmentation and new weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the training state every this many steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    save_every: u64,
    /// Stop after this step (the state is saved; continue with --resume).
    #[arg(long)]
    stop_at: Option<u64>,
    /// Continue from OUT/train_state.safetensors (same settings required).
    #[arg(long)]
    resume: bool,
    /// Output directory: the training state, then the trained checkpoint (config.json, model.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Largest image accepted, in pixels (decompression-bomb guard).
    #[arg(long, default_value_t = visenc::image::Limits::default().max_pixels)]
    max_pixels: u64,
    /// Print a progress line only every this many steps.
    #[arg(long, default_value_t = 1)]
    log_every: u64,
}

pub fn run(a: FinetuneArgs) -> Result<usize> {
    let set = LabelledImages::open(&a.data)?;
    if set.classes.len() < 2 {
        bail!(
            "{}: a classifier needs at least two classes, found only {:?} ({} images)",
            a.data.display(),
            set.classes.first().map_or("", String::as_str),
            set.paths.len()
        );
    }
    let method = match (a.last_n, a.lora) {
        (Some(n), None) => Method::LastN { n },
        (None, Some(rank)) => Method::Lora {
            rank,
            alpha: a.lora_alpha.unwrap_or(rank as f64),
        },
        _ => bail!("give exactly one of --last-n and --lora"),
    };
    let enc = visenc::Encoder::load(&a.model, &visenc::LoadOptions::default())
        .with_context(|| format!("loading {}", a.model))?;
    let (h, w) = enc.info().image_size;
    let split = stratified_split(&set.labels, a.val, a.seed)?;
    let limits = visenc::image::Limits {
        max_pixels: a.max_pixels,
        ..Default::default()
    };
    let data = Data {
        set: &set,
        split: &split,
        eval: enc.preprocess(),
        size: (h as u32, w as u32),
        limits,
    };
    data.check_images()?;
    let opt = AdamWConfig {
        weight_decay: a.weight_decay,
        ..AdamWConfig::default()
    };
    let mut tuner = FineTuner::new(&a.model, &set.classes, method, opt, a.seed)?;
    eprintln!(
        "visenc: fine-tuning {} ({} blocks): {method:?}, {} trainable values; {} classes, {} train / {} validation images",
        a.model,
        tuner.num_blocks,
        tuner.trainable_parameters(),
        set.classes.len(),
        split.train.len(),
        split.val.len()
    );
    if a.resume && !a.out.join(STATE_FILE).is_file() {
        bail!(
            "--resume: {} does not exist",
            a.out.join(STATE_FILE).display()
        );
    }
    let cfg = RunConfig {
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        warmup: a.warmup,
        seed: a.seed,
        save_every: a.save_every,
        stop_at: a.stop_at,
    };
    let epochs = a.epochs;
    let log_every = a.log_every.max(1);
    let outcome = fit(&mut tuner, &data, &cfg, &a.out, a.resume, |e| match e {
        Event::Resumed { step } => eprintln!("visenc: resumed at step {step}"),
        Event::Step {
            step,
            total,
            epoch,
            loss,
            lr,
        } if step % log_every == 0 || step == total => {
            eprintln!("step {step}/{total}  epoch {epoch}/{epochs}  loss {loss:.4}  lr {lr:.3e}")
        }
        Event::Step { .. } => {}
        Event::Epoch { epoch, val } => match val {
            Some(v) => eprintln!(
                "epoch {epoch}/{epochs}: validation accuracy {:.4} ({}/{})",
                v.value(),
                v.correct,
                v.total
            ),
            None => eprintln!("epoch {epoch}/{epochs}: no validation images"),
        },
        Event::Saved { path, step } => eprintln!("visenc: step {step}: saved {}", path.display()),
    })?;
    let mut out = std::io::stdout();
    if outcome.step < outcome.total {
        writeln!(
            out,
            "stopped at step {}/{}; continue with --resume",
            outcome.step, outcome.total
        )?;
    } else {
        if let Some(v) = outcome.val {
            writeln!(
                out,
                "validation accuracy {:.4} ({}/{})",
                v.value(),
                v.correct,
                v.total
            )?;
        }
        writeln!(
            out,
            "trained model written to {} (visenc classify -m {} IMAGES)",
            a.out.display(),
            a.out.display()
        )?;
    }
    Ok(0)
}
