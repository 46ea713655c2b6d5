use std::path::PathBuf;

use crate::store::LoadReport;

/// Errors from finding and reading checkpoints. Every variant names the file, directory or repository.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot read weights: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}: invalid {what}: {reason}", path.display())]
    Config {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{spec}: not a checkpoint: {reason}")]
    NotFound { spec: String, reason: String },
    #[error("{repo}: {reason}")]
    Hub { repo: String, reason: String },
    #[error("{source_path}: checkpoint does not match the model:{report}\n  (pass --allow-mismatch / LoadPolicy::AllowMismatch to load anyway)", source_path = .source_path.display())]
    Mismatch {
        source_path: PathBuf,
        report: LoadReport,
    },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl WeightsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
