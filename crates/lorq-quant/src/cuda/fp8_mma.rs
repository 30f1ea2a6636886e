//! The W8A8 FP8 product on tensor cores for few activation rows (`kernels/fp8_mma.cu`: mma.sync
//! m16n8k32 e4m3, f32 accumulation, scales in the epilogue). It reads the same buffers as the
//! cuBLASLt path (`fp8_gemm.rs`: row-major e4m3 weight codes and f32 row scales, activations as
//! `quantize_activations` writes them), so the two are interchangeable per call.
//!
//! cuBLASLt's FP8 kernels are built for compute: at 16-32 rows they stream the weight at well
//! under half the HBM bandwidth. This kernel streams the weight codes straight into mma
//! fragments and wins there; from 32-64 rows on wide weights cuBLASLt is faster again
//! ([`shape`], from H100 measurements in docs/benchmarks.md). `Shape::K2` serves wide weights at
//! 16 rows and any weight when the caller forces this kernel.

use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, WithDType};

use super::{dtype_name, function};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fp8_mma.fatbin"));

/// Threads per block of every shape (kernels/fp8_mma.cu `THREADS`).
const THREADS: u32 = 256;
/// Activation rows per block (the kernels' MT = 2 tiles of 8).
const ROWS_PER_BLOCK: usize = 16;

/// A block shape of the kernel: how its 8 warps split output rows and K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// 16 output rows, 8 K-slice warps, 3 K steps in flight.
    K8,
    /// 32 output rows: 2 row warps x 4 K slices.
    K4,
    /// 64 output rows: 4 row warps x 2 K slices.
    K2,
}

impl Shape {
    fn tag(self) -> &'static str {
        match self {
            Shape::K8 => "k8",
            Shape::K4 => "k4",
            Shape::K2 => "k2",
        }
    }

    fn out_rows(self) -> usize {
        match self {
            Shape::K8 => 16,
            Shape::K4 => 32,
            Shape::K2 => 64,
        }
    }
}

/// Whether the kernel can take a `[n, k]` weight: 32-byte chunks never straddle the end of K
/// (and rows stay 16-byte aligned).
pub fn supports(k: usize) -> bool {
    k.is_multiple_of(32) && k > 0
}

/// The block shape for `n` output features and `m` activation rows where this kernel beat
/// cuBLASLt on an H100 (Llama-3-8B shapes, bf16 out, activation quantization included; block
/// shapes from a sweep of the kernel alone), `None` where cuBLASLt is faster: narrow weights
/// (k/v projections) up to 128 rows, 4096-wide ones up to 32, wider ones at 16.
pub fn shape(n: usize, m: usize) -> Option<Shape> {
    if n <= 2048 {
        return match m {
            0..=64 => Some(Shape::K8),
            65..=128 => Some(Shape::K4),
            _ => None,
        };
    }
    match m {
        0..=16 if n >= 8192 => Some(Shape::K2),
        0..=16 => Some(Shape::K8),
        17..=32 if n <= 4096 => Some(Shape::K4),
        _ => None,
    }
}

/// `y[m, n] = (xq · wqᵀ) · sx[m] · sw[n]` in `T` (bf16/f16/f32): `wq` `[n, k]` and `xq` `[m, k]`
/// row-major e4m3 codes, `sw` n and `sx` m f32 scales.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    shape: Shape,
    wq: &CudaView<'_, u8>,
    sw: &CudaView<'_, f32>,
    xq: &CudaView<'_, u8>,
    sx: &CudaView<'_, f32>,
    (m, n, k): (usize, usize, usize),
) -> Result<CudaStorage, QuantError> {
    if !supports(k) || wq.len() < n * k || xq.len() < m * k || sw.len() < n || sx.len() < m {
        return Err(QuantError::Invalid(format!(
            "fp8 tensor-core kernel: needs in_features % 32 == 0 and buffers of [{n}, {k}] codes, \
             {n} weight scales, [{m}, {k}] activation codes and {m} activation scales"
        )));
    }
    let stream = dev.cuda_stream();
    // SAFETY: the kernel writes every element of y (each (m, n) by exactly one lane).
    let y = unsafe { dev.alloc::<T>(m * n)? };
    let f = function(
        dev,
        "fp8_mma",
        FATBIN,
        &format!("fp8mm_{}_{}", dtype_name(T::DTYPE), shape.tag()),
    )?;
    let (mi, ni, ki) = (m as i32, n as i32, k as i32);
    let mut b = stream.launch_builder(&f);
    b.arg(wq)
        .arg(sw)
        .arg(xq)
        .arg(sx)
        .arg(&y)
        .arg(&mi)
        .arg(&ni)
        .arg(&ki);
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(shape.out_rows()) as u32,
            1,
            m.div_ceil(ROWS_PER_BLOCK) as u32,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `fp8mm_*` (kernels/fp8_mma.cu): wq n*k codes and xq m*k codes, both with
    // rows of k % 32 == 0 bytes from 256-byte-aligned allocations; sw n, sx m floats; y m*n.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_the_measured_crossovers() {
        // k/v projections (n = 1024): the kernel up to 128 rows, in wider blocks past 64.
        assert_eq!(shape(1024, 16), Some(Shape::K8));
        assert_eq!(shape(1024, 128), Some(Shape::K4));
        assert_eq!(shape(1024, 129), None);
        // q/o and down (n = 4096): up to 32 rows; gate/up (n = 14336): 16.
        assert_eq!(shape(4096, 16), Some(Shape::K8));
        assert_eq!(shape(4096, 32), Some(Shape::K4));
        assert_eq!(shape(4096, 33), None);
        assert_eq!(shape(14336, 16), Some(Shape::K2));
        assert_eq!(shape(14336, 17), None);
        assert!(supports(4096) && supports(14336) && !supports(4112) && !supports(0));
    }
}
