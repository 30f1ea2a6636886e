//! bitsandbytes NF4/FP4 on the GPU: the same blocks, absmax and codes as
//! [`crate::bnb4::quantize::quantize_4bit`], and the same nested absmax as
//! [`NestedAbsmax::quantize`] (its mean summed in f64 in another order, see the parent module).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::Tensor;

use super::{dims2, grid, kernel, push_input, sum_f64, DeviceWeight};
use crate::bnb4::codes::{dynamic_map, midpoints, FP4_ORDER};
use crate::bnb4::double_quant::NESTED_BLOCKSIZE;
use crate::bnb4::{Absmax, Bnb4Tensor, Bnb4Type, NestedAbsmax};
use crate::QuantError;

/// The bucketizer the kernel takes by value (kernels/quantize.cu `Bucket`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Bucket {
    mids: [f32; 15],
    order: [u8; 16],
}

// SAFETY: plain old data with the C layout of `struct Bucket`.
unsafe impl DeviceRepr for Bucket {}

impl Bucket {
    fn new(qt: Bnb4Type) -> Self {
        const IDENTITY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
        let order = match qt {
            Bnb4Type::Nf4 => IDENTITY,
            Bnb4Type::Fp4 => FP4_ORDER,
        };
        Self {
            mids: midpoints(qt.code(), &order),
            order,
        }
    }
}

/// Warps (quantization blocks) per thread block.
const WARPS: usize = 8;

impl Bnb4Tensor {
    /// [`Bnb4Tensor::quantize_with_blocksize`] on the weight's GPU (a host weight, or a dtype other
    /// than f32/bf16/f16, is quantized on the host).
    pub fn quantize_gpu(
        weight: &Tensor,
        quant_type: Bnb4Type,
        double_quant: bool,
        blocksize: usize,
    ) -> Result<Self, QuantError> {
        let (rows, cols) = dims2(weight, quant_type.name())?;
        let valid_bs = blocksize.is_power_of_two() && (32..=4096).contains(&blocksize);
        let Some(w) = DeviceWeight::new(weight)?.filter(|_| valid_bs) else {
            return Self::quantize_with_blocksize(weight, quant_type, double_quant, blocksize);
        };
        let dev = &w.dev;
        let n = rows * cols;
        let blocks = n.div_ceil(blocksize);
        // SAFETY: the kernel writes every byte and every absmax.
        let packed = unsafe { dev.alloc::<u8>(n.div_ceil(2))? };
        let absmax = unsafe { dev.alloc::<f32>(blocks)? };
        let f = kernel(dev, &format!("bnb4_quantize_{}", w.suffix()))?;
        let stream = dev.cuda_stream();
        let (n64, bs) = (n as u64, blocksize as i32);
        let bucket = Bucket::new(quant_type);
        w.with(|x| {
            let mut b = stream.launch_builder(&f);
            push_input(&mut b, x);
            b.arg(&n64).arg(&bs).arg(&bucket).arg(&packed).arg(&absmax);
            // SAFETY: matches `bnb4_quantize_*` (one warp per block of `bs` elements).
            unsafe { b.launch(grid(blocks.div_ceil(WARPS), (WARPS * 32) as u32, 0)) }.w()?;
            Ok(())
        })?;
        let absmax = if double_quant {
            Absmax::Nested(nested(dev, &absmax, blocks)?)
        } else {
            Absmax::F32(dev.clone_dtoh(&absmax)?)
        };
        let packed = dev.clone_dtoh(&packed)?;
        Self::from_parts(quant_type, blocksize, (rows, cols), w.dtype, packed, absmax)
    }
}

/// Double quantization of `n` absmax already on the device.
fn nested(
    dev: &candle_core::cuda_backend::CudaDevice,
    absmax: &candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    n: usize,
) -> Result<NestedAbsmax, QuantError> {
    let sum = sum_f64(dev, absmax, n, false)?;
    let map = dynamic_map();
    let mids: Vec<f32> = map.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let mids = dev.clone_htod(&mids)?;
    let nb = n.div_ceil(NESTED_BLOCKSIZE);
    // SAFETY: the kernel writes every code, nested absmax and the offset.
    let codes = unsafe { dev.alloc::<u8>(n)? };
    let nested = unsafe { dev.alloc::<f32>(nb)? };
    let offset = unsafe { dev.alloc::<f32>(1)? };
    let f = kernel(dev, "bnb4_nested_quantize")?;
    let stream = dev.cuda_stream();
    let n64 = n as u64;
    let mut b = stream.launch_builder(&f);
    b.arg(absmax).arg(&n64).arg(&sum).arg(&mids);
    b.arg(&codes).arg(&nested).arg(&offset);
    // SAFETY: matches `bnb4_nested_quantize` (one warp per 256 codes).
    unsafe { b.launch(grid(nb.div_ceil(WARPS), (WARPS * 32) as u32, 0)) }.w()?;
    drop(b);
    Ok(NestedAbsmax {
        codes: dev.clone_dtoh(&codes)?,
        nested_absmax: dev.clone_dtoh(&nested)?,
        code: map.to_vec(),
        offset: dev.clone_dtoh(&offset)?[0],
        blocksize: NESTED_BLOCKSIZE,
    })
}
