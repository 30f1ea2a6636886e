//! `lorq quantize --method gptq|awq|rtn-int4`: the checkpoints lorq writes for the tiny Llama load in
//! GPTQModel (and, for AWQ, transformers) with the logits lorq computes on them
//! (`fixtures/calibrated/reference.json`, made by `fixtures/calibrated/make.sh`, which runs the same
//! `lorq quantize` arguments); GPTQ's output error is below round-to-nearest's for every linear;
//! bad options are refused with messages naming them.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use lorq_model::{BatchItem, LoadedModel, LogitsWanted};
use serde_json::Value;

fn reference() -> Value {
    let p = fixtures().join("calibrated/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn last_logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let m = LoadedModel::load(dir, DType::F32, &Device::Cpu).unwrap();
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

/// Runs `lorq quantize` with a case's arguments (paths relative to the repo root) into `out`.
fn quantize(args: &[String], out: &Path) -> Value {
    let mut a: Vec<String> = vec![
        "quantize".into(),
        "--model".into(),
        fixture("llama/base"),
        "--out".into(),
        out.to_str().unwrap().into(),
        "--json".into(),
    ];
    for x in args {
        a.push(match x.strip_prefix("fixtures/") {
            Some(p) => fixture(p),
            None => x.clone(),
        });
    }
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    lorq(&refs)
}

#[test]
fn checkpoints_load_in_gptqmodel_with_lorqs_logits() {
    let r = reference();
    let cases = r.as_object().unwrap();
    assert_eq!(cases.len(), 5);
    for (name, c) in cases {
        let args: Vec<String> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(name);
        let s = quantize(&args, &out);
        assert_eq!(s["quantized_linears"], 14, "{name}");
        assert_eq!(
            c["linears"], 14,
            "{name}: GPTQModel built 14 quantized linears"
        );
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let q = &cfg["quantization_config"];
        // transformers' own GPTQ (through optimum) and AWQ integrations load it too (fp16 compute).
        let tf = floats(&c["transformers_last_logits"]);
        assert!(
            rel(&tf, &floats(&c["last_logits"])) < 1e-2,
            "{name}: transformers' logits"
        );
        if name.starts_with("awq") {
            assert_eq!(q["quant_method"], "awq");
            assert_eq!(q["version"], "gemm");
            assert_eq!(c["library_kernels"][0], "AwqTorchLinear");
        } else {
            assert_eq!(q["quant_method"], "gptq");
            assert_eq!(q["checkpoint_format"], "gptq");
            assert_eq!(c["library_kernels"][0], "TorchLinear");
        }
        let ids: Vec<u32> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = last_logits(&out, &ids);
        // The exact math: an fp32 Llama holding GPTQModel's own dequantization of the checkpoint.
        let exact = rel(&got, &floats(&c["last_logits"]));
        assert!(
            exact < 1e-4,
            "{name}: {exact} from GPTQModel's dequantized weights"
        );
        // GPTQModel's own forward (fp16 torch kernels).
        let lib = rel(&got, &floats(&c["library_last_logits"]));
        assert!(lib < 1e-2, "{name}: {lib} from GPTQModel's forward");
    }
}

/// GPTQ's reconstruction error ‖WX − ŴX‖ is below round-to-nearest's, on the same calibration
/// inputs, for every linear of every layer; AWQ's is not above it.
#[test]
fn gptq_and_awq_beat_rtn_on_every_linear() {
    let dir = tempfile::tempdir().unwrap();
    let calib = fixture("calibrated/calibration.txt");
    let base = [
        "--calibration",
        calib.as_str(),
        "--calibration-samples",
        "8",
        "--calibration-seq-len",
        "64",
        "--group-size",
        "32",
    ];
    for (m, extra) in [
        ("gptq", &[][..]),
        ("gptq", &["--act-order"][..]),
        ("gptq", &["--bits", "3"][..]),
        ("awq", &["--awq-clip"][..]),
    ] {
        let out = dir.path().join(format!("{m}{}", extra.join("")));
        let mut a = vec!["quantize", "--model", "", "--method", m, "--out"];
        let model = fixture("llama/base");
        a[2] = &model;
        let o = out.to_str().unwrap().to_string();
        a.push(&o);
        a.push("--json");
        a.extend(base);
        a.extend(extra);
        let s = lorq(&a);
        let linears = s["linears"].as_array().unwrap();
        assert_eq!(linears.len(), 14);
        assert_eq!(s["calibration_tokens"], 8 * 64);
        for l in linears {
            let (e, r) = (
                l["rel_error"].as_f64().unwrap(),
                l["rtn_rel_error"].as_f64().unwrap(),
            );
            if m == "gptq" {
                assert!(e < r, "{m} {extra:?} {}: {e} not below RTN {r}", l["path"]);
            } else {
                // AWQ's clip search targets each group's error, the scale search the summed
                // output error of the group of linears; per linear a small excess is possible.
                assert!(e < r * 1.05, "{m} {extra:?} {}: {e} vs RTN {r}", l["path"]);
            }
        }
    }
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let out = out.to_str().unwrap();
    let model = fixture("llama/base");
    let calib = fixture("calibrated/calibration.txt");
    let run = |extra: &[&str]| {
        let mut a = vec!["quantize", "--model", model.as_str(), "--out", out];
        a.extend(extra);
        lorq_fails(&a)
    };
    let e = run(&["--method", "gptq", "--bits", "5", "--calibration", &calib]);
    assert!(e.contains("--bits 5") && e.contains("2, 3, 4 or 8"), "{e}");
    let e = run(&["--method", "awq", "--bits", "3", "--calibration", &calib]);
    assert!(e.contains("--bits 3") && e.contains("4-bit"), "{e}");
    let e = run(&[
        "--method",
        "gptq",
        "--group-size",
        "48",
        "--calibration",
        &calib,
    ]);
    assert!(
        e.contains("group size 48") && e.contains("64 input features"),
        "{e}"
    );
    let e = run(&["--method", "gptq"]);
    assert!(e.contains("--calibration"), "{e}");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = run(&[
        "--method",
        "gptq",
        "--group-size",
        "32",
        "--calibration",
        empty.to_str().unwrap(),
    ]);
    assert!(e.contains("empty.txt") && e.contains("no text"), "{e}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"prompt\": \"x\"}\n").unwrap();
    let e = run(&[
        "--method",
        "awq",
        "--group-size",
        "32",
        "--calibration",
        bad.to_str().unwrap(),
    ]);
    assert!(
        e.contains("bad.jsonl line 2") && e.contains("\"text\""),
        "{e}"
    );
    let e = run(&["--method", "hqq-4bit", "--act-order"]);
    assert!(e.contains("--act-order") && e.contains("gptq"), "{e}");
    let e = run(&["--method", "awq", "--act-order", "--calibration", &calib]);
    assert!(e.contains("--act-order applies to --method gptq"), "{e}");
    assert!(!Path::new(out).join("model.safetensors").exists());
}
