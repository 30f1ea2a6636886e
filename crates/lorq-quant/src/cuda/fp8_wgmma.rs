//! The W8A8 FP8 product on Hopper's warpgroup tensor-core instruction (`kernels/fp8_wgmma.cu`:
//! `wgmma` m64nNk32 e4m3, compute capability 9.0). It reads the same buffers as the cuBLASLt path
//! and `fp8_mma.rs` (row-major e4m3 weight codes and f32 row scales, activation codes and
//! per-token scales as `quantize_activations` writes them), copied into shared memory by the
//! tensor-memory accelerator through tensor maps made here per call (host work only).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, WithDType};

use super::dependent_launch::KernelArgs;
use super::qmma_tiled::KSTEP;
use super::qwgmma::schedule;
use super::{dtype_name, function_with_shared};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fp8_wgmma.fatbin"));

/// Threads per block: two consumer warpgroups and a producer (kernels/fp8_wgmma.cu
/// `fp8wg::THREADS`).
const THREADS: u32 = 384;

/// Output rows of a tile (`fp8wg::ROWS`): the weight's box height.
const TILE_ROWS: usize = 128;

/// K steps a stage of the ring holds (the `G` of every kernels/fp8_wgmma.cu `FP8WG_CFG_*`).
const STAGE_STEPS: usize = 2;

/// A block shape (kernels/fp8_wgmma.cu `FP8WG_CFG_*`): its activation rows and the stages of its
/// ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    name: &'static str,
    rows: usize,
    stages: usize,
}

impl Shape {
    /// Dynamic shared memory: the ring (each stage [`STAGE_STEPS`] K steps of 128 weight rows and
    /// `rows` activation rows, 128 bytes each) and 1 KiB to align it to the swizzle's 1024-byte
    /// atoms.
    fn shared_bytes(self) -> usize {
        self.stages * STAGE_STEPS * (TILE_ROWS + self.rows) * KSTEP + 1024
    }
}

/// The narrowest block that holds `m` activation rows (16, 32, 64, 128); past 128 rows, blocks of
/// 128.
pub fn shape(m: usize) -> Shape {
    let (name, rows, stages) = match m {
        0..=16 => ("n16", 16, 6),
        17..=32 => ("n32", 32, 5),
        33..=64 => ("n64", 64, 4),
        _ => ("n128", 128, 3),
    };
    Shape { name, rows, stages }
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
/// up to 128 rows of weights with at least 8192 inputs (down_proj of an 8B model), and 17-64 rows
/// of weights with more than 1024 output rows. There it beat lorq's mma kernel and cuBLASLt on an
/// H200 (docs/benchmarks.md, session 33: 4096x14336 at 32 rows 20.4 us against 29.4 and 37.8, at
/// 128 rows 22.8 against cuBLASLt's 37.5 in the lab; 14336x4096 at 32 rows 22.5 against 38.5 and
/// 24.0). At 1-16 rows of 4096-input weights the mma kernel was as fast or faster, on 1024-row
/// weights (k/v) at every row count, and past 64 rows of 4096-input weights cuBLASLt.
pub fn takes(n: usize, m: usize, k: usize, dev: &CudaDevice) -> bool {
    let long_k = k >= 8192 && (1..=128).contains(&m);
    let wide = n > 1024 && (17..=64).contains(&m);
    (long_k || wide) && supports(k, dev)
}

/// The most tiles (128 output rows x a block's activation rows) whose K steps are shared out over
/// the SMs: fewer than one per SM. More tiles run whole, one block each.
fn split_until(sms: usize) -> usize {
    sms.saturating_sub(1)
}

/// The launch's schedule: [`schedule`] with this kernel's split threshold.
fn plan(sh: Shape, n: usize, m: usize, k: usize, sms: usize) -> super::qwgmma::Schedule {
    schedule(n, m, k, sh.rows, sms, split_until(sms))
}

/// A `CUtensorMap`, passed by value as the kernel's `__grid_constant__` `fp8wg::TensorMap`.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TensorMap(sys::CUtensorMap);

// SAFETY: 128 plain bytes, 64-byte aligned: the layout of the kernel's `fp8wg::TensorMap`.
unsafe impl DeviceRepr for TensorMap {}

/// The tensor map of `rows` x `cols` row-major bytes at `ptr`, copied in boxes of 128 bytes x
/// `box_rows` rows, 128-byte swizzled (as `wgmma` reads K-major operands); rows past `rows` arrive
/// as zeros.
fn tensor_map(
    ptr: sys::CUdeviceptr,
    rows: usize,
    cols: usize,
    box_rows: usize,
    what: &str,
) -> Result<TensorMap, QuantError> {
    // The copy engine's rules: a 16-byte aligned start and row pitch, at most 256 rows a box.
    if !ptr.is_multiple_of(16) || !cols.is_multiple_of(16) || box_rows > 256 || rows == 0 {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: the {what} ([{rows}, {cols}] bytes at {ptr:#x}) cannot be copied by \
             tensor maps (16-byte aligned rows needed)"
        )));
    }
    let dims = [cols as u64, rows as u64];
    let strides = [cols as u64];
    let boxes = [KSTEP as u32, box_rows as u32];
    let elements = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: the arrays hold rank 2 (strides rank - 1) entries; the map is written by the call.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elements.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: cuTensorMapEncodeTiled refused the {what} ([{rows}, {cols}] bytes, \
             boxes of {box_rows} rows): {r:?}"
        )));
    }
    // SAFETY: written by the successful call above.
    Ok(TensorMap(unsafe { map.assume_init() }))
}

/// A product's output (and split-K partial sums), allocated before its activations are quantized:
/// the quantization kernel and this one are then adjacent in the stream, so that a graph capture
/// joins them by a programmatic edge (`dependent_launch`; an allocation between them would be a
/// graph node of its own).
pub(crate) struct Output {
    y: CudaStorage,
    partial: Option<CudaSlice<f32>>,
    shape: Shape,
    plan: super::qwgmma::Schedule,
    dims: (usize, usize, usize),
}

/// The output `[m, n]` in `dtype` (bf16/f16/f32) of an `[n, k]` weight's product at `m` rows.
pub(crate) fn output(
    dev: &CudaDevice,
    dtype: DType,
    (m, n, k): (usize, usize, usize),
) -> Result<Output, QuantError> {
    if !supports(k, dev) || m == 0 {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: needs compute capability 9.0, in_features % 128 == 0 and m > 0, got \
             [{n}, {k}] at {m} rows"
        )));
    }
    let shape = shape(m);
    let plan = plan(shape, n, m, k, super::qmma_tiled::multiprocessors(dev));
    if !matches!(dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: writes bf16, f16 or f32, not {dtype:?}"
        )));
    }
    // SAFETY: every output element is written by the kernel.
    let y = unsafe { dev.alloc_uninit(&(m, n).into(), dtype)? };
    let partial = if plan.slots > 1 {
        // SAFETY: a split tile's segments each write their part of slot (split) before the tile's
        // last block reads them.
        Some(unsafe { dev.alloc::<f32>(plan.slots * m * n)? })
    } else {
        None
    };
    Ok(Output {
        y,
        partial,
        shape,
        plan,
        dims: (m, n, k),
    })
}

/// `y[m, n] = (xq · wqᵀ) · sx[m] · sw[n]` into `out` (from [`output`]): `wq` `[n, k]` and `xq`
/// `[m, k]` row-major e4m3 codes, `sw` n and `sx` m f32 scales; `counters` the weight's split-K
/// tickets (zero between launches, at least `n.div_ceil(16) * 16`: the packed layout's). Launched
/// as a programmatic dependent of the kernel before it (`dependent_launch`).
pub(crate) fn gemm(
    dev: &CudaDevice,
    out: Output,
    wq: &CudaView<'_, u8>,
    sw: &CudaView<'_, f32>,
    xq: &CudaView<'_, u8>,
    sx: &CudaView<'_, f32>,
    counters: &CudaSlice<u32>,
) -> Result<CudaStorage, QuantError> {
    let (sh, plan, (m, n, k)) = (out.shape, out.plan, out.dims);
    if xq.len() < m * k
        || wq.len() < n * k
        || sw.len() < n
        || sx.len() < m
        || counters.len() < n.div_ceil(16) * 16
    {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: needs buffers of [{n}, {k}] codes, {n} weight scales, [{m}, {k}] \
             activation codes, {m} activation scales and the weight's split-K counters"
        )));
    }
    let tiles = n.div_ceil(128) * m.div_ceil(sh.rows);
    if plan.slots > 1 && tiles > counters.len() {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: {tiles} split tiles ([{n}, {k}] at {m} rows) but {} split-K counters",
            counters.len()
        )));
    }
    match out.y.dtype() {
        DType::BF16 => launch::<half::bf16>(dev, &out, wq, sw, xq, sx, counters)?,
        DType::F16 => launch::<half::f16>(dev, &out, wq, sw, xq, sx, counters)?,
        _ => launch::<f32>(dev, &out, wq, sw, xq, sx, counters)?,
    }
    Ok(out.y)
}

fn launch<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    out: &Output,
    wq: &CudaView<'_, u8>,
    sw: &CudaView<'_, f32>,
    xq: &CudaView<'_, u8>,
    sx: &CudaView<'_, f32>,
    counters: &CudaSlice<u32>,
) -> Result<(), QuantError> {
    let (sh, plan, (m, n, k)) = (out.shape, out.plan, out.dims);
    let stream = dev.cuda_stream();
    let smem = sh.shared_bytes();
    let f = function_with_shared(
        dev,
        "fp8_wgmma",
        FATBIN,
        &format!("fp8wg_{}_{}", dtype_name(T::DTYPE), sh.name),
        smem,
    )?;
    let y = out.y.as_cuda_slice::<T>()?;
    // The codes are read through tensor maps: their guards order the buffers' other users
    // around this launch, as the views passed as arguments would.
    let (wp, wguard) = wq.device_ptr(&stream);
    let (xp, xguard) = xq.device_ptr(&stream);
    let mw = tensor_map(wp, n, k, TILE_ROWS, "weight codes")?;
    let mx = tensor_map(xp, m, k, sh.rows, "activation codes")?;
    let (mi, ni, ki, pi) = (m as i32, n as i32, k as i32, plan.per_block as i32);
    let mut b = KernelArgs::new(&stream);
    b.val(&mw).buf(sw).val(&mx).buf(sx).buf(y);
    match &out.partial {
        Some(p) => b.buf(p),
        None => b.address(0),
    };
    b.buf(counters).val(&mi).val(&ni).val(&ki).val(&pi);
    let cfg = LaunchConfig {
        grid_dim: (plan.blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: matches `fp8wg_*` (kernels/fp8_wgmma.cu): the maps describe wq's n*k and xq's m*k
    // codes (checked by the caller), sw n, sx m, y m*n, partial slots*m*n, counters one per tile
    // of a splitting schedule (at most 16 activation blocks per 128 output rows, within the
    // n/16*16 the caller passes); shared memory opted in. The kernel copies only weight codes
    // before `wait_for_producers()`.
    unsafe { b.launch_dependent(&f, cfg) }?;
    drop((wguard, xguard));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dynamic shared memory a block may ask for: Hopper's 227 KiB opt-in less 1 KiB for the
    /// kernel's static shared memory (227 KiB of dynamic memory alone is refused at launch).
    const MAX_SHARED: usize = 226 * 1024;

    #[test]
    fn shapes_cover_every_row_count() {
        for (m, rows) in [
            (1, 16),
            (16, 16),
            (17, 32),
            (32, 32),
            (33, 64),
            (64, 64),
            (65, 128),
            (128, 128),
            (300, 128),
        ] {
            assert_eq!(shape(m).rows, rows, "m = {m}");
        }
        for m in [16, 32, 64, 128] {
            let sh = shape(m);
            assert!(sh.shared_bytes() <= MAX_SHARED, "m = {m}");
            // The ring holds at least 3 stages (two in flight while one is summed) and 6 K steps.
            assert!(sh.stages >= 3 && sh.stages * STAGE_STEPS >= 6, "m = {m}");
        }
    }

    #[test]
    fn blocks_share_k_steps() {
        // gate/up and down at 16-64 rows: 112 and 32 tiles on 132 SMs, shared out 28 steps a block.
        for m in [16, 32, 64] {
            let sh = shape(m);
            for (n, k) in [(14336, 4096), (4096, 14336)] {
                let p = plan(sh, n, m, k, 132);
                assert_eq!((p.per_block, p.blocks), (28, 128), "{n}x{k} m={m}");
            }
        }
        // 448 whole tiles at 64 rows: one block each, every K step.
        let p = plan(shape(64), 57344, 64, 4096, 132);
        assert_eq!((p.per_block, p.slots, p.blocks), (32, 1, 448));
        // down_proj at 128 rows: one 128-row activation block, 32 tiles shared out.
        let p = plan(shape(128), 4096, 128, 14336, 132);
        assert_eq!((p.per_block, p.blocks), (28, 128));
        let p = plan(shape(16), 57344, 16, 14336, 132);
        assert_eq!((p.per_block, p.slots), (112, 1));
    }
}
