//! The packed layout the fused GPU kernels read, checked on the CPU: for every format, its CPU
//! decoder (the GPU kernels' reference) gives the format's own dequantized weight bit for bit, so a
//! GPU kernel that matches the decoder matches the format.

mod common;
#[path = "common/formats.rs"]
#[allow(dead_code)] // rel_l2 serves the GPU tests
mod formats;

use candle_core::DType;
use lorq_quant::bnb4::{Bnb4Tensor, Bnb4Type};
use lorq_quant::QuantTensor;

#[test]
fn packed_layout_decodes_to_every_formats_weight() {
    let (n, k) = (64, 512);
    for (name, t) in formats::every_format(n, k, 11) {
        let layout = t
            .gpu_layout()
            .unwrap_or_else(|e| panic!("{name}: no GPU layout: {e}"));
        let want = common::f32s(&t.dequantize(DType::F32).unwrap());
        let got = layout.dequantize_f32();
        assert_eq!(got.len(), want.len(), "{name}");
        // Bit for bit, but for one rounding: LLM.int8 folds SCB/127 into one scale.
        let ulps = if name == "int8" { 1 } else { 0 };
        let bad = got
            .iter()
            .zip(&want)
            .position(|(a, b)| (a.to_bits() as i64 - b.to_bits() as i64).abs() > ulps);
        if let Some(i) = bad {
            panic!(
                "{name}: element ({}, {}) decodes to {} instead of {}",
                i / k,
                i % k,
                got[i],
                want[i]
            );
        }
        assert!(layout.device_bytes() > 0, "{name}");
    }
}

#[test]
fn act_order_layout_sorts_columns_by_group() {
    let formats = formats::every_format(16, 256, 3);
    let (_, t) = formats
        .iter()
        .find(|(n, _)| n == "gptq-4bit-act-order")
        .unwrap();
    let layout = t.gpu_layout().unwrap();
    let perm = layout
        .perm
        .as_ref()
        .expect("act-order keeps a column permutation");
    let mut seen = perm.clone();
    seen.sort();
    assert_eq!(seen, (0..256).collect::<Vec<u32>>(), "a permutation");
    assert_ne!(
        perm, &seen,
        "act-order visits channels out of storage order"
    );
}

#[test]
fn weights_the_kernels_cannot_read_say_why() {
    // in_features not a multiple of 32: the host path runs, and the reason names the shape.
    let w = candle_core::Tensor::from_vec(
        formats::randn(5, 8 * 48, 0.02),
        (8, 48),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let t = Bnb4Tensor::quantize(&w, Bnb4Type::Nf4, false).unwrap();
    let e = t.gpu_layout().unwrap_err().to_string();
    assert!(e.contains("in_features 48"), "{e}");
}
