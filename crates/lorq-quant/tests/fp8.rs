//! FP8 e4m3fn against torch's cast and compressed-tensors 0.20.0 checkpoints
//! (`fixtures/quant/fp8/make_fp8_fixtures.py`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lorq_quant::fp8::{
    e4m3fn_to_f32, f32_to_e4m3fn, f8_bytes, Fp8Activations, Fp8Strategy, Fp8Tensor,
};
use lorq_quant::QuantTensor;

fn dir() -> String {
    format!("{}/../../fixtures/quant/fp8", env!("CARGO_MANIFEST_DIR"))
}

fn load(p: &str) -> HashMap<String, Tensor> {
    let p = format!("{}/{p}", dir());
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn cast_is_bit_exact_with_torch() {
    let t = load("e4m3_cast.safetensors");
    let x = f32s(&t["x"]);
    let bits: Vec<u8> = t["bits"].to_vec1().unwrap();
    let bad: Vec<(f32, u8, u8)> = x
        .iter()
        .zip(&bits)
        .map(|(&v, &b)| (v, f32_to_e4m3fn(v), b))
        .filter(|(_, a, b)| a != b)
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} casts differ from torch, e.g. {:?}",
        bad.len(),
        x.len(),
        &bad[..bad.len().min(8)]
    );
    // decoding: every finite code round-trips; candle's F8E4M3 agrees on the values
    let all: Vec<u8> = (0..=255).collect();
    let ct = Tensor::from_raw_buffer(&all, DType::F8E4M3, &[256], &Device::Cpu).unwrap();
    let cv = f32s(&ct);
    for b in all {
        let v = e4m3fn_to_f32(b);
        if b & 0x7f == 0x7f {
            assert!(v.is_nan());
            continue;
        }
        assert_eq!(f32_to_e4m3fn(v), b, "code {b:#04x}");
        assert_eq!(
            v.to_bits(),
            cv[b as usize].to_bits(),
            "code {b:#04x} vs candle"
        );
    }
    assert_eq!(e4m3fn_to_f32(0x7e), 448.0);
    assert_eq!(e4m3fn_to_f32(0x01), 2f32.powi(-9));
}

fn check_checkpoint(sub: &str, strategy: Fp8Strategy, acts: Fp8Activations) {
    let st = load(&format!("{sub}/model.safetensors"));
    let dec = load(&format!("{sub}/decompressed.safetensors"));
    let get = |k: &str| st.get(k).cloned();
    let mut n = 0;
    for (name, want) in &dec {
        let prefix = name.strip_suffix(".weight").unwrap();
        let q = Fp8Tensor::from_state_dict(prefix, &get).unwrap();
        assert_eq!(q.strategy(), strategy, "{name}");
        assert_eq!(
            q.input_scale().is_some(),
            acts == Fp8Activations::StaticTensor,
            "{name}"
        );
        let got = q.dequantize_f32();
        let want = f32s(want);
        let diff = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            diff, 0,
            "{name}: {diff} dequantized values differ from compressed-tensors' decompression"
        );
        // the state dict written back is the checkpoint's, byte for byte
        for (k, t) in q.to_state_dict(prefix).unwrap() {
            let r = &st[&k];
            assert_eq!((t.dtype(), t.dims()), (r.dtype(), r.dims()), "{k}");
            if t.dtype() == DType::F8E4M3 {
                assert_eq!(f8_bytes(&t).unwrap(), f8_bytes(r).unwrap(), "{k}");
            } else {
                assert_eq!(f32s(&t), f32s(r), "{k}");
            }
        }
        n += 1;
    }
    assert_eq!(n, 7, "one Llama layer has 7 quantized linears");
    // quantizing the original bf16 weights ourselves gives compressed-tensors' codes and scales
    for (name, w) in load(&format!("{sub}/original.safetensors")) {
        let prefix = name.strip_suffix(".weight").unwrap();
        let mine = Fp8Tensor::quantize(&w, strategy, DType::BF16).unwrap();
        let theirs = Fp8Tensor::from_state_dict(prefix, &get).unwrap();
        assert_eq!(mine.scale(), theirs.scale(), "{name}: scales");
        let mism = mine
            .codes()
            .iter()
            .zip(theirs.codes())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            mism, 0,
            "{name}: {mism} codes differ from compressed-tensors'"
        );
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}/{sub}/config.json", dir())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["quantization_config"],
        Fp8Tensor::quantization_config(strategy, acts, &["lm_head"])
    );
}

#[test]
fn reads_compressed_tensors_channel_checkpoint() {
    check_checkpoint(
        "ct_channel",
        Fp8Strategy::Channel,
        Fp8Activations::DynamicToken,
    );
}

#[test]
fn reads_compressed_tensors_tensor_checkpoint() {
    check_checkpoint(
        "ct_tensor",
        Fp8Strategy::Tensor,
        Fp8Activations::StaticTensor,
    );
}

#[test]
fn quantize_then_fused_matmul() {
    let dev = Device::Cpu;
    let (n, k) = (70, 600); // k spans more than one kernel chunk
    let w = (Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap())
        .to_dtype(DType::F32)
        .unwrap();
    let wv = f32s(&w);
    for (strategy, sd) in [
        (Fp8Strategy::Channel, DType::BF16),
        (Fp8Strategy::Tensor, DType::F32),
    ] {
        let q = Fp8Tensor::quantize(&w, strategy, sd).unwrap();
        assert_eq!(
            q.scale().len(),
            if strategy == Fp8Strategy::Channel {
                n
            } else {
                1
            }
        );
        // the largest element of each scale group reaches the top code
        assert!(q.codes().iter().any(|&c| c & 0x7f == 0x7e));
        let d = q.dequantize_f32();
        let rel = d.iter().zip(&wv).map(|(a, b)| (a - b).abs()).sum::<f32>()
            / wv.iter().map(|v| v.abs()).sum::<f32>();
        assert!(rel < 0.05, "{strategy:?}: mean relative error {rel}");
        for m in [1usize, 5, 40] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let want = x
                .matmul(&q.dequantize(DType::F32).unwrap().t().unwrap())
                .unwrap();
            let got = q.matmul(&x).unwrap();
            let diff: f32 = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(
                diff / scale < 1e-5,
                "{strategy:?} m={m}: rel diff {}",
                diff / scale
            );
        }
        let map: HashMap<String, Tensor> = q.to_state_dict("l").unwrap().into_iter().collect();
        assert_eq!(map["l.weight_scale"].dtype(), sd);
        let q2 = Fp8Tensor::from_state_dict("l", &|k| map.get(k).cloned()).unwrap();
        assert_eq!(q2.dequantize_f32(), d);
        assert_eq!(q.bytes(), n * k + q.scale().len() * sd.size_in_bytes());
    }
}

#[test]
fn bad_checkpoints_name_the_tensor() {
    let st = load("ct_channel/model.safetensors");
    let p = "model.layers.0.mlp.up_proj";
    let check = |edit: &dyn Fn(&mut HashMap<String, Tensor>), needle: String| {
        let mut m = st.clone();
        edit(&mut m);
        let e = Fp8Tensor::from_state_dict(p, &|k| m.get(k).cloned())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&needle),
            "error {e:?} does not mention {needle:?}"
        );
    };
    check(
        &|m| drop(m.remove(&format!("{p}.weight"))),
        format!("{p}.weight"),
    );
    check(
        &|m| drop(m.remove(&format!("{p}.weight_scale"))),
        format!("{p}.weight_scale"),
    );
    check(
        &|m| {
            drop(m.insert(
                format!("{p}.weight"),
                Tensor::zeros((64, 32), DType::F32, &Device::Cpu).unwrap(),
            ))
        },
        format!("{p}.weight"),
    );
    check(
        &|m| {
            drop(m.insert(
                format!("{p}.weight_scale"),
                Tensor::zeros((3, 1), DType::BF16, &Device::Cpu).unwrap(),
            ))
        },
        format!("{p}.weight_scale"),
    );
}
