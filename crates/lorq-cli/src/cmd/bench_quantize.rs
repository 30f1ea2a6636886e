//! `lorq bench quantize`: just-in-time quantization time of a whole model's decoder linears per
//! format, on the GPU (`--device cuda`) — what `--device cuda --quantize X` spends at load — with
//! the CPU time of one layer (times the layer count) beside it. Weights are seeded random bf16
//! values of the model shape's linears, generated on the device layer by layer (speed does not
//! depend on the values; an 8B model never sits on the host). The first layer is also quantized
//! by the CPU quantizers (the references) and the codes compared: the fraction of identical codes
//! and the largest relative scale difference go into the rows.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use lorq_quant::method::QuantMethod;
use serde_json::{json, Value};

use super::bench_kernels::{command_line, randn, utc_date};

#[derive(Debug, Args)]
#[command(after_help = "Example:
  lorq bench quantize --device cuda --shape llama-3-8b \\
      --formats bitsandbytes-nf4,bitsandbytes-fp4,bitsandbytes,eetq,fp8,hqq-4bit,hqq-3bit,hqq-2bit \\
      --json quantize-h100.json")]
pub struct BenchQuantizeArgs {
    /// `cuda`/`cuda:N` (GPU timing, plus one CPU layer and the code check) or `cpu` (CPU only).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// The model's linear shapes: llama-3-8b, llama-2-7b, mistral-7b or smollm2-135m.
    #[arg(long, default_value = "llama-3-8b")]
    pub shape: String,
    /// The just-in-time methods (LoRAX names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "bitsandbytes-nf4,bitsandbytes-fp4,bitsandbytes,eetq,fp8,hqq-4bit,hqq-3bit,hqq-2bit"
    )]
    pub formats: Vec<String>,
    /// Layers quantized on the GPU (default: the model's).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Skip the CPU layer (timing and code check).
    #[arg(long)]
    pub no_cpu: bool,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the report (JSON) to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The decoder linears `(name, out, in)` of one layer and the layer count.
#[derive(Debug)]
pub(crate) struct ModelShape {
    pub name: &'static str,
    pub layers: usize,
    pub linears: [(&'static str, usize, usize); 7],
}

pub(crate) fn model_shape(name: &str) -> Result<ModelShape> {
    // (hidden, intermediate, kv width, layers)
    let (canonical, (h, i, kv, layers)) = match name.trim() {
        "llama-3-8b" | "llama3-8b" => ("llama-3-8b", (4096, 14336, 1024, 32)),
        "llama-2-7b" | "llama2-7b" => ("llama-2-7b", (4096, 11008, 4096, 32)),
        "mistral-7b" => ("mistral-7b", (4096, 14336, 1024, 32)),
        "smollm2-135m" | "smollm2" => ("smollm2-135m", (576, 1536, 192, 30)),
        other => {
            bail!("--shape {other:?}: expected llama-3-8b, llama-2-7b, mistral-7b or smollm2-135m")
        }
    };
    Ok(ModelShape {
        name: canonical,
        layers,
        linears: [
            ("q_proj", h, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, h),
            ("gate_proj", i, h),
            ("up_proj", i, h),
            ("down_proj", h, i),
        ],
    })
}

fn parse_formats(names: &[String]) -> Result<Vec<QuantMethod>> {
    let mut out = Vec::new();
    for n in names.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let m = QuantMethod::parse(n)?.context("--formats: `none` is not a quantization format")?;
        if !m.is_jit() {
            bail!("--formats {n}: calibration-based, it has no just-in-time quantization to time");
        }
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        bail!("--formats: no format given");
    }
    Ok(out)
}

/// Seeded bf16 weights of one layer, N(0, 0.02²), made on `dev` (curand on a GPU).
fn layer_weights(dev: &Device, shape: &ModelShape, seed: u64, layer: usize) -> Result<Vec<Tensor>> {
    let layer_seed = seed.wrapping_mul(1_000_003).wrapping_add(layer as u64);
    if !dev.is_cpu() {
        dev.set_seed(layer_seed)?;
    }
    shape
        .linears
        .iter()
        .enumerate()
        .map(|(j, &(_, n, k))| {
            let w = if dev.is_cpu() {
                Tensor::from_vec(randn(layer_seed * 8 + j as u64, n * k, 0.02), (n, k), dev)?
            } else {
                Tensor::randn(0f32, 0.02, (n, k), dev)?
            };
            Ok(w.to_dtype(DType::BF16)?)
        })
        .collect()
}

/// The seconds goal of the issue for the whole model on an H100.
fn goal_seconds(m: QuantMethod) -> f64 {
    match m {
        QuantMethod::Hqq4 | QuantMethod::Hqq3 | QuantMethod::Hqq2 => 20.0,
        _ => 10.0,
    }
}

pub fn run(a: BenchQuantizeArgs) -> Result<()> {
    let device = crate::common::parse_device(&a.device)?;
    let shape = model_shape(&a.shape)?;
    let formats = parse_formats(&a.formats)?;
    let layers = a.layers.unwrap_or(shape.layers);
    if layers == 0 {
        bail!("--layers must be at least 1");
    }
    let per_layer: usize = shape.linears.iter().map(|&(_, n, k)| n * k).sum();
    let card = gpu_name(&device)?;
    eprintln!(
        "lorq bench quantize: {} ({layers} layers, {per_layer} weights per layer) on {}",
        shape.name,
        card.as_deref().unwrap_or("the CPU")
    );
    let mut rows: Vec<Value> = Vec::new();
    for &m in &formats {
        if !device.is_cpu() {
            let (seconds, bytes) = gpu_model(&device, &shape, a.seed, layers, m)?;
            let mut row = json!({
                "format": m.name(), "device": "cuda", "seconds": seconds,
                "seconds_per_layer": seconds / layers as f64, "weights": per_layer * layers,
                "bytes_out": bytes, "layers": layers,
                "goal_seconds": goal_seconds(m),
                "meets_goal": layers == shape.layers && seconds <= goal_seconds(m),
            });
            if !a.no_cpu {
                let c = gpu_check(&device, &shape, a.seed, m)?;
                row["identical_codes"] = json!(c.same as f64 / c.codes.max(1) as f64);
                row["codes_compared"] = json!(c.codes);
                row["max_scale_rel_diff"] = json!(c.max_scale_rel);
                rows.push(row);
                rows.push(cpu_row(m, c.cpu_seconds, c.cpu_bytes, per_layer, layers));
            } else {
                rows.push(row);
            }
        } else {
            let ws = layer_weights(&Device::Cpu, &shape, a.seed, 0)?;
            let t = Instant::now();
            let mut bytes = 0;
            for w in &ws {
                bytes += m.quantize(w)?.bytes();
            }
            rows.push(cpu_row(
                m,
                t.elapsed().as_secs_f64(),
                bytes,
                per_layer,
                layers,
            ));
        }
        eprintln!(
            "  {}",
            rows.iter()
                .rev()
                .take(2)
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    let report = json!({
        "bench": "quantize",
        "shape": shape.name,
        "card": card,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "date": utc_date(),
        "command": command_line(),
        "weights": "seeded N(0, 0.02^2) bf16, generated on the device layer by layer",
        "rows": rows,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// The CPU row: one layer measured, the model's time extrapolated (`layers` × that layer).
fn cpu_row(
    m: QuantMethod,
    layer_s: f64,
    layer_bytes: usize,
    per_layer: usize,
    layers: usize,
) -> Value {
    json!({
        "format": m.name(), "device": "cpu", "seconds": layer_s * layers as f64,
        "seconds_per_layer": layer_s, "weights": per_layer * layers,
        "bytes_out": layer_bytes * layers, "layers": layers, "measured_layers": 1,
    })
}

#[cfg(feature = "cuda")]
fn gpu_name(dev: &Device) -> Result<Option<String>> {
    if dev.is_cpu() {
        return Ok(None);
    }
    Ok(Some(super::bench_kernels_cuda::card_name(dev)?))
}

#[cfg(not(feature = "cuda"))]
fn gpu_name(_dev: &Device) -> Result<Option<String>> {
    Ok(None)
}

/// Seconds and output bytes of quantizing every layer on the GPU (generation not timed; the
/// time includes downloading the codes into the host structs).
#[cfg(feature = "cuda")]
fn gpu_model(
    dev: &Device,
    shape: &ModelShape,
    seed: u64,
    layers: usize,
    m: QuantMethod,
) -> Result<(f64, usize)> {
    let (mut secs, mut bytes) = (0f64, 0usize);
    for layer in 0..layers {
        let ws = layer_weights(dev, shape, seed, layer)?;
        dev.synchronize()?;
        let t = Instant::now();
        for w in &ws {
            let q = lorq_quant::cuda::quantize::quantize(m, w)?;
            bytes += q.bytes();
        }
        secs += t.elapsed().as_secs_f64();
    }
    Ok((secs, bytes))
}

#[cfg(not(feature = "cuda"))]
fn gpu_model(_: &Device, _: &ModelShape, _: u64, _: usize, _: QuantMethod) -> Result<(f64, usize)> {
    bail!("this lorq was built without CUDA")
}

/// Layer 0 quantized on the CPU (timed) and on the GPU, codes compared.
#[derive(Default)]
struct Check {
    cpu_seconds: f64,
    cpu_bytes: usize,
    same: u64,
    codes: u64,
    max_scale_rel: f64,
}

#[cfg(feature = "cuda")]
impl Check {
    fn codes<T: PartialEq>(&mut self, gpu: &[T], cpu: &[T]) {
        self.codes += cpu.len().max(gpu.len()) as u64;
        self.same += gpu.iter().zip(cpu).filter(|(a, b)| a == b).count() as u64;
    }
    fn scales(&mut self, gpu: &[f32], cpu: &[f32]) {
        if gpu.len() != cpu.len() {
            self.max_scale_rel = f64::INFINITY;
            return;
        }
        for (g, c) in gpu.iter().zip(cpu) {
            let d = (f64::from(*g) - f64::from(*c)).abs() / f64::from(c.abs()).max(1e-30);
            if !d.is_finite() || d > self.max_scale_rel {
                self.max_scale_rel = if d.is_nan() { f64::INFINITY } else { d };
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu_check(dev: &Device, shape: &ModelShape, seed: u64, m: QuantMethod) -> Result<Check> {
    use lorq_quant::bnb4::{Bnb4Tensor, Bnb4Type, DEFAULT_BLOCKSIZE};
    use lorq_quant::eetq::EetqTensor;
    use lorq_quant::fp8::{Fp8Strategy, Fp8Tensor};
    use lorq_quant::hqq::{HqqConfig, HqqTensor};
    use lorq_quant::int8::Int8Tensor;
    use lorq_quant::QuantTensor;

    let gpu = layer_weights(dev, shape, seed, 0)?;
    let mut c = Check::default();
    for g in &gpu {
        let h = g.to_device(&Device::Cpu)?;
        let t = Instant::now();
        match m {
            QuantMethod::Bitsandbytes => {
                let cq = Int8Tensor::quantize(&h)?;
                c.cpu_seconds += t.elapsed().as_secs_f64();
                let gq = Int8Tensor::quantize_gpu(g)?;
                c.cpu_bytes += cq.bytes();
                c.codes(gq.cb(), cq.cb());
                c.scales(gq.scb(), cq.scb());
            }
            QuantMethod::BitsandbytesNf4 { .. } | QuantMethod::BitsandbytesFp4 => {
                let (ty, dq) = match m {
                    QuantMethod::BitsandbytesNf4 { double_quant } => (Bnb4Type::Nf4, double_quant),
                    _ => (Bnb4Type::Fp4, false),
                };
                let cq = Bnb4Tensor::quantize(&h, ty, dq)?;
                c.cpu_seconds += t.elapsed().as_secs_f64();
                let gq = Bnb4Tensor::quantize_gpu(g, ty, dq, DEFAULT_BLOCKSIZE)?;
                c.cpu_bytes += cq.bytes();
                let nibbles =
                    |p: &[u8]| p.iter().flat_map(|b| [b >> 4, b & 15]).collect::<Vec<u8>>();
                c.codes(&nibbles(gq.packed()), &nibbles(cq.packed()));
                c.scales(gq.block_scales(), cq.block_scales());
            }
            QuantMethod::Eetq => {
                let cq = EetqTensor::quantize(&h)?;
                c.cpu_seconds += t.elapsed().as_secs_f64();
                let gq = EetqTensor::quantize_gpu(g)?;
                c.cpu_bytes += cq.bytes();
                c.codes(gq.codes(), cq.codes());
                c.scales(gq.scales(), cq.scales());
            }
            QuantMethod::Fp8 => {
                let cq = Fp8Tensor::quantize(&h, Fp8Strategy::Channel, h.dtype())?;
                c.cpu_seconds += t.elapsed().as_secs_f64();
                let gq = Fp8Tensor::quantize_gpu(g, Fp8Strategy::Channel, g.dtype())?;
                c.cpu_bytes += cq.bytes();
                c.codes(gq.codes(), cq.codes());
                c.scales(gq.scale(), cq.scale());
            }
            QuantMethod::Hqq4 | QuantMethod::Hqq3 | QuantMethod::Hqq2 => {
                let cfg = HqqConfig::lorax(m.name()).expect("an hqq method");
                // As the load path does: the CPU quantizer reads f32.
                let cq = HqqTensor::quantize(&h.to_dtype(DType::F32)?, &cfg)?;
                c.cpu_seconds += t.elapsed().as_secs_f64();
                let gq = HqqTensor::quantize_gpu(g, &cfg)?;
                c.cpu_bytes += cq.bytes();
                c.codes(&gq.codes(), &cq.codes());
                c.scales(gq.scale(), cq.scale());
                c.scales(gq.zero(), cq.zero());
            }
            QuantMethod::Awq | QuantMethod::Gptq => {
                bail!("{}: not a just-in-time method", m.name())
            }
        }
    }
    Ok(c)
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(_: &Device, _: &ModelShape, _: u64, _: QuantMethod) -> Result<Check> {
    bail!("this lorq was built without CUDA")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_formats_parse() {
        let s = model_shape("llama-3-8b").unwrap();
        let per_layer: usize = s.linears.iter().map(|&(_, n, k)| n * k).sum();
        assert_eq!(s.layers * per_layer, 6_979_321_856);
        assert!(model_shape("gpt-5")
            .unwrap_err()
            .to_string()
            .contains("llama-3-8b"));
        let f = parse_formats(&["hqq-4bit".into(), "fp8".into(), "hqq-4bit".into()]).unwrap();
        assert_eq!(f, vec![QuantMethod::Hqq4, QuantMethod::Fp8]);
        assert!(parse_formats(&["gptq".into()])
            .unwrap_err()
            .to_string()
            .contains("calibration"));
    }

    /// `--device cpu` times one layer of a small shape and extrapolates.
    #[test]
    fn cpu_run_writes_rows() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("q.json");
        run(BenchQuantizeArgs {
            device: "cpu".into(),
            shape: "smollm2-135m".into(),
            formats: vec!["bitsandbytes-nf4".into(), "eetq".into()],
            layers: None,
            no_cpu: false,
            seed: 1,
            json: Some(out.clone()),
        })
        .unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["device"], "cpu");
        assert_eq!(rows[0]["layers"], 30);
        assert!(rows[0]["seconds"].as_f64().unwrap() > 0.0);
    }
}
