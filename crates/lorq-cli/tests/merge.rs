//! `lorq merge` end to end: the merged folder scores like PEFT's `add_weighted_adapter` model
//! (`fixtures/merge/`), and bad flags fail with messages naming the value.

mod common;

use candle_core::{DType, Device};
use common::*;

/// Last-position logits of prompt 0 of `fixtures/merge` for `case`, as PEFT computed them.
fn peft_last_logits(case: &str) -> Vec<f32> {
    let t =
        candle_core::safetensors::load(fixtures().join("merge/cases.safetensors"), &Device::Cpu)
            .unwrap();
    let l = &t[&format!("{case}/logits/0")];
    let n = l.dim(0).unwrap();
    l.get(n - 1)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn prompt0_ids() -> String {
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("merge/reference.json")).unwrap(),
    )
    .unwrap();
    r["input_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn merged_folder_scores_like_peft_ties() {
    let out = tempfile::tempdir().unwrap();
    let out_s = out.path().to_str().unwrap();
    let summary = lorq(&[
        "merge",
        "--model",
        &fixture("llama/base"),
        "--adapter",
        &fixture("llama/adapters/r8-all"),
        "--adapter",
        &fixture("llama/adapters/r4-rslora-qv-bf16"),
        "--adapter",
        &fixture("llama/adapters/r16-regex-layer1"),
        "--weights",
        "1.0,0.8,1.2",
        "--merge-strategy",
        "ties",
        "--density",
        "0.64",
        "--majority-sign-method",
        "total",
        "--dtype",
        "f32",
        "--out",
        out_s,
        "--json",
    ]);
    assert_eq!(summary["strategy"], "ties");
    assert_eq!(summary["merged_linears"], 14);
    assert_eq!(summary["dtype"], "float32");
    let scored = lorq(&[
        "score",
        "--model",
        out_s,
        "--token-ids",
        &prompt0_ids(),
        "--full-logits",
        "--json",
    ]);
    let ours: Vec<f32> = scored["last_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let want = peft_last_logits("ties-total");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff / scale < 1e-4, "merged logits differ by {diff}");
    // Writing again into the now non-empty folder needs --force.
    let e = lorq_fails(&[
        "merge",
        "--model",
        &fixture("llama/base"),
        "--adapter",
        &fixture("llama/adapters/r8-all"),
        "--out",
        out_s,
    ]);
    assert!(e.contains("--force"), "{e}");
}

#[test]
fn bad_merge_flags_are_named() {
    let out = tempfile::tempdir().unwrap();
    let out_s = out.path().join("m");
    let out_s = out_s.to_str().unwrap();
    let base = fixture("llama/base");
    let a = fixture("llama/adapters/r8-all");
    let b = fixture("llama/adapters/r4-rslora-qv-bf16");
    let run = |extra: &[&str]| {
        let mut args = vec!["merge", "--model", &base, "--adapter", &a, "--out", out_s];
        args.extend_from_slice(extra);
        lorq_fails(&args)
    };
    let e = run(&["--merge-strategy", "sum"]);
    assert!(e.contains("\"sum\"") && e.contains("dare_ties"), "{e}");
    let e = run(&["--merge-strategy", "ties", "--density", "1.5"]);
    assert!(e.contains("density 1.5"), "{e}");
    let e = run(&["--merge-strategy", "dare_linear", "--density", "0"]);
    assert!(e.contains("density 0"), "{e}");
    let e = run(&["--adapter", &b, "--weights", "0.5"]);
    assert!(e.contains("1 values for 2"), "{e}");
    let e = run(&["--majority-sign-method", "most"]);
    assert!(e.contains("\"most\""), "{e}");
    let e = run(&["--adapter", &fixture("mistral/adapters/r8-all")]);
    assert!(e.contains("different base models"), "{e}");
    let e = run(&["--quantize", "gptq"]);
    assert!(e.contains("gptq") && e.contains("pre-quantized"), "{e}");
    assert!(
        !out.path().join("m").exists(),
        "a failed merge left a folder"
    );
}

#[test]
fn help_shows_examples() {
    let out = run(&["merge", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Examples:") && text.contains("--merge-strategy ties"));
}
