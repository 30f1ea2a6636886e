//! `y = x · Wᵀ` for one activation row with an unquantized bf16 / f16 weight
//! (`kernels/dense_gemv.cu`): decode at batch 1 reads each weight once per step, and cuBLAS's GEMM
//! at one row leaves bandwidth unused (most on the small projections). From two rows on cuBLAS is
//! as fast or faster (measured, docs/benchmarks.md), so it takes those. The reference is the f32
//! product of the same values (`tests/cuda_kernels.rs`).

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Tensor};

use super::fused_ops::{AddNorm, NormTailArg};
use super::{cuda_device, device_view, dtype_name, function, tensor_from_storage};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dense_gemv.fatbin"));

/// Activation rows the kernel takes.
pub const MAX_ROWS: usize = 1;
/// Output rows per block (kernels/dense_gemv.cu `DG_WARPS`).
const ROWS_PER_BLOCK: usize = 8;
const _: () = assert!(ROWS_PER_BLOCK * 32 == super::fused_ops::ARN_THREADS);

/// `Some(x · wᵀ)` through the kernel, `None` where it does not apply (more than [`MAX_ROWS`]
/// rows, a dtype other than bf16/f16 or differing between `x` and `w`, `in` not a multiple of 8,
/// unaligned or non-contiguous data): the caller then uses cuBLAS. `w`: `[out, in]`, `x`:
/// `[.., in]` on the same GPU.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>, QuantError> {
    Ok(gemv_group(x, &[w])?.map(|mut ys| ys.remove(0)))
}

/// [`gemv`] for 1 to 3 weights sharing `x` (q/k/v, gate/up) in one launch, `Some` only where the
/// kernel applies to all of them (same dtype and `in`).
pub fn gemv_group(x: &Tensor, ws: &[&Tensor]) -> Result<Option<Vec<Tensor>>, QuantError> {
    let Some((m, k)) = fits(x, ws)? else {
        return Ok(None);
    };
    let dev = cuda_device(ws[0], "dense gemv weight")?;
    let s = match ws[0].dtype() {
        DType::BF16 => launch::<half::bf16>(dev, x, ws, m, k)?,
        _ => launch::<half::f16>(dev, x, ws, m, k)?,
    };
    let mut out = Vec::with_capacity(ws.len());
    for (s, w) in s.into_iter().zip(ws) {
        out.push(tensor_from_storage(s, out_shape(x, w.dim(0)?)));
    }
    Ok(Some(out))
}

/// `SiLU(x · gateᵀ) * (x · upᵀ)` in one launch (the MLP's activation at one row, rounded as
/// `fused_ops::silu_mul` of the two [`gemv`] outputs rounds it), `None` where the kernel does
/// not apply (as [`gemv_group`], or gate and up of different shapes).
pub fn silu_mul_gemv(x: &Tensor, gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>, QuantError> {
    let Some((_, k)) = fits(x, &[gate, up])? else {
        return Ok(None);
    };
    if gate.dims() != up.dims() {
        return Ok(None);
    }
    let n = gate.dim(0)?;
    let dev = cuda_device(gate, "dense gemv weight")?;
    let s = match gate.dtype() {
        DType::BF16 => launch_silu::<half::bf16>(dev, x, gate, up, n, k)?,
        _ => launch_silu::<half::f16>(dev, x, gate, up, n, k)?,
    };
    Ok(Some(tensor_from_storage(s, out_shape(x, n))))
}

/// [`gemv`] of one row whose output `d` goes through `tail`'s residual add and RMSNorm in the same
/// launch (its last block): `Some((s, y))`, rounded as [`gemv`] then
/// [`super::fused_ops::add_rms_norm`]; `None` where either does not apply.
pub fn gemv_add_rms_norm(
    x: &Tensor,
    w: &Tensor,
    tail: &AddNorm,
) -> Result<Option<(Tensor, Tensor)>, QuantError> {
    let Some((_, k)) = fits(x, &[w])? else {
        return Ok(None);
    };
    let n = w.dim(0)?;
    if !tail.fits(n, w.dtype())? {
        return Ok(None);
    }
    let dev = cuda_device(w, "dense gemv weight")?;
    let (_, s, y) = match w.dtype() {
        DType::BF16 => {
            tail.run::<half::bf16, _>(dev, n, |nt| launch_norm::<half::bf16>(dev, x, w, n, k, nt))?
        }
        _ => {
            tail.run::<half::f16, _>(dev, n, |nt| launch_norm::<half::f16>(dev, x, w, n, k, nt))?
        }
    };
    Ok(Some((s, y)))
}

/// `x`'s shape with its last dimension `n`.
fn out_shape(x: &Tensor, n: usize) -> Vec<usize> {
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("x has rank >= 1") = n;
    shape
}

/// `Some((rows, in))` where the kernel takes `x` and the weights `ws` (1 to 3, bf16/f16 like x,
/// `in` a multiple of 8, at most [`MAX_ROWS`] rows, contiguous and 16-byte aligned, one GPU).
fn fits(x: &Tensor, ws: &[&Tensor]) -> Result<Option<(usize, usize)>, QuantError> {
    let Some(&w0) = ws.first() else {
        return Ok(None);
    };
    let dtype = w0.dtype();
    if ws.len() > 3 || x.dtype() != dtype || !matches!(dtype, DType::BF16 | DType::F16) {
        return Ok(None);
    }
    let k = match x.dims().last() {
        Some(&k) if k > 0 && k.is_multiple_of(8) => k,
        _ => return Ok(None),
    };
    let m = x.elem_count() / k;
    if m == 0 || m > MAX_ROWS {
        return Ok(None);
    }
    let aligned = |t: &Tensor| t.is_contiguous() && t.layout().start_offset().is_multiple_of(8);
    if !aligned(x) {
        return Ok(None);
    }
    for w in ws {
        if w.dtype() != dtype
            || w.rank() != 2
            || w.dim(1)? != k
            || w.dim(0)? == 0
            || !aligned(w)
            || !x.device().same_device(w.device())
        {
            return Ok(None);
        }
    }
    Ok(Some((m, k)))
}

/// Kernel argument `DGroup` (kernels/dense_gemv.cu): the second and third weight of a grouped
/// launch and the first block of each (`b1 = b2 = grid` for one weight).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DGroup {
    w: [u64; 2],
    y: [u64; 2],
    n: [i32; 2],
    b1: i32,
    b2: i32,
}

// SAFETY: plain old data laid out as the kernel's `DGroup` (repr(C), 8-byte pointers, ints).
unsafe impl DeviceRepr for DGroup {}

fn launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x: &Tensor,
    ws: &[&Tensor],
    m: usize,
    k: usize,
) -> Result<Vec<CudaStorage>, QuantError> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let stream = dev.cuda_stream();
    let (xs, xl) = x.storage_and_layout();
    let xv = device_view::<T>(&xs, xl, m * k, "dense gemv: x")?;
    let rows: Vec<usize> = ws.iter().map(|w| w.dim(0)).collect::<Result<_, _>>()?;
    // SAFETY: the kernel writes every one of the m × n_j outputs of each weight.
    let ys = rows
        .iter()
        .map(|&nj| unsafe { dev.alloc::<T>(m * nj) })
        .collect::<Result<Vec<_>, _>>()?;
    let storages: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let views = storages
        .iter()
        .zip(&rows)
        .map(|((s, l), &nj)| device_view::<T>(s, l, nj * k, "dense gemv: weight"))
        .collect::<Result<Vec<_>, _>>()?;
    let per: Vec<usize> = rows.iter().map(|n| n.div_ceil(ROWS_PER_BLOCK)).collect();
    let (total, [b1, b2]) = super::group_blocks(&per);
    let mut group = DGroup {
        b1,
        b2,
        ..Default::default()
    };
    // The guards keep the pointers' buffers ordered before the launch.
    let mut guards = Vec::new();
    for i in 1..ws.len() {
        let (wp, gw) = views[i].device_ptr(&stream);
        let (yp, gy) = ys[i].device_ptr(&stream);
        guards.extend([gw, gy]);
        group.w[i - 1] = wp;
        group.y[i - 1] = yp;
        group.n[i - 1] = rows[i] as i32;
    }
    let f = function(
        dev,
        "dense_gemv",
        FATBIN,
        &format!("dense_gemv_{}", dtype_name(ws[0].dtype())),
    )?;
    let mut b = stream.launch_builder(&f);
    let (ni, ki) = (rows[0] as i32, k as i32);
    b.arg(&views[0])
        .arg(&xv)
        .arg(&ys[0])
        .arg(&ni)
        .arg(&ki)
        .arg(&group);
    let cfg = LaunchConfig {
        grid_dim: (total as u32, 1, 1),
        block_dim: ((ROWS_PER_BLOCK * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `dense_gemv_*`: every weight [n_j, k] and x [1, k] contiguous
    // with 16-byte aligned rows (k % 8 == 0, offsets checked), output j [1, n_j].
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    drop(guards);
    Ok(super::storages(ys, dev))
}

/// Launches `{kernel}_{dtype}` over one row of `x` (`[1, k]`) and the weights `ws` (each
/// `[n, k]`), arguments `(ws.., x, y, n, k[, tail])`, one warp per output; returns `y` (`[1, n]`).
fn launch_one_row<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    kernel: &str,
    x: &Tensor,
    ws: &[&Tensor],
    n: usize,
    k: usize,
    tail: Option<&NormTailArg>,
) -> Result<CudaSlice<T>, QuantError> {
    let stream = dev.cuda_stream();
    let (xs, xl) = x.storage_and_layout();
    let xv = device_view::<T>(&xs, xl, k, "dense gemv: x")?;
    let storages: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let views = storages
        .iter()
        .map(|(s, l)| device_view::<T>(s, l, n * k, "dense gemv: weight"))
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: the kernel writes every one of the n outputs.
    let y = unsafe { dev.alloc::<T>(n)? };
    let name = format!("{kernel}_{}", dtype_name(x.dtype()));
    let f = function(dev, "dense_gemv", FATBIN, &name)?;
    let mut b = stream.launch_builder(&f);
    let (ni, ki) = (n as i32, k as i32);
    for v in &views {
        b.arg(v);
    }
    b.arg(&xv).arg(&y).arg(&ni).arg(&ki);
    if let Some(nt) = tail {
        b.arg(nt);
    }
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: ((ROWS_PER_BLOCK * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `dense_gemv_silu_*` (gate, up) and `dense_gemv_norm_*` (one
    // weight and a tail): weights [n, k] and x [1, k] contiguous with 16-byte aligned rows
    // (checked by `fits`), output [1, n]; a tail's buffers hold n values (`AddNorm::fits`), its
    // blocks of ROWS_PER_BLOCK warps are ARN_THREADS threads.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(y)
}

fn launch_silu<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    n: usize,
    k: usize,
) -> Result<CudaStorage, QuantError> {
    let y = launch_one_row::<T>(dev, "dense_gemv_silu", x, &[gate, up], n, k, None)?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The GEMV's output is the tail's input only (dropped after the launch, stream-ordered).
fn launch_norm<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    n: usize,
    k: usize,
    nt: &NormTailArg,
) -> Result<(), QuantError> {
    launch_one_row::<T>(dev, "dense_gemv_norm", x, &[w], n, k, Some(nt))?;
    Ok(())
}
