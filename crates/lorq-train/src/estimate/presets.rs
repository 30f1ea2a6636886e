//! `--params`: the published configs of the Llama models people size QLoRA runs for.

use std::path::Path;

use lorq_model::ModelConfig;

use crate::error::{Result, TrainError};

/// (`--params` names, config.json fields that matter for memory).
const PRESETS: [(&[&str], &str); 5] = [
    (
        &["7b", "llama-2-7b"],
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"vocab_size":32000,"max_position_embeddings":4096,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,"torch_dtype":"float16","bos_token_id":1,"eos_token_id":2}"#,
    ),
    (
        &["8b", "llama-3-8b"],
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":8192,"rms_norm_eps":1e-5,"rope_theta":500000.0,"tie_word_embeddings":false,"torch_dtype":"bfloat16","bos_token_id":128000,"eos_token_id":128001}"#,
    ),
    (
        &["13b", "llama-2-13b"],
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":5120,"intermediate_size":13824,"num_hidden_layers":40,"num_attention_heads":40,"num_key_value_heads":40,"vocab_size":32000,"max_position_embeddings":4096,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,"torch_dtype":"float16","bos_token_id":1,"eos_token_id":2}"#,
    ),
    (
        &["70b", "llama-2-70b"],
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8192,"intermediate_size":28672,"num_hidden_layers":80,"num_attention_heads":64,"num_key_value_heads":8,"vocab_size":32000,"max_position_embeddings":4096,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,"torch_dtype":"float16","bos_token_id":1,"eos_token_id":2}"#,
    ),
    (
        &["llama-3-70b"],
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8192,"intermediate_size":28672,"num_hidden_layers":80,"num_attention_heads":64,"num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":8192,"rms_norm_eps":1e-5,"rope_theta":500000.0,"tie_word_embeddings":false,"torch_dtype":"bfloat16","bos_token_id":128000,"eos_token_id":128001}"#,
    ),
];

/// The names `--params` accepts.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS
        .iter()
        .flat_map(|(n, _)| n.iter().copied())
        .collect()
}

/// The config for a `--params` value: 7B = Llama-2-7B, 8B = Llama-3-8B, 13B = Llama-2-13B,
/// 70B = Llama-2-70B, or a model name (`llama-3-70b`), case-insensitive.
pub fn preset_config(name: &str) -> Result<(String, ModelConfig)> {
    let key = name.trim().to_ascii_lowercase();
    let (names, json) = PRESETS
        .iter()
        .find(|(n, _)| n.contains(&key.as_str()))
        .ok_or_else(|| {
            TrainError::Config(format!(
                "--params {name:?}: unknown; choose one of {}",
                preset_names().join(", ")
            ))
        })?;
    let label = names.last().copied().unwrap_or_default();
    let cfg = ModelConfig::parse(json, Path::new(label))?;
    Ok((label.to_string(), cfg))
}
