//! AdamW with its state in the open (step count, first and second moments per parameter) so a run can
//! be checkpointed and resumed exactly, and the cosine learning-rate schedule with linear warmup.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use serde_json::{json, Value};

use crate::error::{data_err, Result};
use crate::io::file_err;

/// Metadata key of a state file: `{"step": N, "settings": {...}}`.
const STATE_META: &str = "visenc_train_state";

/// AdamW hyper-parameters; the defaults are `torch.optim.AdamW`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied only to parameters of rank >= 2 (weights, LoRA factors); biases,
    /// norms and tokens are not decayed, as in timm's and the transformers Trainer's parameter groups.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One trainable tensor and its moments.
pub struct Param {
    pub name: String,
    pub var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named parameters.
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Optimisation steps taken so far.
    pub step: u64,
    params: Vec<Param>,
}

impl AdamW {
    /// Zero moments, step 0.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                let z = var.as_tensor().zeros_like()?;
                Ok(Param {
                    name,
                    m: z.clone(),
                    v: z,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            step: 0,
            params,
        })
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn param(&self, name: &str) -> Option<&Var> {
        self.params.iter().find(|p| p.name == name).map(|p| &p.var)
    }

    /// One step with learning rate `lr`; a parameter without a gradient (unused by the loss) keeps
    /// its value and moments, as in PyTorch.
    // Reference: https://github.com/pytorch/pytorch/blob/v2.15.0/torch/optim/adam.py#L420-L536
    // (`_single_tensor_adam` with `decoupled_weight_decay`, the AdamW path)
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let w = p.var.as_tensor().detach();
            let decay = if p.var.rank() >= 2 {
                c.weight_decay
            } else {
                0.0
            };
            let w = (w * (1.0 - lr * decay))?;
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((p.v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let w = (w - (p.m.div(&denom)? * (lr / bc1))?)?;
            p.var.set(&w)?;
        }
        Ok(())
    }

    /// Writes a resumable state to `path`: every parameter (`param.{name}`), its moments
    /// (`adamw_m.{name}`, `adamw_v.{name}`) and, in the metadata, the step and the run's `settings`
    /// (whatever a resumed run must share: data, schedule, seeds...). Written beside and renamed, so an
    /// interrupted write never leaves a broken state behind.
    pub fn save(&self, settings: &Value, path: &Path) -> Result<()> {
        let mut owned: Vec<(String, Tensor)> = Vec::new();
        for p in &self.params {
            owned.push((format!("param.{}", p.name), p.var.as_tensor().detach()));
            owned.push((format!("adamw_m.{}", p.name), p.m.clone()));
            owned.push((format!("adamw_v.{}", p.name), p.v.clone()));
        }
        let refs: Vec<(&str, &Tensor)> = owned.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let meta = json!({ "step": self.step, "settings": settings });
        let meta = HashMap::from([(STATE_META.to_string(), meta.to_string())]);
        let tmp = path.with_extension("safetensors.tmp");
        crate::io::save_f32(&tmp, &refs, meta)?;
        std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
    }

    /// Restores a state written by [`Self::save`] after checking that it was written with `settings`
    /// (a difference is named, field by field); returns the step it stopped at.
    pub fn load(&mut self, settings: &Value, path: &Path) -> Result<u64> {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
        let (_, st) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| file_err(path, e))?;
        let meta: Value = st
            .metadata()
            .as_ref()
            .and_then(|m| m.get(STATE_META))
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| file_err(path, "not a visenc training state (no metadata)"))?;
        let stored = &meta["settings"];
        if stored != settings {
            let diff: Vec<String> = settings
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| stored.get(k.as_str()) != Some(v))
                .map(|(k, v)| format!("{k}: {} in the checkpoint, {v} now", stored[k.as_str()]))
                .collect();
            return Err(file_err(
                path,
                format!("cannot resume with other settings ({})", diff.join("; ")),
            ));
        }
        let step = meta["step"]
            .as_u64()
            .ok_or_else(|| file_err(path, "no step in the metadata"))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| file_err(path, e))?;
        self.restore(step, |name| {
            Some((
                tensors.get(&format!("param.{name}"))?.clone(),
                tensors.get(&format!("adamw_m.{name}"))?.clone(),
                tensors.get(&format!("adamw_v.{name}"))?.clone(),
            ))
        })
        .map_err(|e| file_err(path, e))?;
        Ok(step)
    }

    /// Restores a state: `get(name)` gives the stored (value, m, v) of each parameter.
    fn restore(
        &mut self,
        step: u64,
        mut get: impl FnMut(&str) -> Option<(Tensor, Tensor, Tensor)>,
    ) -> Result<()> {
        for p in &mut self.params {
            let (w, m, v) = get(&p.name).ok_or_else(|| {
                data_err(format!(
                    "the checkpoint has no state for parameter {} (written for another model or method?)",
                    p.name
                ))
            })?;
            for (what, t) in [("value", &w), ("m", &m), ("v", &v)] {
                if t.dims() != p.var.dims() {
                    return Err(data_err(format!(
                        "checkpoint {what} of {} has shape {:?}, the model's is {:?}",
                        p.name,
                        t.dims(),
                        p.var.dims()
                    )));
                }
            }
            p.var.set(&w)?;
            p.m = m;
            p.v = v;
        }
        self.step = step;
        Ok(())
    }
}

/// Cosine decay to zero after a linear warmup, as transformers' `get_cosine_schedule_with_warmup`
/// (one half cosine): the learning rate of step `s` (0-based, the number of steps already taken).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    pub base_lr: f64,
    pub warmup: u64,
    pub total: u64,
}

impl CosineSchedule {
    // Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/optimization.py#L134-L140
    pub fn lr(&self, step: u64) -> f64 {
        let factor = if step < self.warmup {
            step as f64 / self.warmup.max(1) as f64
        } else {
            let progress = (step - self.warmup) as f64
                / (self.total.saturating_sub(self.warmup)).max(1) as f64;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schedule's shape: zero at step 0 with warmup, linear up to the base rate, half at the
    /// middle of the decay, zero at the end (transformers' formula evaluated by hand).
    #[test]
    fn cosine_schedule_with_warmup() {
        let s = CosineSchedule {
            base_lr: 2.0,
            warmup: 4,
            total: 14,
        };
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(2), 1.0);
        assert_eq!(s.lr(4), 2.0);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!(s.lr(14).abs() < 1e-12);
        let flat = CosineSchedule { warmup: 0, ..s };
        assert_eq!(flat.lr(0), 2.0);
    }
}
