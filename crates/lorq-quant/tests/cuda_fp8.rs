//! The W8A8 FP8 path (`cuda::fp8_gemm`: activation quantization in `kernels/fp8_act.cu`, the
//! product through cuBLASLt or lorq's tensor-core kernel `kernels/fp8_mma.cu`) against CPU
//! references on fresh random inputs: identical e4m3 codes and scales for the activation
//! quantization; for the product, x quantized the same way on the
//! CPU and the decoded e4m3 values multiplied in f64, relative L2 error <= 1e-2 with bf16/f16
//! output and <= 1e-3 with f32 output (FP8 tensor cores accumulate below f32 precision), never
//! NaN. Built and run on a GPU machine with
//! `LORQ_CUDA_TESTS="-p lorq-quant --test cuda_fp8" scripts/build-cuda.sh --tests`; in a CPU build,
//! without a GPU, or on a GPU older than compute capability 8.9, each test prints why it is skipped.

#[cfg(not(feature = "cuda"))]
#[test]
fn fp8_gpu_tests_skipped_without_the_cuda_feature() {
    eprintln!(
        "SKIPPED: lorq-quant was built without the `cuda` feature; the FP8 GPU tests run with \
         scripts/build-cuda.sh --tests on a GPU machine with compute capability 8.9+"
    );
}

#[cfg(feature = "cuda")]
mod common;

#[cfg(feature = "cuda")]
#[path = "common/formats.rs"]
#[allow(dead_code)] // the other tests' helpers
mod formats;

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor};
    use lorq_quant::cuda::fp8_gemm::{
        gemm_quantized, has_fp8_tensor_cores, matmul_with, min_rows, quantize_activations,
        shares_packed_copy, ActQuant, Fp8Kernel, MIN_M, ONE_ROW_MIN_WEIGHTS,
    };
    use lorq_quant::cuda::{dependent_launch, fp8_gemm, fp8_wgmma, graph, qwgmma};
    use lorq_quant::fp8::{e4m3fn_to_f32, f32_to_e4m3fn, Fp8Strategy, Fp8Tensor, E4M3_MAX};
    use lorq_quant::QuantTensor;

    use super::common::f32s;
    use super::formats::max_abs_diff;

    /// The GPU, if there is one with FP8 tensor cores (else says why the test is skipped).
    fn fp8_gpu() -> Option<Device> {
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { candle_core::cuda_backend::cudarc::driver::sys::is_culib_present() } {
            eprintln!("SKIPPED: no NVIDIA driver (libcuda.so.1) on this machine");
            return None;
        }
        let dev = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("SKIPPED: no usable GPU: {e}");
                return None;
            }
        };
        match has_fp8_tensor_cores(dev.as_cuda_device().unwrap()) {
            Ok(true) => Some(dev),
            Ok(false) => {
                eprintln!("SKIPPED: this GPU has no FP8 tensor cores (compute capability < 8.9)");
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot read the GPU's compute capability: {e}");
                None
            }
        }
    }

    /// Seeded N(0, 1) values with a few rows made special: all zeros, tiny (subnormal e4m3
    /// codes) and large.
    fn activations(seed: u64, m: usize, k: usize) -> Vec<f32> {
        let mut v: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        // Tensor::randn is unseeded; mix the seed in so the special rows move between calls.
        let special = (seed as usize) % m.max(1);
        for (r, row) in v.chunks_mut(k).enumerate() {
            if m >= 3 && r == special {
                row.iter_mut().for_each(|x| *x = 0.0);
            } else if m >= 3 && r == (special + 1) % m {
                row.iter_mut().for_each(|x| *x *= 1e-3);
            } else if m >= 3 && r == (special + 2) % m {
                row.iter_mut().for_each(|x| *x *= 300.0);
            }
        }
        v
    }

    /// The values the GPU sees: rounded to `dtype`.
    fn as_dtype(v: &[f32], dtype: DType) -> Vec<f32> {
        v.iter()
            .map(|&x| match dtype {
                DType::BF16 => half::bf16::from_f32(x).to_f32(),
                DType::F16 => half::f16::from_f32(x).to_f32(),
                _ => x,
            })
            .collect()
    }

    /// The CPU reference of `fp8_act.cu`: scales (floored at 1 / (448 * 512) when dynamic) and
    /// codes `f32_to_e4m3fn(x / scale)`.
    fn ref_quant(x: &[f32], m: usize, k: usize, act: ActQuant) -> (Vec<u8>, Vec<f32>) {
        let floor = 1.0 / (448.0f32 * 512.0);
        let absmax = |s: &[f32]| s.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scales: Vec<f32> = match act {
            ActQuant::DynamicPerToken => x
                .chunks(k)
                .map(|r| (absmax(r) / E4M3_MAX).max(floor))
                .collect(),
            ActQuant::DynamicPerTensor => vec![(absmax(x) / E4M3_MAX).max(floor); m],
            ActQuant::Static(s) => vec![s; m],
        };
        let codes = x
            .chunks(k)
            .zip(&scales)
            .flat_map(|(r, &s)| r.iter().map(move |&v| f32_to_e4m3fn(v / s)))
            .collect();
        (codes, scales)
    }

    fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        assert!(got.iter().all(|v| v.is_finite()), "non-finite GPU output");
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(a, b)| (f64::from(*a) - b).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| b.powi(2)).sum();
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }

    /// Activation quantization: every code and every scale equal to the CPU reference, for
    /// f32/bf16/f16 inputs, per-token / per-tensor / static scales, aligned and misaligned rows.
    #[test]
    fn activation_quantization_matches_cpu() {
        let Some(dev) = fp8_gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let mut checked = 0;
        // (One block per row, and on compute capability 9.0 a cluster of blocks per row for
        // 1-8 rows of 8192+ values: [3, 14336], [8, 8200].)
        for (i, &(m, k)) in [
            (16usize, 4096usize),
            (17, 128),
            (1, 64),
            (5, 8),
            (33, 4104),
            (3, 14336),
            (8, 8200),
            (16, 8200),
            (300, 2048),
        ]
        .iter()
        .enumerate()
        {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let x = as_dtype(&activations(i as u64 + 3, m, k), dtype);
                let static_s = 0.7 * x.iter().fold(0f32, |a, v| a.max(v.abs())) / E4M3_MAX + 1e-3;
                for act in [
                    ActQuant::DynamicPerToken,
                    ActQuant::DynamicPerTensor,
                    // Saturates the largest values: the codes clamp to +-448.
                    ActQuant::Static(static_s),
                ] {
                    for misaligned in [false, true] {
                        let host = Tensor::from_vec(x.clone(), m * k, &Device::Cpu).unwrap();
                        let xt = if misaligned {
                            // Three elements in: the start is not 16-byte aligned.
                            Tensor::cat(
                                &[&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(), &host],
                                0,
                            )
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                            .to_device(&dev)
                            .unwrap()
                            .narrow(0, 3, m * k)
                            .unwrap()
                        } else {
                            host.to_dtype(dtype).unwrap().to_device(&dev).unwrap()
                        };
                        let xt = xt.reshape((m, k)).unwrap();
                        let q = quantize_activations(&xt, act).unwrap();
                        let (codes, scales) = q.to_host(cdev).unwrap();
                        let (want_codes, want_scales) = ref_quant(&x, m, k, act);
                        let bits = |v: &[f32]| v.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&scales),
                            bits(&want_scales),
                            "scales differ: [{m}, {k}] {dtype:?} {act:?}"
                        );
                        if let Some(p) = codes.iter().zip(&want_codes).position(|(a, b)| a != b) {
                            panic!(
                                "code {p} differs: GPU {:#04x}, CPU {:#04x} (x = {}, scale {}) \
                                 [{m}, {k}] {dtype:?} {act:?}",
                                codes[p],
                                want_codes[p],
                                x[p],
                                want_scales[p / k]
                            );
                        }
                        checked += 1;
                    }
                }
            }
        }
        eprintln!("{checked} activation quantizations identical to the CPU reference");
    }

    /// The CPU reference product: x quantized as `act`, decoded codes multiplied in f64, scaled
    /// by the row and column scales.
    fn ref_product(t: &Fp8Tensor, x: &[f32], m: usize, act: ActQuant) -> Vec<f64> {
        let (n, k) = t.shape();
        let (xq, sx) = ref_quant(x, m, k, act);
        let xd: Vec<f64> = xq.iter().map(|&c| f64::from(e4m3fn_to_f32(c))).collect();
        let wd: Vec<f64> = t
            .codes()
            .iter()
            .map(|&c| f64::from(e4m3fn_to_f32(c)))
            .collect();
        let sw = |j: usize| {
            f64::from(if t.scale().len() == 1 {
                t.scale()[0]
            } else {
                t.scale()[j]
            })
        };
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            let xr = &xd[r * k..(r + 1) * k];
            for j in 0..n {
                let wr = &wd[j * k..(j + 1) * k];
                let acc: f64 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                y[r * n + j] = acc * f64::from(sx[r]) * sw(j);
            }
        }
        y
    }

    /// The product through cuBLASLt (scalar, outer-vector and own-epilogue scaling) and through
    /// lorq's tensor-core kernel against the CPU reference: per-tensor and per-channel weights,
    /// with and without a static `input_scale`, m = 1..512, bf16/f16/f32 output; shapes with a
    /// K tail past the last 128-wide step (k = 96, 160) and output rows past the last block.
    #[test]
    fn fp8_matmul_matches_cpu() {
        let Some(dev) = fp8_gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        let mut worst = 0f64;
        for &(n, k, ms) in &[
            (256usize, 512usize, &[16usize, 17, 64, 512][..]),
            (1024, 4096, &[16, 17, 64][..]),
            (48, 64, &[16, 17][..]),
            (48, 96, &[1, 5, 16, 17, 40][..]),
            (2080, 160, &[16, 33][..]),
            // The wgmma kernel's shapes: rows past N and M, split tiles, 2-3 activation blocks.
            (1008, 1024, &[2, 16, 31, 100, 130][..]),
        ] {
            let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
            for strategy in [Fp8Strategy::Tensor, Fp8Strategy::Channel] {
                let mut t = Fp8Tensor::quantize(&w, strategy, DType::BF16).unwrap();
                for with_input_scale in [false, true] {
                    let static_s = 3.5f32 / E4M3_MAX;
                    t.set_input_scale(
                        with_input_scale.then(|| Tensor::new(&[static_s], &Device::Cpu).unwrap()),
                    );
                    let t = t.clone(); // a fresh GPU cache: the input scale is read at upload
                    for &m in ms {
                        let x32: Vec<f32> = activations(m as u64, m, k);
                        for dtype in [DType::BF16, DType::F16, DType::F32] {
                            if dtype != DType::BF16 && m > 64 {
                                continue;
                            }
                            let x = as_dtype(&x32, dtype);
                            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)
                                .unwrap()
                                .to_dtype(dtype)
                                .unwrap()
                                .to_device(&dev)
                                .unwrap();
                            let default_act = if with_input_scale {
                                ActQuant::Static(static_s)
                            } else {
                                ActQuant::DynamicPerToken
                            };
                            // FP8 tensor cores do not accumulate in IEEE f32 (cuBLASLt
                            // promotes partial sums to f32 only every few k-steps): an f32
                            // output lands near 1e-4 on an H100, so FP8 operands get the
                            // reduced-precision bound, not the f32 one.
                            let tol = if dtype == DType::F32 { 1e-3 } else { 1e-2 };
                            for (act, kernel) in [
                                (None, Fp8Kernel::Auto),
                                (None, Fp8Kernel::CublasLt),
                                (None, Fp8Kernel::CublasLtOwnEpilogue),
                                (None, Fp8Kernel::Mma),
                                (Some(ActQuant::DynamicPerTensor), Fp8Kernel::Auto),
                                (Some(ActQuant::DynamicPerTensor), Fp8Kernel::Mma),
                                (None, Fp8Kernel::Wgmma),
                                (Some(ActQuant::DynamicPerTensor), Fp8Kernel::Wgmma),
                            ] {
                                if kernel == Fp8Kernel::Wgmma && !fp8_wgmma::supports(k, cdev) {
                                    continue;
                                }
                                // cuBLASLt is only chosen (and checked) from 16 rows.
                                let lt = matches!(
                                    kernel,
                                    Fp8Kernel::CublasLt | Fp8Kernel::CublasLtOwnEpilogue
                                );
                                if lt && m < 16 {
                                    continue;
                                }
                                let got = matmul_with(&t, &xt, act, kernel).unwrap();
                                assert_eq!(got.dims(), &[m, n]);
                                assert_eq!(got.dtype(), dtype);
                                let got = f32s(&got);
                                let want = ref_product(&t, &x, m, act.unwrap_or(default_act));
                                let e = rel_l2(&got, &want);
                                worst = worst.max(e);
                                assert!(
                                    e <= tol,
                                    "[{n}, {k}] m={m} {strategy:?} input_scale={with_input_scale} \
                                     {dtype:?} {act:?} {kernel:?}: rel L2 {e:.2e} > {tol}"
                                );
                            }
                        }
                    }
                }
            }
        }
        eprintln!("worst rel L2 error {worst:.2e}");
        // The wgmma kernel ran where it should (Hopper): not a silent skip.
        if matches!(
            lorq_quant::cuda::fp8_gemm::compute_capability(cdev),
            Ok((9, 0))
        ) {
            assert!(fp8_wgmma::supports(4096, cdev) && !fp8_wgmma::supports(160, cdev));
        } else {
            eprintln!("the wgmma kernel was not checked: it needs compute capability 9.0");
        }
        // The pre-quantized entry point gives the same bits as matmul_with.
        let w = Tensor::randn(0f32, 0.05, (128, 256), &Device::Cpu).unwrap();
        let t = Fp8Tensor::quantize(&w, Fp8Strategy::Channel, DType::BF16).unwrap();
        let x = bf16_randn((32, 256), &dev);
        let a = matmul_with(&t, &x, None, Fp8Kernel::Auto).unwrap();
        let q = quantize_activations(&x, ActQuant::DynamicPerToken).unwrap();
        let b = gemm_quantized(&t, &q, cdev, DType::BF16, Fp8Kernel::Auto).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        // Auto takes one of lorq's kernels at few rows (bit-identical to forcing it, unlike
        // cuBLASLt's different summation order; on Hopper the wgmma kernel where `takes` says)
        // and cuBLASLt where that was measured faster.
        let routed = if fp8_wgmma::takes(128, 32, 256, cdev) {
            Fp8Kernel::Wgmma
        } else {
            Fp8Kernel::Mma
        };
        let own = gemm_quantized(&t, &q, cdev, DType::BF16, routed).unwrap();
        assert_eq!(
            max_abs_diff(&b, &own),
            0.0,
            "Auto did not take the {routed:?} kernel at 32 rows"
        );
        // On Hopper, a long-K weight at 32 rows takes the wgmma kernel.
        if fp8_wgmma::supports(8192, cdev) {
            assert!(fp8_wgmma::takes(4096, 32, 8192, cdev));
            let w = Tensor::randn(0f32, 0.05, (4096, 8192), &Device::Cpu).unwrap();
            let t = Fp8Tensor::quantize(&w, Fp8Strategy::Channel, DType::BF16).unwrap();
            let x = bf16_randn((32, 8192), &dev);
            let q = quantize_activations(&x, ActQuant::DynamicPerToken).unwrap();
            let auto = gemm_quantized(&t, &q, cdev, DType::BF16, Fp8Kernel::Auto).unwrap();
            let wg = gemm_quantized(&t, &q, cdev, DType::BF16, Fp8Kernel::Wgmma).unwrap();
            assert_eq!(
                max_abs_diff(&auto, &wg),
                0.0,
                "Auto did not take the wgmma kernel at 32 rows of a 4096x8192 weight"
            );
            // A 1024x8192 weight at 32 rows: 8 tiles of 64 K steps in 8 splits, summed in each
            // tile's cluster of 8 blocks, equal bit for bit to the L2 partial sums of the
            // stream-K schedule (the same splits: this thread's products only).
            let w8 = Tensor::randn(0f32, 0.05, (1024, 8192), &Device::Cpu).unwrap();
            let t8 = Fp8Tensor::quantize(&w8, Fp8Strategy::Channel, DType::BF16).unwrap();
            let clustered = gemm_quantized(&t8, &q, cdev, DType::BF16, Fp8Kernel::Wgmma).unwrap();
            qwgmma::set_cluster_sums(false);
            let l2 = gemm_quantized(&t8, &q, cdev, DType::BF16, Fp8Kernel::Wgmma).unwrap();
            qwgmma::set_cluster_sums(true);
            assert_eq!(
                max_abs_diff(&clustered, &l2),
                0.0,
                "cluster sums vs L2 partial sums"
            );
            // The W8A8 call launches the kernel as a programmatic dependent of the activation
            // quantization (it streams its weight while that runs): the same bits as the
            // pre-quantized call and as the call with dependent launches off, eager and replayed
            // from a CUDA graph (where the two launches are joined by a programmatic edge).
            let made = dependent_launch::launches_made();
            let on = matmul_with(&t, &x, None, Fp8Kernel::Wgmma).unwrap();
            assert!(
                dependent_launch::launches_made() > made,
                "the wgmma kernel was not launched as a dependent"
            );
            assert_eq!(
                max_abs_diff(&on, &wg),
                0.0,
                "dependent launch vs pre-quantized"
            );
            dependent_launch::set_enabled(false);
            let off = matmul_with(&t, &x, None, Fp8Kernel::Wgmma).unwrap();
            dependent_launch::set_enabled(true);
            assert_eq!(max_abs_diff(&on, &off), 0.0, "dependent launch on vs off");
            let (g, replayed) =
                graph::capture(cdev, || matmul_with(&t, &x, None, Fp8Kernel::Wgmma)).unwrap();
            for _ in 0..3 {
                g.replay().unwrap();
            }
            assert_eq!(
                max_abs_diff(&on, &replayed),
                0.0,
                "dependent launch in a graph"
            );
        }
        let x = bf16_randn((300, 256), &dev);
        let q = quantize_activations(&x, ActQuant::DynamicPerToken).unwrap();
        let auto = gemm_quantized(&t, &q, cdev, DType::BF16, Fp8Kernel::Auto).unwrap();
        let lt = gemm_quantized(&t, &q, cdev, DType::BF16, Fp8Kernel::CublasLt).unwrap();
        assert_eq!(
            max_abs_diff(&auto, &lt),
            0.0,
            "Auto did not take cuBLASLt at 300 rows"
        );
    }

    /// Weights sharing their input (q/k/v, gate/up shapes, smaller) in one launch of the wgmma
    /// kernel, their tiles end to end: each output against the CPU reference and against the
    /// weight's own product; with the grouped launches off, no group.
    #[test]
    fn fp8_group_matches_cpu() {
        let Some(dev) = fp8_gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        if !fp8_wgmma::supports(1024, cdev) {
            eprintln!("the grouped launch was not checked: it needs compute capability 9.0");
            return;
        }
        let mut worst = 0f64;
        // 6 tiles in clusters of 8 splits, 32 in clusters of 2, 100 whole (on 132 SMs).
        for (ns, k) in [
            (vec![512usize, 128, 128], 1024usize),
            (vec![2048, 2048], 512),
            (vec![6400, 6400], 128),
        ] {
            let ts: Vec<Fp8Tensor> = ns
                .iter()
                .map(|&n| {
                    let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
                    Fp8Tensor::quantize(&w, Fp8Strategy::Channel, DType::BF16).unwrap()
                })
                .collect();
            let group: Vec<&Fp8Tensor> = ts.iter().collect();
            for m in [2usize, 5, 16, 40, 64] {
                let x = as_dtype(&activations(m as u64 + 7, m, k), DType::BF16);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_device(&dev)
                    .unwrap();
                let ys = fp8_gemm::matmul_group(&group, &xt)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{ns:?} x {k} at {m} rows: no grouped launch"));
                assert_eq!(ys.len(), ns.len());
                for ((t, y), &n) in ts.iter().zip(&ys).zip(&ns) {
                    assert_eq!(y.dims(), &[m, n]);
                    let got = f32s(y);
                    let want = ref_product(t, &x, m, ActQuant::DynamicPerToken);
                    let e = rel_l2(&got, &want);
                    worst = worst.max(e);
                    assert!(
                        e <= 1e-2,
                        "{ns:?} x {k} at {m} rows, weight [{n}, {k}]: rel L2 {e:.2e}"
                    );
                    let own = f32s(&matmul_with(t, &xt, None, Fp8Kernel::Wgmma).unwrap());
                    let own: Vec<f64> = own.iter().map(|&v| f64::from(v)).collect();
                    let d = rel_l2(&got, &own);
                    assert!(
                        d <= 1e-2,
                        "{ns:?} at {m} rows: group vs own product {d:.2e}"
                    );
                }
            }
        }
        eprintln!("grouped launches: worst rel L2 error {worst:.2e}");
        lorq_quant::cuda::qwgmma::set_grouped_launches(false);
        let x = bf16_randn((4, 512), &dev);
        let w = Tensor::randn(0f32, 0.05, (256, 512), &Device::Cpu).unwrap();
        let t = Fp8Tensor::quantize(&w, Fp8Strategy::Channel, DType::BF16).unwrap();
        assert!(fp8_gemm::matmul_group(&[&t, &t], &x).unwrap().is_none());
        lorq_quant::cuda::qwgmma::set_grouped_launches(true);
    }

    /// N(0, 1) activations of `shape` on `dev`, in bf16.
    /// The RMSNorm that also writes the next FP8 projection's codes: its sum and output equal
    /// the plain fused norm's bit for bit, its codes and scales equal the projection's own
    /// quantization of that output, and a projection handed codes uses them (offering zeros
    /// gives zeros) and otherwise gives the same product.
    #[test]
    fn norm_writes_the_projection_codes() {
        use lorq_quant::cuda::fp8_gemm::with_offered_activations;
        use lorq_quant::cuda::fused_ops::{add_rms_norm, add_rms_norm_fp8};
        let Some(dev) = fp8_gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        for (rows, hidden) in [(1usize, 576usize), (3, 4096), (16, 4096), (5, 14336)] {
            let x = bf16_randn((rows, hidden), &dev);
            let d = bf16_randn((rows, hidden), &dev);
            let w = bf16_randn(hidden, &dev);
            let (s1, y1) = add_rms_norm(&x, &d, &w, 1e-5).unwrap();
            let (s2, y2, q) = add_rms_norm_fp8(&x, &d, &w, 1e-5).unwrap().unwrap();
            assert_eq!(
                max_abs_diff(&s1, &s2),
                0.0,
                "[{rows}, {hidden}]: sums differ"
            );
            assert_eq!(
                max_abs_diff(&y1, &y2),
                0.0,
                "[{rows}, {hidden}]: outputs differ"
            );
            assert_own_quantization(&y1, &q, cdev, &format!("[{rows}, {hidden}]"));
            let wt = Tensor::randn(0f32, 0.05, (256, hidden), &Device::Cpu).unwrap();
            let t = Fp8Tensor::quantize(&wt, Fp8Strategy::Channel, DType::BF16).unwrap();
            let want = matmul_with(&t, &y2, None, Fp8Kernel::Auto).unwrap();
            let got = with_offered_activations(&y2, q, || {
                matmul_with(&t, &y2, None, Fp8Kernel::Auto).unwrap()
            })
            .unwrap();
            assert_eq!(
                max_abs_diff(&want, &got),
                0.0,
                "[{rows}, {hidden}]: product"
            );
            let zeros = lorq_quant::cuda::fp8_gemm::QuantizedActivations {
                m: rows,
                k: hidden,
                codes: cdev.alloc_zeros::<u8>(rows * hidden).unwrap(),
                scales: cdev.alloc_zeros::<f32>(rows).unwrap(),
                per_tensor: false,
            };
            let z = with_offered_activations(&y2, zeros, || {
                matmul_with(&t, &y2, None, Fp8Kernel::Auto).unwrap()
            })
            .unwrap();
            assert_eq!(
                max_abs_diff(&z, &z.zeros_like().unwrap()),
                0.0,
                "[{rows}, {hidden}]: the offered codes were not used"
            );
        }
        // Codes that do not fit x are an error; hidden % 8 != 0 has no fused quantization.
        let y = bf16_randn((2, 64), &dev);
        let q =
            quantize_activations(&bf16_randn((2, 32), &dev), ActQuant::DynamicPerToken).unwrap();
        assert!(with_offered_activations(&y, q, || ()).is_err());
        let (x, w) = (bf16_randn((2, 100), &dev), bf16_randn(100, &dev));
        assert!(add_rms_norm_fp8(&x, &x, &w, 1e-5).unwrap().is_none());
    }

    /// `q` (codes a fused kernel wrote for `y`) equals the projection's own per-token
    /// quantization of `y`, every code and scale to the bit.
    fn assert_own_quantization(
        y: &Tensor,
        q: &lorq_quant::cuda::fp8_gemm::QuantizedActivations,
        cdev: &candle_core::cuda_backend::CudaDevice,
        what: &str,
    ) {
        let own = quantize_activations(y, ActQuant::DynamicPerToken).unwrap();
        let (c1, sc1) = own.to_host(cdev).unwrap();
        let (c2, sc2) = q.to_host(cdev).unwrap();
        let bad = c1.iter().zip(&c2).filter(|(a, b)| a != b).count();
        assert_eq!(bad, 0, "{what}: {bad} codes differ");
        assert!(
            sc1.iter()
                .zip(&sc2)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: scales differ: {sc1:?} vs {sc2:?}"
        );
    }

    /// SiLU·mul that also writes down_proj's codes: its output equals the plain kernel's bit for
    /// bit and its codes and scales equal the projection's own quantization of that output.
    #[test]
    fn silu_mul_writes_the_down_projection_codes() {
        use lorq_quant::cuda::fused_ops::{silu_mul, silu_mul_fp8};
        let Some(dev) = fp8_gpu() else { return };
        let cdev = dev.as_cuda_device().unwrap();
        for (rows, n) in [
            (1usize, 1536usize),
            (3, 14336),
            (16, 14336),
            (64, 8192),
            (2, 28672),
        ] {
            for dtype in [DType::BF16, DType::F16] {
                let g = bf16_randn((rows, n), &dev).to_dtype(dtype).unwrap();
                let u = bf16_randn((rows, n), &dev).to_dtype(dtype).unwrap();
                let y1 = silu_mul(&g, &u).unwrap();
                let (y2, q) = silu_mul_fp8(&g, &u).unwrap().unwrap();
                assert_eq!(y2.dtype(), dtype);
                assert_eq!(
                    max_abs_diff(&y1, &y2),
                    0.0,
                    "[{rows}, {n}] {dtype:?}: outputs differ"
                );
                assert_own_quantization(&y1, &q, cdev, &format!("[{rows}, {n}] {dtype:?}"));
            }
        }
        // n % 8 != 0 has no fused quantization; mismatched shapes are an error.
        let x = bf16_randn((2, 100), &dev);
        assert!(silu_mul_fp8(&x, &x).unwrap().is_none());
        assert!(silu_mul_fp8(&x, &bf16_randn((2, 104), &dev)).is_err());
    }

    fn bf16_randn(shape: impl Into<candle_core::Shape>, dev: &Device) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// `QuantTensor::matmul` takes the FP8 path from MIN_M rows (bit-identical to
    /// `matmul_with`), the weight-only path below it and for shapes cuBLASLt cannot take, and
    /// `matmul_group` leaves FP8 weights to it; the explicit entry point rejects such shapes
    /// with an error naming them.
    #[test]
    fn dispatch_and_errors() {
        let Some(dev) = fp8_gpu() else { return };
        let w = Tensor::randn(0f32, 0.05, (512, 1024), &Device::Cpu).unwrap();
        let t = Fp8Tensor::quantize(&w, Fp8Strategy::Channel, DType::BF16).unwrap();
        let x = bf16_randn((2, MIN_M, 1024), &dev);
        let via_trait = t.matmul(&x).unwrap();
        assert_eq!(via_trait.dims(), &[2, MIN_M, 512]);
        let direct = matmul_with(&t, &x, None, Fp8Kernel::Auto).unwrap();
        assert_eq!(
            max_abs_diff(&via_trait, &direct),
            0.0,
            "QuantTensor::matmul did not take the FP8 path at m >= MIN_M"
        );
        // Below MIN_M: the weight-only path (activations stay bf16), close to the dequantized
        // weight's product (W8A8 is not: its activation rounding alone is ~3e-2).
        let below = MIN_M - 1;
        assert!(below >= 1, "MIN_M leaves one row on the weight-only GEMV");
        let xs = x
            .narrow(0, 0, 1)
            .unwrap()
            .narrow(1, 0, below)
            .unwrap()
            .reshape((below, 1024))
            .unwrap();
        let small = t.matmul(&xs).unwrap().to_dtype(DType::F32).unwrap();
        let want = xs
            .to_dtype(DType::F32)
            .unwrap()
            .matmul(
                &t.dequantize(DType::F32)
                    .unwrap()
                    .to_device(&dev)
                    .unwrap()
                    .t()
                    .unwrap(),
            )
            .unwrap();
        let e: f32 = ((&small - &want)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            / want
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap())
        .sqrt();
        assert!(e < 1e-2, "weight-only path below MIN_M: rel L2 {e}");
        // Both paths ran: the W8A8 one reads the packed layout's device copy (one copy of the
        // weight on the GPU), unless the layout cannot hold the weight (in_features % 32 != 0).
        let cdev = dev.as_cuda_device().unwrap();
        assert!(shares_packed_copy(&t, cdev).unwrap());
        let w112 = Tensor::randn(0f32, 0.05, (64, 112), &Device::Cpu).unwrap();
        let t112 = Fp8Tensor::quantize(&w112, Fp8Strategy::Channel, DType::BF16).unwrap();
        assert!(!shares_packed_copy(&t112, cdev).unwrap());
        let x112 = bf16_randn((4, 112), &dev);
        assert_eq!(t112.matmul(&x112).unwrap().dims(), &[4, 64]);
        // Grouped projections (q/k/v, gate/up) leave FP8 weights to their own W8A8 path: the
        // grouped kernels are weight-only and several times slower at these rows.
        let w2 = Tensor::randn(0f32, 0.05, (256, 1024), &Device::Cpu).unwrap();
        let t2 = Fp8Tensor::quantize(&w2, Fp8Strategy::Channel, DType::BF16).unwrap();
        let x8 = bf16_randn((8, 1024), &dev);
        let group: [&dyn QuantTensor; 2] = [&t, &t2];
        let ys = lorq_quant::matmul_group(&group, &x8).unwrap();
        for (y, w) in ys.iter().zip([&t, &t2]) {
            let want = matmul_with(w, &x8, None, Fp8Kernel::Auto).unwrap();
            assert_eq!(
                max_abs_diff(y, &want),
                0.0,
                "matmul_group did not run the FP8 weights on their W8A8 path"
            );
        }
        // Large weights (gate/up/down of an 8B model) take W8A8 from one row; smaller ones keep
        // the weight-only GEMV there (t above: 512x1024).
        let (n_big, k_big) = (ONE_ROW_MIN_WEIGHTS / 4096, 4096);
        assert_eq!((min_rows(n_big, k_big), min_rows(512, 1024)), (1, MIN_M));
        let w_big = Tensor::randn(0f32, 0.05, (n_big, k_big), &Device::Cpu).unwrap();
        let t_big = Fp8Tensor::quantize(&w_big, Fp8Strategy::Channel, DType::BF16).unwrap();
        let x1 = bf16_randn((1, k_big), &dev);
        assert_eq!(
            max_abs_diff(
                &t_big.matmul(&x1).unwrap(),
                &matmul_with(&t_big, &x1, None, Fp8Kernel::Auto).unwrap()
            ),
            0.0,
            "QuantTensor::matmul did not take the W8A8 path at one row for a large weight"
        );
        // k = 100: not a multiple of 16.
        let w = Tensor::randn(0f32, 0.05, (64, 100), &Device::Cpu).unwrap();
        let t = Fp8Tensor::quantize(&w, Fp8Strategy::Tensor, DType::BF16).unwrap();
        let x = bf16_randn((32, 100), &dev);
        let e = matmul_with(&t, &x, None, Fp8Kernel::Auto)
            .unwrap_err()
            .to_string();
        assert!(e.contains("divisible by 16"), "{e}");
        assert_eq!(t.matmul(&x).unwrap().dims(), &[32, 64]);
        // A bad activation shape is an error, not a panic.
        let x = Tensor::zeros((32, 99), DType::BF16, &dev).unwrap();
        assert!(matmul_with(&t, &x, None, Fp8Kernel::Auto).is_err());
    }
}
