//! `visenc llm-tokens`: per image, the projected visual-token matrix of a LLaVA / LLaVA-NeXT
//! checkpoint and the layout that splices it into a language model's input embeddings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use visenc::{LlmTokens, TokenLayout};

use crate::output::{write_npy, Elem};
use crate::{batch, inputs, ModelArgs};

#[derive(Args)]
pub struct LlmTokensArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image files and directories (walked recursively).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output: a `.safetensors` file (`tokens.{i}` [N, D] f32 and `kinds.{i}` [N] u32 per image, the
    /// layouts in the metadata), or a directory (one `{i}.tokens.npy` and `{i}.kinds.npy` per image
    /// plus `layout.json`). Without it the layouts alone are printed as JSON lines.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// One image's entry of the JSON layouts.
#[derive(Serialize)]
struct Entry<'a> {
    index: usize,
    path: String,
    #[serde(flatten)]
    layout: &'a TokenLayout,
    /// Where the arrays are (directory output).
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kinds_file: Option<String>,
}

enum Out {
    Stdout,
    Safetensors(PathBuf),
    Dir(PathBuf),
}

fn f32_bytes(t: &LlmTokens) -> Result<Vec<u8>> {
    let v: Vec<f32> = t
        .tokens
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn kind_bytes(t: &LlmTokens) -> Vec<u8> {
    t.kinds()
        .iter()
        .flat_map(|&k| (k as u32).to_le_bytes())
        .collect()
}

pub fn run(a: LlmTokensArgs) -> Result<usize> {
    let paths = inputs::collect(&a.inputs)?;
    let out = match &a.out {
        None => Out::Stdout,
        Some(p) if p.extension().is_some_and(|e| e == "safetensors") => Out::Safetensors(p.clone()),
        Some(p) if p.extension().is_some() && !p.is_dir() => bail!(
            "{}: --out is a .safetensors file or a directory (for .npy files)",
            p.display()
        ),
        Some(p) => {
            std::fs::create_dir_all(p)
                .with_context(|| format!("{}: cannot create directory", p.display()))?;
            Out::Dir(p.clone())
        }
    };
    let enc = batch::load_encoder(&a.model)?;
    if enc.multimodal().is_none() {
        bail!(
            "{}: not a LLaVA-style model (no multimodal projector to a language model); llm-tokens \
             needs a LlavaForConditionalGeneration or LlavaNextForConditionalGeneration checkpoint",
            a.model.model
        );
    }
    let bar = batch::progress(paths.len(), a.quiet);
    let mut failed = 0;
    let mut done: Vec<(PathBuf, LlmTokens)> = Vec::new();
    for p in &paths {
        match enc.llm_tokens_file(p) {
            Ok(t) => {
                if let Out::Stdout = out {
                    let e = entry(done.len(), p, &t.layout, None);
                    bar.suspend(|| println!("{}", serde_json::to_string(&e).unwrap_or_default()));
                }
                done.push((p.clone(), t));
            }
            Err(e) => {
                failed += 1;
                let msg = match e {
                    // Image errors already name the file.
                    visenc::Error::Image(e) => e.to_string(),
                    e => format!("{}: {e}", p.display()),
                };
                bar.suspend(|| eprintln!("visenc: {msg}"));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    match out {
        Out::Stdout => {}
        Out::Safetensors(path) => write_safetensors(&path, &done)?,
        Out::Dir(dir) => write_dir(&dir, &done)?,
    }
    Ok(failed)
}

fn entry<'a>(
    i: usize,
    p: &Path,
    layout: &'a TokenLayout,
    files: Option<(String, String)>,
) -> Entry<'a> {
    let (tokens_file, kinds_file) = files.unzip();
    Entry {
        index: i,
        path: p.display().to_string(),
        layout,
        tokens_file,
        kinds_file,
    }
}

fn write_safetensors(path: &Path, done: &[(PathBuf, LlmTokens)]) -> Result<()> {
    let mut data = Vec::with_capacity(done.len());
    let mut layouts = Vec::with_capacity(done.len());
    for (i, (p, t)) in done.iter().enumerate() {
        data.push((i, f32_bytes(t)?, kind_bytes(t), &t.layout));
        layouts.push(entry(i, p, &t.layout, None));
    }
    let mut views = Vec::new();
    for (i, tokens, kinds, l) in &data {
        use safetensors::{tensor::TensorView, Dtype};
        views.push((
            format!("tokens.{i}"),
            TensorView::new(Dtype::F32, vec![l.num_tokens, l.hidden_size], tokens)?,
        ));
        views.push((
            format!("kinds.{i}"),
            TensorView::new(Dtype::U32, vec![l.num_tokens], kinds)?,
        ));
    }
    let meta = HashMap::from([
        ("layouts".to_string(), serde_json::to_string(&layouts)?),
        (
            "kinds".to_string(),
            "0 base image, 1 tile grid, 2 image_newline".to_string(),
        ),
    ]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .with_context(|| format!("{}: cannot write", path.display()))
}

fn write_dir(dir: &Path, done: &[(PathBuf, LlmTokens)]) -> Result<()> {
    let mut layouts = Vec::with_capacity(done.len());
    for (i, (p, t)) in done.iter().enumerate() {
        let (tf, kf) = (format!("{i}.tokens.npy"), format!("{i}.kinds.npy"));
        let l = &t.layout;
        write_npy(
            &dir.join(&tf),
            Elem::F32,
            &[l.num_tokens, l.hidden_size],
            &f32_bytes(t)?,
        )?;
        write_npy(&dir.join(&kf), Elem::U32, &[l.num_tokens], &kind_bytes(t))?;
        layouts.push(entry(i, p, l, Some((tf, kf))));
    }
    let path = dir.join("layout.json");
    std::fs::write(&path, serde_json::to_string_pretty(&layouts)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))
}
