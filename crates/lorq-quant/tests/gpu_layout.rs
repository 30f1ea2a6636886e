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

/// The tensor-core kernels find a code's group with a multiply instead of a division
/// (`group_index`): it equals the division wherever the kernels take the weight
/// (`group_index_exact`: k · group < 2³²), at every group size the layout has (multiples of 16 and
/// 8), up to and at the bound's edge, and it is wrong past the bound (so the guard is needed).
#[test]
fn group_index_is_the_division_below_the_bound() {
    use lorq_quant::gpu_layout::{group_index, group_index_exact};
    let mut checked = 0u64;
    for group in (8..=8192u32).step_by(8) {
        // The largest input count the kernels accept for this group.
        let k_max = ((1u64 << 32) - 1) / group as u64;
        assert!(group_index_exact(k_max as usize, group as usize));
        assert!(!group_index_exact(k_max as usize + 1, group as usize));
        let mut pos = 0u64;
        let mut step = 1u64;
        while pos < k_max {
            let p = pos as u32;
            assert_eq!(group_index(p, group), p / group, "pos {p}, group {group}");
            checked += 1;
            pos += step;
            step = step * 5 / 4 + 1;
        }
        for p in [k_max - 1, k_max.saturating_sub(group as u64)] {
            let p = p as u32;
            assert_eq!(group_index(p, group), p / group, "pos {p}, group {group}");
        }
    }
    assert!(checked > 50_000, "{checked}");
    // Past the bound the multiply can be one too high: a group of 3·2¹⁰ at the last positions.
    let group = 3 << 10;
    let wrong = (u32::MAX - 4 * group..=u32::MAX).any(|p| group_index(p, group) != p / group);
    assert!(wrong, "the bound would be unnecessary");
}
