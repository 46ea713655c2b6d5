use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use visenc::EncodeOptions;
use visenc_train::LinearHead;

use crate::{batch, inputs, ModelArgs, RunArgs};

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Comma-separated labels for zero-shot classification with the text tower. Without it the
    /// checkpoint's own classifier head is used.
    #[arg(long)]
    labels: Option<String>,
    /// Prompt template; `{}` is replaced by each label.
    #[arg(long, default_value = "a photo of a {}.")]
    template: String,
    /// A file with one class name per line, for a classifier head whose checkpoint has no names.
    #[arg(long)]
    class_names: Option<PathBuf>,
    /// A linear head trained by `visenc train probe` on this model's embeddings (class names inside).
    #[arg(long, conflicts_with_all = ["labels", "class_names"])]
    head: Option<PathBuf>,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print one JSON object per image instead of text.
    #[arg(long)]
    json: bool,
    /// Image files and directories.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

pub fn run(a: ClassifyArgs) -> Result<usize> {
    let labels: Option<Vec<String>> = a.labels.as_ref().map(|l| {
        l.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    if labels.as_ref().is_some_and(Vec::is_empty) {
        bail!("--labels is empty: give at least one label, e.g. --labels \"cat,dog\"");
    }
    let paths = inputs::collect(&a.inputs)?;
    let enc = batch::load_encoder(&a.model)?;
    let head = a.head.as_deref().map(LinearHead::load).transpose()?;
    if let (Some(path), Some((h, meta))) = (&a.head, &head) {
        let info = enc.info();
        let dim = info.projection_dim.unwrap_or(info.hidden_size);
        if h.dim() != dim {
            bail!(
                "{}: the head takes {}-d embeddings (trained on {}) but {} gives {dim}-d ones",
                path.display(),
                h.dim(),
                meta.get("model").map_or("another model", String::as_str),
                a.model.model
            );
        }
    }
    let names: Vec<String> = match (&head, &labels, &a.class_names) {
        (Some((h, _)), _, _) => h.classes.clone(),
        (None, Some(l), _) => {
            if !enc.has_text() {
                let hint = match enc.info().labels {
                    Some(_) => "drop --labels to use its classifier head",
                    None => "zero-shot labels need an image-text model such as CLIP or SigLIP",
                };
                bail!("{} has no text tower: {hint}", a.model.model);
            }
            l.clone()
        }
        (None, None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("{}: cannot read class names", f.display()))?
            .lines()
            .map(str::to_string)
            .collect(),
        (None, None, None) => match &enc.info().labels {
            Some(l) => l.clone(),
            None if enc.has_text() => bail!("give --labels for zero-shot classification"),
            None => bail!(
                "{} has no classifier head with class names; give --labels or --class-names",
                a.model.model
            ),
        },
    };
    let label_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let failed = batch::run_images(
        &enc,
        &paths,
        &a.run,
        &EncodeOptions::default(),
        |path, f| {
            let probs = match (&head, &labels, &f.logits) {
                (Some((h, _)), _, _) => candle_nn_softmax(&h.logits(f.embedding())?)?,
                (None, Some(_), _) => enc.zero_shot(f.embedding(), &label_refs, &a.template)?,
                (None, None, Some(logits)) => {
                    if logits.dim(1)? != names.len() {
                        bail!(
                            "the head has {} classes but {} class names were given",
                            logits.dim(1)?,
                            names.len()
                        );
                    }
                    candle_nn_softmax(logits)?
                }
                (None, None, None) => bail!("{} has no classifier head", a.model.model),
            };
            let p = batch::vec1(&probs)?;
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
            order.truncate(a.top.max(1));
            if a.json {
                let top: Vec<_> = order
                    .iter()
                    .map(|&i| json!({"label": names[i], "index": i, "probability": p[i]}))
                    .collect();
                writeln!(
                    std::io::stdout(),
                    "{}",
                    json!({"path": path.display().to_string(), "top": top})
                )?;
            } else {
                let top: Vec<String> = order
                    .iter()
                    .map(|&i| format!("{} ({:.4})", names[i], p[i]))
                    .collect();
                writeln!(std::io::stdout(), "{}\t{}", path.display(), top.join(", "))?;
            }
            Ok(())
        },
    )?;
    Ok(failed)
}

fn candle_nn_softmax(logits: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    let max = logits.max_keepdim(1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(1)?)?)
}
