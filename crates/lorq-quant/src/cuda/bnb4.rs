//! NF4/FP4 (+ double quantization) on the GPU: the fused dequantize-GEMV for few activation rows
//! (`kernels/bnb4.cu`), dequantize-to-the-compute-dtype + cuBLAS past that. The CPU kernel of
//! [`Bnb4Tensor`] is the reference (`tests/cuda_kernels.rs`).

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Storage, Tensor};

use super::{cuda_device, dtype_name, function, tensor_from_storage};
use crate::bnb4::{Absmax, Bnb4Tensor};
use crate::{QuantError, QuantTensor};

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bnb4.fatbin"));

/// Activation rows up to which the fused GEMV runs (it reads the 4-bit weight once per 8 rows);
/// past this the weight is dequantized once per call and multiplied by cuBLAS.
pub const GEMV_MAX_M: usize = 16;

/// Which GPU path a 4-bit matmul takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bnb4Path {
    /// `GEMV_MAX_M` and `K % 32` decide.
    Auto,
    /// The fused dequantize-GEMV kernel (needs `in_features % 32 == 0`).
    Fused,
    /// Dequantize to the compute dtype on the GPU, then cuBLAS.
    Dequantize,
}

/// The weight's device copy.
pub(crate) struct Bnb4Gpu {
    packed: CudaSlice<u8>,
    lut: CudaSlice<f32>,
    scales: Scales,
    log2bs: i32,
}

enum Scales {
    F32(CudaSlice<f32>),
    Nested {
        codes: CudaSlice<u8>,
        nested: CudaSlice<f32>,
        map: CudaSlice<f32>,
        offset: f32,
        blocksize: i32,
    },
}

impl Bnb4Gpu {
    fn upload(t: &Bnb4Tensor, dev: &CudaDevice) -> Result<Self, QuantError> {
        let scales = match t.absmax() {
            Absmax::F32(a) => Scales::F32(dev.clone_htod(a)?),
            Absmax::Nested(n) => Scales::Nested {
                codes: dev.clone_htod(&n.codes)?,
                nested: dev.clone_htod(&n.nested_absmax)?,
                map: dev.clone_htod(&n.code)?,
                offset: n.offset,
                blocksize: n.blocksize as i32,
            },
        };
        Ok(Self {
            packed: dev.clone_htod(t.packed())?,
            lut: dev.clone_htod(&t.quant_type().code()[..])?,
            scales,
            log2bs: t.blocksize().trailing_zeros() as i32,
        })
    }

    /// Pushes the weight arguments every kernel of `bnb4.cu` starts with.
    fn push_args<'a>(
        &'a self,
        b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
        null: &'a u64,
        zero: &'a f32,
        one: &'a i32,
    ) {
        b.arg(&self.packed);
        match &self.scales {
            Scales::F32(a) => {
                b.arg(a).arg(null).arg(null).arg(null);
                b.arg(&self.lut).arg(zero).arg(one);
            }
            Scales::Nested {
                codes,
                nested,
                map,
                offset,
                blocksize,
            } => {
                b.arg(null).arg(codes).arg(nested).arg(map);
                b.arg(&self.lut).arg(offset).arg(blocksize);
            }
        }
        b.arg(&self.log2bs);
    }
}

fn gpu(t: &Bnb4Tensor, dev: &CudaDevice) -> Result<std::sync::Arc<Bnb4Gpu>, QuantError> {
    t.gpu_cache().get_or_upload(dev, |d| Bnb4Gpu::upload(t, d))
}

/// Uploads the weight to `x`'s GPU now (else the first matmul does).
pub fn prepare(t: &Bnb4Tensor, x: &Tensor) -> Result<(), QuantError> {
    gpu(t, cuda_device(x, "bnb4")?)?;
    Ok(())
}

/// `x · Wᵀ` on `x`'s GPU, in `x`'s dtype (f32/bf16/f16; others computed in f32).
pub fn matmul(t: &Bnb4Tensor, x: &Tensor, path: Bnb4Path) -> Result<Tensor, QuantError> {
    let dev = cuda_device(x, "bnb4")?;
    let (n, k) = t.shape();
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        return Err(QuantError::Invalid(format!(
            "{}: activation shape {dims:?} does not end in in_features {k}",
            t.format_name()
        )));
    }
    let in_dtype = x.dtype();
    let x = match in_dtype {
        DType::F32 | DType::BF16 | DType::F16 => x.clone(),
        _ => x.to_dtype(DType::F32)?,
    };
    let m = x.elem_count() / k.max(1);
    let fused = match path {
        Bnb4Path::Auto => m <= GEMV_MAX_M && k % 32 == 0,
        Bnb4Path::Fused => {
            if k % 32 != 0 {
                return Err(QuantError::Invalid(format!(
                    "bnb4 fused GEMV needs in_features % 32 == 0, got {k}"
                )));
            }
            true
        }
        Bnb4Path::Dequantize => false,
    };
    let mut out_dims = dims.clone();
    *out_dims.last_mut().expect("rank >= 1") = n;
    let w = gpu(t, dev)?;
    let y = if fused {
        let x2 = x.reshape((m, k))?.contiguous()?;
        let y = gemv(dev, &w, &x2, m, n, k)?;
        y.reshape(out_dims)?
    } else {
        let wd = dequantize_on(dev, &w, n * k, (n, k), x.dtype())?;
        x.broadcast_matmul(&wd.t()?)?
    };
    Ok(if y.dtype() != in_dtype {
        y.to_dtype(in_dtype)?
    } else {
        y
    })
}

/// The dequantized weight `[out, in]` in `dtype` (f32/bf16/f16) on `dev`.
pub fn dequantize(t: &Bnb4Tensor, dev: &CudaDevice, dtype: DType) -> Result<Tensor, QuantError> {
    let w = gpu(t, dev)?;
    let (n, k) = t.shape();
    dequantize_on(dev, &w, n * k, (n, k), dtype)
}

fn dequantize_on(
    dev: &CudaDevice,
    w: &Bnb4Gpu,
    numel: usize,
    shape: (usize, usize),
    dtype: DType,
) -> Result<Tensor, QuantError> {
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        w: &Bnb4Gpu,
        numel: usize,
        name: &str,
    ) -> Result<CudaStorage, QuantError> {
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(numel)? };
        let f = function(dev, "bnb4", FATBIN, name)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (null, zero, one) = (0u64, 0f32, 1i32);
        w.push_args(&mut b, &null, &zero, &one);
        let numel64 = numel as u64;
        b.arg(&out).arg(&numel64);
        let blocks = numel.div_ceil(2).div_ceil(256).clamp(1, 1 << 16) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `bnb4_dequant_*` in kernels/bnb4.cu.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let dtype = match dtype {
        DType::BF16 | DType::F16 => dtype,
        _ => DType::F32,
    };
    let name = format!("bnb4_dequant_{}", dtype_name(dtype));
    let s = match dtype {
        DType::BF16 => go::<half::bf16>(dev, w, numel, &name)?,
        DType::F16 => go::<half::f16>(dev, w, numel, &name)?,
        _ => go::<f32>(dev, w, numel, &name)?,
    };
    Ok(tensor_from_storage(s, shape))
}

/// Warps per block of the GEMV kernel (kernels/bnb4.cu `WARPS`).
const WARPS: usize = 8;

/// K-slices per output row: enough warps in flight for small `n`, at least 1024 weights per slice.
fn split_for(n: usize, k: usize) -> usize {
    let want = (8192usize.div_ceil(n.max(1))).next_power_of_two();
    let most = (k / 1024).max(1);
    let most = if most.is_power_of_two() {
        most
    } else {
        most.next_power_of_two() / 2
    };
    want.min(most).clamp(1, 8)
}

fn gemv(
    dev: &CudaDevice,
    w: &Bnb4Gpu,
    x: &Tensor,
    m: usize,
    n: usize,
    k: usize,
) -> Result<Tensor, QuantError> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        w: &Bnb4Gpu,
        x: &CudaStorage,
        start: usize,
        m: usize,
        n: usize,
        k: usize,
        dname: &str,
    ) -> Result<CudaStorage, QuantError> {
        let xs = x.as_cuda_slice::<T>()?.slice(start..start + m * k);
        // SAFETY: every output element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(m * n)? };
        let mr = match m {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => 8,
        };
        let split = split_for(n, k);
        let f = function(
            dev,
            "bnb4",
            FATBIN,
            &format!("bnb4_gemv_{dname}_m{mr}_s{split}"),
        )?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (null, zero, one) = (0u64, 0f32, 1i32);
        w.push_args(&mut b, &null, &zero, &one);
        let (mi, ni, ki) = (m as i32, n as i32, k as i32);
        b.arg(&xs).arg(&y).arg(&mi).arg(&ni).arg(&ki);
        let rows_per_block = WARPS / split;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(rows_per_block) as u32, m.div_ceil(mr) as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `bnb4_gemv_*` in kernels/bnb4.cu; x holds m*k elements
        // from a 16-byte-aligned start (checked by the caller), y m*n.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let x = super::aligned(x, 16)?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(QuantError::Invalid("bnb4 GEMV: x is not on a GPU".into()));
    };
    let start = layout.start_offset();
    let s = match x.dtype() {
        DType::BF16 => go::<half::bf16>(dev, w, cs, start, m, n, k, "bf16")?,
        DType::F16 => go::<half::f16>(dev, w, cs, start, m, n, k, "f16")?,
        _ => go::<f32>(dev, w, cs, start, m, n, k, "f32")?,
    };
    drop(storage);
    Ok(tensor_from_storage(s, (m, n)))
}

#[cfg(test)]
mod tests {
    use super::split_for;

    #[test]
    fn split_keeps_slices_whole() {
        assert_eq!(split_for(4096, 4096), 2);
        assert_eq!(split_for(1024, 4096), 4);
        assert_eq!(split_for(14336, 4096), 1);
        assert_eq!(split_for(4096, 14336), 2);
        assert_eq!(split_for(64, 64), 1);
        assert_eq!(split_for(64, 3072), 2);
    }
}
