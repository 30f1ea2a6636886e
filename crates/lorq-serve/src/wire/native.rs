//! LoRAX / TGI request and response bodies (`POST /`, `/generate`, `/generate_stream`).

use serde::{Deserialize, Serialize};

use lorq_model::generation::FinishReason;

/// `{"inputs", "parameters", "stream"}` as lorax-client and text-generation send it.
#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: GenerateParameters,
    #[serde(default)]
    pub stream: bool,
}

/// Every LoRAX `GenerateParameters` field, plus TGI's `top_n_tokens`, `frequency_penalty` and
/// `grammar`. Absent and `null` mean the same.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct GenerateParameters {
    pub adapter_id: Option<String>,
    pub adapter_source: Option<String>,
    pub merged_adapters: Option<MergedAdapters>,
    pub api_token: Option<String>,
    pub do_sample: Option<bool>,
    pub max_new_tokens: Option<u32>,
    pub ignore_eos_token: Option<bool>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub return_full_text: Option<bool>,
    pub stop: Option<Vec<String>>,
    pub seed: Option<u64>,
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub truncate: Option<u32>,
    pub typical_p: Option<f32>,
    pub best_of: Option<u32>,
    pub watermark: Option<bool>,
    pub details: Option<bool>,
    pub decoder_input_details: Option<bool>,
    pub return_k_alternatives: Option<u32>,
    pub top_n_tokens: Option<u32>,
    pub response_format: Option<ResponseFormat>,
    pub grammar: Option<Grammar>,
    pub apply_chat_template: Option<bool>,
}

/// LoRAX's `merged_adapters`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct MergedAdapters {
    pub ids: Vec<String>,
    pub weights: Vec<f64>,
    #[serde(default)]
    pub merge_strategy: Option<String>,
    #[serde(default)]
    pub density: Option<f64>,
    #[serde(default)]
    pub majority_sign_method: Option<String>,
}

/// LoRAX's `response_format`: `{"type": "json_object", "schema": {...}}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
}

/// TGI's `grammar`: `{"type": "json", "value": schema}` (regex grammars are refused).
#[derive(Debug, Clone, Deserialize)]
pub struct Grammar {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub value: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AlternativeToken {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alternative_tokens: Option<Vec<AlternativeToken>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BestOfSequence {
    pub generated_text: String,
    pub finish_reason: FinishReason,
    pub generated_tokens: usize,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of_sequences: Option<Vec<BestOfSequence>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateResponse {
    pub generated_text: String,
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub seed: Option<u64>,
}

/// One SSE event of `/generate_stream` (and `POST /` with `"stream": true`).
#[derive(Debug, Clone, Serialize)]
pub struct StreamResponse {
    pub token: Token,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_tokens: Option<Vec<AlternativeToken>>,
    pub generated_text: Option<String>,
    pub details: Option<StreamDetails>,
}

/// `POST /tokenize` body (TGI).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}
