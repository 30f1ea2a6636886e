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

#[test]
fn every_jit_method_stays_close_to_full_precision() {
    let dir = fixtures().join("llama/base");
    let reference = reference("llama");
    let p = &reference["runs"][0]["prompts"][0];
    let ids = ids(&p["input_ids"]);
    let full = floats(&p["last_logits"]);
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
