//! LLM.int8 (`Linear8bitLt`) and the EETQ layout against fixtures made by bitsandbytes 0.50.2 and
//! numpy (`fixtures/quant/bnb/make_bnb_fixtures.py`).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, load_raw};
use lorq_quant::eetq::EetqTensor;
use lorq_quant::int8::{quantization_config_8bit, Int8Tensor};
use lorq_quant::QuantTensor;
use lorq_quant::RawTensor;
use serde_json::Value;

fn load(stem: &str) -> HashMap<String, RawTensor> {
    load_raw("bnb", stem)
}

fn t(map: &HashMap<String, RawTensor>, k: &str) -> Tensor {
    map.get(k)
        .unwrap_or_else(|| panic!("fixture tensor {k}"))
        .to_tensor()
        .unwrap()
}

fn f32s(x: &Tensor) -> Vec<f32> {
    x.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn i8s(map: &HashMap<String, RawTensor>, k: &str) -> Vec<i8> {
    let r = &map[k];
    r.i8_values(k, &r.shape.clone()).unwrap()
}

#[test]
fn quantization_equals_linear8bitlt() {
    let f = load("int8");
    let q = Int8Tensor::quantize(&t(&f, "W")).unwrap();
    assert_eq!(q.cb(), &i8s(&f, "CB")[..]);
    let scb = f32s(&t(&f, "SCB"));
    assert!(q
        .scb()
        .iter()
        .zip(&scb)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!(q.shape(), (48, 96));
}

/// Linear8bitLt's forward (threshold 6.0) on inputs with and without outlier columns.
///
/// Tolerance: for f32 inputs lorq performs the same f32 operations as bitsandbytes on the same
/// i8 values (exact i32 products, the same rescale), so only the summation order of the outlier
/// columns' `addmm` differs: 1e-6 of the output scale. For bf16 inputs bitsandbytes rounds the
/// int8 part to bf16 before adding the outlier product and rounds again; lorq rounds the same
/// way, but MKL's bf16 addmm may round its partial results differently: 1 bf16 ulp (2^-8 relative)
/// of the output scale.
#[test]
fn forward_matches_linear8bitlt() {
    let f = load("int8");
    let q = Int8Tensor::quantize(&t(&f, "W")).unwrap();
    for name in [
        "plain_m1",
        "plain_m5",
        "outlier_m1",
        "outlier_m5",
        "outlier_m40",
        "outlier_m5_bf16",
    ] {
        let x = t(&f, &format!("X_{name}"));
        let want = t(&f, &format!("Y_{name}"));
        let y = q.matmul(&x).unwrap();
        assert_eq!((y.dims(), y.dtype()), (want.dims(), want.dtype()), "{name}");
        let (y, want) = (f32s(&y), f32s(&want));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = y
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let tol = if name.ends_with("bf16") {
            scale / 256.0
        } else {
            scale * 1e-6
        };
        eprintln!("{name}: max |lorq - Linear8bitLt| = {d:.3e} (output scale {scale:.3})");
        assert!(d <= tol, "{name}: max diff {d} > {tol}");
        // The decomposition matters: without it, outlier inputs are far off bitsandbytes.
        if name == "outlier_m5" {
            let plain = q.clone().with_threshold(0.0).matmul(&x).unwrap();
            let dp = f32s(&plain)
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(dp > 100.0 * tol, "threshold 0 should differ: {dp}");
        }
        // And the result is close to the unquantized product.
        let full = f32s(&t(&f, &format!("YF_{name}")));
        let e = y
            .iter()
            .zip(&full)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(e < 0.05 * scale, "{name}: quantization error {e}");
    }
}

#[test]
fn transformers_8bit_checkpoint_round_trips() {
    let f = load("hf_modules");
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}/meta.json", fixture_dir("bnb"))).unwrap(),
    )
    .unwrap();
    for p in meta["hf_modules"].as_array().unwrap() {
        let p = p.as_str().unwrap();
        let get = |n: &str| f.get(&format!("int8.{n}")).cloned();
        let q = Int8Tensor::from_state_dict(p, &get).unwrap();
        let want = f32s(&t(&f, &format!("int8.{p}.dequant_ref")));
        let got = f32s(&q.dequantize(DType::F32).unwrap());
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{p}: dequantized weight"
        );
        for (name, raw) in q.to_state_dict(p) {
            assert_eq!(
                Some(&raw),
                f.get(&format!("int8.{name}")),
                "{name} differs from transformers'"
            );
        }
    }
    assert_eq!(
        quantization_config_8bit(),
        meta["quantization_config"]["int8"]
    );
}

#[test]
fn int8_small_and_large_m_agree() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.1, (33, 70), &dev).unwrap();
    let q = Int8Tensor::quantize(&w).unwrap();
    // The same 40 rows in one call (GEMM path) and 8 rows at a time (fused path).
    let x = (Tensor::randn(0f32, 1.0, (40, 70), &dev).unwrap() * 2.0).unwrap();
    let big = f32s(&q.matmul(&x).unwrap());
    let mut small = Vec::new();
    for c in 0..5 {
        small.extend(f32s(&q.matmul(&x.narrow(0, 8 * c, 8).unwrap()).unwrap()));
    }
    // Outlier columns are chosen per call, so compare only where no row has |x| >= 6.
    let any_outlier = f32s(&x).iter().any(|v| v.abs() >= 6.0);
    if !any_outlier {
        assert!(big
            .iter()
            .zip(&small)
            .all(|(a, b)| (a - b).abs() <= 1e-6 * a.abs().max(1.0)));
    }
    let y3 = q.matmul(&x.reshape((4, 10, 70)).unwrap()).unwrap();
    assert_eq!(y3.dims(), &[4, 10, 33]);
    assert_eq!(f32s(&y3), big);
}

#[test]
fn int8_bad_checkpoints_name_the_tensor() {
    let w = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu).unwrap();
    let sd: HashMap<String, RawTensor> = Int8Tensor::quantize(&w)
        .unwrap()
        .to_state_dict("p")
        .into_iter()
        .collect();
    let err = |sd: &HashMap<String, RawTensor>| {
        Int8Tensor::from_state_dict("p", &|n| sd.get(n).cloned())
            .unwrap_err()
            .to_string()
    };
    for missing in ["p.weight", "p.SCB"] {
        let mut s = sd.clone();
        s.remove(missing);
        let e = err(&s);
        assert!(e.contains("missing tensor") && e.contains(missing), "{e}");
    }
    let mut s = sd.clone();
    s.insert("p.SCB".into(), RawTensor::from_f32(&[3], &[1.0; 3]));
    let e = err(&s);
    assert!(e.contains("p.SCB") && e.contains("shape"), "{e}");
    let mut s = sd.clone();
    s.insert("p.weight".into(), RawTensor::from_f32(&[4, 8], &[0.0; 32]));
    let e = err(&s);
    assert!(e.contains("p.weight") && e.contains("I8"), "{e}");
    let mut s = sd.clone();
    s.insert("p.weight_format".into(), RawTensor::from_u8(&[], &[1]));
    assert!(err(&s).contains("p.weight_format"));
    // Without weight_format (older checkpoints) it loads.
    let mut s = sd.clone();
    s.remove("p.weight_format");
    assert!(Int8Tensor::from_state_dict("p", &|n| s.get(n).cloned()).is_ok());
}

#[test]
fn eetq_matches_numpy_reference() {
    let f = load("eetq");
    let q = EetqTensor::quantize(&t(&f, "W")).unwrap();
    assert_eq!(q.codes(), &i8s(&f, "Q")[..]);
    let s = f32s(&t(&f, "S"));
    assert!(q
        .scales()
        .iter()
        .zip(&s)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let deq = f32s(&q.dequantize(DType::F32).unwrap());
    assert!(deq
        .iter()
        .zip(&f32s(&t(&f, "DEQ")))
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let y = f32s(&q.matmul(&t(&f, "X")).unwrap());
    let want = f32s(&t(&f, "Y"));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = y
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d <= 1e-5 * scale, "eetq matmul: {d}");
}

#[test]
fn eetq_kernel_state_dict_and_errors() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (19, 300), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let q = EetqTensor::quantize(&w).unwrap();
    let wd = q.dequantize(DType::F32).unwrap();
    for m in [1, 5, 40] {
        let x = Tensor::randn(0f32, 1.0, (m, 300), &dev).unwrap();
        let want = f32s(&x.matmul(&wd.t().unwrap()).unwrap());
        let got = f32s(&q.matmul(&x).unwrap());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d <= 1e-5 * scale, "m={m}: {d}");
    }
    let sd: HashMap<String, RawTensor> = q.to_state_dict("p").into_iter().collect();
    assert_eq!(sd["p.weight"].dtype, safetensors::Dtype::I8);
    let back = EetqTensor::from_state_dict("p", &|n| sd.get(n).cloned()).unwrap();
    assert_eq!((back.codes(), back.scales()), (q.codes(), q.scales()));
    let mut s = sd.clone();
    s.remove("p.weight_scale");
    let e = EetqTensor::from_state_dict("p", &|n| s.get(n).cloned())
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing tensor p.weight_scale"), "{e}");
    let mut s = sd.clone();
    s.insert(
        "p.weight_scale".into(),
        RawTensor::from_f32(&[18], &[1.0; 18]),
    );
    let e = EetqTensor::from_state_dict("p", &|n| s.get(n).cloned())
        .unwrap_err()
        .to_string();
    assert!(e.contains("p.weight_scale") && e.contains("shape"), "{e}");
    let mut s = sd.clone();
    s.insert(
        "p.weight".into(),
        RawTensor::from_u8(&[19, 300], &vec![0; 19 * 300]),
    );
    let e = EetqTensor::from_state_dict("p", &|n| s.get(n).cloned())
        .unwrap_err()
        .to_string();
    assert!(e.contains("p.weight") && e.contains("I8"), "{e}");
}
