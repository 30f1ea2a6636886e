//! The Llama family for lorq: config, loading, batched forward with a KV cache per sequence,
//! sampling, tokenizer and chat template, GGUF import, and the embedded default model.

pub mod attention;
pub mod calibrate;
pub mod chat_template;
pub mod checkpoint_writer;
pub mod config;
#[cfg(feature = "cuda")]
mod decode_graph;
pub mod error;
pub mod export;
pub mod generation;
pub mod gguf;
pub mod json_constraint;
mod kv_cache;
mod linear;
pub mod llama;
mod loaded;
pub mod merge_checkpoint;
mod paged_forward;
pub mod paged_kv;
pub mod perplexity;
pub mod prequantized;
pub mod pull;
pub mod random_model;
mod rope;
pub mod sampling;
mod step_logits;
mod step_picks;
pub mod tokenizer;
pub mod weights;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use generation::{run_to_completion, FinishReason, GenerationRequest, Sequence};
pub use kv_cache::KvCache;
pub use linear::Linear;
pub use llama::{BatchItem, LayerLinear, LlamaModel, LogitsWanted};
pub use loaded::LoadedModel;
pub use perplexity::{sliding_window_nll, PplResult};
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use step_logits::StepLogits;
pub use step_picks::{pick_step, PickRequest, StepPick};
pub use tokenizer::{StreamDecoder, Tokenizer};
