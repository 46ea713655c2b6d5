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
    /// What linear layers and dense convolutions compute in: f32, bf16 (bf16 products, f32 sums) or
    /// int8 (int8 weights per channel, uint8 activations per row); attention's products are bf16 in
    /// both where the CPU has AVX512-BF16; depthwise convolutions stay f32.
    #[arg(long, default_value_t = visenc::Precision::F32)]
    pub precision: visenc::Precision,
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
    /// LLaVA / LLaVA-NeXT: per image, the projected visual tokens and where they go in the LLM input.
    LlmTokens(commands::llm_tokens::LlmTokensArgs),
    /// Train on frozen embeddings: a linear probe whose head `visenc classify --head` loads.
    Train(commands::train::TrainArgs),
    /// Embed a folder into a persistent search index (SQLite file or postgres:// URL), incrementally.
    Index(commands::index::IndexArgs),
    /// Search an index by text (through the text tower) or by image.
    Search(commands::search::SearchArgs),
    /// Find groups of near-duplicate images in an index.
    Dedup(commands::search::DedupArgs),
    /// Write an index in clip-retrieval's layout (img_emb/*.npy + metadata/*.parquet, read by autofaiss).
    Export(commands::interchange::ExportArgs),
    /// Add embeddings in clip-retrieval's layout to an index.
    Import(commands::interchange::ImportArgs),
    /// HTTP service: OpenAI/infinity/TEI-compatible embeddings, zero-shot labels, search, a web page.
    Serve(commands::serve::ServeArgs),
}

/// Large buffers aligned to cache lines, so the kernels' vector loads do not straddle two.
#[global_allocator]
static ALLOC: visenc::models::kernels::alloc::CacheLineAligned =
    visenc::models::kernels::alloc::CacheLineAligned;

fn main() -> ExitCode {
    visenc::models::kernels::alloc::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(a) => commands::embed::run(a),
        Command::Classify(a) => commands::classify::run(a),
        Command::Similarity(a) => commands::similarity::run(a),
        Command::Info(a) => commands::info::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::LlmTokens(a) => commands::llm_tokens::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Index(a) => commands::index::run(a),
        Command::Search(a) => commands::search::run(a),
        Command::Dedup(a) => commands::search::dedup(a),
        Command::Export(a) => commands::interchange::export(a),
        Command::Import(a) => commands::interchange::import(a),
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
