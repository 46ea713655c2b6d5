use std::io::Write;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::{batch, ModelArgs};

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: InfoArgs) -> Result<usize> {
    let enc = batch::load_encoder(&a.model)?;
    let info = enc.info();
    let pre = enc.preprocess();
    // Not `println!`: it panics when stdout is a closed pipe (`visenc info | head`).
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(
                &json!({"model": a.model.model, "info": info, "preprocess": pre,
                        "precision": enc.precision().name()})
            )?
        )?;
        return Ok(0);
    }
    writeln!(out, "model          {}", a.model.model)?;
    writeln!(
        out,
        "architecture   {} (family {})",
        info.architecture, info.family
    )?;
    writeln!(
        out,
        "parameters     {} ({:.1} M)",
        info.parameters,
        info.parameters as f64 / 1e6
    )?;
    let (h, w) = info.image_size;
    match info.patch_size {
        0 => writeln!(out, "image size     {h}x{w} (any size works)")?,
        p => writeln!(out, "image size     {h}x{w}, patch {p}")?,
    }
    writeln!(out, "layers         {}", info.num_layers)?;
    writeln!(
        out,
        "precision      {} (linear layers; convolutions f32)",
        enc.precision()
    )?;
    writeln!(
        out,
        "hidden size    {} (pooled embedding)",
        info.hidden_size
    )?;
    if let Some(p) = info.projection_dim {
        writeln!(out, "projection     {p} (image-text embedding)")?;
    }
    writeln!(out, "prefix tokens  {}", info.prefix_tokens)?;
    if let Some(l) = &info.labels {
        writeln!(
            out,
            "classes        {}: {}{}",
            l.len(),
            l.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if l.len() > 5 { ", ..." } else { "" }
        )?;
    }
    if let Some(s) = info.scoring {
        writeln!(
            out,
            "text tower     context {} tokens, scoring {}",
            info.text_context_length.unwrap_or(0),
            serde_json::to_string(&s)?
        )?;
    }
    writeln!(out, "preprocess     {}", serde_json::to_string(pre)?)?;
    Ok(0)
}
