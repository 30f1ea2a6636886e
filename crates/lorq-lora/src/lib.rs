//! PEFT LoRA adapters: reading `adapter_config.json` + `adapter_model.safetensors`, and applying
//! many adapters to one batch whose rows each choose their own adapter (or none).

mod adapter;
mod apply;
mod config;
mod error;
mod target;

pub use adapter::{LoraAdapter, LoraModule};
pub use apply::{AdapterSegment, BatchAdapters};
pub use config::LoraConfig;
pub use error::LoraError;
pub use target::TargetModules;
