//! LLM.int8 on the GPU (`kernels/int8_llm.cu`): outlier columns, row-wise int8 activations, exact
//! int32 products, the outlier columns in the activations' precision — the same steps, in the same
//! floating-point order, as the CPU kernel in `int8.rs` (the reference, `tests/cuda_int8.rs`).

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Storage, Tensor};

use super::{cuda_device, dtype_name, function, tensor_from_storage, GpuCache};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/int8_llm.fatbin"));

/// The weight's device copy: codes `CB` `[n, k]` and row absmax `SCB`.
pub struct Int8Gpu {
    cb: CudaSlice<i8>,
    scb: CudaSlice<f32>,
}

/// Per-GPU copies of an LLM.int8 weight.
pub type Int8Cache = GpuCache<Int8Gpu>;

/// `x · Wᵀ` as bitsandbytes' LLM.int8 on `x`'s GPU (`k % 32 == 0`; the caller checks), in `x`'s
/// dtype (f32/bf16/f16; others in f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    cache: &Int8Cache,
    cb: &[i8],
    scb: &[f32],
    (n, k): (usize, usize),
    threshold: f32,
    x: &Tensor,
) -> Result<Tensor, QuantError> {
    let dev = cuda_device(x, "int8")?;
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        return Err(QuantError::Invalid(format!(
            "int8: activation shape {dims:?} does not end in in_features {k}"
        )));
    }
    let in_dtype = x.dtype();
    let x = match in_dtype {
        DType::F32 | DType::BF16 | DType::F16 => x.clone(),
        _ => x.to_dtype(DType::F32)?,
    };
    let m = x.elem_count() / k.max(1);
    let w = cache.get_or_upload(dev, |d| {
        Ok(Int8Gpu {
            cb: d.clone_htod(cb)?,
            scb: d.clone_htod(scb)?,
        })
    })?;
    let x2 = x.reshape((m, k))?.contiguous()?;
    let y = run(dev, &w, &x2, m, n, k, threshold)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = n;
    let y = y.reshape(out_dims)?;
    Ok(if y.dtype() != in_dtype {
        y.to_dtype(in_dtype)?
    } else {
        y
    })
}

fn run(
    dev: &CudaDevice,
    w: &Int8Gpu,
    x: &Tensor,
    m: usize,
    n: usize,
    k: usize,
    threshold: f32,
) -> Result<Tensor, QuantError> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        w: &Int8Gpu,
        x: &CudaStorage,
        start: usize,
        m: usize,
        n: usize,
        k: usize,
        threshold: f32,
        dname: &str,
    ) -> Result<CudaStorage, QuantError> {
        let xs = x.as_cuda_slice::<T>()?.slice(start..start + m * k);
        let stream = dev.cuda_stream();
        let mut flags = dev.alloc_zeros::<i32>(k)?;
        let (ki, thr) = (k as i32, threshold);
        if threshold > 0.0 {
            let f = function(
                dev,
                "int8_llm",
                FATBIN,
                &format!("llmint8_outliers_{dname}"),
            )?;
            let total = (m * k) as i64;
            let mut b = stream.launch_builder(&f);
            b.arg(&xs).arg(&mut flags).arg(&total).arg(&ki).arg(&thr);
            let blocks = (m * k).div_ceil(256).clamp(1, 4096) as u32;
            // SAFETY: matches `llmint8_outliers_*`; flags holds k ints.
            unsafe { b.launch(grid(blocks, 256)) }.w()?;
        }
        let mut list = dev.alloc_zeros::<i32>(k.max(1))?;
        let mut count = dev.alloc_zeros::<i32>(1)?;
        {
            let f = function(dev, "int8_llm", FATBIN, "llmint8_compact")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&flags).arg(&ki).arg(&mut list).arg(&mut count);
            // SAFETY: matches `llmint8_compact` (one block of 1024 threads).
            unsafe { b.launch(grid(1, 1024)) }.w()?;
        }
        // SAFETY: every code and scale is written by the quantize kernel.
        let mut ca = unsafe { dev.alloc::<i8>(m * k)? };
        let mut sca = unsafe { dev.alloc::<f32>(m)? };
        {
            let f = function(
                dev,
                "int8_llm",
                FATBIN,
                &format!("llmint8_quantize_{dname}"),
            )?;
            let mut b = stream.launch_builder(&f);
            b.arg(&xs).arg(&flags).arg(&ki).arg(&mut ca).arg(&mut sca);
            // SAFETY: matches `llmint8_quantize_*`: one block of 256 per row.
            unsafe { b.launch(grid(m as u32, 256)) }.w()?;
        }
        // SAFETY: every output element is written by the GEMV.
        let y = unsafe { dev.alloc::<T>(m * n)? };
        let mr = match m {
            1 => 1,
            2..=4 => 4,
            _ => 8,
        };
        let f = function(
            dev,
            "int8_llm",
            FATBIN,
            &format!("llmint8_gemv_{dname}_m{mr}"),
        )?;
        let mut b = stream.launch_builder(&f);
        let (mi, ni) = (m as i32, n as i32);
        b.arg(&w.cb)
            .arg(&w.scb)
            .arg(&ca)
            .arg(&sca)
            .arg(&list)
            .arg(&count);
        b.arg(&xs).arg(&y).arg(&mi).arg(&ni).arg(&ki);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, m.div_ceil(mr) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `llmint8_gemv_*` (8 warps per block, one output feature per warp).
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(QuantError::Invalid("int8: x is not on a GPU".into()));
    };
    let start = layout.start_offset();
    let dname = dtype_name(x.dtype());
    let s = match x.dtype() {
        DType::BF16 => go::<half::bf16>(dev, w, cs, start, m, n, k, threshold, dname)?,
        DType::F16 => go::<half::f16>(dev, w, cs, start, m, n, k, threshold, dname)?,
        _ => go::<f32>(dev, w, cs, start, m, n, k, threshold, dname)?,
    };
    drop(storage);
    Ok(tensor_from_storage(s, (m, n)))
}

fn grid(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
