//! QLoRA fine-tuning over lorq's model code: datasets, LoRA-only backward, optimizers, checkpoints.

pub mod data;
pub mod error;
pub mod estimate;
pub mod optim;

pub use error::{Result, TrainError};
