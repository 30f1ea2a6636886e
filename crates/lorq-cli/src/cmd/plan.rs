//! `lorq plan`: which quantization method fits a model on a device and a memory budget, and what
//! `--quantize auto` picks (the decision lives in `lorq_quant::select`).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use lorq_model::prequantized::CheckpointFormat;
use lorq_model::weights::WeightFiles;
use lorq_model::{LayerLinear, ModelConfig};
use lorq_quant::select::{self, DeviceCaps, ModelShapes, Plan};
use serde_json::{json, Value};

use crate::common::ComputeDtype;

/// Which quantization to use for a model on a device and memory budget: every method's memory,
/// bits per weight, measured quality rank, availability, and what `--quantize auto` picks.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq plan --memory-budget 200MiB
  lorq plan --model ./my-model --device sm_90 --memory-budget 24GiB --json")]
pub struct PlanArgs {
    /// A Hugging Face model folder, or `default`.
    #[arg(long, default_value = "default", env = "LORQ_MODEL")]
    pub model: String,
    /// cpu, cuda:N (compute capability read with nvidia-smi) or sm_XY (e.g. sm_90).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Memory for weights plus the KV-cache/activation reserve, e.g. 24GiB, 512MiB, 8GB, 1.5GiB.
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// KV-cache and activation reserve (default: KV cache of one min(4096, max positions)-token
    /// sequence + 512 tokens of f32 activations and logits).
    #[arg(long)]
    pub reserve: Option<String>,
    /// Compute dtype (embeddings, norms, lm_head and `none` are held in it).
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    pub dtype: ComputeDtype,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The shapes of the model in `dir` and its pre-quantized format's `--quantize` name, if any.
pub fn model_shapes(
    dir: &Path,
    dtype: ComputeDtype,
    reserve: Option<u64>,
) -> Result<(ModelShapes, Option<String>, ModelConfig)> {
    let c = ModelConfig::load(dir)?;
    let weights = WeightFiles::open(dir)?;
    let pre = CheckpointFormat::detect(&c, &weights, dir)?.map(|f| f.method_name());
    let (h, kv, i) = (
        c.hidden_size,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut linears = Vec::with_capacity(7 * c.num_hidden_layers);
    for _ in 0..c.num_hidden_layers {
        linears.extend(LayerLinear::ALL.map(|w| c.linear_shape(w)));
    }
    let linear_params: usize = linears.iter().map(|&(n, k)| n * k).sum();
    let compute_bytes = dtype.dtype().size_in_bytes();
    let reserve = reserve.unwrap_or_else(|| {
        select::default_reserve(
            c.num_hidden_layers,
            kv,
            h,
            i,
            c.vocab_size,
            c.max_position_embeddings,
            compute_bytes,
        )
    });
    let shapes = ModelShapes {
        linears,
        other_params: c.parameter_count() - linear_params,
        compute_bytes,
        // lorq's just-in-time hqq keeps scale/zero in f32 (its `bytes()` counts them so).
        hqq_meta_bytes: 4,
        stored_bytes: weights
            .raw_info("model.layers.0.self_attn.q_proj.weight")
            .map_or(compute_bytes, |(d, _)| d.bitsize() / 8),
        reserve,
        calib_group: match c
            .quantization_config
            .as_ref()
            .and_then(|q| q["group_size"].as_i64())
        {
            Some(g) if g > 0 => g as usize,
            Some(_) => 0,
            None => 128,
        },
    };
    Ok((shapes, pre, c))
}

/// `cpu`, `sm_XY`, or `cuda:N` (its compute capability from nvidia-smi).
pub fn parse_device(s: &str) -> Result<DeviceCaps> {
    if let Some(idx) = s.strip_prefix("cuda:") {
        let idx: u32 = idx
            .parse()
            .map_err(|_| anyhow!("--device {s:?}: expected cuda:N with N a GPU index"))?;
        let out = std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=compute_cap",
                "--format=csv,noheader",
                "-i",
                &idx.to_string(),
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .with_context(|| {
                format!("--device {s}: cannot read the GPU's compute capability (no nvidia-smi or no GPU {idx}); pass --device sm_XY instead")
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let cc = text.trim().split_once('.').and_then(|(a, b)| {
            Some(a.trim().parse::<u32>().ok()? * 10 + b.trim().parse::<u32>().ok()?)
        });
        return match cc {
            Some(cc) => Ok(DeviceCaps::Cuda { cc }),
            None => bail!("--device {s}: nvidia-smi printed {text:?}, not a compute capability; pass --device sm_XY"),
        };
    }
    DeviceCaps::parse(s).map_err(|e| anyhow!(e))
}

/// Parses a `--memory-budget`/`--reserve` value.
pub fn parse_size_arg(flag: &str, s: &str) -> Result<u64> {
    select::parse_size(s).map_err(|e| anyhow!("{flag}: {e}"))
}

/// The plan for a model folder (used by `lorq plan` and `--quantize auto --memory-budget`).
pub fn plan_model(
    dir: &Path,
    dtype: ComputeDtype,
    device: DeviceCaps,
    budget: Option<u64>,
    reserve: Option<u64>,
) -> Result<(Plan, ModelShapes, Option<String>, ModelConfig)> {
    let (shapes, pre, c) = model_shapes(dir, dtype, reserve)?;
    let plan = select::plan(&shapes, device, budget, pre.as_deref()).map_err(|e| anyhow!(e))?;
    Ok((plan, shapes, pre, c))
}

pub fn run(a: PlanArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let budget = a
        .memory_budget
        .as_deref()
        .map(|s| parse_size_arg("--memory-budget", s))
        .transpose()?;
    let reserve = a
        .reserve
        .as_deref()
        .map(|s| parse_size_arg("--reserve", s))
        .transpose()?;
    let dir = lorq_model::pull::resolve_model(&a.model)?;
    let (plan, shapes, pre, c) = plan_model(&dir, a.dtype, device, budget, reserve)?;
    if a.json {
        let rows: Vec<Value> = plan
            .rows
            .iter()
            .map(|r| {
                json!({
                    "method": r.method,
                    "linear_bytes": r.linear_bytes,
                    "weight_bytes": r.weight_bytes,
                    "total_bytes": r.weight_bytes + shapes.reserve,
                    "bits_per_weight": r.bits_per_weight,
                    "measured_ppl": r.measured_ppl,
                    "quality_rank": r.quality_rank,
                    "available": r.available,
                    "availability": r.availability,
                    "fits": r.fits,
                    "chosen": r.chosen,
                    "reason": r.reason,
                })
            })
            .collect();
        let v = json!({
            "model": a.model,
            "architecture": c.architecture.name(),
            "device": device.describe(),
            "dtype": format!("{:?}", a.dtype).to_lowercase(),
            "prequantized": pre,
            "memory_budget": budget,
            "reserve_bytes": shapes.reserve,
            "linear_params": shapes.linear_params(),
            "other_params": shapes.other_params,
            "chosen": plan.choice_name,
            "summary": plan.summary,
            "methods": rows,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} on {}: {} decoder-linear weights, {} other parameters in {:?}; reserve {} (KV cache + activations){}",
        c.architecture.name(),
        device.describe(),
        shapes.linear_params(),
        shapes.other_params,
        a.dtype,
        select::format_size(shapes.reserve),
        match budget {
            Some(b) => format!(", budget {}", select::format_size(b)),
            None => String::new(),
        }
    );
    if let Some(pq) = &pre {
        println!("checkpoint is pre-quantized: {pq}");
    }
    println!(
        "{:<18} {:>11} {:>6} {:>9} {:>5} {:<56} {:>5}  reason",
        "method", "weights", "bits", "ppl*", "rank", "available", "fits"
    );
    for r in &plan.rows {
        println!(
            "{:<18} {:>11} {:>6.2} {:>9} {:>5} {:<56} {:>5}  {}{}",
            r.method,
            select::format_size(r.weight_bytes),
            r.bits_per_weight,
            r.measured_ppl.map_or("-".into(), |p| format!("{p:.2}")),
            r.quality_rank.map_or("-".into(), |q| q.to_string()),
            if r.available {
                r.availability.clone()
            } else {
                format!("no: {}", r.availability)
            },
            match r.fits {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            },
            if r.chosen { "* " } else { "" },
            r.reason
        );
    }
    println!("* ppl: WikiText-2 test perplexity measured on SmolLM2-135M; bits per decoder-linear weight, constants included");
    println!("{}", plan.summary);
    Ok(())
}
