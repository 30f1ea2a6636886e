//! `lorq bench kernels --device cuda`: GPU timings of `y = x · Wᵀ` (bf16 activations) for the
//! dense bf16 weight through cuBLAS (the baseline) and the bitsandbytes 4-bit formats through the
//! fused dequantize-GEMV and through dequantize + cuBLAS. Every kernel is first checked against
//! the CPU reference (lorq's CPU kernels, f32) on fresh random inputs; timings rotate over enough
//! weight copies to defeat the 50 MB L2 cache, and synchronize the device around each batch.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use lorq_quant::bnb4::{Bnb4Tensor, Bnb4Type};
use lorq_quant::cuda::bnb4::{matmul as bnb4_matmul, Bnb4Path, GEMV_MAX_M};
use lorq_quant::QuantTensor;
use serde_json::{json, Value};

use super::bench_kernels::{command_line, parse_shapes, randn, utc_date, BenchKernelsArgs};

/// ‖got − want‖₂ / ‖want‖₂ in f64 (NaN counts as infinitely wrong).
pub(crate) fn rel_l2(got: &Tensor, want: &Tensor) -> Result<f64> {
    let g: Vec<f32> = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let w: Vec<f32> = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in g.iter().zip(&w) {
        num += (f64::from(*a) - f64::from(*b)).powi(2);
        den += f64::from(*b).powi(2);
    }
    let e = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    Ok(if e.is_nan() || g.iter().any(|v| !v.is_finite()) {
        f64::INFINITY
    } else {
        e
    })
}

/// Median µs per call of `f(i)` (i rotating over the weight copies), `iters` calls per sample.
pub(crate) fn time_gpu(
    dev: &Device,
    samples: usize,
    iters: usize,
    mut f: impl FnMut(usize) -> Result<Tensor>,
) -> Result<f64> {
    for i in 0..3 {
        f(i)?;
    }
    dev.synchronize()?;
    let mut v = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        for i in 0..iters {
            f(i)?;
        }
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

pub(crate) fn card_name(dev: &Device) -> Result<String> {
    let Device::Cuda(c) = dev else {
        bail!("not a GPU")
    };
    Ok(c.cuda_stream().context().name()?)
}

pub fn run(a: &BenchKernelsArgs, dev: &Device) -> Result<()> {
    let shapes = parse_shapes(&a.shapes)?;
    let card = card_name(dev)?;
    eprintln!("lorq bench kernels on {card}");
    let mut rows: Vec<Value> = Vec::new();
    let mut failures = Vec::new();
    let fmts: [(&str, Bnb4Type, bool); 3] = [
        ("nf4", Bnb4Type::Nf4, false),
        ("nf4+dq", Bnb4Type::Nf4, true),
        ("fp4", Bnb4Type::Fp4, false),
    ];
    for (si, s) in shapes.iter().enumerate() {
        let (n, k) = (s.n, s.k);
        let label = match s.name {
            Some(p) => format!("{n}x{k} ({p})"),
            None => format!("{n}x{k}"),
        };
        let w_cpu = Tensor::from_vec(randn(1000 + si as u64, n * k, 0.02), (n, k), &Device::Cpu)?;
        // Enough copies of each weight that one pass over them overflows the L2 cache.
        let copies = |bytes: usize| (256usize << 20).div_ceil(bytes).clamp(1, 32);
        let w_bf16 = w_cpu.to_dtype(DType::BF16)?;
        let dense: Vec<Tensor> = (0..copies(n * k * 2))
            .map(|_| w_bf16.to_device(dev))
            .collect::<candle_core::Result<_>>()?;
        let mut quant: Vec<(&str, Vec<Bnb4Tensor>)> = Vec::new();
        for (name, ty, dq) in fmts {
            let t0 = Instant::now();
            let q = Bnb4Tensor::quantize(&w_cpu, ty, dq)?;
            let qs = t0.elapsed().as_secs_f64();
            let c = copies(q.bytes());
            eprintln!("  {label} {name}: quantized on the CPU in {qs:.2} s, {c} GPU copies");
            quant.push((name, vec![q; c]));
        }
        for &m in &a.m {
            let x_cpu = Tensor::from_vec(
                randn(7 + m as u64 + 31 * si as u64, m * k, 1.0),
                (m, k),
                &Device::Cpu,
            )?
            .to_dtype(DType::BF16)?;
            let x = x_cpu.to_device(dev)?;
            let x32_cpu = x_cpu.to_dtype(DType::F32)?;
            let check = m <= 64;
            let iters = if m <= 16 { 50 } else { 10 };
            // bf16 cuBLAS baseline, checked against the f32 CPU product of the same bf16 values.
            let bf16_err = if check {
                let want = x32_cpu.matmul(&w_bf16.to_dtype(DType::F32)?.t()?)?;
                let got = x.matmul(&dense[0].t()?)?.to_device(&Device::Cpu)?;
                Some(rel_l2(&got, &want)?)
            } else {
                None
            };
            let bf16_us = time_gpu(dev, 7, iters, |i| {
                Ok(x.matmul(&dense[i % dense.len()].t()?)?)
            })?;
            let wbytes = n * k * 2;
            let io = (m * k + m * n) * 2;
            let mut push =
                |format: &str, path: &str, us: f64, wb: usize, err: Option<f64>, tol: f64| {
                    let ok = err.is_none_or(|e| e <= tol);
                    if !ok {
                        failures.push(format!(
                            "{format} {path} {label} m={m}: rel err {err:?} > {tol}"
                        ));
                    }
                    rows.push(json!({
                        "format": format, "path": path, "shape": label, "n": n, "k": k, "m": m,
                        "us": us, "speedup_vs_bf16": bf16_us / us,
                        "gbps": (wb + io) as f64 / us / 1e3,
                        "rel_err": err, "tolerance": tol, "checked": err.is_some(), "ok": ok,
                    }));
                };
            push("bf16", "cublas", bf16_us, wbytes, bf16_err, 1e-2);
            for (name, qs) in &quant {
                let q0 = &qs[0];
                // The CPU reference: lorq's CPU kernel on the same bf16 activations, in f32.
                let want = if check {
                    Some(q0.matmul(&x32_cpu)?)
                } else {
                    None
                };
                let mut paths = vec![(Bnb4Path::Dequantize, "dequant+cublas")];
                if m <= GEMV_MAX_M {
                    paths.insert(0, (Bnb4Path::Fused, "fused-gemv"));
                }
                for (path, pname) in paths {
                    let err = match &want {
                        Some(w) => {
                            let got = bnb4_matmul(q0, &x, path)?.to_device(&Device::Cpu)?;
                            Some(rel_l2(&got, w)?)
                        }
                        None => None,
                    };
                    let us = time_gpu(dev, 7, iters, |i| {
                        Ok(bnb4_matmul(&qs[i % qs.len()], &x, path)?)
                    })?;
                    push(name, pname, us, q0.bytes(), err, 1e-2);
                }
            }
            // f32 activations through the fused kernel: the f32 bound (1e-5).
            if m <= 4 {
                let (name, qs) = &quant[1];
                let x32 = x32_cpu.to_device(dev)?;
                let want = qs[0].matmul(&x32_cpu)?;
                let got = bnb4_matmul(&qs[0], &x32, Bnb4Path::Fused)?.to_device(&Device::Cpu)?;
                let err = rel_l2(&got, &want)?;
                let us = time_gpu(dev, 7, iters, |i| {
                    Ok(bnb4_matmul(&qs[i % qs.len()], &x32, Bnb4Path::Fused)?)
                })?;
                push(
                    &format!("{name} (f32 x)"),
                    "fused-gemv",
                    us,
                    qs[0].bytes(),
                    Some(err),
                    1e-5,
                );
            }
            eprintln!("  {label} m={m}: bf16 {bf16_us:.1} us");
        }
    }
    if let Some(p) = &a.peer {
        let peer: Value = serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?;
        for r in peer["rows"].as_array().into_iter().flatten() {
            let mut r = r.clone();
            let base = rows.iter().find(|b| {
                b["format"] == "bf16" && b["n"] == r["n"] && b["k"] == r["k"] && b["m"] == r["m"]
            });
            if let (Some(b), Some(us)) = (base, r["us"].as_f64()) {
                r["speedup_vs_bf16"] = json!(b["us"].as_f64().unwrap_or(f64::NAN) / us);
                r["shape"] = b["shape"].clone();
            }
            rows.push(r);
        }
    }
    println!(
        "{:<22} {:<15} {:<28} {:>4} {:>10} {:>8} {:>8} {:>9}",
        "format", "path", "shape", "m", "us", "x bf16", "GB/s", "rel err"
    );
    for r in &rows {
        println!(
            "{:<22} {:<15} {:<28} {:>4} {:>10.2} {:>8.2} {:>8.0} {:>9}",
            r["format"].as_str().unwrap_or(""),
            r["path"].as_str().unwrap_or(""),
            r["shape"].as_str().unwrap_or(""),
            r["m"],
            r["us"].as_f64().unwrap_or(f64::NAN),
            r["speedup_vs_bf16"].as_f64().unwrap_or(f64::NAN),
            r["gbps"].as_f64().unwrap_or(f64::NAN),
            r["rel_err"]
                .as_f64()
                .map(|e| format!("{e:.1e}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let report = json!({
        "card": card, "date": utc_date(), "command": command_line(),
        "note": "us: median wall time per call (device synchronized per batch of calls, weights rotated over copies larger than L2); gbps: (weight + x + y bytes) / us; rel_err: L2 relative error vs the CPU reference (m <= 64)",
        "rows": rows,
    });
    if let Some(p) = &a.json {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")?;
        eprintln!("wrote {}", p.display());
    }
    if !failures.is_empty() {
        bail!(
            "{} GPU checks failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}
