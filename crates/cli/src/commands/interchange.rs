//! `visenc export` / `visenc import`: an index in clip-retrieval's output layout, the input of
//! autofaiss and clip-retrieval's knn service:
//!
//! ```text
//! OUT/img_emb/img_emb_0.npy           float32 [n, D], L2-normalised rows
//! OUT/metadata/metadata_0.parquet     image_path (row i describes row i of img_emb_0.npy)
//! OUT/img_emb/img_emb_1.npy ...       one pair per --rows-per-file rows
//! ```
//!
//! `autofaiss build_index --embeddings OUT/img_emb --file_format npy` reads it as it is.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use visenc_index::{Entry, Index};

use crate::commands::index::DEFAULT_DB;
use crate::output::{write_npy, write_parquet, Elem};

#[derive(Args)]
pub struct ExportArgs {
    /// The index: a SQLite file or a postgres://... URL.
    #[arg(long, default_value = DEFAULT_DB)]
    db: String,
    /// Output folder (img_emb/ and metadata/ are created in it).
    #[arg(long, short)]
    out: PathBuf,
    /// Rows per img_emb_{i}.npy / metadata_{i}.parquet pair.
    #[arg(long, default_value_t = 1_000_000)]
    rows_per_file: usize,
}

#[derive(Args)]
pub struct ImportArgs {
    /// A folder in clip-retrieval's layout (img_emb/img_emb_{i}.npy + metadata/metadata_{i}.parquet).
    dir: PathBuf,
    /// The index to add to: a SQLite file (created if missing) or a postgres://... URL.
    #[arg(long, default_value = DEFAULT_DB)]
    db: String,
    /// The model the embeddings were made with (recorded in the index; not loaded).
    #[arg(long, short)]
    model: String,
    /// Rows per committed transaction.
    #[arg(long, default_value_t = 4096)]
    commit_every: usize,
}

fn emb_file(dir: &Path, i: usize) -> PathBuf {
    dir.join("img_emb").join(format!("img_emb_{i}.npy"))
}

fn meta_file(dir: &Path, i: usize) -> PathBuf {
    dir.join("metadata").join(format!("metadata_{i}.parquet"))
}

pub fn export(a: ExportArgs) -> Result<usize> {
    let index = Index::open(&a.db)?;
    let Some(meta) = index.meta()? else {
        bail!("{}: the index is empty, nothing to export", index.db());
    };
    let (paths, vectors) = index.vectors()?;
    for sub in ["img_emb", "metadata"] {
        let d = a.out.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("{}: cannot create", d.display()))?;
    }
    let per = a.rows_per_file.max(1);
    for (i, chunk) in paths.chunks(per).enumerate() {
        let rows = &vectors[i * per * meta.dim..][..chunk.len() * meta.dim];
        let bytes: Vec<u8> = rows.iter().flat_map(|x| x.to_le_bytes()).collect();
        write_npy(
            &emb_file(&a.out, i),
            Elem::F32,
            &[chunk.len(), meta.dim],
            &bytes,
        )?;
        write_parquet(&meta_file(&a.out, i), chunk.to_vec(), None)?;
    }
    eprintln!(
        "visenc: exported {} embedding(s) of {} ({} dimensions) to {}",
        paths.len(),
        meta.model,
        meta.dim,
        a.out.display()
    );
    Ok(0)
}

/// A float32 or float16 little-endian C-order 2-D `.npy` file: (rows, columns, values).
fn read_npy(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let bad = |why: &str| anyhow::anyhow!("{}: not a usable .npy file: {why}", path.display());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NumPy magic"));
    }
    let (len_at, len_size) = if bytes[6] == 1 { (8, 2) } else { (8, 4) };
    let header_len = bytes[len_at..len_at + len_size]
        .iter()
        .rev()
        .fold(0usize, |n, &b| n << 8 | b as usize);
    let start = len_at + len_size;
    let header = std::str::from_utf8(
        bytes
            .get(start..start + header_len)
            .ok_or_else(|| bad("truncated header"))?,
    )
    .map_err(|_| bad("header is not text"))?;
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order"));
    }
    let elem = if header.contains("'<f4'") {
        4
    } else if header.contains("'<f2'") {
        2
    } else {
        return Err(bad("element type must be float32 or float16"));
    };
    let shape: Vec<usize> = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split(['(', ')']).nth(1))
        .ok_or_else(|| bad("no shape"))?
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_>>()?;
    let [rows, cols] = shape[..] else {
        return Err(bad("expected a 2-D array"));
    };
    let data = &bytes[start + header_len..];
    if data.len() != rows * cols * elem {
        return Err(bad("data size does not match the shape"));
    }
    let values = if elem == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    Ok((rows, cols, values))
}

/// The `image_path` column of a metadata file.
fn read_image_paths(path: &Path) -> Result<Vec<String>> {
    use arrow_array::{Array, LargeStringArray, StringArray};
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: unreadable", path.display()))?;
        let col = batch
            .column_by_name("image_path")
            .with_context(|| format!("{}: no image_path column", path.display()))?;
        let any = col.as_any();
        if let Some(s) = any.downcast_ref::<StringArray>() {
            out.extend((0..s.len()).map(|i| s.value(i).to_string()));
        } else if let Some(s) = any.downcast_ref::<LargeStringArray>() {
            out.extend((0..s.len()).map(|i| s.value(i).to_string()));
        } else {
            bail!("{}: image_path is not a string column", path.display());
        }
    }
    Ok(out)
}

pub fn import(a: ImportArgs) -> Result<usize> {
    if !emb_file(&a.dir, 0).is_file() {
        bail!(
            "{}: not in clip-retrieval's layout ({} is missing)",
            a.dir.display(),
            emb_file(&a.dir, 0).display()
        );
    }
    let index = Index::create(&a.db)?;
    let mut total = 0;
    let mut i = 0;
    while emb_file(&a.dir, i).is_file() {
        let (rows, dim, values) = read_npy(&emb_file(&a.dir, i))?;
        let paths = read_image_paths(&meta_file(&a.dir, i))?;
        if paths.len() != rows {
            bail!(
                "{}: {} rows, but {} has {rows}",
                meta_file(&a.dir, i).display(),
                paths.len(),
                emb_file(&a.dir, i).display()
            );
        }
        index.bind_model(&visenc_index::model_id(&a.model), dim)?;
        let mut entries = Vec::with_capacity(a.commit_every);
        for (path, v) in paths.into_iter().zip(values.chunks(dim.max(1))) {
            // Hash the image when it is here, so that `visenc index` finds it unchanged.
            let (hash, size) = match visenc_index::content_hash(Path::new(&path)) {
                Ok(h) => (h, std::fs::metadata(&path).map_or(0, |m| m.len())),
                Err(_) => (String::new(), 0),
            };
            entries.push(Entry {
                path,
                hash,
                size,
                embedding: v.to_vec(),
            });
            if entries.len() >= a.commit_every.max(1) {
                index.commit(&entries, &[])?;
                total += entries.len();
                entries.clear();
            }
        }
        if !entries.is_empty() {
            index.commit(&entries, &[])?;
            total += entries.len();
        }
        i += 1;
    }
    eprintln!(
        "visenc: imported {total} embedding(s) from {} file pair(s); {} holds {} image(s)",
        i,
        index.db(),
        index.len()?
    );
    Ok(0)
}
