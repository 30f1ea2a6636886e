//! Bad input gets a clear error that names the problem, never a panic.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use lorq_model::LoadedModel;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match LoadedModel::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn folder_without_weights() {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("llama/base"), d.path());
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("no weights") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors() {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("llama/base"), d.path());
    let f = d.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("truncated or corrupt") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn unknown_architecture() {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("llama/base"), d.path());
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace("LlamaForCausalLM", "FalconForCausalLM")
            .replace("\"llama\"", "\"falcon\""),
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("FalconForCausalLM") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn missing_tensor_and_shape_mismatch_are_named() {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("llama/base"), d.path());
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.layers.2.") && e.contains("missing"),
        "{e}"
    );
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("[128, 64]"),
        "{e}"
    );
}

#[test]
fn adapter_whose_shapes_do_not_fit_the_base() {
    // The llama fixture's adapter has q_proj out = 4 heads x 32; qwen2's q_proj is 4 x 16.
    let m = load("qwen2");
    let e = m
        .load_adapter(&fixtures().join("llama/adapters/r8-all"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("r8-all") && e.contains("fit the base weight"),
        "{e}"
    );
}

#[test]
fn adapter_with_dora() {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("llama/adapters/r8-all"), d.path());
    let cfg = std::fs::read_to_string(d.path().join("adapter_config.json")).unwrap();
    std::fs::write(
        d.path().join("adapter_config.json"),
        cfg.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let m = load("llama");
    let e = m.load_adapter(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("use_dora") && e.contains("adapter_config.json"),
        "{e}"
    );
}

#[test]
fn token_outside_vocabulary_is_refused() {
    let m = load("llama");
    let mut cache = m.model.new_cache();
    let e = m
        .model
        .forward(&mut [lorq_model::BatchItem {
            tokens: &[1, 99999],
            cache: &mut cache,
            adapter: None,
            logits: lorq_model::LogitsWanted::Last,
        }])
        .unwrap_err()
        .to_string();
    assert!(e.contains("99999") && e.contains("vocabulary"), "{e}");
    assert!(
        cache.is_empty(),
        "a refused batch must leave the cache untouched"
    );
}
