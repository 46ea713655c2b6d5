//! Weight storage with a strict load report.
//!
//! Every tensor a model asks for is recorded. Missing tensors, tensors of the wrong shape and tensors
//! the checkpoint holds that no module used are all collected (not only the first), so a user sees the
//! whole mismatch at once. [`Weights::finish`] turns the report into an error unless the caller chose
//! [`LoadPolicy::AllowMismatch`], in which case missing tensors stay zero-filled (like PyTorch's
//! `strict=False` leaves them at their initialisation).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};

use visenc_kernels::Precision;

use crate::error::WeightsError;
use crate::lazy::LazyTensor;

/// A checkpoint tensor: in memory, or still in its safetensors file (read when a model takes it).
enum Stored {
    Memory(Tensor),
    File(LazyTensor),
}

impl Stored {
    fn dims(&self) -> &[usize] {
        match self {
            Self::Memory(t) => t.dims(),
            Self::File(t) => t.dims(),
        }
    }
}

/// What to do when the checkpoint and the model disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadPolicy {
    /// Fail on missing, unexpected or mis-shaped tensors (the default).
    #[default]
    Strict,
    /// Report them but go on: missing tensors are zero, unexpected ones are ignored.
    AllowMismatch,
}

/// Everything that did not line up between the checkpoint and the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// (name, shape the model expects, shape in the checkpoint)
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list(f: &mut fmt::Formatter<'_>, what: &str, items: &[String]) -> fmt::Result {
            if items.is_empty() {
                return Ok(());
            }
            const SHOWN: usize = 20;
            write!(f, "\n  {} {what}: ", items.len())?;
            write!(
                f,
                "{}",
                items
                    .iter()
                    .take(SHOWN)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
            if items.len() > SHOWN {
                write!(f, ", ... ({} more)", items.len() - SHOWN)?;
            }
            Ok(())
        }
        list(f, "missing", &self.missing)?;
        list(f, "unexpected", &self.unexpected)?;
        let mis: Vec<String> = self
            .mismatched
            .iter()
            .map(|(n, want, got)| format!("{n} (model {want:?}, checkpoint {got:?})"))
            .collect();
        list(f, "mis-shaped", &mis)
    }
}

/// Tensors of one checkpoint, converted to the model's dtype on the model's device.
pub struct Weights {
    tensors: HashMap<String, Stored>,
    source: PathBuf,
    dtype: DType,
    device: Device,
    /// What the model's linear layers compute in; they pack their weights for it as they load.
    precision: Precision,
    used: RefCell<BTreeSet<String>>,
    ignored: RefCell<BTreeSet<String>>,
    missing: RefCell<BTreeSet<String>>,
    /// Per key, the shape the model asked for and the shape the checkpoint has.
    mismatched: RefCell<BTreeMap<String, Shapes>>,
}

/// An expected shape and the one found.
type Shapes = (Vec<usize>, Vec<usize>);

impl Weights {
    /// Builds from tensors already in memory; `source` names them in errors.
    pub fn new(
        tensors: HashMap<String, Tensor>,
        source: impl Into<PathBuf>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| (k, Stored::Memory(t)))
            .collect();
        Self::with_stored(tensors, source.into(), dtype, device)
    }

    /// Builds from tensors in memory and tensors still in safetensors files (read one at a time as
    /// the model takes them, so loading holds no second copy of the weights).
    pub(crate) fn from_parts(
        memory: HashMap<String, Tensor>,
        files: HashMap<String, LazyTensor>,
        source: PathBuf,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let tensors = memory
            .into_iter()
            .map(|(k, t)| (k, Stored::Memory(t)))
            .chain(files.into_iter().map(|(k, t)| (k, Stored::File(t))))
            .collect();
        Self::with_stored(tensors, source, dtype, device)
    }

    fn with_stored(
        tensors: HashMap<String, Stored>,
        source: PathBuf,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            tensors,
            source,
            dtype,
            device: device.clone(),
            precision: Precision::F32,
            used: RefCell::default(),
            ignored: RefCell::default(),
            missing: RefCell::default(),
            mismatched: RefCell::default(),
        }
    }

    /// Every tensor, read now, in its stored dtype: the state dict, for callers that build models
    /// from an edited copy of it (fine-tuning).
    pub fn into_tensors(self) -> Result<HashMap<String, Tensor>, WeightsError> {
        self.tensors
            .into_iter()
            .map(|(name, t)| {
                let t = match t {
                    Stored::Memory(t) => t,
                    Stored::File(t) => t.load(&name, &self.device)?,
                };
                Ok((name, t))
            })
            .collect()
    }

    /// Where the tensors came from (a file or a directory).
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Sets the precision the model's linear layers are loaded for (f32 by default).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// All tensor names in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The checkpoint's shape of a tensor, without marking it used.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }

    /// A scope whose names are prefixed with `prefix.`.
    pub fn pp(&self, prefix: impl fmt::Display) -> Scope<'_> {
        Scope {
            w: self,
            prefix: prefix.to_string(),
        }
    }

    /// The root scope.
    pub fn root(&self) -> Scope<'_> {
        Scope {
            w: self,
            prefix: String::new(),
        }
    }

    /// Marks tensors that the reference keeps but never uses in inference (e.g. DINOv2's
    /// `mask_token`, old CLIP `position_ids` buffers) so they are not reported as unexpected.
    pub fn ignore(&self, name: &str) {
        if self.tensors.contains_key(name) {
            self.ignored.borrow_mut().insert(name.to_string());
        }
    }

    fn fetch(&self, name: &str, shape: Option<&Shape>) -> Result<Option<Tensor>, WeightsError> {
        let Some(t) = self.tensors.get(name) else {
            return Ok(None);
        };
        self.used.borrow_mut().insert(name.to_string());
        if let Some(shape) = shape {
            if t.dims() != shape.dims() {
                self.mismatched
                    .borrow_mut()
                    .insert(name.to_string(), (shape.dims().to_vec(), t.dims().to_vec()));
                return Ok(Some(Tensor::zeros(shape, self.dtype, &self.device)?));
            }
        }
        let t = match t {
            Stored::Memory(t) => t.to_dtype(self.dtype)?,
            Stored::File(t) => t.load(name, &self.device)?.to_dtype(self.dtype)?,
        };
        Ok(Some(t))
    }

    /// Number of parameters in the tensors the model used.
    pub fn used_parameters(&self) -> usize {
        let used = self.used.borrow();
        self.tensors
            .iter()
            .filter(|(k, _)| used.contains(*k))
            .map(|(_, t)| t.dims().iter().product::<usize>())
            .sum()
    }

    /// The report of everything that did not line up so far.
    pub fn report(&self) -> LoadReport {
        let used = self.used.borrow();
        let ignored = self.ignored.borrow();
        let mut unexpected: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k) && !ignored.contains(*k))
            .cloned()
            .collect();
        unexpected.sort();
        LoadReport {
            missing: self.missing.borrow().iter().cloned().collect(),
            unexpected,
            mismatched: self
                .mismatched
                .borrow()
                .iter()
                .map(|(n, (a, b))| (n.clone(), a.clone(), b.clone()))
                .collect(),
        }
    }

    /// Ends loading: under [`LoadPolicy::Strict`] any mismatch is an error naming every tensor.
    pub fn finish(&self, policy: LoadPolicy) -> Result<LoadReport, WeightsError> {
        let report = self.report();
        if policy == LoadPolicy::Strict && !report.is_clean() {
            return Err(WeightsError::Mismatch {
                source_path: self.source.clone(),
                report,
            });
        }
        Ok(report)
    }
}

/// A prefix into [`Weights`], like candle's `VarBuilder::pp`, so model code spells the
/// reference's state-dict keys.
#[derive(Clone)]
pub struct Scope<'a> {
    w: &'a Weights,
    prefix: String,
}

impl<'a> Scope<'a> {
    pub fn pp(&self, name: impl fmt::Display) -> Scope<'a> {
        Scope {
            w: self.w,
            prefix: self.path(&name.to_string()),
        }
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else if name.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn weights(&self) -> &'a Weights {
        self.w
    }

    pub fn device(&self) -> &Device {
        &self.w.device
    }

    /// The precision linear layers under this scope are loaded for.
    pub fn precision(&self) -> Precision {
        self.w.precision
    }

    pub fn contains(&self, name: &str) -> bool {
        self.w.contains(&self.path(name))
    }

    /// The checkpoint's shape of `name`, if present (does not mark it used).
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.w.shape_of(&self.path(name))
    }

    /// A required tensor of a known shape. When it is missing or mis-shaped the problem is recorded
    /// for the load report and a zero tensor of the right shape stands in.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor, WeightsError> {
        let shape = shape.into();
        let full = self.path(name);
        match self.w.fetch(&full, Some(&shape))? {
            Some(t) => Ok(t),
            None => {
                self.w.missing.borrow_mut().insert(full);
                Ok(Tensor::zeros(shape, self.w.dtype, &self.w.device)?)
            }
        }
    }

    /// A required tensor whose shape the checkpoint decides (shape checks happen at use).
    pub fn get_any(&self, name: &str) -> Result<Option<Tensor>, WeightsError> {
        let full = self.path(name);
        let t = self.w.fetch(&full, None)?;
        if t.is_none() {
            self.w.missing.borrow_mut().insert(full);
        }
        Ok(t)
    }

    /// An optional tensor (e.g. a bias some checkpoints omit): absent is not an error.
    pub fn get_opt(
        &self,
        shape: impl Into<Shape>,
        name: &str,
    ) -> Result<Option<Tensor>, WeightsError> {
        self.w.fetch(&self.path(name), Some(&shape.into()))
    }

    /// Marks `name` as deliberately unused.
    pub fn ignore(&self, name: &str) {
        self.w.ignore(&self.path(name));
    }
}
