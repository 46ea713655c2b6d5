//! `visenc train probe`: a linear probe (softmax regression) on a frozen encoder's embeddings.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::{Args, Subcommand};
use visenc::EncodeOptions;
use visenc_train::probe::{self, ProbeConfig};
use visenc_train::{lbfgs::Lbfgs, stratified_split, LabelledImages};

use crate::{batch, ModelArgs, RunArgs};

#[derive(Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    what: TrainCommand,
}

#[derive(Subcommand)]
enum TrainCommand {
    /// Train a linear classifier on the model's frozen embeddings; `visenc classify --head` uses it.
    Probe(ProbeArgs),
    /// Align a sentence encoder (BERT) with an image classifier's class vectors (locked image side).
    Align(super::align::AlignArgs),
    /// Fine-tune a ViT classifier (last N blocks or LoRA) on labelled images; resumable.
    Finetune(super::finetune::FinetuneArgs),
}

#[derive(Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Labelled images: a directory with one sub-directory per class, or a CSV of `path,label` rows
    /// (relative paths are relative to the CSV).
    #[arg(long)]
    data: PathBuf,
    /// Where to write the head (safetensors: weight, bias, class names).
    #[arg(long, default_value = "head.safetensors")]
    out: PathBuf,
    /// Fraction of each class held out for validation (seeded, stratified).
    #[arg(long, default_value_t = 0.2)]
    val: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Inverse L2 regularisation strength, as scikit-learn's LogisticRegression(C=...).
    #[arg(long, default_value_t = 1.0)]
    c: f64,
    /// Most L-BFGS iterations.
    #[arg(long, default_value_t = 1000)]
    max_iter: usize,
}

pub fn run(a: TrainArgs) -> Result<usize> {
    match a.what {
        TrainCommand::Probe(p) => run_probe(p),
        TrainCommand::Align(a) => super::align::run(a),
        TrainCommand::Finetune(a) => super::finetune::run(a),
    }
}

fn run_probe(a: ProbeArgs) -> Result<usize> {
    let data = LabelledImages::open(&a.data)?;
    if data.classes.len() < 2 {
        bail!(
            "{}: a classifier needs at least two classes, found only {:?} ({} images)",
            a.data.display(),
            data.classes.first().map_or("", String::as_str),
            data.paths.len()
        );
    }
    let split = stratified_split(&data.labels, a.val, a.seed)?;
    let enc = batch::load_encoder(&a.model)?;
    let x = embed_all(&enc, &data.paths, &a.run)?;
    let pick = |idx: &[usize]| -> Result<(Tensor, Vec<u32>)> {
        let i = Tensor::new(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            x.device(),
        )?;
        Ok((
            x.index_select(&i, 0)?,
            idx.iter().map(|&i| data.labels[i]).collect(),
        ))
    };
    let (xtr, ytr) = pick(&split.train)?;
    let cfg = ProbeConfig {
        c: a.c,
        solver: Lbfgs {
            max_iter: a.max_iter,
            ..Lbfgs::default()
        },
    };
    let quiet = a.run.quiet;
    let (head, min) = probe::fit(&xtr, &ytr, &data.classes, &cfg, |it, loss, g| {
        if !quiet && (it % 10 == 0 || it == 1) {
            eprintln!("visenc: L-BFGS iteration {it}: loss {loss:.6}, max |gradient| {g:.2e}");
        }
    })?;
    if !min.converged {
        eprintln!(
            "visenc: warning: L-BFGS stopped after {} iterations with max |gradient| {:.2e} (raise --max-iter)",
            min.iterations, min.grad_max
        );
    }
    let train_acc = head.accuracy(&xtr, &ytr)?;
    let mut out = std::io::stdout();
    writeln!(
        out,
        "{} images, {} classes, {}-d embeddings; trained in {} L-BFGS iterations (loss {:.6})",
        data.paths.len(),
        data.classes.len(),
        head.dim(),
        min.iterations,
        min.value
    )?;
    writeln!(
        out,
        "train accuracy      {:.4} ({} images)",
        train_acc,
        ytr.len()
    )?;
    let mut val_acc = None;
    if !split.val.is_empty() {
        let (xva, yva) = pick(&split.val)?;
        let acc = head.accuracy(&xva, &yva)?;
        writeln!(out, "validation accuracy {:.4} ({} images)", acc, yva.len())?;
        val_acc = Some(acc);
    }
    let meta = [
        ("model", a.model.model.clone()),
        ("c", a.c.to_string()),
        ("train_accuracy", train_acc.to_string()),
        (
            "val_accuracy",
            val_acc.map_or("none".into(), |v| v.to_string()),
        ),
    ];
    head.save(&a.out, &meta)?;
    writeln!(out, "head written to {}", a.out.display())?;
    Ok(0)
}

/// The embeddings [N, D] of every image, in order; fails naming the images that cannot be used.
fn embed_all(enc: &visenc::Encoder, paths: &[PathBuf], run: &RunArgs) -> Result<Tensor> {
    let mut rows: Vec<(PathBuf, Tensor)> = Vec::with_capacity(paths.len());
    let failed = batch::run_images(enc, paths, run, &EncodeOptions::default(), |p, f| {
        rows.push((p.to_path_buf(), f.embedding().to_dtype(DType::F32)?));
        Ok(())
    })?;
    if failed > 0 {
        let done: std::collections::HashSet<&Path> =
            rows.iter().map(|(p, _)| p.as_path()).collect();
        let bad: Vec<String> = paths
            .iter()
            .filter(|p| !done.contains(p.as_path()))
            .map(|p| p.display().to_string())
            .collect();
        bail!(
            "{failed} of {} images could not be used (errors above): {}; fix or remove them",
            paths.len(),
            bad.join(", ")
        );
    }
    let rows: Vec<Tensor> = rows.into_iter().map(|(_, t)| t).collect();
    Tensor::cat(&rows, 0).context("stacking embeddings")
}
