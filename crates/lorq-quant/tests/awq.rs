//! AWQ GEMM 4-bit against a checkpoint made by GPTQModel 7.7.0 (`METHOD.AWQ`, `FORMAT.GEMM`;
//! `fixtures/quant/awq/make_awq_fixtures.py`). The fixture keeps three modules' tensors as saved,
//! the library's `dequantize_gemm` (fp16, what `AwqTorchLinear.forward` multiplies by) and the
//! module's forward (fp16) on a seeded input.

mod common;

use std::collections::HashMap;

use candle_core::DType;
use common::*;
use lorq_quant::awq::{AwqConfig, AwqTensor, AWQ_ORDER};
use lorq_quant::QuantTensor;
use lorq_quant::RawTensor;
use serde_json::json;

const CASE: &str = "awq_gemm_b4_g32";
const MODULES: &[&str] = &[
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.mlp.down_proj",
];

fn load() -> HashMap<String, RawTensor> {
    load_raw("awq", CASE)
}

fn config_json() -> serde_json::Value {
    quantization_config("awq", CASE)
}

fn config() -> AwqConfig {
    AwqConfig::from_json(&config_json()).unwrap()
}

fn module(f: &HashMap<String, RawTensor>, p: &str) -> AwqTensor {
    AwqTensor::from_state_dict(p, &|k| f.get(k).cloned(), &config()).unwrap()
}

#[test]
fn config_parses() {
    assert_eq!(
        config(),
        AwqConfig {
            bits: 4,
            group_size: 32
        }
    );
    // AutoAWQ's own keys.
    let c = json!({"quant_method": "awq", "zero_point": true, "q_group_size": 128, "w_bit": 4, "version": "GEMM"});
    assert_eq!(AwqConfig::from_json(&c).unwrap().group_size, 128);
}

#[test]
fn bad_configs_name_the_key() {
    let err = |patch: serde_json::Value| {
        let mut c = config_json();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        AwqConfig::from_json(&c).unwrap_err().to_string()
    };
    assert!(err(json!({"bits": 3})).contains("bits = 3"));
    assert!(err(json!({"version": "gemv"})).contains("version = \"gemv\""));
    assert!(err(json!({"format": "marlin"})).contains("format = \"marlin\""));
    assert!(err(json!({"zero_point": false})).contains("zero_point = false"));
    assert!(err(json!({"group_size": -1})).contains("group_size = -1"));
    assert!(err(json!({"quant_method": "gptq"})).contains("quant_method"));
}

/// `dequantize` equals the library's fp16 `dequantize_gemm` bit for bit, in F16 and widened to F32.
#[test]
fn dequantize_equals_library() {
    let f = load();
    for p in MODULES {
        let t = module(&f, p);
        let want = tensor(&f, &format!("ref.{p}.dequant"));
        assert_eq!(t.shape(), want.dims2().unwrap());
        let a: Vec<u16> = t
            .dequantize(DType::F16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let b: Vec<u16> = want
            .flatten_all()
            .unwrap()
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(a, b, "{p}");
        assert_eq!(t.dequantize_f32(), f32s(&want), "{p}");
    }
}

#[test]
fn interleaved_nibbles() {
    // Nibble i of qweight[k, c] is output column 8c + AWQ_ORDER[i].
    let f = load();
    let p = MODULES[0];
    let t = module(&f, p);
    let qw = &f[&format!("{p}.qweight")];
    let words: Vec<u32> = qw
        .data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let wc = qw.shape[1];
    for k in [0, 5, 127] {
        for c in [0, 3, wc - 1] {
            for (i, &o) in AWQ_ORDER.iter().enumerate() {
                assert_eq!(t.code(8 * c + o, k), (words[k * wc + c] >> (4 * i)) & 0xF);
            }
        }
    }
}

#[test]
fn fused_matmul_matches_dequantized() {
    let f = load();
    for p in MODULES {
        assert_fused_matches_dequantized(&module(&f, p), p);
    }
}

/// Forward against `AwqTorchLinear` (fp16 weight and activations, fp16 output): equal weights, the
/// library's output rounded to fp16 (2^-11 relative steps), so 1e-3 of max |y| (seen: 3.5e-4).
#[test]
fn forward_matches_library() {
    let f = load();
    for p in MODULES {
        let t = module(&f, p);
        let x = tensor(&f, &format!("ref.{p}.x"));
        let want = f32s(&tensor(&f, &format!("ref.{p}.y")));
        let r = rel(
            &f32s(&t.matmul(&x.to_dtype(DType::F32).unwrap()).unwrap()),
            &want,
        );
        eprintln!("{p}: forward rel diff vs AwqTorchLinear {r:.2e}");
        assert!(r < 1e-3, "{p}: rel {r}");
    }
}

#[test]
fn state_dict_round_trip_is_byte_exact() {
    let f = load();
    for p in MODULES {
        let t = module(&f, p);
        let sd = t.to_state_dict(p);
        assert_eq!(sd.len(), 3);
        for (name, raw) in &sd {
            assert_eq!(raw, &f[name], "{name}");
        }
        assert_eq!(
            t.bytes(),
            sd.iter().map(|(_, r)| r.data.len()).sum::<usize>()
        );
    }
}

#[test]
fn bad_tensors_name_the_tensor() {
    let f = load();
    let p = MODULES[0];
    let err_with = |edit: &dyn Fn(&mut HashMap<String, RawTensor>)| {
        let mut g = f.clone();
        edit(&mut g);
        AwqTensor::from_state_dict(p, &|k| g.get(k).cloned(), &config())
            .unwrap_err()
            .to_string()
    };
    let e = err_with(&|g| {
        g.remove(&format!("{p}.qzeros"));
    });
    assert!(e.contains(&format!("missing tensor {p}.qzeros")), "{e}");
    let e = err_with(&|g| {
        let q = g.get_mut(&format!("{p}.qweight")).unwrap();
        q.shape = vec![120, 16];
        q.data.truncate(120 * 16 * 4);
    });
    assert!(
        e.contains(&format!("{p}.qweight")) && e.contains("group_size 32"),
        "{e}"
    );
    let e = err_with(&|g| {
        let q = g.get_mut(&format!("{p}.qweight")).unwrap();
        q.shape = vec![128, 8];
        q.data.truncate(128 * 8 * 4);
    });
    assert!(
        e.contains(&format!("{p}.scales")) && e.contains("[4, 64]"),
        "{e}"
    );
    let e = err_with(&|g| {
        g.get_mut(&format!("{p}.qweight")).unwrap().dtype = safetensors::Dtype::F32;
    });
    assert!(
        e.contains(&format!("{p}.qweight")) && e.contains("I32"),
        "{e}"
    );
}
