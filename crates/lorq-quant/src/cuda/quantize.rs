//! Just-in-time quantization on the GPU (`kernels/quantize.cu`): a weight already in device
//! memory (f32/bf16/f16, as the model holds it) is quantized there and only the packed codes and
//! constants are downloaded into the usual format structs ([`Bnb4Tensor`](crate::bnb4::Bnb4Tensor),
//! [`Int8Tensor`](crate::int8::Int8Tensor), [`EetqTensor`](crate::eetq::EetqTensor),
//! [`Fp8Tensor`](crate::fp8::Fp8Tensor), [`HqqTensor`](crate::hqq::HqqTensor)), so saving, the
//! CPU kernels and the GPU matmuls see no difference.
//!
//! The CPU quantizers are the references: every GPU quantizer computes the same f32 operations in
//! the same order with the same rounding (the kernels spell each one out in PTX, past
//! `--use_fast_math`), so codes and scales are bit-identical. Two reductions are summed in f64 in
//! a different order from the CPU's sequential f64 sums: the double-quantization mean and HQQ's
//! total error per step; both are rounded to f32 afterwards, so they differ only where an f64
//! rounding lands on an f32 rounding boundary. HQQ's `|x|^(p−1)` is the correctly rounded f32 of
//! an f64 power, the CPU's libm `powf` agrees to within one ulp (not always bit for bit), so HQQ
//! zeros agree to float tolerance (`tests/cuda_quantize.rs` states it).
//!
//! - [`bnb4`]: NF4/FP4 with and without double quantization of the absmax.
//! - [`rows`]: LLM.int8 and EETQ (row-wise int8), FP8 e4m3 per tensor / per channel.
//! - [`hqq`]: HQQ 1–8 bit (min/max init, proximal zero optimizer, bit packing).

pub mod bnb4;
pub mod hqq;
pub mod rows;

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Storage, Tensor};
use half::{bf16, f16};

use super::function;
use crate::bnb4::{Bnb4Tensor, Bnb4Type, DEFAULT_BLOCKSIZE};
use crate::eetq::EetqTensor;
use crate::fp8::{Fp8Strategy, Fp8Tensor};
use crate::hqq::{HqqConfig, HqqTensor};
use crate::int8::Int8Tensor;
use crate::method::QuantMethod;
use crate::{QuantError, QuantTensor};

pub(crate) static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/quantize.fatbin"));

/// The kernel `name` of `kernels/quantize.cu`.
pub(crate) fn kernel(
    dev: &CudaDevice,
    name: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction, QuantError> {
    function(dev, "quantize", FATBIN, name)
}

/// Whether `method` has a GPU quantizer (every just-in-time method does; GPTQ/AWQ need calibration).
pub fn has_gpu_quantizer(method: QuantMethod) -> bool {
    method.is_jit()
}

/// Quantizes `weight` `[out, in]` with `method` on the weight's GPU: the same result as
/// [`QuantMethod::quantize`] on the host (see the module docs), without moving the weight.
pub fn quantize(method: QuantMethod, weight: &Tensor) -> Result<Arc<dyn QuantTensor>, QuantError> {
    Ok(match method {
        QuantMethod::Bitsandbytes => Arc::new(Int8Tensor::quantize_gpu(weight)?),
        QuantMethod::BitsandbytesNf4 { double_quant } => Arc::new(Bnb4Tensor::quantize_gpu(
            weight,
            Bnb4Type::Nf4,
            double_quant,
            DEFAULT_BLOCKSIZE,
        )?),
        QuantMethod::BitsandbytesFp4 => Arc::new(Bnb4Tensor::quantize_gpu(
            weight,
            Bnb4Type::Fp4,
            false,
            DEFAULT_BLOCKSIZE,
        )?),
        QuantMethod::Eetq => Arc::new(EetqTensor::quantize_gpu(weight)?),
        QuantMethod::Hqq4 | QuantMethod::Hqq3 | QuantMethod::Hqq2 => {
            let cfg = HqqConfig::lorax(method.name()).expect("an hqq method");
            Arc::new(HqqTensor::quantize_gpu(weight, &cfg)?)
        }
        QuantMethod::Fp8 => Arc::new(Fp8Tensor::quantize_gpu(
            weight,
            Fp8Strategy::Channel,
            weight.dtype(),
        )?),
        // Calibration-based: the host method says why it cannot quantize at load time.
        QuantMethod::Awq | QuantMethod::Gptq => return method.quantize(weight),
    })
}

/// A weight on a GPU, contiguous, in one of the dtypes the kernels read.
pub(crate) struct DeviceWeight {
    t: Tensor,
    pub dev: CudaDevice,
    pub dtype: DType,
}

/// The weight's elements as the kernels take them.
pub(crate) enum Input<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
    F16(CudaView<'a, f16>),
}

impl DeviceWeight {
    /// `None` where the kernels do not apply (not on a GPU, another dtype, no elements): the
    /// caller then runs the host quantizer, which is the reference anyway.
    pub fn new(w: &Tensor) -> Result<Option<Self>, QuantError> {
        let Device::Cuda(dev) = w.device() else {
            return Ok(None);
        };
        if !matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16) || w.elem_count() == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            t: w.contiguous()?,
            dev: dev.clone(),
            dtype: w.dtype(),
        }))
    }

    /// The kernel-name suffix of the dtype.
    pub fn suffix(&self) -> &'static str {
        match self.dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            _ => "f32",
        }
    }

    /// The code `round_to` in the kernels uses for a dtype: 0 f32, 1 bf16, 2 f16.
    pub fn dtype_code(dtype: DType) -> i32 {
        match dtype {
            DType::BF16 => 1,
            DType::F16 => 2,
            _ => 0,
        }
    }

    pub fn tensor(&self) -> &Tensor {
        &self.t
    }

    /// Runs `f` with the elements borrowed from the tensor's storage.
    pub fn with<R>(
        &self,
        f: impl FnOnce(&Input<'_>) -> Result<R, QuantError>,
    ) -> Result<R, QuantError> {
        let (storage, layout) = self.t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(QuantError::Invalid(
                "GPU quantization: the weight left the GPU".into(),
            ));
        };
        let (a, n) = (layout.start_offset(), self.t.elem_count());
        let input = match self.dtype {
            DType::BF16 => Input::Bf16(cs.as_cuda_slice::<bf16>()?.slice(a..a + n)),
            DType::F16 => Input::F16(cs.as_cuda_slice::<f16>()?.slice(a..a + n)),
            _ => Input::F32(cs.as_cuda_slice::<f32>()?.slice(a..a + n)),
        };
        f(&input)
    }
}

/// Pushes the weight pointer as a kernel argument.
pub(crate) fn push_input<'a>(b: &mut LaunchArgs<'a>, input: &'a Input<'_>) {
    match input {
        Input::F32(v) => b.arg(v),
        Input::Bf16(v) => b.arg(v),
        Input::F16(v) => b.arg(v),
    };
}

/// A 1-D launch of `blocks` blocks of `threads` threads.
pub(crate) fn grid(blocks: usize, threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.clamp(1, i32::MAX as usize) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// Threads of the sum kernels (kernels/quantize.cu `SUM_THREADS`).
const SUM_THREADS: usize = 256;

/// The f64 sum of `n` f32 or f64 values, on the device (one value), in a fixed order: partial
/// sums of up to 1024 blocks, then one block over the partials.
pub(crate) fn sum_f64<T>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    n: usize,
    f64_input: bool,
) -> Result<CudaSlice<f64>, QuantError> {
    let blocks = n.div_ceil(SUM_THREADS).clamp(1, 1024);
    // SAFETY: every partial is written by its block.
    let part = unsafe { dev.alloc::<f64>(blocks)? };
    let total = unsafe { dev.alloc::<f64>(1)? };
    let stream = dev.cuda_stream();
    let f = kernel(
        dev,
        if f64_input {
            "sum_f64_f64"
        } else {
            "sum_f32_f64"
        },
    )?;
    let n64 = n as u64;
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(&n64).arg(&part);
    // SAFETY: matches `sum_*_f64(const T* x, u64 n, double* part)`; x holds n elements.
    unsafe { b.launch(grid(blocks, SUM_THREADS as u32, 0)) }.w()?;
    let f = kernel(dev, "sum_f64_f64")?;
    let p64 = blocks as u64;
    let mut b = stream.launch_builder(&f);
    b.arg(&part).arg(&p64).arg(&total);
    // SAFETY: as above, over the `blocks` partials, one block.
    unsafe { b.launch(grid(1, SUM_THREADS as u32, 0)) }.w()?;
    Ok(total)
}

/// Checks a 2-D weight and returns `(out, in)`.
pub(crate) fn dims2(w: &Tensor, what: &str) -> Result<(usize, usize), QuantError> {
    match w.dims() {
        &[n, k] => Ok((n, k)),
        d => Err(QuantError::Invalid(format!(
            "{what}: a linear weight must be 2-D [out, in], got shape {d:?}"
        ))),
    }
}
