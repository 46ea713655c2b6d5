use std::path::{Path, PathBuf};

use visenc_weights::WeightsError;

/// Errors from building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config value we cannot honour; `what` names the option.
    #[error("config `{what}`: {reason}")]
    Config { what: String, reason: String },
    /// An architecture or variant visenc does not implement.
    #[error("unsupported {what}: {name}")]
    Unsupported { what: &'static str, name: String },
    /// Input tensors of the wrong shape or type.
    #[error("bad input: {0}")]
    Input(String),
    /// A file of the checkpoint that cannot be used as it is (e.g. a two-tower projection whose shape
    /// does not fit its towers); `path` names it.
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn config_err(what: impl Into<String>, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        what: what.into(),
        reason: reason.into(),
    }
}

pub(crate) fn file_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}
