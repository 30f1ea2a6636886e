//! `lorq bench kernels --device cuda`: GPU timings of `y = x · Wᵀ` (bf16 activations) for the
//! dense bf16 weight through cuBLAS (the baseline) and every weight-only format in the packed GPU
//! layout — each fused GEMV launch shape, the tensor-core kernels, the automatic choice, and
//! dequantize + cuBLAS — plus bitsandbytes' own 4-bit layout through its first fused kernel. Every
//! kernel is first checked against the CPU reference (lorq's CPU kernels, f32) on fresh random
//! inputs; timings rotate over enough weight copies to defeat the 50 MB L2 cache, and synchronize
//! the device around each batch.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use lorq_quant::bnb4::{Bnb4Tensor, Bnb4Type};
use lorq_quant::cuda::bnb4::{matmul as bnb4_matmul, Bnb4Path, GEMV_MAX_M};
use lorq_quant::cuda::dense_gemv::{gemv as dense_gemv, MAX_ROWS as DENSE_GEMV_MAX_ROWS};
use lorq_quant::cuda::qgemv::{
    matmul as qmatmul, mr_for, DeviceLayout, QPath, Variant, QGEMV_MAX_M, QMMA_MAX_M,
};
use lorq_quant::cuda::{qmma_tiled, qwgmma};
use lorq_quant::gpu_layout::GpuLayout;
use lorq_quant::method::QuantMethod;
use lorq_quant::QuantTensor;
use serde_json::{json, Value};

use super::bench_kernels::{
    command_line, copies_past_l2 as copies, parse_shapes, randn, utc_date, BenchKernelsArgs,
};
use super::bench_peer::merge_peer_rows;

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
    // Warm-up: 3 calls and at least 50 ms of them, so that a GPU left idle (and clocked down)
    // by the CPU reference check is back at its clocks before the samples.
    let warm = Instant::now();
    let mut i = 0;
    while i < 3 || warm.elapsed().as_millis() < 50 {
        f(i)?;
        i += 1;
        if i % 8 == 0 {
            dev.synchronize()?;
        }
    }
    dev.synchronize()?;
    median_of(samples, || {
        let t = Instant::now();
        for i in 0..iters {
            f(i)?;
        }
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e6 / iters as f64)
    })
}

/// The median of `samples` values of `sample()`.
fn median_of(samples: usize, mut sample: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut v = (0..samples.max(1))
        .map(|_| sample())
        .collect::<Result<Vec<f64>>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Median µs per call of `f(i)` replayed from one CUDA graph of `iters` calls: the GPU's time
/// without the host's launch and allocation overhead (what decode steps, which replay graphs,
/// pay). `None`, with a warning, where the work cannot be captured. Call it after
/// [`time_gpu`] has run the same calls (weights uploaded: a capture cannot upload).
pub(crate) fn time_gpu_graph(
    dev: &Device,
    samples: usize,
    iters: usize,
    mut f: impl FnMut(usize) -> Result<Tensor>,
) -> Option<f64> {
    let Device::Cuda(c) = dev else {
        return None;
    };
    let captured = lorq_quant::cuda::graph::capture(c, || -> Result<()> {
        for i in 0..iters {
            f(i)?;
        }
        Ok(())
    });
    let graph = match captured {
        Ok((g, ())) => g,
        Err(e) => {
            tracing::warn!("bench: this path cannot be captured in a CUDA graph ({e:#})");
            return None;
        }
    };
    let run = || -> Result<f64> {
        let t = Instant::now();
        graph.replay()?;
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e6 / iters as f64)
    };
    run().ok()?;
    median_of(samples, run).ok()
}

/// `(us, us_graph)`: wall time per call, and the GPU time of the same calls replayed from a CUDA
/// graph (`None`: not asked for, or the path cannot be captured).
pub(crate) type CallTiming = (f64, Option<f64>);

/// [`time_gpu`] of `f`, then, when `graph`, [`time_gpu_graph`] of the same calls.
pub(crate) fn time_calls(
    dev: &Device,
    iters: usize,
    graph: bool,
    f: &mut dyn FnMut(usize) -> Result<Tensor>,
) -> Result<CallTiming> {
    let us = time_gpu(dev, 7, iters, &mut *f)?;
    Ok((
        us,
        graph.then(|| time_gpu_graph(dev, 7, iters, f)).flatten(),
    ))
}

pub(crate) fn card_name(dev: &Device) -> Result<String> {
    let Device::Cuda(c) = dev else {
        bail!("not a GPU")
    };
    Ok(c.cuda_stream().context().name()?)
}

/// A process or thread switch turned off while it lives, on again after (the benches' rows
/// without a kernel feature: `qwgmma-serial`, `qwgmma-stream-k`, `wgmma-*-serial` ...).
pub(crate) struct OffWhileAlive(fn(bool));

impl OffWhileAlive {
    pub(crate) fn new(set: fn(bool)) -> Self {
        set(false);
        Self(set)
    }
}

impl Drop for OffWhileAlive {
    fn drop(&mut self) {
        (self.0)(true);
    }
}

/// Rows up to which every path is checked against the CPU reference, where the tensor-core
/// kernels run (the CPU product is slow).
pub(crate) const CHECK_MAX_M: usize = 128;

/// Times `f` (one call per weight copy `i`) as `what` on `label`'s weight at `m` rows: 50 calls
/// a sample up to 16 rows, 10 past. With `--gpu-time` the path is named first, so that one whose
/// graph capture fails is known.
pub(crate) fn time_path(
    a: &BenchKernelsArgs,
    dev: &Device,
    (label, m): (&str, usize),
    what: &str,
    f: &mut dyn FnMut(usize) -> Result<Tensor>,
) -> Result<CallTiming> {
    if a.gpu_time {
        eprintln!("    {label} m={m}: {what}");
    }
    time_calls(dev, if m <= 16 { 50 } else { 10 }, a.gpu_time, f)
}

/// The baseline of every row: bf16 cuBLAS on the `dense` copies of `w_bf16` (a CPU tensor) at
/// `x`'s rows, timed, and up to [`CHECK_MAX_M`] rows checked against the f32 CPU product of the
/// same bf16 values (`x32`).
pub(crate) fn bf16_baseline(
    a: &BenchKernelsArgs,
    dev: &Device,
    (label, m): (&str, usize),
    (x, x32): (&Tensor, &Tensor),
    (dense, w_bf16): (&[Tensor], &Tensor),
) -> Result<(CallTiming, Option<f64>)> {
    let err = if m <= CHECK_MAX_M {
        let want = x32.matmul(&w_bf16.to_dtype(DType::F32)?.t()?)?;
        let got = x.matmul(&dense[0].t()?)?.to_device(&Device::Cpu)?;
        Some(rel_l2(&got, &want)?)
    } else {
        None
    };
    let t = time_path(a, dev, (label, m), "bf16 cublas", &mut |i| {
        Ok(x.matmul(&dense[i % dense.len()].t()?)?)
    })?;
    Ok((t, err))
}

/// One row of the report: `format`'s `path` on the `[n, k]` weight(s) `shape` at `m` rows, timed
/// `t` against bf16 cuBLAS's `bf16` in the same call, moving `bytes` (weights, x, y) per call,
/// with its relative error against the CPU reference (`None`: not checked) and the tolerance;
/// and the failure to report where the error is above it.
pub(crate) fn timing_row(
    (format, path, shape): (&str, &str, &str),
    (n, k, m): (usize, usize, usize),
    ((us, us_graph), bf16): (CallTiming, CallTiming),
    bytes: usize,
    (err, tol): (Option<f64>, f64),
) -> (Value, Option<String>) {
    let ok = err.is_none_or(|e| e <= tol);
    let row = json!({
        "format": format, "path": path, "shape": shape, "n": n, "k": k, "m": m,
        "us": us, "speedup_vs_bf16": bf16.0 / us,
        "gbps": bytes as f64 / us / 1e3,
        "us_graph": us_graph,
        "speedup_vs_bf16_graph": bf16.1.zip(us_graph).map(|(b, u)| b / u),
        "gbps_graph": us_graph.map(|u| bytes as f64 / u / 1e3),
        "rel_err": err, "tolerance": tol, "checked": err.is_some(), "ok": ok,
    });
    let failure = (!ok).then(|| format!("{format} {path} {shape} m={m}: rel err {err:?} > {tol}"));
    (row, failure)
}

/// Whether `--paths` asks for `path` (no filter: every path; `name*` matches a prefix).
pub(crate) fn path_wanted(paths: &Option<Vec<String>>, path: &str) -> bool {
    paths.as_ref().is_none_or(|ps| {
        ps.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => p == path,
        })
    })
}

/// The formats timed on the GPU: `(name, layout)` from one random weight. `--methods` (LoRAX
/// names) narrows the JIT ones; GPTQ/AWQ come as round-to-nearest weights (speed does not depend on
/// how codes were chosen), act-order as a seeded random column order.
pub(crate) fn gpu_formats(
    w: &Tensor,
    methods: &Option<Vec<String>>,
) -> Result<Vec<(String, GpuLayout)>> {
    use lorq_quant::gptq::quantize::{rtn_gptq, GptqParams};
    let (n, k) = w.dims2()?;
    let wanted = |name: &str| methods.as_ref().is_none_or(|m| m.iter().any(|x| x == name));
    let mut out = Vec::new();
    let pack = |name: &str, t: &dyn QuantTensor| -> Result<(String, GpuLayout)> {
        let t0 = Instant::now();
        let l = t.gpu_layout()?;
        eprintln!("    {name}: packed in {:.2} s", t0.elapsed().as_secs_f64());
        Ok((name.to_string(), l))
    };
    for (label, method) in [
        ("nf4", "bitsandbytes-nf4"),
        ("fp4", "bitsandbytes-fp4"),
        ("int8", "bitsandbytes"),
        ("eetq", "eetq"),
        ("fp8", "fp8"),
        ("hqq-4bit", "hqq-4bit"),
        ("hqq-3bit", "hqq-3bit"),
        ("hqq-2bit", "hqq-2bit"),
    ] {
        if wanted(method) {
            let t0 = Instant::now();
            let q = QuantMethod::parse(method)?
                .context("a JIT method")?
                .quantize(w)?;
            eprintln!(
                "    {label}: quantized on the CPU in {:.2} s",
                t0.elapsed().as_secs_f64()
            );
            out.push(pack(label, q.as_ref())?);
        }
    }
    let w32: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if wanted("gptq") {
        for bits in [4u32, 8] {
            let p = GptqParams {
                bits,
                ..GptqParams::default()
            };
            let q = rtn_gptq(&w32, n, k, &p, "bench")?;
            out.push(pack(&format!("gptq-{bits}bit"), &q)?);
            if bits == 4 {
                // Act-order: the same codes with columns visited in a seeded random order.
                let mut l = q.gpu_layout()?;
                let mut perm: Vec<u32> = (0..k as u32).collect();
                let r = randn(77, k, 1.0);
                perm.sort_by(|&a, &b| r[a as usize].total_cmp(&r[b as usize]));
                l.perm = Some(perm);
                out.push(("gptq-4bit-act-order".into(), l));
            }
        }
    }
    if wanted("awq") && n % 8 == 0 {
        let q = lorq_quant::awq::AwqTensor::quantize(&w32, n, k, 128, "bench")?;
        out.push(pack("awq-4bit", &q)?);
    }
    Ok(out)
}

pub fn run(a: &BenchKernelsArgs, dev: &Device) -> Result<()> {
    let shapes = parse_shapes(&a.shapes)?;
    super::bench_groups_cuda::check_args(a)?;
    let card = card_name(dev)?;
    let cdev = dev.as_cuda_device()?;
    eprintln!("lorq bench kernels on {card}");
    let mut rows: Vec<Value> = Vec::new();
    let mut failures = Vec::new();
    // bitsandbytes' own layout read in place (the first kernel; the model now takes the packed one).
    let legacy: [(&str, Bnb4Type, bool); 2] = [
        ("nf4 (bnb layout)", Bnb4Type::Nf4, false),
        ("nf4+dq (bnb layout)", Bnb4Type::Nf4, true),
    ];
    for (si, s) in shapes.iter().enumerate() {
        let (n, k) = (s.n, s.k);
        let label = match s.name {
            Some(p) => format!("{n}x{k} ({p})"),
            None => format!("{n}x{k}"),
        };
        eprintln!("  {label}");
        let w_cpu = Tensor::from_vec(randn(1000 + si as u64, n * k, 0.02), (n, k), &Device::Cpu)?;
        let w_bf16 = w_cpu.to_dtype(DType::BF16)?;
        let dense: Vec<Tensor> = (0..copies(n * k * 2))
            .map(|_| w_bf16.to_device(dev))
            .collect::<candle_core::Result<_>>()?;
        // bitsandbytes' own layout through the first fused kernel (kernels/bnb4.cu).
        let mut bnb: Vec<(&str, Vec<Bnb4Tensor>)> = Vec::new();
        for (name, ty, dq) in legacy {
            let q = Bnb4Tensor::quantize(&w_cpu, ty, dq)?;
            let c = copies(q.bytes());
            bnb.push((name, vec![q; c]));
        }
        // Every format in the packed layout (kernels/qgemv.cu), with its CPU reference weight.
        let mut packed: Vec<(String, Vec<DeviceLayout>, Tensor, usize)> = Vec::new();
        for (name, l) in gpu_formats(&w_cpu, &a.methods)? {
            let wref = Tensor::from_vec(l.dequantize_f32(), (n, k), &Device::Cpu)?;
            let c = copies(l.device_bytes());
            let dls = (0..c)
                .map(|_| DeviceLayout::upload(&l, cdev))
                .collect::<Result<Vec<_>, _>>()?;
            packed.push((name, dls, wref, l.device_bytes()));
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
            let check = m <= CHECK_MAX_M;
            let time = |what: &str, f: &mut dyn FnMut(usize) -> Result<Tensor>| {
                time_path(a, dev, (&label, m), what, f)
            };
            let (bf16, bf16_err) =
                bf16_baseline(a, dev, (&label, m), (&x, &x32_cpu), (&dense, &w_bf16))?;
            let bf16_us = bf16.0;
            let wbytes = n * k * 2;
            let io = (m * k + m * n) * 2;
            let mut push =
                |format: &str, path: &str, t: CallTiming, wb: usize, err: Option<f64>, tol: f64| {
                    let (row, failure) = timing_row(
                        (format, path, &label),
                        (n, k, m),
                        (t, bf16),
                        wb + io,
                        (err, tol),
                    );
                    rows.push(row);
                    failures.extend(failure);
                };
            push("bf16", "cublas", bf16, wbytes, bf16_err, 1e-2);
            // lorq's dense GEMV (what an unquantized linear runs at these rows).
            if m <= DENSE_GEMV_MAX_ROWS && path_wanted(&a.paths, "gemv") {
                let gemv = |w: &Tensor| -> Result<Tensor> {
                    dense_gemv(&x, w)?.context("the dense GEMV declined a bf16 weight")
                };
                let err = if check {
                    let want = x32_cpu.matmul(&w_bf16.to_dtype(DType::F32)?.t()?)?;
                    Some(rel_l2(&gemv(&dense[0])?.to_device(&Device::Cpu)?, &want)?)
                } else {
                    None
                };
                let t = time("bf16 gemv", &mut |i| gemv(&dense[i % dense.len()]))?;
                push("bf16", "gemv", t, wbytes, err, 1e-2);
            }
            for (name, qs) in &bnb {
                if m > GEMV_MAX_M || !path_wanted(&a.paths, "bnb4-gemv") {
                    continue;
                }
                let q0 = &qs[0];
                let err = if check {
                    let want = q0.matmul(&x32_cpu)?;
                    let got = bnb4_matmul(q0, &x, Bnb4Path::Fused)?.to_device(&Device::Cpu)?;
                    Some(rel_l2(&got, &want)?)
                } else {
                    None
                };
                let t = time(&format!("{name} bnb4-gemv"), &mut |i| {
                    Ok(bnb4_matmul(&qs[i % qs.len()], &x, Bnb4Path::Fused)?)
                })?;
                push(name, "bnb4-gemv", t, q0.bytes(), err, 1e-2);
            }
            for (name, dls, wref, wb) in &packed {
                let want = if check {
                    Some(x32_cpu.matmul(&wref.t()?)?)
                } else {
                    None
                };
                let mut paths = vec![(QPath::Auto, "auto".to_string())];
                paths.push((QPath::Dequantize, "dequant+cublas".into()));
                if (2..=QMMA_MAX_M).contains(&m) {
                    paths.push((QPath::Mma, "qmma".into()));
                }
                if qmma_tiled::supports(&dls[0]) {
                    paths.push((QPath::MmaTiled, "qmma-tiled".into()));
                    if qmma_tiled::folds(&dls[0], m) {
                        paths.push((QPath::MmaTiledPerWeight, "qmma-tiled-per-weight".into()));
                    }
                }
                if m >= 2 && qwgmma::supports(&dls[0], cdev) {
                    paths.push((QPath::Wgmma, "qwgmma".into()));
                    // The same kernel launched after its activation permute ends (no dependent
                    // launch): what the overlap brings.
                    paths.push((QPath::Wgmma, "qwgmma-serial".into()));
                    // Split tiles summed through L2 partial sums (stream-K) instead of in
                    // thread-block clusters: what the cluster sums bring.
                    paths.push((QPath::Wgmma, "qwgmma-stream-k".into()));
                }
                if m <= QGEMV_MAX_M {
                    for v in Variant::ALL
                        .into_iter()
                        .filter(|v| v.compiled(&dls[0], mr_for(m), DType::BF16))
                    {
                        paths.push((QPath::Fused(v), format!("qgemv-{}", v.name())));
                    }
                }
                paths.retain(|(_, pname)| path_wanted(&a.paths, pname));
                for (path, pname) in paths {
                    let _off = match pname.as_str() {
                        "qwgmma-serial" => Some(OffWhileAlive::new(
                            lorq_quant::cuda::dependent_launch::set_enabled,
                        )),
                        "qwgmma-stream-k" => Some(OffWhileAlive::new(qwgmma::set_cluster_sums)),
                        _ => None,
                    };
                    let err = match &want {
                        Some(w) => {
                            let got = qmatmul(&dls[0], &x, path)?.to_device(&Device::Cpu)?;
                            Some(rel_l2(&got, w)?)
                        }
                        None => None,
                    };
                    let t = time(&format!("{name} {pname}"), &mut |i| {
                        Ok(qmatmul(&dls[i % dls.len()], &x, path)?)
                    })?;
                    push(name, &pname, t, *wb, err, 1e-2);
                }
            }
            eprintln!("  {label} m={m}: bf16 {bf16_us:.1} us");
        }
    }
    if a.groups {
        super::bench_groups_cuda::run(a, dev, &mut rows, &mut failures)?;
    }
    if let Some(p) = &a.peer {
        merge_peer_rows(p, &mut rows, |b| b["format"] == "bf16")?;
    }
    println!(
        "{:<22} {:<15} {:<28} {:>4} {:>10} {:>8} {:>8} {:>10} {:>8} {:>9}",
        "format", "path", "shape", "m", "us", "x bf16", "GB/s", "graph us", "x (graph)", "rel err"
    );
    let num = |v: &Value, prec: usize| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |x| format!("{x:.prec$}"))
    };
    for r in &rows {
        println!(
            "{:<22} {:<15} {:<28} {:>4} {:>10.2} {:>8.2} {:>8.0} {:>10} {:>8} {:>9}",
            r["format"].as_str().unwrap_or(""),
            r["path"].as_str().unwrap_or(""),
            r["shape"].as_str().unwrap_or(""),
            r["m"],
            r["us"].as_f64().unwrap_or(f64::NAN),
            r["speedup_vs_bf16"].as_f64().unwrap_or(f64::NAN),
            r["gbps"].as_f64().unwrap_or(f64::NAN),
            num(&r["us_graph"], 2),
            num(&r["speedup_vs_bf16_graph"], 2),
            r["rel_err"]
                .as_f64()
                .map(|e| format!("{e:.1e}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let report = json!({
        "card": card, "date": utc_date(), "command": command_line(),
        "note": "us: median wall time per call (device synchronized per batch of calls, weights rotated over copies larger than L2); us_graph (--gpu-time): median GPU time per call of the same calls replayed from one CUDA graph, speedup_vs_bf16_graph against bf16 cuBLAS timed the same way; gbps: (weight + x + y bytes) / us; rel_err: L2 relative error vs the CPU reference (m <= 128)",
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
