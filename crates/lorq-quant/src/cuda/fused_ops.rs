//! Fused decoder elementwise ops on the GPU (`kernels/fused_ops.cu`): residual add + RMSNorm in
//! one pass, and SiLU(gate)·up. Each replaces two or three of candle's launches and one round
//! trip of the activation through memory; candle's ops are the reference. And the embedding
//! lookup and a column gather, which candle's `index_select` cannot do inside a CUDA graph (it
//! uploads the index layout from the host at every call).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Tensor};

use super::fp8_gemm::QuantizedActivations;
use super::{cuda_device, device_view, function, tensor_from_storage};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused_ops.fatbin"));

const THREADS: u32 = 256;

fn dtype_name(dtype: DType) -> Result<&'static str, QuantError> {
    Ok(match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        d => {
            return Err(QuantError::Invalid(format!(
                "fused ops: unsupported dtype {d:?} (f32, bf16 or f16)"
            )))
        }
    })
}

/// Contiguous copies where needed, all of `dtype` on `x`'s GPU.
fn prepared(ts: &[(&Tensor, &str)], dtype: DType) -> Result<Vec<Tensor>, QuantError> {
    ts.iter()
        .map(|(t, what)| {
            if t.dtype() != dtype {
                return Err(QuantError::Invalid(format!(
                    "fused ops: {what} is {:?}, expected {dtype:?}",
                    t.dtype()
                )));
            }
            cuda_device(t, what)?;
            // Contiguous from a 16-byte aligned start: the vectorized kernels' loads.
            super::aligned(t, 16)
        })
        .collect()
}

/// A scalar kernel argument after the pointers.
enum Scalar {
    I32(i32),
    F32(f32),
    U64(u64),
}

/// What a fused kernel writes: `count` fresh outputs of `len` elements of the activation dtype,
/// then `fp8`'s codes and scales for the kernels that also quantize their output.
struct Outputs<'a> {
    count: usize,
    len: usize,
    fp8: Option<&'a QuantizedActivations>,
}

/// Launches `name` over the prepared inputs and `outs`.
fn launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    name: &str,
    ins: &[Tensor],
    outs: Outputs,
    cfg: LaunchConfig,
    scalars: &[Scalar],
) -> Result<Vec<CudaStorage>, QuantError> {
    let guards: Vec<_> = ins.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(ins.len());
    for (g, t) in guards.iter().zip(ins) {
        views.push(device_view::<T>(
            &g.0,
            g.1,
            t.elem_count(),
            "fused ops: input",
        )?);
    }
    let mut out = Vec::with_capacity(outs.count);
    for _ in 0..outs.count {
        // SAFETY: every element is written by the kernel.
        out.push(unsafe { dev.alloc::<T>(outs.len.max(1))? });
    }
    let f = function(dev, "fused_ops", FATBIN, name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    for v in &views {
        b.arg(v);
    }
    for o in &out {
        b.arg(o);
    }
    if let Some(q) = outs.fp8 {
        b.arg(&q.codes).arg(&q.scales);
    }
    for sc in scalars {
        match sc {
            Scalar::I32(v) => b.arg(v),
            Scalar::F32(v) => b.arg(v),
            Scalar::U64(v) => b.arg(v),
        };
    }
    // SAFETY: the caller's name, inputs, outputs and scalars match the kernel's signature.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(out
        .into_iter()
        .map(|o| CudaStorage::wrap_cuda_slice(o, dev.clone()))
        .collect())
}

/// 8-element chunks per thread of `add_rms_norm_vec_*` (kernels/rms_norm.cuh `ARN_CHUNKS`).
const ARN_CHUNKS: usize = 4;
/// Threads of `add_rms_norm_vec_*` up to `8 * ARN_THREADS * ARN_CHUNKS` values per row, and of every
/// GEMV block that runs the same norm as its tail (kernels/rms_norm.cuh `ARN_THREADS`): the same
/// thread for each chunk, so both round the same.
pub(crate) const ARN_THREADS: usize = 256;

/// The residual add + RMSNorm that a one-row dense GEMV runs on its output `d` in its last block
/// (kernels/rms_norm.cuh `norm_tail`, decode at batch 1 without the norm's own launch):
/// `s = residual + d`, `y = RMSNorm(s) · weight`, rounded as [`add_rms_norm`] rounds them.
/// `ticket`: one zeroed `u32` on the GPU; every launch leaves it at zero, so one serves a whole
/// stream of launches (not two streams at once).
pub struct AddNorm<'a> {
    pub residual: &'a Tensor,
    pub weight: &'a Tensor,
    pub eps: f32,
    pub ticket: &'a Tensor,
}

impl AddNorm<'_> {
    /// Whether a GEMV writing one row of `n` values of `dtype` can run this tail: the residual
    /// one row of `n`, the weight `[n]`, both of `dtype` (bf16/f16) on one GPU, `n` a multiple of
    /// 8 up to what one block's threads hold, a `u32` ticket.
    pub(crate) fn fits(&self, n: usize, dtype: DType) -> Result<bool, QuantError> {
        Ok(norm_operands_fit(self.residual, self.weight, n, dtype)
            && self.ticket.dtype() == DType::U32
            && self.ticket.elem_count() >= 1
            && same_gpu(self.ticket, self.residual))
    }

    /// Runs `launch` with the kernel argument for this tail (fresh `s` and `y` of `n` values),
    /// then returns `launch`'s result with `(s, y)` shaped like the residual. The caller checked
    /// [`Self::fits`].
    pub(crate) fn run<T: CudaDType + DeviceRepr, R>(
        &self,
        dev: &CudaDevice,
        n: usize,
        launch: impl FnOnce(&NormTailArg) -> Result<R, QuantError>,
    ) -> Result<(R, Tensor, Tensor), QuantError> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let stream = dev.cuda_stream();
        let residual = super::aligned(self.residual, 16)?;
        let weight = super::aligned(self.weight, 16)?;
        let ticket = self.ticket.contiguous()?;
        let (rs, rl) = residual.storage_and_layout();
        let rv = device_view::<T>(&rs, rl, n, "norm tail: residual")?;
        let (ws, wl) = weight.storage_and_layout();
        let wv = device_view::<T>(&ws, wl, n, "norm tail: norm weight")?;
        let (ts, tl) = ticket.storage_and_layout();
        let tv = device_view::<u32>(&ts, tl, 1, "norm tail: ticket")?;
        // SAFETY: the tail writes all n values of both.
        let s = unsafe { dev.alloc::<T>(n)? };
        let y = unsafe { dev.alloc::<T>(n)? };
        let (x, gx) = rv.device_ptr(&stream);
        let (w, gw) = wv.device_ptr(&stream);
        let (sp, gs) = s.device_ptr(&stream);
        let (yp, gy) = y.device_ptr(&stream);
        let (t, gt) = tv.device_ptr(&stream);
        let arg = NormTailArg {
            x,
            w,
            s: sp,
            y: yp,
            ticket: t,
            hidden: n as i32,
            eps: self.eps,
        };
        let r = launch(&arg)?;
        drop((gx, gw, gs, gy, gt));
        let shape = self.residual.shape().clone();
        let s = tensor_from_storage(CudaStorage::wrap_cuda_slice(s, dev.clone()), shape.clone());
        let y = tensor_from_storage(CudaStorage::wrap_cuda_slice(y, dev.clone()), shape);
        Ok((r, s, y))
    }
}

/// Whether `t` is on the GPU `of` is on.
fn same_gpu(t: &Tensor, of: &Tensor) -> bool {
    t.device().is_cuda() && t.device().same_device(of.device())
}

/// Whether a norm fused into a one-row GEMV launch (its tail or its head) takes these operands:
/// the residual one row of `n`, the weight `[n]`, both of `dtype` (bf16/f16) on one GPU, `n` a
/// multiple of 8 up to what one block's threads hold (`add_rms_norm_vec` with ARN_THREADS).
fn norm_operands_fit(residual: &Tensor, weight: &Tensor, n: usize, dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
        && n.is_multiple_of(8)
        && n / 8 <= ARN_THREADS * ARN_CHUNKS
        && residual.elem_count() == n
        && residual.dtype() == dtype
        && weight.dims() == [n]
        && weight.dtype() == dtype
        && residual.device().is_cuda()
        && same_gpu(weight, residual)
}

/// The residual add + RMSNorm whose output is a one-row GEMV's input, run by the GEMV itself
/// before its product (kernels/qgemv_half2.cu `NormHead`: every block computes the norm into its
/// shared memory, one stores `s`; decode at batch 1 without the norm's own launch):
/// `s = residual + delta`, `x = RMSNorm(s) · weight`, rounded as [`add_rms_norm`] rounds them.
pub struct NormHead<'a> {
    pub residual: &'a Tensor,
    pub delta: &'a Tensor,
    pub weight: &'a Tensor,
    pub eps: f32,
}

impl NormHead<'_> {
    /// Whether a GEMV of `k` inputs of `dtype` can run this head: [`norm_operands_fit`] with
    /// `n = k`, the delta shaped like the residual.
    pub(crate) fn fits(&self, k: usize, dtype: DType) -> bool {
        norm_operands_fit(self.residual, self.weight, k, dtype)
            && self.delta.dims() == self.residual.dims()
            && self.delta.dtype() == dtype
            && same_gpu(self.delta, self.residual)
    }

    /// Runs `launch` with the kernel argument for this head (a fresh `s` of `k` values), then
    /// returns its result with `s` shaped like the residual. The caller checked [`Self::fits`].
    pub(crate) fn run<T: CudaDType + DeviceRepr, R>(
        &self,
        dev: &CudaDevice,
        k: usize,
        launch: impl FnOnce(&NormHeadArg) -> Result<R, QuantError>,
    ) -> Result<(R, Tensor), QuantError> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let stream = dev.cuda_stream();
        let residual = super::aligned(self.residual, 16)?;
        let delta = super::aligned(self.delta, 16)?;
        let weight = super::aligned(self.weight, 16)?;
        let (rs, rl) = residual.storage_and_layout();
        let rv = device_view::<T>(&rs, rl, k, "norm head: residual")?;
        let (ds, dl) = delta.storage_and_layout();
        let dv = device_view::<T>(&ds, dl, k, "norm head: delta")?;
        let (ws, wl) = weight.storage_and_layout();
        let wv = device_view::<T>(&ws, wl, k, "norm head: norm weight")?;
        // SAFETY: block 0 of the launch writes all k values.
        let s = unsafe { dev.alloc::<T>(k)? };
        let (x, gx) = rv.device_ptr(&stream);
        let (d, gd) = dv.device_ptr(&stream);
        let (w, gw) = wv.device_ptr(&stream);
        let (sp, gs) = s.device_ptr(&stream);
        let arg = NormHeadArg {
            x,
            d,
            w,
            s: sp,
            eps: self.eps,
        };
        let r = launch(&arg)?;
        drop((gx, gd, gw, gs));
        let shape = self.residual.shape().clone();
        let s = tensor_from_storage(CudaStorage::wrap_cuda_slice(s, dev.clone()), shape);
        Ok((r, s))
    }
}

/// Kernel argument `NormHead` (kernels/qgemv_half2.cu).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct NormHeadArg {
    x: u64,
    d: u64,
    w: u64,
    s: u64,
    eps: f32,
}

// SAFETY: plain old data laid out as the kernel's `NormHead` (repr(C): four 8-byte pointers, a
// float, padding to 8 bytes as the C struct has).
unsafe impl DeviceRepr for NormHeadArg {}

/// Kernel argument `NormTail` (kernels/rms_norm.cuh).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct NormTailArg {
    x: u64,
    w: u64,
    s: u64,
    y: u64,
    ticket: u64,
    hidden: i32,
    eps: f32,
}

// SAFETY: plain old data laid out as the kernel's `NormTail` (repr(C), 8-byte pointers, int, float).
unsafe impl DeviceRepr for NormTailArg {}

/// `s = x + d`, `y = RMSNorm(s) · w` (`x`, `d`: `[rows, hidden]`, `w`: `[hidden]`); returns `(s, y)`.
pub fn add_rms_norm(
    x: &Tensor,
    d: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor), QuantError> {
    let (s, y, _) = add_rms_norm_impl(x, d, w, eps, false)?.expect("always runs without fp8");
    Ok((s, y))
}

/// [`add_rms_norm`] that also quantizes `y` for the FP8 projection it feeds: e4m3 codes and one
/// scale per row, bit-identical to `fp8_gemm::quantize_activations(y, DynamicPerToken)`, in the
/// same launch (hand them over with `fp8_gemm::with_offered_activations`). `None` where the vectorized
/// kernel does not apply (`hidden` not a multiple of 8, or above 32768).
pub fn add_rms_norm_fp8(
    x: &Tensor,
    d: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<Option<(Tensor, Tensor, QuantizedActivations)>, QuantError> {
    Ok(add_rms_norm_impl(x, d, w, eps, true)?.map(|(s, y, q)| (s, y, q.expect("fp8 asked"))))
}

/// Threads of a one-block-per-row kernel holding its row's `chunks` 8-element chunks in registers
/// (`add_rms_norm_vec_*`, `silu_mul_fp8_*`): `ARN_THREADS` up to `ARN_CHUNKS` chunks each, then 1024.
fn row_threads(chunks: usize) -> u32 {
    if chunks <= ARN_THREADS * ARN_CHUNKS {
        ARN_THREADS as u32
    } else {
        1024
    }
}

/// The per-token e4m3 codes and scales a fused kernel writes for `rows` x `k` activations.
fn row_codes(dev: &CudaDevice, rows: usize, k: usize) -> Result<QuantizedActivations, QuantError> {
    // SAFETY: the kernels that take them write every code and every row's scale.
    Ok(QuantizedActivations {
        m: rows,
        k,
        codes: unsafe { dev.alloc::<u8>(rows * k)? },
        scales: unsafe { dev.alloc::<f32>(rows)? },
        per_tensor: false,
    })
}

type NormOut = (Tensor, Tensor, Option<QuantizedActivations>);

fn add_rms_norm_impl(
    x: &Tensor,
    d: &Tensor,
    w: &Tensor,
    eps: f32,
    fp8: bool,
) -> Result<Option<NormOut>, QuantError> {
    let dev = cuda_device(x, "x")?;
    let dtype = x.dtype();
    let (rows, hidden) = x.dims2()?;
    if d.dims() != x.dims() || w.dims() != [hidden] {
        return Err(QuantError::Invalid(format!(
            "add_rms_norm: x {:?}, residual {:?}, weight {:?} do not fit",
            x.dims(),
            d.dims(),
            w.dims()
        )));
    }
    // The vectorized kernels: 8-element chunks, up to ARN_CHUNKS per thread of 1024.
    let chunks = hidden / 8;
    let vec = hidden.is_multiple_of(8) && chunks <= 1024 * ARN_CHUNKS;
    if fp8 && !vec {
        return Ok(None);
    }
    let ins = prepared(&[(x, "x"), (d, "residual"), (w, "norm weight")], dtype)?;
    let (name, threads) = if vec {
        // ARN_THREADS threads up to their ARN_CHUNKS chunks each (hidden 8192; the GEMVs' norm
        // tails run the same), then 1024.
        let kernel = if fp8 {
            "add_rms_norm_fp8"
        } else {
            "add_rms_norm_vec"
        };
        (
            format!("{kernel}_{}", dtype_name(dtype)?),
            row_threads(chunks),
        )
    } else {
        (format!("add_rms_norm_{}", dtype_name(dtype)?), THREADS)
    };
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let q = if fp8 {
        Some(row_codes(dev, rows, hidden)?)
    } else {
        None
    };
    let push = [Scalar::I32(hidden as i32), Scalar::F32(eps)];
    let outs = Outputs {
        count: 2,
        len: rows * hidden,
        fp8: q.as_ref(),
    };
    let mut o = match dtype {
        DType::BF16 => launch::<half::bf16>(dev, &name, &ins, outs, cfg, &push)?,
        DType::F16 => launch::<half::f16>(dev, &name, &ins, outs, cfg, &push)?,
        _ => launch::<f32>(dev, &name, &ins, outs, cfg, &push)?,
    };
    let y = tensor_from_storage(o.pop().expect("two outputs"), (rows, hidden));
    let s = tensor_from_storage(o.pop().expect("two outputs"), (rows, hidden));
    Ok(Some((s, y, q)))
}

/// `SiLU(gate) · up`, elementwise, same shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor, QuantError> {
    let dev = cuda_device(gate, "gate")?;
    let dtype = gate.dtype();
    let name = format!("silu_mul_{}", dtype_name(dtype)?);
    if gate.dims() != up.dims() {
        return Err(QuantError::Invalid(format!(
            "silu_mul: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        )));
    }
    let ins = prepared(&[(gate, "gate"), (up, "up")], dtype)?;
    let n = gate.elem_count();
    let cfg = LaunchConfig {
        grid_dim: (
            (n.div_ceil(THREADS as usize)).clamp(1, 1 << 16) as u32,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let push = [Scalar::U64(n as u64)];
    let outs = Outputs {
        count: 1,
        len: n,
        fp8: None,
    };
    let mut o = match dtype {
        DType::BF16 => launch::<half::bf16>(dev, &name, &ins, outs, cfg, &push)?,
        DType::F16 => launch::<half::f16>(dev, &name, &ins, outs, cfg, &push)?,
        _ => launch::<f32>(dev, &name, &ins, outs, cfg, &push)?,
    };
    Ok(tensor_from_storage(
        o.pop().expect("one output"),
        gate.shape(),
    ))
}

/// [`silu_mul`] of `[rows, n]` rows that also quantizes the result for the FP8 projection it
/// feeds (down_proj): e4m3 codes and one scale per row, bit-identical to
/// `fp8_gemm::quantize_activations(y, DynamicPerToken)`, in the same launch (hand them over with
/// `fp8_gemm::with_offered_activations`). `None` where the one-block-per-row kernel does not apply
/// (`n` not a multiple of 8, or above `8 * 1024 * ARN_CHUNKS`).
pub fn silu_mul_fp8(
    gate: &Tensor,
    up: &Tensor,
) -> Result<Option<(Tensor, QuantizedActivations)>, QuantError> {
    let dev = cuda_device(gate, "gate")?;
    let dtype = gate.dtype();
    if gate.dims() != up.dims() {
        return Err(QuantError::Invalid(format!(
            "silu_mul_fp8: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        )));
    }
    let (rows, n) = gate.dims2()?;
    let chunks = n / 8;
    if !n.is_multiple_of(8) || chunks > 1024 * ARN_CHUNKS || rows == 0 {
        return Ok(None);
    }
    let ins = prepared(&[(gate, "gate"), (up, "up")], dtype)?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(chunks), 1, 1),
        shared_mem_bytes: 0,
    };
    let q = row_codes(dev, rows, n)?;
    let name = format!("silu_mul_fp8_{}", dtype_name(dtype)?);
    let push = [Scalar::I32(n as i32)];
    let outs = Outputs {
        count: 1,
        len: rows * n,
        fp8: Some(&q),
    };
    let mut o = match dtype {
        DType::BF16 => launch::<half::bf16>(dev, &name, &ins, outs, cfg, &push)?,
        DType::F16 => launch::<half::f16>(dev, &name, &ins, outs, cfg, &push)?,
        _ => launch::<f32>(dev, &name, &ins, outs, cfg, &push)?,
    };
    let y = tensor_from_storage(o.pop().expect("one output"), (rows, n));
    Ok(Some((y, q)))
}

/// The length of `t`, a GPU vector of u32 indices (`what` names it in errors, `dim` its axis).
fn index_vector(t: &Tensor, what: &str, dim: &str) -> Result<usize, QuantError> {
    if t.dtype() != DType::U32 || t.rank() != 1 {
        return Err(QuantError::Invalid(format!(
            "{what} must be u32 [{dim}], got {:?} {:?}",
            t.dtype(),
            t.dims()
        )));
    }
    cuda_device(t, what)?;
    Ok(t.dim(0)?)
}

/// Rows `ids` (`u32 [rows]` on the GPU) of `table` (`[vocab, hidden]`): `[rows, hidden]`. An id
/// past the vocabulary gives a zero row (callers check ids before they reach the GPU).
pub fn embed_rows(table: &Tensor, ids: &Tensor) -> Result<Tensor, QuantError> {
    let dev = cuda_device(table, "embedding table")?;
    let dtype = table.dtype();
    let name = format!("embed_rows_{}", dtype_name(dtype)?);
    let (vocab, hidden) = table.dims2()?;
    let rows = index_vector(ids, "embed_rows: ids", "rows")?;
    let table = table.contiguous()?;
    let ids = ids.contiguous()?;
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        table: &Tensor,
        ids: &Tensor,
        rows: usize,
        hidden: usize,
        vocab: usize,
    ) -> Result<CudaStorage, QuantError> {
        let (ts, tl) = table.storage_and_layout();
        let (is, il) = ids.storage_and_layout();
        let tv = device_view::<T>(&ts, tl, vocab * hidden, "embed_rows: table")?;
        let iv = device_view::<u32>(&is, il, rows, "embed_rows: ids")?;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>((rows * hidden).max(1))? };
        let f = function(dev, "fused_ops", FATBIN, name)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (h, v) = (hidden as i32, vocab as u32);
        b.arg(&tv).arg(&iv).arg(&out).arg(&h).arg(&v);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `embed_rows_*`; ids past `vocab` are not read through.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let s = match dtype {
        DType::BF16 => go::<half::bf16>(dev, &name, &table, &ids, rows, hidden, vocab)?,
        DType::F16 => go::<half::f16>(dev, &name, &table, &ids, rows, hidden, vocab)?,
        _ => go::<f32>(dev, &name, &table, &ids, rows, hidden, vocab)?,
    };
    Ok(tensor_from_storage(s, (rows, hidden)))
}

/// Columns `cols` (`u32 [kc]` on the GPU) of every row of `x` (`[rows, k]`): `[rows, kc]`, column
/// `i` = `x[:, cols[i]]`; a column index past `k` gives zeros. Reads its indices on the GPU and
/// uploads nothing, so it can be captured in a CUDA graph (candle's `index_select` cannot).
pub fn gather_columns(x: &Tensor, cols: &Tensor) -> Result<Tensor, QuantError> {
    let dev = cuda_device(x, "gather_columns input")?;
    let dtype = x.dtype();
    let name = format!("gather_columns_{}", dtype_name(dtype)?);
    let (rows, k) = x.dims2()?;
    let kc = index_vector(cols, "gather_columns: column indices", "columns")?;
    if [rows, k, kc].iter().any(|&d| d > i32::MAX as usize) {
        return Err(QuantError::Invalid(format!(
            "gather_columns: {rows} rows of {k} -> {kc} values (each at most {})",
            i32::MAX
        )));
    }
    if rows == 0 || kc == 0 {
        return Ok(Tensor::zeros((rows, kc), dtype, x.device())?);
    }
    let x = x.contiguous()?;
    let cols = cols.contiguous()?;
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        x: &Tensor,
        cols: &Tensor,
        (rows, k, kc): (usize, usize, usize),
    ) -> Result<CudaStorage, QuantError> {
        let (xs, xl) = x.storage_and_layout();
        let (cs, cl) = cols.storage_and_layout();
        let xv = device_view::<T>(&xs, xl, rows * k, "gather_columns: x")?;
        let cv = device_view::<u32>(&cs, cl, kc, "gather_columns: indices")?;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(rows * kc)? };
        let f = function(dev, "fused_ops", FATBIN, name)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (r, k, n) = (rows as i32, k as i32, kc as i32);
        b.arg(&xv).arg(&cv).arg(&out).arg(&r).arg(&k).arg(&n);
        let cfg = LaunchConfig {
            grid_dim: (
                kc.div_ceil(THREADS as usize) as u32,
                rows.min(65_535) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `gather_columns_*`; indices past `k` are not read through.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let shape = (rows, k, kc);
    let s = match dtype {
        DType::BF16 => go::<half::bf16>(dev, &name, &x, &cols, shape)?,
        DType::F16 => go::<half::f16>(dev, &name, &x, &cols, shape)?,
        _ => go::<f32>(dev, &name, &x, &cols, shape)?,
    };
    Ok(tensor_from_storage(s, (rows, kc)))
}
