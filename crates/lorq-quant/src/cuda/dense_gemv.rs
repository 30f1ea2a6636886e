//! `y = x · Wᵀ` for one activation row with an unquantized bf16 / f16 weight
//! (`kernels/dense_gemv.cu`): decode at batch 1 reads each weight once per step, and cuBLAS's GEMM
//! at one row leaves bandwidth unused (most on the small projections). From two rows on cuBLAS is
//! as fast or faster (measured, docs/benchmarks.md), so it takes those. The reference is the f32
//! product of the same values (`tests/cuda_kernels.rs`).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Tensor};

use super::{cuda_device, device_view, dtype_name, function, tensor_from_storage};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dense_gemv.fatbin"));

/// Activation rows the kernel takes.
pub const MAX_ROWS: usize = 1;
/// Output rows per block (kernels/dense_gemv.cu `DG_WARPS`).
const ROWS_PER_BLOCK: usize = 8;

/// `Some(x · wᵀ)` through the kernel, `None` where it does not apply (more than [`MAX_ROWS`]
/// rows, a dtype other than bf16/f16 or differing between `x` and `w`, `in` not a multiple of 8,
/// unaligned or non-contiguous data): the caller then uses cuBLAS. `w`: `[out, in]`, `x`:
/// `[.., in]` on the same GPU.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>, QuantError> {
    let dtype = w.dtype();
    if x.dtype() != dtype || !matches!(dtype, DType::BF16 | DType::F16) || w.rank() != 2 {
        return Ok(None);
    }
    let (n, k) = (w.dim(0)?, w.dim(1)?);
    if k == 0 || !k.is_multiple_of(8) || x.dims().last() != Some(&k) || n == 0 {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    if m == 0 || m > MAX_ROWS {
        return Ok(None);
    }
    let aligned = |t: &Tensor| t.is_contiguous() && t.layout().start_offset().is_multiple_of(8);
    if !aligned(x) || !aligned(w) {
        return Ok(None);
    }
    let dev = cuda_device(w, "dense gemv weight")?;
    if !x.device().same_device(w.device()) {
        return Ok(None);
    }
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("x has rank >= 1") = n;
    let s = match dtype {
        DType::BF16 => launch::<half::bf16>(dev, x, w, m, n, k)?,
        _ => launch::<half::f16>(dev, x, w, m, n, k)?,
    };
    Ok(Some(tensor_from_storage(s, out_shape)))
}

fn launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    m: usize,
    n: usize,
    k: usize,
) -> Result<CudaStorage, QuantError> {
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let xv = device_view::<T>(&xs, xl, m * k, "dense gemv: x")?;
    let wv = device_view::<T>(&ws, wl, n * k, "dense gemv: weight")?;
    // SAFETY: the kernel writes every one of the m × n outputs.
    let y = unsafe { dev.alloc::<T>(m * n)? };
    let f = function(
        dev,
        "dense_gemv",
        FATBIN,
        &format!("dense_gemv_{}", dtype_name(w.dtype())),
    )?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let (ni, ki) = (n as i32, k as i32);
    b.arg(&wv).arg(&xv).arg(&y).arg(&ni).arg(&ki);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: ((ROWS_PER_BLOCK * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `dense_gemv_*`: w [n, k] and x [1, k] contiguous with 16-byte
    // aligned rows (k % 8 == 0, offsets checked), y [1, n].
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}
