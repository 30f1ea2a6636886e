//! Fixture loading and comparisons shared by the format tests (checkpoint fixtures made by the
//! peer libraries under `fixtures/quant/<format>/`).
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lorq_quant::{QuantTensor, RawTensor};

/// `fixtures/quant/<sub>`.
pub fn fixture_dir(sub: &str) -> String {
    format!("{}/../../fixtures/quant/{sub}", env!("CARGO_MANIFEST_DIR"))
}

/// Every tensor of `fixtures/quant/<sub>/<case>.safetensors`, as stored.
pub fn load_raw(sub: &str, case: &str) -> HashMap<String, RawTensor> {
    let p = format!("{}/{case}.safetensors", fixture_dir(sub));
    let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, RawTensor::from_view(&v)))
        .collect()
}

/// `fixtures/quant/<sub>/<case>.quantization_config.json`.
pub fn quantization_config(sub: &str, case: &str) -> serde_json::Value {
    let p = format!("{}/{case}.quantization_config.json", fixture_dir(sub));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn tensor(f: &HashMap<String, RawTensor>, k: &str) -> Tensor {
    f[k].to_tensor().unwrap()
}

pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max |b|.
pub fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    d / b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30)
}

/// The fused matmul of `t` against `x · dequantize(t)ᵀ` in f32 for 1, 5 and 40 rows of random
/// input: relative difference below 1e-5 (`what` names the case in the failure).
pub fn assert_fused_matches_dequantized(t: &impl QuantTensor, what: &str) {
    let (_, k) = t.shape();
    let w = t.dequantize(DType::F32).unwrap();
    for m in [1, 5, 40] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let want = f32s(&x.matmul(&w.t().unwrap()).unwrap());
        let r = rel(&f32s(&t.matmul(&x).unwrap()), &want);
        assert!(r < 1e-5, "{what} m={m}: rel {r}");
    }
}
