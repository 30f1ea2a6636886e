//! LoRA gradients of lorq's trainer against transformers + PEFT (+ bitsandbytes NF4) on tiny
//! models (fixtures/train/make_grad_fixtures.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorq_lora::TargetModules;
use lorq_model::LoadedModel;
use lorq_quant::method::QuantMethod;
use lorq_train::{forward_backward, LoraParams, LoraSpec, MicroBatch};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn spec() -> LoraSpec {
    LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        use_rslora: false,
        targets: TargetModules::AllLinear,
    }
}

fn batch(reference: &serde_json::Value) -> MicroBatch {
    let seqs: Vec<(Vec<u32>, Vec<i64>)> = reference["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ids: Vec<u32> = serde_json::from_value(s["input_ids"].clone()).unwrap();
            let mut labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
            for i in s["ignored_label_positions"].as_array().unwrap() {
                labels[i.as_u64().unwrap() as usize] = -100;
            }
            (ids, labels)
        })
        .collect();
    MicroBatch::new(seqs.iter().map(|(a, b)| (a.as_slice(), b.as_slice()))).unwrap()
}

/// ‖a − b‖ / ‖b‖.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let n = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    (d / n).sqrt()
}

/// Runs lorq's forward/backward on the fixture batch; returns (mean loss, worst relative
/// gradient error, name of the worst tensor).
fn compare(
    model: &str,
    quantize: Option<QuantMethod>,
    grads_file: &str,
    checkpointing: bool,
) -> (f64, f64, String) {
    let base = fixtures().join(model).join("base");
    compare_on(model, &base, quantize, grads_file, checkpointing)
}

fn compare_on(
    model: &str,
    base: &Path,
    quantize: Option<QuantMethod>,
    grads_file: &str,
    checkpointing: bool,
) -> (f64, f64, String) {
    let dir = fixtures().join("train/grads").join(model);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let loaded = LoadedModel::load_quantized(base, DType::F32, &Device::Cpu, quantize).unwrap();
    let lora = LoraParams::load_peft(&loaded.model, spec(), &dir.join("adapter")).unwrap();
    let b = batch(&reference);
    let mut grads = vec![None; lora.tensors().len()];
    let n = b.num_targets() as f64;
    let nll = forward_backward(
        &loaded.model,
        &lora,
        &b,
        1.0 / n,
        checkpointing,
        0,
        &mut grads,
    )
    .unwrap();
    let expected: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join(grads_file), &Device::Cpu).unwrap();
    assert_eq!(
        expected.len(),
        grads.len(),
        "one reference gradient per LoRA tensor"
    );
    let mut worst = (0.0, String::new());
    for (name, g) in lora.names().iter().zip(&grads) {
        let e = &expected[name];
        let err = rel_err(g.as_ref().expect("every LoRA tensor gets a gradient"), e);
        assert!(err.is_finite(), "{name}: non-finite gradient");
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    (nll / n, worst.0, worst.1)
}

fn reference_loss(model: &str, key: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures()
                .join("train/grads")
                .join(model)
                .join("reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    v[key].as_f64().unwrap()
}

#[test]
fn f32_gradients_match_peft_for_every_architecture_with_and_without_checkpointing() {
    for model in ["llama", "qwen2", "mistral"] {
        for checkpointing in [false, true] {
            let (loss, err, worst) = compare(model, None, "grads_f32.safetensors", checkpointing);
            let want = reference_loss(model, "loss_f32");
            assert!(
                (loss - want).abs() / want < 1e-5,
                "{model}: loss {loss} vs PEFT {want}"
            );
            assert!(
                err < 1e-4,
                "{model} (checkpointing {checkpointing}): {worst} off by {err:e}"
            );
        }
    }
}

#[test]
fn gradients_on_bitsandbytes_own_nf4_weights_match_peft() {
    // The 4-bit checkpoint transformers + bitsandbytes saved: the same packed weights on both sides.
    let base = fixtures().join("train/grads/llama/nf4_base");
    let (loss, err, worst) = compare_on("llama", &base, None, "grads_nf4.safetensors", true);
    let want = reference_loss("llama", "loss_nf4");
    assert!(
        (loss - want).abs() / want < 1e-5,
        "loss {loss} vs PEFT+bnb {want}"
    );
    assert!(err < 1e-4, "{worst} off by {err:e}");
    // The NF4 base really differs from the f32 one: the comparison is not vacuous.
    assert!((want - reference_loss("llama", "loss_f32")).abs() > 1e-2);
}

#[test]
fn nf4_gradients_stay_in_the_quantization_band_of_bitsandbytes_cpu_kernels() {
    // Against bitsandbytes' own CPU 4-bit matmul (bf16 inside), on bitsandbytes' weights and on
    // lorq's own NF4 quantization of the f32 base: the loss gap must stay a small part of the gap
    // NF4 opens against f32.
    let want = reference_loss("llama", "loss_nf4_bnb_cpu");
    let band = (want - reference_loss("llama", "loss_f32")).abs();
    let bnb_base = fixtures().join("train/grads/llama/nf4_base");
    let nf4 = QuantMethod::parse("bitsandbytes-nf4").unwrap();
    for (base, quantize) in [(bnb_base, None), (fixtures().join("llama/base"), nf4)] {
        let (loss, err, worst) = compare_on(
            "llama",
            &base,
            quantize,
            "grads_nf4_bnb_cpu.safetensors",
            true,
        );
        assert!(
            (loss - want).abs() < 0.02 * band,
            "loss {loss} vs PEFT+bnb {want} (band {band})"
        );
        assert!(err < 5e-2, "{worst} off by {err:e}");
    }
}
