//! `lorq quantize`: checkpoints written in the peer's layout load back (auto-detected) with the
//! just-in-time quantized model's logits, have the peer's tensor names and dtypes, and (bitsandbytes,
//! compressed-tensors) give the logits transformers gives when it loads them
//! (`fixtures/quantize/transformers_logits.json`, made by `fixtures/quantize/check_transformers_loads.py`).

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use lorq_model::checkpoint_writer::{quantize_checkpoint, QuantizeOptions};
use lorq_model::weights::WeightFiles;
use lorq_model::{BatchItem, LoadedModel, LogitsWanted};
use lorq_quant::method::QuantMethod;

const METHODS: [&str; 8] = [
    "bitsandbytes-nf4",
    "bitsandbytes-fp4",
    "bitsandbytes",
    "eetq",
    "hqq-4bit",
    "hqq-3bit",
    "hqq-2bit",
    "fp8",
];

fn last_logits(m: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.model.new_cache();
    let l = m
        .model
        .forward(&mut [BatchItem {
            tokens: ids,
            cache: &mut cache,
            adapter: None,
            logits: LogitsWanted::Last,
        }])
        .unwrap();
    l[0].squeeze(0).unwrap().to_vec1().unwrap()
}

fn quantize(method: QuantMethod, out: &Path) {
    quantize_checkpoint(
        &fixtures().join("llama/base"),
        out,
        method,
        QuantizeOptions::default(),
    )
    .unwrap();
}

/// (name, dtype) of the tensors of module `prefix` in `file`'s folder or file, name relative to the prefix.
fn module_tensors(w: &WeightFiles, prefix: &str) -> Vec<(String, String)> {
    w.inventory()
        .into_iter()
        .filter_map(|(n, d, _)| {
            n.strip_prefix(&format!("{prefix}."))
                .filter(|k| *k != "bias")
                .map(|k| (k.to_string(), d))
        })
        .collect()
}

fn open_file(file: &Path) -> WeightFiles {
    // WeightFiles opens a folder's model.safetensors: stage the single file in a tempdir.
    let d = tempfile::tempdir().unwrap().keep();
    std::fs::copy(file, d.join("model.safetensors")).unwrap();
    WeightFiles::open(&d).unwrap()
}

#[test]
fn every_method_round_trips_with_the_jit_logits() {
    let base = fixtures().join("llama/base");
    let reference = reference("llama");
    let ids = ids(&reference["runs"][0]["prompts"][0]["input_ids"]);
    let tmp = tempfile::tempdir().unwrap();
    for name in METHODS {
        let method = QuantMethod::parse(name).unwrap().unwrap();
        let out = tmp.path().join(name);
        quantize(method, &out);
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(out.join(f).exists(), "{name}: {f} missing");
        }
        let written = LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
        let jit =
            LoadedModel::load_quantized(&base, DType::F32, &Device::Cpu, Some(method)).unwrap();
        let a = written.model.linears().next().unwrap().base.format_name();
        let b = jit.model.linears().next().unwrap().base.format_name();
        assert_eq!(a, b, "{name}: loaded format");
        assert_ne!(a, "f32", "{name}: not loaded quantized");
        let d = rel_max_diff(&last_logits(&written, &ids), &last_logits(&jit, &ids));
        assert!(
            d <= 1e-6,
            "{name}: written checkpoint's logits differ from JIT by {d}"
        );
        // A --quantize naming the checkpoint's own method is accepted; another is refused.
        assert!(LoadedModel::load_quantized(&out, DType::F32, &Device::Cpu, Some(method)).is_ok());
    }
}

#[test]
fn tensor_names_and_dtypes_are_the_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = fixtures().join("prequantized");
    // bitsandbytes: transformers' checkpoints of the same base model: the whole inventory is equal.
    for (name, peer) in [
        ("bitsandbytes-nf4", "bnb-nf4-dq"),
        ("bitsandbytes-fp4", "bnb-fp4"),
        ("bitsandbytes", "bnb-int8"),
    ] {
        let out = tmp.path().join(name);
        quantize(QuantMethod::parse(name).unwrap().unwrap(), &out);
        let ours = WeightFiles::open(&out).unwrap().inventory();
        let theirs = WeightFiles::open(&pre.join(peer)).unwrap().inventory();
        // The quant-state JSON's length follows the printed nested_offset (equal to float rounding).
        let strip = |v: Vec<(String, String, Vec<usize>)>| -> Vec<(String, String, Vec<usize>)> {
            v.into_iter()
                .map(|(n, d, s)| {
                    let s = if n.contains(".quant_state.") {
                        vec![]
                    } else {
                        s
                    };
                    (n, d, s)
                })
                .collect()
        };
        assert_eq!(strip(ours), strip(theirs), "{name} vs transformers' {peer}");
        let cfg = |d: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
        };
        assert_eq!(
            cfg(&out)["quantization_config"],
            cfg(&pre.join(peer))["quantization_config"],
            "{name}: quantization_config"
        );
    }
    // hqq: HQQLinear.state_dict() names and dtypes (hqq's own fixture, a different module size).
    let hqq = fixtures().join("quant/hqq");
    for (name, file) in [
        ("hqq-4bit", "hqq_linear_4bit.safetensors"),
        ("hqq-3bit", "hqq_linear_3bit.safetensors"),
    ] {
        let out = tmp.path().join(name);
        quantize(QuantMethod::parse(name).unwrap().unwrap(), &out);
        let p = "model.layers.0.mlp.down_proj";
        let ours = module_tensors(&WeightFiles::open(&out).unwrap(), p);
        let theirs = module_tensors(&open_file(&hqq.join(file)), p);
        assert_eq!(ours, theirs, "{name} vs hqq's {file}");
    }
    // fp8: compressed-tensors' FP8 checkpoint (per-channel weight scales).
    let out = tmp.path().join("fp8");
    quantize(QuantMethod::Fp8, &out);
    let p = "model.layers.0.self_attn.q_proj";
    let ours = module_tensors(&WeightFiles::open(&out).unwrap(), p);
    let theirs = module_tensors(
        &WeightFiles::open(&fixtures().join("quant/fp8/ct_channel")).unwrap(),
        p,
    );
    // Scales are in the model's dtype, as compressed-tensors writes them (that fixture is bf16,
    // fixtures/llama/base is f32).
    let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&theirs), "fp8 vs compressed-tensors");
    assert_eq!(
        ours,
        vec![
            ("weight".to_string(), "F8_E4M3".to_string()),
            ("weight_scale".to_string(), "F32".to_string())
        ]
    );
    assert_eq!(theirs[1].1, "BF16");
    // Non-quantized tensors are copied unchanged.
    let src = WeightFiles::open(&fixtures().join("llama/base")).unwrap();
    let dst = WeightFiles::open(&out).unwrap();
    for n in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
    ] {
        assert_eq!(src.get_raw(n), dst.get_raw(n), "{n}");
    }
}

#[test]
fn transformers_loads_the_written_checkpoints_with_the_same_logits() {
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("quantize/transformers_logits.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["bitsandbytes-nf4", "bitsandbytes", "fp8"] {
        let out = tmp.path().join(name);
        quantize(QuantMethod::parse(name).unwrap().unwrap(), &out);
        let m = LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
        let d = rel_max_diff(
            &last_logits(&m, &ids(&r[name]["input_ids"])),
            &floats(&r[name]["last_logits"]),
        );
        assert!(
            d < 1e-4,
            "{name}: logits differ from transformers' by {d} (rel)"
        );
    }
}

#[test]
fn refusals() {
    let base = fixtures().join("llama/base");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    for m in [QuantMethod::Gptq, QuantMethod::Awq] {
        let e = quantize_checkpoint(&base, &out, m, QuantizeOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(m.name()) && e.contains("calibration"), "{e}");
    }
    let e = quantize_checkpoint(
        &fixtures().join("prequantized/bnb-int8"),
        &out,
        QuantMethod::Eetq,
        QuantizeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already quantized"), "{e}");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("x"), "x").unwrap();
    let e = quantize_checkpoint(&base, &out, QuantMethod::Eetq, QuantizeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    let opts = QuantizeOptions {
        force: true,
        progress: false,
    };
    quantize_checkpoint(&base, &out, QuantMethod::Eetq, opts).unwrap();
    assert!(LoadedModel::load(&out, DType::F32, &Device::Cpu).is_ok());
}
