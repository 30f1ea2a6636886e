//! bitsandbytes 4-bit (NF4/FP4, double quant) against fixtures made by bitsandbytes 0.50.2
//! (`fixtures/quant/bnb/make_bnb_fixtures.py`).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, load_raw};
use lorq_quant::bnb4::{quantization_config_4bit, Absmax, Bnb4Tensor, Bnb4Type, NestedAbsmax};
use lorq_quant::QuantTensor;
use lorq_quant::RawTensor;
use serde_json::Value;

fn load(stem: &str) -> HashMap<String, RawTensor> {
    load_raw("bnb", stem)
}

fn meta() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(format!("{}/meta.json", fixture_dir("bnb"))).unwrap(),
    )
    .unwrap()
}

fn t(map: &HashMap<String, RawTensor>, k: &str) -> Tensor {
    map.get(k)
        .unwrap_or_else(|| panic!("fixture tensor {k}"))
        .to_tensor()
        .unwrap()
}
fn f32s(map: &HashMap<String, RawTensor>, k: &str) -> Vec<f32> {
    t(map, k).flatten_all().unwrap().to_vec1().unwrap()
}
fn u8s(map: &HashMap<String, RawTensor>, k: &str) -> Vec<u8> {
    t(map, k).flatten_all().unwrap().to_vec1().unwrap()
}

struct Case {
    name: String,
    input: String,
    qt: Bnb4Type,
    dq: bool,
    json: String,
}

fn cases() -> Vec<Case> {
    meta()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["case"].as_str().unwrap().into(),
            input: c["input"].as_str().unwrap().into(),
            qt: Bnb4Type::from_name(c["quant_type"].as_str().unwrap()).unwrap(),
            dq: c["double_quant"].as_bool().unwrap(),
            json: c["quant_state_json"].as_str().unwrap().into(),
        })
        .collect()
}

/// bitsandbytes' own quantization state of a case, assembled into a Bnb4Tensor.
fn bnb_tensor(f: &HashMap<String, RawTensor>, c: &Case) -> Bnb4Tensor {
    let input = t(f, &format!("{}.input", c.input));
    let (rows, cols) = input.dims2().unwrap();
    let absmax = if c.dq {
        Absmax::Nested(NestedAbsmax {
            codes: u8s(f, &format!("{}.absmax", c.name)),
            nested_absmax: f32s(f, &format!("{}.nested_absmax", c.name)),
            code: f32s(f, &format!("{}.nested_code", c.name)),
            offset: f32s(f, &format!("{}.offset", c.name))[0],
            blocksize: 256,
        })
    } else {
        Absmax::F32(f32s(f, &format!("{}.absmax", c.name)))
    };
    let packed = u8s(f, &format!("{}.packed", c.name));
    Bnb4Tensor::from_parts(c.qt, 64, (rows, cols), input.dtype(), packed, absmax).unwrap()
}

#[test]
fn packed_bytes_and_absmax_equal_bitsandbytes() {
    let f = load("bnb4");
    let (mut differ, mut total, mut max_diff) = (0usize, 0usize, 0i32);
    for c in cases() {
        let input = t(&f, &format!("{}.input", c.input));
        let q = Bnb4Tensor::quantize(&input, c.qt, c.dq).unwrap();
        assert_eq!(
            q.packed(),
            &u8s(&f, &format!("{}.packed", c.name))[..],
            "{}: packed bytes",
            c.name
        );
        let exact = f32s(&f, &format!("{}.absmax_exact", c.name));
        match q.absmax() {
            Absmax::F32(a) => {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(a), bits(&exact), "{}: absmax", c.name);
            }
            Absmax::Nested(n) => {
                let off = f32s(&f, &format!("{}.offset", c.name))[0];
                assert!(
                    (n.offset - off).abs() <= 1e-6 * off.abs(),
                    "{}: offset {} vs {off}",
                    c.name,
                    n.offset
                );
                let bnb_na = f32s(&f, &format!("{}.nested_absmax", c.name));
                for (a, b) in n.nested_absmax.iter().zip(&bnb_na) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs(),
                        "{}: nested absmax {a} vs {b}",
                        c.name
                    );
                }
                let map = f32s(&f, &format!("{}.nested_code", c.name));
                assert!(
                    n.code
                        .iter()
                        .zip(&map)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "dynamic map"
                );
                let bnb_codes = u8s(&f, &format!("{}.absmax", c.name));
                for (a, b) in n.codes.iter().zip(&bnb_codes) {
                    let d = (*a as i32 - *b as i32).abs();
                    assert!(d <= 2, "{}: nested code {a} vs bitsandbytes {b}", c.name);
                    differ += (d > 0) as usize;
                    max_diff = max_diff.max(d);
                }
                total += bnb_codes.len();
                // Whatever the codes, the scales stay close to the exact absmax.
                for (s, e) in q.block_scales().iter().zip(&exact) {
                    assert!(
                        (s - e).abs() <= 0.02 * e.abs().max(1e-3),
                        "{}: scale {s} vs {e}",
                        c.name
                    );
                }
            }
        }
    }
    eprintln!(
        "nested absmax codes differing from bitsandbytes': {differ} of {total} (max {max_diff})"
    );
    assert!(total > 1000);
}

#[test]
fn dequantizing_bitsandbytes_bytes_is_bit_exact() {
    let f = load("bnb4");
    for c in cases() {
        let q = bnb_tensor(&f, &c);
        let want = f.get(&format!("{}.dequant", c.name)).unwrap();
        let got = RawTensor::from_tensor(&q.dequantize(q.orig_dtype()).unwrap()).unwrap();
        assert_eq!(got.dtype, want.dtype, "{}", c.name);
        if got.data != want.data {
            let q32: Vec<f32> = q
                .dequantize(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let w = want
                .to_tensor()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let g = got
                .to_tensor()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let bad: Vec<_> = (0..w.len())
                .filter(|&i| w[i].to_bits() != g[i].to_bits())
                .take(5)
                .map(|i| (i, q32[i], g[i], w[i]))
                .collect();
            panic!(
                "{}: dequantized weight differs from bitsandbytes' {bad:?}",
                c.name
            );
        }
        if c.dq {
            let want = f32s(&f, &format!("{}.absmax_deq", c.name));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(q.block_scales()),
                bits(&want),
                "{}: dequantized absmax",
                c.name
            );
        }
        assert_eq!(q.quant_state_json(), c.json, "{}: quant state JSON", c.name);
    }
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let d: f32 = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let s: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    d / s.max(1e-30)
}

#[test]
fn fused_matmul_matches_dequantize_then_matmul() {
    let dev = Device::Cpu;
    // [37, 64]: rows aligned to blocks; [20, 37]: rows straddle blocks and start on odd nibbles;
    // [24, 600]: rows longer than the kernel's chunk.
    for (n, k) in [(37, 64), (20, 37), (24, 600)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        for (qt, dq) in [(Bnb4Type::Nf4, true), (Bnb4Type::Fp4, false)] {
            let q = Bnb4Tensor::quantize(&w, qt, dq).unwrap();
            let wd = q.dequantize(DType::F32).unwrap();
            for m in [1, 5, 40] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let want = x.matmul(&wd.t().unwrap()).unwrap();
                let got = q.matmul(&x).unwrap();
                assert_eq!(got.dims(), &[m, n]);
                let r = rel_diff(&got, &want);
                assert!(r < 1e-5, "{qt:?} [{n},{k}] m={m}: rel diff {r}");
            }
            // 3-D activations in bf16 keep their shape and dtype.
            let x = Tensor::randn(0f32, 1.0, (2, 3, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let y = q.matmul(&x).unwrap();
            assert_eq!((y.dims(), y.dtype()), (&[2, 3, n][..], DType::BF16));
            let want = x
                .to_dtype(DType::F32)
                .unwrap()
                .broadcast_matmul(&wd.t().unwrap())
                .unwrap();
            assert!(rel_diff(&y, &want) < 1e-2);
        }
    }
}

/// transformers' checkpoint tensors of one module, by full name.
fn hf_getter<'a>(
    f: &'a HashMap<String, RawTensor>,
    set: &'a str,
) -> impl Fn(&str) -> Option<Tensor> + 'a {
    move |name: &str| {
        f.get(&format!("{set}.{name}"))
            .map(|r| r.to_tensor().unwrap())
    }
}

#[test]
fn loads_and_rewrites_transformers_checkpoints_exactly() {
    let f = load("hf_modules");
    let m = meta();
    for (set, qt, dq) in [
        ("nf4_dq", Bnb4Type::Nf4, true),
        ("fp4", Bnb4Type::Fp4, false),
    ] {
        for p in m["hf_modules"].as_array().unwrap() {
            let p = p.as_str().unwrap();
            let get = hf_getter(&f, set);
            let q = Bnb4Tensor::from_state_dict(p, &get).unwrap();
            assert_eq!((q.quant_type(), q.double_quant()), (qt, dq));
            let want = f.get(&format!("{set}.{p}.dequant_ref")).unwrap();
            let got = RawTensor::from_tensor(&q.dequantize(DType::F32).unwrap()).unwrap();
            assert!(
                got == *want,
                "{set} {p}: dequantized weight differs from bitsandbytes'"
            );
            // Saving gives back transformers' tensors: names, dtypes, shapes and bytes.
            let sd = q.to_state_dict(p).unwrap();
            let n_hf = f
                .keys()
                .filter(|k| k.starts_with(&format!("{set}.{p}.weight")))
                .count();
            assert_eq!(sd.len(), n_hf, "{set} {p}: number of tensors");
            for (name, tensor) in sd {
                let ours = RawTensor::from_tensor(&tensor).unwrap();
                let theirs = f
                    .get(&format!("{set}.{name}"))
                    .unwrap_or_else(|| panic!("transformers has no {name}"));
                assert!(
                    ours == *theirs,
                    "{set}: {name} differs from transformers' ({:?} {:?})",
                    ours.shape,
                    theirs.shape
                );
            }
        }
        assert_eq!(
            quantization_config_4bit(qt, dq, DType::F32),
            m["quantization_config"][set],
            "{set}"
        );
    }
}

#[test]
fn fresh_quantization_round_trips_through_the_state_dict() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (9, 37), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    for (qt, dq) in [
        (Bnb4Type::Nf4, true),
        (Bnb4Type::Nf4, false),
        (Bnb4Type::Fp4, true),
    ] {
        let q = Bnb4Tensor::quantize(&w, qt, dq).unwrap();
        let sd: HashMap<String, Tensor> = q.to_state_dict("m.lin").unwrap().into_iter().collect();
        let back = Bnb4Tensor::from_state_dict("m.lin", &|n| sd.get(n).cloned()).unwrap();
        assert_eq!(back.packed(), q.packed());
        assert_eq!(back.absmax(), q.absmax());
        assert_eq!(back.orig_dtype(), DType::BF16);
        assert_eq!(back.quant_state_json(), q.quant_state_json());
        assert_eq!(q.shape(), (9, 37));
        assert_eq!(q.packed().len(), 167);
    }
}

fn nf4_sd() -> HashMap<String, Tensor> {
    let w = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu).unwrap();
    let q = Bnb4Tensor::quantize(&w, Bnb4Type::Nf4, true).unwrap();
    q.to_state_dict("p").unwrap().into_iter().collect()
}

fn load_err(sd: &HashMap<String, Tensor>) -> String {
    Bnb4Tensor::from_state_dict("p", &|n| sd.get(n).cloned())
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_checkpoints_name_the_tensor() {
    let qs = "p.weight.quant_state.bitsandbytes__nf4";
    for missing in [
        "p.weight",
        "p.weight.absmax",
        "p.weight.quant_map",
        "p.weight.nested_absmax",
        "p.weight.nested_quant_map",
    ] {
        let mut sd = nf4_sd();
        sd.remove(missing);
        let e = load_err(&sd);
        assert!(
            e.contains("missing tensor") && e.contains(missing),
            "{missing}: {e}"
        );
    }
    let mut sd = nf4_sd();
    sd.remove(qs);
    let e = load_err(&sd);
    assert!(e.contains(qs), "{e}");

    // Wrong shape: a packed weight with bytes missing.
    let mut sd = nf4_sd();
    sd.insert(
        "p.weight".into(),
        Tensor::zeros((100, 1), DType::U8, &Device::Cpu).unwrap(),
    );
    let e = load_err(&sd);
    assert!(e.contains("p.weight:") && e.contains("256"), "{e}");
    // Wrong absmax count, wrong dtype.
    let mut sd = nf4_sd();
    sd.insert(
        "p.weight.absmax".into(),
        Tensor::zeros(3, DType::U8, &Device::Cpu).unwrap(),
    );
    let e = load_err(&sd);
    assert!(e.contains("p.weight.absmax"), "{e}");
    let mut sd = nf4_sd();
    sd.insert(
        "p.weight.nested_absmax".into(),
        Tensor::zeros(1, DType::F16, &Device::Cpu).unwrap(),
    );
    let e = load_err(&sd);
    assert!(
        e.contains("p.weight.nested_absmax") && e.contains("F32"),
        "{e}"
    );

    // Truncated / wrong quant-state JSON.
    let js = String::from_utf8(nf4_sd()[qs].to_vec1::<u8>().unwrap()).unwrap();
    for bad in [
        &js[..js.len() / 2],
        &js.replace("\"nf4\"", "\"int4\""),
        &js.replace("[8, 64]", "[512]"),
    ] {
        let mut sd = nf4_sd();
        let b = bad.as_bytes().to_vec();
        let n = b.len();
        sd.insert(qs.into(), Tensor::from_vec(b, n, &Device::Cpu).unwrap());
        let e = load_err(&sd);
        assert!(e.contains(qs) && e.contains("bad quant state"), "{e}");
    }
    // A quant map that is not bitsandbytes' table.
    let mut sd = nf4_sd();
    sd.insert(
        "p.weight.quant_map".into(),
        Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = load_err(&sd);
    assert!(e.contains("p.weight.quant_map"), "{e}");
}
