use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model folder {dir}: {message}")]
    Weights { dir: PathBuf, message: String },
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    #[error("adapter {adapter}: {message}")]
    AdapterMismatch { adapter: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("JSON constraint: {0}")]
    JsonConstraint(String),
    #[error("fetching the default model: {0}")]
    Pull(String),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufImportError),
    #[error(transparent)]
    Lora(#[from] lorq_lora::LoraError),
    #[error(transparent)]
    Quant(#[from] lorq_quant::QuantError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.into();
    move |source| ModelError::Io { path, source }
}
