//! `lorq train` end to end on the tiny llama: the loss falls, a resumed run reproduces the
//! uninterrupted one, the adapter is what PEFT loads (fixtures/train/peft_load_lorq_adapter.py),
//! `lorq serve` serves it at once, and bad input gets a clear error.

mod common;

use std::path::Path;

use common::server::{post, Server};
use common::{fixture, fixtures, floats, lorq, lorq_fails, rel, score_last_logits};
use serde_json::{json, Value};

fn train(out: &Path, extra: &[&str]) -> Value {
    let (base, data) = (fixture("llama/base"), fixture("train/tiny_addition.jsonl"));
    let mut args = vec![
        "train",
        "--model",
        &base,
        "--data",
        &data,
        "--out",
        out.to_str().unwrap(),
        "--r",
        "8",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "2",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--logging-steps",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    lorq(&args)
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn qlora_loss_falls_on_a_small_task_and_writes_every_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // The QLoRA defaults: NF4 double-quant base, paged 8-bit AdamW, checkpointing, dropout 0.1.
    let s = train(
        &out,
        &[
            "--max-steps",
            "24",
            "--save-steps",
            "12",
            "--eval-split",
            "0.1",
        ],
    );
    assert_eq!(s["steps"], 24);
    let m = metrics(&out);
    let losses: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 24);
    let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = losses[20..].iter().sum::<f64>() / 4.0;
    assert!(last < 0.6 * first, "loss {first} -> {last} did not fall");
    let evals: Vec<f64> = m.iter().filter_map(|l| l["eval_loss"].as_f64()).collect();
    assert_eq!(evals.len(), 2, "eval at each save");
    assert!(evals[1] < evals[0], "eval loss {evals:?}");
    for l in m.iter().filter(|l| l.get("loss").is_some()) {
        for k in [
            "step",
            "epoch",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "elapsed_s",
        ] {
            assert!(l[k].is_number(), "metrics line without {k}: {l}");
        }
    }
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "checkpoint-12/optimizer.safetensors",
        "checkpoint-24/trainer_state.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(s["peak_rss_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn a_resumed_run_reproduces_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    // Dropout on and 8-bit paged state: the RNG, data position and quantized moments must all resume.
    let extra = [
        "--max-steps",
        "10",
        "--save-steps",
        "4",
        "--lora-dropout",
        "0.1",
    ];
    train(&a, &extra);
    std::fs::create_dir_all(&b).unwrap();
    common::server::copy_dir(&a.join("checkpoint-4"), &b.join("checkpoint-4"));
    let s = train(&b, &[&extra[..], &["--resume"]].concat());
    assert!(s["resumed_from"]
        .as_str()
        .unwrap()
        .ends_with("checkpoint-4"));
    for f in [
        "adapter_model.safetensors",
        "checkpoint-8/optimizer.safetensors",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
    // Other options than the checkpoint's are refused, naming what changed.
    let err = lorq_fails(&[
        "train",
        "--model",
        &fixture("llama/base"),
        "--data",
        &fixture("train/tiny_addition.jsonl"),
        "--out",
        b.to_str().unwrap(),
        "--r",
        "16",
        "--max-steps",
        "10",
        "--resume",
    ]);
    assert!(
        err.contains("\"r\"") || err.contains("r: checkpoint 8"),
        "{err}"
    );
}

#[test]
fn the_trained_adapter_gives_peft_logits_and_training_reproduces_it() {
    // PEFT loaded the committed lorq-trained adapter and recorded its logits.
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("train/lorq_trained/peft_logits.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<String> = reference["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let want = floats(reference["logits"].as_array().unwrap().last().unwrap());
    let check = |adapter: &str| {
        let got = score_last_logits(&[
            "--model",
            &fixture("llama/base"),
            "--adapter",
            adapter,
            "--token-ids",
            &ids.join(","),
        ]);
        let d = rel(&got, &want);
        assert!(d <= 1e-4, "logits differ from PEFT's by {d} of the largest");
    };
    check(&fixture("train/lorq_trained/adapter"));
    // The same command (in the fixture script's docstring) gives the same adapter here.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    lorq(&[
        "train",
        "--model",
        &fixture("llama/base"),
        "--data",
        &fixture("train/tiny_addition.jsonl"),
        "--out",
        out.to_str().unwrap(),
        "--quantize",
        "none",
        "--optim",
        "adamw",
        "--r",
        "8",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "0",
        "--max-steps",
        "12",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--lora-dropout",
        "0",
        "--seed",
        "3",
        "--json",
    ]);
    check(out.to_str().unwrap());
    let cfg = |p: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let committed = cfg(&fixtures().join("train/lorq_trained/adapter"));
    let fresh = cfg(&out);
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&committed), keys(&fresh));
    assert_eq!(
        committed["target_modules"],
        json!([
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ])
    );
}

#[test]
fn lorq_serve_serves_the_trained_adapter_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("my-adapter");
    train(&out, &["--max-steps", "4"]);
    let expected = lorq(&[
        "generate",
        "--model",
        &fixture("llama/base"),
        "--adapter",
        out.to_str().unwrap(),
        "--prompt",
        "Add 3 and 4.",
        "--max-new-tokens",
        "6",
        "--json",
    ]);
    let server = Server::start(
        &fixture("llama/base"),
        &["--adapter-dir", dir.path().to_str().unwrap()],
    );
    let (status, body) = post(
        &format!("{}/generate", server.url),
        &json!({"inputs": "Add 3 and 4.", "parameters": {"adapter_id": "my-adapter", "max_new_tokens": 6}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["generated_text"], expected["text"],
        "served text differs from lorq generate"
    );
}

#[test]
fn bad_training_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let base = fixture("llama/base");
    let data = fixture("train/tiny_addition.jsonl");
    let o = out.to_str().unwrap();
    // `lorq train --model M --data D --out o EXTRA...` must fail with a message holding every
    // one of `want`.
    let fails = |model: &str, data: &str, extra: &[&str], want: &[&str]| {
        let mut args = vec!["train", "--model", model, "--data", data, "--out", o];
        args.extend_from_slice(extra);
        let err = lorq_fails(&args);
        assert!(want.iter().all(|w| err.contains(w)), "{args:?}: {err}");
    };
    fails(
        &base,
        &data,
        &["--target-modules", "foo_proj"],
        &["foo_proj", "matches no linear"],
    );
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    fails(
        &base,
        empty.to_str().unwrap(),
        &[],
        &["empty.jsonl", "no usable rows"],
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"instruction\": \"x\"}\n").unwrap();
    fails(
        &base,
        bad.to_str().unwrap(),
        &[],
        &["bad.jsonl:2", "output"],
    );
    let no_weights = dir.path().join("noweights");
    std::fs::create_dir_all(&no_weights).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("llama/base").join(f), no_weights.join(f)).unwrap();
    }
    fails(no_weights.to_str().unwrap(), &data, &[], &["no weights"]);
    fails(&base, &data, &["--optim", "sgd"], &["sgd"]);
    fails(&base, &data, &["--resume"], &["no checkpoint"]);
}
