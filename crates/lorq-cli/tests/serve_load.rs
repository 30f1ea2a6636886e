//! Load: 64 concurrent streaming requests over 8 adapters and the base model, with fewer active
//! adapter slots than adapters (so the fair scheduler rotates them). Every request completes and
//! its text equals the same request run alone.

mod common;

use std::collections::HashMap;

use common::server::{http, post, post_sse, Server};
use common::{fixture, fixtures};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

/// Eight distinct adapters: the r8-all fixture with lora_B scaled by 0.5 + 0.25·k.
fn eight_adapters(root: &std::path::Path) -> Vec<String> {
    let src = fixtures().join("llama/adapters/r8-all");
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    (0..8)
        .map(|k| {
            let id = format!("load/a{k}");
            let dir = root.join(&id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(
                src.join("adapter_config.json"),
                dir.join("adapter_config.json"),
            )
            .unwrap();
            let scale = 0.5 + 0.25 * k as f32;
            let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
            for (name, view) in st.tensors() {
                assert_eq!(view.dtype(), Dtype::F32, "{name}");
                let mut data = view.data().to_vec();
                if name.contains("lora_B") {
                    for c in data.chunks_exact_mut(4) {
                        let v = f32::from_le_bytes(c.try_into().unwrap()) * scale;
                        c.copy_from_slice(&v.to_le_bytes());
                    }
                }
                owned.push((name, view.shape().to_vec(), data));
            }
            let views: Vec<(String, TensorView)> = owned
                .iter()
                .map(|(n, s, d)| {
                    (
                        n.clone(),
                        TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
                    )
                })
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))
                .unwrap();
            id
        })
        .collect()
}

#[test]
fn sixty_four_concurrent_streams_over_eight_adapters_equal_their_solo_runs() {
    let root = tempfile::tempdir().unwrap();
    let adapters = eight_adapters(root.path());
    let server = Server::start(
        &fixture("llama/base"),
        &[
            "--adapter-dir",
            root.path().to_str().unwrap(),
            "--max-active-adapters",
            "3",
            "--adapter-cycle-time-s",
            "0.05",
        ],
    );
    let words = [
        "hello",
        "the fox",
        "a b c",
        "once upon",
        "rust is",
        "quantized",
        "many adapters",
        "tiny llama",
    ];
    let requests: Vec<Value> = (0..64)
        .map(|i| {
            let adapter = if i % 9 == 8 { Value::Null } else { json!(adapters[i % 9]) };
            json!({
                "inputs": format!("{} {}", words[i % 8], i),
                "parameters": {"adapter_id": adapter, "max_new_tokens": 12 + (i % 5) * 4, "details": true}
            })
        })
        .collect();
    // Alone: one at a time.
    let solo: Vec<String> = requests
        .iter()
        .map(|r| {
            let (s, v) = post(&format!("{}/generate", server.url), r);
            assert_eq!(s, 200, "{v}");
            v["generated_text"].as_str().unwrap().to_string()
        })
        .collect();
    // Together: 64 streams at once.
    let url = server.url.clone();
    let handles: Vec<_> = requests
        .iter()
        .cloned()
        .map(|r| {
            let url = url.clone();
            std::thread::spawn(move || post_sse(&format!("{url}/generate_stream"), &r))
        })
        .collect();
    let mut max_batch_seen = 0.0f64;
    let mut texts = Vec::new();
    for h in handles {
        let (status, events) = h.join().unwrap();
        assert_eq!(status, 200);
        let last: Value = serde_json::from_str(events.last().expect("events")).unwrap();
        assert!(
            last["details"]["finish_reason"].is_string(),
            "incomplete stream: {last}"
        );
        texts.push(last["generated_text"].as_str().unwrap().to_string());
    }
    for (i, (t, s)) in texts.iter().zip(&solo).enumerate() {
        assert_eq!(t, s, "request {i} ({}) differs when batched", requests[i]);
    }
    // The batches really mixed adapters and sequences, and every adapter was served.
    let m = http()
        .get(format!("{}/metrics", server.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let mut counts: HashMap<String, f64> = HashMap::new();
    for line in m.lines() {
        if let Some(rest) = line.strip_prefix("lorq_request_success{adapter=\"") {
            let (name, v) = rest.split_once("\"} ").unwrap();
            counts.insert(name.to_string(), v.parse().unwrap());
        }
        if let Some(v) = line.strip_prefix("lorq_batch_size_sum ") {
            max_batch_seen = v.parse().unwrap();
        }
    }
    // Each request ran twice (solo, then concurrently).
    for (k, a) in adapters.iter().enumerate() {
        let n = (0..64).filter(|i| i % 9 == k).count() as f64;
        assert_eq!(
            counts.get(a.as_str()).copied(),
            Some(2.0 * n),
            "{a}: {counts:?}"
        );
    }
    let n_base = (0..64).filter(|i| i % 9 == 8).count() as f64;
    assert_eq!(
        counts.get("base").copied(),
        Some(2.0 * n_base),
        "{counts:?}"
    );
    assert!(max_batch_seen > 0.0);
    let steps: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("lorq_batch_size_count "))
        .unwrap()
        .parse()
        .unwrap();
    let sum: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("lorq_batch_size_sum "))
        .unwrap()
        .parse()
        .unwrap();
    // Solo runs have batch 1; the concurrent phase must have batched several at a time.
    assert!(
        sum / steps > 1.2,
        "mean batch size {} — no batching happened",
        sum / steps
    );
}
