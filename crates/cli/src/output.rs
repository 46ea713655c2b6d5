//! Writing embeddings: JSON lines (default, to stdout or a file), NumPy `.npy` (with a `.paths.txt`
//! row index and one `.npy` per requested layer, token set, feature map or latent), one `.safetensors`
//! file with all of them, or Parquet (path + embedding columns, the layout clip-retrieval and pandas read).

use std::collections::{BTreeMap, HashMap};
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
        return Ok(Box::new(Jsonl {
            w: BufWriter::new(Box::new(std::io::stdout())),
            sel,
        }));
    };
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let create = || {
        File::create(out).with_context(|| format!("{}: cannot create output file", out.display()))
    };
    Ok(match ext.as_str() {
        "jsonl" | "json" | "ndjson" => Box::new(Jsonl {
            w: BufWriter::new(Box::new(create()?)),
            sel,
        }),
        "npy" => Box::new(Npy {
            out: out.to_path_buf(),
            sel,
            arrays: Arrays::default(),
        }),
        "safetensors" => Box::new(SafetensorsOut {
            out: out.to_path_buf(),
            sel,
            arrays: Arrays::default(),
            meta: HashMap::new(),
        }),
        "parquet" => {
            if layers || sel.tokens || sel.features {
                bail!("--layers, --tokens and --features are written to .jsonl or .npy outputs, not .parquet");
            }
            Box::new(Parquet {
                out: out.to_path_buf(),
                sel,
                paths: vec![],
                embeddings: vec![],
                dim: 0,
            })
        }
        other => bail!(
            "{}: unknown output format {other:?} (use .jsonl, .npy, .safetensors or .parquet)",
            out.display()
        ),
    })
}

fn embedding(f: &ImageFeatures, sel: Selection) -> Result<Vec<f32>> {
    let e = f.embedding();
    vec1(&if sel.normalize {
        visenc::l2_normalize(e)?
    } else {
        e.clone()
    })
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
    #[serde(skip_serializing_if = "Option::is_none")]
    latents: Option<JsonLatents>,
}

/// A generative encoder's latents in JSON: [C, h, w] values in that order, and for VQ models the
/// codebook ids as a row-major token sequence over the [h, w] grid.
#[derive(serde::Serialize)]
struct JsonLatents {
    shape: Vec<usize>,
    mean: Vec<f32>,
    scaling_factor: f32,
    shift_factor: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    codes: Option<Vec<u32>>,
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
            if self.sel.tokens {
                t.as_ref().map(rows).transpose()
            } else {
                Ok(None)
            }
        };
        let rec = JsonRecord {
            path: path.display().to_string(),
            embedding: embedding(f, self.sel)?,
            pooled: f.projected.as_ref().map(|_| vec1(&f.pooled)).transpose()?,
            layers: f
                .hidden_states
                .iter()
                .map(|(k, t)| Ok((*k, rows(t)?)))
                .collect::<Result<_>>()?,
            grid: self.sel.tokens.then_some([f.grid.0, f.grid.1]),
            prefix_tokens: tokens(&f.prefix_tokens)?,
            patch_tokens: tokens(&f.patch_tokens)?,
            feature_maps: f
                .feature_maps
                .iter()
                .map(|m| {
                    Ok(JsonMap {
                        reduction: m.reduction,
                        shape: m.map.dims()[1..].to_vec(),
                        data: vec1(&m.map)?,
                    })
                })
                .collect::<Result<_>>()?,
            latents: f
                .latents
                .as_ref()
                .map(|l| -> Result<JsonLatents> {
                    Ok(JsonLatents {
                        shape: l.mean.dims()[1..].to_vec(),
                        mean: vec1(&l.mean)?,
                        scaling_factor: l.scaling_factor,
                        shift_factor: l.shift_factor,
                        codes: l
                            .codes
                            .as_ref()
                            .map(|c| c.flatten_all()?.to_vec1::<u32>())
                            .transpose()?,
                    })
                })
                .transpose()?,
        };
        serde_json::to_writer(&mut self.w, &rec)?;
        self.w.write_all(b"\n")?;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        Ok(self.w.flush()?)
    }
}

/// Element types of the arrays visenc writes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Elem {
    F32,
    U32,
}

impl Elem {
    fn npy_descr(self) -> &'static str {
        match self {
            Elem::F32 => "<f4",
            Elem::U32 => "<u4",
        }
    }

    fn safetensors(self) -> safetensors::Dtype {
        match self {
            Elem::F32 => safetensors::Dtype::F32,
            Elem::U32 => safetensors::Dtype::U32,
        }
    }
}

/// Writes a little-endian array in NumPy's `.npy` format (version 1.0).
pub fn write_npy(path: &Path, elem: Elem, shape: &[usize], data: &[u8]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        elem.npy_descr()
    );
    // magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let pad = 64 - (10 + header.len() + 1) % 64;
    header.push_str(&" ".repeat(pad % 64));
    header.push('\n');
    let mut w = BufWriter::new(
        File::create(path).with_context(|| format!("{}: cannot create", path.display()))?,
    );
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    w.write_all(data)?;
    Ok(w.flush()?)
}

/// One output array: a row per image, rows of equal shape, stored little-endian.
struct Array {
    name: String,
    elem: Elem,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Everything an image contributes to the array outputs (.npy, .safetensors), in a fixed order:
/// `embedding`, `layer{k}`, `features{i}`, `prefix_tokens`, `patch_tokens`, `latent_mean`,
/// `latent_logvar`, `codes`, `quantized`.
#[derive(Default)]
struct Arrays {
    paths: Vec<String>,
    arrays: Vec<Array>,
}

impl Arrays {
    fn add(&mut self, name: String, t: &Tensor, path: &Path) -> Result<()> {
        let shape = t.dims()[1..].to_vec();
        let (elem, data): (Elem, Vec<u8>) = if t.dtype() == candle_core::DType::U32 {
            (
                Elem::U32,
                t.flatten_all()?
                    .to_vec1::<u32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            )
        } else {
            (
                Elem::F32,
                vec1(t)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        };
        match self.arrays.iter_mut().find(|a| a.name == name) {
            Some(a) if a.shape != shape => bail!(
                "{}: {name} has shape {shape:?}, earlier images {:?}; array outputs need equal shapes (use .jsonl)",
                path.display(),
                a.shape
            ),
            Some(a) => a.data.extend(data),
            None => self.arrays.push(Array { name, elem, shape, data }),
        }
        Ok(())
    }

    fn push(&mut self, path: &Path, f: &ImageFeatures, sel: Selection) -> Result<()> {
        let e = embedding(f, sel)?;
        let n = e.len();
        self.add(
            "embedding".into(),
            &Tensor::from_vec(e, (1, n), &candle_core::Device::Cpu)?,
            path,
        )?;
        for (k, t) in &f.hidden_states {
            self.add(format!("layer{k}"), t, path)?;
        }
        for (i, m) in f.feature_maps.iter().enumerate() {
            self.add(format!("features{i}"), &m.map, path)?;
        }
        if sel.tokens {
            for (name, t) in [
                ("prefix_tokens", &f.prefix_tokens),
                ("patch_tokens", &f.patch_tokens),
            ] {
                if let Some(t) = t {
                    self.add(name.into(), t, path)?;
                }
            }
        }
        if let Some(l) = &f.latents {
            self.add("latent_mean".into(), &l.mean, path)?;
            for (name, t) in [
                ("latent_logvar", &l.logvar),
                ("codes", &l.codes),
                ("quantized", &l.quantized),
            ] {
                if let Some(t) = t {
                    self.add(name.into(), t, path)?;
                }
            }
        }
        self.paths.push(path.display().to_string());
        Ok(())
    }

    fn full_shape(&self, a: &Array) -> Vec<usize> {
        std::iter::once(self.paths.len())
            .chain(a.shape.iter().copied())
            .collect()
    }
}

/// `out.npy` holds the embeddings, `out.paths.txt` the row order, and `out.<name>.npy` each other array.
struct Npy {
    out: PathBuf,
    sel: Selection,
    arrays: Arrays,
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.with_extension("");
    PathBuf::from(format!("{}.{suffix}", stem.display()))
}

impl Sink for Npy {
    fn push(&mut self, path: &Path, f: &ImageFeatures) -> Result<()> {
        self.arrays.push(path, f, self.sel)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let index = sibling(&self.out, "paths.txt");
        std::fs::write(
            &index,
            self.arrays
                .paths
                .iter()
                .map(|p| format!("{p}\n"))
                .collect::<String>(),
        )
        .with_context(|| format!("{}: cannot write", index.display()))?;
        if self.arrays.paths.is_empty() {
            return write_npy(&self.out, Elem::F32, &[0, 0], &[]);
        }
        for a in &self.arrays.arrays {
            let file = if a.name == "embedding" {
                self.out.clone()
            } else {
                sibling(&self.out, &format!("{}.npy", a.name))
            };
            write_npy(&file, a.elem, &self.arrays.full_shape(a), &a.data)?;
        }
        Ok(())
    }
}

/// One `.safetensors` file with every array, the row order in the `paths` metadata (a JSON list),
/// and the latent scaling factors where the model has them.
struct SafetensorsOut {
    out: PathBuf,
    sel: Selection,
    arrays: Arrays,
    meta: HashMap<String, String>,
}

impl Sink for SafetensorsOut {
    fn push(&mut self, path: &Path, f: &ImageFeatures) -> Result<()> {
        if let Some(l) = &f.latents {
            self.meta
                .insert("scaling_factor".into(), l.scaling_factor.to_string());
            self.meta
                .insert("shift_factor".into(), l.shift_factor.to_string());
        }
        self.arrays.push(path, f, self.sel)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.meta
            .insert("paths".into(), serde_json::to_string(&self.arrays.paths)?);
        let views: Vec<(String, safetensors::tensor::TensorView)> = self
            .arrays
            .arrays
            .iter()
            .map(|a| {
                Ok((
                    a.name.clone(),
                    safetensors::tensor::TensorView::new(
                        a.elem.safetensors(),
                        self.arrays.full_shape(a),
                        &a.data,
                    )?,
                ))
            })
            .collect::<Result<_>>()?;
        safetensors::serialize_to_file(views, Some(self.meta), &self.out)
            .with_context(|| format!("{}: cannot write", self.out.display()))?;
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
        write_parquet(&self.out, self.paths, Some((self.embeddings, self.dim)))
    }
}

/// A Parquet file with an `image_path` column and, if given, an `embedding` column of
/// fixed-size f32 lists (row-major `values`, `dim` wide): the layout clip-retrieval and pandas read.
pub fn write_parquet(
    out: &Path,
    paths: Vec<String>,
    embedding: Option<(Vec<f32>, usize)>,
) -> Result<()> {
    use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field};
    let mut columns = vec![("image_path", Arc::new(StringArray::from(paths)) as ArrayRef)];
    if let Some((values, dim)) = embedding {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let values = Arc::new(Float32Array::from(values));
        let emb = FixedSizeListArray::try_new(item, dim as i32, values, None)?;
        columns.push(("embedding", Arc::new(emb) as ArrayRef));
    }
    let batch = RecordBatch::try_from_iter(columns)?;
    let file = File::create(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}
