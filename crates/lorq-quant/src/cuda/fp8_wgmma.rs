//! The W8A8 FP8 product on Hopper's warpgroup tensor-core instruction (`kernels/fp8_wgmma.cu`:
//! `wgmma` m64nNk32 e4m3, compute capability 9.0) for 17-64 activation rows. It reads the same
//! buffers as the cuBLASLt path and `fp8_mma.rs` (row-major e4m3 weight codes and f32 row scales,
//! activation codes and per-token scales as `quantize_activations` writes them): the weight codes
//! go straight from global memory into `wgmma`'s register operand, and each block writes the
//! activation codes of the K steps it sums into shared memory in the weight fragments' K order,
//! swizzled, where `wgmma` reads them.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, WithDType};

use super::qmma_tiled::KSTEP;
use super::qwgmma::schedule;
use super::{dtype_name, function_with_shared};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fp8_wgmma.fatbin"));

/// Threads per block: two warpgroups (kernels/fp8_wgmma.cu `fp8wg::THREADS`).
const THREADS: u32 = 256;

/// Dynamic shared memory a block asks for at most: Hopper's 227 KiB opt-in less 1 KiB for the
/// kernel's static shared memory (227 KiB of dynamic memory alone is refused at launch).
const MAX_SHARED: usize = 226 * 1024;

/// A block shape (kernels/fp8_wgmma.cu `FP8WG_CFG_*`): its activation rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    name: &'static str,
    rows: usize,
}

impl Shape {
    /// Dynamic shared memory for blocks summing `per_block` K steps: the activations of every step
    /// (`rows` 128-byte rows each) and 1 KiB to align them to the 128-byte swizzle's 1024-byte atoms.
    fn shared_bytes(self, per_block: usize) -> usize {
        per_block * self.rows * 128 + 1024
    }

    /// The most K steps a block may sum (their activations all in shared memory).
    fn max_steps(self) -> usize {
        (MAX_SHARED - 1024) / (self.rows * 128)
    }
}

/// The narrowest block that holds `m` activation rows (16, 32, 64); past 64 rows, blocks of 64.
pub fn shape(m: usize) -> Shape {
    let (name, rows) = match m {
        0..=16 => ("n16", 16),
        17..=32 => ("n32", 32),
        _ => ("n64", 64),
    };
    Shape { name, rows }
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the kernel on or off for the whole process (on by default), e.g. to measure what it
/// brings; off, [`supports`] is false.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the kernel takes an `[n, k]` weight on `dev`: whole 128-wide K steps, on a GPU of
/// compute capability 9.0 (`wgmma` is sm_90a only).
pub fn supports(k: usize, dev: &CudaDevice) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && k.is_multiple_of(KSTEP)
        && k > 0
        && matches!(super::fp8_gemm::compute_capability(dev), Ok((9, 0)))
}

/// Whether `Fp8Kernel::Auto` takes this kernel for an `[n, k]` weight at `m` activation rows:
/// 17-64 rows of weights with more than 2048 output rows and at least 8192 inputs (down_proj of
/// an 8B model), where it beat both lorq's mma kernel and cuBLASLt on an H200, activation
/// quantization included (docs/benchmarks.md: 4096x14336 at 32 rows 30.3 us against 33.7 and
/// 43.1, at 64 rows 34.8 against 55.0 and 42.5). On 4096-input weights it lost to cuBLASLt
/// (gate/up) or the mma kernel (q/o): a block writes its activations into shared memory before
/// its loop, which a long K amortizes.
pub fn takes(n: usize, m: usize, k: usize, dev: &CudaDevice) -> bool {
    (17..=64).contains(&m) && n > 2048 && k >= 8192 && supports(k, dev)
}

/// The most tiles (128 output rows x a block's activation rows) whose K steps are shared out over
/// the SMs: fewer than one per SM. More tiles run whole, one block each.
fn split_until(sms: usize) -> usize {
    sms.saturating_sub(1)
}

/// The launch's schedule: [`schedule`] with at most [`Shape::max_steps`] K steps per block.
fn plan(sh: Shape, n: usize, m: usize, k: usize, sms: usize) -> super::qwgmma::Schedule {
    schedule(n, m, k, sh.rows, sms, split_until(sms), sh.max_steps())
}

/// `y[m, n] = (xq · wqᵀ) · sx[m] · sw[n]` in `T` (bf16/f16/f32): `wq` `[n, k]` and `xq` `[m, k]`
/// row-major e4m3 codes, `sw` n and `sx` m f32 scales; `counters` the weight's split-K tickets
/// (zero between launches, at least `n.div_ceil(16) * 16`: the packed layout's).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    wq: &CudaView<'_, u8>,
    sw: &CudaView<'_, f32>,
    xq: &CudaView<'_, u8>,
    sx: &CudaView<'_, f32>,
    counters: &CudaSlice<u32>,
    (m, n, k): (usize, usize, usize),
) -> Result<CudaStorage, QuantError> {
    if !supports(k, dev)
        || m == 0
        || xq.len() < m * k
        || wq.len() < n * k
        || sw.len() < n
        || sx.len() < m
        || counters.len() < n.div_ceil(16) * 16
    {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: needs compute capability 9.0, in_features % 128 == 0, m > 0 and \
             buffers of [{n}, {k}] codes, {n} weight scales, [{m}, {k}] activation codes, {m} \
             activation scales and the weight's split-K counters"
        )));
    }
    let sh = shape(m);
    let stream = dev.cuda_stream();
    let sms = super::qmma_tiled::multiprocessors(dev);
    let plan = plan(sh, n, m, k, sms);
    let tiles = n.div_ceil(128) * m.div_ceil(sh.rows);
    if plan.slots > 1 && tiles > counters.len() {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: {tiles} split tiles ([{n}, {k}] at {m} rows) but {} split-K counters",
            counters.len()
        )));
    }
    // Every block asks for the most shared memory of any launch (a function's opt-in is set
    // once, `function_with_shared`); the blocks of one SM are one anyway (registers).
    let smem = sh.shared_bytes(sh.max_steps());
    let f = function_with_shared(
        dev,
        "fp8_wgmma",
        FATBIN,
        &format!("fp8wg_{}_{}", dtype_name(T::DTYPE), sh.name),
        smem,
    )?;
    // SAFETY: every output element is written by the kernel.
    let y = unsafe { dev.alloc::<T>(m * n)? };
    let partial: Option<CudaSlice<f32>> = if plan.slots > 1 {
        // SAFETY: a split tile's segments each write their part of slot (split) before the tile's
        // last block reads them.
        Some(unsafe { dev.alloc::<f32>(plan.slots * m * n)? })
    } else {
        None
    };
    let null = 0u64;
    let (mi, ni, ki, pi) = (m as i32, n as i32, k as i32, plan.per_block as i32);
    let mut b = stream.launch_builder(&f);
    b.arg(wq).arg(sw).arg(xq).arg(sx).arg(&y);
    match &partial {
        Some(p) => b.arg(p),
        None => b.arg(&null),
    };
    b.arg(counters).arg(&mi).arg(&ni).arg(&ki).arg(&pi);
    let cfg = LaunchConfig {
        grid_dim: (plan.blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: matches `fp8wg_*` (kernels/fp8_wgmma.cu): wq n*k codes, xq m*k codes (rows of
    // k % 128 == 0 bytes from a 256-byte-aligned allocation), sw n, sx m, y m*n, partial slots*m*n, counters one per tile
    // of a splitting schedule (at most 16 activation blocks per 128 output rows, within the
    // n/16*16 the caller passes); shared memory opted in.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    drop(partial);
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_cover_every_row_count() {
        for (m, rows) in [
            (1, 16),
            (16, 16),
            (17, 32),
            (32, 32),
            (33, 64),
            (64, 64),
            (65, 64),
        ] {
            assert_eq!(shape(m).rows, rows, "m = {m}");
        }
        for m in [16, 32, 64] {
            let sh = shape(m);
            assert!(sh.shared_bytes(sh.max_steps()) <= MAX_SHARED);
        }
    }

    #[test]
    fn blocks_share_k_steps_within_shared_memory() {
        // gate/up and down at 16-64 rows: 112 and 32 tiles on 132 SMs, shared out 28 steps a block.
        for m in [16, 32, 64] {
            let sh = shape(m);
            for (n, k) in [(14336, 4096), (4096, 14336)] {
                let p = plan(sh, n, m, k, 132);
                assert_eq!((p.per_block, p.blocks), (28, 128), "{n}x{k} m={m}");
            }
        }
        // 448 whole tiles of 32 steps at 64 rows: more than the 28 steps whose activations fit.
        let sh = shape(64);
        let p = plan(sh, 57344, 64, 4096, 132);
        assert_eq!((p.per_block, p.slots), (28, 2));
        assert!(p.per_block <= sh.max_steps());
        // Whole tiles at 16 rows: 112 steps fit (14 KiB... 224 KiB of activations).
        let p = plan(shape(16), 57344, 16, 14336, 132);
        assert_eq!((p.per_block, p.slots), (112, 1));
    }
}
