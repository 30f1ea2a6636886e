//! HQQ against fixtures made by hqq 0.2.8.post1 (`fixtures/quant/hqq/make_hqq_fixtures.py`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lorq_quant::hqq::{bitpack, ComputeDtype, HqqConfig, HqqTensor, PackedCodes, Packing};
use lorq_quant::QuantTensor;

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let p = format!(
        "{}/../../fixtures/quant/hqq/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// (case, weight, nbits, group_size, axis) — as in the generator script.
const CASES: &[(&str, &str, u32, usize, usize)] = &[
    ("q4_g64_a1", "W_64x128", 4, 64, 1),
    ("q3_g64_a1", "W_64x128", 3, 64, 1),
    ("q2_g16_a1", "W_64x128", 2, 16, 1),
    ("q3_g64_a1_24x80", "W_24x80", 3, 64, 1),
    ("q3_g64_a1_36x96", "W_36x96", 3, 64, 1),
    ("q4_g64_a0", "W_32x128", 4, 64, 0),
    ("q2_g16_a0", "W_32x128", 2, 16, 0),
];

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn packed_of(t: &Tensor) -> PackedCodes {
    match t.dtype() {
        DType::U8 => PackedCodes::U8(t.flatten_all().unwrap().to_vec1().unwrap()),
        DType::I32 => PackedCodes::I32(t.flatten_all().unwrap().to_vec1().unwrap()),
        d => panic!("unexpected W_q dtype {d:?}"),
    }
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-6))
        .fold(0.0, f32::max)
}

/// hqq's own tensor, assembled from the fixture's packed codes, scale and zero.
fn hqq_reference(
    t: &HashMap<String, Tensor>,
    case: &str,
    w: &Tensor,
    nbits: u32,
    gs: usize,
    axis: usize,
) -> HqqTensor {
    let cfg = HqqConfig {
        nbits,
        group_size: gs,
        axis,
        round_zero: nbits == 4,
        optimize: true,
    };
    let (o, i) = w.dims2().unwrap();
    HqqTensor::from_parts(
        (o, i),
        cfg,
        Packing::for_nbits(nbits).unwrap(),
        packed_of(&t[&format!("{case}.W_q_packed")]),
        f32s(&t[&format!("{case}.scale")]),
        f32s(&t[&format!("{case}.zero")]),
        ComputeDtype::F32,
    )
    .unwrap()
}

#[test]
fn codes_scale_zero_match_hqq() {
    let t = fixture("hqq_cases.safetensors");
    let mut report = Vec::new();
    for &(case, wname, nbits, gs, axis) in CASES {
        let w = &t[wname];
        let cfg = HqqConfig {
            nbits,
            group_size: gs,
            axis,
            round_zero: nbits == 4,
            optimize: true,
        };
        let q = HqqTensor::quantize(w, &cfg).unwrap();
        let want_codes: Vec<u8> = t[&format!("{case}.W_q")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            q.grid_shape(),
            t[&format!("{case}.W_q")].dims2().unwrap(),
            "{case}: grid shape"
        );
        let codes = q.codes();
        let mism = codes
            .iter()
            .zip(&want_codes)
            .filter(|(a, b)| a != b)
            .count();
        let far = codes
            .iter()
            .zip(&want_codes)
            .filter(|(a, b)| a.abs_diff(**b) > 1)
            .count();
        let rs = max_rel(q.scale(), &f32s(&t[&format!("{case}.scale")]));
        let zs = f32s(&t[&format!("{case}.zero")]);
        let rz = q
            .zero()
            .iter()
            .zip(&zs)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0.0, f32::max);
        report.push(format!(
            "{case}: {mism}/{} codes differ, scale rel {rs:.2e}, zero rel {rz:.2e}",
            codes.len()
        ));
        assert_eq!(far, 0, "{case}: codes off by more than one step");
        assert!(mism * 1000 <= codes.len(), "{case}: {mism} code mismatches");
        assert_eq!(rs, 0.0, "{case}: scale differs from hqq's");
        assert!(rz <= 1e-6, "{case}: zero rel diff {rz}");
        if mism == 0 {
            assert_eq!(
                q.packed(),
                &packed_of(&t[&format!("{case}.W_q_packed")]),
                "{case}: packed bytes"
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn packing_and_dequant_equal_hqq() {
    let t = fixture("hqq_cases.safetensors");
    for &(case, wname, nbits, gs, axis) in CASES {
        let codes_t = &t[&format!("{case}.W_q")];
        let (rows, cols) = codes_t.dims2().unwrap();
        let codes: Vec<u8> = codes_t.flatten_all().unwrap().to_vec1().unwrap();
        let p = Packing::for_nbits(nbits).unwrap();
        let want = packed_of(&t[&format!("{case}.W_q_packed")]);
        assert_eq!(
            bitpack::pack(p, &codes, rows, cols).unwrap(),
            want,
            "{case}: packed bytes"
        );
        assert_eq!(
            bitpack::unpack(p, &want, rows, cols).unwrap(),
            codes,
            "{case}: unpack"
        );
        let r = hqq_reference(&t, case, &t[wname], nbits, gs, axis);
        assert_eq!(
            r.packed_shape().0,
            t[&format!("{case}.W_q_packed")].dim(0).unwrap()
        );
        let got = r.dequantize_f32();
        let want_d = f32s(&t[&format!("{case}.dequant")]);
        let diff = got
            .iter()
            .zip(&want_d)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            diff, 0,
            "{case}: dequantized values differ from Quantizer.dequantize"
        );
    }
}

fn ref_matmul(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k)
                .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                .sum::<f64>() as f32;
        }
    }
    y
}

#[test]
fn fused_matmul_matches_dequantized_product() {
    let t = fixture("hqq_cases.safetensors");
    let dev = Device::Cpu;
    for &(case, wname, nbits, gs, axis) in CASES {
        let q = hqq_reference(&t, case, &t[wname], nbits, gs, axis);
        let (n, k) = q.shape();
        let wd = q.dequantize_f32();
        for m in [1usize, 5, 40] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let xs = f32s(&x);
            let want = ref_matmul(&xs, &wd, m, n, k);
            let y = q.matmul(&x).unwrap();
            assert_eq!(y.dims(), [m, n]);
            let got = f32s(&y);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d / scale < 1e-5, "{case} m={m}: rel diff {}", d / scale);
        }
        // rank-3 activations and bf16 in, bf16 out
        let x = Tensor::randn(0f32, 1.0, (2, 3, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let y = q.matmul(&x).unwrap();
        assert_eq!((y.dims(), y.dtype()), (&[2, 3, n][..], DType::BF16));
    }
}

fn load_linear(nbits: u32) -> (HashMap<String, Tensor>, HqqTensor) {
    let sd = fixture(&format!("hqq_linear_{nbits}bit.safetensors"));
    let get = |k: &str| sd.get(k).cloned();
    let q = HqqTensor::from_state_dict(PREFIX, &get).unwrap();
    (sd, q)
}

const PREFIX: &str = "model.layers.0.mlp.down_proj";

#[test]
fn reads_hqq_linear_state_dict_and_matches_its_forward() {
    for nbits in [4u32, 3] {
        let (sd, q) = load_linear(nbits);
        assert_eq!(q.shape(), (48, 128));
        assert_eq!(q.format_name(), format!("hqq-{nbits}bit"));
        assert_eq!(*q.config(), HqqConfig::new(nbits, 64));
        let x = &sd["x"];
        let bias = &sd[&format!("{PREFIX}.bias")];
        let y = q.matmul(x).unwrap().broadcast_add(bias).unwrap();
        let (got, want) = (f32s(&y), f32s(&sd["y"]));
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            d / scale < 1e-5,
            "{nbits}-bit: HQQLinear forward rel diff {}",
            d / scale
        );
        // quantizing the original weight ourselves gives HQQLinear's codes
        let mine = HqqTensor::quantize(&sd["weight"], &HqqConfig::new(nbits, 64)).unwrap();
        let mism = mine
            .codes()
            .iter()
            .zip(q.codes())
            .filter(|(a, b)| *a != b)
            .count();
        eprintln!(
            "HQQLinear {nbits}-bit: {mism}/{} codes differ from lorq's quantizer",
            q.codes().len()
        );
        assert!(mism * 1000 <= q.codes().len());
    }
}

#[test]
fn state_dict_round_trip_is_hqq_byte_for_byte() {
    for nbits in [4u32, 3] {
        let (sd, q) = load_linear(nbits);
        let out = q.to_state_dict(PREFIX).unwrap();
        let hqq_keys: Vec<&String> = sd
            .keys()
            .filter(|k| k.starts_with(PREFIX) && !k.ends_with("bias"))
            .collect();
        assert_eq!(out.len(), hqq_keys.len(), "{nbits}-bit: key count");
        for (k, t) in &out {
            let r = sd
                .get(k)
                .unwrap_or_else(|| panic!("{k} not in hqq's state dict"));
            assert_eq!((t.dtype(), t.dims()), (r.dtype(), r.dims()), "{k}");
            let (a, b) = (
                t.to_dtype(DType::F64).unwrap(),
                r.to_dtype(DType::F64).unwrap(),
            );
            let (a, b): (Vec<f64>, Vec<f64>) = (
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(a, b, "{k}: values");
        }
        // and back
        let map: HashMap<String, Tensor> = out.into_iter().collect();
        let q2 = HqqTensor::from_state_dict(PREFIX, &|k| map.get(k).cloned()).unwrap();
        assert_eq!(q2.dequantize_f32(), q.dequantize_f32());
    }
}

#[test]
fn jit_quantized_state_dict_round_trips_all_widths() {
    let t = fixture("hqq_cases.safetensors");
    for m in ["hqq-4bit", "hqq-3bit", "hqq-2bit"] {
        let q = HqqTensor::quantize(&t["W_64x128"], &HqqConfig::lorax(m).unwrap()).unwrap();
        let map: HashMap<String, Tensor> = q.to_state_dict("p").unwrap().into_iter().collect();
        let q2 = HqqTensor::from_state_dict("p", &|k| map.get(k).cloned()).unwrap();
        assert_eq!(q2.codes(), q.codes(), "{m}");
        assert_eq!(q2.dequantize_f32(), q.dequantize_f32(), "{m}");
        assert_eq!(q.format_name(), m);
    }
}

#[test]
fn bad_state_dicts_name_the_tensor() {
    let (sd, _) = load_linear(4);
    let check = |edit: &dyn Fn(&mut HashMap<String, Tensor>), needle: &str| {
        let mut m = sd.clone();
        edit(&mut m);
        let e = HqqTensor::from_state_dict(PREFIX, &|k| m.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(needle),
            "error {e:?} does not mention {needle:?}"
        );
    };
    let key = |k: &str| format!("{PREFIX}.{k}");
    check(&|m| drop(m.remove(&key("W_q"))), &key("W_q"));
    check(&|m| drop(m.remove(&key("scale"))), &key("scale"));
    check(
        &|m| {
            drop(m.insert(
                key("W_q"),
                Tensor::zeros((16, 64), DType::U8, &Device::Cpu).unwrap(),
            ))
        },
        &key("W_q"),
    );
    check(
        &|m| {
            drop(m.insert(
                key("W_q"),
                Tensor::zeros((48, 64), DType::F32, &Device::Cpu).unwrap(),
            ))
        },
        &key("W_q"),
    );
    check(
        &|m| drop(m.insert(key("nbits"), Tensor::new(4f32, &Device::Cpu).unwrap())),
        &key("nbits"),
    );
    check(
        &|m| {
            drop(m.insert(
                key("packing"),
                Tensor::new(b"9bit_u8".as_slice(), &Device::Cpu).unwrap(),
            ))
        },
        &key("packing"),
    );
    check(
        &|m| {
            drop(m.insert(
                key("zero"),
                Tensor::zeros((3, 1), DType::F32, &Device::Cpu).unwrap(),
            ))
        },
        &key("zero"),
    );
    check(
        &|m| drop(m.insert(key("quant_zero"), Tensor::new(1u8, &Device::Cpu).unwrap())),
        &key("quant_zero"),
    );
}
