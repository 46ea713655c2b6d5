//! `visenc search` (text-to-image and image-to-image) and `visenc dedup` over an index.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use visenc_index::Index;

use crate::commands::index::DEFAULT_DB;
use crate::{batch, ModelArgs};

#[derive(Args)]
pub struct SearchArgs {
    /// Text to search for, through the model's text tower (put `--` before a query that starts with `-`).
    query: Option<String>,
    /// Search with an image instead (image-to-image).
    #[arg(long, conflicts_with = "query")]
    image: Option<PathBuf>,
    /// The index: a SQLite file or a postgres://... URL.
    #[arg(long, default_value = DEFAULT_DB)]
    db: String,
    /// Results to return.
    #[arg(long, short, default_value_t = 10)]
    k: usize,
    /// The model for the query; by default the one the index was built with.
    #[arg(long, short)]
    model: Option<String>,
    /// Largest query image accepted, in pixels.
    #[arg(long, default_value_t = visenc::image::Limits::default().max_pixels)]
    max_pixels: u64,
    /// What the model's linear layers compute in (f32, bf16, int8), as in `visenc embed`.
    #[arg(long, default_value_t = visenc::Precision::F32)]
    precision: visenc::Precision,
    /// One JSON object per result (`{"path", "score"}`) instead of `score<TAB>path`.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DedupArgs {
    /// The index: a SQLite file or a postgres://... URL.
    #[arg(long, default_value = DEFAULT_DB)]
    db: String,
    /// Cosine similarity at or above which two images count as near-duplicates.
    #[arg(long, default_value_t = 0.95)]
    threshold: f32,
    /// One JSON list of paths per group instead of `group<TAB>path` lines.
    #[arg(long)]
    json: bool,
}

pub fn run(a: SearchArgs) -> Result<usize> {
    if a.query.is_none() && a.image.is_none() {
        bail!("give a text query or --image FILE");
    }
    if a.query.as_deref().is_some_and(|q| q.trim().is_empty()) {
        bail!("the text query is empty");
    }
    let index = Index::open(&a.db)?;
    let Some(meta) = index.meta()? else {
        bail!(
            "{}: the index is empty (run `visenc index` first)",
            index.db()
        );
    };
    let enc = batch::load_encoder(&ModelArgs {
        model: a.model.unwrap_or(meta.model),
        allow_mismatch: false,
        max_pixels: a.max_pixels,
        precision: a.precision,
    })?;
    let hits = match (&a.query, &a.image) {
        (Some(q), _) => index.search_text(&enc, q, a.k)?,
        (None, Some(img)) => {
            let px = enc.load_image(img)?;
            index.search_image(&enc, &px, a.k)?
        }
        (None, None) => unreachable!("checked above"),
    };
    let mut out = std::io::stdout().lock();
    for h in hits {
        if a.json {
            serde_json::to_writer(&mut out, &h)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{:.4}\t{}", h.score, h.path)?;
        }
    }
    Ok(0)
}

pub fn dedup(a: DedupArgs) -> Result<usize> {
    if !(-1.0..=1.0).contains(&a.threshold) {
        bail!(
            "--threshold {} is not a cosine similarity (-1 to 1)",
            a.threshold
        );
    }
    let index = Index::open(&a.db)?;
    let groups = index
        .near_duplicates(a.threshold)
        .with_context(|| format!("{}: finding near-duplicates", index.db()))?;
    let mut out = std::io::stdout().lock();
    for (i, g) in groups.iter().enumerate() {
        if a.json {
            serde_json::to_writer(&mut out, g)?;
            writeln!(out)?;
        } else {
            for p in g {
                writeln!(out, "{}\t{p}", i + 1)?;
            }
        }
    }
    Ok(0)
}
