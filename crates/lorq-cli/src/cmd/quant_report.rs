use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lorq_model::weights::WeightFiles;
use lorq_model::ModelConfig;
use lorq_quant::method::QuantMethod;
use lorq_quant::rtn::{rtn_int4_round_trip, RTN_INT4_BLOCK};
use serde_json::{json, Value};

/// What every just-in-time quantization method does to a model's weights: for each decoder linear,
/// the relative error ‖W−Ŵ‖_F/‖W‖_F and the MSE of the dequantized weight against the original,
/// and the bits per weight the format holds (quantization constants included).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq quant-report --json
  lorq quant-report --model ./my-model --methods bitsandbytes-nf4,hqq-4bit --layers 4")]
pub struct QuantReportArgs {
    /// A Hugging Face model folder (full-precision weights), or `default`.
    #[arg(long, default_value = "default", env = "LORQ_MODEL")]
    pub model: String,
    /// Comma-separated methods (LoRAX's names, plus `rtn-int4`: QLoRA's INT4 reference, absmax per
    /// block of 64); default: every just-in-time method and `rtn-int4`.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Only the first N decoder layers (for speed).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Print every linear's numbers as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One method on one linear.
struct Measured {
    rel_error: f64,
    mse: f64,
    bytes: usize,
    seconds: f64,
}

const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// QLoRA's INT4 baseline (round-to-nearest, absmax per block of 64): a report-only row.
const RTN_INT4: &str = "rtn-int4";

/// A row of the report: a `--quantize` method, or the INT4 reference of the QLoRA comparison.
#[derive(Debug, Clone, Copy)]
enum Reported {
    Method(QuantMethod),
    RtnInt4,
}

impl Reported {
    fn name(self) -> &'static str {
        match self {
            Self::Method(m) => m.name(),
            Self::RtnInt4 => RTN_INT4,
        }
    }

    /// The dequantized weight `[out, in]` (f32) and the bytes the format holds.
    fn round_trip(self, w: &Tensor, orig: &[f32]) -> Result<(Tensor, usize)> {
        match self {
            Self::Method(m) => {
                let q = m.quantize(w)?;
                Ok((q.dequantize(DType::F32)?, q.bytes()))
            }
            Self::RtnInt4 => {
                let (d, bytes) = rtn_int4_round_trip(orig, RTN_INT4_BLOCK);
                Ok((Tensor::from_vec(d, w.dims(), &Device::Cpu)?, bytes))
            }
        }
    }
}

pub fn run(a: QuantReportArgs) -> Result<()> {
    let methods: Vec<Reported> = if a.methods.is_empty() {
        QuantMethod::NAMES
            .iter()
            .filter_map(|n| QuantMethod::parse(n).ok().flatten())
            .filter(|m| m.is_jit())
            .map(Reported::Method)
            .chain(std::iter::once(Reported::RtnInt4))
            .collect()
    } else {
        a.methods
            .iter()
            .map(|n| {
                if n.trim() == RTN_INT4 {
                    return Ok(Reported::RtnInt4);
                }
                let m = QuantMethod::parse(n.trim())?
                    .with_context(|| format!("--methods: {n:?} is not a quantization method"))?;
                if !m.is_jit() {
                    bail!(
                        "--methods: {n} is calibration-based (pre-quantized checkpoints only); \
                         quant-report measures the just-in-time methods"
                    );
                }
                Ok(Reported::Method(m))
            })
            .collect::<Result<_>>()?
    };
    let dir = lorq_model::pull::resolve_model(&a.model)?;
    let c = ModelConfig::load(&dir)?;
    let weights = WeightFiles::open(&dir)?;
    let layers = a
        .layers
        .unwrap_or(c.num_hidden_layers)
        .min(c.num_hidden_layers);
    let (h, q_out, kv_out) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let shape = |name: &str| -> [usize; 2] {
        match name {
            "self_attn.q_proj" => [q_out, h],
            "self_attn.k_proj" | "self_attn.v_proj" => [kv_out, h],
            "self_attn.o_proj" => [h, q_out],
            "mlp.gate_proj" | "mlp.up_proj" => [c.intermediate_size, h],
            _ => [h, c.intermediate_size],
        }
    };
    let bar = ProgressBar::new((layers * LINEARS.len() * methods.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("quant-report ({msg}) [{bar:30}] {pos}/{len}, {eta} left")
            .expect("valid template"),
    );
    // rows[linear] = (name, shape, per-method results)
    let mut rows: Vec<(String, [usize; 2], Vec<Measured>)> = Vec::new();
    for i in 0..layers {
        for lin in LINEARS {
            let name = format!("model.layers.{i}.{lin}.weight");
            let shp = shape(lin);
            let w = weights.load_as_stored(&name, &shp, &Device::Cpu)?;
            let orig: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut per = Vec::with_capacity(methods.len());
            for &m in &methods {
                bar.set_message(format!("{} {name}", m.name()));
                let t = Instant::now();
                let (deq, bytes) = m
                    .round_trip(&w, &orig)
                    .with_context(|| format!("{} quantization of {name}", m.name()))?;
                let seconds = t.elapsed().as_secs_f64();
                per.push(measure(&orig, &deq, bytes, seconds)?);
                bar.inc(1);
            }
            rows.push((name, shp, per));
        }
    }
    bar.finish_and_clear();

    let numel_total: usize = rows.iter().map(|(_, s, _)| s[0] * s[1]).sum();
    let f16_bytes = numel_total * 2;
    let summary: Vec<Value> = methods
        .iter()
        .enumerate()
        .map(|(k, m)| {
            let n = rows.len().max(1) as f64;
            let rel: Vec<f64> = rows.iter().map(|r| r.2[k].rel_error).collect();
            let bytes: usize = rows.iter().map(|r| r.2[k].bytes).sum();
            let sq: f64 = rows
                .iter()
                .map(|r| r.2[k].mse * (r.1[0] * r.1[1]) as f64)
                .sum();
            json!({
                "method": m.name(),
                "mean_rel_error": rel.iter().sum::<f64>() / n,
                "max_rel_error": rel.iter().cloned().fold(0f64, f64::max),
                "mean_mse": rows.iter().map(|r| r.2[k].mse).sum::<f64>() / n,
                "mse": sq / numel_total.max(1) as f64,
                "bits_per_weight": bytes as f64 * 8.0 / numel_total.max(1) as f64,
                "bytes": bytes,
                "f16_bytes": f16_bytes,
                "quantize_seconds": rows.iter().map(|r| r.2[k].seconds).sum::<f64>(),
            })
        })
        .collect();

    if a.json {
        let linears: Vec<Value> = rows
            .iter()
            .map(|(name, shp, per)| {
                let numel = shp[0] * shp[1];
                let results: Vec<Value> = methods
                    .iter()
                    .zip(per)
                    .map(|(m, r)| {
                        json!({
                            "method": m.name(),
                            "rel_error": r.rel_error,
                            "mse": r.mse,
                            "bits_per_weight": r.bytes as f64 * 8.0 / numel as f64,
                            "bytes": r.bytes,
                            "quantize_seconds": r.seconds,
                        })
                    })
                    .collect();
                json!({"name": name, "shape": shp, "numel": numel, "results": results})
            })
            .collect();
        let v = json!({
            "model": a.model,
            "architecture": c.architecture.name(),
            "layers": layers,
            "num_linears": rows.len(),
            "weights": numel_total,
            "f16_bytes": f16_bytes,
            "methods": summary,
            "linears": linears,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} decoder linears of {} layer(s), {} weights ({:.2} MiB as f16)",
        rows.len(),
        layers,
        numel_total,
        f16_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "{:<18} {:>14} {:>13} {:>11} {:>11} {:>10} {:>8} {:>9}",
        "method",
        "mean rel. err",
        "max rel. err",
        "mean MSE",
        "bits/weight",
        "MiB",
        "vs f16",
        "quant s"
    );
    for s in &summary {
        println!(
            "{:<18} {:>14.6} {:>13.6} {:>11.3e} {:>11.4} {:>10.2} {:>7.1}% {:>9.2}",
            s["method"].as_str().unwrap_or(""),
            s["mean_rel_error"].as_f64().unwrap_or(0.0),
            s["max_rel_error"].as_f64().unwrap_or(0.0),
            s["mean_mse"].as_f64().unwrap_or(0.0),
            s["bits_per_weight"].as_f64().unwrap_or(0.0),
            s["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
            100.0 * s["bytes"].as_u64().unwrap_or(0) as f64 / f16_bytes.max(1) as f64,
            s["quantize_seconds"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

/// Relative Frobenius error and MSE of `deq` against `orig`, accumulated in f64.
fn measure(orig: &[f32], deq: &Tensor, bytes: usize, seconds: f64) -> Result<Measured> {
    let deq: Vec<f32> = deq.flatten_all()?.to_vec1()?;
    if deq.len() != orig.len() {
        bail!(
            "dequantized weight has {} values, the original {}",
            deq.len(),
            orig.len()
        );
    }
    let (mut err, mut norm) = (0f64, 0f64);
    for (&w, &d) in orig.iter().zip(&deq) {
        let e = w as f64 - d as f64;
        err += e * e;
        norm += w as f64 * w as f64;
    }
    Ok(Measured {
        rel_error: (err / norm.max(f64::MIN_POSITIVE)).sqrt(),
        mse: err / orig.len() as f64,
        bytes,
        seconds,
    })
}
