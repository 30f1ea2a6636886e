use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lorq_model::checkpoint_writer::{quantize_checkpoint, QuantizeOptions};
use lorq_quant::method::QuantMethod;

/// Quantize a full-precision model folder and write the checkpoint in the peer library's own
/// layout: bitsandbytes 4-bit/8-bit as transformers saves them, `HQQLinear.state_dict()` names,
/// compressed-tensors FP8, and lorq's own int8 layout for eetq. Embeddings, norms and lm_head are
/// copied unchanged; tokenizer and generation files are copied.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq quantize --method bitsandbytes-nf4 --out ./smollm2-nf4
  lorq quantize --model ./my-model --method hqq-4bit --out ./my-model-hqq4 --json")]
pub struct QuantizeArgs {
    /// A Hugging Face model folder (full-precision weights), or `default`.
    #[arg(long, default_value = "default", env = "LORQ_MODEL")]
    pub model: String,
    /// bitsandbytes-nf4, bitsandbytes-fp4, bitsandbytes (LLM.int8), eetq, hqq-4bit, hqq-3bit,
    /// hqq-2bit or fp8.
    #[arg(long)]
    pub method: String,
    /// The output folder (created; must be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Print a JSON summary (method, tensors, bytes, seconds, bits per weight).
    #[arg(long)]
    pub json: bool,
    /// bitsandbytes-nf4 without double quantization of the absmax.
    #[arg(long)]
    pub no_double_quant: bool,
    /// Write into an existing, non-empty output folder.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let mut method = QuantMethod::parse(&a.method)?.with_context(|| {
        format!(
            "--method none: nothing to quantize; choose one of {}",
            QuantMethod::NAMES.join(", ")
        )
    })?;
    if a.no_double_quant {
        match &mut method {
            QuantMethod::BitsandbytesNf4 { double_quant } => *double_quant = false,
            _ => anyhow::bail!("--no-double-quant applies to bitsandbytes-nf4 only"),
        }
    }
    let dir = lorq_model::pull::resolve_model(&a.model)?;
    let summary = quantize_checkpoint(
        &dir,
        &a.out,
        method,
        QuantizeOptions {
            force: a.force,
            progress: true,
        },
    )
    .with_context(|| format!("quantizing {} with {}", dir.display(), method.name()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "wrote {} ({} tensors, {} linears quantized with {}, {:.2} bits/weight, {} bytes) in {:.1} s",
            summary.out.display(),
            summary.tensors,
            summary.quantized_linears,
            summary.method,
            summary.bits_per_weight,
            summary.bytes,
            summary.seconds
        );
    }
    Ok(())
}
