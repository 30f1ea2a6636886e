//! QLoRA fine-tuning over lorq's model code: datasets, LoRA-only backward, optimizers, checkpoints.

pub mod checkpoint;
pub mod data;
pub mod decoder_grad;
pub mod error;
pub mod estimate;
pub mod grad_ops;
pub mod lora_linear;
pub mod lora_params;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod step;
pub mod trainer;

pub use error::{Result, TrainError};
pub use lora_params::{LoraParams, LoraSpec};
pub use step::{eval_nll, forward_backward, MicroBatch};
pub use trainer::{evaluate, train, TrainOptions, TrainSummary};
