//! Flags shared by the commands that load a model.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use lorq_lora::LoraAdapter;
use lorq_model::LoadedModel;
use lorq_quant::method::QuantMethod;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    Bf16,
}

impl ComputeDtype {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// The base model: folder, compute dtype and quantization.
#[derive(Debug, Clone, Args)]
pub struct BaseModelArgs {
    /// A Hugging Face model folder, or `default` (SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long, default_value = "default", env = "LORQ_MODEL")]
    pub model: String,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    pub dtype: ComputeDtype,
    /// Quantize the decoder linears at load (LoRAX's names): none, auto, bitsandbytes,
    /// bitsandbytes-nf4, bitsandbytes-fp4, eetq, hqq-4bit, hqq-3bit, hqq-2bit, fp8
    /// (awq, gptq: pre-quantized checkpoints). `auto`: the checkpoint's own format if it is
    /// pre-quantized; otherwise none, or with --memory-budget the highest-quality method that
    /// fits (the decision `lorq plan` shows).
    #[arg(long, default_value = "auto", env = "LORQ_QUANTIZE")]
    pub quantize: String,
    /// Memory for weights plus the KV-cache/activation reserve, e.g. 24GiB, 512MiB, 8GB, 1.5GiB:
    /// with `--quantize auto`, picks the highest-quality method that fits (see `lorq plan`).
    #[arg(long, env = "LORQ_MEMORY_BUDGET")]
    pub memory_budget: Option<String>,
}

/// The base model plus one optional adapter.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub base: BaseModelArgs,
    /// A PEFT LoRA adapter folder applied on top of the base model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<(LoadedModel, Option<Arc<LoraAdapter>>)> {
        let loaded = self.base.load()?;
        let adapter = match &self.adapter {
            Some(a) => Some(loaded.load_adapter(a)?),
            None => None,
        };
        Ok((loaded, adapter))
    }
}

impl BaseModelArgs {
    pub fn load(&self) -> Result<LoadedModel> {
        let dir = lorq_model::pull::resolve_model(&self.model)?;
        let quantize = match (self.quantize.as_str(), &self.memory_budget) {
            ("auto", None) => None,
            ("auto", Some(b)) => {
                let budget = crate::cmd::plan::parse_size_arg("--memory-budget", b)?;
                let (plan, _, pre, _) = crate::cmd::plan::plan_model(
                    &dir,
                    self.dtype,
                    lorq_quant::select::DeviceCaps::Cpu,
                    Some(budget),
                    None,
                )?;
                if pre.is_none() {
                    eprintln!("lorq: {}", plan.summary);
                }
                // A pre-quantized checkpoint loads in its own format (the loader detects it).
                if pre.is_some() {
                    None
                } else {
                    plan.choice
                }
            }
            (name, _) => QuantMethod::parse(name)?,
        };
        LoadedModel::load_quantized(&dir, self.dtype.dtype(), &Device::Cpu, quantize)
            .with_context(|| format!("loading model {}", dir.display()))
    }
}

/// Parses `1,2,3` into token ids.
pub fn parse_token_ids(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<u32>()
                .with_context(|| format!("token id {x:?} is not a non-negative integer"))
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--token-ids is empty");
    }
    Ok(ids)
}
