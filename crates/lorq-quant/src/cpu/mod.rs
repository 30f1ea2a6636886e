//! CPU kernels: multithreaded (rayon), vectorised through runtime-dispatched target features.

mod dot;
mod rows_matmul;

pub use dot::{dot_bf16, dot_f32};
pub use rows_matmul::{rows_matmul, RowDot};
