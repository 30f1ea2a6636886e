//! Weight formats behind every linear layer of a lorq model.
//!
//! A model never knows which format its linears use: each holds an `Arc<dyn QuantTensor>`.
//! Formats differ only inside this crate (one module per family).

pub mod awq;
pub mod bnb4;
pub mod compressed_int;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dense;
pub mod eetq;
pub mod fp8;
pub mod gptq;
pub mod gpu_layout;
mod gpu_slot;
pub mod hqq;
pub mod input_stats;
pub mod int8;
pub mod method;
mod quant_tensor;
pub mod raw_tensor;
// Used by the CUDA backend's launch tables; built and tested on every build.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod recent_cache;
pub mod rtn;
pub mod select;

pub use dense::DenseTensor;
#[cfg(feature = "cuda")]
pub use quant_tensor::{matmul_add_rms_norm, matmul_group_norm_head, matmul_silu_mul_norm_head};
pub use quant_tensor::{matmul_group, matmul_silu_mul, QuantError, QuantTensor};
pub use raw_tensor::RawTensor;
