//! Writing embeddings: JSON lines (default, to stdout or a file), NumPy `.npy` (with a `.paths.txt`
//! row index and one `.npy` per requested layer or token set), or Parquet (path + embedding columns,
//! the layout clip-retrieval and pandas read).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use visenc::ImageFeatures;

use crate::batch::vec1;

/// What one output row holds, besides the path.
#[derive(Clone, Copy)]
pub struct Selection {
    pub normalize: bool,
    pub tokens: bool,
    pub features: bool,
}

pub trait Sink {
    fn push(&mut self, path: &Path, f: &ImageFeatures) -> Result<()>;
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Picks the writer from `--out`'s extension; no `--out` means JSON lines on stdout.
pub fn open(out: Option<&Path>, sel: Selection, layers: bool) -> Result<Box<dyn Sink>> {
    let Some(out) = out else {
        return Ok(Box::new(Jsonl { w: BufWriter::new(Box::new(std::io::stdout())), sel }));
    };
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    let create = || File::create(out).with_context(|| format!("{}: cannot create output file", out.display()));
    Ok(match ext.as_str() {
        "jsonl" | "json" | "ndjson" => Box::new(Jsonl { w: BufWriter::new(Box::new(create()?)), sel }),
        "npy" => Box::new(Npy { out: out.to_path_buf(), sel, paths: vec![], embeddings: vec![], dim: 0, extra: vec![] }),
        "parquet" => {
            if layers || sel.tokens || sel.features {
                bail!("--layers, --tokens and --features are written to .jsonl or .npy outputs, not .parquet");
            }
            Box::new(Parquet { out: out.to_path_buf(), sel, paths: vec![], embeddings: vec![], dim: 0 })
        }
        other => bail!("{}: unknown output format {other:?} (use .jsonl, .npy or .parquet)", out.display()),
    })
}

fn embedding(f: &ImageFeatures, sel: Selection) -> Result<Vec<f32>> {
    let e = f.embedding();
    vec1(&if sel.normalize { visenc::l2_normalize(e)? } else { e.clone() })
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.squeeze(0)?.to_dtype(candle_core::DType::F32)?.to_vec2()?)
}

struct Jsonl {
    w: BufWriter<Box<dyn Write>>,
    sel: Selection,
}

/// One JSON line; f32 fields print in their shortest exact form.
#[derive(serde::Serialize)]
struct JsonRecord {
    path: String,
    embedding: Vec<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pooled: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    layers: BTreeMap<i64, Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grid: Option<[usize; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix_tokens: Option<Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_tokens: Option<Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    feature_maps: Vec<JsonMap>,
}

/// A feature map in JSON: its reduction, its [C, H, W] shape and the values in that order.
#[derive(serde::Serialize)]
struct JsonMap {
    reduction: usize,
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Sink for Jsonl {
    fn push(&mut self, path: &Path, f: &ImageFeatures) -> Result<()> {
        let tokens = |t: &Option<Tensor>| -> Result<Option<Vec<Vec<f32>>>> {
            if self.sel.tokens { t.as_ref().map(rows).transpose() } else { Ok(None) }
        };
        let rec = JsonRecord {
            path: path.display().to_string(),
            embedding: embedding(f, self.sel)?,
            pooled: f.projected.as_ref().map(|_| vec1(&f.pooled)).transpose()?,
            layers: f.hidden_states.iter().map(|(k, t)| Ok((*k, rows(t)?))).collect::<Result<_>>()?,
            grid: self.sel.tokens.then_some([f.grid.0, f.grid.1]),
            prefix_tokens: tokens(&f.prefix_tokens)?,
            patch_tokens: tokens(&f.patch_tokens)?,
            feature_maps: f
                .feature_maps
                .iter()
                .map(|m| Ok(JsonMap { reduction: m.reduction, shape: m.map.dims()[1..].to_vec(), data: vec1(&m.map)? }))
                .collect::<Result<_>>()?,
        };
        serde_json::to_writer(&mut self.w, &rec)?;
        self.w.write_all(b"\n")?;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        Ok(self.w.flush()?)
    }
}

/// Writes a little-endian f32 array in NumPy's `.npy` format (version 1.0).
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let pad = 64 - (10 + header.len() + 1) % 64;
    header.push_str(&" ".repeat(pad % 64));
    header.push('\n');
    let mut w = BufWriter::new(File::create(path).with_context(|| format!("{}: cannot create", path.display()))?);
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for v in data {
        w.write_all(&v.to_le_bytes())?;
    }
    Ok(w.flush()?)
}

/// One extra array (a layer or a token set), rows of equal shape across images.
struct Stack {
    suffix: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

struct Npy {
    out: PathBuf,
    sel: Selection,
    paths: Vec<String>,
    embeddings: Vec<f32>,
    dim: usize,
    extra: Vec<Stack>,
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.with_extension("");
    PathBuf::from(format!("{}.{suffix}", stem.display()))
}

impl Npy {
    fn stack(&mut self, suffix: String, t: &Tensor, path: &Path) -> Result<()> {
        let shape = t.dims()[1..].to_vec();
        let data = vec1(t)?;
        match self.extra.iter_mut().find(|s| s.suffix == suffix) {
            Some(s) if s.shape != shape => bail!(
                "{}: {suffix} has shape {shape:?}, earlier images {:?}; .npy needs equal shapes (use .jsonl)",
                path.display(),
                s.shape
            ),
            Some(s) => s.data.extend(data),
            None => self.extra.push(Stack { suffix, shape, data }),
        }
        Ok(())
    }
}

impl Sink for Npy {
    fn push(&mut self, path: &Path, f: &ImageFeatures) -> Result<()> {
        let e = embedding(f, self.sel)?;
        self.dim = e.len();
        self.embeddings.extend(e);
        self.paths.push(path.display().to_string());
        for (k, t) in &f.hidden_states {
            self.stack(format!("layer{k}.npy"), t, path)?;
        }
        for (i, m) in f.feature_maps.iter().enumerate() {
            self.stack(format!("features{i}.npy"), &m.map, path)?;
        }
        if self.sel.tokens {
            if let Some(p) = &f.prefix_tokens {
                self.stack("prefix_tokens.npy".into(), p, path)?;
            }
            if let Some(p) = &f.patch_tokens {
                self.stack("patch_tokens.npy".into(), p, path)?;
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let n = self.paths.len();
        write_npy(&self.out, &[n, self.dim], &self.embeddings)?;
        let index = sibling(&self.out, "paths.txt");
        std::fs::write(&index, self.paths.iter().map(|p| format!("{p}\n")).collect::<String>())
            .with_context(|| format!("{}: cannot write", index.display()))?;
        for s in &self.extra {
            let shape: Vec<usize> = std::iter::once(n).chain(s.shape.iter().copied()).collect();
            write_npy(&sibling(&self.out, &s.suffix), &shape, &s.data)?;
        }
        Ok(())
    }
}

struct Parquet {
    out: PathBuf,
    sel: Selection,
    paths: Vec<String>,
    embeddings: Vec<f32>,
    dim: usize,
}

impl Sink for Parquet {
    fn push(&mut self, path: &Path, f: &ImageFeatures) -> Result<()> {
        let e = embedding(f, self.sel)?;
        self.dim = e.len();
        self.embeddings.extend(e);
        self.paths.push(path.display().to_string());
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
        use arrow_schema::{DataType, Field};
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let values = Arc::new(Float32Array::from(self.embeddings));
        let emb = FixedSizeListArray::try_new(item, self.dim as i32, values, None)?;
        let batch = RecordBatch::try_from_iter([
            ("image_path", Arc::new(StringArray::from(self.paths)) as ArrayRef),
            ("embedding", Arc::new(emb) as ArrayRef),
        ])?;
        let file = File::create(&self.out).with_context(|| format!("{}: cannot create", self.out.display()))?;
        let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
        w.write(&batch)?;
        w.close()?;
        Ok(())
    }
}
