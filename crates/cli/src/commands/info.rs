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
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json!({"model": a.model.model, "info": info, "preprocess": pre}))?);
        return Ok(0);
    }
    println!("model          {}", a.model.model);
    println!("architecture   {} (family {})", info.architecture, info.family);
    println!("parameters     {} ({:.1} M)", info.parameters, info.parameters as f64 / 1e6);
    println!("image size     {}x{}, patch {}", info.image_size.0, info.image_size.1, info.patch_size);
    println!("layers         {}", info.num_layers);
    println!("hidden size    {} (pooled embedding)", info.hidden_size);
    if let Some(p) = info.projection_dim {
        println!("projection     {p} (image-text embedding)");
    }
    println!("prefix tokens  {}", info.prefix_tokens);
    if let Some(l) = &info.labels {
        println!("classes        {}: {}{}", l.len(), l.iter().take(5).cloned().collect::<Vec<_>>().join(", "), if l.len() > 5 { ", ..." } else { "" });
    }
    if let Some(s) = info.scoring {
        println!("text tower     context {} tokens, scoring {}", info.text_context_length.unwrap_or(0), serde_json::to_string(&s)?);
    }
    println!("preprocess     {}", serde_json::to_string(pre)?);
    Ok(0)
}
