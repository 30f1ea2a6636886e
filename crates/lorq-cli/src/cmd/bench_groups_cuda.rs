//! `lorq bench kernels --device cuda --groups`: GPU timings of the weights of a layer that share
//! an input (q/k/v, gate/up) as the groups a decode step multiplies — lorq's automatic grouped
//! product, the 4-bit wgmma kernel in one launch for the group and in one launch per weight —
//! against bf16 cuBLAS on the weights concatenated (the fused projections vLLM and TGI load).
//! Every product is first checked against the CPU reference of each weight.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use lorq_quant::cuda::qgemv::{matmul_group, DeviceLayout};
use lorq_quant::cuda::qwgmma;
use serde_json::Value;

use super::bench_kernels::{copies_past_l2 as copies, randn, BenchKernelsArgs};
use super::bench_kernels_cuda::{
    bf16_baseline, gpu_formats, path_wanted, rel_l2, time_path, timing_row, OffWhileAlive,
    CHECK_MAX_M,
};

/// The groups of a `--shapes` preset: (name, output rows of each weight, K).
fn preset_groups(preset: &str) -> &'static [(&'static str, &'static [usize], usize)] {
    match preset {
        "llama3-8b" => &[
            ("q+k+v", &[4096, 1024, 1024], 4096),
            ("gate+up", &[14336, 14336], 4096),
        ],
        "smollm2" => &[
            ("q+k+v", &[576, 192, 192], 576),
            ("gate+up", &[1536, 1536], 576),
        ],
        _ => &[],
    }
}

/// Refuses `--groups` without a model preset among `--shapes` (it would time nothing), before
/// the single weights' rows take their minutes.
pub(crate) fn check_args(a: &BenchKernelsArgs) -> Result<()> {
    if a.groups && a.shapes.iter().all(|s| preset_groups(s.trim()).is_empty()) {
        bail!(
            "--groups times the groups of a model preset (llama3-8b, smollm2); --shapes {} has none",
            a.shapes.join(",")
        );
    }
    Ok(())
}

/// Appends the group rows of every `--shapes` preset to `rows` (failed checks to `failures`).
pub(crate) fn run(
    a: &BenchKernelsArgs,
    dev: &Device,
    rows: &mut Vec<Value>,
    failures: &mut Vec<String>,
) -> Result<()> {
    let cdev = dev.as_cuda_device()?;
    for (gi, &(gname, ns, k)) in a
        .shapes
        .iter()
        .flat_map(|s| preset_groups(s.trim()))
        .enumerate()
    {
        let n: usize = ns.iter().sum();
        let label = format!("{n}x{k} ({gname})");
        eprintln!("  {label}");
        let ws_cpu = ns
            .iter()
            .enumerate()
            .map(|(j, &nj)| {
                let seed = 5000 + 10 * gi as u64 + j as u64;
                Tensor::from_vec(randn(seed, nj * k, 0.02), (nj, k), &Device::Cpu)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let cat = Tensor::cat(&ws_cpu, 0)?.to_dtype(DType::BF16)?;
        let dense = (0..copies(n * k * 2))
            .map(|_| cat.to_device(dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Each format's layouts of the group's weights (the same format for all), the CPU
        // reference weights, and the device copies.
        let per_weight = ws_cpu
            .iter()
            .map(|w| gpu_formats(w, &a.methods))
            .collect::<Result<Vec<_>>>()?;
        let mut formats = Vec::new();
        for (fi, (name, _)) in per_weight[0].iter().enumerate() {
            // (Act-order: one column order for the K, as a checkpoint's q/k/v share theirs.)
            let layouts: Vec<_> = per_weight.iter().map(|f| &f[fi].1).collect();
            let wref = layouts
                .iter()
                .map(|l| Tensor::from_vec(l.dequantize_f32(), (l.n, k), &Device::Cpu))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let bytes: usize = layouts.iter().map(|l| l.device_bytes()).sum();
            let sets = (0..copies(bytes))
                .map(|_| {
                    layouts
                        .iter()
                        .map(|l| DeviceLayout::upload(l, cdev))
                        .collect::<Result<Vec<_>, _>>()
                })
                .collect::<Result<Vec<_>, _>>()?;
            formats.push((name.clone(), sets, Tensor::cat(&wref, 0)?, bytes));
        }
        for &m in &a.m {
            let x_cpu = Tensor::from_vec(randn(70 + m as u64, m * k, 1.0), (m, k), &Device::Cpu)?
                .to_dtype(DType::BF16)?;
            let x = x_cpu.to_device(dev)?;
            let x32 = x_cpu.to_dtype(DType::F32)?;
            let check = m <= CHECK_MAX_M;
            let time = |what: &str, f: &mut dyn FnMut(usize) -> Result<Tensor>| {
                time_path(a, dev, (&label, m), what, f)
            };
            let (bf16, bf16_err) = bf16_baseline(a, dev, (&label, m), (&x, &x32), (&dense, &cat))?;
            let io = (m * k + m * n) * 2;
            let mut push = |format: &str, path: &str, t, wb: usize, err: Option<f64>| {
                let (row, failure) = timing_row(
                    (format, path, &label),
                    (n, k, m),
                    (t, bf16),
                    wb + io,
                    (err, 1e-2),
                );
                rows.push(row);
                failures.extend(failure);
            };
            push("bf16", "cublas", bf16, n * k * 2, bf16_err);
            for (name, sets, wref, bytes) in &formats {
                let want = if check {
                    Some(x32.matmul(&wref.t()?)?)
                } else {
                    None
                };
                let product = |ws: &[DeviceLayout], wgmma: bool| -> Result<Vec<Tensor>> {
                    let refs: Vec<&DeviceLayout> = ws.iter().collect();
                    Ok(if wgmma {
                        qwgmma::matmul_group(cdev, &refs, &x, m)?
                    } else {
                        matmul_group(&refs, &x)?.context("the group was not one product")?
                    })
                };
                let grouped = matmul_group(&sets[0].iter().collect::<Vec<_>>(), &x)?.is_some();
                let mut paths = Vec::new();
                if grouped {
                    paths.push(("auto", false));
                }
                if m >= 2 && sets[0].iter().all(|w| qwgmma::supports(w, cdev)) {
                    paths.extend([("qwgmma", true), ("qwgmma-apart", true)]);
                }
                paths.retain(|(p, _)| path_wanted(&a.paths, p));
                for (path, wgmma) in paths {
                    let _apart = (path == "qwgmma-apart")
                        .then(|| OffWhileAlive::new(qwgmma::set_grouped_launches));
                    // Checked with the group's outputs side by side, as the concatenated
                    // weight's; timed without that copy.
                    let err = match &want {
                        Some(w) => {
                            let y = Tensor::cat(&product(&sets[0], wgmma)?, 1)?;
                            Some(rel_l2(&y.to_device(&Device::Cpu)?, w)?)
                        }
                        None => None,
                    };
                    let t = time(&format!("{name} {path}"), &mut |i| {
                        Ok(product(&sets[i % sets.len()], wgmma)?.remove(0))
                    })?;
                    push(name, path, t, *bytes, err);
                }
            }
            eprintln!("  {label} m={m}: bf16 {:.1} us", bf16.0);
        }
    }
    Ok(())
}
