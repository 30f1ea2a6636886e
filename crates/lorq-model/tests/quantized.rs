//! Just-in-time quantization of a whole model: every method loads, generates, and stays close to
//! the full-precision logits, with error ordered by bits (8-bit < 4-bit < 3-bit/2-bit).

mod common;

use candle_core::{DType, Device};
use common::*;
use lorq_model::{BatchItem, LoadedModel, LogitsWanted};
use lorq_quant::method::QuantMethod;

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

/// The tiny Llama fixture's folder, and the first prompt's ids and full-precision last logits
/// (transformers).
fn llama_first_prompt() -> (std::path::PathBuf, Vec<u32>, Vec<f32>) {
    let reference = reference("llama");
    let p = &reference["runs"][0]["prompts"][0];
    (
        fixtures().join("llama/base"),
        ids(&p["input_ids"]),
        floats(&p["last_logits"]),
    )
}

#[test]
fn every_jit_method_stays_close_to_full_precision() {
    let (dir, ids, full) = llama_first_prompt();
    let mut errors = std::collections::HashMap::new();
    for name in QuantMethod::NAMES {
        let method = QuantMethod::parse(name).unwrap().unwrap();
        let loaded = LoadedModel::load_quantized(&dir, DType::F32, &Device::Cpu, Some(method));
        if !method.is_jit() {
            let e = loaded
                .err()
                .expect("awq/gptq cannot quantize at load")
                .to_string();
            assert!(e.contains(name) && e.contains("pre-quantized"), "{e}");
            continue;
        }
        let m = loaded.unwrap();
        let d = rel_max_diff(&last_logits(&m, &ids), &full);
        errors.insert(name, d);
    }
    eprintln!("relative max logit error per method: {errors:?}");
    for (name, band) in [
        ("bitsandbytes", 0.05),
        ("eetq", 0.05),
        ("fp8", 0.15),
        ("bitsandbytes-nf4", 0.45),
        ("bitsandbytes-fp4", 0.5),
        ("hqq-4bit", 0.45),
        ("hqq-3bit", 0.6),
        ("hqq-2bit", 1.2),
    ] {
        assert!(errors[name] < band, "{name}: {} >= {band}", errors[name]);
        assert!(errors[name] > 0.0, "{name} changed nothing");
    }
    assert!(errors["eetq"] < errors["bitsandbytes-nf4"]);
    assert!(errors["hqq-4bit"] < errors["hqq-2bit"]);
}

/// Whole checkpoints quantized and saved by transformers + bitsandbytes and by GPTQModel load in their own format
/// and give the logits the quantized transformers model gives (`fixtures/prequantized/`).
#[test]
fn transformers_bitsandbytes_checkpoints_load_with_their_logits() {
    let root = fixtures().join("prequantized");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("reference.json")).unwrap())
            .unwrap();
    // GPTQ/AWQ: against an fp32 Llama holding the library's own dequantized weights (the same math);
    // the library's fp16 forward is checked more loosely below.
    for (case, tol) in [
        ("bnb-nf4-dq", 1e-5),
        ("bnb-fp4", 1e-5),
        ("bnb-int8", 1e-4),
        ("gptq-4bit-g32", 1e-4),
        ("awq-4bit-g32", 1e-4),
    ] {
        let m = LoadedModel::load(&root.join(case), DType::F32, &Device::Cpu).unwrap();
        let r = &reference[case];
        let d = rel_max_diff(
            &last_logits(&m, &ids(&r["input_ids"])),
            &floats(&r["last_logits"]),
        );
        assert!(
            d < tol,
            "{case}: logits differ from transformers by {d} (rel)"
        );
        let fmt = m.model.linears().next().unwrap().base.format_name();
        assert_ne!(fmt, "f32", "{case} was not loaded in its quantized format");
        if let Some(lib) = r.get("library_last_logits") {
            let d = rel_max_diff(&last_logits(&m, &ids(&r["input_ids"])), &floats(lib));
            assert!(
                d < 3e-3,
                "{case}: logits differ from the library's fp16 forward by {d} (rel)"
            );
        }
    }
    // A --quantize that contradicts the checkpoint is refused.
    let e = LoadedModel::load_quantized(
        &root.join("bnb-nf4-dq"),
        DType::F32,
        &Device::Cpu,
        Some(QuantMethod::Hqq4),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("bitsandbytes-nf4") && e.contains("hqq-4bit"),
        "{e}"
    );
}

/// `--quantize-lm-head`: the head becomes exactly the method's quantization of the dense head
/// (the same codes as any other linear), the model's bytes shrink by the difference, the logits
/// stay within the method's band of the full-precision reference, and a second call or a
/// calibrated method is refused with a message that says why.
#[test]
fn the_lm_head_quantizes_like_any_linear() {
    let (dir, ids, full) = llama_first_prompt();
    for (name, band) in [
        ("hqq-4bit", 0.45),
        ("bitsandbytes-nf4", 0.45),
        ("eetq", 0.05),
    ] {
        let method = QuantMethod::parse(name).unwrap().unwrap();
        let mut m =
            LoadedModel::load_quantized(&dir, DType::F32, &Device::Cpu, Some(method)).unwrap();
        let dense = m.model.lm_head().base.dense_weight().unwrap().clone();
        let (before_bytes, before) = (m.model.weight_bytes(), last_logits(&m, &ids));
        m.model.quantize_lm_head(method).unwrap();
        assert!(!m.model.lm_head_is_dense());
        let want = method
            .quantize(&dense)
            .unwrap()
            .dequantize(DType::F32)
            .unwrap();
        let got = m.model.lm_head().base.dequantize(DType::F32).unwrap();
        let (want, got): (Vec<f32>, Vec<f32>) = (
            want.flatten_all().unwrap().to_vec1().unwrap(),
            got.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(
            want == got,
            "{name}: the head is not the method's quantization of the dense head"
        );
        let after_bytes = m.model.weight_bytes();
        let head_bytes = m.model.lm_head().base.bytes();
        assert!(
            head_bytes < dense.elem_count() * 4,
            "{name}: head not smaller"
        );
        // The fixture has its own lm_head.weight (not tied): the dense head's bytes are replaced.
        assert!(!m.model.lm_head_is_embedding_table());
        assert_eq!(
            before_bytes - dense.elem_count() * 4 + head_bytes,
            after_bytes,
            "{name}"
        );
        let after = last_logits(&m, &ids);
        let d = rel_max_diff(&after, &full);
        assert!(
            after != before,
            "{name}: quantizing the head changed no logit"
        );
        assert!(d < band, "{name}: {d} >= {band} with the head quantized");
        let e = m.model.quantize_lm_head(method).unwrap_err().to_string();
        assert!(e.contains("already quantized"), "{e}");
    }
    let mut m = LoadedModel::load_quantized(&dir, DType::F32, &Device::Cpu, None).unwrap();
    let gptq = QuantMethod::parse("gptq").unwrap().unwrap();
    let e = m.model.quantize_lm_head(gptq).unwrap_err().to_string();
    assert!(e.contains("load-time") && e.contains("gptq"), "{e}");
}

/// A random model asked for a calibrated format (GPTQ, AWQ: the decode benchmark's group-128
/// models) rounds the same seeded weights a dense random model has to nearest, in groups of 128:
/// every decoder linear in the method's layout, within 4-bit rounding of the dense weight and
/// bit for bit the format's own round-to-nearest of it; the head stays dense until
/// `round_lm_head_into`, which `quantize_lm_head` (load-time methods only) refuses to do.
#[test]
fn random_models_round_calibrated_formats_to_nearest() {
    use lorq_model::llama::{LayerLinear, LlamaModel};
    use lorq_model::random_model::shape_config;
    use lorq_quant::gptq::quantize::{rtn_gptq, GptqParams};
    use lorq_quant::QuantTensor;
    let cfg = shape_config("tiny").unwrap();
    let dense = LlamaModel::random(cfg.clone(), DType::F32, &Device::Cpu, None, 3).unwrap();
    for (method, format) in [
        (QuantMethod::Gptq, "gptq-4bit"),
        (QuantMethod::Awq, "awq-4bit"),
    ] {
        let mut m =
            LlamaModel::random(cfg.clone(), DType::F32, &Device::Cpu, Some(method), 3).unwrap();
        for which in [LayerLinear::Q, LayerLinear::Down] {
            let q = &m.layer_linear(1, which).base;
            assert_eq!(q.format_name(), format);
            let flat = |t: &dyn QuantTensor| -> Vec<f32> {
                let d = t.dequantize(DType::F32).unwrap();
                d.flatten_all().unwrap().to_vec1().unwrap()
            };
            let w = flat(&*dense.layer_linear(1, which).base);
            let got = flat(&**q);
            let rel = rel_max_diff(&got, &w);
            assert!(
                rel > 0.0 && rel < 0.1,
                "{format} {which:?}: relative error {rel}"
            );
            if method == QuantMethod::Gptq {
                let (n, k) = q.shape();
                let want = rtn_gptq(&w, n, k, &GptqParams::default(), "w").unwrap();
                assert_eq!(rel_max_diff(&got, &flat(&want)), 0.0, "{which:?}");
            }
        }
        assert!(m.lm_head_is_dense());
        let err = m.quantize_lm_head(method).unwrap_err().to_string();
        assert!(err.contains("load-time method"), "{err}");
        let bytes = m.weight_bytes();
        m.round_lm_head_into(method).unwrap();
        assert_eq!(m.lm_head().base.format_name(), format);
        assert!(m.weight_bytes() < bytes);
        assert!(m.round_lm_head_into(method).is_err(), "a second rounding");
    }
}
