use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use lorq_lora::merge::{with_weights, MajoritySignMethod, MergeSpec, MergeStrategy};
use lorq_lora::LoraAdapter;
use lorq_model::merge_checkpoint::{merge_checkpoint, MergeOptions};
use lorq_quant::method::QuantMethod;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    F16,
    Bf16,
}

/// Merge one or more LoRA adapters into the base model and write a plain Hugging Face checkpoint
/// (no quantization_config; transformers and lorq load it). Several adapters are combined in ΔW
/// space (ΔW = scale·B·A per adapter, then linear / TIES / DARE as PEFT defines them) and added
/// to each base weight in f32. A quantized base (a pre-quantized checkpoint, or --quantize to
/// reproduce the base a QLoRA adapter was trained on) is dequantized first.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq merge --model ./base --adapter ./my-adapter --out ./merged
  lorq merge --model ./base --adapter ./qlora-adapter --quantize bitsandbytes-nf4 --dtype bf16 --out ./merged
  lorq merge --model ./base --adapter ./a --adapter ./b --weights 0.7,0.3 --merge-strategy ties --density 0.5 --out ./merged
  lorq merge --model ./base --adapter ./a --adapter ./b --merge-strategy dare_linear --density 0.7 --seed 1 --out ./merged --json")]
pub struct MergeArgs {
    /// The base model: a Hugging Face folder (full precision or pre-quantized), or `default`.
    #[arg(long, default_value = "default", env = "LORQ_MODEL")]
    pub model: String,
    #[command(flatten)]
    pub merge: MergeFlags,
    /// Seed of DARE's random drop.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The output folder (created; must be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Write into an existing, non-empty output folder.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
}

// The merging flags, shared by `lorq merge` and `lorq export` (flattened into both).
#[derive(Debug, Args)]
pub struct MergeFlags {
    /// A PEFT LoRA adapter folder; repeat to merge several.
    #[arg(long = "adapter", required = true)]
    pub adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (default: 1 each).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub weights: Option<Vec<f64>>,
    /// linear, ties, dare_linear or dare_ties.
    #[arg(long, default_value = "linear")]
    pub merge_strategy: String,
    /// Fraction of each ΔW kept by TIES' trim / DARE's random drop, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub density: f64,
    /// How TIES elects each entry's sign: total or frequency.
    #[arg(long, default_value = "total")]
    pub majority_sign_method: String,
    /// Dtype of the merged weights (default: the base config's dtype, f32 if it names none).
    #[arg(long, value_enum)]
    pub dtype: Option<OutDtype>,
    /// Quantize then dequantize each linear of a full-precision base before merging (the base a
    /// QLoRA adapter was trained on, e.g. bitsandbytes-nf4); `none` merges into the weights as
    /// stored. A pre-quantized base is detected and dequantized without it.
    #[arg(long, default_value = "none")]
    pub quantize: String,
}

/// The adapters loaded with their weights, and how to combine and add them.
pub struct ResolvedMerge {
    pub adapters: Vec<(Arc<LoraAdapter>, f64)>,
    pub spec: MergeSpec,
    /// `dtype`, `quantize`; `force` false and `progress` true.
    pub options: MergeOptions,
}

impl MergeFlags {
    /// Checks the flags and loads the adapters; `seed` seeds DARE's drop.
    pub fn resolve(&self, seed: u64) -> Result<ResolvedMerge> {
        let strategy: MergeStrategy = self.merge_strategy.parse()?;
        let majority_sign_method: MajoritySignMethod = self.majority_sign_method.parse()?;
        if strategy == MergeStrategy::Linear && self.density != 1.0 {
            eprintln!("lorq: --density is not used by --merge-strategy linear");
        }
        let quantize = match self.quantize.as_str() {
            "auto" => None,
            name => QuantMethod::parse(name)?,
        };
        let dtype = self.dtype.map(|d| match d {
            OutDtype::F32 => DType::F32,
            OutDtype::F16 => DType::F16,
            OutDtype::Bf16 => DType::BF16,
        });
        if let Some(w) = &self.weights {
            if w.len() != self.adapters.len() {
                bail!(
                    "--weights has {} values for {} --adapter folders; give one weight per adapter",
                    w.len(),
                    self.adapters.len()
                );
            }
        }
        let mut adapters = Vec::with_capacity(self.adapters.len());
        for p in &self.adapters {
            let ad = LoraAdapter::load(p, &Device::Cpu)
                .with_context(|| format!("loading adapter {}", p.display()))?;
            adapters.push(Arc::new(ad));
        }
        let adapters = with_weights(adapters, self.weights.as_deref())?;
        Ok(ResolvedMerge {
            adapters,
            spec: MergeSpec {
                strategy,
                density: self.density,
                majority_sign_method,
                seed,
            },
            options: MergeOptions {
                dtype,
                quantize,
                force: false,
                progress: true,
            },
        })
    }
}

pub fn run(a: MergeArgs) -> Result<()> {
    let m = a.merge.resolve(a.seed)?;
    let dir = lorq_model::pull::resolve_model(&a.model)?;
    let summary = merge_checkpoint(
        &dir,
        &m.adapters,
        &m.spec,
        &a.out,
        MergeOptions {
            force: a.force,
            ..m.options
        },
    )
    .with_context(|| format!("merging into {}", dir.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "wrote {} ({} adapters merged with {} into {} linears of a {} base, {}, {} tensors, {} bytes) in {:.1} s",
            summary.out.display(),
            summary.adapters.len(),
            summary.strategy,
            summary.merged_linears,
            summary.base,
            summary.dtype,
            summary.tensors,
            summary.bytes,
            summary.seconds
        );
    }
    Ok(())
}
