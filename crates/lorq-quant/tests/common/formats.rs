//! One quantized weight of every format the GPU kernels run, from one random weight: shared by the
//! CPU test of the packed GPU layout (`gpu_layout.rs`) and the GPU tests (`cuda_qgemv.rs`,
//! `cuda_int8.rs`), with the relative error they compare by.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lorq_quant::awq::AwqTensor;
use lorq_quant::bnb4::{Bnb4Tensor, Bnb4Type};
use lorq_quant::eetq::EetqTensor;
use lorq_quant::fp8::{Fp8Strategy, Fp8Tensor};
use lorq_quant::gptq::quantize::{gptq_quantize, rtn_gptq, GptqParams};
use lorq_quant::hqq::{HqqConfig, HqqTensor};
use lorq_quant::input_stats::InputStats;
use lorq_quant::int8::Int8Tensor;
use lorq_quant::QuantTensor;

/// Seeded N(0, std²) values (Box–Muller over a 64-bit LCG).
pub fn randn(seed: u64, n: usize, std: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * std
        })
        .collect()
}

/// `(name, weight)` for every format with a packed GPU layout, quantized from one seeded random
/// `[n, k]` weight (`n % 8 == 0`, `k % 128 == 0`).
pub fn every_format(n: usize, k: usize, seed: u64) -> Vec<(String, Arc<dyn QuantTensor>)> {
    let w = randn(seed, n * k, 0.02);
    let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
    let w_bf16 = wt.to_dtype(DType::BF16).unwrap();
    let gptq = |bits: u32, act_order: bool| -> Arc<dyn QuantTensor> {
        let p = GptqParams {
            bits,
            act_order,
            ..GptqParams::default()
        };
        if act_order {
            let mut stats = InputStats::new(k);
            let x = Tensor::from_vec(randn(seed + 1, 64 * k, 1.0), (64, k), &Device::Cpu).unwrap();
            stats.add(&x).unwrap();
            Arc::new(gptq_quantize(&w, n, k, &stats, &p, "test").unwrap())
        } else {
            Arc::new(rtn_gptq(&w, n, k, &p, "test").unwrap())
        }
    };
    let hqq = |name: &str| -> Arc<dyn QuantTensor> {
        Arc::new(HqqTensor::quantize(&wt, &HqqConfig::lorax(name).unwrap()).unwrap())
    };
    vec![
        (
            "nf4".into(),
            Arc::new(Bnb4Tensor::quantize(&wt, Bnb4Type::Nf4, false).unwrap()) as _,
        ),
        (
            "nf4+dq".into(),
            Arc::new(Bnb4Tensor::quantize(&wt, Bnb4Type::Nf4, true).unwrap()) as _,
        ),
        (
            "fp4".into(),
            Arc::new(Bnb4Tensor::quantize(&wt, Bnb4Type::Fp4, false).unwrap()) as _,
        ),
        (
            "int8".into(),
            Arc::new(Int8Tensor::quantize(&wt).unwrap()) as _,
        ),
        (
            "eetq".into(),
            Arc::new(EetqTensor::quantize(&wt).unwrap()) as _,
        ),
        (
            "fp8".into(),
            Arc::new(Fp8Tensor::quantize(&w_bf16, Fp8Strategy::Channel, DType::BF16).unwrap()) as _,
        ),
        (
            "fp8-tensor".into(),
            Arc::new(Fp8Tensor::quantize(&wt, Fp8Strategy::Tensor, DType::F32).unwrap()) as _,
        ),
        ("hqq-4bit".into(), hqq("hqq-4bit")),
        ("hqq-3bit".into(), hqq("hqq-3bit")),
        ("hqq-2bit".into(), hqq("hqq-2bit")),
        ("gptq-4bit".into(), gptq(4, false)),
        ("gptq-4bit-act-order".into(), gptq(4, true)),
        ("gptq-8bit".into(), gptq(8, false)),
        ("gptq-3bit".into(), gptq(3, false)),
        (
            "awq-4bit".into(),
            Arc::new(AwqTensor::quantize(&w, n, k, 128, "test").unwrap()) as _,
        ),
    ]
}

/// The largest absolute difference of two tensors of one shape (any dtype, any device).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// ‖got − want‖₂ / ‖want‖₂ over two tensors on any device, in f64; infinite if `got` has a NaN or an
/// infinity.
pub fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    let f = |t: &Tensor| -> Vec<f32> {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (g, w) = (f(got), f(want));
    assert_eq!(g.len(), w.len());
    if g.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    let den: f64 = w.iter().map(|b| f64::from(*b).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
