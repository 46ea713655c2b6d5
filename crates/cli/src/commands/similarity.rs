use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use visenc::EncodeOptions;

use crate::{batch, inputs, ModelArgs, RunArgs};

#[derive(Args)]
pub struct SimilarityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    run: RunArgs,
    /// A text to compare with; repeat for several (one column each).
    #[arg(long, required = true)]
    text: Vec<String>,
    /// Image files and directories.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

pub fn run(a: SimilarityArgs) -> Result<usize> {
    let paths = inputs::collect(&a.inputs)?;
    let enc = batch::load_encoder(&a.model)?;
    if !enc.has_text() {
        bail!("{} has no text tower", a.model.model);
    }
    let texts: Vec<&str> = a.text.iter().map(String::as_str).collect();
    writeln!(std::io::stdout(), "path\t{}", texts.join("\t"))?;
    batch::run_images(
        &enc,
        &paths,
        &a.run,
        &EncodeOptions::default(),
        |path, f| {
            let sims = batch::vec1(&enc.similarity(f.embedding(), &texts)?)?;
            let cols: Vec<String> = sims.iter().map(|s| format!("{s:.6}")).collect();
            writeln!(std::io::stdout(), "{}\t{}", path.display(), cols.join("\t"))?;
            Ok(())
        },
    )
}
