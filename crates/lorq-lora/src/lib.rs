//! PEFT LoRA adapters: reading `adapter_config.json` + `adapter_model.safetensors`, and applying
//! many adapters to one batch whose rows each choose their own adapter (or none), and merging
//! several adapters into one in ΔW space ([`merge`]).

mod adapter;
mod apply;
#[cfg(feature = "cuda")]
mod apply_cuda;
mod batched;
mod config;
mod error;
pub mod merge;
mod target;

pub use adapter::{LoraAdapter, LoraModule, LoraWeights};
pub use apply::{AdapterSegment, BatchAdapters, PendingDelta};
pub use config::LoraConfig;
pub use error::LoraError;
pub use target::TargetModules;
