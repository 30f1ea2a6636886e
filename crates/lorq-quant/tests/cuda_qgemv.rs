//! The packed-layout GPU kernels (`kernels/qgemv.cu`) against their CPU reference — the layout's
//! own CPU decoder, itself bit-exact against every format (`tests/gpu_layout.rs`) — for every
//! weight-only format, every compiled launch shape, f32/bf16/f16 activations, on fresh random
//! inputs: relative L2 error <= 1e-5 with f32 activations, <= 1e-2 with bf16/f16, never NaN.
//! Run on a GPU machine (`LORQ_CUDA_TESTS="-p lorq-quant --test cuda_qgemv"
//! scripts/build-cuda.sh --tests`); elsewhere each test prints why it is skipped.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_qgemv_skipped_without_the_cuda_feature() {
    eprintln!(
        "SKIPPED: lorq-quant was built without the `cuda` feature; the GPU tests run with \
         scripts/build-cuda.sh --tests on a GPU machine"
    );
}

#[cfg(feature = "cuda")]
#[path = "common/formats.rs"]
mod formats;

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor};
    use lorq_quant::cuda::qgemv::{
        dequantize, group_path, matmul, matmul_group, DeviceLayout, QPath, Variant,
    };
    use lorq_quant::cuda::{qmma_tiled, qwgmma};
    use lorq_quant::gpu_layout::{CodeKind, ElementRounding, GpuLayout};
    use lorq_quant::hqq::{HqqConfig, HqqTensor};
    use lorq_quant::QuantTensor;
    use std::sync::Arc;

    use super::formats::{every_format, max_abs_diff, randn, rel_l2};

    fn gpu() -> Option<Device> {
        lorq_quant::cuda::usable_gpu(0)
            .map_err(|why| eprintln!("SKIPPED: {why}"))
            .ok()
    }

    /// `values` as an `[m, k]` activation in `dtype` on `dev`, and its f32 product with the
    /// reference weight `w_ref` `[n, k]` on the CPU (what every path is compared with).
    fn input_and_want(
        dev: &Device,
        values: Vec<f32>,
        (m, k): (usize, usize),
        dtype: DType,
        w_ref: &Tensor,
    ) -> (Tensor, Tensor) {
        let x = Tensor::from_vec(values, (m, k), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let want = x
            .to_dtype(DType::F32)
            .unwrap()
            .matmul(&w_ref.t().unwrap())
            .unwrap();
        (x.to_device(dev).unwrap(), want)
    }

    /// Every format × every launch shape × dtype × row count, and the dequantize + cuBLAS path.
    #[test]
    fn every_format_matches_the_cpu_decoder() {
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let mut failures = Vec::new();
        for (si, &(n, k)) in [(136usize, 512usize), (1032, 256)].iter().enumerate() {
            for (name, t) in every_format(n, k, 100 + si as u64) {
                let layout = t.gpu_layout().unwrap();
                let w_ref =
                    Tensor::from_vec(layout.dequantize_f32(), (n, k), &Device::Cpu).unwrap();
                let dl = DeviceLayout::upload(&layout, cdev).unwrap();
                // The dequantized weight itself: exact in f32.
                let wd = dequantize(&dl, cdev, DType::F32).unwrap();
                let wd = match &layout.perm {
                    Some(p) => {
                        let mut inv = vec![0u32; k];
                        for (i, &c) in p.iter().enumerate() {
                            inv[c as usize] = i as u32;
                        }
                        let inv = Tensor::from_vec(inv, k, &dev).unwrap();
                        wd.index_select(&inv, 1).unwrap()
                    }
                    None => wd,
                };
                let e = rel_l2(&wd, &w_ref);
                if e != 0.0 {
                    failures.push(format!("{name} {n}x{k} dequantize f32: rel err {e:e}"));
                }
                for m in [1usize, 2, 3, 4, 5, 8, 13, 16, 40, 70, 130] {
                    for (dtype, tol) in
                        [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 1e-2)]
                    {
                        let values = randn(m as u64 * 7 + si as u64, m * k, 1.0);
                        let (xg, want) = input_and_want(&dev, values, (m, k), dtype, &w_ref);
                        let mut paths = vec![QPath::Dequantize, QPath::Auto];
                        if dtype != DType::F32 {
                            paths.push(QPath::Mma);
                            if qmma_tiled::supports(&dl) {
                                paths.push(QPath::MmaTiled);
                            }
                        }
                        if m <= 16 {
                            let mr = match m {
                                1 => 1,
                                2 => 2,
                                3 | 4 => 4,
                                _ => 8,
                            };
                            paths.extend(
                                Variant::ALL
                                    .iter()
                                    .filter(|v| v.compiled(&dl, mr, dtype))
                                    .map(|&v| QPath::Fused(v)),
                            );
                        }
                        for path in paths {
                            let got = matmul(&dl, &xg, path).unwrap();
                            assert_eq!(got.dtype(), dtype);
                            assert_eq!(got.dims(), &[m, n]);
                            let e = rel_l2(&got, &want);
                            if e.is_nan() || e > tol {
                                failures.push(format!(
                                    "{name} {n}x{k} m={m} {dtype:?} {path:?}: rel err {e:e} > {tol:e}"
                                ));
                            }
                        }
                    }
                }
                // Through the format's own QuantTensor methods (the model's path).
                let x = Tensor::from_vec(randn(9, 3 * k, 1.0), (3, k), &Device::Cpu).unwrap();
                // (LLM.int8's forward has its own kernels: tests/cuda_int8.rs.)
                if name != "int8" {
                    let want = x.matmul(&w_ref.t().unwrap()).unwrap();
                    let got = t.matmul(&x.to_device(&dev).unwrap()).unwrap();
                    let e = rel_l2(&got, &want);
                    if e.is_nan() || e > 1e-5 {
                        failures.push(format!("{name} QuantTensor::matmul: rel err {e:e}"));
                    }
                }
                let dy = Tensor::from_vec(randn(10, 5 * n, 1.0), (5, n), &Device::Cpu).unwrap();
                let want = dy.matmul(&w_ref).unwrap();
                let got = t.matmul_grad_input(&dy.to_device(&dev).unwrap()).unwrap();
                let e = rel_l2(&got, &want);
                if e.is_nan() || e > 1e-5 {
                    failures.push(format!("{name} matmul_grad_input: rel err {e:e}"));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// `x · Wᵀ` through `path` against the f32 product with the CPU decoder's weight, for bf16 and
    /// f16 activations at each row count: the failures.
    fn check_rows(
        dev: &Device,
        name: &str,
        layout: &GpuLayout,
        dl: &DeviceLayout,
        rows: &[usize],
        paths: &[QPath],
    ) -> Vec<String> {
        let (n, k) = (layout.n, layout.k);
        let w_ref = Tensor::from_vec(layout.dequantize_f32(), (n, k), &Device::Cpu).unwrap();
        let mut failures = Vec::new();
        for &m in rows {
            for dtype in [DType::BF16, DType::F16] {
                let values = randn(m as u64 * 13 + n as u64, m * k, 1.0);
                let (xg, want) = input_and_want(dev, values, (m, k), dtype, &w_ref);
                for &path in paths {
                    let got = matmul(dl, &xg, path).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    assert_eq!(got.dims(), &[m, n]);
                    let e = rel_l2(&got, &want);
                    if e.is_nan() || e > 1e-2 {
                        failures.push(format!(
                            "{name} {n}x{k} m={m} {dtype:?} {path:?}: rel err {e:e} > 1e-2"
                        ));
                    }
                    // Twice: the split-K tickets must be back at zero after a launch.
                    let again = matmul(dl, &xg, path).unwrap();
                    let e2 = rel_l2(&again, &got);
                    if e2.is_nan() || e2 > 1e-6 {
                        failures.push(format!(
                            "{name} {n}x{k} m={m} {dtype:?} {path:?}: second launch differs by {e2:e}"
                        ));
                    }
                }
            }
        }
        failures
    }

    /// `path` and `Auto` against the CPU decoder for every format `supports` takes, on three
    /// shapes (seeds from `seed`), at each row count: the failures. Asserts that each of `expected`
    /// was served.
    fn check_formats_served(
        dev: &Device,
        seed: u64,
        rows: &[usize],
        path: QPath,
        supports: impl Fn(&DeviceLayout) -> bool,
        expected: &[&str],
    ) -> Vec<String> {
        let cdev = dev.as_cuda_device().unwrap();
        let mut failures = Vec::new();
        let mut served = Vec::new();
        for (si, &(n, k)) in [(136usize, 512usize), (1032, 256), (264, 4096)]
            .iter()
            .enumerate()
        {
            for (name, t) in every_format(n, k, seed + si as u64) {
                let layout = t.gpu_layout().unwrap();
                let dl = DeviceLayout::upload(&layout, cdev).unwrap();
                if !supports(&dl) {
                    continue;
                }
                served.push(name.clone());
                failures.extend(check_rows(
                    dev,
                    &name,
                    &layout,
                    &dl,
                    rows,
                    &[path, QPath::Auto],
                ));
            }
        }
        for f in expected {
            assert!(served.iter().any(|s| s == f), "{f} not served by {path:?}");
        }
        failures
    }

    /// Seeded scales (0.01-0.02), zeros (7.5 +- 2: around the middle of the 4-bit range, fractional)
    /// and code sources (`n * k` normal values) of an `[n, k]` weight in groups of `group`.
    fn edge_inputs(n: usize, k: usize, group: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let groups = k / group;
        let scales = randn(seed, n * groups, 1.0)
            .iter()
            .map(|v| 0.01 + 0.005 * v.abs())
            .collect();
        let zeros = randn(seed + 1, n * groups, 1.0)
            .iter()
            .map(|v| 7.5 + 2.0 * v)
            .collect();
        (scales, zeros, randn(seed + 2, n * k, 1.0))
    }

    /// A seeded random `[n, k]` weight in hqq 4-bit (LoRAX's settings).
    fn hqq_4bit(n: usize, k: usize, seed: u64) -> Arc<dyn QuantTensor> {
        let w = Tensor::from_vec(randn(seed, n * k, 0.02), (n, k), &Device::Cpu).unwrap();
        Arc::new(HqqTensor::quantize(&w, &HqqConfig::lorax("hqq-4bit").unwrap()).unwrap())
    }

    /// The half2 GEMV on every format it takes (affine 4-bit), one and two activation rows, with
    /// activations spanning its per-chunk scaling: chunks of outliers (3,000: a Llama down_proj
    /// input's range), of tiny values (1e-4), of zeros, beside ordinary ones, each row its own
    /// pattern; both launch shapes (2 and 4 K-slices) and `Auto`, row counts that leave a block
    /// or a warp part empty. Two rows give each row's one-row result bit for bit. Past the default
    /// shared memory it opts in; past its own limit (for one row, or for two) it is refused with
    /// an error and `Auto` takes another kernel.
    #[test]
    fn half2_gemv_matches_the_cpu_decoder() {
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let half2 = QPath::Fused(Variant::half2(4));
        let shapes = [
            QPath::Fused(Variant::half2(2)),
            QPath::Fused(Variant::half2(4)),
            QPath::Auto,
        ];
        let mut failures = Vec::new();
        let mut served = Vec::new();
        // GPTQ's act-order quantizer is cubic in K: the long K (K-split shape) through hqq only.
        let long_k = |seed| -> Vec<(String, Arc<dyn QuantTensor>)> {
            vec![("hqq-4bit".into(), hqq_4bit(37, 16384, seed))]
        };
        // 40 rows: a block of the 2-slice shape (16 rows) part empty; 37: a warp's rows too.
        for (si, &(n, k)) in [(136usize, 512usize), (264, 4096), (40, 1024), (37, 16384)]
            .iter()
            .enumerate()
        {
            let weights = if k > 4096 {
                long_k(500 + si as u64)
            } else {
                every_format(n, k, 500 + si as u64)
            };
            for (name, t) in weights {
                let layout = t.gpu_layout().unwrap();
                let dl = DeviceLayout::upload(&layout, cdev).unwrap();
                if !Variant::half2_fits(&dl) {
                    continue;
                }
                served.push(name.clone());
                let w_ref =
                    Tensor::from_vec(layout.dequantize_f32(), (n, k), &Device::Cpu).unwrap();
                // Row r: chunks of outliers, tiny values and zeros at its own offsets.
                let mut xv = Vec::with_capacity(2 * k);
                for r in 0..2usize {
                    let mut row = randn(si as u64 + 11 + 100 * r as u64, k, 1.0);
                    for (c, chunk) in row.chunks_mut(32).enumerate() {
                        let f = match (c + 2 * r) % 7 {
                            1 => 3000.0,
                            3 => 1e-4,
                            5 => 0.0,
                            _ => 1.0,
                        };
                        chunk.iter_mut().for_each(|v| *v *= f);
                    }
                    xv.extend(row);
                }
                for dtype in [DType::BF16, DType::F16] {
                    for m in [1usize, 2] {
                        let (xg, want) =
                            input_and_want(&dev, xv[..m * k].to_vec(), (m, k), dtype, &w_ref);
                        for path in shapes {
                            let got = matmul(&dl, &xg, path).unwrap();
                            let e = rel_l2(&got, &want);
                            if e.is_nan() || e > 1e-2 {
                                failures.push(format!(
                                    "{name} {n}x{k} {dtype:?} {m} rows {path:?}: rel err {e:e} > 1e-2"
                                ));
                            }
                            if m == 2 && path != QPath::Auto {
                                for r in 0..2 {
                                    let one =
                                        matmul(&dl, &xg.narrow(0, r, 1).unwrap(), path).unwrap();
                                    let d = max_abs_diff(&got.narrow(0, r, 1).unwrap(), &one);
                                    if d != 0.0 {
                                        failures.push(format!(
                                            "{name} {n}x{k} {dtype:?} {path:?}: row {r} of two rows differs from it alone by {d}"
                                        ));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        for f in ["hqq-4bit", "gptq-4bit", "gptq-4bit-act-order", "awq-4bit"] {
            assert!(
                served.iter().any(|s| s == f),
                "{f} not served by the half2 GEMV"
            );
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
        // K 22,016 needs more than the default 48 KiB of shared memory (the kernel opts in), for
        // one row and for two; K 32,768 fits one row, not two; K 45,184 not even one: refused
        // with an error, `Auto` takes another kernel.
        for (k, fits) in [
            (22016usize, [true, true]),
            (32768, [true, false]),
            (45184, [false, false]),
        ] {
            let n = 8usize;
            let t = hqq_4bit(n, k, 7);
            let layout = t.gpu_layout().unwrap();
            let dl = DeviceLayout::upload(&layout, cdev).unwrap();
            assert_eq!(Variant::half2_fits(&dl), fits[0], "K {k}");
            assert_eq!(Variant::half2_fits_rows(&dl, 2), fits[1], "K {k}, 2 rows");
            let w_ref = Tensor::from_vec(layout.dequantize_f32(), (n, k), &Device::Cpu).unwrap();
            for m in [1usize, 2] {
                let (xg, want) =
                    input_and_want(&dev, randn(8, m * k, 1.0), (m, k), DType::BF16, &w_ref);
                let half2_k = matmul(&dl, &xg, half2);
                if fits[m - 1] {
                    let e = rel_l2(&half2_k.unwrap(), &want);
                    assert!(e <= 1e-2, "K {k}, {m} rows: rel err {e:e}");
                } else {
                    let err = half2_k.unwrap_err().to_string();
                    assert!(
                        err.contains("not compiled") && err.contains(&format!("K {k}")),
                        "{err}"
                    );
                }
                let e = rel_l2(&matmul(&dl, &xg, QPath::Auto).unwrap(), &want);
                assert!(e <= 1e-2, "K {k}, {m} rows, Auto: rel err {e:e}");
            }
        }
    }

    /// The MLP's gate/up GEMV with SiLU·mul in one half2 launch: bit for bit the two half2 GEMVs
    /// followed by `silu_mul`, for every affine 4-bit format, odd and even row counts, bf16 and
    /// f16; `None` (the caller's two matmuls) for two rows, f32 rows and table codes.
    #[test]
    fn half2_silu_equals_two_gemvs_then_silu_mul() {
        use lorq_quant::cuda::fused_ops::silu_mul;
        use lorq_quant::cuda::qgemv::matmul_silu_mul;
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let mut pairs: Vec<_> = every_format(136, 512, 700)
            .into_iter()
            .zip(every_format(136, 512, 701))
            .map(|((name, g), (_, u))| (name, g, u))
            .collect();
        // 4100 rows: the gate/up kernel's 2-slice shape.
        for n in [30usize, 31, 4100] {
            pairs.push((
                format!("hqq-4bit n={n}"),
                hqq_4bit(n, 512, 702),
                hqq_4bit(n, 512, 703),
            ));
        }
        let mut fused = Vec::new();
        for (name, g, u) in &pairs {
            let (gl, ul) = (g.gpu_layout().unwrap(), u.gpu_layout().unwrap());
            let gd = DeviceLayout::upload(&gl, cdev).unwrap();
            let ud = DeviceLayout::upload(&ul, cdev).unwrap();
            let k = gl.k;
            for dtype in [DType::BF16, DType::F16] {
                let x = Tensor::from_vec(randn(9, k, 1.0), (1, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let Some(got) = matmul_silu_mul(&gd, &ud, &x).unwrap() else {
                    assert!(
                        !Variant::half2_fits(&gd) || gl.perm.is_some(),
                        "{name}: not fused"
                    );
                    continue;
                };
                fused.push(name.clone());
                let half2 = QPath::Fused(Variant::half2_for(gl.n));
                let want = silu_mul(
                    &matmul(&gd, &x, half2).unwrap(),
                    &matmul(&ud, &x, half2).unwrap(),
                )
                .unwrap();
                assert_eq!(got.dims(), &[1, gl.n]);
                assert_eq!(max_abs_diff(&got, &want), 0.0, "{name} {dtype:?}");
                // Two rows, f32 rows: not this kernel.
                let x2 = Tensor::cat(&[&x, &x], 0).unwrap();
                assert!(matmul_silu_mul(&gd, &ud, &x2).unwrap().is_none());
                let x32 = x.to_dtype(DType::F32).unwrap();
                assert!(matmul_silu_mul(&gd, &ud, &x32).unwrap().is_none());
            }
        }
        for f in ["hqq-4bit", "gptq-4bit", "awq-4bit", "hqq-4bit n=31"] {
            assert!(fused.iter().any(|s| s == f), "{f} not fused");
        }
        assert!(!fused.iter().any(|s| s.starts_with("nf4") || s == "fp4"));
    }

    /// The half2 GEMVs that run the residual add + RMSNorm of their input themselves (q/k/v and
    /// gate/up at batch 1): the residual sum and every output bit for bit `add_rms_norm` followed
    /// by the grouped GEMV / the gate-up-SiLU GEMV, for every affine 4-bit format, one to three
    /// weights, bf16 and f16, and a weight with more grid blocks than the GPU holds at once (the
    /// persistent blocks take several turns); `None` for two rows, f32 rows and table codes.
    #[test]
    fn half2_norm_head_equals_add_rms_norm_then_the_gemvs() {
        use lorq_quant::cuda::fused_ops::{add_rms_norm, NormHead};
        use lorq_quant::cuda::qgemv::{
            matmul_group_norm_head, matmul_silu_mul, matmul_silu_mul_norm_head,
        };
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let k = 512;
        // q-, k- and v-like weights, then an up for the first (gate/up have equal rows).
        let mut sets: Vec<(String, Vec<Arc<dyn QuantTensor>>)> = every_format(136, k, 710)
            .into_iter()
            .zip(every_format(40, k, 711))
            .zip(every_format(40, k, 712))
            .zip(every_format(136, k, 718))
            .map(|((((name, a), (_, b)), (_, c)), (_, u))| (name, vec![a, b, c, u]))
            .collect();
        // 4600 rows: 575 blocks of the grouped kernel, 1150 of the gate/up one (an H100 holds 528).
        sets.push((
            "hqq-4bit n=4600".into(),
            vec![hqq_4bit(4600, k, 713), hqq_4bit(4600, k, 714)],
        ));
        let eps = 1e-5;
        let mut headed = Vec::new();
        for (name, ts) in &sets {
            let layouts: Vec<_> = ts.iter().map(|t| t.gpu_layout().unwrap()).collect();
            let ds: Vec<_> = layouts
                .iter()
                .map(|l| DeviceLayout::upload(l, cdev).unwrap())
                .collect();
            for dtype in [DType::BF16, DType::F16] {
                let row = |seed: u64, std: f32| {
                    Tensor::from_vec(randn(seed, k, std), (1, k), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let (residual, delta) = (row(715, 1.0), row(716, 0.5));
                let weight = row(717, 0.3).affine(1.0, 1.0).unwrap().reshape(k).unwrap();
                let (s_want, x) = add_rms_norm(&residual, &delta, &weight, eps).unwrap();
                let head = NormHead {
                    residual: &residual,
                    delta: &delta,
                    weight: &weight,
                    eps,
                };
                let up = &ds[ds.len() - 1];
                let mut grouped_here = false;
                for count in 1..=(ds.len() - 1).min(3) {
                    let group: Vec<&DeviceLayout> = ds[..count].iter().collect();
                    let Some((s, ys)) = matmul_group_norm_head(&group, &head).unwrap() else {
                        assert!(
                            !Variant::half2_fits(&ds[0]) || layouts[0].perm.is_some(),
                            "{name}: not headed"
                        );
                        continue;
                    };
                    headed.push(name.clone());
                    grouped_here = true;
                    assert_eq!(max_abs_diff(&s, &s_want), 0.0, "{name} {dtype:?}: s");
                    let want: Vec<Tensor> = if count == 1 {
                        vec![matmul(&ds[0], &x, QPath::Auto).unwrap()]
                    } else {
                        matmul_group(&group, &x).unwrap().expect("grouped")
                    };
                    for (i, (y, w)) in ys.iter().zip(&want).enumerate() {
                        assert_eq!(y.dims(), w.dims());
                        assert_eq!(
                            max_abs_diff(y, w),
                            0.0,
                            "{name} {dtype:?}: weight {i} of {count}"
                        );
                    }
                }
                if let Some((s, act)) = matmul_silu_mul_norm_head(&ds[0], up, &head).unwrap() {
                    let want = matmul_silu_mul(&ds[0], up, &x).unwrap().expect("paired");
                    assert_eq!(max_abs_diff(&s, &s_want), 0.0, "{name} {dtype:?}: silu s");
                    assert_eq!(max_abs_diff(&act, &want), 0.0, "{name} {dtype:?}: silu");
                } else {
                    assert!(!grouped_here, "{name}: grouped but not gate/up");
                }
                // Two rows, f32 rows: not these kernels.
                let two = Tensor::cat(&[&residual, &residual], 0).unwrap();
                let head2 = NormHead {
                    residual: &two,
                    delta: &two,
                    ..head
                };
                assert!(matmul_group_norm_head(&[&ds[0]], &head2).unwrap().is_none());
                let (r32, d32, w32) = (
                    residual.to_dtype(DType::F32).unwrap(),
                    delta.to_dtype(DType::F32).unwrap(),
                    weight.to_dtype(DType::F32).unwrap(),
                );
                let head32 = NormHead {
                    residual: &r32,
                    delta: &d32,
                    weight: &w32,
                    eps,
                };
                assert!(matmul_group_norm_head(&[&ds[0]], &head32)
                    .unwrap()
                    .is_none());
            }
        }
        for f in ["hqq-4bit", "gptq-4bit", "awq-4bit", "hqq-4bit n=4600"] {
            assert!(headed.iter().any(|s| s == f), "{f} not headed");
        }
        assert!(!headed.iter().any(|s| s.starts_with("nf4") || s == "fp4"));
    }

    /// The tiled tensor-core kernel on every format it serves (4-, 8- and 3-bit codes in groups of
    /// a multiple of 32, 2-bit in groups of a multiple of 16) at the row counts around its tile
    /// edges (8, 16, 32, 64, 128 rows per block), and `Auto` there.
    #[test]
    fn tiled_kernel_matches_the_cpu_decoder() {
        let Some(dev) = gpu() else { return };
        let failures = check_formats_served(
            &dev,
            300,
            &[1, 2, 8, 9, 16, 17, 33, 64, 100, 128],
            QPath::MmaTiled,
            qmma_tiled::supports,
            &[
                "nf4",
                "fp4",
                "hqq-4bit",
                "gptq-4bit",
                "gptq-4bit-act-order",
                "awq-4bit",
                "int8",
                "eetq",
                "gptq-8bit",
                "hqq-3bit",
                "gptq-3bit",
                "hqq-2bit",
            ],
        );
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// Edges the formats' own quantizers do not reach: K not a multiple of the 128-wide step,
    /// groups of 32 and of 96 (spanning steps), N not a multiple of the 128-row block, fractional
    /// zeros, a long K split over many blocks, a wide weight (the block shapes of N >= 8192);
    /// 4-bit affine and table codes, 8-, 3- and 2-bit affine codes (zeros across their whole
    /// range), and 2-bit groups of 16 (two groups in one 32-code chunk).
    #[test]
    fn tiled_kernel_edge_shapes() {
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let nf4: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 7.5).collect();
        let mut failures = Vec::new();
        for (i, &(n, k, group)) in [
            (37usize, 160usize, 32usize),
            (200, 288, 96),
            (130, 4096, 128),
            (8, 32, 32),
            (8200, 256, 128),
            (4100, 1024, 64),
            (8200, 2048, 128),
            (72, 288, 16),
            (4100, 1024, 16),
        ]
        .iter()
        .enumerate()
        {
            let seed = 500 + i as u64;
            let (scales, zeros, codes) = edge_inputs(n, k, group, seed);
            // Zeros around the middle of each code range: 7.5 +- 2 for 4 bits, scaled to the others.
            let zeros_for = |bits: u32| -> Vec<f32> {
                let half = ((1u32 << bits) as f32 - 1.0) / 2.0;
                zeros
                    .iter()
                    .map(|z| half + (z - 7.5) * half / 7.5 * 2.0)
                    .collect()
            };
            for (kname, kind, zs) in [
                ("affine", CodeKind::Affine { bits: 4 }, zeros.clone()),
                (
                    "table",
                    CodeKind::Table {
                        bits: 4,
                        lut: nf4.clone(),
                    },
                    Vec::new(),
                ),
                ("affine 8-bit", CodeKind::Affine { bits: 8 }, zeros_for(8)),
                ("affine 3-bit", CodeKind::Affine { bits: 3 }, zeros_for(3)),
                ("affine 2-bit", CodeKind::Affine { bits: 2 }, zeros_for(2)),
            ] {
                let bits = kind.bits();
                let levels = 1u32 << bits;
                let code = |r: usize, c: usize| ((codes[r * k + c].abs() * 1e4) as u32) % levels;
                let layout = GpuLayout::pack(
                    n,
                    k,
                    kind,
                    group,
                    scales.clone(),
                    zs,
                    ElementRounding::None,
                    None,
                    code,
                )
                .unwrap();
                let dl = DeviceLayout::upload(&layout, cdev).unwrap();
                // Groups of 16 are 2-bit only.
                if group % 32 != 0 && bits != 2 {
                    assert!(!qmma_tiled::supports(&dl), "{kname} group {group}");
                    continue;
                }
                assert!(qmma_tiled::supports(&dl), "{kname} group {group}");
                failures.extend(check_rows(
                    &dev,
                    &format!("{kname} group {group}"),
                    &layout,
                    &dl,
                    &[1, 2, 7, 12, 17, 64, 65, 130],
                    &[QPath::MmaTiled],
                ));
                if n >= 8192 {
                    // Two wide weights in one launch (the staged kernels, grouped): each output
                    // equals the weight alone through the kernel the group takes (`group_path`:
                    // on Hopper large 4-bit groups take the wgmma kernel from 33 rows, whose K
                    // schedule differs from the tiled kernel's, and whose one launch for the
                    // group may split its tiles otherwise than one weight's launch: f32 sums in
                    // another order, within 1e-3; past 64 rows only groups of 32 Mi codes or
                    // more are one launch, and not with 2-bit codes, whose grouped 128-row
                    // kernel spills).
                    for m in [40usize, 64, 100, 128] {
                        let Some(alone_path) = group_path(&[&dl, &dl], m, DType::BF16, cdev) else {
                            continue;
                        };
                        let x = Tensor::from_vec(randn(seed + m as u64, m * k, 1.0), (m, k), &dev)
                            .unwrap()
                            .to_dtype(DType::BF16)
                            .unwrap();
                        let alone = matmul(&dl, &x, alone_path).unwrap();
                        let ys = matmul_group(&[&dl, &dl], &x).unwrap().expect("grouped");
                        for y in &ys {
                            let e = rel_l2(
                                &y.to_device(&Device::Cpu).unwrap(),
                                &alone.to_device(&Device::Cpu).unwrap(),
                            );
                            if e.is_nan() || e > 1e-3 {
                                failures.push(format!(
                                    "{kname} {n}x{k} m={m} grouped: rel {e:.2e} against alone"
                                ));
                            }
                        }
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// The folded scales (affine 4-bit codes in groups of a multiple of 128: the mma on raw codes,
    /// each step's sums scaled after it) against the CPU decoder, to about the output's own
    /// rounding, and at least as close as the per-weight scaled decode: every block shape they
    /// run in (up to 8 rows c1 alone and split over K, c4 wide and on long K; 9-16 rows c1
    /// alone, c1 / c2 in a grouped launch), fractional and integer zeros, groups of 128 and 256,
    /// bf16 and f16.
    #[test]
    fn folded_scales_match_the_cpu_decoder() {
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let mut failures = Vec::new();
        let mut report = Vec::new();
        for (i, &(n, k, group, integer_zeros)) in [
            (130usize, 4096usize, 128usize, false),
            (1032, 512, 128, true),
            (8200, 1024, 256, false),
            (1024, 8192, 128, true),
            (4096, 1024, 128, false),
            (6000, 512, 128, false),
        ]
        .iter()
        .enumerate()
        {
            let seed = 900 + i as u64;
            let (scales, zeros, codes) = edge_inputs(n, k, group, seed);
            let zeros = if integer_zeros {
                zeros.iter().map(|z| z.round()).collect()
            } else {
                zeros
            };
            let layout = pack_4bit(
                (n, k, group),
                CodeKind::Affine { bits: 4 },
                scales,
                zeros,
                &codes,
            );
            let dl = DeviceLayout::upload(&layout, cdev).unwrap();
            let w_ref = Tensor::from_vec(layout.dequantize_f32(), (n, k), &Device::Cpu).unwrap();
            for m in [1usize, 2, 5, 8, 9, 12, 16] {
                // Alone up to 8 rows always; 9-16 rows where the block is c1 (6000 rows).
                let alone = qmma_tiled::folds(&dl, m);
                assert_eq!(alone, m <= 8 || n == 6000, "{n}x{k} group {group} m={m}");
                // About the outputs' own rounding (H200: 1.5-1.8e-3 in bf16, 2.0-2.2e-4 in f16);
                // the per-weight scaled decode, rounding each weight to 16 bits first, is at
                // 2.7-3.0e-3 / 3.2-3.9e-4 and would fail these.
                for (dtype, tol) in [(DType::BF16, 2.2e-3), (DType::F16, 2.8e-4)] {
                    let values = randn(seed + m as u64, m * k, 1.0);
                    let (xg, want) = input_and_want(&dev, values, (m, k), dtype, &w_ref);
                    let err = |path: QPath| {
                        let got = matmul(&dl, &xg, path).unwrap();
                        assert_eq!(got.dims(), &[m, n]);
                        rel_l2(&got, &want)
                    };
                    let (folded, per_weight) =
                        (err(QPath::MmaTiled), err(QPath::MmaTiledPerWeight));
                    report.push(format!(
                        "{n}x{k} g{group} m={m} {dtype:?}: folded {folded:.2e}, per weight {per_weight:.2e}"
                    ));
                    if alone && (folded.is_nan() || folded > tol || folded > 1.25 * per_weight) {
                        failures.push(format!(
                            "{n}x{k} group {group} m={m} {dtype:?}: folded rel err {folded:.2e} (tolerance {tol:.0e}; per weight {per_weight:.2e})"
                        ));
                    }
                    // A grouped launch (q/k/v-style: three weights of this format sharing x;
                    // from 3 rows, below that `Auto` takes the half2 GEMV).
                    if dtype == DType::BF16 && n <= 4096 && m >= 3 {
                        let ys = matmul_group(&[&dl, &dl, &dl], &xg)
                            .unwrap()
                            .expect("grouped");
                        for y in &ys {
                            let e = rel_l2(y, &want);
                            if e.is_nan() || e > tol {
                                failures.push(format!(
                                    "{n}x{k} group {group} m={m} grouped: rel err {e:.2e} > {tol:.0e}"
                                ));
                            }
                        }
                    }
                }
            }
        }
        eprintln!("{}", report.join("\n"));
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// The wgmma kernel (Hopper) on every 4-bit format (affine and table codes, act-order) at the
    /// row counts around its blocks of 64 and 128 activation rows, and `Auto` there; edge shapes
    /// (K not a multiple of the 128-wide step, groups of 32 and 96, N not a multiple of the 128-row
    /// block, a long K split over blocks, fractional zeros); a grouped call (one activation pass,
    /// one launch per weight) bitwise equal to each weight alone.
    #[test]
    fn wgmma_kernel_matches_the_cpu_decoder() {
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let probe = DeviceLayout::upload(
            &GpuLayout::pack(
                8,
                32,
                CodeKind::Affine { bits: 4 },
                32,
                vec![1.0; 8],
                vec![0.0; 8],
                ElementRounding::None,
                None,
                |_, _| 0,
            )
            .unwrap(),
            cdev,
        )
        .unwrap();
        if !qwgmma::supports(&probe, cdev) {
            eprintln!("SKIPPED: the wgmma kernel needs a GPU of compute capability 9.0");
            return;
        }
        let mut failures = check_formats_served(
            &dev,
            700,
            &[17, 32, 33, 40, 64, 65, 100, 128, 130, 256, 300],
            QPath::Wgmma,
            |dl| qwgmma::supports(dl, cdev),
            &[
                "nf4",
                "fp4",
                "hqq-4bit",
                "gptq-4bit",
                "gptq-4bit-act-order",
                "awq-4bit",
            ],
        );
        let nf4: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 7.5).collect();
        for (i, &(n, k, group)) in [
            (37usize, 160usize, 32usize),
            (200, 288, 96),
            (130, 4096, 128),
            (4100, 1024, 64),
            (8200, 2048, 128),
            (300, 14336, 128),
        ]
        .iter()
        .enumerate()
        {
            let seed = 800 + i as u64;
            let (scales, zeros, codes) = edge_inputs(n, k, group, seed);
            for (kname, kind, zs) in [
                ("affine", CodeKind::Affine { bits: 4 }, zeros.clone()),
                (
                    "table",
                    CodeKind::Table {
                        bits: 4,
                        lut: nf4.clone(),
                    },
                    Vec::new(),
                ),
            ] {
                let layout = pack_4bit((n, k, group), kind, scales.clone(), zs, &codes);
                let dl = DeviceLayout::upload(&layout, cdev).unwrap();
                assert!(qwgmma::supports(&dl, cdev), "{kname} group {group}");
                failures.extend(check_rows(
                    &dev,
                    &format!("{kname} group {group}"),
                    &layout,
                    &dl,
                    &[33, 64, 65, 130],
                    &[QPath::Wgmma],
                ));
                // Groups of 32 Mi codes take the wgmma kernel at 17-256 rows.
                for m in [20usize, 40, 100] {
                    if 2 * n * k < 1 << 25 {
                        continue;
                    }
                    let x = Tensor::from_vec(randn(seed + m as u64, m * k, 1.0), (m, k), &dev)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap();
                    let alone = matmul(&dl, &x, QPath::Wgmma).unwrap();
                    let ys = matmul_group(&[&dl, &dl], &x).unwrap().expect("grouped");
                    {
                        for y in &ys {
                            let e = rel_l2(
                                &y.to_device(&Device::Cpu).unwrap(),
                                &alone.to_device(&Device::Cpu).unwrap(),
                            );
                            // One launch for both: its tiles may be split otherwise than
                            // one weight's (the order of the f32 sums).
                            if e.is_nan() || e > 1e-3 {
                                failures.push(format!(
                                    "{kname} {n}x{k} m={m} grouped: rel {e:.2e} against alone"
                                ));
                            }
                        }
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// A seeded `[n, k]` 4-bit weight in groups of `group` (affine codes, or NF4 table codes)
    /// uploaded in the packed layout.
    fn random_4bit(
        cdev: &candle_core::CudaDevice,
        (n, k, group): (usize, usize, usize),
        table: bool,
        seed: u64,
    ) -> DeviceLayout {
        let (scales, zeros, codes) = edge_inputs(n, k, group, seed);
        let (kind, zeros) = if table {
            let nf4 = (0..16).map(|i| (i as f32 - 7.5) / 7.5).collect();
            (CodeKind::Table { bits: 4, lut: nf4 }, Vec::new())
        } else {
            (CodeKind::Affine { bits: 4 }, zeros)
        };
        DeviceLayout::upload(&pack_4bit((n, k, group), kind, scales, zeros, &codes), cdev).unwrap()
    }

    /// Seeded values `codes` (`edge_inputs`) as the 4-bit codes of an `[n, k]` packed layout.
    fn pack_4bit(
        (n, k, group): (usize, usize, usize),
        kind: CodeKind,
        scales: Vec<f32>,
        zeros: Vec<f32>,
        codes: &[f32],
    ) -> GpuLayout {
        let code = |r: usize, c: usize| ((codes[r * k + c].abs() * 1e4) as u32) % 16;
        GpuLayout::pack(
            n,
            k,
            kind,
            group,
            scales,
            zeros,
            ElementRounding::None,
            None,
            code,
        )
        .unwrap()
    }

    /// Notes in `failures` where `got` is not `want` bit for bit.
    fn identical(failures: &mut Vec<String>, what: String, got: &Tensor, want: &Tensor) {
        let host = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        let d = max_abs_diff(&host(got), &host(want));
        if d.is_nan() || d != 0.0 {
            failures.push(format!("{what}: max |diff| {d}"));
        }
    }

    /// The wgmma kernel's launch variants give the same bits, alone and in a group of two weights:
    /// the serial launches with split tiles summed through L2 (stream-K); the dependent launches
    /// (each kernel starts its weight loads while the activation permute or the group's weight
    /// before it still runs), eagerly and replayed from a CUDA graph (programmatic edges); and
    /// the default, split tiles summed in thread-block clusters where they fit (the same splits,
    /// added in the same order). `wgmma_kernel_matches_the_cpu_decoder` checks the default
    /// against the CPU decoder on every format.
    #[test]
    fn wgmma_launch_variants_equal_bit_for_bit() {
        use lorq_quant::cuda::dependent_launch;
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let mut failures = Vec::new();
        // (n, k, m, group, NF4 codes, f16): 8 tiles of 32 steps at 100 and 128 rows (clusters
        // of 8), 16 of 8 steps at 40 rows (n64 blocks, clusters of 8), 80 whole tiles at 130
        // rows, 40 tiles at 64 rows shared 3 steps a block (stream-K, no cluster schedule).
        for (i, &(n, k, m, group, table, half)) in [
            (1024usize, 4096usize, 100usize, 64usize, true, true),
            (1024, 4096, 128, 128, false, false),
            (2048, 1024, 40, 64, true, false),
            (5120, 512, 130, 128, false, false),
            (5120, 1024, 64, 128, false, true),
        ]
        .iter()
        .enumerate()
        {
            let seed = 1200 + 10 * i as u64;
            let ws: Vec<DeviceLayout> = (0..2)
                .map(|j| random_4bit(cdev, (n, k, group), table, seed + 3 * j))
                .collect();
            if !qwgmma::supports(&ws[0], cdev) {
                eprintln!("SKIPPED: the wgmma kernel needs a GPU of compute capability 9.0");
                return;
            }
            let dtype = if half { DType::F16 } else { DType::BF16 };
            let x = Tensor::from_vec(randn(seed + 9, m * k, 1.0), (m, k), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let refs: Vec<&DeviceLayout> = ws.iter().collect();
            let run = || {
                let mut ys = vec![matmul(&ws[0], &x, QPath::Wgmma)?];
                ys.extend(qwgmma::matmul_group(cdev, &refs, &x, m)?);
                Ok::<_, lorq_quant::QuantError>(ys)
            };
            qwgmma::set_cluster_sums(false);
            dependent_launch::set_enabled(false);
            let serial = run().unwrap();
            dependent_launch::set_enabled(true);
            let made = dependent_launch::launches_made();
            let dependent = run().unwrap();
            if dependent_launch::launches_made() <= made {
                failures.push(format!("{n}x{k} m={m}: no dependent launch was made"));
            }
            let (graph, replayed) = lorq_quant::cuda::graph::capture(cdev, run).unwrap();
            graph.replay().unwrap();
            qwgmma::set_cluster_sums(true);
            let clustered = run().unwrap();
            for (j, want) in serial.iter().enumerate() {
                let what = |how| format!("{n}x{k} m={m} output {j} {how} against serial stream-K");
                identical(&mut failures, what("dependent"), &dependent[j], want);
                identical(&mut failures, what("replayed"), &replayed[j], want);
                identical(&mut failures, what("cluster sums"), &clustered[j], want);
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    /// Weights sharing x in one launch of the wgmma kernel, their tiles end to end (whole tiles,
    /// stream-K segments across the weights' boundaries, tiles split in clusters; outputs not a
    /// multiple of 4 or 128): every output equals that weight's own launch (bf16/f16 within
    /// 1e-2: only the split of the tiles, hence the order of the f32 sums, may differ), and the
    /// group is one launch while grouped launches are on, one per weight when they are off, the
    /// weights' groups differ or each weight fills more than half the SMs alone.
    #[test]
    fn wgmma_group_in_one_launch_equals_each_weight_alone() {
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let mut failures = Vec::new();
        let mut worst = 0f64;
        // (output rows of each weight, k, group, NF4 codes, f16, row counts)
        for (i, (ns, k, group, table, half, ms)) in [
            (
                vec![4096usize, 1024, 1024],
                4096usize,
                128usize,
                false,
                false,
                vec![33usize, 64, 128, 256],
            ),
            (
                vec![520, 130, 136],
                1024,
                64,
                true,
                false,
                vec![17, 40, 100, 130],
            ),
            (vec![2048, 2048], 2048, 128, false, true, vec![20, 64, 128]),
            (vec![384, 256, 256], 4096, 128, true, true, vec![64, 128]),
        ]
        .into_iter()
        .enumerate()
        {
            let ws: Vec<DeviceLayout> = ns
                .iter()
                .enumerate()
                .map(|(j, &n)| {
                    random_4bit(cdev, (n, k, group), table, 1300 + 10 * i as u64 + j as u64)
                })
                .collect();
            if !qwgmma::supports(&ws[0], cdev) {
                eprintln!("SKIPPED: the wgmma kernel needs a GPU of compute capability 9.0");
                return;
            }
            let refs: Vec<&DeviceLayout> = ws.iter().collect();
            let dtype = if half { DType::F16 } else { DType::BF16 };
            for m in ms {
                let x = Tensor::from_vec(randn(1400 + m as u64, m * k, 1.0), (m, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                assert_eq!(
                    qwgmma::launch_groups(cdev, &refs, m).len(),
                    1,
                    "{ns:?} m={m}: one launch"
                );
                let ys = qwgmma::matmul_group(cdev, &refs, &x, m).unwrap();
                qwgmma::set_grouped_launches(false);
                assert_eq!(qwgmma::launch_groups(cdev, &refs, m).len(), ns.len());
                let apart = qwgmma::matmul_group(cdev, &refs, &x, m).unwrap();
                qwgmma::set_grouped_launches(true);
                for (j, w) in ws.iter().enumerate() {
                    let alone = matmul(w, &x, QPath::Wgmma).unwrap();
                    for (what, y) in [("group", &ys[j]), ("launches apart", &apart[j])] {
                        assert_eq!(y.dims(), alone.dims());
                        let e = rel_l2(
                            &y.to_device(&Device::Cpu).unwrap(),
                            &alone.to_device(&Device::Cpu).unwrap(),
                        );
                        worst = worst.max(e);
                        if e.is_nan() || e > 1e-2 {
                            failures.push(format!(
                                "{ns:?}x{k} m={m} output {j} ({what}): rel {e:.2e} against alone"
                            ));
                        }
                    }
                }
            }
        }
        // Weights of other group sizes: one launch each, each still right.
        let (a, b) = (
            random_4bit(cdev, (256, 1024, 128), false, 1390),
            random_4bit(cdev, (256, 1024, 64), false, 1391),
        );
        assert_eq!(qwgmma::launch_groups(cdev, &[&a, &b], 64).len(), 2);
        // Weights that each fill more than half the SMs alone (gate/up-sized): one launch each.
        let wide = random_4bit(cdev, (16384, 512, 128), false, 1393);
        assert_eq!(qwgmma::launch_groups(cdev, &[&wide, &wide], 64).len(), 2);
        let x = Tensor::from_vec(randn(1392, 64 * 1024, 1.0), (64, 1024), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let ys = qwgmma::matmul_group(cdev, &[&a, &b], &x, 64).unwrap();
        for (j, w) in [&a, &b].into_iter().enumerate() {
            identical(
                &mut failures,
                format!("mixed groups output {j}"),
                &ys[j],
                &matmul(w, &x, QPath::Wgmma).unwrap(),
            );
        }
        eprintln!("wgmma groups: worst rel L2 against each weight alone {worst:.2e}");
        assert!(failures.is_empty(), "{failures:#?}");
    }

    /// Act-order weights of one column order (a GPTQ checkpoint's q/k/v or gate/up, quantized on
    /// one input's Hessian, share theirs) share a launch, x's columns gathered once: every output
    /// equals the weight's own product (bf16 within 1e-2: only the launch, hence the order of the
    /// f32 sums, may differ) at 1-128 rows — the GEMV, the tiled kernel and, on Hopper, the wgmma
    /// kernel — while weights of another column order are refused, and the one-row kernel that
    /// reads x as the norm leaves it (the norm head) refuses act-order weights.
    #[test]
    fn act_order_weights_of_one_column_order_share_a_launch() {
        use lorq_quant::cuda::fused_ops::NormHead;
        use lorq_quant::cuda::qgemv::matmul_group_norm_head;
        use lorq_quant::gptq::quantize::{rtn_gptq, GptqParams};
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let k = 4096;
        let order = |seed: u64| {
            let r = randn(seed, k, 1.0);
            let mut perm: Vec<u32> = (0..k as u32).collect();
            perm.sort_by(|&a, &b| r[a as usize].total_cmp(&r[b as usize]));
            perm
        };
        // GPTQ codes (round to nearest: the kernels do not care how they were chosen) whose
        // columns are visited in `perm`'s order.
        let act_order = |n: usize, seed: u64, perm: &[u32]| {
            let p = GptqParams {
                bits: 4,
                ..GptqParams::default()
            };
            let t = rtn_gptq(&randn(seed, n * k, 0.02), n, k, &p, "test").unwrap();
            let mut l = t.gpu_layout().unwrap();
            l.perm = Some(perm.to_vec());
            DeviceLayout::upload(&l, cdev).unwrap()
        };
        let perm = order(1500);
        // q/k/v-like: 16.8 Mi codes together (the wgmma kernel's groups on Hopper from 17 rows).
        let ws: Vec<DeviceLayout> = [(3072usize, 1501u64), (512, 1502), (512, 1503)]
            .iter()
            .map(|&(n, seed)| act_order(n, seed, &perm))
            .collect();
        let refs: Vec<&DeviceLayout> = ws.iter().collect();
        let mut failures = Vec::new();
        for m in [1usize, 2, 5, 16, 24, 40, 64, 128] {
            let x = Tensor::from_vec(randn(1510 + m as u64, m * k, 1.0), (m, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let Some(ys) = matmul_group(&refs, &x).unwrap() else {
                failures.push(format!("m={m}: not one launch"));
                continue;
            };
            for (j, w) in ws.iter().enumerate() {
                let alone = matmul(w, &x, QPath::Auto).unwrap();
                let e = rel_l2(
                    &ys[j].to_device(&Device::Cpu).unwrap(),
                    &alone.to_device(&Device::Cpu).unwrap(),
                );
                if e.is_nan() || e > 1e-2 {
                    failures.push(format!("m={m} output {j}: rel {e:.2e} against alone"));
                }
            }
        }
        // Another column order: never one launch.
        let other = act_order(512, 1504, &order(1505));
        let x = Tensor::from_vec(randn(1506, 24 * k, 1.0), (24, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert!(matmul_group(&[&ws[1], &other], &x).unwrap().is_none());
        // The norm head reads x as the norm leaves it: not for act-order weights.
        let row = |seed: u64| {
            Tensor::from_vec(randn(seed, k, 1.0), (1, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let (residual, delta, weight) = (row(1507), row(1508), row(1509).reshape(k).unwrap());
        let head = NormHead {
            residual: &residual,
            delta: &delta,
            weight: &weight,
            eps: 1e-5,
        };
        assert!(matmul_group_norm_head(&refs, &head).unwrap().is_none());
        assert!(failures.is_empty(), "{failures:#?}");
    }

    /// Act-order weights gather x's columns (and dequantize + cuBLAS the weight's) on the GPU:
    /// every path of such a weight, captured in a CUDA graph and replayed, equals the same call
    /// run eagerly, bit for bit (candle's `index_select`, used before, uploaded its layout from
    /// the host during the capture: the replay read freed host memory).
    #[test]
    fn act_order_paths_replay_from_a_cuda_graph() {
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let (n, k) = (256usize, 512usize);
        let (_, t) = every_format(n, k, 900)
            .into_iter()
            .find(|(name, _)| name == "gptq-4bit-act-order")
            .expect("the act-order format");
        let layout = t.gpu_layout().unwrap();
        assert!(
            layout.perm.is_some(),
            "an act-order layout has a column order"
        );
        let dl = DeviceLayout::upload(&layout, cdev).unwrap();
        let mut failures = Vec::new();
        for m in [1usize, 16, 64, 128] {
            let x = Tensor::from_vec(randn(910 + m as u64, m * k, 1.0), (m, k), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
                .to_device(&dev)
                .unwrap();
            let mut paths = vec![QPath::Auto, QPath::Dequantize];
            if qmma_tiled::supports(&dl) {
                paths.push(QPath::MmaTiled);
            }
            if m >= 2 && qwgmma::supports(&dl, cdev) {
                paths.push(QPath::Wgmma);
            }
            for path in paths {
                let eager = matmul(&dl, &x, path)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap();
                let (graph, y) =
                    match lorq_quant::cuda::graph::capture(cdev, || matmul(&dl, &x, path)) {
                        Ok(captured) => captured,
                        Err(e) => {
                            failures.push(format!("{path:?} m={m}: capture failed: {e}"));
                            continue;
                        }
                    };
                graph.replay().unwrap();
                let replayed = y.to_device(&Device::Cpu).unwrap();
                let d = max_abs_diff(&replayed, &eager);
                if d.is_nan() || d != 0.0 {
                    failures.push(format!(
                        "{path:?} m={m}: replay differs from the eager call (max |diff| {d})"
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    /// q/k/v- and gate/up-style groups (2 and 3 weights of different row counts sharing x) in one
    /// launch (the GEMV, and the tiled kernel for 4-bit weights at 2-64 rows): every output equals
    /// that weight's own matmul (f32 within 1e-5, bf16/f16 within 1e-2: only the launch shape,
    /// hence the order of the f32 sums, may differ), for every format with a packed layout;
    /// weights that cannot share a kernel are refused.
    #[test]
    fn grouped_launch_equals_each_weight_alone() {
        let Some(dev) = gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let k = 512;
        let sets: Vec<_> = [(136usize, 7u64), (40, 8), (72, 9)]
            .iter()
            .map(|&(n, seed)| every_format(n, k, seed))
            .collect();
        let mut failures = Vec::new();
        let mut grouped = 0;
        for (i, (name, a)) in sets[0].iter().enumerate() {
            let (b, c) = (&sets[1][i].1, &sets[2][i].1);
            for (dtype, ms, tol) in [
                (DType::F32, &[1usize, 2, 5][..], 1e-5),
                // 2-64 rows: 4-bit weights take the tiled kernel (activation blocks of 8, 16, 32,
                // 64 rows).
                (DType::BF16, &[1, 2, 17, 40][..], 1e-2),
                (DType::F16, &[1, 9][..], 1e-2),
            ] {
                for &m in ms {
                    let x = Tensor::from_vec(randn(m as u64, m * k, 1.0), (m, k), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    for ws in [vec![&**a, &**b, &**c], vec![&**b, &**a]] {
                        let ys = lorq_quant::matmul_group(&ws, &x).unwrap();
                        assert_eq!(ys.len(), ws.len());
                        for (j, (w, y)) in ws.iter().zip(&ys).enumerate() {
                            let want = w.matmul(&x).unwrap();
                            assert_eq!(y.dims(), want.dims(), "{name}: output {j} shape");
                            let e = rel_l2(
                                &y.to_device(&Device::Cpu).unwrap(),
                                &want.to_device(&Device::Cpu).unwrap(),
                            );
                            if e.is_nan() || e > tol {
                                failures.push(format!(
                                    "{name} {dtype:?} m={m} group of {} output {j}: rel {e:.2e} > {tol:.0e}",
                                    ws.len()
                                ));
                            }
                        }
                    }
                }
            }
            // The layouts themselves: one launch where they share a kernel.
            let layouts: Vec<GpuLayout> = [a, b, c]
                .iter()
                .filter_map(|t| t.gpu_layout().ok())
                .collect();
            if layouts.len() == 3 && layouts.iter().all(|l| l.perm.is_none()) {
                let dls: Vec<DeviceLayout> = layouts
                    .iter()
                    .map(|l| DeviceLayout::upload(l, cdev).unwrap())
                    .collect();
                let refs: Vec<&DeviceLayout> = dls.iter().collect();
                let x = Tensor::from_vec(randn(3, k, 1.0), (1, k), &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                let ys = matmul_group(&refs, &x).unwrap();
                assert!(
                    ys.is_some(),
                    "{name}: three weights of one format were not grouped"
                );
                grouped += 1;
                if qmma_tiled::supports(&dls[0]) {
                    let x = Tensor::from_vec(randn(4, 24 * k, 1.0), (24, k), &dev)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap();
                    assert!(
                        matmul_group(&refs, &x).unwrap().is_some(),
                        "{name}: 24 rows through the tiled kernel were not grouped"
                    );
                }
            }
        }
        assert!(grouped >= 8, "only {grouped} formats grouped");
        // NF4 and FP4 are both 4-bit tables but not the same one: never one launch.
        let nf4 = sets[0]
            .iter()
            .find(|(n, _)| n == "nf4")
            .unwrap()
            .1
            .gpu_layout()
            .unwrap();
        let fp4 = sets[1]
            .iter()
            .find(|(n, _)| n == "fp4")
            .unwrap()
            .1
            .gpu_layout()
            .unwrap();
        let (dn, df) = (
            DeviceLayout::upload(&nf4, cdev).unwrap(),
            DeviceLayout::upload(&fp4, cdev).unwrap(),
        );
        let x = Tensor::zeros((1, k), DType::BF16, &dev).unwrap();
        assert!(matmul_group(&[&dn, &df], &x).unwrap().is_none());
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
