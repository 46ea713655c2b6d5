//! `visenc train align`: a locked-image alignment of a sentence encoder (BERT, e.g. all-MiniLM-L6-v2) with
//! an image classifier's space: a projection from text embeddings of the class names to the classifier's
//! class vectors, trained with a contrastive loss, judged on held-out classes. The output is a two-tower
//! model directory (`config.json` naming both towers + `projection.safetensors`) that loads like any
//! text-image model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use visenc::weights::{Checkpoint, TwoTowerConfig, PROJECTION_FILE, TWO_TOWER_MODEL_TYPE};
use visenc::{Encoder, LoadOptions, TextModel};
use visenc_train::align::{top_k_accuracy, train_projection, AlignConfig, StateFile};
use visenc_train::data::SplitMix64;
use visenc_train::LossKind;

#[derive(Args)]
pub struct AlignArgs {
    /// The sentence encoder: a BERT checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    text_model: String,
    /// The image classifier whose class vectors are the locked image side (a checkpoint or weights file).
    #[arg(long)]
    image_model: String,
    /// Name of the classifier weight [classes, features] in the image checkpoint.
    #[arg(long, default_value = "_fc.weight")]
    classifier_weight: String,
    /// One class name per line, in class-index order.
    #[arg(long)]
    class_names: PathBuf,
    /// Prompt template; `{}` is replaced by each class name.
    #[arg(long, default_value = "a photo of a {}.")]
    template: String,
    /// Classes held out from training (chosen with --seed) to measure text-to-class retrieval.
    #[arg(long, default_value_t = 100)]
    holdout: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "clip")]
    loss: LossArg,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// The model directory to write: `config.json` naming the two towers (by absolute path, or hub id)
    /// and `projection.safetensors` (`text_projection` [image dim, text dim], `logit_scale`).
    #[arg(long, default_value = "aligned-model")]
    out: PathBuf,
    /// Save the training state (`OUT/align_state.safetensors`) every this many steps and after the last.
    #[arg(long, default_value_t = 50)]
    save_every: usize,
    /// Stop after this step with the state saved (continue later with --resume).
    #[arg(long)]
    stop_at: Option<usize>,
    /// Continue from `OUT/align_state.safetensors`, written by a run with the same settings.
    #[arg(long)]
    resume: bool,
    #[arg(long, short)]
    quiet: bool,
}

/// The training state file inside the output directory.
const STATE_FILE: &str = "align_state.safetensors";

#[derive(Clone, Copy, clap::ValueEnum)]
enum LossArg {
    Clip,
    Siglip,
}

/// Sentence embeddings [N, E] of `texts` with the text tower at `spec`, in batches: the same embedding
/// the two-tower model projects at inference.
fn embed_texts(spec: &str, texts: &[String]) -> Result<Tensor> {
    let model = TextModel::load(spec, &LoadOptions::default())
        .with_context(|| format!("loading the text tower {spec}"))?;
    let mut rows = Vec::new();
    for chunk in texts.chunks(100) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        rows.push(model.encode_texts(&refs)?.projected);
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// How the model directory names a tower: a local path made absolute, a hub id as given.
fn tower_ref(spec: &str) -> Result<String> {
    let p = std::path::Path::new(spec);
    if !p.exists() {
        return Ok(spec.to_string());
    }
    Ok(std::fs::canonicalize(p)
        .with_context(|| format!("{spec}: cannot resolve the path"))?
        .display()
        .to_string())
}

pub fn run(a: AlignArgs) -> Result<usize> {
    // Never overwrite another model's files: --out is a new directory or an earlier alignment's.
    let existing = a.out.join("config.json");
    if existing.is_file() {
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&existing)?)
            .with_context(|| format!("{}: not JSON", existing.display()))?;
        if cfg["model_type"] != TWO_TOWER_MODEL_TYPE {
            bail!(
                "{} holds another model's config.json; give --out a new directory",
                a.out.display()
            );
        }
    }
    let names: Vec<String> = std::fs::read_to_string(&a.class_names)
        .with_context(|| format!("{}: cannot read class names", a.class_names.display()))?
        .lines()
        .map(str::to_string)
        .collect();
    let ckpt = Checkpoint::open(&a.image_model)?;
    let w = ckpt.load_weights(DType::F32, &Device::Cpu)?;
    let classes = w
        .root()
        .get_any(&a.classifier_weight)?
        .with_context(|| format!("{}: no tensor {}", a.image_model, a.classifier_weight))?;
    let (n, _) = classes.dims2()?;
    if n != names.len() {
        bail!(
            "{} has {n} classes but {} has {} names",
            a.image_model,
            a.class_names.display(),
            names.len()
        );
    }
    if a.holdout == 0 || a.holdout + 2 > n {
        bail!(
            "--holdout must be between 1 and {} (the classifier has {n} classes)",
            n - 2
        );
    }
    let prompts: Vec<String> = names.iter().map(|c| a.template.replace("{}", c)).collect();
    if !a.quiet {
        eprintln!("visenc: embedding {n} class prompts with {}", a.text_model);
    }
    let text = embed_texts(&a.text_model, &prompts)?;
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64(a.seed).shuffle(&mut order);
    let (held, train) = order.split_at(a.holdout);
    let pick = |t: &Tensor, idx: &[usize]| -> Result<Tensor> {
        let i = Tensor::new(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            t.device(),
        )?;
        Ok(t.index_select(&i, 0)?)
    };
    let cfg = AlignConfig {
        loss: match a.loss {
            LossArg::Clip => LossKind::Clip,
            LossArg::Siglip => LossKind::Siglip,
        },
        steps: a.steps,
        lr: a.lr,
        weight_decay: a.weight_decay,
        seed: a.seed,
    };
    let quiet = a.quiet;
    // Everything a resumed run must share with the one that wrote the state.
    let settings = serde_json::json!({
        "text_model": a.text_model,
        "image_model": a.image_model,
        "image_vectors": a.classifier_weight,
        "class_names": a.class_names.display().to_string(),
        "template": a.template,
        "held_out": a.holdout,
        "seed": a.seed,
        "loss": cfg.loss,
        "steps": a.steps,
        "lr": a.lr,
        "weight_decay": a.weight_decay,
    });
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create the model directory", a.out.display()))?;
    let state_path = a.out.join(STATE_FILE);
    let state = StateFile {
        path: &state_path,
        every: a.save_every,
        resume: a.resume,
        stop_at: a.stop_at,
        settings: &settings,
    };
    let aligned = train_projection(
        &pick(&text, train)?,
        &pick(&classes, train)?,
        &cfg,
        Some(&state),
        |s, l| {
            if !quiet && (s % 50 == 0 || s == 1) {
                eprintln!("visenc: step {s}: loss {l:.4}");
            }
        },
    )?;
    if let Some(k) = a.stop_at.filter(|&k| k < a.steps) {
        writeln!(
            std::io::stdout(),
            "stopped after step {k} of {}; state saved to {} (continue with --resume)",
            a.steps,
            state_path.display()
        )?;
        return Ok(0);
    }
    let project = |t: &Tensor| -> Result<Tensor> { Ok(t.matmul(&aligned.weight.t()?)?) };
    let held_acc = top_k_accuracy(
        &project(&pick(&text, held)?)?,
        &pick(&classes, held)?,
        &[1, 5],
    )?;
    let train_acc = top_k_accuracy(
        &project(&pick(&text, train)?)?,
        &pick(&classes, train)?,
        &[1, 5],
    )?;
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "trained on {} classes ({} steps, final loss {:.4}, logit scale {:.2})",
        train.len(),
        a.steps,
        aligned.losses.last().copied().unwrap_or(f32::NAN),
        aligned.logit_scale
    )?;
    writeln!(
        stdout,
        "held-out {} classes: text-to-class top-1 {:.3}, top-5 {:.3} (chance {:.3}, {:.3})",
        held.len(),
        held_acc[0],
        held_acc[1],
        1.0 / held.len() as f64,
        5.0 / held.len() as f64
    )?;
    writeln!(
        stdout,
        "training classes: top-1 {:.3}, top-5 {:.3} (among {})",
        train_acc[0],
        train_acc[1],
        train.len()
    )?;
    let meta = [
        ("text_model", a.text_model.clone()),
        ("image_model", a.image_model.clone()),
        ("template", a.template.clone()),
        ("held_out_top1", held_acc[0].to_string()),
        ("held_out_top5", held_acc[1].to_string()),
    ];
    aligned.save(
        &a.out.join(PROJECTION_FILE),
        meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    )?;
    let mut config = TwoTowerConfig::new(tower_ref(&a.image_model)?, tower_ref(&a.text_model)?);
    config.template = Some(a.template.clone());
    config.training = Some(serde_json::json!({
        "image_vectors": a.classifier_weight,
        "class_names": a.class_names.display().to_string(),
        "classes": n,
        "held_out": held.len(),
        "seed": a.seed,
        "loss": cfg.loss,
        "steps": a.steps,
        "lr": a.lr,
        "weight_decay": a.weight_decay,
        "held_out_top1": held_acc[0],
        "held_out_top5": held_acc[1],
    }));
    config.save(&a.out)?;
    // The directory must load as a text-image model; check it now rather than at first use.
    let out = a.out.display().to_string();
    let enc = Encoder::load(&out, &LoadOptions::default())
        .with_context(|| format!("{out}: the written model does not load"))?;
    writeln!(
        stdout,
        "model written to {out} ({}, {}-d embeddings)",
        enc.info().architecture,
        enc.info().projection_dim.unwrap_or(enc.info().hidden_size)
    )?;
    Ok(0)
}
