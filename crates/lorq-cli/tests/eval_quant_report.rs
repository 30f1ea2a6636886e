//! `lorq eval ppl` and `lorq quant-report` end to end on the tiny transformers fixture.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const TEXT: &str =
    "Once upon a time there was a little girl who lived in a village near the forest. \
Whenever she went out, the little girl wore a red riding cloak, so everyone in the village called \
her Little Red Riding Hood.\n";

fn base() -> String {
    fixtures().join("llama/base").to_str().unwrap().to_string()
}

fn write_text(dir: &Path) -> String {
    let p = dir.join("text.txt");
    std::fs::write(&p, TEXT).unwrap();
    p.to_str().unwrap().to_string()
}

fn ppl(extra: &[&str], data: &str) -> Value {
    let b = base();
    let mut args = vec!["eval", "ppl", "--model", &b, "--data", data, "--json"];
    args.extend_from_slice(extra);
    lorq(&args)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

#[test]
fn eval_ppl_counts_every_token_once_and_matches_score() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_text(tmp.path());
    let tok = lorq_model::Tokenizer::load(&fixtures().join("llama/base")).unwrap();
    let n = tok.encode(TEXT).unwrap().len();
    assert!(n > 60);

    let v = ppl(
        &["--ctx", "16", "--stride", "8", "--quantize", "none"],
        &data,
    );
    for k in [
        "model", "quantize", "adapter", "data", "ctx", "stride", "tokens", "nll", "ppl", "seconds",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    assert_eq!(v["tokens"], n - 1);
    assert_eq!(v["input_tokens"], n);
    assert_eq!(
        (v["ctx"].as_u64(), v["stride"].as_u64()),
        (Some(16), Some(8))
    );
    assert_eq!(v["quantize"], "none");
    assert!(v["adapter"].is_null());
    assert!(f(&v["ppl"]) > 1.0);
    assert!((f(&v["ppl"]) - (f(&v["nll"]) / (n - 1) as f64).exp()).abs() < 1e-9 * f(&v["ppl"]));
    assert!(f(&v["seconds"]) > 0.0);

    // One window over the whole text: the NLL is minus the sum of `lorq score`'s log-probs.
    let whole = ppl(&["--ctx", "256", "--stride", "128"], &data);
    assert_eq!(whole["tokens"], n - 1);
    assert_eq!(whole["windows"], 1);
    let b = base();
    let s = lorq(&["score", "--model", &b, "--text", TEXT, "--json"]);
    let sum: f64 = s["logprobs"].as_array().unwrap().iter().map(f).sum();
    let rel = (f(&whole["nll"]) + sum).abs() / sum.abs();
    assert!(rel < 1e-5, "{} vs {sum}", whole["nll"]);
    // Shorter windows see less context: a different number.
    assert_ne!(whole["nll"], v["nll"]);

    // --max-tokens cuts the text.
    let cut = ppl(
        &["--ctx", "16", "--stride", "8", "--max-tokens", "20"],
        &data,
    );
    assert_eq!(cut["tokens"], 19);
    assert_eq!(cut["input_tokens"], 20);
    assert_eq!(cut["file_tokens"], n);
}

#[test]
fn eval_ppl_with_quantization_and_an_adapter_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_text(tmp.path());
    let args = ["--ctx", "32", "--stride", "16"];
    let none = ppl(&args, &data);
    let adapter = fixtures().join("llama/adapters/r8-all");
    let mut seen = vec![none.clone()];
    for extra in [
        vec!["--quantize", "bitsandbytes-nf4"],
        vec!["--quantize", "hqq-2bit"],
        vec!["--quantize", "eetq"],
        vec!["--adapter", adapter.to_str().unwrap()],
        vec!["--adapter", adapter.to_str().unwrap(), "--quantize", "eetq"],
    ] {
        let mut a = args.to_vec();
        a.extend(extra.iter().copied());
        let v = ppl(&a, &data);
        assert_eq!(v["tokens"], none["tokens"], "{extra:?}");
        let p = f(&v["ppl"]);
        assert!(p > 1.0 && p.is_finite(), "{extra:?}: {p}");
        for q in &seen {
            let q = f(&q["ppl"]);
            assert!(
                (p - q).abs() > 1e-6 * q,
                "{extra:?}: ppl {p} equals an earlier one"
            );
        }
        if extra.contains(&"--adapter") {
            assert!(v["adapter"].as_str().unwrap().ends_with("r8-all"));
        } else {
            assert_eq!(v["quantize"], extra[1]);
        }
        seen.push(v);
    }
    // 8-bit (eetq) stays closer to the full-precision NLL than 2-bit (hqq-2bit).
    let moved = |v: &Value| (f(&v["nll"]) - f(&none["nll"])).abs();
    let (d2, d8) = (moved(&seen[2]), moved(&seen[3]));
    assert!(d8 < d2, "eetq moves the NLL by {d8}, hqq-2bit by {d2}");
}

#[test]
fn eval_ppl_bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_text(tmp.path());
    let b = base();
    let e = lorq_fails(&[
        "eval", "ppl", "--model", &b, "--data", &data, "--ctx", "8", "--stride", "9",
    ]);
    assert!(e.contains("stride"), "{e}");
    let one_token = tmp.path().join("one-token.txt");
    std::fs::write(&one_token, "a").unwrap();
    let e = lorq_fails(&[
        "eval",
        "ppl",
        "--model",
        &b,
        "--data",
        one_token.to_str().unwrap(),
    ]);
    assert!(e.contains("at least 2"), "{e}");
    let e = lorq_fails(&["eval", "ppl", "--model", &b, "--data", "/nonexistent/x.txt"]);
    assert!(e.contains("--data"), "{e}");
}

const LINEARS: [(&str, [u64; 2]); 7] = [
    ("self_attn.q_proj", [128, 64]),
    ("self_attn.k_proj", [64, 64]),
    ("self_attn.v_proj", [64, 64]),
    ("self_attn.o_proj", [64, 128]),
    ("mlp.gate_proj", [128, 64]),
    ("mlp.up_proj", [128, 64]),
    ("mlp.down_proj", [64, 128]),
];

#[test]
fn quant_report_covers_every_linear_with_expected_bits_and_error_order() {
    let b = base();
    let v = lorq(&["quant-report", "--model", &b, "--json"]);
    let jit = [
        "bitsandbytes",
        "bitsandbytes-nf4",
        "bitsandbytes-fp4",
        "eetq",
        "hqq-4bit",
        "hqq-3bit",
        "hqq-2bit",
        "fp8",
        "rtn-int4",
    ];
    let methods: Vec<&str> = v["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, jit);
    assert_eq!(v["layers"], 2);
    let linears = v["linears"].as_array().unwrap();
    assert_eq!(linears.len(), 14);
    let mut total = 0u64;
    for (i, l) in linears.iter().enumerate() {
        let (name, shape) = LINEARS[i % 7];
        assert_eq!(l["name"], format!("model.layers.{}.{name}.weight", i / 7));
        assert_eq!(l["shape"], serde_json::json!(shape));
        let (out, inp) = (shape[0] as f64, shape[1] as f64);
        let numel = out * inp;
        total += shape[0] * shape[1];
        let res = l["results"].as_array().unwrap();
        assert_eq!(res.len(), jit.len());
        for (r, m) in res.iter().zip(jit) {
            assert_eq!(r["method"], m);
            let bits = f(&r["bits_per_weight"]);
            let bytes = r["bytes"].as_u64().unwrap() as f64;
            assert!((bits - bytes * 8.0 / numel).abs() < 1e-12);
            // Bits per weight from each layout: codes + quantization constants.
            let want = match m {
                // int8 codes + one f32 scale per output row.
                "bitsandbytes" | "eetq" => 8.0 + 32.0 / inp,
                // e4m3 codes + one scale per output channel in the weight's dtype (f32 here).
                "fp8" => 8.0 + 32.0 / inp,
                // 4-bit codes + f32 absmax per block of 64 + the 16-entry f32 code map.
                "bitsandbytes-fp4" => 4.0 + 32.0 / 64.0 + 16.0 * 32.0 / numel,
                // 4-bit codes + 8-bit absmax code per block of 64 + f32 absmax per 256 blocks +
                // the 256-entry f32 dynamic map + the f32 offset + the 16-entry code map.
                "bitsandbytes-nf4" => {
                    4.0 + 8.0 / 64.0
                        + 32.0 * (numel / 64.0 / 256.0).ceil() / numel
                        + (256.0 + 1.0 + 16.0) * 32.0 / numel
                }
                // hqq: codes + a scale and a zero per group (axis 1) in the weight's dtype (f32).
                "hqq-4bit" => 4.0 + 64.0 / 64.0,
                "hqq-2bit" => 2.0 + 64.0 / 16.0,
                // 3-bit codes are packed ten to an int32.
                "hqq-3bit" => 32.0 * (numel / 64.0 / 10.0).ceil() * 64.0 / numel + 1.0,
                // QLoRA's INT4 reference: 4-bit codes + one f32 absmax per block of 64.
                "rtn-int4" => 4.0 + 32.0 / 64.0,
                _ => unreachable!(),
            };
            assert!(
                (bits - want).abs() < 1e-9,
                "{m} on {name}: {bits} bits, want {want}"
            );
            let rel = f(&r["rel_error"]);
            assert!(rel > 0.0 && rel < 0.5, "{m} on {name}: rel. error {rel}");
            assert!(f(&r["mse"]) > 0.0);
        }
    }
    assert_eq!(v["weights"], total);
    assert_eq!(v["f16_bytes"], total * 2);
    let mean = |m: &str| {
        f(&v["methods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["method"] == m)
            .unwrap()["mean_rel_error"])
    };
    let worst8 = ["bitsandbytes", "eetq", "fp8"]
        .map(mean)
        .into_iter()
        .fold(0f64, f64::max);
    let four = ["bitsandbytes-nf4", "bitsandbytes-fp4", "hqq-4bit"].map(mean);
    let (best4, worst4) = (
        four.into_iter().fold(f64::MAX, f64::min),
        four.into_iter().fold(0f64, f64::max),
    );
    assert!(worst8 < best4, "8-bit {worst8} vs 4-bit {best4}");
    assert!(worst4 < mean("hqq-3bit"), "4-bit {worst4} vs hqq-3bit");
    assert!(mean("hqq-3bit") < mean("hqq-2bit"));
    // The two int8 methods quantize the same way (row-wise absmax) up to rounding.
    assert!((mean("bitsandbytes") - mean("eetq")).abs() < 1e-3);
    // NF4's levels fit normal weights better than FP4's and than plain INT4's at the same block
    // size (the QLoRA argument), here on the fixture's normally distributed weights.
    assert!(mean("bitsandbytes-nf4") < mean("bitsandbytes-fp4"));
    assert!(mean("bitsandbytes-nf4") < mean("rtn-int4"));
    for s in v["methods"].as_array().unwrap() {
        assert!(f(&s["max_rel_error"]) >= f(&s["mean_rel_error"]));
        assert_eq!(s["f16_bytes"], total * 2);
    }
}

#[test]
fn quant_report_methods_and_layers_flags() {
    let b = base();
    let v = lorq(&[
        "quant-report",
        "--model",
        &b,
        "--methods",
        "hqq-4bit,bitsandbytes-nf4",
        "--layers",
        "1",
        "--json",
    ]);
    assert_eq!(v["layers"], 1);
    assert_eq!(v["linears"].as_array().unwrap().len(), 7);
    let m: Vec<&str> = v["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(m, ["hqq-4bit", "bitsandbytes-nf4"]);
    let e = lorq_fails(&["quant-report", "--model", &b, "--methods", "gptq"]);
    assert!(e.contains("gptq") && e.contains("calibration"), "{e}");
    let e = lorq_fails(&["quant-report", "--model", &b, "--methods", "int3"]);
    assert!(e.contains("int3"), "{e}");
    // Text output: a table with one row per method.
    let out = run_ok(&["quant-report", "--model", &b, "--layers", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for m in ["bitsandbytes-nf4", "hqq-2bit", "eetq", "fp8"] {
        assert!(text.lines().any(|l| l.starts_with(m)), "{text}");
    }
}
