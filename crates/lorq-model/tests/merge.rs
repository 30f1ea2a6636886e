//! Merging adapters into the base checkpoint and serving merged (dense ΔW) adapters, against
//! PEFT's `merge_and_unload` and `add_weighted_adapter` (`fixtures/merge/`, made by
//! `fixtures/merge/make_merge_fixtures.py`).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use lorq_lora::merge::{merge_adapters_with, with_weights, DareMasks, MergeSpec};
use lorq_lora::LoraAdapter;
use lorq_model::merge_checkpoint::{merge_checkpoint, MergeOptions};
use lorq_model::prequantized::CheckpointFormat;
use lorq_model::weights::WeightFiles;
use lorq_model::{BatchItem, LoadedModel, LogitsWanted, ModelConfig};
use serde_json::Value;

const LOGIT_TOL: f32 = 1e-4;

fn merge_ref() -> Value {
    reference("merge")
}

fn tensors(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("merge").join(file), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn adapter(rel: &str) -> Arc<LoraAdapter> {
    Arc::new(LoraAdapter::load(&fixtures().join(rel), &Device::Cpu).unwrap())
}

fn llama_base() -> std::path::PathBuf {
    fixtures().join("llama/base")
}

/// All-position logits of `m` (with `adapter`) for every reference prompt.
fn logits(m: &LoadedModel, adapter: Option<Arc<LoraAdapter>>) -> Vec<Vec<f32>> {
    let r = merge_ref();
    r["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let input = ids(p);
            let mut cache = m.model.new_cache();
            let out = m
                .model
                .forward(&mut [BatchItem {
                    tokens: &input,
                    cache: &mut cache,
                    adapter: adapter.clone(),
                    logits: LogitsWanted::All,
                }])
                .unwrap();
            flat(&out[0])
        })
        .collect()
}

fn check_logits(label: &str, ours: &[Vec<f32>], stored: &HashMap<String, Tensor>, prefix: &str) {
    for (i, got) in ours.iter().enumerate() {
        let want = flat(&stored[&format!("{prefix}{i}")]);
        let d = rel_max_diff(got, &want);
        assert!(
            d <= LOGIT_TOL,
            "{label}: logits of prompt {i} differ from PEFT by {d:e} (rel)"
        );
    }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn merged_checkpoint_equals_peft_merge_and_unload() {
    let r = merge_ref();
    let peft = tensors("merge_and_unload.safetensors");
    let out = tempfile::tempdir().unwrap();
    let adapters = [(adapter("llama/adapters/r8-all"), 1.0)];
    let summary = merge_checkpoint(
        &llama_base(),
        &adapters,
        &MergeSpec::default(),
        out.path(),
        MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(summary.merged_linears, 14);
    assert_eq!(summary.dtype, "float32");
    // Same tensor names and shapes as PEFT's merged state dict.
    let ours =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let want_names = r["merge_and_unload"]["state_dict"].as_object().unwrap();
    assert_eq!(ours.len(), want_names.len());
    for (name, shape) in want_names {
        let t = ours.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let shape: Vec<usize> = shape
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        assert_eq!(t.dtype(), DType::F32, "{name}");
    }
    // Merged linears equal PEFT's; every other tensor is the base's, bit for bit.
    let base = WeightFiles::open(&llama_base()).unwrap();
    let changed: Vec<&str> = r["merge_and_unload"]["changed_tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(changed.len(), 14);
    for (name, t) in &ours {
        if changed.contains(&name.as_str()) {
            let d = rel_max_diff(&flat(t), &flat(&peft[&format!("weights/{name}")]));
            assert!(
                d <= 1e-6,
                "{name}: differs from PEFT's merged weight by {d:e}"
            );
        } else {
            let b = base.get_tensor(name, &Device::Cpu).unwrap();
            assert_eq!(flat(t), flat(&b), "{name} changed");
        }
    }
    // A plain folder that loads and gives PEFT's merged logits.
    let cfg = read_json(&out.path().join("config.json"));
    assert!(cfg.get("quantization_config").is_none());
    assert_eq!(cfg["dtype"], "float32");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.path().join(f).exists(), "{f} not copied");
    }
    let m = LoadedModel::load(out.path(), DType::F32, &Device::Cpu).unwrap();
    check_logits("merge_and_unload", &logits(&m, None), &peft, "logits/");
}

#[test]
fn bf16_output_is_the_f32_merge_rounded_once() {
    let peft = tensors("merge_and_unload.safetensors");
    let out = tempfile::tempdir().unwrap();
    merge_checkpoint(
        &llama_base(),
        &[(adapter("llama/adapters/r8-all"), 1.0)],
        &MergeSpec::default(),
        out.path(),
        MergeOptions {
            dtype: Some(DType::BF16),
            ..Default::default()
        },
    )
    .unwrap();
    let ours =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    assert_eq!(ours[name].dtype(), DType::BF16);
    let want = peft[&format!("weights/{name}")]
        .to_dtype(DType::BF16)
        .unwrap();
    let (a, b) = (flat(&ours[name]), flat(&want));
    // Rounding the same f32 sum once: equal, except where the f32 sums differ in the last bits
    // right at a bf16 rounding boundary (then one bf16 step apart).
    let exact = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(exact as f64 >= 0.99 * a.len() as f64, "{exact}/{}", a.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= y.abs() / 128.0, "{x} vs {y}");
    }
    let cfg = read_json(&out.path().join("config.json"));
    assert_eq!(cfg["dtype"], "bfloat16");
}

#[test]
fn merged_adapters_served_and_merged_into_the_base_match_peft() {
    let r = merge_ref();
    let stored = tensors("cases.safetensors");
    let masks = tensors("dare_masks.safetensors");
    let m = load("llama");
    let all: Vec<&str> = r["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for case in r["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let idx: Vec<usize> = case["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let weights: Vec<f64> = case["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let adapters = with_weights(
            idx.iter()
                .map(|&i| m.load_adapter(&fixtures().join(all[i])).unwrap())
                .collect(),
            Some(&weights),
        )
        .unwrap();
        let spec = MergeSpec {
            strategy: case["strategy"].as_str().unwrap().parse().unwrap(),
            density: case["density"].as_f64().unwrap(),
            majority_sign_method: case["majority_sign_method"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
            seed: 0,
        };
        let recorded =
            |module: &str, i: usize| masks.get(&format!("{name}/{module}/{}", idx[i])).map(flat);
        let dare = case["dare_masks"].as_bool().unwrap();
        let source = if dare {
            DareMasks::Given(&recorded)
        } else {
            DareMasks::Seeded
        };
        // Served: the merged adapter (dense ΔW) applied unmerged over the base.
        let merged = merge_adapters_with(&adapters, &spec, &source).unwrap();
        m.model.check_adapter(&merged).unwrap();
        let served = logits(&m, Some(Arc::new(merged)));
        check_logits(name, &served, &stored, &format!("{name}/logits/"));
        // Merged into the checkpoint (seeded masks, so only the cases without random drop).
        if !dare {
            let out = tempfile::tempdir().unwrap();
            merge_checkpoint(
                &llama_base(),
                &adapters,
                &spec,
                out.path(),
                MergeOptions::default(),
            )
            .unwrap();
            let mm = LoadedModel::load(out.path(), DType::F32, &Device::Cpu).unwrap();
            check_logits(
                &format!("{name} (checkpoint)"),
                &logits(&mm, None),
                &stored,
                &format!("{name}/logits/"),
            );
        }
    }
}

#[test]
fn quantized_base_is_dequantized_before_merging() {
    let a = adapter("llama/adapters/r8-all");
    let adapters = [(a.clone(), 1.0)];
    let src = fixtures().join("prequantized/bnb-nf4-dq");
    let out = tempfile::tempdir().unwrap();
    let s = merge_checkpoint(
        &src,
        &adapters,
        &MergeSpec::default(),
        out.path(),
        MergeOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.base, "bitsandbytes-nf4");
    let cfg = read_json(&out.path().join("config.json"));
    assert!(cfg.get("quantization_config").is_none());
    let ours =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(
        ours.keys()
            .all(|n| n.ends_with(".weight") && !n.contains("absmax")),
        "quantization state written: {:?}",
        ours.keys().collect::<Vec<_>>()
    );
    // Each linear = the nf4 weight as bitsandbytes stored it, dequantized, plus ΔW.
    let config = ModelConfig::load(&src).unwrap();
    let weights = WeightFiles::open(&src).unwrap();
    let format = CheckpointFormat::detect(&config, &weights, &src)
        .unwrap()
        .unwrap();
    let module = "model.layers.0.mlp.gate_proj";
    let w = format
        .load_linear(&weights, module, (128, 64), &Device::Cpu)
        .unwrap()
        .dequantize(DType::F32)
        .unwrap();
    let delta = a.module(module).unwrap().delta_weight().unwrap();
    let want = flat(&(w + delta).unwrap());
    let got = flat(&ours[&format!("{module}.weight")]);
    assert!(rel_max_diff(&got, &want) <= 1e-6);
    // The merged model runs (and is not the base merged without quantization).
    let plain = tempfile::tempdir().unwrap();
    merge_checkpoint(
        &llama_base(),
        &adapters,
        &MergeSpec::default(),
        plain.path(),
        MergeOptions::default(),
    )
    .unwrap();
    let p = candle_core::safetensors::load(plain.path().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(rel_max_diff(&got, &flat(&p[&format!("{module}.weight")])) > 1e-3);
    // --quantize bitsandbytes-nf4 on the full-precision base reproduces the base bitsandbytes
    // wrote: same nf4 codes (a different code moves a value by a code step, ~10% of its block's
    // absmax), block scales equal to a few 1e-4 relative (the double-quantized absmax is rounded
    // differently in the last bits), so the same merge within 2e-3 of the largest value.
    let requant = tempfile::tempdir().unwrap();
    let s = merge_checkpoint(
        &llama_base(),
        &adapters,
        &MergeSpec::default(),
        requant.path(),
        MergeOptions {
            quantize: lorq_quant::method::QuantMethod::parse("bitsandbytes-nf4").unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(s.base.starts_with("bitsandbytes-nf4"), "{}", s.base);
    let q = candle_core::safetensors::load(requant.path().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    for (name, t) in &ours {
        let (a, b) = (flat(&q[name]), flat(t));
        let d = rel_max_diff(&a, &b);
        let n = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(
            d <= 2e-3,
            "{name}: --quantize bitsandbytes-nf4 differs from the bitsandbytes checkpoint by {d:e} in {n}/{} values",
            a.len()
        );
    }
    LoadedModel::load(out.path(), DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn merge_errors_are_clear() {
    let base = llama_base();
    let out = tempfile::tempdir().unwrap();
    // An adapter made for another model.
    let e = merge_checkpoint(
        &base,
        &[(adapter("mistral/adapters/r8-all"), 1.0)],
        &MergeSpec::default(),
        out.path(),
        MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mistral") && e.contains("does not fit"), "{e}");
    // A non-empty output folder without force.
    std::fs::write(out.path().join("x"), "x").unwrap();
    let e = merge_checkpoint(
        &base,
        &[(adapter("llama/adapters/r8-all"), 1.0)],
        &MergeSpec::default(),
        out.path(),
        MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    // A --quantize that contradicts a pre-quantized checkpoint.
    let e = merge_checkpoint(
        &fixtures().join("prequantized/bnb-nf4-dq"),
        &[(adapter("llama/adapters/r8-all"), 1.0)],
        &MergeSpec::default(),
        out.path(),
        MergeOptions {
            quantize: lorq_quant::method::QuantMethod::parse("hqq-4bit").unwrap(),
            force: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("hqq-4bit") && e.contains("bitsandbytes-nf4"),
        "{e}"
    );
}
