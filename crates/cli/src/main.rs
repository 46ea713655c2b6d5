//! `visenc`: embed, classify and compare images with any supported vision encoder.

mod batch;
mod commands;
mod inputs;
mod output;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "visenc",
    version,
    about = "Turn images (and text) into vectors with vision encoders, no Python needed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by every command that loads a model.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A checkpoint directory (Hugging Face, open_clip or timm layout) or a Hugging Face hub id.
    #[arg(long, short)]
    pub model: String,
    /// Load even if tensors are missing, unexpected or mis-shaped (they are reported).
    #[arg(long)]
    pub allow_mismatch: bool,
    /// Largest image accepted, in pixels (decompression-bomb guard).
    #[arg(long, default_value_t = visenc::image::Limits::default().max_pixels)]
    pub max_pixels: u64,
}

/// Options of commands that run over many images.
#[derive(Args, Clone)]
pub struct RunArgs {
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Embed images: pooled/projected embeddings, optionally hidden layers and patch tokens.
    Embed(commands::embed::EmbedArgs),
    /// Zero-shot classification against text labels (or the checkpoint's own classifier head).
    Classify(commands::classify::ClassifyArgs),
    /// Cosine similarity between images and one or more texts.
    Similarity(commands::similarity::SimilarityArgs),
    /// Describe a model: architecture, sizes, preprocessing, parameters.
    Info(commands::info::InfoArgs),
    /// Time a model's forward pass (img/s, latency, peak RSS) or the kernel micro-benchmarks.
    Bench(commands::bench::BenchArgs),
    /// HTTP service: OpenAI/infinity/TEI-compatible embeddings, zero-shot labels, search, a web page.
    Serve(commands::serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(a) => commands::embed::run(a),
        Command::Classify(a) => commands::classify::run(a),
        Command::Similarity(a) => commands::similarity::run(a),
        Command::Info(a) => commands::info::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Serve(a) => commands::serve::run(a),
    };
    match result {
        // `visenc ... | head` closes stdout early: stop quietly, as other Unix tools do.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Ok(0) => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("visenc: {failed} input(s) failed (see the errors above)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("visenc: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Whether writing the output failed because its reader went away (EPIPE).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
                == Some(BrokenPipe)
    })
}
