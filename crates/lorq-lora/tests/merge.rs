//! Merging in ΔW space against PEFT (`fixtures/merge/`, made by `fixtures/merge/make_merge_fixtures.py`
//! with `peft.utils.merge_utils` and `add_weighted_adapter`), DARE's seeded drop, and the errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lorq_lora::merge::{
    combine_deltas, merge_adapters, merged_module_delta, with_weights, DareMasks,
    MajoritySignMethod, MergeSpec, MergeStrategy,
};
use lorq_lora::{LoraAdapter, LoraConfig, LoraModule};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn reference() -> Value {
    let p = fixtures().join("merge/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn tensors(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("merge").join(file), &Device::Cpu).unwrap()
}

fn adapter(rel: &str) -> Arc<LoraAdapter> {
    Arc::new(LoraAdapter::load(&fixtures().join(rel), &Device::Cpu).unwrap())
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |a-b| relative to the largest |reference| value.
fn rel_max_diff(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(1e-30);
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale
}

fn spec_of(case: &Value) -> MergeSpec {
    MergeSpec {
        strategy: case["strategy"].as_str().unwrap().parse().unwrap(),
        density: case["density"].as_f64().unwrap(),
        majority_sign_method: case["majority_sign_method"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        seed: 0,
    }
}

fn case_adapters(r: &Value, case: &Value) -> Vec<(Arc<LoraAdapter>, f64)> {
    let all: Vec<&str> = r["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let idx: Vec<usize> = case["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let weights: Vec<f64> = case["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    with_weights(
        idx.iter().map(|&i| adapter(all[i])).collect(),
        Some(&weights),
    )
    .unwrap()
}

/// The masks PEFT's DARE used, keyed as the fixture stores them: `<case>/<module>/<adapter index
/// among the three fixture adapters>`.
fn given_mask<'a>(
    masks: &'a HashMap<String, Tensor>,
    case: &'a Value,
) -> impl Fn(&str, usize) -> Option<Vec<f32>> + 'a {
    move |module: &str, i: usize| {
        let global = case["adapters"][i].as_u64()?;
        let name = case["name"].as_str()?;
        masks.get(&format!("{name}/{module}/{global}")).map(flat)
    }
}

#[test]
fn merged_delta_equals_peft_merge_utils_for_every_strategy() {
    let r = reference();
    let stored = tensors("cases.safetensors");
    let masks = tensors("dare_masks.safetensors");
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let adapters = case_adapters(&r, case);
        let spec = spec_of(case);
        let hook = given_mask(&masks, case);
        let given = DareMasks::Given(&hook);
        let source = if case["dare_masks"].as_bool().unwrap() {
            &given
        } else {
            &DareMasks::Seeded
        };
        for module in r["stored_modules"].as_array().unwrap() {
            let module = module.as_str().unwrap();
            let ours = merged_module_delta(&adapters, &spec, module, source)
                .unwrap()
                .unwrap();
            let want = &stored[&format!("{name}/delta/{module}")];
            assert_eq!(ours.dims(), want.dims(), "{name} {module}");
            let d = rel_max_diff(&flat(&ours), &flat(want));
            assert!(
                d <= 1e-5,
                "{name} {module}: ΔW differs from PEFT by {d:e} (relative)"
            );
        }
    }
}

#[test]
fn dare_with_other_masks_differs_from_peft() {
    // The same DARE case with lorq's own seeded masks: must not match PEFT's recorded result, or
    // the comparison above would not be exercising the masks at all.
    let r = reference();
    let stored = tensors("cases.safetensors");
    let case = r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "dare_linear")
        .unwrap();
    let adapters = case_adapters(&r, case);
    let module = "model.layers.1.self_attn.q_proj";
    let ours = merged_module_delta(&adapters, &spec_of(case), module, &DareMasks::Seeded)
        .unwrap()
        .unwrap();
    let want = &stored[&format!("dare_linear/delta/{module}")];
    assert!(rel_max_diff(&flat(&ours), &flat(want)) > 0.1);
}

#[test]
fn dare_seeded_drop_keeps_density_and_rescales_exactly() {
    let a = adapter("llama/adapters/r8-all");
    let density = 0.3;
    let spec = MergeSpec {
        strategy: MergeStrategy::DareLinear,
        density,
        majority_sign_method: MajoritySignMethod::Total,
        seed: 5,
    };
    let merged = merge_adapters(&[(a.clone(), 1.0)], &spec).unwrap();
    let (mut kept, mut total) = (0usize, 0usize);
    for (path, m) in a.modules() {
        let full = flat(&m.delta_weight().unwrap());
        let got = flat(&merged.module(path).unwrap().delta_weight().unwrap());
        for (g, f) in got.iter().zip(&full) {
            if *g != 0.0 {
                kept += 1;
                let want = f / density as f32;
                assert!(
                    (g - want).abs() <= 1e-6 * want.abs(),
                    "{path}: kept {g} is not ΔW/density = {want}"
                );
            }
        }
        total += full.len();
    }
    let frac = kept as f64 / total as f64;
    assert!((frac - density).abs() < 0.01, "kept fraction {frac}");
    // Same seed: the same merge; another seed: another mask.
    let again = merge_adapters(&[(a.clone(), 1.0)], &spec).unwrap();
    let other = merge_adapters(&[(a.clone(), 1.0)], &MergeSpec { seed: 6, ..spec }).unwrap();
    let p = "model.layers.0.mlp.up_proj";
    let d = |x: &LoraAdapter| flat(&x.module(p).unwrap().delta_weight().unwrap());
    assert_eq!(d(&merged), d(&again));
    assert_ne!(d(&merged), d(&other));
}

#[test]
fn merged_adapter_is_dense_and_applies_like_its_delta() {
    let a = adapter("llama/adapters/r8-all");
    let b = adapter("llama/adapters/r4-rslora-qv-bf16");
    let spec = MergeSpec::default();
    let merged = merge_adapters(&[(a.clone(), 0.5), (b.clone(), 2.0)], &spec).unwrap();
    assert_eq!(merged.modules().count(), 14);
    let p = "model.layers.0.self_attn.q_proj";
    let m = merged.module(p).unwrap();
    assert_eq!((m.out_features(), m.in_features(), m.rank()), (128, 64, 64));
    assert_eq!(m.dtype(), DType::F32);
    assert_eq!(m.bytes(), 128 * 64 * 4);
    assert_eq!(
        merged.bytes(),
        merged.modules().map(|(_, m)| m.bytes()).sum::<usize>()
    );
    // delta(x) of the dense merge = 0.5·delta_a(x) + 2·delta_b(x)
    let x = Tensor::arange(0f32, 3.0 * 64.0, &Device::Cpu)
        .unwrap()
        .reshape((3, 64))
        .unwrap()
        .affine(0.01, -0.9)
        .unwrap();
    let got = flat(&m.delta(&x).unwrap());
    let ya = flat(&a.module(p).unwrap().delta(&x).unwrap());
    let yb = flat(&b.module(p).unwrap().delta(&x).unwrap());
    let want: Vec<f32> = ya.iter().zip(&yb).map(|(u, v)| 0.5 * u + 2.0 * v).collect();
    assert!(rel_max_diff(&got, &want) < 1e-5);
    // bf16 input comes back as bf16
    let xb = x.to_dtype(DType::BF16).unwrap();
    assert_eq!(m.delta(&xb).unwrap().dtype(), DType::BF16);
}

#[test]
fn ties_by_hand() {
    // Two 1x4 deltas, density 0.5 keeps the 2 largest magnitudes of each:
    // a = [4, -1, -3, 0.5] -> [4, 0, -3, 0];  b = [-2, 5, -1, -6] -> [0, 5, 0, -6]
    // total sign: sums [4, 5, -3, -6] -> [+, +, -, -]; every kept entry agrees with its column.
    // weights 1 and 0.5: [4, 2.5, -3, -3] (each column has one contributor).
    let dev = Device::Cpu;
    let a = Tensor::new(&[[4f32, -1.0, -3.0, 0.5]], &dev).unwrap();
    let b = Tensor::new(&[[-2f32, 5.0, -1.0, -6.0]], &dev).unwrap();
    let spec = MergeSpec {
        strategy: MergeStrategy::Ties,
        density: 0.5,
        majority_sign_method: MajoritySignMethod::Total,
        seed: 0,
    };
    let out = combine_deltas(
        "m",
        &[Some(a.clone()), Some(b.clone())],
        &[1.0, 0.5],
        &spec,
        &DareMasks::Seeded,
    )
    .unwrap();
    assert_eq!(flat(&out), vec![4.0, 2.5, -3.0, -3.0]);
    // density 1: no trim; column 0: 4 vs -2 -> total +2 -> keeps 4 (mean of 1);
    // column 2: -3, -1 -> both agree -> (-3 + -0.5) / 2
    let full = combine_deltas(
        "m",
        &[Some(a.clone()), Some(b.clone())],
        &[1.0, 0.5],
        &MergeSpec {
            density: 1.0,
            ..spec.clone()
        },
        &DareMasks::Seeded,
    )
    .unwrap();
    assert_eq!(flat(&full), vec![4.0, 2.5, -1.75, -3.0]);
    // frequency: column 0 signs +1, -1 -> 0 -> majority +; a missing adapter is a zero delta
    let freq = combine_deltas(
        "m",
        &[Some(a), None, Some(b)],
        &[1.0, 3.0, 0.5],
        &MergeSpec {
            density: 1.0,
            majority_sign_method: MajoritySignMethod::Frequency,
            ..spec
        },
        &DareMasks::Seeded,
    )
    .unwrap();
    // column 1: -1 (a) vs +5 (b): frequency tie -> + -> 2.5; column 3: 0.5 vs -6 -> tie -> + -> 0.5
    assert_eq!(flat(&freq), vec![4.0, 2.5, -1.75, 0.5]);
}

fn dense_adapter(path: &str, module: &str, out: usize, inp: usize) -> Arc<LoraAdapter> {
    let config = LoraConfig::parse(
        r#"{"r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]}"#,
        Path::new(path),
    )
    .unwrap();
    let delta = Tensor::ones((out, inp), DType::F32, &Device::Cpu).unwrap();
    let modules = HashMap::from([(module.to_string(), LoraModule::dense(delta).unwrap())]);
    Arc::new(LoraAdapter::from_modules(PathBuf::from(path), config, modules).unwrap())
}

#[test]
fn errors_name_the_bad_value() {
    let a = adapter("llama/adapters/r8-all");
    let pair = [(a.clone(), 1.0)];
    for density in [0.0, 1.5, -0.2, f64::NAN] {
        let spec = MergeSpec {
            strategy: MergeStrategy::Ties,
            density,
            ..MergeSpec::default()
        };
        let e = merge_adapters(&pair, &spec).unwrap_err().to_string();
        assert!(
            e.contains("density") && e.contains(&density.to_string()),
            "{e}"
        );
    }
    let e = with_weights(vec![a.clone(), a.clone()], Some(&[1.0]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 weights") && e.contains("2 adapters"), "{e}");
    let e = "sum".parse::<MergeStrategy>().unwrap_err().to_string();
    assert!(e.contains("\"sum\"") && e.contains("dare_ties"), "{e}");
    let e = "most"
        .parse::<MajoritySignMethod>()
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"most\"") && e.contains("frequency"), "{e}");
    let e = merge_adapters(&[], &MergeSpec::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no adapters"), "{e}");
    let e = merge_adapters(&[(a.clone(), f64::INFINITY)], &MergeSpec::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("inf") && e.contains("r8-all"), "{e}");
    // Same module, different shapes.
    let m = "model.layers.0.self_attn.q_proj";
    let x = dense_adapter("x-adapter", m, 128, 64);
    let y = dense_adapter("y-adapter", m, 64, 64);
    let e = merge_adapters(&[(x.clone(), 1.0), (y, 1.0)], &MergeSpec::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(m) && e.contains("x-adapter") && e.contains("y-adapter") && e.contains("out 64"),
        "{e}"
    );
    // A fixture adapter of another base model (mistral's q_proj is [64, 64], llama's [128, 64]).
    let mistral = adapter("mistral/adapters/r8-all");
    let e = merge_adapters(&[(a, 1.0), (mistral, 1.0)], &MergeSpec::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("different base models"), "{e}");
    // A given mask of the wrong length is refused, not truncated.
    let short = |_: &str, _: usize| Some(vec![1.0f32; 3]);
    let spec = MergeSpec {
        strategy: MergeStrategy::DareLinear,
        density: 0.5,
        ..MergeSpec::default()
    };
    let e = merged_module_delta(&[(x, 1.0)], &spec, m, &DareMasks::Given(&short))
        .unwrap_err()
        .to_string();
    assert!(e.contains("mask") && e.contains('3'), "{e}");
}
