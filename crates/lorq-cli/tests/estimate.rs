//! `lorq estimate` on the tiny committed Llama (fixtures/llama/base: hidden 64, 4 heads × 32,
//! 2 KV heads, intermediate 128, 2 layers, vocab 400, untied) and on the published configs,
//! against numbers computed by hand.

mod common;

use common::*;
use serde_json::Value;

fn component(v: &Value, name: &str) -> u64 {
    v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no component {name}: {v}"))["bytes"]
        .as_u64()
        .unwrap()
}

fn place(v: &Value, name: &str) -> String {
    v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()["place"]
        .as_str()
        .unwrap()
        .to_string()
}

fn tiny(extra: &[&str]) -> Value {
    let base = fixture("llama/base");
    let mut args = vec!["estimate", "--model", base.as_str(), "--json"];
    args.extend_from_slice(extra);
    lorq(&args)
}

#[test]
fn tiny_lora_params_and_base_weights() {
    // Per layer, r = 8: q [128,64]: 8·64 + 128·8 = 1536; k, v [64,64]: 1024 each; o [64,128]: 1536;
    // gate, up [128,64] and down [64,128]: 1536 each. 5·1536 + 2·1024 = 9728; 2 layers.
    let v = tiny(&["--r", "8"]);
    assert_eq!(v["lora_params"], 19456);
    assert_eq!(v["lora_modules"], 14);
    assert_eq!(component(&v, "lora params"), 19456 * 4);
    assert_eq!(component(&v, "lora grads"), 19456 * 4);
    // NF4 with double quant: numel/2 codes; per linear 1 byte absmax per 64 + f32 per 256 blocks +
    // 256 f32 map + f32 offset + 16 f32 code table. 8192-element linears: 128 + 4 + 1092; 4096: 64 + 4 + 1092.
    assert_eq!(component(&v, "base linears"), 2 * (5 * 4096 + 2 * 2048));
    assert_eq!(component(&v, "quant constants"), 2 * (5 * 1224 + 2 * 1160));
    // Embeddings + lm_head (400·64 each) + 2·2 layer norms + final norm (64 each), bf16.
    assert_eq!(component(&v, "base other"), (2 * 25600 + 5 * 64) * 2);

    let v = tiny(&["--r", "8", "--target-modules", "q_proj,v_proj"]);
    assert_eq!(v["lora_params"], 2 * (1536 + 1024));
    let v = tiny(&["--quantize", "none", "--dtype", "f32"]);
    assert_eq!(component(&v, "base linears"), 2 * 49152 * 4);
    assert_eq!(component(&v, "quant constants"), 0);
}

#[test]
fn optimizer_state_8bit_vs_32bit_and_the_4096_rule() {
    // r = 32, per layer: q A 32·64 = 2048, B 128·32 = 4096; k, v A/B 2048; o A 32·128 = 4096,
    // B 2048; gate, up A 2048, B 4096; down A 4096, B 2048. Five tensors of 4096 go 8-bit
    // (2·4096 + 2·4 bytes per 256-block = 8320 each), nine of 2048 stay 32-bit (8 B/param).
    let per_layer_8 = 5 * 8320 + 9 * 2048 * 8;
    let v = tiny(&["--r", "32", "--optim", "adamw_8bit"]);
    assert_eq!(component(&v, "optimizer state"), 2 * per_layer_8);
    assert_eq!(v["small_tensors_32bit"], 18);
    assert_eq!(place(&v, "optimizer state"), "device");

    let v32 = tiny(&["--r", "32", "--optim", "adamw"]);
    let params = v32["lora_params"].as_u64().unwrap();
    assert_eq!(params, 2 * (5 * 4096 + 9 * 2048));
    assert_eq!(component(&v32, "optimizer state"), params * 8);
    assert_eq!(v32["small_tensors_32bit"], 0);

    // r = 8: every LoRA tensor is under 4096 elements, so 8-bit costs what 32-bit does.
    let a = tiny(&["--r", "8", "--optim", "adamw_8bit"]);
    let b = tiny(&["--r", "8", "--optim", "adamw"]);
    assert_eq!(
        component(&a, "optimizer state"),
        component(&b, "optimizer state")
    );

    // Paged: the state is on the host and leaves the device peak.
    let p = tiny(&["--r", "32", "--optim", "paged_adamw_8bit"]);
    assert_eq!(place(&p, "optimizer state"), "host");
    // Host: the paged state plus the optimizer step's f32 copies (params, grads, updated params).
    let step = component(&p, "optimizer step");
    assert_eq!(step, 3 * 4 * p["lora_params"].as_u64().unwrap());
    assert_eq!(p["host"].as_u64().unwrap(), 2 * per_layer_8 + step);
    assert_eq!(
        p["device_peak"].as_u64().unwrap() + 2 * per_layer_8,
        v["device_peak"].as_u64().unwrap()
    );
}

#[test]
fn activations_by_hand_and_checkpointing_reduces_them() {
    // batch 1 × seq 4 = 4 rows, bf16, no dropout, r = 8. Per layer: input, h1, residual, h2
    // (4·64) + q, attention output (2·128) + gate, up, silu·up (3·128) = 896 values per row
    // → 4·896·2 = 7168 B; probs 4 heads·4·4·4 B = 256; x·Aᵀ 7 linears · 4·8·2 = 448.
    // 2 layers + the final norm output (4·64·2 = 512).
    let common = [
        "--r",
        "8",
        "--batch-size",
        "1",
        "--seq-len",
        "4",
        "--lora-dropout",
        "0",
    ];
    let mut args = common.to_vec();
    args.extend(["--gradient-checkpointing", "false"]);
    let off = tiny(&args);
    assert_eq!(component(&off, "activations"), 2 * (7168 + 256 + 448) + 512);
    assert_eq!(component(&off, "kv"), 2 * (2 * 4 * 64 * 2));
    // Three f32 [min(256, rows), vocab 400] tensors at the chunked loss's peak.
    assert_eq!(component(&off, "logits/loss"), 3 * 4 * 400 * 4);

    let mut args = common.to_vec();
    args.extend(["--gradient-checkpointing", "true"]);
    let on = tiny(&args);
    assert_eq!(component(&on, "activations"), 2 * (4 * 64 * 2) + 512);
    assert_eq!(component(&on, "kv"), 0);

    // At a real length, checkpointing cuts the peak.
    let off = tiny(&["--seq-len", "256", "--gradient-checkpointing", "false"]);
    let on = tiny(&["--seq-len", "256", "--gradient-checkpointing", "true"]);
    assert!(component(&on, "activations") * 4 < component(&off, "activations"));
    assert!(on["device_peak"].as_u64() < off["device_peak"].as_u64());
    // Dropout keeps each targeted linear's dropped input and mask.
    let drop = tiny(&[
        "--seq-len",
        "256",
        "--gradient-checkpointing",
        "false",
        "--lora-dropout",
        "0.1",
    ]);
    let nodrop = tiny(&[
        "--seq-len",
        "256",
        "--gradient-checkpointing",
        "false",
        "--lora-dropout",
        "0",
    ]);
    // rows 4·256; inputs: 6 linears of 64, o_proj 128 (down_proj 128): (5·64 + 2·128) per row, 2 tensors, bf16, 2 layers.
    assert_eq!(
        component(&drop, "activations") - component(&nodrop, "activations"),
        2 * 2 * 1024 * (5 * 64 + 2 * 128) * 2
    );
}

#[test]
fn published_configs_lora_counts() {
    // Llama-2-7B, r = 64, all-linear: per layer 4·64·(4096+4096) + 3·64·(4096+11008) = 4,997,120; 32 layers.
    let v = lorq(&["estimate", "--params", "7B", "--r", "64", "--json"]);
    assert_eq!(v["lora_params"], 159_907_840u64);
    // Llama-3-8B (GQA: k/v out 1024, MLP 14336): 2·64·8192 + 2·64·5120 + 3·64·18432 = 5,242,880 per layer.
    let v = lorq(&["estimate", "--params", "8B", "--r", "64", "--json"]);
    assert_eq!(v["lora_params"], 167_772_160u64);
    // q_proj,v_proj on Llama-2-7B, r = 16: 2·16·8192 per layer.
    let v = lorq(&[
        "estimate",
        "--params",
        "7b",
        "--r",
        "16",
        "--target-modules",
        "q_proj,v_proj",
        "--json",
    ]);
    assert_eq!(v["lora_params"], 32 * 2 * 16 * 8192);
    // 70B: NF4 base under 40 GB, far over the 13B's.
    let big = lorq(&["estimate", "--params", "70B", "--json"]);
    let base = component(&big, "base linears") + component(&big, "quant constants");
    assert!(base > 30 << 30 && base < 40 << 30, "{base}");
    let table = run_ok(&["estimate", "--params", "13B"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("device peak") && text.contains("optimizer state") && text.contains("host"),
        "{text}"
    );
}

#[test]
fn clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = lorq_fails(&["estimate", "--model", dir.path().to_str().unwrap()]);
    assert!(e.contains("no config.json"), "{e}");
    let base = fixture("llama/base");
    let e = lorq_fails(&["estimate", "--model", &base, "--quantize", "nf5"]);
    assert!(
        e.contains("--quantize \"nf5\"") && e.contains("bitsandbytes-nf4"),
        "{e}"
    );
    let e = lorq_fails(&["estimate", "--model", &base, "--params", "7B"]);
    assert!(e.contains("--params") && e.contains("--model"), "{e}");
    let e = lorq_fails(&["estimate", "--params", "3B"]);
    assert!(e.contains("unknown") && e.contains("7b"), "{e}");
    let e = lorq_fails(&["estimate", "--model", &base, "--target-modules", "c_attn"]);
    assert!(e.contains("matches none"), "{e}");
    let e = lorq_fails(&["estimate", "--model", &base, "--optim", "sgd"]);
    assert!(e.contains("--optim"), "{e}");
    let e = lorq_fails(&["estimate", "--model", &base, "--quantize", "auto"]);
    assert!(e.contains("auto"), "{e}");
}
