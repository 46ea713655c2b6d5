//! `visenc index DIR`: embed a folder into a persistent search index, incrementally.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rayon::prelude::*;
use visenc::EncodeOptions;
use visenc_index::{Entry, Index};

use crate::{batch, inputs, ModelArgs, RunArgs};

/// The index used when `--db` is not given.
pub const DEFAULT_DB: &str = "visenc-index.db";

#[derive(Args)]
pub struct IndexArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Folder of images, walked recursively. Paths are stored absolute.
    dir: PathBuf,
    /// The index: a SQLite file (created if missing) or a postgres://... URL (pgvector).
    #[arg(long, default_value = DEFAULT_DB)]
    db: String,
    /// Images per committed transaction: a killed run keeps every batch it committed.
    #[arg(long, default_value_t = 256)]
    commit_every: usize,
}

/// What the index holds for a file, and what the file is now.
struct Seen {
    hash: String,
    size: u64,
}

pub fn run(a: IndexArgs) -> Result<usize> {
    let root = std::fs::canonicalize(&a.dir)
        .with_context(|| format!("{}: cannot open folder", a.dir.display()))?;
    if !root.is_dir() {
        bail!("{}: not a folder", a.dir.display());
    }
    let paths = inputs::collect(std::slice::from_ref(&root))?;
    if paths.is_empty() {
        bail!(
            "{}: no images found (nothing changed in the index)",
            a.dir.display()
        );
    }
    let enc = batch::load_encoder(&a.model)?;
    let index = Index::create(&a.db)?;
    index.bind_model(
        &visenc_index::model_id(&a.model.model),
        visenc_index::embedding_dim(&enc),
    )?;

    // Hash every file; a file that cannot be read or named fails alone.
    let bar = batch::progress(paths.len(), a.run.quiet);
    bar.set_message("hashing");
    let hashed: Vec<(PathBuf, visenc_index::Result<(String, Seen)>)> = paths
        .into_par_iter()
        .map(|p| {
            let r = (|| {
                let text = visenc_index::path_text(&p)?;
                let hash = visenc_index::content_hash(&p)?;
                let size = std::fs::metadata(&p)
                    .map_err(|source| visenc_index::Error::Io {
                        path: p.clone(),
                        source,
                    })?
                    .len();
                Ok((text, Seen { hash, size }))
            })();
            bar.inc(1);
            (p, r)
        })
        .collect();
    bar.finish_and_clear();

    let stored: HashMap<String, String> = index
        .files()?
        .into_iter()
        .map(|f| (f.path, f.hash))
        .collect();
    let mut failed = 0;
    let mut current: HashMap<String, Seen> = HashMap::new();
    let mut todo: Vec<PathBuf> = Vec::new();
    for (p, r) in hashed {
        match r {
            Ok((text, seen)) => {
                if stored.get(&text) != Some(&seen.hash) {
                    todo.push(p);
                }
                current.insert(text, seen);
            }
            Err(e) => {
                failed += 1;
                eprintln!("visenc: {e}");
            }
        }
    }
    // Files that were indexed under this folder and are gone now.
    let prefix = format!("{}{}", root.display(), std::path::MAIN_SEPARATOR);
    let removed: Vec<String> = stored
        .keys()
        .filter(|p| p.starts_with(&prefix) && !current.contains_key(*p))
        .cloned()
        .collect();
    if !removed.is_empty() {
        index.commit(&[], &removed)?;
    }
    let unchanged = current.len() - todo.len();

    let mut pending: Vec<Entry> = Vec::new();
    let mut added = 0;
    let commit_every = a.commit_every.max(1);
    failed += batch::run_images(&enc, &todo, &a.run, &EncodeOptions::default(), |p, f| {
        let path = visenc_index::path_text(p)?;
        let seen = &current[&path];
        pending.push(Entry {
            hash: seen.hash.clone(),
            size: seen.size,
            path,
            embedding: batch::vec1(f.embedding())?,
        });
        if pending.len() >= commit_every {
            index.commit(&pending, &[])?;
            added += pending.len();
            pending.clear();
        }
        Ok(())
    })?;
    if !pending.is_empty() {
        index.commit(&pending, &[])?;
        added += pending.len();
    }
    let meta = index.meta()?.context("the index has no model")?;
    eprintln!(
        "visenc: {added} image(s) embedded, {unchanged} unchanged, {} removed, {failed} failed; {} holds {} image(s) of {} ({} dimensions)",
        removed.len(),
        index.db(),
        index.len()?,
        meta.model,
        meta.dim
    );
    Ok(failed)
}
