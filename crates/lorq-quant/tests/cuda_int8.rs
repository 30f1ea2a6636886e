//! LLM.int8 on the GPU (`kernels/int8_llm.cu`) against lorq's CPU LLM.int8 kernel (itself checked
//! against bitsandbytes in tests/int8.rs): outlier columns, row-wise int8 activations, exact int32
//! products, outliers in the activations' precision. Same steps in the same float order, so the
//! results agree to rounding: relative L2 <= 1e-6 (f32), <= 1e-2 (bf16/f16), never NaN.
//! Skipped, saying why, without the `cuda` feature or a GPU.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_int8_skipped_without_the_cuda_feature() {
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
    use candle_core::{DType, Device, Tensor};
    use lorq_quant::int8::Int8Tensor;
    use lorq_quant::QuantTensor;

    use super::formats::{randn, rel_l2};

    fn gpu() -> Option<Device> {
        lorq_quant::cuda::usable_gpu(0)
            .map_err(|why| eprintln!("SKIPPED: {why}"))
            .ok()
    }

    #[test]
    fn llm_int8_matches_the_cpu_kernel() {
        let Some(dev) = gpu() else { return };
        let mut failures = Vec::new();
        for &(n, k) in &[(256usize, 512usize), (1000, 1024), (64, 4096)] {
            let w = Tensor::from_vec(randn(n as u64, n * k, 0.05), (n, k), &Device::Cpu).unwrap();
            for threshold in [6.0f32, 0.0] {
                let q = Int8Tensor::quantize(&w).unwrap().with_threshold(threshold);
                for m in [1usize, 2, 3, 8, 17, 40] {
                    let mut xv = randn(m as u64 + k as u64, m * k, 1.0);
                    // A few outlier columns (|x| >= 6 in some row), as LLM activations have.
                    for (t, c) in [3usize, k / 2, k - 5].iter().enumerate() {
                        xv[(t % m) * k + c] = 9.5 * if t.is_multiple_of(2) { 1.0 } else { -1.0 };
                    }
                    for (dtype, tol) in
                        [(DType::F32, 1e-6), (DType::BF16, 1e-2), (DType::F16, 1e-2)]
                    {
                        let x = Tensor::from_vec(xv.clone(), (m, k), &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap();
                        let want = q.matmul(&x).unwrap();
                        let got = q.matmul(&x.to_device(&dev).unwrap()).unwrap();
                        assert_eq!(got.dtype(), dtype);
                        let e = rel_l2(&got, &want);
                        // NaN fails too.
                        if e.is_nan() || e > tol {
                            failures.push(format!(
                                "{n}x{k} thr {threshold} m={m} {dtype:?}: rel err {e:e} > {tol:e}"
                            ));
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
}
