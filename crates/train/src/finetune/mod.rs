//! Transfer learning for ViT classifiers (transformers `ViTForImageClassification` / `ViTModel`, timm
//! `vit_*`): train the last N blocks (plus the final norm and the head), or LoRA adapters on the
//! attention projections (plus the head), with cross-entropy and AdamW.
//!
//! The model is rebuilt from its state dict at every step by the same loader inference uses, with the
//! trainable entries being candle `Var`s (LoRA: `W + alpha/r B A`, computed from the `Var`s): no family
//! code is duplicated, gradients flow through whatever the family does at load (e.g. concatenating
//! q/k/v into one projection), and frozen layers, whose tensors are not tracked, keep visenc's fast
//! kernels (see `visenc_models::ops`). The exported result is an ordinary checkpoint (LoRA merged).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use serde_json::{json, Value};
use visenc::weights::{Checkpoint, Layout, LoadPolicy, Weights};
use visenc::EncodeOptions;

use crate::data::SplitMix64;
use crate::error::{data_err, Result, TrainError};
use crate::optim::{AdamW, AdamWConfig};

pub mod run;

/// What is trained besides the classifier head.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Method {
    /// The last `n` transformer blocks and the final norm (`n` = 0: the head alone).
    LastN { n: usize },
    /// LoRA adapters of rank `rank` on the family's attention projections ([`Family::lora_targets`]),
    /// scaled by `alpha / rank`, as peft's `LoraConfig(r, lora_alpha, target_modules)` with no
    /// dropout and `bias="none"`; `A` starts Kaiming-uniform and `B` at zero (peft's default).
    Lora { rank: usize, alpha: f64 },
}

/// Where a layout keeps its blocks, final norms and head.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// Prefix of block `i`'s keys: `{blocks}.{i}.`.
    pub blocks: &'static str,
    /// Modules after the blocks that train with [`Method::LastN`] when present.
    pub post: &'static [&'static str],
    pub head: &'static str,
    /// The linear modules LoRA adapts, relative to a block (peft's `target_modules`).
    pub lora_targets: &'static [&'static str],
}

/// transformers ViT: the separate query/key/value projections and the attention output projection.
pub const HF_VIT: Family = Family {
    blocks: "vit.encoder.layer",
    post: &["vit.layernorm"],
    head: "classifier",
    lora_targets: &[
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
    ],
};

/// timm ViT: the fused `qkv` projection (one adapter over all three, as peft on timm) and `proj`.
pub const TIMM_VIT: Family = Family {
    blocks: "blocks",
    post: &["norm", "fc_norm"],
    head: "head",
    lora_targets: &["attn.qkv", "attn.proj"],
};

fn vx(e: impl Into<visenc::Error>) -> TrainError {
    TrainError::Visenc(e.into())
}

/// One LoRA-adapted linear module: `weight` is replaced by `weight + scale * B @ A`.
struct LoraSite {
    module: String,
    scale: f64,
}

impl LoraSite {
    fn a(&self) -> String {
        format!("{}.lora_A.weight", self.module)
    }
    fn b(&self) -> String {
        format!("{}.lora_B.weight", self.module)
    }
}

/// A classifier being fine-tuned: the frozen state dict, the trainable `Var`s and their optimiser.
pub struct FineTuner {
    /// The checkpoint, its config carrying the new labels.
    ckpt: Checkpoint,
    family: Family,
    frozen: HashMap<String, Tensor>,
    lora: Vec<LoraSite>,
    pub opt: AdamW,
    pub method: Method,
    pub classes: Vec<String>,
    pub num_blocks: usize,
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut SplitMix64) -> f32 {
    let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn uniform_pm(rng: &mut SplitMix64, bound: f64) -> f32 {
    (bound * (2.0 * ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) - 1.0)) as f32
}

/// The class names a checkpoint's head was trained for, if it says.
fn checkpoint_labels(ckpt: &Checkpoint) -> Option<Vec<String>> {
    let cfg = &ckpt.config;
    if let Some(map) = cfg.get("id2label").and_then(Value::as_object) {
        let mut v: Vec<(usize, String)> = map
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
            .collect();
        v.sort();
        return Some(v.into_iter().map(|(_, n)| n).collect());
    }
    let names = cfg
        .get("label_names")
        .or_else(|| cfg.get("pretrained_cfg")?.get("label_names"))?;
    serde_json::from_value(names.clone()).ok()
}

/// Writes `classes` into the config the way the layout's library reads them.
fn set_labels(ckpt: &mut Checkpoint, classes: &[String]) {
    let cfg = &mut ckpt.config;
    match ckpt.layout {
        Layout::Timm => {
            cfg["num_classes"] = json!(classes.len());
            cfg["label_names"] = json!(classes);
            if let Some(p) = cfg.get_mut("pretrained_cfg").and_then(Value::as_object_mut) {
                p.insert("num_classes".into(), json!(classes.len()));
                p.remove("label_names");
            }
            if let Some(a) = cfg.get_mut("model_args").and_then(Value::as_object_mut) {
                a.remove("num_classes");
            }
        }
        _ => {
            cfg["architectures"] = json!(["ViTForImageClassification"]);
            cfg["id2label"] = classes
                .iter()
                .enumerate()
                .map(|(i, c)| (i.to_string(), json!(c)))
                .collect::<serde_json::Map<_, _>>()
                .into();
            cfg["label2id"] = classes
                .iter()
                .enumerate()
                .map(|(i, c)| (c.clone(), json!(i)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
    }
}

impl FineTuner {
    /// Prepares `spec` (a checkpoint directory or hub id) for fine-tuning on `classes`. The head is
    /// kept when the checkpoint's has exactly these classes in this order, else replaced by a new one
    /// drawn N(0, 0.02) with zero bias (transformers' ViT initialisation), seeded by `seed`, as are
    /// the LoRA factors.
    pub fn new(
        spec: &str,
        classes: &[String],
        method: Method,
        cfg: AdamWConfig,
        seed: u64,
    ) -> Result<Self> {
        if classes.len() < 2 {
            return Err(data_err(format!(
                "a classifier needs at least two classes, got {classes:?}"
            )));
        }
        let mut ckpt = Checkpoint::open(spec).map_err(vx)?;
        let unsupported = |what: String| {
            data_err(format!(
                "{spec}: fine-tuning supports transformers ViT and timm vit_* checkpoints, not {what}"
            ))
        };
        let mut tensors: HashMap<String, Tensor> = ckpt
            .load_weights(DType::F32, &Device::Cpu)
            .map_err(vx)?
            .into_tensors()
            .map_err(vx)?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let family = match ckpt.layout {
            Layout::Transformers if ckpt.config["model_type"] == "vit" => {
                // ViTModel keys lack the `vit.` prefix; its pooler is not part of the classifier.
                if !tensors.contains_key("vit.embeddings.cls_token") {
                    tensors = tensors
                        .into_iter()
                        .filter(|(k, _)| !k.starts_with("pooler."))
                        .map(|(k, t)| (format!("vit.{k}"), t))
                        .collect();
                }
                HF_VIT
            }
            Layout::Timm
                if ckpt.config["architecture"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("vit_")) =>
            {
                TIMM_VIT
            }
            Layout::Transformers => {
                return Err(unsupported(format!(
                    "model_type {}",
                    ckpt.config["model_type"]
                )))
            }
            Layout::Timm => {
                return Err(unsupported(format!(
                    "architecture {}",
                    ckpt.config["architecture"]
                )))
            }
            other => return Err(unsupported(format!("the {other:?} layout"))),
        };
        let block_prefix = format!("{}.", family.blocks);
        let num_blocks = tensors
            .keys()
            .filter_map(|k| {
                k.strip_prefix(&block_prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .collect::<BTreeSet<_>>()
            .len();
        let mut rng = SplitMix64(seed);

        // The head: kept if it already classifies these classes, else a new one.
        let (hw, hb) = (
            format!("{}.weight", family.head),
            format!("{}.bias", family.head),
        );
        let same_head = tensors
            .get(&hw)
            .is_some_and(|w| w.dim(0).ok() == Some(classes.len()))
            && checkpoint_labels(&ckpt).as_deref() == Some(classes);
        if !same_head {
            // The width the head reads: the final norm's, else the old head's input.
            let dim = match family
                .post
                .iter()
                .find_map(|p| tensors.get(&format!("{p}.weight")))
            {
                Some(norm) => norm.dim(0)?,
                None => tensors
                    .get(&hw)
                    .ok_or_else(|| {
                        data_err(format!("{spec}: no final norm or head to size a head"))
                    })?
                    .dim(1)?,
            };
            let w: Vec<f32> = (0..classes.len() * dim)
                .map(|_| 0.02 * normal(&mut rng))
                .collect();
            tensors.insert(
                hw.clone(),
                Tensor::from_vec(w, (classes.len(), dim), &Device::Cpu)?,
            );
            tensors.insert(
                hb.clone(),
                Tensor::zeros(classes.len(), DType::F32, &Device::Cpu)?,
            );
        }
        set_labels(&mut ckpt, classes);

        let mut trainable: Vec<(String, Tensor)> = Vec::new();
        let mut take = |tensors: &mut HashMap<String, Tensor>, pred: &dyn Fn(&str) -> bool| {
            let keys: Vec<String> = tensors.keys().filter(|k| pred(k)).cloned().collect();
            for k in keys {
                let t = tensors.remove(&k).expect("listed above");
                trainable.push((k, t));
            }
        };
        let head_prefix = format!("{}.", family.head);
        take(&mut tensors, &|k| k.starts_with(&head_prefix));
        let mut lora = Vec::new();
        match method {
            Method::LastN { n } => {
                if n > num_blocks {
                    return Err(data_err(format!(
                        "--last-n {n}: the model has only {num_blocks} blocks"
                    )));
                }
                let first = num_blocks - n;
                let in_last = |k: &str| {
                    let block = k
                        .strip_prefix(&block_prefix)
                        .and_then(|r| r.split('.').next()?.parse::<usize>().ok());
                    match block {
                        Some(i) => i >= first,
                        None => {
                            n > 0 && family.post.iter().any(|p| k.starts_with(&format!("{p}.")))
                        }
                    }
                };
                take(&mut tensors, &in_last);
            }
            Method::Lora { rank, alpha } => {
                if rank == 0 {
                    return Err(data_err("--lora: the rank must be at least 1"));
                }
                for i in 0..num_blocks {
                    for t in family.lora_targets {
                        let module = format!("{}.{i}.{t}", family.blocks);
                        let w = tensors.get(&format!("{module}.weight")).ok_or_else(|| {
                            data_err(format!("{spec}: no {module}.weight to adapt"))
                        })?;
                        let (out, inp) = w.dims2()?;
                        if rank > out.min(inp) {
                            return Err(data_err(format!(
                                "--lora {rank}: larger than {module} ({out}x{inp})"
                            )));
                        }
                        let site = LoraSite {
                            module,
                            scale: alpha / rank as f64,
                        };
                        // peft: `nn.init.kaiming_uniform_(lora_A, a=sqrt(5))` = U(+-1/sqrt(in)), B = 0.
                        let bound = 1.0 / (inp as f64).sqrt();
                        let a: Vec<f32> = (0..rank * inp)
                            .map(|_| uniform_pm(&mut rng, bound))
                            .collect();
                        trainable.push((site.a(), Tensor::from_vec(a, (rank, inp), &Device::Cpu)?));
                        trainable.push((
                            site.b(),
                            Tensor::zeros((out, rank), DType::F32, &Device::Cpu)?,
                        ));
                        lora.push(site);
                    }
                }
            }
        }
        trainable.sort_by(|a, b| a.0.cmp(&b.0));
        let vars = trainable
            .into_iter()
            .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            ckpt,
            family,
            frozen: tensors,
            lora,
            opt: AdamW::new(vars, cfg)?,
            method,
            classes: classes.to_vec(),
            num_blocks,
        })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// Number of trained values.
    pub fn trainable_parameters(&self) -> usize {
        self.opt.params().iter().map(|p| p.var.elem_count()).sum()
    }

    /// Overwrites a trainable tensor (e.g. LoRA factors from elsewhere); fails on an unknown name or
    /// another shape.
    pub fn set_param(&self, name: &str, value: &Tensor) -> Result<()> {
        let var = self
            .opt
            .param(name)
            .ok_or_else(|| data_err(format!("no trainable tensor {name}")))?;
        if var.dims() != value.dims() {
            return Err(data_err(format!(
                "{name}: shape {:?}, the model's is {:?}",
                value.dims(),
                var.dims()
            )));
        }
        Ok(var.set(&value.to_dtype(DType::F32)?)?)
    }

    /// The whole state dict the model is built from: tracked (gradients flow to the `Var`s) or
    /// detached (inference, export; LoRA merged).
    pub fn state_dict(&self, tracked: bool) -> Result<HashMap<String, Tensor>> {
        let mut map = self.frozen.clone();
        let get = |name: &str| -> Tensor {
            let t = self
                .opt
                .param(name)
                .expect("every LoRA factor is a parameter")
                .as_tensor();
            if tracked {
                t.clone()
            } else {
                t.detach()
            }
        };
        for p in self.opt.params() {
            if !p.name.contains(".lora_") {
                map.insert(p.name.clone(), get(&p.name));
            }
        }
        for s in &self.lora {
            let key = format!("{}.weight", s.module);
            let w = &self.frozen[&key];
            let delta = (get(&s.b()).matmul(&get(&s.a()))? * s.scale)?;
            map.insert(key, (w + delta)?);
        }
        Ok(map)
    }

    /// Classifier logits [B, C] for normalised pixels [B, 3, H, W].
    pub fn logits(&self, pixels: &Tensor, tracked: bool) -> Result<Tensor> {
        let w = Weights::new(
            self.state_dict(tracked)?,
            &self.ckpt.dir,
            DType::F32,
            &Device::Cpu,
        );
        let (model, _) = visenc::models::load(&self.ckpt, &w, LoadPolicy::Strict).map_err(vx)?;
        let f = model
            .image
            .encode(pixels, &EncodeOptions::default())
            .map_err(vx)?;
        f.logits
            .ok_or_else(|| data_err("the rebuilt model has no classifier head"))
    }

    /// Mean cross-entropy of a batch and the gradients of every trainable tensor.
    pub fn loss_and_grads(&self, pixels: &Tensor, labels: &[u32]) -> Result<(f32, GradStore)> {
        let logits = self.logits(pixels, true)?;
        let y = Tensor::new(labels, &Device::Cpu)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let grads = loss.backward()?;
        Ok((loss.to_scalar::<f32>()?, grads))
    }

    /// The gradient of trainable tensor `name` in `grads`.
    pub fn grad(&self, grads: &GradStore, name: &str) -> Option<Tensor> {
        grads.get(self.opt.param(name)?.as_tensor()).cloned()
    }

    /// One AdamW step on a batch at learning rate `lr`; returns the batch loss.
    pub fn step(&mut self, pixels: &Tensor, labels: &[u32], lr: f64) -> Result<f32> {
        let (loss, grads) = self.loss_and_grads(pixels, labels)?;
        self.opt.step(&grads, lr)?;
        Ok(loss)
    }

    /// Writes the trained model as an ordinary checkpoint directory (config with the new labels,
    /// `model.safetensors` with LoRA merged, the preprocessing config) that every command loads.
    pub fn export(&self, dir: &Path) -> Result<()> {
        let err = |p: &Path, e: std::io::Error| TrainError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        let cfg = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.ckpt.config).expect("JSON values serialise");
        std::fs::write(&cfg, text).map_err(|e| err(&cfg, e))?;
        if let Some(p) = &self.ckpt.preprocessor {
            let path = dir.join("preprocessor_config.json");
            let text = serde_json::to_string_pretty(p).expect("JSON values serialise");
            std::fs::write(&path, text).map_err(|e| err(&path, e))?;
        }
        let map = self.state_dict(false)?;
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        let tensors: Vec<(&str, &Tensor)> = names.iter().map(|k| (k.as_str(), &map[*k])).collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        crate::io::save_f32(&dir.join("model.safetensors"), &tensors, meta)
    }
}
