//! A two-tower image-text model assembled from two checkpoints: an image tower and a text tower named by
//! path (or hub id) in the directory's `config.json`, plus a trained text projection into the image
//! tower's embedding space in `projection.safetensors` (as `visenc train align --out DIR` writes it).
//! The towers' weights are referenced, not copied.
//!
//! ```json
//! {
//!   "model_type": "visenc_two_tower",
//!   "image_tower": "/abs/path/efficientnet-lite0-57934424.pth",
//!   "text_tower": "../minilm",
//!   "template": "a photo of a {}.",
//!   "training": { "held_out_top1": 0.35 }
//! }
//! ```
//!
//! Relative tower paths are resolved against the directory; anything that is not an existing path is
//! opened as a hub id. `projection.safetensors` holds `text_projection` [P, E] (text embedding width E
//! to the image embedding width P), `logit_scale` (a scalar, the logarithm of the multiplier, as
//! open_clip stores it) and, for a SigLIP-trained pair, `logit_bias`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::checkpoint::{Checkpoint, Layout};
use crate::error::WeightsError;

/// `model_type` of a two-tower directory's `config.json`.
pub const TWO_TOWER_MODEL_TYPE: &str = "visenc_two_tower";
/// The file of a two-tower directory that holds the trained projection and logit scale.
pub const PROJECTION_FILE: &str = "projection.safetensors";

/// A two-tower directory's `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwoTowerConfig {
    /// Always [`TWO_TOWER_MODEL_TYPE`].
    pub model_type: String,
    /// The image checkpoint: a directory, a weights file or a hub id.
    pub image_tower: String,
    /// The text checkpoint (e.g. a sentence-transformers directory).
    pub text_tower: String,
    /// The prompt template the projection was trained with (`{}` marks the label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// A free-form record of how the projection was trained (data, loss, steps, held-out accuracy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Value>,
}

/// The two checkpoints a two-tower directory names.
#[derive(Debug, Clone)]
pub struct Towers {
    pub config: TwoTowerConfig,
    pub image: Checkpoint,
    pub text: Checkpoint,
}

impl TwoTowerConfig {
    pub fn new(image_tower: String, text_tower: String) -> Self {
        Self {
            model_type: TWO_TOWER_MODEL_TYPE.into(),
            image_tower,
            text_tower,
            template: None,
            training: None,
        }
    }

    /// Writes `config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), WeightsError> {
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| WeightsError::Config {
            path: path.clone(),
            what: "two-tower config",
            reason: e.to_string(),
        })?;
        std::fs::write(&path, text + "\n").map_err(|e| WeightsError::io(&path, e))
    }
}

/// Opens one tower named in `config_path`: a path relative to the directory, an absolute path, or a hub id.
fn open_tower(
    config_path: &Path,
    dir: &Path,
    key: &str,
    spec: &str,
) -> Result<Checkpoint, WeightsError> {
    let bad = |reason: String| WeightsError::Config {
        path: config_path.to_path_buf(),
        what: "two-tower config",
        reason: format!("{key} {spec:?}: {reason}"),
    };
    let local: PathBuf = dir.join(spec);
    let resolved = if local.exists() {
        local.display().to_string()
    } else {
        spec.to_string()
    };
    let ckpt = Checkpoint::open(&resolved).map_err(|e| bad(e.to_string()))?;
    if ckpt.layout == Layout::TwoTower {
        return Err(bad("a tower cannot itself be a two-tower model".into()));
    }
    Ok(ckpt)
}

impl Checkpoint {
    /// The config and the two checkpoints of a [`Layout::TwoTower`] directory, each opened (not loaded).
    /// Errors name `config.json` and the tower that cannot be opened.
    pub fn towers(&self) -> Result<Towers, WeightsError> {
        let config: TwoTowerConfig =
            serde_json::from_value(self.config.clone()).map_err(|e| WeightsError::Config {
                path: self.config_path.clone(),
                what: "two-tower config",
                reason: e.to_string(),
            })?;
        let image = open_tower(
            &self.config_path,
            &self.dir,
            "image_tower",
            &config.image_tower,
        )?;
        let text = open_tower(
            &self.config_path,
            &self.dir,
            "text_tower",
            &config.text_tower,
        )?;
        Ok(Towers {
            config,
            image,
            text,
        })
    }
}
