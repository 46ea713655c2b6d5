//! What a model specification names: a local directory (or a file inside one) in one of the published
//! layouts, or a Hugging Face hub id.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::WeightsError;
use crate::store::Weights;

/// How the files of a checkpoint are laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Hugging Face transformers: `config.json` with `model_type`, `model.safetensors` (or shards).
    Transformers,
    /// open_clip: `open_clip_config.json` + `open_clip_model.safetensors`.
    OpenClip,
    /// timm on the hub: `config.json` with `architecture` and `pretrained_cfg`, `model.safetensors`.
    Timm,
    /// diffusers: `config.json` with `_class_name` (e.g. `AutoencoderKL`),
    /// `diffusion_pytorch_model.safetensors` (or shards).
    Diffusers,
    /// A weights file on its own (`.safetensors`, `.pth`, ...) with no config beside it; the model
    /// is recognised from its tensor names and shapes (`config` is null).
    Bare,
    /// visenc's image-text pair of two checkpoints: `config.json` with `model_type` `visenc_two_tower`
    /// naming the towers, and `projection.safetensors` (see [`crate::TwoTowerConfig`]).
    TwoTower,
}

/// Extensions of files that hold weights.
const WEIGHT_EXTENSIONS: &[&str] = &["safetensors", "pth", "pt", "bin"];

fn is_weights_file(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The only `.pth`/`.pt` file of a directory, if there is exactly one (PyTorch ports ship one).
fn single_pickle(dir: &Path) -> Option<PathBuf> {
    let mut found = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "pth" || e == "pt")
        });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// A located checkpoint: its directory, layout, parsed configs and weight files.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// What the user asked for (a path or a hub id).
    pub spec: String,
    pub dir: PathBuf,
    pub layout: Layout,
    /// `config.json`, or `open_clip_config.json` for [`Layout::OpenClip`].
    pub config: Value,
    pub config_path: PathBuf,
    /// HF `preprocessor_config.json`, if present.
    pub preprocessor: Option<Value>,
    /// `tokenizer.json`, if present.
    pub tokenizer_file: Option<PathBuf>,
    /// `tokenizer_config.json` merged over `special_tokens_map.json`, if present.
    pub tokenizer_config: Option<Value>,
    pub weight_files: Vec<PathBuf>,
}

fn read_json(path: &Path) -> Result<Value, WeightsError> {
    let text = std::fs::read_to_string(path).map_err(|e| WeightsError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| WeightsError::Config {
        path: path.to_path_buf(),
        what: "JSON",
        reason: e.to_string(),
    })
}

fn read_json_opt(path: &Path) -> Result<Option<Value>, WeightsError> {
    path.is_file().then(|| read_json(path)).transpose()
}

/// The shard file names listed by a `model.safetensors.index.json`.
pub(crate) fn shard_files(index: &Path) -> Result<Vec<String>, WeightsError> {
    let v = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| WeightsError::Config {
            path: index.to_path_buf(),
            what: "safetensors index",
            reason: "no `weight_map` object".into(),
        })?;
    let files: BTreeSet<String> = map
        .values()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    Ok(files.into_iter().collect())
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

impl Checkpoint {
    /// Opens a local directory, a file inside a checkpoint directory, or a hub id such as
    /// `openai/clip-vit-base-patch32` (downloaded into the hub cache, or taken from it offline).
    ///
    /// A weights file (`.safetensors`, `.pth`, `.pt`, `.bin`) is used as the checkpoint's weights,
    /// with the config beside it, or on its own ([`Layout::Bare`]) when there is none.
    pub fn open(spec: &str) -> Result<Self, WeightsError> {
        let path = Path::new(spec);
        if path.exists() {
            let dir = if path.is_file() {
                path.parent().unwrap_or(Path::new("."))
            } else {
                path
            };
            if !is_weights_file(path) {
                return Self::from_dir(spec, dir);
            }
            let has_config =
                dir.join("config.json").is_file() || dir.join("open_clip_config.json").is_file();
            if !has_config {
                return Ok(Self {
                    spec: spec.to_string(),
                    dir: dir.to_path_buf(),
                    layout: Layout::Bare,
                    config: Value::Null,
                    config_path: path.to_path_buf(),
                    preprocessor: None,
                    tokenizer_file: None,
                    tokenizer_config: None,
                    weight_files: vec![path.to_path_buf()],
                });
            }
            return Self::read_dir(spec, dir, Some(path));
        }
        if !looks_like_hub_id(spec) {
            return Err(WeightsError::NotFound {
                spec: spec.to_string(),
                reason: "no such file or directory, and not a hub id (owner/name)".into(),
            });
        }
        let dir = crate::hub::fetch(spec)?;
        Self::from_dir(spec, &dir)
    }

    /// Reads a checkpoint directory and decides its layout.
    pub fn from_dir(spec: &str, dir: &Path) -> Result<Self, WeightsError> {
        Self::read_dir(spec, dir, None)
    }

    /// [`Self::from_dir`], with the weights taken from `weights_file` when given.
    fn read_dir(spec: &str, dir: &Path, weights_file: Option<&Path>) -> Result<Self, WeightsError> {
        let not_found = |reason: String| WeightsError::NotFound {
            spec: spec.to_string(),
            reason,
        };
        let open_clip_cfg = dir.join("open_clip_config.json");
        let hf_cfg = dir.join("config.json");
        let tokenizer_file = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
        let tokenizer_config = match (
            read_json_opt(&dir.join("special_tokens_map.json"))?,
            read_json_opt(&dir.join("tokenizer_config.json"))?,
        ) {
            (Some(Value::Object(mut a)), Some(Value::Object(b))) => {
                a.extend(b);
                Some(Value::Object(a))
            }
            (a, b) => b.or(a),
        };
        let preprocessor = read_json_opt(&dir.join("preprocessor_config.json"))?;
        // `fallback` files (PyTorch pickles) count only when there is no safetensors file or index at all.
        let weights = |names: &[&str],
                       index: &str,
                       fallback: &[&str]|
         -> Result<Vec<PathBuf>, WeightsError> {
            if let Some(f) = weights_file {
                return Ok(vec![f.to_path_buf()]);
            }
            for n in names {
                let p = dir.join(n);
                if p.is_file() {
                    return Ok(vec![p]);
                }
            }
            let index = dir.join(index);
            if index.is_file() {
                return Ok(shard_files(&index)?
                    .into_iter()
                    .map(|f| dir.join(f))
                    .collect());
            }
            if let Some(p) = fallback.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
                return Ok(vec![p]);
            }
            if let Some(p) = single_pickle(dir) {
                return Ok(vec![p]);
            }
            let all: Vec<&str> = names.iter().chain(fallback).copied().collect();
            Err(not_found(format!(
                "{} holds no {} or sharded index",
                dir.display(),
                all.join(" / ")
            )))
        };
        let (layout, config_path) = if hf_cfg.is_file() {
            let cfg = read_json(&hf_cfg)?;
            if cfg.get("_class_name").is_some() {
                (Layout::Diffusers, hf_cfg)
            } else if cfg.get("model_type").and_then(Value::as_str)
                == Some(crate::two_tower::TWO_TOWER_MODEL_TYPE)
            {
                (Layout::TwoTower, hf_cfg)
            } else if cfg.get("architecture").is_some() {
                (Layout::Timm, hf_cfg)
            } else if cfg.get("model_type").is_some() || cfg.get("architectures").is_some() {
                (Layout::Transformers, hf_cfg)
            } else if open_clip_cfg.is_file() {
                (Layout::OpenClip, open_clip_cfg)
            } else {
                return Err(WeightsError::Config {
                    path: hf_cfg,
                    what: "config",
                    reason: "neither `model_type` (transformers), `architecture` (timm) nor `_class_name` (diffusers)"
                        .into(),
                });
            }
        } else if open_clip_cfg.is_file() {
            (Layout::OpenClip, open_clip_cfg)
        } else {
            return Err(not_found(format!(
                "{} has no config.json or open_clip_config.json",
                dir.display()
            )));
        };
        let weight_files = match layout {
            Layout::OpenClip => weights(
                &["open_clip_model.safetensors", "model.safetensors"],
                "model.safetensors.index.json",
                &[],
            )?,
            Layout::Diffusers => weights(
                &["diffusion_pytorch_model.safetensors"],
                "diffusion_pytorch_model.safetensors.index.json",
                &["diffusion_pytorch_model.bin"],
            )?,
            Layout::Transformers => weights(
                &["model.safetensors"],
                "model.safetensors.index.json",
                &["pytorch_model.bin"],
            )?,
            Layout::TwoTower => {
                let p = dir.join(crate::two_tower::PROJECTION_FILE);
                if weights_file.is_none() && !p.is_file() {
                    return Err(not_found(format!(
                        "{} is missing (the trained projection of this two-tower model)",
                        p.display()
                    )));
                }
                vec![weights_file.map_or(p, Path::to_path_buf)]
            }
            Layout::Timm | Layout::Bare => weights(
                &["model.safetensors"],
                "model.safetensors.index.json",
                &["pytorch_model.bin"],
            )?,
        };
        Ok(Self {
            spec: spec.to_string(),
            dir: dir.to_path_buf(),
            layout,
            config: read_json(&config_path)?,
            config_path,
            preprocessor,
            tokenizer_file,
            tokenizer_config,
            weight_files,
        })
    }

    /// Opens every weight file: safetensors tensors stay in their files until a model takes them (then
    /// they are read one at a time, as `dtype`); pickled PyTorch files are read whole.
    pub fn load_weights(&self, dtype: DType, device: &Device) -> Result<Weights, WeightsError> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut lazy = HashMap::new();
        for f in &self.weight_files {
            if !f.is_file() {
                return Err(WeightsError::Read {
                    path: f.clone(),
                    reason: "file is missing".into(),
                });
            }
            let ext = f.extension().and_then(|e| e.to_str());
            if ext.is_some_and(|e| matches!(e, "pth" | "pt" | "bin")) {
                tensors.extend(crate::pth::load_pth(f, device)?);
            } else {
                // safetensors: tensors are read when the model takes them.
                lazy.extend(crate::lazy::open(f)?);
            }
        }
        Ok(Weights::from_parts(
            tensors,
            lazy,
            self.dir.clone(),
            dtype,
            device,
        ))
    }
}
