//! The GPU kernels against their CPU reference (lorq's CPU kernels) on fresh random inputs:
//! relative L2 error <= 1e-5 with f32 activations, <= 1e-2 with bf16/f16 ones, never NaN.
//! Built and run on a GPU machine with `scripts/build-cuda.sh --tests` + `scripts/gpu-run.sh`;
//! in a CPU build, or where no GPU is found, each test prints why it is skipped.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_kernels_skipped_without_the_cuda_feature() {
    eprintln!(
        "SKIPPED: lorq-quant was built without the `cuda` feature; the GPU tests run with \
         scripts/build-cuda.sh --tests on a GPU machine"
    );
}

#[cfg(feature = "cuda")]
#[path = "common/formats.rs"]
#[allow(dead_code)] // `every_format` serves the other tests
mod formats;

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Shape, Tensor};
    use lorq_quant::bnb4::{Bnb4Tensor, Bnb4Type};
    use lorq_quant::cuda::bnb4::{dequantize, matmul, Bnb4Path};
    use lorq_quant::QuantTensor;

    use super::formats::{max_abs_diff, rel_l2};

    /// N(mean, std²) values of `shape` drawn on `dev`, in `dtype`.
    fn randn_as(
        mean: f32,
        std: f32,
        shape: impl Into<Shape>,
        dtype: DType,
        dev: &Device,
    ) -> Tensor {
        Tensor::randn(mean, std, shape, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn gpu() -> Option<Device> {
        lorq_quant::cuda::usable_gpu(0)
            .map_err(|why| eprintln!("SKIPPED: {why}"))
            .ok()
    }

    /// The dense GEMV (one row, bf16 and f16, an odd N, 3-D activations) against the f32
    /// product of the same values; it declines what it does not take (2 rows, in % 8 != 0, f32)
    /// and `DenseTensor::matmul` gives the same product through it and through cuBLAS.
    #[test]
    fn dense_gemv_group_equals_each_weight_alone() {
        use lorq_quant::cuda::dense_gemv::{gemv, gemv_group};
        let Some(dev) = gpu() else { return };
        let k = 1024;
        for dtype in [DType::BF16, DType::F16] {
            let ws: Vec<Tensor> = [512usize, 128, 136]
                .iter()
                .map(|&n| randn_as(0f32, 0.05, (n, k), dtype, &dev))
                .collect();
            let x = randn_as(0f32, 1.0, (1, k), dtype, &dev);
            for group in [vec![&ws[0], &ws[1], &ws[2]], vec![&ws[2], &ws[0]]] {
                let ys = gemv_group(&x, &group)
                    .unwrap()
                    .expect("one row, same dtype and in");
                for (w, y) in group.iter().zip(&ys) {
                    let alone = gemv(&x, w).unwrap().unwrap();
                    // The same per-row work in either launch: bit-identical.
                    let (a, b): (Vec<f32>, Vec<f32>) = (
                        y.to_dtype(DType::F32)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap(),
                        alone
                            .to_dtype(DType::F32)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap(),
                    );
                    assert_eq!(a, b, "grouped dense gemv {dtype:?} differs from alone");
                }
            }
            // Different in_features: refused.
            let other = Tensor::zeros((8, 512), dtype, &dev).unwrap();
            assert!(gemv_group(&x, &[&ws[0], &other]).unwrap().is_none());
        }
    }

    /// The MLP's gate and up projections with SiLU·mul in one launch equal the two GEMVs followed
    /// by the fused activation kernel, bit for bit (same sums, same roundings).
    #[test]
    fn dense_silu_mul_gemv_matches_two_gemvs_and_silu_mul() {
        use lorq_quant::cuda::dense_gemv::{gemv, silu_mul_gemv};
        use lorq_quant::cuda::fused_ops::silu_mul;
        let Some(dev) = gpu() else { return };
        for &(n, k) in &[(1000usize, 4096usize), (37, 264), (8, 8)] {
            let g32 = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
            let u32_ = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
            for dtype in [DType::BF16, DType::F16] {
                let up_dev = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
                let (g, u) = (up_dev(&g32), up_dev(&u32_));
                let x = randn_as(0f32, 1.0, (1, k), dtype, &dev);
                let got = silu_mul_gemv(&x, &g, &u)
                    .unwrap()
                    .expect("one bf16/f16 row");
                let want = silu_mul(
                    &gemv(&x, &g).unwrap().unwrap(),
                    &gemv(&x, &u).unwrap().unwrap(),
                )
                .unwrap();
                assert_eq!(got.dims(), want.dims());
                let diff = max_abs_diff(&got, &want);
                assert_eq!(
                    diff, 0.0,
                    "silu_mul_gemv {dtype:?} [{n}, {k}] differs by {diff}"
                );
            }
        }
        // Gate and up of different shapes, or two rows: the caller's path.
        let g = randn_as(0f32, 1.0, (16, 64), DType::BF16, &dev);
        let u = randn_as(0f32, 1.0, (8, 64), DType::BF16, &dev);
        let x = randn_as(0f32, 1.0, (2, 64), DType::BF16, &dev);
        assert!(silu_mul_gemv(&x.narrow(0, 0, 1).unwrap(), &g, &u)
            .unwrap()
            .is_none());
        assert!(silu_mul_gemv(&x, &g, &g).unwrap().is_none());
    }

    /// The one-row dense GEMV with the residual add + RMSNorm as its last block's tail equals
    /// the GEMV followed by `add_rms_norm`, bit for bit (same sums, same roundings), bf16 and
    /// f16; the ticket is left at zero for the next launch; what the tail does not take (two
    /// rows, a residual of another size, every quantized format) is declined.
    #[test]
    fn gemv_norm_tail_matches_gemv_then_add_rms_norm() {
        use lorq_quant::cuda::fused_ops::{add_rms_norm, AddNorm};
        use lorq_quant::DenseTensor;
        let Some(dev) = gpu() else { return };
        let ticket = Tensor::zeros(1, DType::U32, &dev).unwrap();
        for &(n, k) in &[(4096usize, 1024usize), (1024, 4096), (136, 256)] {
            for dtype in [DType::BF16, DType::F16] {
                let w = randn_as(0f32, 0.05, (n, k), dtype, &dev);
                let q = DenseTensor::new(w).unwrap();
                let x = randn_as(0f32, 1.0, (1, k), dtype, &dev);
                let residual = randn_as(0f32, 1.0, (1, n), dtype, &dev);
                let weight = randn_as(1f32, 0.1, n, dtype, &dev);
                let tail = AddNorm {
                    residual: &residual,
                    weight: &weight,
                    eps: 1e-5,
                    ticket: &ticket,
                };
                let what = format!("dense {dtype:?} [{n}, {k}]");
                let (s, y) = lorq_quant::matmul_add_rms_norm(&q, &x, &tail)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{what}: no norm tail"));
                let (ws, wy) =
                    add_rms_norm(&residual, &q.matmul(&x).unwrap(), &weight, 1e-5).unwrap();
                assert_eq!((s.dims(), y.dims()), (ws.dims(), wy.dims()));
                for (name, got, want) in [("s", &s, &ws), ("y", &y, &wy)] {
                    let diff = max_abs_diff(got, want);
                    assert_eq!(diff, 0.0, "{what}: {name} differs by {diff}");
                }
                let t: Vec<u32> = ticket.to_vec1().unwrap();
                assert_eq!(t, [0], "{what}: the ticket is not back to zero");
                // Two rows, or a residual of another size: declined.
                let x2 = Tensor::cat(&[&x, &x], 0).unwrap();
                assert!(lorq_quant::matmul_add_rms_norm(&q, &x2, &tail)
                    .unwrap()
                    .is_none());
                let short = residual.narrow(1, 0, n - 8).unwrap();
                let bad = AddNorm {
                    residual: &short,
                    ..tail
                };
                assert!(lorq_quant::matmul_add_rms_norm(&q, &x, &bad)
                    .unwrap()
                    .is_none());
                // Quantized weights keep the norm's own launch.
                if dtype == DType::BF16 {
                    for (name, q) in super::formats::every_format(n, k, 7) {
                        assert!(
                            lorq_quant::matmul_add_rms_norm(&*q, &x, &tail)
                                .unwrap()
                                .is_none(),
                            "{name}: took the dense norm tail"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dense_gemv_matches_f32_product() {
        use lorq_quant::cuda::dense_gemv::gemv;
        let Some(dev) = gpu() else { return };
        let f32_product = |x: &Tensor, w: &Tensor| {
            let x = x
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let w = w
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            x.broadcast_matmul(&w.t().unwrap()).unwrap()
        };
        for &(n, k) in &[(1000usize, 4096usize), (37, 264), (8, 8)] {
            let w32 = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
            for dtype in [DType::BF16, DType::F16] {
                let w = w32.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
                let x = randn_as(0f32, 1.0, (1, k), dtype, &dev);
                let got = gemv(&x, &w)
                    .unwrap()
                    .expect("takes bf16/f16 with in % 8 == 0");
                let e = rel_l2(&got, &f32_product(&x, &w));
                assert!(e <= 1e-2, "dense gemv {dtype:?} [{n}, {k}]: rel err {e}");
                let x3 = randn_as(0f32, 1.0, (1, 1, k), dtype, &dev);
                let got = gemv(&x3, &w).unwrap().expect("one row");
                assert_eq!(got.dims(), &[1, 1, n]);
                let e = rel_l2(&got, &f32_product(&x3, &w));
                assert!(e <= 1e-2, "dense gemv 3-D {dtype:?}: rel err {e}");
            }
            eprintln!("dense gemv [{n}, {k}]: bf16/f16 within 1e-2");
        }
        let w = Tensor::randn(0f32, 1.0, (16, 64), &dev).unwrap();
        let wb = w.to_dtype(DType::BF16).unwrap();
        let x9 = Tensor::randn(0f32, 1.0, (9, 64), &dev).unwrap();
        assert!(gemv(&x9.to_dtype(DType::BF16).unwrap(), &wb)
            .unwrap()
            .is_none());
        assert!(gemv(&x9.narrow(0, 0, 1).unwrap(), &w).unwrap().is_none());
        let odd = randn_as(0f32, 1.0, (16, 12), DType::BF16, &dev);
        let x12 = randn_as(0f32, 1.0, (1, 12), DType::BF16, &dev);
        assert!(gemv(&x12, &odd).unwrap().is_none());
        let dense = lorq_quant::DenseTensor::new(wb.clone()).unwrap();
        for m in [1, 2, 20] {
            let x = randn_as(0f32, 1.0, (m, 64), DType::BF16, &dev);
            let e = rel_l2(&dense.matmul(&x).unwrap(), &f32_product(&x, &wb));
            assert!(e <= 1e-2, "DenseTensor::matmul m={m}: rel err {e}");
        }
    }

    /// Fused GEMV (every row-group size and K split) and dequantize + cuBLAS, NF4/FP4, with and
    /// without double quantization, f32/bf16/f16 activations, against the CPU kernel.
    #[test]
    fn bnb4_matmul_matches_cpu() {
        let Some(dev) = gpu() else { return };
        for &(n, k) in &[
            (96usize, 128usize),
            (1024, 4096),
            (200, 2048),
            (64, 96),
            (40, 100),
        ] {
            let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
            for (ty, dq) in [
                (Bnb4Type::Nf4, false),
                (Bnb4Type::Nf4, true),
                (Bnb4Type::Fp4, true),
            ] {
                let q = Bnb4Tensor::quantize(&w, ty, dq).unwrap();
                for m in [1usize, 2, 3, 4, 5, 8, 13, 16, 40] {
                    for (dtype, tol) in
                        [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 1e-2)]
                    {
                        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap();
                        let want = q.matmul(&x.to_dtype(DType::F32).unwrap()).unwrap();
                        let xg = x.to_device(&dev).unwrap();
                        let mut paths = vec![Bnb4Path::Dequantize, Bnb4Path::Auto];
                        if k.is_multiple_of(32) {
                            paths.push(Bnb4Path::Fused);
                        }
                        for path in paths {
                            let got = matmul(&q, &xg, path).unwrap();
                            assert_eq!(got.dtype(), dtype);
                            assert_eq!(got.dims(), &[m, n]);
                            let e = rel_l2(&got.to_device(&Device::Cpu).unwrap(), &want);
                            // f32 through cuBLAS after dequantizing: the same bound.
                            assert!(
                                e <= tol,
                                "{} {n}x{k} m={m} {dtype:?} {path:?}: rel err {e:e} > {tol:e}",
                                q.format_name()
                            );
                        }
                    }
                }
                // The dequantized weight itself: exact in f32 but for double quantization, whose
                // absmax `code[q] * nested + offset` the GPU may contract into one FMA (1 ulp).
                let wd = dequantize(&q, dev.as_cuda_device().unwrap(), DType::F32).unwrap();
                let want = q.dequantize(DType::F32).unwrap();
                let e = rel_l2(&wd.to_device(&Device::Cpu).unwrap(), &want);
                assert!(
                    e <= if dq { 1e-7 } else { 0.0 },
                    "{} dequantize: rel err {e:e}",
                    q.format_name()
                );
            }
        }
    }

    /// A 3-D activation and one that starts at an offset take the same path to the same result.
    #[test]
    fn bnb4_handles_views() {
        let Some(dev) = gpu() else { return };
        let (n, k) = (64, 256);
        let q = Bnb4Tensor::quantize(
            &Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap(),
            Bnb4Type::Nf4,
            true,
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, k), &Device::Cpu).unwrap();
        let want = q.matmul(&x).unwrap();
        let got = q.matmul(&x.to_device(&dev).unwrap()).unwrap();
        assert_eq!(got.dims(), &[2, 3, n]);
        assert!(rel_l2(&got.to_device(&Device::Cpu).unwrap(), &want) <= 1e-5);
        let xs = x.to_device(&dev).unwrap().narrow(1, 1, 1).unwrap();
        let want = q.matmul(&x.narrow(1, 1, 1).unwrap()).unwrap();
        let got = q.matmul(&xs).unwrap();
        assert!(rel_l2(&got.to_device(&Device::Cpu).unwrap(), &want) <= 1e-5);
    }
}
