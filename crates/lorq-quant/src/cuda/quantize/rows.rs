//! Row-scaled formats on the GPU, one thread block per output row: LLM.int8 (through f16, as
//! [`Int8Tensor::quantize`]), EETQ ([`EetqTensor::quantize`]) and FP8 e4m3
//! ([`Fp8Tensor::quantize`]; its few scales are finished on the host with the CPU's arithmetic).

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Tensor};

use super::{dims2, grid, kernel, push_input, DeviceWeight};
use crate::eetq::EetqTensor;
use crate::fp8::{Fp8Strategy, Fp8Tensor, E4M3_MAX};
use crate::int8::Int8Tensor;
use crate::QuantError;

const THREADS: u32 = 256;

/// Codes `[n, k]` and one scale per row: `mode` 0 LLM.int8 (scale = absmax), 1 EETQ (absmax/127).
fn int8_rows(
    w: &DeviceWeight,
    n: usize,
    k: usize,
    mode: i32,
) -> Result<(Vec<i8>, Vec<f32>), QuantError> {
    let dev = &w.dev;
    // SAFETY: the kernel writes every code and every row's scale.
    let q = unsafe { dev.alloc::<i8>(n * k)? };
    let scale = unsafe { dev.alloc::<f32>(n)? };
    let f = kernel(dev, &format!("int8_rows_{}", w.suffix()))?;
    let stream = dev.cuda_stream();
    let k32 = k as i32;
    w.with(|x| {
        let mut b = stream.launch_builder(&f);
        push_input(&mut b, x);
        b.arg(&k32).arg(&mode).arg(&q).arg(&scale);
        // SAFETY: matches `int8_rows_*`; one block per row of k elements.
        unsafe { b.launch(grid(n, THREADS, 0)) }.w()?;
        Ok(())
    })?;
    Ok((dev.clone_dtoh(&q)?, dev.clone_dtoh(&scale)?))
}

/// Whether the row kernels apply: a GPU weight whose rows fit an `int` and whose rows fit a grid.
fn device_rows(weight: &Tensor, k: usize, n: usize) -> Result<Option<DeviceWeight>, QuantError> {
    if k > i32::MAX as usize || n > i32::MAX as usize {
        return Ok(None);
    }
    DeviceWeight::new(weight)
}

impl Int8Tensor {
    /// [`Int8Tensor::quantize`] on the weight's GPU (host weights are quantized on the host).
    pub fn quantize_gpu(weight: &Tensor) -> Result<Self, QuantError> {
        let (n, k) = dims2(weight, "int8")?;
        let Some(w) = device_rows(weight, k, n)? else {
            return Self::quantize(weight);
        };
        let (cb, scb) = int8_rows(&w, n, k, 0)?;
        Self::from_parts(cb, scb, (n, k))
    }
}

impl EetqTensor {
    /// [`EetqTensor::quantize`] on the weight's GPU (host weights are quantized on the host).
    pub fn quantize_gpu(weight: &Tensor) -> Result<Self, QuantError> {
        let (n, k) = dims2(weight, "eetq")?;
        let Some(w) = device_rows(weight, k, n)? else {
            return Self::quantize(weight);
        };
        let (q, scale) = int8_rows(&w, n, k, 1)?;
        Self::from_parts(q, scale, (n, k))
    }
}

/// `x` rounded to `dtype` (f32: unchanged), as the CPU FP8 quantizer rounds its scales.
fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

impl Fp8Tensor {
    /// [`Fp8Tensor::quantize`] on the weight's GPU (host weights are quantized on the host).
    pub fn quantize_gpu(
        weight: &Tensor,
        strategy: Fp8Strategy,
        scale_dtype: DType,
    ) -> Result<Self, QuantError> {
        let (n, k) = dims2(weight, "fp8")?;
        let ok_scale = matches!(scale_dtype, DType::F32 | DType::BF16 | DType::F16);
        let Some(w) = device_rows(weight, k, n)?.filter(|_| ok_scale) else {
            return Self::quantize(weight, strategy, scale_dtype);
        };
        let dev = &w.dev;
        let stream = dev.cuda_stream();
        let k32 = k as i32;
        // 1. Row absmax on the GPU.
        // SAFETY: the kernel writes every row's absmax.
        let amax = unsafe { dev.alloc::<f32>(n)? };
        let f = kernel(dev, &format!("row_absmax_{}", w.suffix()))?;
        w.with(|x| {
            let mut b = stream.launch_builder(&f);
            push_input(&mut b, x);
            b.arg(&k32).arg(&amax);
            // SAFETY: matches `row_absmax_*`; one block per row.
            unsafe { b.launch(grid(n, THREADS, 0)) }.w()?;
            Ok(())
        })?;
        let rows = dev.clone_dtoh(&amax)?;
        // 2. Scales on the host, exactly as the CPU quantizer computes them.
        let raw: Vec<f32> = match strategy {
            Fp8Strategy::Tensor => vec![rows.iter().fold(0f32, |m, &v| m.max(v))],
            Fp8Strategy::Channel => rows,
        };
        let eps = match scale_dtype {
            DType::BF16 => half::bf16::EPSILON.to_f32(),
            DType::F16 => half::f16::EPSILON.to_f32(),
            _ => f32::EPSILON,
        };
        let scale: Vec<f32> = raw
            .iter()
            .map(|m| {
                let s = round_to(scale_dtype, m / E4M3_MAX);
                if s == 0.0 {
                    eps
                } else {
                    s
                }
            })
            .collect();
        // 3. Codes on the GPU.
        let scale_dev = dev.clone_htod(&scale)?;
        // SAFETY: the kernel writes every code.
        let q = unsafe { dev.alloc::<u8>(n * k)? };
        let f = kernel(dev, &format!("fp8_rows_{}", w.suffix()))?;
        let per_channel = i32::from(strategy == Fp8Strategy::Channel);
        let w_dtype = DeviceWeight::dtype_code(w.dtype);
        w.with(|x| {
            let mut b = stream.launch_builder(&f);
            push_input(&mut b, x);
            b.arg(&k32)
                .arg(&scale_dev)
                .arg(&per_channel)
                .arg(&w_dtype)
                .arg(&q);
            // SAFETY: matches `fp8_rows_*`; one block per row.
            unsafe { b.launch(grid(n, THREADS, 0)) }.w()?;
            Ok(())
        })?;
        Self::from_parts((n, k), dev.clone_dtoh(&q)?, scale, scale_dtype, None)
    }
}
