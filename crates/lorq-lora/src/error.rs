use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("adapter {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("adapter {path}: `{key}` = {value} is not supported by lorq: {hint}")]
    Unsupported {
        path: PathBuf,
        key: String,
        value: String,
        hint: String,
    },
    #[error("adapter {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("adapter {path}: cannot read {file}: {message}")]
    File {
        path: PathBuf,
        file: String,
        message: String,
    },
    #[error("merging adapters: {0}")]
    Merge(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
