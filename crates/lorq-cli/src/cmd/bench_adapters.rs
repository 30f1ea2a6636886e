//! `lorq bench adapters`: what many LoRA adapters in one batch cost on top of the base matmul, for
//! Llama-3-8B's q_proj (4096→4096), gate_proj (4096→14336) and down_proj (14336→4096) at a few
//! batch sizes and numbers of distinct adapters. `lora_us` is `BatchAdapters::apply` alone (on a
//! GPU: one shrink + one expand launch and the per-call table upload); `base_us` the dense base
//! matmul (bf16 cuBLAS on a GPU, f32 on the CPU); `loop_us` the per-segment candle matmuls the
//! GPU path used before (for comparison). On a GPU every configuration is first checked against
//! the CPU path. Weights and adapters rotate over copies larger than the L2 cache: in a decode
//! step the rest of the model passes between two calls of one layer's module.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use lorq_lora::{BatchAdapters, LoraAdapter, LoraConfig, LoraModule};
use serde_json::{json, Value};

use super::bench_kernels::{command_line, utc_date};

#[derive(Debug, Args)]
#[command(
    after_help = "Rows of a batch are grouped by adapter (row i uses adapter i mod N, rows \
sorted by adapter), as a scheduler that orders its batch would. With N >= batch every row has its \
own adapter (decode with all-distinct adapters).

Example:
  lorq bench adapters --device cuda --batch-sizes 32,64 --adapters 1,8,32,64 --rank 16 --json docs/bench/adapters-h100.json"
)]
pub struct BenchAdaptersArgs {
    /// `cuda[:N]` (bf16 activations and base weight) or `cpu` (f32).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Rows per call (decode: one token per sequence).
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    pub batch_sizes: Vec<usize>,
    /// Distinct adapters in the batch.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub adapters: Vec<usize>,
    /// LoRA rank of every adapter.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Stored dtype of the adapters' A/B: bf16 (what fine-tuning in bf16 saves) or f32 (PEFT's
    /// default save).
    #[arg(long, default_value = "bf16")]
    pub adapter_dtype: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// (name, out features n, in features k) of Llama-3-8B's timed linears.
/// `tiny` (64→64) moves almost no bytes: its `lora_us` is the fixed cost of a call (table built
/// and uploaded, two launches).
const MODULES: [(&str, usize, usize); 4] = [
    ("q_proj", 4096, 4096),
    ("gate_proj", 14336, 4096),
    ("down_proj", 4096, 14336),
    ("tiny", 64, 64),
];
const MODULE_PATH: &str = "model.layers.0.self_attn.q_proj";

fn adapter(a: Tensor, b: Tensor, rank: usize, i: usize) -> Result<Arc<LoraAdapter>> {
    let config = LoraConfig::parse(
        &format!(
            r#"{{"r": {rank}, "lora_alpha": {}, "target_modules": ["q_proj"]}}"#,
            2 * rank
        ),
        Path::new("bench"),
    )?;
    let mut m = HashMap::new();
    m.insert(MODULE_PATH.to_string(), LoraModule::low_rank(a, b, 2.0));
    Ok(Arc::new(LoraAdapter::from_modules(
        PathBuf::from(format!("bench-{i}")),
        config,
        m,
    )?))
}

/// The batch: row i uses adapter i mod `count`, rows grouped by adapter.
fn batch_of(adapters: &[Arc<LoraAdapter>], rows: usize) -> BatchAdapters {
    let count = adapters.len();
    let mut b = BatchAdapters::new();
    for (ai, ad) in adapters.iter().enumerate() {
        let n = rows / count + usize::from(ai < rows % count);
        b.push(n, Some(ad.clone()));
    }
    b
}

/// The GPU path the kernels replace: per segment `scale·B(A·x)` with candle matmuls, then one
/// concatenation and addition.
fn per_segment_loop(b: &BatchAdapters, x: &Tensor, base: &Tensor) -> Result<Tensor> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for s in b.segments() {
        let m = s
            .adapter
            .as_ref()
            .and_then(|a| a.module(MODULE_PATH))
            .expect("every bench row has an adapter");
        pieces.push(m.delta(&x.narrow(0, start, s.rows)?.to_dtype(DType::F32)?)?);
        start += s.rows;
    }
    Ok((base.to_dtype(DType::F32)? + Tensor::cat(&pieces, 0)?)?.to_dtype(base.dtype())?)
}

/// Median µs per call on a GPU (the lead's helper); on the CPU the best of 3 samples of `iters`
/// calls, after one warm-up call.
fn time_us(dev: &Device, iters: usize, mut f: impl FnMut(usize) -> Result<Tensor>) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        return super::bench_kernels_cuda::time_gpu(dev, 7, iters, f);
    }
    let _ = dev;
    f(0)?;
    let iters = iters.max(1);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        for i in 0..iters {
            f(i)?;
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
    }
    Ok(best)
}

/// ‖got − want‖ / ‖want‖ of the deltas `got − base`, `want − base` (f32).
fn delta_rel_err(got: &Tensor, want: &Tensor, base: &Tensor) -> Result<f64> {
    let f = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    };
    let (g, w, b) = (f(got)?, f(want)?, f(base)?);
    let (mut num, mut den) = (0f64, 0f64);
    for ((g, w), b) in g.iter().zip(&w).zip(&b) {
        let (dg, dw) = (f64::from(*g - *b), f64::from(*w - *b));
        num += (dg - dw).powi(2);
        den += dw.powi(2);
    }
    let e = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    Ok(if e.is_finite() { e } else { f64::INFINITY })
}

fn card(dev: &Device) -> Result<String> {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        return super::bench_kernels_cuda::card_name(dev);
    }
    let _ = dev;
    Ok(format!("cpu ({} threads)", host_threads()))
}

fn host_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn run(a: &BenchAdaptersArgs, dev: &Device) -> Result<()> {
    if a.batch_sizes.is_empty() || a.batch_sizes.contains(&0) {
        bail!("--batch-sizes needs positive row counts");
    }
    if a.adapters.is_empty() || a.adapters.contains(&0) {
        bail!("--adapters needs positive adapter counts");
    }
    if a.rank == 0 {
        bail!("--rank must be positive");
    }
    let wdtype = match a.adapter_dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        o => bail!("--adapter-dtype {o:?}: expected bf16, f16 or f32"),
    };
    let gpu = dev.is_cuda();
    if !gpu && !dev.is_cpu() {
        bail!("lorq bench adapters runs on cpu or cuda devices, got {dev:?}");
    }
    let dtype = if gpu { DType::BF16 } else { DType::F32 };
    let card = card(dev)?;
    eprintln!(
        "lorq bench adapters on {card}: {dtype:?} activations, rank {}, {wdtype:?} adapters",
        a.rank
    );
    let r = a.rank;
    let max_adapters = *a.adapters.iter().max().expect("checked non-empty");
    let mut rows: Vec<Value> = Vec::new();
    let mut failures = Vec::new();
    for &(name, n, k) in &MODULES {
        let wbytes = n * k * dtype.size_in_bytes();
        let w_copies = if gpu {
            super::bench_kernels::copies_past_l2(wbytes)
        } else {
            1
        };
        let w: Vec<Tensor> = (0..w_copies)
            .map(|_| Tensor::randn(0f32, 0.02, (n, k), dev)?.to_dtype(dtype))
            .collect::<candle_core::Result<_>>()?;
        // Sets of `max_adapters` adapters, enough of them that a pass overflows the L2 cache.
        let set_bytes = max_adapters * r * (n + k) * wdtype.size_in_bytes();
        let sets = if gpu {
            super::bench_kernels::copies_past_l2(set_bytes)
        } else {
            1
        };
        let mut adapter_sets: Vec<Vec<Arc<LoraAdapter>>> = Vec::with_capacity(sets);
        for _ in 0..sets {
            let mut set = Vec::with_capacity(max_adapters);
            for i in 0..max_adapters {
                let am = Tensor::randn(0f32, (1.0 / k as f64).sqrt() as f32, (r, k), dev)?
                    .to_dtype(wdtype)?;
                let bm = Tensor::randn(0f32, (1.0 / r as f64).sqrt() as f32, (n, r), dev)?
                    .to_dtype(wdtype)?;
                set.push(adapter(am, bm, r, i)?);
            }
            adapter_sets.push(set);
        }
        eprintln!(
            "  {name} [{n}, {k}]: {w_copies} base copies, {sets} adapter sets of {max_adapters}"
        );
        for &batch in &a.batch_sizes {
            let x = Tensor::randn(0f32, 1.0, (batch, k), dev)?.to_dtype(dtype)?;
            let base_out = x.matmul(&w[0].t()?)?;
            let iters = if gpu { 20 } else { 1 };
            let base_us = time_us(dev, iters, |i| Ok(x.matmul(&w[i % w.len()].t()?)?))?;
            for &count in &a.adapters {
                let batches: Vec<BatchAdapters> = adapter_sets
                    .iter()
                    .map(|s| batch_of(&s[..count.min(s.len())], batch))
                    .collect();
                let segments = batches[0].segments().len();
                // Checked against the CPU path on copies of the same values.
                let rel_err = if gpu {
                    let cpu_set: Vec<Arc<LoraAdapter>> = adapter_sets[0][..count]
                        .iter()
                        .enumerate()
                        .map(|(i, ad)| {
                            let m = ad.module(MODULE_PATH).expect("bench module");
                            let lorq_lora::LoraWeights::LowRank { a: am, b: bm } = &m.weights
                            else {
                                unreachable!("bench adapters are low rank")
                            };
                            adapter(
                                am.to_device(&Device::Cpu)?,
                                bm.to_device(&Device::Cpu)?,
                                r,
                                i,
                            )
                        })
                        .collect::<Result<_>>()?;
                    let want = batch_of(&cpu_set, batch).apply(
                        MODULE_PATH,
                        &x.to_device(&Device::Cpu)?,
                        base_out.to_device(&Device::Cpu)?,
                    )?;
                    let got = batches[0].apply(MODULE_PATH, &x, base_out.clone())?;
                    let e = delta_rel_err(&got, &want, &base_out)?;
                    if e > 1e-2 {
                        failures.push(format!(
                            "{name} batch {batch} adapters {count}: rel err {e:e} > 1e-2"
                        ));
                    }
                    Some(e)
                } else {
                    None
                };
                let lora_us = time_us(dev, iters, |i| {
                    Ok(batches[i % batches.len()].apply(MODULE_PATH, &x, base_out.clone())?)
                })?;
                let total_us = time_us(dev, iters, |i| {
                    let y = x.matmul(&w[i % w.len()].t()?)?;
                    Ok(batches[i % batches.len()].apply(MODULE_PATH, &x, y)?)
                })?;
                let loop_us = if gpu {
                    Some(time_us(dev, iters.min(5), |i| {
                        per_segment_loop(&batches[i % batches.len()], &x, &base_out)
                    })?)
                } else {
                    None
                };
                let adapter_bytes = count.min(batch) * r * (n + k) * wdtype.size_in_bytes();
                eprintln!(
                    "  {name} batch {batch} adapters {count}: base {base_us:.1} us, lora {lora_us:.1} us ({:.1} %), base+lora {total_us:.1} us",
                    100.0 * lora_us / base_us
                );
                rows.push(json!({
                    "module": name, "shape": [n, k], "batch": batch, "adapters": count,
                    "segments": segments, "rank": r,
                    "base_us": base_us, "lora_us": lora_us,
                    "overhead_pct": 100.0 * lora_us / base_us,
                    "total_us": total_us, "loop_us": loop_us,
                    "adapter_gbps": adapter_bytes as f64 / lora_us / 1e3,
                    "rel_err": rel_err,
                }));
            }
        }
    }
    println!(
        "{:<10} {:>5} {:>8} {:>10} {:>10} {:>9} {:>10} {:>10} {:>9}",
        "module",
        "batch",
        "adapters",
        "base us",
        "lora us",
        "overhead",
        "total us",
        "loop us",
        "rel err"
    );
    for r in &rows {
        let f = |k: &str| {
            r[k].as_f64()
                .map(|v| format!("{v:.1}"))
                .unwrap_or("-".into())
        };
        println!(
            "{:<10} {:>5} {:>8} {:>10} {:>10} {:>8}% {:>10} {:>10} {:>9}",
            r["module"].as_str().unwrap_or(""),
            r["batch"],
            r["adapters"],
            f("base_us"),
            f("lora_us"),
            f("overhead_pct"),
            f("total_us"),
            f("loop_us"),
            r["rel_err"]
                .as_f64()
                .map(|e| format!("{e:.1e}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let report = json!({
        "card": card, "date": utc_date(), "command": command_line(),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "adapter_dtype": format!("{wdtype:?}").to_lowercase(),
        "note": "base_us: x·Wᵀ alone; lora_us: BatchAdapters::apply alone (given the base output); overhead_pct = lora_us / base_us; total_us: both; loop_us: the former per-segment candle path; median µs per call, device synchronized per batch of calls, weights and adapters rotated over copies larger than L2; rel_err: delta vs the CPU path",
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
            "{} checks failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}
