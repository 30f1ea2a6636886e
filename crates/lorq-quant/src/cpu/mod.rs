//! CPU kernels: multithreaded (rayon), vectorised through runtime-dispatched target features.

mod dense_gemm;
pub(crate) mod dispatch;
mod dot;
mod rows_matmul;

pub use dense_gemm::{dense_matmul, WeightElem};
pub use dot::{dot_bf16, dot_f32};
pub(crate) use rows_matmul::fused_or_dequantized_matmul;
pub use rows_matmul::{rows_matmul, RowDot, FUSED_MAX_ROWS};
