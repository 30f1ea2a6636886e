//! Llama hyper-parameters read from GGUF metadata, and the `config.json` / `generation_config.json`
//! written from them (same keys, order and values as the reference converter).

use super::metadata::Metadata;
use super::tokenizer::GgufVocab;
use super::GgufImportError;
use serde::Serialize;

/// The only architecture this importer understands (metadata keys are `llama.*`).
pub const SUPPORTED_ARCHITECTURE: &str = "llama";

/// Llama hyper-parameters from the `llama.*` metadata keys.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LlamaParams {
    pub(crate) architecture: String,
    pub(crate) n_head: usize,
    pub(crate) n_kv_head: usize,
    pub(crate) hidden: usize,
    pub(crate) n_layer: usize,
    pub(crate) ffn: usize,
    pub(crate) context_length: usize,
    pub(crate) rms_eps: f64,
    pub(crate) rope_theta: f64,
}

impl LlamaParams {
    pub(crate) fn from_metadata(meta: &Metadata<'_>) -> Result<Self, GgufImportError> {
        let architecture = meta.str("general.architecture")?.to_string();
        if architecture != SUPPORTED_ARCHITECTURE {
            return Err(GgufImportError::UnsupportedArchitecture {
                path: meta.path_buf(),
                architecture,
            });
        }
        let n_head = meta.count("llama.attention.head_count")?;
        let n_kv_head = match meta.get("llama.attention.head_count_kv") {
            Some(_) => meta.count("llama.attention.head_count_kv")?,
            None => n_head,
        };
        Ok(Self {
            architecture,
            n_head,
            n_kv_head,
            hidden: meta.count("llama.embedding_length")?,
            n_layer: meta.count("llama.block_count")?,
            ffn: meta.count("llama.feed_forward_length")?,
            context_length: meta.count("llama.context_length")?,
            rms_eps: meta.float("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: meta.opt_float("llama.rope.freq_base")?.unwrap_or(10000.0),
        })
    }

    /// `config.json` for `LlamaForCausalLM`.
    pub(crate) fn config_json<'a>(&'a self, vocab: &'a GgufVocab, tied: bool) -> ConfigJson<'a> {
        ConfigJson {
            architectures: ["LlamaForCausalLM"],
            model_type: "llama",
            hidden_size: self.hidden,
            intermediate_size: self.ffn,
            num_hidden_layers: self.n_layer,
            num_attention_heads: self.n_head,
            num_key_value_heads: self.n_kv_head,
            head_dim: self.hidden / self.n_head,
            max_position_embeddings: self.context_length,
            rms_norm_eps: self.rms_eps,
            rope_theta: self.rope_theta,
            vocab_size: vocab.tokens.len(),
            tie_word_embeddings: tied,
            hidden_act: "silu",
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: vocab.bos,
            eos_token_id: vocab.eos,
            pad_token_id: vocab.pad,
            torch_dtype: "float32",
        }
    }
}

/// `config.json`, fields in the reference converter's order.
#[derive(Debug, Serialize)]
pub(crate) struct ConfigJson<'a> {
    architectures: [&'a str; 1],
    model_type: &'a str,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    vocab_size: usize,
    tie_word_embeddings: bool,
    hidden_act: &'a str,
    attention_bias: bool,
    mlp_bias: bool,
    bos_token_id: Option<i64>,
    eos_token_id: Option<i64>,
    pad_token_id: Option<i64>,
    torch_dtype: &'a str,
}

/// `generation_config.json`: the special token ids only.
#[derive(Debug, Serialize)]
pub(crate) struct GenerationConfigJson {
    bos_token_id: Option<i64>,
    eos_token_id: Option<i64>,
    pad_token_id: Option<i64>,
}

impl GenerationConfigJson {
    pub(crate) fn new(vocab: &GgufVocab) -> Self {
        Self {
            bos_token_id: vocab.bos,
            eos_token_id: vocab.eos,
            pad_token_id: vocab.pad,
        }
    }
}
