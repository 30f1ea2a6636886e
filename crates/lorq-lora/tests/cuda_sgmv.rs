//! The multi-adapter GPU kernels (`BatchAdapters::apply` on CUDA: one shrink and one expand launch
//! per module call) against the CPU path (`apply` on CPU tensors, the reference) on fresh random
//! inputs: mixed ranks (8 to 256, and 12 for the scalar path), mixed weight dtypes, segments of
//! many sizes, rows without adapter; relative L2 error of the delta <= 1e-5 with f32 activations,
//! <= 1e-2 with bf16/f16; and a mixed batch equals each adapter run alone.
//! Built and run on a GPU machine with `LORQ_CUDA_TESTS="-p lorq-lora --test cuda_sgmv"
//! scripts/build-cuda.sh --tests` + `scripts/gpu-run.sh`; without a GPU each test says why it skips.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_sgmv_skipped_without_the_cuda_feature() {
    eprintln!(
        "SKIPPED: lorq-lora was built without the `cuda` feature; the GPU tests run with \
         LORQ_CUDA_TESTS=\"-p lorq-lora --test cuda_sgmv\" scripts/build-cuda.sh --tests on a GPU machine"
    );
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor};
    use lorq_lora::{BatchAdapters, LoraAdapter, LoraConfig, LoraModule};

    const MODULE: &str = "model.layers.0.self_attn.q_proj";

    fn gpu() -> Option<Device> {
        lorq_quant::cuda::usable_gpu(0)
            .map_err(|why| eprintln!("SKIPPED: {why}"))
            .ok()
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// ‖got − want‖ / ‖want‖ over f32 vectors; a non-finite value fails the test.
    fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
        assert_eq!(got.len(), want.len());
        assert!(got.iter().all(|v| v.is_finite()), "non-finite GPU output");
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum();
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }

    /// One adapter with a random pair for MODULE, built twice from the same values: on the CPU
    /// (the reference) and on `dev` (`on_host`: left on the CPU, so the GPU path makes its own
    /// resident copy).
    struct TestAdapter {
        cpu: Arc<LoraAdapter>,
        gpu: Arc<LoraAdapter>,
    }

    fn adapter(
        k: usize,
        n: usize,
        r: usize,
        wdtype: DType,
        dev: &Device,
        on_host: bool,
    ) -> TestAdapter {
        let a = Tensor::randn(0f32, (1.0 / k as f64).sqrt() as f32, (r, k), &Device::Cpu)
            .unwrap()
            .to_dtype(wdtype)
            .unwrap();
        let b = Tensor::randn(0f32, (1.0 / r as f64).sqrt() as f32, (n, r), &Device::Cpu)
            .unwrap()
            .to_dtype(wdtype)
            .unwrap();
        let scale = 32.0 / r as f64;
        let config = LoraConfig::parse(
            &format!(r#"{{"r": {r}, "lora_alpha": 32, "target_modules": ["q_proj"]}}"#),
            Path::new("test"),
        )
        .unwrap();
        let make = |a: Tensor, b: Tensor| {
            let mut m = HashMap::new();
            m.insert(MODULE.to_string(), LoraModule::low_rank(a, b, scale));
            Arc::new(
                LoraAdapter::from_modules(PathBuf::from(format!("r{r}")), config.clone(), m)
                    .unwrap(),
            )
        };
        let (ga, gb) = if on_host {
            (a.clone(), b.clone())
        } else {
            (a.to_device(dev).unwrap(), b.to_device(dev).unwrap())
        };
        TestAdapter {
            cpu: make(a, b),
            gpu: make(ga, gb),
        }
    }

    /// Runs `segments` (rows, adapter index or none) through `apply` on the CPU and the GPU;
    /// returns (base, CPU output, GPU output) as f32 vectors, and the GPU output tensor.
    fn run(
        dev: &Device,
        adapters: &[TestAdapter],
        segments: &[(usize, Option<usize>)],
        k: usize,
        n: usize,
        dtype: DType,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Tensor, Tensor) {
        let rows: usize = segments.iter().map(|s| s.0).sum();
        let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let base = Tensor::randn(0f32, 1.0, (rows, n), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let (mut on_cpu, mut on_gpu) = (BatchAdapters::new(), BatchAdapters::new());
        for &(r, i) in segments {
            on_cpu.push(r, i.map(|i| adapters[i].cpu.clone()));
            on_gpu.push(r, i.map(|i| adapters[i].gpu.clone()));
        }
        let want = on_cpu.apply(MODULE, &x, base.clone()).unwrap();
        let xg = x.to_device(dev).unwrap();
        let got = on_gpu
            .apply(MODULE, &xg, base.to_device(dev).unwrap())
            .unwrap();
        assert_eq!(got.dtype(), dtype);
        assert_eq!(got.dims(), &[rows, n]);
        (f32s(&base), f32s(&want), f32s(&got), got, xg)
    }

    fn deltas(out: &[f32], base: &[f32]) -> Vec<f32> {
        out.iter().zip(base).map(|(o, b)| o - b).collect()
    }

    fn tolerance(dtype: DType) -> f64 {
        if dtype == DType::F32 {
            1e-5
        } else {
            1e-2
        }
    }

    /// Mixed ranks and weight dtypes, decode-like (one row per adapter) and prefill-like (long
    /// segments) batches, rows without adapter, the vector and the scalar kernel paths.
    #[test]
    fn mixed_batches_match_the_cpu_path() {
        let Some(dev) = gpu() else { return };
        // (in, out): multiples of 8 take the vector paths; 100 does not (scalar shrink).
        for &(k, n) in &[(4096usize, 1024usize), (200, 136), (100, 70)] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let ranks = [8usize, 16, 64, 128, 256, 12, 8];
                let wdtypes = [
                    DType::F32,
                    DType::BF16,
                    DType::F32,
                    DType::BF16,
                    DType::F32,
                    DType::BF16,
                    DType::F16,
                ];
                let mut adapters = Vec::new();
                for (i, (&r, &wdtype)) in ranks.iter().zip(&wdtypes).enumerate() {
                    adapters.push(adapter(k, n, r, wdtype, &dev, i == 3));
                }
                // (name, segments of (rows, adapter index or none)).
                type Case<'a> = (&'a str, Vec<(usize, Option<usize>)>);
                let cases: Vec<Case> = vec![
                    (
                        "prefill segments",
                        vec![
                            (37, Some(0)),
                            (5, None),
                            (64, Some(4)),
                            (8, Some(1)),
                            (17, Some(5)),
                            (9, Some(2)),
                            (1, None),
                            (23, Some(3)),
                        ],
                    ),
                    (
                        "decode rows",
                        (0..24)
                            .map(|i| {
                                (
                                    1,
                                    if i % 7 == 3 {
                                        None
                                    } else {
                                        Some(i % ranks.len())
                                    },
                                )
                            })
                            .collect(),
                    ),
                    (
                        // Decode with small ranks: one-row tiles of bf16, f16 and f32 weights,
                        // rank 12 (the scalar path) and rows without adapter.
                        "decode rows, ranks <= 16",
                        (0..25)
                            .map(|i| (1, [Some(1), Some(6), Some(0), None, Some(5)][i % 5]))
                            .collect(),
                    ),
                    ("one adapter", vec![(13, Some(1))]),
                ];
                for (name, segs) in cases {
                    let (base, want, got, _, _) = run(&dev, &adapters, &segs, k, n, dtype);
                    let e_out = rel_l2(&got, &want);
                    let e_delta = rel_l2(&deltas(&got, &base), &deltas(&want, &base));
                    eprintln!(
                        "{k}x{n} {dtype:?} {name}: rel err delta {e_delta:.2e}, output {e_out:.2e}"
                    );
                    assert!(
                        e_delta <= tolerance(dtype) && e_out <= tolerance(dtype),
                        "{k}x{n} {dtype:?} {name}: delta {e_delta:e}, output {e_out:e}"
                    );
                    // Rows without adapter keep the base output exactly.
                    let mut row = 0;
                    for (r, i) in &segs {
                        if i.is_none() {
                            assert_eq!(got[row * n..(row + r) * n], base[row * n..(row + r) * n]);
                        }
                        row += r;
                    }
                }
            }
        }
    }

    /// 64 distinct rank-16 adapters, one row each (decode at batch 64), bf16 weights and
    /// activations, Llama-3-8B q_proj shape.
    #[test]
    fn sixty_four_adapters_one_row_each() {
        let Some(dev) = gpu() else { return };
        let (k, n) = (4096, 4096);
        let adapters: Vec<_> = (0..64)
            .map(|_| adapter(k, n, 16, DType::BF16, &dev, false))
            .collect();
        let segs: Vec<_> = (0..64).map(|i| (1, Some(i))).collect();
        let (base, want, got, _, _) = run(&dev, &adapters, &segs, k, n, DType::BF16);
        let e = rel_l2(&deltas(&got, &base), &deltas(&want, &base));
        eprintln!("64 adapters, bf16, 4096x4096: rel err delta {e:.2e}");
        assert!(e <= 1e-2, "{e}");
    }

    /// Each segment of a mixed batch gives what its adapter gives run alone on those rows.
    #[test]
    fn mixed_batch_equals_each_adapter_alone() {
        let Some(dev) = gpu() else { return };
        let (k, n) = (1024, 512);
        for dtype in [DType::F32, DType::BF16] {
            let ranks = [16usize, 128, 8, 256, 64];
            let adapters: Vec<_> = ranks
                .iter()
                .map(|&r| adapter(k, n, r, DType::BF16, &dev, false))
                .collect();
            let segs = vec![
                (3, Some(0)),
                (19, Some(1)),
                (2, None),
                (1, Some(2)),
                (40, Some(3)),
                (8, Some(4)),
                (1, Some(0)),
            ];
            let (base, _, got, _, x) = run(&dev, &adapters, &segs, k, n, dtype);
            let mut row = 0;
            let mut worst = 0f64;
            for &(r, i) in &segs {
                let xs = x.narrow(0, row, r).unwrap().copy().unwrap();
                let bs = Tensor::from_vec(base[row * n..(row + r) * n].to_vec(), (r, n), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let mut alone = BatchAdapters::new();
                alone.push(r, i.map(|i| adapters[i].gpu.clone()));
                let y = f32s(&alone.apply(MODULE, &xs, bs).unwrap());
                let e = rel_l2(&got[row * n..(row + r) * n], &y);
                worst = worst.max(e);
                row += r;
            }
            eprintln!("{dtype:?}: mixed batch vs each adapter alone: worst rel diff {worst:.2e}");
            assert!(worst <= 1e-6, "{dtype:?}: {worst:e}");
        }
    }

    /// Modules sharing one input (q/k/v) shrink and expand as one launch each
    /// (`BatchAdapters::begin_group`, `PendingDelta::finish_all`): every module's output equals
    /// the module run alone, bit for bit, and the CPU path; adapters may leave a module alone and
    /// have a different rank per module; one-row (decode) and multi-row (prefill) tiles.
    #[test]
    fn grouped_modules_equal_each_module_alone() {
        use lorq_lora::PendingDelta;
        let Some(dev) = gpu() else { return };
        let k = 512;
        let paths = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj",
        ];
        let outs = [512usize, 128, 128];
        let config = LoraConfig::parse(
            r#"{"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj"]}"#,
            Path::new("test"),
        )
        .unwrap();
        // Adapter i adapts module m with rank ranks[i][m] (0: leaves it alone).
        let ranks = [[16usize, 8, 32], [16, 0, 16], [8, 24, 0], [64, 16, 8]];
        let mut cpu_adapters = Vec::new();
        let mut gpu_adapters = Vec::new();
        for (i, rs) in ranks.iter().enumerate() {
            let (mut cm, mut gm) = (HashMap::new(), HashMap::new());
            for ((path, &n), &r) in paths.iter().zip(&outs).zip(rs) {
                if r == 0 {
                    continue;
                }
                let a = Tensor::randn(0f32, (1.0 / k as f64).sqrt() as f32, (r, k), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                let b = Tensor::randn(0f32, (1.0 / r as f64).sqrt() as f32, (n, r), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                let scale = 2.0 / (1 + i) as f64;
                let (ga, gb) = (a.to_device(&dev).unwrap(), b.to_device(&dev).unwrap());
                cm.insert(path.to_string(), LoraModule::low_rank(a, b, scale));
                gm.insert(path.to_string(), LoraModule::low_rank(ga, gb, scale));
            }
            let name = PathBuf::from(format!("a{i}"));
            cpu_adapters.push(Arc::new(
                LoraAdapter::from_modules(name.clone(), config.clone(), cm).unwrap(),
            ));
            gpu_adapters.push(Arc::new(
                LoraAdapter::from_modules(name, config.clone(), gm).unwrap(),
            ));
        }
        let decode: Vec<(usize, Option<usize>)> = vec![
            (1, Some(0)),
            (1, Some(1)),
            (1, None),
            (1, Some(2)),
            (1, Some(3)),
        ];
        let prefill: Vec<(usize, Option<usize>)> = vec![
            (9, Some(1)),
            (3, None),
            (20, Some(3)),
            (1, Some(0)),
            (5, Some(2)),
        ];
        for segs in [decode, prefill] {
            for dtype in [DType::F32, DType::BF16] {
                let rows: usize = segs.iter().map(|s| s.0).sum();
                let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let bases: Vec<Tensor> = outs
                    .iter()
                    .map(|&n| {
                        Tensor::randn(0f32, 1.0, (rows, n), &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    })
                    .collect();
                let (mut on_cpu, mut on_gpu) = (BatchAdapters::new(), BatchAdapters::new());
                for &(r, i) in &segs {
                    on_cpu.push(r, i.map(|i| cpu_adapters[i].clone()));
                    on_gpu.push(r, i.map(|i| gpu_adapters[i].clone()));
                }
                let xg = x.to_device(&dev).unwrap();
                let bases_g: Vec<Tensor> =
                    bases.iter().map(|b| b.to_device(&dev).unwrap()).collect();
                let pending = on_gpu.begin_group(&paths, &xg).unwrap();
                assert!(pending.iter().all(Option::is_some));
                let grouped = PendingDelta::finish_all(pending, bases_g.clone()).unwrap();
                for (m, path) in paths.iter().enumerate() {
                    let alone = f32s(&on_gpu.apply(path, &xg, bases_g[m].clone()).unwrap());
                    let got = f32s(&grouped[m]);
                    assert_eq!(
                        got, alone,
                        "{dtype:?} {path}: grouped launch differs from the module alone"
                    );
                    let want = f32s(&on_cpu.apply(path, &x, bases[m].clone()).unwrap());
                    let base = f32s(&bases[m]);
                    let e = rel_l2(&deltas(&got, &base), &deltas(&want, &base));
                    eprintln!("{dtype:?} {rows} rows {path}: grouped vs CPU rel err delta {e:.2e}");
                    assert!(e <= tolerance(dtype), "{dtype:?} {path}: {e:e}");
                }
            }
        }
    }

    /// Bad input is an error naming the problem, not a panic.
    #[test]
    fn mismatched_shapes_are_clear_errors() {
        use lorq_quant::cuda::sgmv::{add_lora, LoraPair, LoraSegment};
        let Some(dev) = gpu() else { return };
        let x = Tensor::randn(0f32, 1.0, (4, 64), &dev).unwrap();
        let base = Tensor::randn(0f32, 1.0, (4, 32), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, (8, 48), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (32, 8), &dev).unwrap();
        let seg = |rows| LoraSegment {
            rows,
            lora: Some(LoraPair {
                a: &a,
                b: &b,
                scale: 1.0,
            }),
        };
        let e = add_lora(&x, &base, &[seg(4)]).unwrap_err().to_string();
        assert!(e.contains("[8, 48]") && e.contains("64"), "{e}");
        let e = add_lora(&x, &base, &[seg(3)]).unwrap_err().to_string();
        assert!(e.contains("4 rows") && e.contains("segments 3"), "{e}");
        let xb = x.to_dtype(DType::BF16).unwrap();
        let e = add_lora(&xb, &base, &[seg(4)]).unwrap_err().to_string();
        assert!(e.contains("dtype"), "{e}");
    }
}
