use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use visenc::EncodeOptions;

use crate::output::{self, Selection};
use crate::{batch, inputs, ModelArgs, RunArgs};

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Image files and directories (walked recursively).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output file: .jsonl (default: JSON lines on stdout), .npy or .parquet.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Hidden states to add, in Hugging Face's indexing (0 = embeddings, -1 = last block), comma-separated.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    layers: Vec<i64>,
    /// Add the final patch tokens (and CLS/register tokens) with the patch grid.
    #[arg(long)]
    tokens: bool,
    /// Add the multi-scale feature maps (CNN and hierarchical models), NCHW per stage.
    #[arg(long)]
    features: bool,
    /// L2-normalise the embeddings.
    #[arg(long)]
    normalize: bool,
    /// Embed only part i of N of the files (0-based), to split a job across machines; see the README.
    #[arg(long)]
    shard: Option<inputs::Shard>,
}

pub fn run(a: EmbedArgs) -> Result<usize> {
    let mut paths = inputs::collect(&a.inputs)?;
    if let Some(s) = a.shard {
        paths.retain(|p| s.contains(p));
    }
    let enc = batch::load_encoder(&a.model)?;
    let opts = EncodeOptions {
        layers: a.layers.clone(),
        tokens: a.tokens,
        features: a.features,
    };
    let sel = Selection {
        normalize: a.normalize,
        tokens: a.tokens,
        features: a.features,
    };
    let mut sink = output::open(a.out.as_deref(), sel, !a.layers.is_empty())?;
    let failed = batch::run_images(&enc, &paths, &a.run, &opts, |p, f| sink.push(p, f))?;
    sink.finish()?;
    Ok(failed)
}
