//! compressed-tensors pack-quantized W4A16 (symmetric, group 32) against a checkpoint made by
//! compressed-tensors 0.20.0 and decompressed by transformers 5.24
//! (`fixtures/quant/compressed/make_compressed_fixtures.py`).

mod common;

use std::collections::HashMap;

use candle_core::DType;
use common::*;
use lorq_quant::compressed_int::{CompressedIntConfig, CompressedIntTensor};
use lorq_quant::QuantTensor;
use lorq_quant::RawTensor;
use serde_json::json;

const CASE: &str = "w4a16_sym_g32";
const MODULES: &[&str] = &[
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.mlp.down_proj",
];

fn load() -> HashMap<String, RawTensor> {
    load_raw("compressed", CASE)
}

fn config_json() -> serde_json::Value {
    quantization_config("compressed", CASE)
}

fn config() -> CompressedIntConfig {
    CompressedIntConfig::from_json(&config_json()).unwrap()
}

fn module(f: &HashMap<String, RawTensor>, p: &str) -> CompressedIntTensor {
    CompressedIntTensor::from_state_dict(p, &|k| f.get(k).cloned(), &config()).unwrap()
}

#[test]
fn config_parses() {
    let c = config();
    assert_eq!(c.num_bits, 4);
    assert_eq!(c.group_size, Some(32));
    assert_eq!(c.targets, vec!["Linear".to_string()]);
    assert_eq!(c.ignore, vec!["lm_head".to_string()]);
}

#[test]
fn bad_configs_name_the_key() {
    let err = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = config_json();
        edit(&mut c);
        CompressedIntConfig::from_json(&c).unwrap_err().to_string()
    };
    let w = |c: &mut serde_json::Value, k: &str, v: serde_json::Value| {
        c["config_groups"]["group_0"]["weights"][k] = v;
    };
    let e = err(&|c| w(c, "symmetric", json!(false)));
    assert!(
        e.contains("config_groups.group_0.weights.symmetric = false"),
        "{e}"
    );
    let e = err(&|c| w(c, "num_bits", json!(3)));
    assert!(e.contains("weights.num_bits = 3"), "{e}");
    let e = err(&|c| w(c, "type", json!("float")));
    assert!(e.contains("weights.type = \"float\""), "{e}");
    let e = err(&|c| w(c, "strategy", json!("tensor")));
    assert!(e.contains("weights.strategy = \"tensor\""), "{e}");
    let e = err(&|c| w(c, "actorder", json!("group")));
    assert!(e.contains("weights.actorder"), "{e}");
    let e = err(&|c| c["config_groups"]["group_0"]["format"] = json!("float-quantized"));
    assert!(e.contains("group_0.format = \"float-quantized\""), "{e}");
    let e = err(&|c| {
        c["config_groups"]["group_0"]
            .as_object_mut()
            .unwrap()
            .remove("format");
        c["format"] = json!("naive-quantized");
    });
    assert!(e.contains("format = \"naive-quantized\""), "{e}");
    let e = err(&|c| c["config_groups"]["group_0"]["input_activations"] = json!({"num_bits": 8}));
    assert!(e.contains("group_0.input_activations"), "{e}");
    let e = err(&|c| c["quant_method"] = json!("gptq"));
    assert!(e.contains("quant_method = \"gptq\""), "{e}");
    let e = err(&|c| c["quantization_status"] = json!("frozen"));
    assert!(e.contains("quantization_status"), "{e}");
}

/// The weight transformers decompresses is `(u − 8) · scale` computed in bf16 (the scale's dtype);
/// lorq's dequantization equals it bit for bit.
#[test]
fn dequantize_equals_transformers() {
    let f = load();
    for p in MODULES {
        let t = module(&f, p);
        let want = f32s(&tensor(&f, &format!("ref.{p}.dequant")));
        assert_eq!(t.dequantize_f32(), want, "{p}");
        assert_eq!(f32s(&t.dequantize(DType::F32).unwrap()), want, "{p}");
        // Element (0, 9) is nibble 1 of word 1 of row 0, offset by 8.
        let wp = &f[&format!("{p}.weight_packed")];
        let w1 = u32::from_le_bytes(wp.data[4..8].try_into().unwrap());
        assert_eq!(t.value(0, 9), ((w1 >> 4) & 0xF) as i32 - 8);
    }
}

#[test]
fn fused_matmul_matches_dequantized() {
    let f = load();
    for p in MODULES {
        assert_fused_matches_dequantized(&module(&f, p), p);
    }
}

/// Forward against the decompressed f32 `nn.Linear` of transformers: same weights, both f32, only
/// the summation order differs, so 1e-5 of max |y| (seen: 3.5e-7).
#[test]
fn forward_matches_transformers() {
    let f = load();
    for p in MODULES {
        let t = module(&f, p);
        let x = tensor(&f, &format!("ref.{p}.x"));
        let want = f32s(&tensor(&f, &format!("ref.{p}.y")));
        let r = rel(&f32s(&t.matmul(&x).unwrap()), &want);
        eprintln!("{p}: forward rel diff vs transformers {r:.2e}");
        assert!(r < 1e-5, "{p}: rel {r}");
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
    }
}

#[test]
fn bad_tensors_name_the_tensor() {
    let f = load();
    let p = MODULES[2];
    let err_with = |edit: &dyn Fn(&mut HashMap<String, RawTensor>)| {
        let mut g = f.clone();
        edit(&mut g);
        CompressedIntTensor::from_state_dict(p, &|k| g.get(k).cloned(), &config())
            .unwrap_err()
            .to_string()
    };
    let e = err_with(&|g| {
        g.remove(&format!("{p}.weight_shape"));
    });
    assert!(
        e.contains(&format!("missing tensor {p}.weight_shape")),
        "{e}"
    );
    let e = err_with(&|g| {
        let w = g.get_mut(&format!("{p}.weight_packed")).unwrap();
        w.shape = vec![128, 31];
        w.data.truncate(128 * 31 * 4);
    });
    assert!(
        e.contains(&format!("{p}.weight_packed")) && e.contains("[128, 32]"),
        "{e}"
    );
    let e = err_with(&|g| {
        g.insert(
            format!("{p}.weight_zero_point"),
            RawTensor::from_u8(&[1], &[0]),
        );
    });
    assert!(e.contains(&format!("{p}.weight_zero_point")), "{e}");
    let e = err_with(&|g| {
        let s = g.get_mut(&format!("{p}.weight_scale")).unwrap();
        s.shape = vec![128, 4];
        s.data.truncate(128 * 4 * 2);
    });
    assert!(
        e.contains(&format!("{p}.weight_scale")) && e.contains("[128, 8]"),
        "{e}"
    );
}
