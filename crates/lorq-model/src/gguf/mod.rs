//! GGUF import: turns a llama-architecture GGUF file (llama.cpp's format, e.g. the SmolLM2 Q4_1 file)
//! into a Hugging Face model folder — `model.safetensors` (every tensor dequantized to F32, HF names,
//! Q/K rows un-permuted), `config.json`, `generation_config.json`, `tokenizer.json` (byte-level BPE
//! rebuilt from the GGUF vocabulary), `tokenizer_config.json` and `chat_template.jinja`.
//!
//! The output equals the reference conversion (`gguf_llama_to_hf_numpy.py`, which agrees with
//! transformers' own GGUF loading): same tensor bytes, same JSON files byte for byte.
//! Tensors are parsed with candle's GGUF reader and dequantized with candle's dequantizers.

mod config;
mod header;
mod metadata;
mod pyjson;
mod tensors;
mod tokenizer;
mod writer;

pub use config::SUPPORTED_ARCHITECTURE;
pub use tensors::SUPPORTED_TYPES;
pub use tokenizer::SUPPORTED_TOKENIZER_MODEL;

use candle_core::quantized::gguf_file;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Everything that can go wrong while importing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufImportError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a readable GGUF file: {message}", path.display())]
    Gguf { path: PathBuf, message: String },
    #[error("{}: architecture {architecture:?} is not supported (only {SUPPORTED_ARCHITECTURE:?})", path.display())]
    UnsupportedArchitecture { path: PathBuf, architecture: String },
    #[error("{}: metadata key {key:?} is missing", path.display())]
    MissingKey { path: PathBuf, key: String },
    #[error("{}: metadata key {key:?} should be {expected}, found {found}", path.display())]
    BadValue {
        path: PathBuf,
        key: String,
        expected: String,
        found: String,
    },
    #[error("{}: tokenizer.ggml.model {model:?} is not supported (only {SUPPORTED_TOKENIZER_MODEL:?}, byte-level BPE)", path.display())]
    UnsupportedTokenizer { path: PathBuf, model: String },
    #[error("{}: tensor {tensor:?} has type {dtype}, which is not supported (supported: {})", path.display(), supported_types())]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{}: unexpected tensor {tensor:?}: {reason}", path.display())]
    UnexpectedTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{}: tensor {tensor:?} has shape {shape:?}: {reason}", path.display())]
    BadTensorShape {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
        reason: String,
    },
    #[error("{}: reading tensor {tensor:?} failed: {message}", path.display())]
    TensorRead {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{}: writing safetensors failed: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },
    #[error("{}: JSON serialization failed: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn supported_types() -> String {
    SUPPORTED_TYPES
        .iter()
        .map(|t| tensors::dtype_name(*t))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`import_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufImportSummary {
    /// Tensors written to `model.safetensors`.
    pub tensors: usize,
    /// True when the GGUF has no `output.weight` (the LM head is the embedding matrix).
    pub tied_embeddings: bool,
    pub vocab_size: usize,
    pub merges: usize,
    /// Control tokens, written as special added tokens.
    pub special_tokens: usize,
    pub architecture: String,
}

/// Converts the llama-architecture GGUF file `gguf_path` into a Hugging Face model folder `out_dir`
/// (created if missing; files of the same names are replaced). All metadata and every tensor's type
/// are checked before anything is written.
pub fn import_gguf(gguf_path: &Path, out_dir: &Path) -> Result<GgufImportSummary, GgufImportError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GgufImportError::Io { path, source }
    };
    let file = File::open(gguf_path).map_err(io_err(gguf_path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let content = match gguf_file::Content::read(&mut reader) {
        Ok(content) => content,
        Err(e) => {
            // Name the tensor when the cause is a tensor type candle cannot represent.
            let path = gguf_path.to_path_buf();
            return Err(match header::first_unreadable_tensor(&mut reader) {
                Some((tensor, ty)) => GgufImportError::UnsupportedTensorType {
                    path,
                    tensor,
                    dtype: header::ggml_type_name(ty),
                },
                None => GgufImportError::Gguf {
                    path,
                    message: e.to_string(),
                },
            });
        }
    };
    let meta = metadata::Metadata {
        path: gguf_path,
        values: &content.metadata,
    };
    let params = config::LlamaParams::from_metadata(&meta)?;
    let vocab = tokenizer::GgufVocab::from_metadata(&meta)?;
    let plans = tensors::plan_tensors(gguf_path, &content, &params)?;
    let tied = !plans.iter().any(|p| p.hf_name == "lm_head.weight");
    tracing::info!(
        file = %gguf_path.display(),
        tensors = plans.len(),
        types = ?tensors::type_histogram(&plans),
        layers = params.n_layer,
        vocab = vocab.tokens.len(),
        "importing GGUF"
    );

    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let weights = out_dir.join("model.safetensors");
    writer::write_safetensors(
        gguf_path,
        reader,
        content.tensor_data_offset,
        &plans,
        &weights,
    )?;

    write_json(
        &out_dir.join("tokenizer.json"),
        &vocab.tokenizer_json(),
        false,
    )?;
    let tokenizer_config = vocab.tokenizer_config_json(params.context_length);
    write_json(
        &out_dir.join("tokenizer_config.json"),
        &tokenizer_config,
        true,
    )?;
    if let Some(template) = &vocab.chat_template {
        let path = out_dir.join("chat_template.jinja");
        std::fs::write(&path, template).map_err(io_err(&path))?;
    }
    write_json(
        &out_dir.join("config.json"),
        &params.config_json(&vocab, tied),
        true,
    )?;
    write_json(
        &out_dir.join("generation_config.json"),
        &config::GenerationConfigJson::new(&vocab),
        true,
    )?;

    let summary = GgufImportSummary {
        tensors: plans.len(),
        tied_embeddings: tied,
        vocab_size: vocab.tokens.len(),
        merges: vocab.merges.len(),
        special_tokens: vocab.special_count(),
        architecture: params.architecture,
    };
    tracing::info!(out = %out_dir.display(), ?summary, "GGUF import done");
    Ok(summary)
}

/// Writes `value` as Python's `json.dump(value, f, indent=2, ensure_ascii=ensure_ascii)` would.
fn write_json<T: serde::Serialize>(
    path: &Path,
    value: &T,
    ensure_ascii: bool,
) -> Result<(), GgufImportError> {
    let bytes =
        pyjson::to_python_json(value, ensure_ascii).map_err(|source| GgufImportError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    std::fs::write(path, bytes).map_err(|source| GgufImportError::Io {
        path: path.to_path_buf(),
        source,
    })
}
