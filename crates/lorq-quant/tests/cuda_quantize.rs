//! The GPU quantizers (`lorq_quant::cuda::quantize`) against the CPU quantizers, their references,
//! on fresh random weights of several shapes (awkward ones included: element counts that are not
//! a multiple of the block, an odd count, a single row, tiny tensors) in f32, bf16 and f16.
//!
//! Tolerances: the GPU kernels repeat the CPU's f32 arithmetic operation for operation, so codes and
//! scales must be identical; no exact ties are exempted because none can differ (the rounding of
//! every tie is the same IEEE operation on both sides). Two f64 sums are taken in another order
//! (the double-quantization mean, HQQ's total error): the nested-absmax offset may differ by one
//! f32 ulp (checked to 1e-6 relative). HQQ's `|x|^(p−1)` is an f64 power rounded to f32 on the GPU
//! and libm's `powf` on the CPU (within one ulp), so HQQ zeros are checked to 1e-5 (absolute, or
//! relative past 1), at least 99.99 % of codes identical, the same optimizer step count, scales
//! identical (they are min/max only), and the reconstruction error within 1 % of the CPU's.
//! Built and run on a GPU machine (`scripts/build-cuda.sh --tests`); elsewhere each test says why
//! it is skipped.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_quantizers_skipped_without_the_cuda_feature() {
    eprintln!(
        "SKIPPED: lorq-quant was built without the `cuda` feature; the GPU quantizer tests run with \
         LORQ_CUDA_TESTS=\"-p lorq-quant --test cuda_quantize\" scripts/build-cuda.sh --tests on a GPU machine"
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor};
    use lorq_quant::bnb4::{Absmax, Bnb4Tensor, Bnb4Type};
    use lorq_quant::eetq::EetqTensor;
    use lorq_quant::fp8::{Fp8Strategy, Fp8Tensor};
    use lorq_quant::hqq::{optimize, HqqConfig, HqqTensor, ProximalParams};
    use lorq_quant::int8::Int8Tensor;
    use lorq_quant::method::QuantMethod;

    fn gpu() -> Option<Device> {
        lorq_quant::cuda::usable_gpu(0)
            .map_err(|why| eprintln!("SKIPPED: {why}"))
            .ok()
    }

    /// Shapes: round ones, a K that is no multiple of 64, an odd element count, one row, tiny.
    const SHAPES: [(usize, usize); 7] = [
        (96, 128),
        (256, 1024),
        (40, 100),
        (7, 33),
        (1, 70),
        (3, 5),
        (1, 1),
    ];
    const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    /// A fresh random weight (host and GPU copies in `dtype`), one row zeroed where there are
    /// several (the all-zero cases of every quantizer).
    fn weight(dev: &Device, n: usize, k: usize, dtype: DType) -> (Tensor, Tensor) {
        let mut w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
        if n > 2 {
            let z = Tensor::zeros((1, k), DType::F32, &Device::Cpu).unwrap();
            w = w.slice_assign(&[1..2, 0..k], &z).unwrap();
        }
        let h = w.to_dtype(dtype).unwrap();
        let g = h.to_device(dev).unwrap();
        (h, g)
    }

    fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let tol = rel * w.abs().max(1.0);
            assert!(
                (g - w).abs() <= tol && g.is_finite(),
                "{what}[{i}]: GPU {g} vs CPU {w}"
            );
        }
    }

    #[test]
    fn bnb4_matches_cpu() {
        let Some(dev) = gpu() else { return };
        for &(n, k) in &SHAPES {
            for dtype in DTYPES {
                let (h, g) = weight(&dev, n, k, dtype);
                for (ty, dq, bs) in [
                    (Bnb4Type::Nf4, false, 64),
                    (Bnb4Type::Nf4, true, 64),
                    (Bnb4Type::Fp4, false, 64),
                    (Bnb4Type::Fp4, true, 128),
                    (Bnb4Type::Nf4, true, 4096),
                ] {
                    let what = format!("{} dq={dq} bs={bs} {n}x{k} {dtype:?}", ty.name());
                    let c = Bnb4Tensor::quantize_with_blocksize(&h, ty, dq, bs).unwrap();
                    let q = Bnb4Tensor::quantize_gpu(&g, ty, dq, bs).unwrap();
                    assert_eq!(q.packed(), c.packed(), "{what}: codes");
                    assert_eq!(q.orig_dtype(), c.orig_dtype(), "{what}");
                    match (q.absmax(), c.absmax()) {
                        (Absmax::F32(a), Absmax::F32(b)) => assert_eq!(a, b, "{what}: absmax"),
                        (Absmax::Nested(a), Absmax::Nested(b)) => {
                            assert_close(&what, &[a.offset], &[b.offset], 1e-6);
                            if a.offset == b.offset {
                                assert_eq!(a.codes, b.codes, "{what}: nested codes");
                                assert_eq!(
                                    a.nested_absmax, b.nested_absmax,
                                    "{what}: nested absmax"
                                );
                            }
                            assert_eq!(a.code, b.code);
                        }
                        _ => panic!("{what}: absmax kinds differ"),
                    }
                    assert_close(&what, q.block_scales(), c.block_scales(), 1e-6);
                }
            }
        }
    }

    #[test]
    fn int8_and_eetq_match_cpu() {
        let Some(dev) = gpu() else { return };
        for &(n, k) in SHAPES.iter().chain(&[(64usize, 14336usize)]) {
            for dtype in DTYPES {
                let (h, g) = weight(&dev, n, k, dtype);
                let what = format!("{n}x{k} {dtype:?}");
                let c = Int8Tensor::quantize(&h).unwrap();
                let q = Int8Tensor::quantize_gpu(&g).unwrap();
                assert_eq!(q.cb(), c.cb(), "int8 {what}: codes");
                assert_eq!(q.scb(), c.scb(), "int8 {what}: scales");
                let c = EetqTensor::quantize(&h).unwrap();
                let q = EetqTensor::quantize_gpu(&g).unwrap();
                assert_eq!(q.codes(), c.codes(), "eetq {what}: codes");
                assert_eq!(q.scales(), c.scales(), "eetq {what}: scales");
            }
        }
    }

    #[test]
    fn fp8_matches_cpu() {
        let Some(dev) = gpu() else { return };
        for &(n, k) in &SHAPES {
            for dtype in DTYPES {
                let (h, g) = weight(&dev, n, k, dtype);
                for strategy in [Fp8Strategy::Tensor, Fp8Strategy::Channel] {
                    for sdt in DTYPES {
                        let what = format!("{strategy:?} scale {sdt:?} {n}x{k} {dtype:?}");
                        let c = Fp8Tensor::quantize(&h, strategy, sdt).unwrap();
                        let q = Fp8Tensor::quantize_gpu(&g, strategy, sdt).unwrap();
                        assert_eq!(q.codes(), c.codes(), "{what}: codes");
                        assert_eq!(q.scale(), c.scale(), "{what}: scales");
                    }
                }
            }
        }
    }

    /// Mean |W − dequantize(Q)|.
    fn recon_err(t: &HqqTensor, w: &[f32]) -> f64 {
        let d = t.dequantize_f32();
        d.iter()
            .zip(w)
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum::<f64>()
            / w.len() as f64
    }

    #[test]
    fn hqq_matches_cpu() {
        let Some(dev) = gpu() else { return };
        let shapes = [
            (96usize, 128usize),
            (256, 1024),
            (40, 96),
            (3, 64),
            (1, 640),
        ];
        for &(n, k) in &shapes {
            for dtype in [DType::F32, DType::BF16] {
                let (h, g) = weight(&dev, n, k, dtype);
                let hf: Vec<f32> = h
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (nbits, gs) in [(4u32, 64usize), (3, 64), (2, 16), (4, 128), (1, 32)] {
                    for axis in [1usize, 0] {
                        let cfg = HqqConfig {
                            axis,
                            ..HqqConfig::new(nbits, gs)
                        };
                        if !(n * k).is_multiple_of(gs) {
                            continue;
                        }
                        let rows = if axis == 1 { n * k / gs } else { gs };
                        let what = format!("hqq {nbits}-bit gs {gs} axis {axis} {n}x{k} {dtype:?}");
                        let c = match HqqTensor::quantize(&h.to_dtype(DType::F32).unwrap(), &cfg) {
                            Ok(c) => c,
                            Err(e) => {
                                // The packer's constraint: the GPU must refuse the same way.
                                let ge = HqqTensor::quantize_gpu(&g, &cfg).unwrap_err();
                                assert_eq!(ge.to_string(), e.to_string(), "{what} ({rows} rows)");
                                continue;
                            }
                        };
                        let (q, stats) =
                            HqqTensor::quantize_gpu_with(&g, &cfg, ProximalParams::default())
                                .unwrap();
                        // The CPU's step count, on the same grouping.
                        let groups: Vec<f32> = if axis == 1 {
                            hf.clone()
                        } else {
                            let cols = n * k / gs;
                            (0..cols)
                                .flat_map(|j| (0..gs).map(move |i| (i, j)))
                                .map(|(i, j)| hf[i * cols + j])
                                .collect()
                        };
                        let cpu_steps = optimize::quantize_groups(
                            &groups,
                            gs,
                            nbits,
                            cfg.round_zero,
                            Some(ProximalParams::default()),
                        )
                        .iterations;
                        assert_eq!(stats.iterations, cpu_steps, "{what}: optimizer steps");
                        assert_eq!(q.scale(), c.scale(), "{what}: scales");
                        assert_close(&format!("{what}: zero"), q.zero(), c.zero(), 1e-5);
                        let (qc, cc) = (q.codes(), c.codes());
                        let same = qc.iter().zip(&cc).filter(|(a, b)| a == b).count();
                        assert!(
                            same as f64 >= 0.9999 * cc.len() as f64 || cc.len() - same <= 1,
                            "{what}: {same} of {} codes identical",
                            cc.len()
                        );
                        let (eg, ec) = (recon_err(&q, &hf), recon_err(&c, &hf));
                        assert!(
                            eg <= ec * 1.01 + 1e-12,
                            "{what}: GPU error {eg} vs CPU {ec}"
                        );
                        assert_eq!(q.packed_shape(), c.packed_shape(), "{what}");
                    }
                }
            }
        }
    }

    /// The load path (`cuda::quantize::quantize`, every just-in-time method) writes the same
    /// checkpoint tensors as the host method (HQQ: the same names, dtypes and shapes, values to
    /// the tolerance above).
    #[test]
    fn every_method_saves_like_the_host() {
        let Some(dev) = gpu() else { return };
        let (h, g) = weight(&dev, 192, 256, DType::BF16);
        for name in QuantMethod::NAMES {
            let m = QuantMethod::parse(name).unwrap().unwrap();
            if !m.is_jit() {
                assert!(
                    lorq_quant::cuda::quantize::quantize(m, &g).is_err(),
                    "{name}"
                );
                continue;
            }
            let c = m.quantize(&h).unwrap().state_dict("p").unwrap();
            let q = lorq_quant::cuda::quantize::quantize(m, &g)
                .unwrap()
                .state_dict("p")
                .unwrap();
            assert_eq!(q.len(), c.len(), "{name}");
            for ((qn, qt), (cn, ct)) in q.iter().zip(&c) {
                assert_eq!(
                    (qn, qt.dtype, &qt.shape),
                    (cn, ct.dtype, &ct.shape),
                    "{name}"
                );
                if !name.starts_with("hqq") && !qn.contains("nested") && !qn.ends_with("absmax") {
                    assert_eq!(qt.data, ct.data, "{name}: {qn}");
                }
            }
        }
    }
}
