//! Fetching a checkpoint from the Hugging Face hub into the standard cache (`HF_HOME`), reusing what
//! is cached. With `HF_HUB_OFFLINE=1`, or when the hub cannot be reached, only cached files are used and
//! anything missing is a clear error.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::Cache;

use crate::error::WeightsError;

/// Files a checkpoint may have besides its weights; any that the repository lacks are skipped.
const OPTIONAL: &[&str] = &[
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

struct Hub {
    id: String,
    cache: Cache,
    offline: bool,
}

impl Hub {
    fn hub_error(&self, reason: impl Into<String>) -> WeightsError {
        WeightsError::Hub {
            repo: self.id.clone(),
            reason: reason.into(),
        }
    }

    /// An optional file: `None` when the repository lacks it, or when the hub cannot be reached
    /// and the cache does not hold it (a cached checkpoint must load without a network).
    fn optional(&self, file: &str) -> Result<Option<PathBuf>, WeightsError> {
        match self.get(file) {
            Err(WeightsError::Hub { .. }) if !self.offline => Ok(None),
            other => other,
        }
    }

    /// `Ok(None)` when the repository does not have the file.
    fn get(&self, file: &str) -> Result<Option<PathBuf>, WeightsError> {
        if let Some(p) = self.cache.model(self.id.clone()).get(file) {
            return Ok(Some(p));
        }
        if self.offline {
            return Ok(None);
        }
        let api = ApiBuilder::from_cache(self.cache.clone())
            .with_progress(true)
            .build()
            .map_err(|e| self.hub_error(e.to_string()))?;
        match api.model(self.id.clone()).get(file) {
            Ok(p) => Ok(Some(p)),
            Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
            Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(401 | 403, _)) => Err(self
                .hub_error(format!("{file}: access denied (gated or private repository: set HF_TOKEN)"))),
            Err(e) => Err(self.hub_error(format!(
                "cannot download {file} ({e}); the hub is unreachable and the file is not in the cache {}",
                self.cache.path().display()
            ))),
        }
    }

    fn require(&self, file: &str) -> Result<PathBuf, WeightsError> {
        self.get(file)?.ok_or_else(|| self.missing(file))
    }

    fn missing(&self, file: &str) -> WeightsError {
        self.hub_error(if self.offline {
            format!(
                "{file} is not in the cache {} and HF_HUB_OFFLINE is set",
                self.cache.path().display()
            )
        } else {
            format!("the repository has no {file}")
        })
    }
}

/// Downloads (or finds in the cache) what a checkpoint needs and returns its snapshot directory.
pub(crate) fn fetch(id: &str) -> Result<PathBuf, WeightsError> {
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let hub = Hub {
        id: id.to_string(),
        cache: Cache::from_env(),
        offline,
    };
    // open_clip repositories on the hub usually carry an HF config.json too; prefer that layout.
    let config = match hub.get("config.json")? {
        Some(p) => p,
        None => {
            let cfg = hub.get("open_clip_config.json")?.ok_or_else(|| {
                hub.hub_error(if hub.offline {
                    format!(
                        "not in the cache {} (neither config.json nor open_clip_config.json) and HF_HUB_OFFLINE is set",
                        hub.cache.path().display()
                    )
                } else {
                    "the repository has neither config.json nor open_clip_config.json".to_string()
                })
            })?;
            hub.require("open_clip_model.safetensors")?;
            return snapshot_dir(&hub, &cfg);
        }
    };
    for f in OPTIONAL {
        hub.optional(f)?;
    }
    if hub.get("model.safetensors")?.is_none() {
        let index = hub.get("model.safetensors.index.json")?.ok_or_else(|| {
            if hub.offline {
                hub.missing("model.safetensors (or model.safetensors.index.json)")
            } else {
                hub.hub_error("no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are fetched)")
            }
        })?;
        for shard in crate::checkpoint::shard_files(&index)? {
            hub.require(&shard)?;
        }
    }
    snapshot_dir(&hub, &config)
}

fn snapshot_dir(hub: &Hub, file: &Path) -> Result<PathBuf, WeightsError> {
    file.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| hub.hub_error("bad cache path"))
}
