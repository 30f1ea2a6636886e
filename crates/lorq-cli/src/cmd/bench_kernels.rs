//! `lorq bench kernels`: CPU timings of `y = x · Wᵀ` for dense f32/bf16 weights, every JIT
//! quantization format's fused kernel, and dequantize-then-matmul (what a naive runtime does per
//! forward), each checked against dequantize-then-matmul before it is timed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use lorq_quant::method::QuantMethod;
use lorq_quant::{DenseTensor, QuantTensor};
use serde_json::{json, Value};

#[derive(Debug, Args)]
#[command(
    after_help = "Shapes are [out, in] = [n, k] of a linear weight; x is [m, k].
  smollm2:   SmolLM2-135M's q/k/v/o/gate/up/down: 576x576, 192x576, 192x576, 576x576,
             1536x576, 1536x576, 576x1536
  llama3-8b: Llama-3-8B's distinct linear shapes (q=o, k=v and gate=up have equal shapes, so
             each is timed once): 4096x4096 (q/o), 1024x4096 (k/v), 14336x4096 (gate/up),
             4096x14336 (down)
Weights and activations are seeded random. Quantizing the 8B shapes with hqq takes minutes on
few cores: restrict with --methods.

Example:
  lorq bench kernels --shapes smollm2 --m 1,4,16 --repeats 5 --json docs/bench/kernels-cpu.json
  lorq bench kernels --shapes 4096x4096,14336x4096 --m 1,16 --methods bitsandbytes-nf4,fp8"
)]
pub struct BenchKernelsArgs {
    /// `smollm2`, `llama3-8b` or `NxK` shapes (n = out features, k = in features), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "smollm2")]
    pub shapes: Vec<String>,
    /// Activation rows (batch × tokens).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub m: Vec<usize>,
    /// JIT quantization methods (LoRAX names); default: every JIT method. Dense f32 and bf16 are
    /// always timed (the speedups are relative to them).
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Timed repetitions (the best is reported); one untimed warm-up runs first.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// `cpu`, or `cuda[:N]`: the GPU kernels (nf4/fp4 fused and dequantize + cuBLAS, bf16 cuBLAS),
    /// each checked against the CPU reference before it is timed.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// GPU only: a JSON file of peer rows merged into the report, each with its speedup over
    /// lorq's bf16 cuBLAS row of the same shape: scripts/bench/torch_matmul.py (torch bf16), or
    /// its rows and scripts/bench/peer_quant_kernels.py's (bitsandbytes, torchao, hqq) joined by
    /// `peer_quant_kernels.py --merge`.
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// GPU only: also time each path's calls replayed from one CUDA graph (`us_graph`: the GPU's
    /// time without host launch overhead, what a decode step replaying a graph pays).
    #[arg(long)]
    pub gpu_time: bool,
    /// GPU only: time only these paths (`auto`, `dequant+cublas`, `qmma-tiled`, `qwgmma`,
    /// `qwgmma-serial` (the wgmma kernel without its dependent launch), `qwgmma-stream-k` (its
    /// split tiles summed through L2, not in clusters),
    /// `gemv`, `bnb4-gemv`, `qgemv-*` ...; a trailing `*` matches a prefix). bf16 cuBLAS, the
    /// baseline, is always timed.
    #[arg(long, value_delimiter = ',')]
    pub paths: Option<Vec<String>>,
    /// GPU only: also time the weight groups that share an input in each `--shapes` model
    /// (q+k+v and gate+up of llama3-8b or smollm2), against bf16 cuBLAS on their concatenated
    /// weight (the fused projections of vLLM and TGI): paths `auto` (what a decode step runs),
    /// `qwgmma` (the 4-bit wgmma kernel, one launch for the group), `qwgmma-apart` (one launch
    /// per weight).
    #[arg(long)]
    pub groups: bool,
}

/// Copies of a weight (or set) of `bytes` that GPU timings rotate over, enough that one pass over
/// them overflows the L2 cache (H100/H200: 50 MB), 1 to 32.
pub(crate) fn copies_past_l2(bytes: usize) -> usize {
    (256usize << 20).div_ceil(bytes.max(1)).clamp(1, 32)
}

/// Relative error bound of a fused kernel against dequantize-then-matmul.
fn tolerance(format: &str) -> f64 {
    match format {
        // LLM.int8 quantizes the activations too.
        "bitsandbytes" => 2e-2,
        // The bf16 GEMM path (m past the row-streaming kernel) rounds x to bf16.
        "bf16" => 2e-2,
        _ => 1e-4,
    }
}

pub(crate) struct Shape {
    pub name: Option<&'static str>,
    pub n: usize,
    pub k: usize,
}

pub(crate) fn parse_shapes(specs: &[String]) -> Result<Vec<Shape>> {
    const SMOLLM2: [(&str, usize, usize); 7] = [
        ("q_proj", 576, 576),
        ("k_proj", 192, 576),
        ("v_proj", 192, 576),
        ("o_proj", 576, 576),
        ("gate_proj", 1536, 576),
        ("up_proj", 1536, 576),
        ("down_proj", 576, 1536),
    ];
    const LLAMA3_8B: [(&str, usize, usize); 4] = [
        ("q_proj/o_proj", 4096, 4096),
        ("k_proj/v_proj", 1024, 4096),
        ("gate_proj/up_proj", 14336, 4096),
        ("down_proj", 4096, 14336),
    ];
    let mut out = Vec::new();
    for s in specs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let preset: &[(&'static str, usize, usize)] = match s {
            "smollm2" => &SMOLLM2,
            "llama3-8b" => &LLAMA3_8B,
            _ => &[],
        };
        if !preset.is_empty() {
            out.extend(preset.iter().map(|&(name, n, k)| Shape {
                name: Some(name),
                n,
                k,
            }));
            continue;
        }
        let parsed = s
            .split_once(['x', 'X'])
            .and_then(|(n, k)| Some((n.parse::<usize>().ok()?, k.parse::<usize>().ok()?)));
        match parsed {
            Some((n, k)) if n > 0 && k > 0 => out.push(Shape { name: None, n, k }),
            _ => bail!("bad shape {s:?}: use smollm2, llama3-8b or NxK (e.g. 4096x4096)"),
        }
    }
    if out.is_empty() {
        bail!("no shapes given");
    }
    Ok(out)
}

fn parse_methods(names: Option<&[String]>) -> Result<Vec<QuantMethod>> {
    let names: Vec<&str> = match names {
        Some(v) => v
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect(),
        None => QuantMethod::NAMES.to_vec(),
    };
    let mut out = Vec::new();
    for n in names {
        let Some(m) = QuantMethod::parse(n)? else {
            continue; // `none`: dense rows are always there
        };
        // Calibration-based (AWQ, GPTQ): skipped by default; `run` rejects them by name.
        if !m.is_jit() {
            continue;
        }
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// Seeded N(0, std²) values (splitmix64 + Box–Muller): the same weights on every run.
pub(crate) fn randn(seed: u64, len: usize, std: f32) -> Vec<f32> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // (0, 1]
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32 * std);
        out.push((r * t.sin()) as f32 * std);
    }
    out.truncate(len);
    out
}

/// Best wall time in µs of `f` over `repeats` runs after one warm-up.
fn time_us(repeats: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let y = f()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(y);
    }
    Ok(best * 1e6)
}

/// max |got - want| / max |want|.
pub(crate) fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    let d: f32 = (got.to_dtype(DType::F32)? - want)?
        .abs()?
        .max_all()?
        .to_scalar()?;
    let s: f32 = want.abs()?.max_all()?.to_scalar()?;
    let e = f64::from(d) / f64::from(s).max(f64::MIN_POSITIVE);
    Ok(if e.is_nan() { f64::INFINITY } else { e })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// UTC date `YYYY-MM-DD` (Howard Hinnant's civil-from-days).
pub(crate) fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The command line as typed, with absolute paths cut to their file name (reports are
/// committed, machine paths are not).
pub(crate) fn command_line() -> String {
    std::env::args()
        .map(|a| {
            let p = std::path::Path::new(&a);
            if p.is_absolute() {
                p.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or(a)
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

struct Row {
    format: String,
    shape: [usize; 2],
    proj: Option<&'static str>,
    m: usize,
    us: f64,
    bytes: usize,
    max_rel_err: f64,
    quantize_s: Option<f64>,
}

pub fn run(a: BenchKernelsArgs) -> Result<()> {
    let device = crate::common::parse_device(&a.device)?;
    if !device.is_cpu() {
        #[cfg(feature = "cuda")]
        return super::bench_kernels_cuda::run(&a, &device);
    }
    if a.gpu_time || a.paths.is_some() || a.groups {
        bail!("--gpu-time, --paths and --groups select GPU kernels: they need --device cuda");
    }
    let shapes = parse_shapes(&a.shapes)?;
    if let Some(v) = &a.methods {
        for n in v {
            if let Some(m) = QuantMethod::parse(n.trim())? {
                if !m.is_jit() {
                    bail!(
                        "{} is calibration-based (pre-quantized checkpoints only): no JIT kernel to bench",
                        m.name()
                    );
                }
            }
        }
    }
    let methods = parse_methods(a.methods.as_deref())?;
    if a.m.is_empty() || a.m.contains(&0) {
        bail!("--m needs positive row counts");
    }
    let dev = Device::Cpu;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut rows: Vec<Row> = Vec::new();
    let mut failures = Vec::new();
    for (si, s) in shapes.iter().enumerate() {
        let (n, k) = (s.n, s.k);
        let seed = 0x6c6f_7271 ^ ((n as u64) << 32) ^ (k as u64);
        let w = Tensor::from_vec(randn(seed, n * k, 0.02), (n, k), &dev)?;
        let dense_f32: Arc<dyn QuantTensor> = Arc::new(DenseTensor::new(w.clone())?);
        let dense_bf16: Arc<dyn QuantTensor> =
            Arc::new(DenseTensor::new(w.to_dtype(DType::BF16)?)?);
        let mut quants: Vec<(QuantMethod, Arc<dyn QuantTensor>, f64)> = Vec::new();
        for &m in &methods {
            eprintln!(
                "[{}/{}] quantizing {n}x{k} with {}",
                si + 1,
                shapes.len(),
                m.name()
            );
            let t = Instant::now();
            let q = m
                .quantize(&w)
                .with_context(|| format!("quantizing {n}x{k} with {}", m.name()))?;
            quants.push((m, q, t.elapsed().as_secs_f64()));
        }
        for &m_rows in &a.m {
            let x = Tensor::from_vec(
                randn(seed.wrapping_add(m_rows as u64 * 7919), m_rows * k, 1.0),
                (m_rows, k),
                &dev,
            )?;
            eprintln!("[{}/{}] {n}x{k} m={m_rows}", si + 1, shapes.len());
            // Dense: checked against candle's f32 matmul with the same (rounded) weight.
            for (fmt, d) in [("f32", &dense_f32), ("bf16", &dense_bf16)] {
                let want = x.matmul(&d.dequantize(DType::F32)?.t()?)?;
                let err = rel_err(&d.matmul(&x)?, &want)?;
                if err > tolerance(fmt) {
                    failures.push(format!("{fmt} {n}x{k} m={m_rows}: rel err {err:.3e}"));
                }
                let us = time_us(a.repeats, || Ok(d.matmul(&x)?))?;
                rows.push(Row {
                    format: fmt.into(),
                    shape: [n, k],
                    proj: s.name,
                    m: m_rows,
                    us,
                    bytes: d.bytes(),
                    max_rel_err: err,
                    quantize_s: None,
                });
            }
            for (method, q, qs) in &quants {
                let name = method.name();
                let naive = || -> Result<Tensor> {
                    let wd = q.dequantize(DType::F32)?;
                    Ok(x.matmul(&wd.t()?)?)
                };
                let want = naive()?;
                let err = rel_err(&q.matmul(&x)?, &want)?;
                if err > tolerance(name) {
                    failures.push(format!(
                        "{name} {n}x{k} m={m_rows}: fused vs dequantize-then-matmul rel err {err:.3e} > {:.0e}",
                        tolerance(name)
                    ));
                    continue;
                }
                let us = time_us(a.repeats, || Ok(q.matmul(&x)?))?;
                rows.push(Row {
                    format: name.into(),
                    shape: [n, k],
                    proj: s.name,
                    m: m_rows,
                    us,
                    bytes: q.bytes(),
                    max_rel_err: err,
                    quantize_s: Some(*qs),
                });
                let us = time_us(a.repeats, naive)?;
                rows.push(Row {
                    format: format!("{name} (dequantize+matmul)"),
                    shape: [n, k],
                    proj: s.name,
                    m: m_rows,
                    us,
                    bytes: q.bytes(),
                    // It is the reference the fused kernel is checked against.
                    max_rel_err: 0.0,
                    quantize_s: None,
                });
            }
        }
    }

    let base = |fmt: &str, r: &Row| {
        rows.iter()
            .find(|b| b.format == fmt && b.shape == r.shape && b.m == r.m && b.proj == r.proj)
            .map(|b| b.us / r.us)
            .unwrap_or(f64::NAN)
    };
    let card = format!("cpu: {}, {threads} threads", cpu_model());
    println!("{card}");
    println!(
        "| format | shape [n,k] | m | µs | vs bf16 | vs f32 | GB/s | max rel err |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        let (vb, vf) = (base("bf16", r), base("f32", r));
        let gbps = r.bytes as f64 / (r.us * 1e-6) / 1e9;
        println!(
            "| {} | [{}, {}]{} | {} | {:.1} | {:.2}× | {:.2}× | {:.2} | {:.2e} |",
            r.format,
            r.shape[0],
            r.shape[1],
            r.proj.map(|p| format!(" {p}")).unwrap_or_default(),
            r.m,
            r.us,
            vb,
            vf,
            gbps,
            r.max_rel_err
        );
        let mut o = json!({
            "format": r.format, "shape": r.shape, "m": r.m, "us": r.us,
            "speedup_vs_bf16": vb, "speedup_vs_f32": vf, "gbps": gbps,
            "max_rel_err": r.max_rel_err, "weight_bytes": r.bytes,
        });
        if let Some(p) = r.proj {
            o["proj"] = Value::from(p);
        }
        if let Some(qs) = r.quantize_s {
            o["quantize_s"] = Value::from(qs);
        }
        json_rows.push(o);
    }
    if let Some(path) = &a.json {
        let report = json!({
            "card": card,
            "date": utc_date(),
            "command": command_line(),
            "repeats": a.repeats,
            "rows": json_rows,
        });
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !failures.is_empty() {
        bail!(
            "{} correctness check(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_date() {
        assert_eq!(parse_shapes(&["smollm2".into()]).unwrap().len(), 7);
        let s = parse_shapes(&["64x128".into(), "llama3-8b".into()]).unwrap();
        assert_eq!((s[0].n, s[0].k, s.len()), (64, 128, 5));
        assert!(parse_shapes(&["64by128".into()]).is_err());
        assert_eq!(utc_date().len(), 10);
        let v = randn(1, 10_001, 1.0);
        assert_eq!(v, randn(1, 10_001, 1.0));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.05, "{mean}");
    }
}
