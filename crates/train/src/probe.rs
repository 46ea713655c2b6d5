//! Linear probes: L2-regularised softmax regression on frozen embeddings, the same objective as
//! scikit-learn's `LogisticRegression` (multinomial, `penalty="l2"`, intercept not penalised), minimised to
//! convergence with full-batch L-BFGS; gradients come from candle's autograd. The trained head is a
//! safetensors file (`weight` [C, D], `bias` [C], class names in the metadata) that `visenc classify --head`
//! applies to the same model's embeddings.
// Objective (mean cross-entropy + 0.5 * ||W||^2 / (C * N)):
// https://github.com/scikit-learn/scikit-learn/blob/1.9.1/sklearn/linear_model/_logistic.py#L580
// https://github.com/scikit-learn/scikit-learn/blob/1.9.1/sklearn/linear_model/_linear_loss.py#L50-L62

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{data_err, Result};
use crate::io::{file_err, save_f32};
use crate::lbfgs::{self, Lbfgs, Minimum};

/// Settings of [`fit`].
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// Inverse regularisation strength, scikit-learn's `C` (1.0 there by default).
    pub c: f64,
    pub solver: Lbfgs,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            c: 1.0,
            solver: Lbfgs::default(),
        }
    }
}

/// A trained linear classifier over embeddings.
#[derive(Debug, Clone)]
pub struct LinearHead {
    /// [C, D], f32.
    pub weight: Tensor,
    /// [C], f32.
    pub bias: Tensor,
    pub classes: Vec<String>,
}

/// The format tag stored in a head file's metadata.
pub const HEAD_FORMAT: &str = "visenc-linear-head";

/// Checks that `x` is a non-empty [N, D] matrix with one label per row, every label naming a class, and at
/// least two classes present.
pub fn check_data(x: &Tensor, labels: &[u32], classes: &[String]) -> Result<()> {
    let n = match x.dims() {
        [n, d] if *n > 0 && *d > 0 => *n,
        dims => {
            return Err(data_err(format!(
                "embeddings must be [N, D] with N, D > 0, got {dims:?}"
            )))
        }
    };
    if labels.len() != n {
        return Err(data_err(format!(
            "{n} embeddings but {} labels",
            labels.len()
        )));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes.len()) {
        return Err(data_err(format!(
            "label {bad} but only {} classes",
            classes.len()
        )));
    }
    let mut present: Vec<u32> = labels.to_vec();
    present.sort_unstable();
    present.dedup();
    if present.len() < 2 {
        let only = present
            .first()
            .map_or("none", |&c| classes[c as usize].as_str());
        return Err(data_err(format!(
            "a classifier needs at least two classes; all {n} examples are of class {only:?}"
        )));
    }
    Ok(())
}

/// Fits the head on `x` [N, D] (any float dtype) and `labels` (indices into `classes`). `progress` gets
/// (iteration, objective, largest gradient entry).
pub fn fit(
    x: &Tensor,
    labels: &[u32],
    classes: &[String],
    cfg: &ProbeConfig,
    progress: impl FnMut(usize, f64, f64),
) -> Result<(LinearHead, Minimum)> {
    check_data(x, labels, classes)?;
    if cfg.c <= 0.0 || !cfg.c.is_finite() {
        return Err(data_err(format!(
            "the regularisation C must be positive, got {}",
            cfg.c
        )));
    }
    let (n, d) = x.dims2()?;
    let k = classes.len();
    let dev = Device::Cpu;
    let x = x.to_device(&dev)?.to_dtype(DType::F64)?;
    let y = Tensor::new(labels, &dev)?;
    let l2 = 0.5 / (cfg.c * n as f64);
    let objective = |p: &[f64]| -> Result<(f64, Vec<f64>)> {
        let w = Var::from_tensor(&Tensor::from_slice(&p[..k * d], (k, d), &dev)?)?;
        let b = Var::from_tensor(&Tensor::from_slice(&p[k * d..], k, &dev)?)?;
        let logits = x
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        let ce = candle_nn::loss::cross_entropy(&logits, &y)?;
        let loss = (ce + (w.as_tensor().sqr()?.sum_all()? * l2)?)?;
        let grads = loss.backward()?;
        let grad_of = |v: &Var| -> Result<Vec<f64>> {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| data_err("no gradient"))?;
            Ok(g.flatten_all()?.to_vec1::<f64>()?)
        };
        let mut g = grad_of(&w)?;
        g.extend(grad_of(&b)?);
        Ok((loss.to_scalar::<f64>()?, g))
    };
    let mut params = vec![0.0f64; k * d + k];
    let min = lbfgs::minimize(&mut params, cfg.solver, objective, progress)?;
    let weight = Tensor::from_slice(&params[..k * d], (k, d), &dev)?.to_dtype(DType::F32)?;
    let bias = Tensor::from_slice(&params[k * d..], k, &dev)?.to_dtype(DType::F32)?;
    let head = LinearHead {
        weight,
        bias,
        classes: classes.to_vec(),
    };
    Ok((head, min))
}

impl LinearHead {
    /// Embedding width the head expects.
    pub fn dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Logits [N, C] of embeddings [N, D].
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dims().last().copied().unwrap_or(0);
        if x.rank() != 2 || d != self.dim() {
            return Err(data_err(format!(
                "the head takes {}-d embeddings, got shape {:?}",
                self.dim(),
                x.dims()
            )));
        }
        let w = self.weight.to_device(x.device())?.to_dtype(x.dtype())?;
        let b = self.bias.to_device(x.device())?.to_dtype(x.dtype())?;
        Ok(x.matmul(&w.t()?)?.broadcast_add(&b)?)
    }

    /// Predicted class index of each row.
    pub fn predict(&self, x: &Tensor) -> Result<Vec<u32>> {
        Ok(self.logits(x)?.argmax(1)?.to_vec1::<u32>()?)
    }

    /// Fraction of rows whose prediction equals the label.
    pub fn accuracy(&self, x: &Tensor, labels: &[u32]) -> Result<f64> {
        if labels.is_empty() {
            return Err(data_err("accuracy of an empty set"));
        }
        let pred = self.predict(x)?;
        let right = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
        Ok(right as f64 / labels.len() as f64)
    }

    /// Writes `weight`, `bias` and the metadata (`format`, `classes` as JSON, plus `extra`, e.g. the model).
    pub fn save(&self, path: &Path, extra: &[(&str, String)]) -> Result<()> {
        let mut meta: HashMap<String, String> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        meta.insert("format".into(), HEAD_FORMAT.into());
        meta.insert(
            "classes".into(),
            serde_json::to_string(&self.classes).map_err(|e| file_err(path, e))?,
        );
        save_f32(
            path,
            &[("weight", &self.weight), ("bias", &self.bias)],
            meta,
        )
    }

    /// Reads a head written by [`LinearHead::save`]; returns it with the file's metadata.
    pub fn load(path: &Path) -> Result<(Self, HashMap<String, String>)> {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
        let (_, st_meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| file_err(path, e))?;
        let meta = st_meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(HEAD_FORMAT) {
            return Err(file_err(
                path,
                format!("not a {HEAD_FORMAT} file (no format metadata)"),
            ));
        }
        let classes: Vec<String> = serde_json::from_str(meta.get("classes").map_or("", |s| s))
            .map_err(|e| file_err(path, format!("class names: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let get = |name: &str| {
            tensors
                .get(name)
                .cloned()
                .ok_or_else(|| file_err(path, format!("no `{name}` tensor")))
        };
        let (weight, bias) = (get("weight")?, get("bias")?);
        let ok = matches!((weight.dims(), bias.dims()), ([c, _], [cb]) if *c == classes.len() && *cb == *c);
        if !ok {
            return Err(file_err(
                path,
                format!(
                    "weight {:?} and bias {:?} do not fit {} class names",
                    weight.dims(),
                    bias.dims(),
                    classes.len()
                ),
            ));
        }
        Ok((
            Self {
                weight: weight.to_dtype(DType::F32)?,
                bias: bias.to_dtype(DType::F32)?,
                classes,
            },
            meta,
        ))
    }
}
