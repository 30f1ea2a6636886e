//! `lorq bench fp8 --device cuda`: W8A8 FP8 (`lorq_quant::cuda::fp8_gemm`: cuBLASLt, or lorq's
//! tensor-core kernel at few rows) against bf16 cuBLAS on the same card, bf16 activations, seeded random weights. Each timed
//! path is first checked against its CPU reference (x quantized the same way, decoded e4m3
//! values multiplied in f32); `quant_err_vs_bf16` is what W8A8 costs against the bf16 product.
//! Timings rotate over enough weight copies to defeat the L2 cache; the device is synchronized
//! around each batch of calls. Peer rows (`scripts/bench/torch_scaled_mm.py`) merge with `--peer`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Debug, Args)]
#[command(after_help = "Paths timed (bf16 activations in, bf16 out):
  w8a8                   what lorq runs: per-channel weight scales, per-token dynamic activation
                         scales (compressed-tensors FP8_DYNAMIC): quantize x + lorq's tensor-core
                         kernel at few rows, cuBLASLt elsewhere
  w8a8-static            as w8a8 with a per-tensor weight scale and a static input_scale
                         (compressed-tensors FP8)
  cublaslt-w8a8          as w8a8, always cuBLASLt
  mma-w8a8               as w8a8, always lorq's kernel (kernels/fp8_mma.cu)
  wgmma-w8a8             as w8a8, always lorq's warpgroup kernel (kernels/fp8_wgmma.cu, Hopper),
                         launched as a programmatic dependent of the activation quantization
  wgmma-w8a8-serial      as wgmma-w8a8 with dependent launches off (each kernel waits for the one
                         before it to end)
  cublaslt-w8a8-epilogue as cublaslt-w8a8, scales applied by lorq's kernel after an f32 product
  cublaslt-gemm-only     as cublaslt-w8a8 without the activation quantization (x pre-quantized)
  mma-gemm-only          as mma-w8a8 without the activation quantization
  wgmma-gemm-only        as wgmma-w8a8 without the activation quantization
  wgmma-*-stream-k       as wgmma-gemm-only / wgmma-w8a8 with session 34's schedule: tiles split
                         over the SMs summed through L2 partial sums, not in thread-block clusters
  quantize-only          the activation quantization alone (per-token e4m3 codes and scales)
  weight-only            the weight-only path (e4m3 decoded, activations stay bf16)
Groups (--groups: weights sharing their input; bf16 cuBLAS one matmul each):
  w8a8-group             the weights in one launch of the wgmma kernel (lorq_quant::matmul_group)
  w8a8-separate          one W8A8 product each, the activations quantized once

Example:
  lorq bench fp8 --device cuda --shapes llama3-8b --m 1,2,8,16,32,64,128,512 --json fp8.json \\
      --peer torch_scaled_mm.json")]
pub struct BenchFp8Args {
    /// `cuda[:N]` (the path needs FP8 tensor cores: compute capability 8.9+).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// `smollm2`, `llama3-8b` or `NxK` shapes (n = out features, k = in features), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "llama3-8b")]
    pub shapes: Vec<String>,
    /// Activation rows (batch × tokens).
    #[arg(long, value_delimiter = ',', default_value = "1,2,8,16,32,64,128,512")]
    pub m: Vec<usize>,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A JSON file of peer rows (scripts/bench/torch_scaled_mm.py) merged into the report.
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// Weights sharing their input, timed as one grouped launch against one product each:
    /// `llama3-8b` (q/k/v and gate/up), `none`, or `N1+N2[+N3]xK` (e.g. 4096+1024+1024x4096).
    #[arg(long, value_delimiter = ',', default_value = "llama3-8b")]
    pub groups: Vec<String>,
}

/// Weights sharing an input: a label, their output rows, the shared K.
type Group = (String, Vec<usize>, usize);

/// `--groups`: presets or `N1+N2[+N3]xK` specs.
fn parse_groups(specs: &[String]) -> Result<Vec<Group>> {
    let mut out = Vec::new();
    for s in specs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match s {
            "none" => {}
            "llama3-8b" => {
                out.push(("q/k/v".to_string(), vec![4096, 1024, 1024], 4096));
                out.push(("gate/up".to_string(), vec![14336, 14336], 4096));
            }
            _ => {
                let parsed = s.split_once(['x', 'X']).and_then(|(ns, k)| {
                    let ns = ns
                        .split('+')
                        .map(|n| n.parse::<usize>().ok().filter(|&n| n > 0))
                        .collect::<Option<Vec<_>>>()?;
                    Some((ns, k.parse::<usize>().ok().filter(|&k| k > 0)?))
                });
                match parsed {
                    Some((ns, k)) if (2..=3).contains(&ns.len()) => {
                        out.push((s.to_string(), ns, k));
                    }
                    _ => anyhow::bail!(
                        "bad group {s:?}: use llama3-8b, none or N1+N2[+N3]xK (2-3 weights)"
                    ),
                }
            }
        }
    }
    Ok(out)
}

pub fn run(a: BenchFp8Args) -> Result<()> {
    let device = crate::common::parse_device(&a.device)?;
    parse_groups(&a.groups)?;
    if device.is_cpu() {
        anyhow::bail!("lorq bench fp8 times the GPU path: pass --device cuda[:N]");
    }
    #[cfg(feature = "cuda")]
    return gpu::run(&a, &device);
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("lorq bench fp8 needs a CUDA build (scripts/build-cuda.sh)")
}

#[cfg(feature = "cuda")]
mod gpu {
    use anyhow::{bail, Result};
    use candle_core::{DType, Device, Tensor};
    use lorq_quant::cuda::fp8_gemm::{
        cublaslt_version, gemm_quantized, has_fp8_tensor_cores, matmul_with, outer_vec_in_use,
        prepare, quantize_activations, ActQuant, Fp8Kernel,
    };
    use lorq_quant::cuda::qgemv::{matmul as qmatmul, DeviceLayout, QPath};
    use lorq_quant::cuda::{dependent_launch, fp8_gemm, fp8_wgmma, qwgmma};
    use lorq_quant::fp8::{e4m3fn_to_f32, f32_to_e4m3fn, Fp8Strategy, Fp8Tensor, E4M3_MAX};
    use lorq_quant::QuantTensor;
    use serde_json::{json, Value};

    use super::super::bench_kernels::{
        command_line, copies_past_l2 as copies, parse_shapes, randn, utc_date,
    };
    use super::super::bench_kernels_cuda::{
        card_name, rel_l2, time_calls, CallTiming as Timing, OffWhileAlive,
    };
    use super::super::bench_peer::merge_peer_rows;
    use super::BenchFp8Args;

    /// The CPU reference of a W8A8 product: x quantized as `act` (as kernels/fp8_act.cu does),
    /// decoded e4m3 values multiplied in f32, then scaled per row and per column.
    fn reference(t: &Fp8Tensor, x: &[f32], m: usize, act: ActQuant) -> Result<Tensor> {
        let (n, k) = t.shape();
        let floor = 1.0 / (E4M3_MAX * 512.0);
        let absmax = |s: &[f32]| s.iter().fold(0f32, |a, v| a.max(v.abs()));
        let sx: Vec<f32> = match act {
            ActQuant::DynamicPerToken => x
                .chunks(k)
                .map(|r| (absmax(r) / E4M3_MAX).max(floor))
                .collect(),
            ActQuant::DynamicPerTensor => vec![(absmax(x) / E4M3_MAX).max(floor); m],
            ActQuant::Static(s) => vec![s; m],
        };
        let xq: Vec<f32> = x
            .chunks(k)
            .zip(&sx)
            .flat_map(|(r, &s)| r.iter().map(move |&v| e4m3fn_to_f32(f32_to_e4m3fn(v / s))))
            .collect();
        let wd: Vec<f32> = t.codes().iter().map(|&c| e4m3fn_to_f32(c)).collect();
        let sw: Vec<f32> = match t.scale() {
            [s] => vec![*s; n],
            s => s.to_vec(),
        };
        let cpu = Device::Cpu;
        let acc = Tensor::from_vec(xq, (m, k), &cpu)?
            .matmul(&Tensor::from_vec(wd, (n, k), &cpu)?.t()?)?;
        Ok(acc
            .broadcast_mul(&Tensor::from_vec(sx, (m, 1), &cpu)?)?
            .broadcast_mul(&Tensor::from_vec(sw, (1, n), &cpu)?)?)
    }

    pub(super) fn run(a: &BenchFp8Args, dev: &Device) -> Result<()> {
        let shapes = parse_shapes(&a.shapes)?;
        let card = card_name(dev)?;
        let cdev = dev.as_cuda_device()?;
        if !has_fp8_tensor_cores(cdev)? {
            bail!("{card} has no FP8 tensor cores (compute capability 8.9+ needed)");
        }
        eprintln!("lorq bench fp8 on {card}");
        let mut rows: Vec<Value> = Vec::new();
        let mut failures = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        for (si, s) in shapes.iter().enumerate() {
            let (n, k) = (s.n, s.k);
            let label = match s.name {
                Some(p) => format!("{n}x{k} ({p})"),
                None => format!("{n}x{k}"),
            };
            eprintln!("  {label}");
            let w_cpu =
                Tensor::from_vec(randn(1000 + si as u64, n * k, 0.02), (n, k), &Device::Cpu)?;
            let w_bf16 = w_cpu.to_dtype(DType::BF16)?;
            let dense: Vec<Tensor> = (0..copies(n * k * 2))
                .map(|_| w_bf16.to_device(dev))
                .collect::<candle_core::Result<_>>()?;
            let channel = Fp8Tensor::quantize(&w_cpu, Fp8Strategy::Channel, DType::BF16)?;
            let mut tensor = Fp8Tensor::quantize(&w_cpu, Fp8Strategy::Tensor, DType::BF16)?;
            // A static input scale as a calibration would find it for N(0, 1) activations.
            let static_s = 5.0 / E4M3_MAX;
            tensor.set_input_scale(Some(Tensor::new(&[static_s], &Device::Cpu)?));
            let c = copies(n * k);
            let chans: Vec<Fp8Tensor> = vec![channel.clone(); c];
            let tens: Vec<Fp8Tensor> = vec![tensor.clone(); c];
            for t in chans.iter().chain(&tens) {
                prepare(t, cdev)?;
            }
            // The weight-only path (e4m3 through a table, bf16 activations) for comparison.
            let layout = channel.gpu_layout()?;
            let wo: Vec<DeviceLayout> = (0..c)
                .map(|_| DeviceLayout::upload(&layout, cdev))
                .collect::<Result<_, _>>()?;
            for &m in &a.m {
                let x_cpu = Tensor::from_vec(
                    randn(7 + m as u64 + 31 * si as u64, m * k, 1.0),
                    (m, k),
                    &Device::Cpu,
                )?
                .to_dtype(DType::BF16)?;
                let x = x_cpu.to_device(dev)?;
                let x32: Vec<f32> = x_cpu.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let iters = if m <= 16 { 50 } else { 10 };
                let bf16_y = x.matmul(&dense[0].t()?)?.to_device(&Device::Cpu)?;
                // Wall time per call (host overhead included), then the GPU time of the same
                // calls replayed from a CUDA graph.
                let time = |f: &mut dyn FnMut(usize) -> Result<Tensor>| -> Result<Timing> {
                    time_calls(dev, iters, true, f)
                };
                let bf16 = time(&mut |i| Ok(x.matmul(&dense[i % dense.len()].t()?)?))?;
                let bf16_us = bf16.0;
                // Bytes a product moves besides its weight: bf16 x in, bf16 y out.
                let io = (m * k + m * n) * 2;
                let mut push = |path: &str,
                                (us, us_graph): Timing,
                                bytes: usize,
                                err: Option<f64>,
                                qerr: Option<f64>| {
                    let ok = err.is_none_or(|e| e <= 1e-2);
                    if !ok {
                        failures.push(format!("{path} {label} m={m}: rel err {err:?} > 1e-2"));
                    }
                    rows.push(json!({
                        "format": if path == "cublas" { "bf16" } else { "fp8" },
                        "path": path, "shape": label, "n": n, "k": k, "m": m,
                        "us": us, "speedup_vs_bf16": bf16_us / us,
                        "us_graph": us_graph,
                        "speedup_vs_bf16_graph": bf16.1.zip(us_graph).map(|(b, u)| b / u),
                        "gbps": bytes as f64 / us / 1e3,
                        "rel_err": err, "quant_err_vs_bf16": qerr, "ok": ok,
                    }));
                };
                push("cublas", bf16, n * k * 2 + io, None, None);
                let fp8_bytes = n * k + 4 * n + io;
                let per_token = ActQuant::DynamicPerToken;
                let stat = ActQuant::Static(static_s);
                // The wgmma kernel's paths are timed where it can run (Hopper, K % 128 == 0).
                let wgmma_runs = fp8_wgmma::supports(k, cdev);
                for (path, ts, act, kernel) in [
                    ("w8a8", &chans, per_token, Fp8Kernel::Auto),
                    ("w8a8-static", &tens, stat, Fp8Kernel::Auto),
                    ("cublaslt-w8a8", &chans, per_token, Fp8Kernel::CublasLt),
                    ("mma-w8a8", &chans, per_token, Fp8Kernel::Mma),
                    ("wgmma-w8a8", &chans, per_token, Fp8Kernel::Wgmma),
                    (
                        "cublaslt-w8a8-epilogue",
                        &chans,
                        per_token,
                        Fp8Kernel::CublasLtOwnEpilogue,
                    ),
                ] {
                    if kernel == Fp8Kernel::Wgmma && !wgmma_runs {
                        continue;
                    }
                    // A path that fails is reported and the others still run.
                    let measured = (|| -> Result<(Timing, f64, f64)> {
                        let got =
                            matmul_with(&ts[0], &x, Some(act), kernel)?.to_device(&Device::Cpu)?;
                        let err = rel_l2(&got, &reference(&ts[0], &x32, m, act)?)?;
                        let qerr = rel_l2(&got, &bf16_y)?;
                        let t = time(&mut |i| {
                            Ok(matmul_with(&ts[i % ts.len()], &x, Some(act), kernel)?)
                        })?;
                        Ok((t, err, qerr))
                    })();
                    match measured {
                        Ok((us, err, qerr)) => push(path, us, fp8_bytes, Some(err), Some(qerr)),
                        Err(e) => errors.push(format!("{path} {label} m={m}: {e:#}")),
                    }
                }
                let qx = quantize_activations(&x, per_token)?;
                for (path, kernel) in [
                    ("cublaslt-gemm-only", Fp8Kernel::CublasLt),
                    ("mma-gemm-only", Fp8Kernel::Mma),
                    ("wgmma-gemm-only", Fp8Kernel::Wgmma),
                ] {
                    if kernel == Fp8Kernel::Wgmma && !wgmma_runs {
                        continue;
                    }
                    let t = time(&mut |i| {
                        Ok(gemm_quantized(
                            &chans[i % c],
                            &qx,
                            cdev,
                            DType::BF16,
                            kernel,
                        )?)
                    })?;
                    push(path, t, fp8_bytes, None, None);
                }
                if wgmma_runs {
                    let mut w8a8 = |i: usize| -> Result<Tensor> {
                        let t = &chans[i % c];
                        Ok(matmul_with(t, &x, Some(per_token), Fp8Kernel::Wgmma)?)
                    };
                    let mut gemm = |i: usize| -> Result<Tensor> {
                        let t = &chans[i % c];
                        Ok(gemm_quantized(t, &qx, cdev, DType::BF16, Fp8Kernel::Wgmma)?)
                    };
                    let t = {
                        let _off = OffWhileAlive::new(dependent_launch::set_enabled);
                        time(&mut w8a8)?
                    };
                    push("wgmma-w8a8-serial", t, fp8_bytes, None, None);
                    // Session 34's schedule: split tiles summed through L2.
                    let (gemm, w8a8) = {
                        let _off = OffWhileAlive::new(qwgmma::set_cluster_sums);
                        (time(&mut gemm)?, time(&mut w8a8)?)
                    };
                    push("wgmma-gemm-only-stream-k", gemm, fp8_bytes, None, None);
                    push("wgmma-w8a8-stream-k", w8a8, fp8_bytes, None, None);
                }
                // (The closure's tensor is only held until the timing's synchronization.)
                let t = time(&mut |_| {
                    quantize_activations(&x, per_token)?;
                    Ok(x.clone())
                })?;
                // (The quantization moves x in and its codes and scales out.)
                push("quantize-only", t, m * k * 3 + 4 * m, None, None);
                let got = qmatmul(&wo[0], &x, QPath::Auto)?.to_device(&Device::Cpu)?;
                let qerr = rel_l2(&got, &bf16_y)?;
                let t = time(&mut |i| Ok(qmatmul(&wo[i % c], &x, QPath::Auto)?))?;
                push("weight-only", t, fp8_bytes, None, Some(qerr));
                eprintln!("  {label} m={m}: bf16 {bf16_us:.1} us");
            }
        }
        for (gi, (label, ns, k)) in super::parse_groups(&a.groups)?.into_iter().enumerate() {
            let label = format!(
                "{label} {}x{k}",
                ns.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join("+")
            );
            eprintln!("  {label}");
            let n_all: usize = ns.iter().sum();
            let ws: Vec<Tensor> = ns
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    Tensor::from_vec(
                        randn(2000 + 10 * gi as u64 + i as u64, n * k, 0.02),
                        (n, k),
                        &Device::Cpu,
                    )
                })
                .collect::<candle_core::Result<_>>()?;
            let fp8: Vec<Fp8Tensor> = ws
                .iter()
                .map(|w| Fp8Tensor::quantize(w, Fp8Strategy::Channel, DType::BF16))
                .collect::<Result<_, _>>()?;
            let sets: Vec<Vec<Fp8Tensor>> = (0..copies(n_all * k)).map(|_| fp8.clone()).collect();
            for t in sets.iter().flatten() {
                prepare(t, cdev)?;
            }
            let dense: Vec<Vec<Tensor>> = (0..copies(n_all * k * 2))
                .map(|_| {
                    ws.iter()
                        .map(|w| w.to_dtype(DType::BF16)?.to_device(dev))
                        .collect()
                })
                .collect::<candle_core::Result<_>>()?;
            for &m in &a.m {
                let x_cpu =
                    Tensor::from_vec(randn(11 + m as u64, m * k, 1.0), (m, k), &Device::Cpu)?
                        .to_dtype(DType::BF16)?;
                let x = x_cpu.to_device(dev)?;
                let x32: Vec<f32> = x_cpu.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let iters = if m <= 16 { 50 } else { 10 };
                let time = |f: &mut dyn FnMut(usize) -> Result<Tensor>| -> Result<Timing> {
                    time_calls(dev, iters, true, f)
                };
                let last = |ys: Vec<Tensor>| ys.into_iter().last().expect("2-3 weights");
                let group = |set: &[Fp8Tensor]| -> Result<Option<Vec<Tensor>>> {
                    let refs: Vec<&Fp8Tensor> = set.iter().collect();
                    Ok(fp8_gemm::matmul_group(&refs, &x)?)
                };
                let bf16 = time(&mut |i| {
                    let d = &dense[i % dense.len()];
                    Ok(last(
                        d.iter()
                            .map(|w| x.matmul(&w.t()?))
                            .collect::<candle_core::Result<_>>()?,
                    ))
                })?;
                let mut push = |path: &str, (us, us_graph): Timing, err: Option<f64>| {
                    rows.push(json!({
                        "format": if path == "cublas" { "bf16" } else { "fp8" },
                        "path": path, "shape": label, "n": n_all, "k": k, "m": m,
                        "us": us, "speedup_vs_bf16": bf16.0 / us, "us_graph": us_graph,
                        "speedup_vs_bf16_graph": bf16.1.zip(us_graph).map(|(b, u)| b / u),
                        "gbps": (n_all * k * if path == "cublas" { 2 } else { 1 }) as f64 / us / 1e3,
                        "rel_err": err, "quant_err_vs_bf16": null, "ok": err.is_none_or(|e| e <= 1e-2),
                    }));
                };
                push("cublas", bf16, None);
                let separate = time(&mut |i| {
                    let set = &sets[i % sets.len()];
                    Ok(last(fp8_gemm::with_shared_activations(|| {
                        set.iter()
                            .map(|t| matmul_with(t, &x, None, Fp8Kernel::Auto))
                            .collect::<Result<Vec<_>, _>>()
                    })?))
                })?;
                push("w8a8-separate", separate, None);
                // The grouped launch where the kernel takes the group (Hopper), checked first.
                let Some(ys) = group(&sets[0])? else {
                    continue;
                };
                let mut worst = 0f64;
                for (t, y) in fp8.iter().zip(&ys) {
                    let want = reference(t, &x32, m, ActQuant::DynamicPerToken)?;
                    worst = worst.max(rel_l2(&y.to_device(&Device::Cpu)?, &want)?);
                }
                if worst > 1e-2 {
                    failures.push(format!(
                        "w8a8-group {label} m={m}: rel err {worst:.2e} > 1e-2"
                    ));
                }
                let grouped =
                    time(&mut |i| Ok(last(group(&sets[i % sets.len()])?.expect("grouped above"))))?;
                push("w8a8-group", grouped, Some(worst));
                eprintln!("  {label} m={m}: bf16 {:.1} us", bf16.0);
            }
        }
        if let Some(p) = &a.peer {
            merge_peer_rows(p, &mut rows, |b| b["path"] == "cublas")?;
        }
        println!(
            "{:<12} {:<30} {:<28} {:>4} {:>9} {:>7} {:>9} {:>7} {:>7} {:>8} {:>8}",
            "format",
            "path",
            "shape",
            "m",
            "us",
            "x bf16",
            "us graph",
            "x bf16",
            "GB/s",
            "rel err",
            "vs bf16"
        );
        let e = |v: &Value| {
            v.as_f64()
                .map(|e| format!("{e:.1e}"))
                .unwrap_or_else(|| "-".into())
        };
        for r in &rows {
            println!(
                "{:<12} {:<30} {:<28} {:>4} {:>9.2} {:>7.2} {:>9.2} {:>7.2} {:>7.0} {:>8} {:>8}",
                r["format"].as_str().unwrap_or(""),
                r["path"].as_str().unwrap_or(""),
                r["shape"].as_str().unwrap_or(""),
                r["m"],
                r["us"].as_f64().unwrap_or(f64::NAN),
                r["speedup_vs_bf16"].as_f64().unwrap_or(f64::NAN),
                r["us_graph"].as_f64().unwrap_or(f64::NAN),
                r["speedup_vs_bf16_graph"].as_f64().unwrap_or(f64::NAN),
                r["gbps"].as_f64().unwrap_or(f64::NAN),
                e(&r["rel_err"]),
                e(&r["quant_err_vs_bf16"]),
            );
        }
        let outer_vec = outer_vec_in_use(cdev)?;
        eprintln!(
            "cuBLASLt {}: per-channel x per-token scales applied by {}",
            cublaslt_version(),
            if outer_vec {
                "cuBLASLt (outer vectors)"
            } else {
                "lorq's epilogue kernel"
            }
        );
        let report = json!({
            "card": card, "date": utc_date(), "command": command_line(),
            "cublaslt_version": cublaslt_version(), "outer_vec_scales": outer_vec,
            "note": "us: median wall time per call (device synchronized per batch of calls, weights rotated over copies larger than L2), activation quantization included except in the *-gemm-only rows; speedup_vs_bf16: bf16 cuBLAS us / us, same run; us_graph: the same calls replayed from one CUDA graph (GPU time without host launch overhead, as decode steps run; null where not capturable), speedup_vs_bf16_graph likewise; gbps: (weight + bf16 x + bf16 y bytes) / us (quantize-only: bf16 x + codes + scales); rel_err: L2 relative error vs the CPU reference of the same quantization; quant_err_vs_bf16: L2 relative difference from the bf16 product of the unquantized weight",
            "rows": rows,
        });
        if let Some(p) = &a.json {
            if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")?;
            eprintln!("wrote {}", p.display());
        }
        failures.extend(errors);
        if !failures.is_empty() {
            bail!(
                "{} FP8 checks failed:\n  {}",
                failures.len(),
                failures.join("\n  ")
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_groups;

    #[test]
    fn groups_parse_presets_and_specs() {
        let g = parse_groups(&["llama3-8b".into(), "512+256x1024".into()]).unwrap();
        assert_eq!(
            g,
            vec![
                ("q/k/v".to_string(), vec![4096, 1024, 1024], 4096),
                ("gate/up".to_string(), vec![14336, 14336], 4096),
                ("512+256x1024".to_string(), vec![512, 256], 1024),
            ]
        );
        assert!(parse_groups(&["none".into()]).unwrap().is_empty());
        for bad in ["4096x4096", "1+2+3+4x8", "0+4x8", "4+4x0", "q/k/v"] {
            let e = parse_groups(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
