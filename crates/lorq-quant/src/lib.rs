//! Weight formats behind every linear layer of a lorq model.
//!
//! A model never knows which format its linears use: each holds an `Arc<dyn QuantTensor>`.
//! Formats differ only inside this crate (one module per family).

pub mod cpu;
mod dense;
mod quant_tensor;

pub use dense::DenseTensor;
pub use quant_tensor::{QuantError, QuantTensor};
