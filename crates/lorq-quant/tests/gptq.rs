//! GPTQ against checkpoints made by GPTQModel 7.7.0 (`fixtures/quant/gptq/make_gptq_fixtures.py`).
//!
//! Each fixture keeps three modules' tensors as GPTQModel saved them, the library's
//! `dequantize_weight()` (computed in fp16) and its module forward (fp16) on a seeded input.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use lorq_quant::gptq::{GptqConfig, GptqFormat, GptqTensor};
use lorq_quant::QuantTensor;
use lorq_quant::RawTensor;
use serde_json::json;

const CASES: &[&str] = &[
    "gptq_b4_g32_sym",
    "gptq_b4_g32_actorder_asym",
    "gptq_b8_gm1_sym",
    "gptq_b3_g32_sym",
    "gptq_v2_b2_g64_asym",
];
const MODULES: &[&str] = &[
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.mlp.down_proj",
];

fn load(case: &str) -> HashMap<String, RawTensor> {
    load_raw("gptq", case)
}

fn config(case: &str) -> GptqConfig {
    GptqConfig::from_json(&quantization_config("gptq", case)).unwrap()
}

fn module(f: &HashMap<String, RawTensor>, p: &str, cfg: &GptqConfig) -> GptqTensor {
    GptqTensor::from_state_dict(p, &|k| f.get(k).cloned(), cfg).unwrap()
}

#[test]
fn configs_parse() {
    let c = config("gptq_b4_g32_sym");
    assert_eq!(
        c,
        GptqConfig {
            bits: 4,
            group_size: Some(32),
            desc_act: false,
            sym: true,
            format: GptqFormat::V1
        }
    );
    let c = config("gptq_b4_g32_actorder_asym");
    assert!(c.desc_act && !c.sym);
    assert_eq!(config("gptq_b8_gm1_sym").group_size, None);
    assert_eq!(config("gptq_v2_b2_g64_asym").format, GptqFormat::V2);
    assert_eq!(config("gptq_b3_g32_sym").bits, 3);
    // to_json gives back what GPTQModel wrote.
    for case in CASES {
        assert_eq!(
            config(case).to_json(),
            quantization_config("gptq", case),
            "{case}"
        );
    }
}

/// `dequantize` equals GPTQModel's `dequantize_weight()` (fp16) bit for bit, in F16 and widened to F32.
#[test]
fn dequantize_equals_gptqmodel() {
    for case in CASES {
        let f = load(case);
        let cfg = config(case);
        for p in MODULES {
            let t = module(&f, p, &cfg);
            let want = tensor(&f, &format!("ref.{p}.dequant"));
            assert_eq!(t.shape(), want.dims2().unwrap(), "{case} {p}");
            let got16 = t.dequantize(DType::F16).unwrap();
            let (a, b): (Vec<u16>, Vec<u16>) = (
                got16
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::f16>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect(),
                want.flatten_all()
                    .unwrap()
                    .to_vec1::<half::f16>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect(),
            );
            let bad = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            assert_eq!(bad, 0, "{case} {p}: {bad} fp16 elements differ");
            let w32 = t.dequantize_f32();
            let w16 = f32s(&want);
            assert_eq!(w32, w16, "{case} {p}");
        }
    }
}

#[test]
fn codes_and_zeros_match_the_format() {
    // Symmetric 4-bit v1: every stored nibble is 7, so every zero is 8.
    let f = load("gptq_b4_g32_sym");
    let cfg = config("gptq_b4_g32_sym");
    let qz = &f["model.layers.0.self_attn.q_proj.qzeros"];
    assert!(qz
        .data
        .chunks_exact(4)
        .all(|c| c == [0x77, 0x77, 0x77, 0x77]));
    let t = module(&f, "model.layers.0.self_attn.q_proj", &cfg);
    assert!((0..128).all(|n| (0..t.n_groups()).all(|g| t.zero(n, g) == 8)));
    // Input channel 0..8 of output 0 are the nibbles of qweight[0, 0], lowest first.
    let qw = &f["model.layers.0.self_attn.q_proj.qweight"];
    let w0 = u32::from_le_bytes(qw.data[0..4].try_into().unwrap());
    for k in 0..8 {
        assert_eq!(t.code(0, k), (w0 >> (4 * k)) & 0xF);
    }
    // Act-order: g_idx is not i / group_size and is kept as stored.
    let f = load("gptq_b4_g32_actorder_asym");
    let t = module(
        &f,
        "model.layers.0.mlp.down_proj",
        &config("gptq_b4_g32_actorder_asym"),
    );
    let g = t.g_idx();
    assert!(g.iter().enumerate().any(|(i, &g)| g as usize != i / 32));
}

/// The fused row kernel (m ≤ 16) and the GEMM path (m = 40) against dequantize-then-matmul.
#[test]
fn fused_matmul_matches_dequantized() {
    let dev = Device::Cpu;
    for case in CASES {
        let f = load(case);
        let cfg = config(case);
        for p in MODULES {
            let t = module(&f, p, &cfg);
            assert_fused_matches_dequantized(&t, &format!("{case} {p}"));
            let (_, k) = t.shape();
            // Batched input and dtype preserved.
            let x = Tensor::randn(0f32, 1.0, (2, 3, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let y = t.matmul(&x).unwrap();
            assert_eq!(y.dtype(), DType::BF16);
            assert_eq!(y.dims(), &[2, 3, t.shape().0]);
        }
    }
}

/// Module forward against GPTQModel's (TorchLinear: fp16 activations, fp16 weights, fp16 output).
/// The weights are equal; lorq returns the f32 sum where the library rounds it to fp16 (a relative
/// step of 2^-11 ≈ 4.9e-4 at the top of the range), so: 1e-3 of max |y| (seen: at most 4.0e-4).
#[test]
fn forward_matches_gptqmodel() {
    for case in CASES {
        let f = load(case);
        let cfg = config(case);
        for p in MODULES {
            let t = module(&f, p, &cfg);
            let x = tensor(&f, &format!("ref.{p}.x"));
            let want = f32s(&tensor(&f, &format!("ref.{p}.y")));
            let got = f32s(&t.matmul(&x.to_dtype(DType::F32).unwrap()).unwrap());
            let r = rel(&got, &want);
            eprintln!("{case} {p}: forward rel diff vs GPTQModel {r:.2e}");
            assert!(r < 1e-3, "{case} {p}: rel {r}");
            let got16 = f32s(&t.matmul(&x).unwrap());
            assert!(rel(&got16, &want) < 1e-3, "{case} {p} (f16 input)");
        }
    }
}

#[test]
fn state_dict_round_trip_is_byte_exact() {
    for case in CASES {
        let f = load(case);
        let cfg = config(case);
        for p in MODULES {
            let t = module(&f, p, &cfg);
            let sd = t.to_state_dict(p);
            assert_eq!(sd.len(), 4, "{case} {p}");
            for (name, raw) in &sd {
                assert_eq!(raw, &f[name], "{case} {name}");
            }
            assert_eq!(
                t.bytes(),
                sd.iter().map(|(_, r)| r.data.len()).sum::<usize>()
            );
        }
        // Without g_idx (allowed without act-order) nothing changes but the missing tensor.
        if !cfg.desc_act {
            let p = MODULES[0];
            let gi = format!("{p}.g_idx");
            let t = GptqTensor::from_state_dict(
                p,
                &|k| (k != gi).then(|| f.get(k).cloned()).flatten(),
                &cfg,
            )
            .unwrap();
            let full = module(&f, p, &cfg);
            assert_eq!(t.dequantize_f32(), full.dequantize_f32());
            assert_eq!(t.to_state_dict(p).len(), 3);
        }
    }
}

#[test]
fn bad_tensors_name_the_tensor() {
    let f = load("gptq_b4_g32_actorder_asym");
    let cfg = config("gptq_b4_g32_actorder_asym");
    let p = "model.layers.0.self_attn.q_proj";
    let err_with = |edit: &dyn Fn(&mut HashMap<String, RawTensor>)| {
        let mut g = f.clone();
        edit(&mut g);
        GptqTensor::from_state_dict(p, &|k| g.get(k).cloned(), &cfg)
            .unwrap_err()
            .to_string()
    };
    let e = err_with(&|g| {
        g.remove(&format!("{p}.g_idx"));
    });
    assert!(
        e.contains(&format!("{p}.g_idx")) && e.contains("desc_act"),
        "{e}"
    );
    let e = err_with(&|g| {
        let q = g.get_mut(&format!("{p}.qweight")).unwrap();
        q.shape = vec![15, 128];
        q.data.truncate(15 * 128 * 4);
    });
    assert!(
        e.contains(&format!("{p}.qweight")) && e.contains("[15, 128]"),
        "{e}"
    );
    let e = err_with(&|g| {
        g.remove(&format!("{p}.qzeros"));
    });
    assert!(e.contains(&format!("missing tensor {p}.qzeros")), "{e}");
    let e = err_with(&|g| {
        g.get_mut(&format!("{p}.scales")).unwrap().dtype = safetensors::Dtype::I16;
    });
    assert!(
        e.contains(&format!("{p}.scales")) && e.contains("dtype"),
        "{e}"
    );
    let e = err_with(&|g| {
        let gi = g.get_mut(&format!("{p}.g_idx")).unwrap();
        gi.data[0..4].copy_from_slice(&9i32.to_le_bytes());
    });
    assert!(
        e.contains(&format!("{p}.g_idx")) && e.contains("outside"),
        "{e}"
    );
    let e = err_with(&|g| {
        let s = g.get_mut(&format!("{p}.scales")).unwrap();
        s.shape = vec![2, 128];
        s.data.truncate(2 * 128 * 2);
    });
    assert!(
        e.contains(&format!("{p}.scales")) && e.contains("[4, 128]"),
        "{e}"
    );
}

#[test]
fn bad_configs_name_the_key() {
    let base = json!({"bits": 4, "group_size": 32, "desc_act": false, "sym": true,
                      "checkpoint_format": "gptq", "quant_method": "gptq"});
    let err = |patch: serde_json::Value| {
        let mut c = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        GptqConfig::from_json(&c).unwrap_err().to_string()
    };
    assert!(err(json!({"bits": 5})).contains("bits = 5"));
    assert!(err(json!({"group_size": 0})).contains("group_size = 0"));
    assert!(err(json!({"checkpoint_format": "marlin"})).contains("checkpoint_format = \"marlin\""));
    assert!(err(json!({"quant_method": "awq"})).contains("quant_method = \"awq\""));
    assert!(err(json!({"pack_dtype": "int16"})).contains("pack_dtype"));
    assert!(err(json!({"is_marlin_format": true})).contains("is_marlin_format"));
    assert!(err(json!({"desc_act": "yes"})).contains("desc_act"));
    let mut c = base.clone();
    c.as_object_mut().unwrap().remove("bits");
    assert!(GptqConfig::from_json(&c)
        .unwrap_err()
        .to_string()
        .contains("bits"));
    // auto-gptq's quantize_config.json (no format key) is v1.
    let c = json!({"bits": 4, "group_size": 128, "desc_act": true, "sym": false, "static_groups": false});
    assert_eq!(GptqConfig::from_json(&c).unwrap().format, GptqFormat::V1);
}
