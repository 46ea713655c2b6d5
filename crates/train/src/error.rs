/// Errors from preparing data for training or from training itself.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Data that cannot be trained on (one class, mismatched dimensions, empty sets...).
    #[error("unusable data: {0}")]
    Data(String),
    /// A file that cannot be read or parsed; `path` names it.
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Loading or running a model.
    #[error(transparent)]
    Visenc(#[from] visenc::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn data_err(msg: impl Into<String>) -> TrainError {
    TrainError::Data(msg.into())
}
