//! `lorq estimate`: the memory of a QLoRA training run, component by component, from the model's
//! config alone (no weights read).

use anyhow::{anyhow, bail, Result};
use clap::Args;
use lorq_model::ModelConfig;
use lorq_train::estimate::{self, EstimateOptions};
use lorq_train::optim::OptimizerKind;

use crate::common::{ComputeDtype, LoraFlags};

/// Estimate the memory of `lorq train`: base weights, quantization constants, LoRA params and
/// gradients, optimizer state (device or host for the paged ones), activations, K/V, logits,
/// and the device peak.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq estimate --params 7B --r 64 --batch-size 4 --seq-len 2048
  lorq estimate --model ./my-model --quantize none --optim adamw --gradient-checkpointing false --json")]
pub struct EstimateArgs {
    /// A Hugging Face model folder (only config.json is read), or `default`. The default model
    /// when neither --model nor --params is given.
    #[arg(long, conflicts_with = "params")]
    pub model: Option<String>,
    /// A published config instead of a folder: 7B (Llama-2-7B), 8B (Llama-3-8B), 13B
    /// (Llama-2-13B), 70B (Llama-2-70B), llama-3-70b.
    #[arg(long)]
    pub params: Option<String>,
    #[command(flatten)]
    pub lora: LoraFlags,
    /// Sequences per step (micro-batch).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// How the base's linears are held: a --quantize name (bitsandbytes-nf4, none, bf16, eetq, hqq-4bit, ...).
    #[arg(long, default_value = "bitsandbytes-nf4")]
    pub quantize: String,
    /// paged_adamw_8bit, adamw_8bit, paged_adamw_32bit or adamw.
    #[arg(long, default_value = "paged_adamw_8bit")]
    pub optim: String,
    /// Recompute each decoder layer in the backward instead of keeping its activations.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
    /// Compute dtype (bf16 on a GPU, f32 on the CPU).
    #[arg(long, value_enum, default_value_t = ComputeDtype::Bf16)]
    pub dtype: ComputeDtype,
    /// Print the numbers as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EstimateArgs) -> Result<()> {
    let (name, config) = match (&a.model, &a.params) {
        (Some(_), Some(_)) => bail!("give --model or --params, not both"),
        (None, Some(p)) => estimate::preset_config(p)?,
        (m, None) => {
            let spec = m.as_deref().unwrap_or("default");
            let dir = lorq_model::pull::resolve_model(spec)?;
            if !dir.join("config.json").is_file() {
                bail!(
                    "{}: no config.json (--model needs a Hugging Face model folder)",
                    dir.display()
                );
            }
            (dir.display().to_string(), ModelConfig::load(&dir)?)
        }
    };
    let opts = EstimateOptions {
        r: a.lora.r,
        lora_alpha: a.lora.lora_alpha,
        lora_dropout: a.lora.lora_dropout,
        targets: a.lora.spec()?.targets,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        quantize: a.quantize.clone(),
        optim: OptimizerKind::parse(&a.optim)?,
        gradient_checkpointing: a.gradient_checkpointing,
        compute_bytes: a.dtype.dtype().size_in_bytes() as u64,
    };
    let e = estimate::estimate(&name, &config, &opts).map_err(|e| anyhow!(e))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", e.table());
    }
    Ok(())
}
