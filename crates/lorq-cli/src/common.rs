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
    /// Compute dtype; default: bf16 on a GPU (half the bytes a decode step reads, as vLLM's
    /// `--dtype auto` keeps a bf16 checkpoint), f32 on the CPU (its kernels compute in f32).
    #[arg(long, value_enum)]
    pub dtype: Option<ComputeDtype>,
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
    /// Also quantize the LM head (output projection) with the --quantize method. Off by default,
    /// as in bitsandbytes, PEFT and LoRAX; torchao's quantize_ and gpt-fast's int4 quantize it
    /// (fewer bytes per decode step, a little more quantization error in the logits).
    #[arg(long, env = "LORQ_QUANTIZE_LM_HEAD")]
    pub quantize_lm_head: bool,
    /// Where the model runs: `cpu`, `cuda` or `cuda:N` (GPU N; needs a build with the `cuda`
    /// feature, see scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu", env = "LORQ_DEVICE")]
    pub device: String,
    /// GPU: run every decode step eagerly, without CUDA graphs (vLLM's flag; graphs are on by
    /// default: a batch layout's second decode step is captured and later ones replay it).
    #[arg(long, env = "LORQ_ENFORCE_EAGER")]
    pub enforce_eager: bool,
}

/// How tokens are chosen (TGI/LoRAX's parameters): greedy unless `--do-sample` or a warper is
/// given; temperature 0 means greedy.
#[derive(Debug, Clone, Default, Args)]
pub struct SamplingFlags {
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub typical_p: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Sample even without warpers (temperature 1, full vocabulary).
    #[arg(long)]
    pub do_sample: bool,
}

impl SamplingFlags {
    pub fn params(&self, seed: Option<u64>) -> lorq_model::SamplingParams {
        lorq_model::SamplingParams {
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            typical_p: self.typical_p,
            repetition_penalty: self.repetition_penalty,
            seed,
        }
    }
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
    /// `--dtype`, or the device's default.
    pub fn compute_dtype(&self) -> ComputeDtype {
        match self.dtype {
            Some(d) => d,
            None if self.device.trim() == "cpu" => ComputeDtype::F32,
            None => ComputeDtype::Bf16,
        }
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let dtype = self.compute_dtype();
        let dir = lorq_model::pull::resolve_model(&self.model)?;
        let quantize = match (self.quantize.as_str(), &self.memory_budget) {
            ("auto", None) => None,
            ("auto", Some(b)) => {
                let budget = crate::cmd::plan::parse_size_arg("--memory-budget", b)?;
                let (plan, _, pre, _) = crate::cmd::plan::plan_model(
                    &dir,
                    dtype,
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
        let device = parse_device(&self.device)?;
        let mut loaded = LoadedModel::load_quantized(&dir, dtype.dtype(), &device, quantize)
            .with_context(|| format!("loading model {}", dir.display()))?;
        if self.quantize_lm_head {
            let Some(q) = quantize else {
                bail!(
                    "--quantize-lm-head needs a load-time --quantize method (not {:?})",
                    self.quantize
                );
            };
            loaded.model.quantize_lm_head(q)?;
        }
        if self.enforce_eager {
            loaded.model.set_cuda_graphs(false);
        }
        Ok(loaded)
    }
}

/// Parses `--device`: `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("--device {s:?}: expected cpu, cuda or cuda:N with N a GPU index"),
        },
        None => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
    };
    cuda_device(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { candle_core::cuda_backend::cudarc::driver::sys::is_culib_present() } {
        bail!(
            "--device cuda:{ordinal}: the NVIDIA driver (libcuda.so.1) was not found; run lorq through scripts/gpu-run.sh or put the CUDA libraries on LD_LIBRARY_PATH"
        );
    }
    // One device (one candle stream) per GPU for the whole process: every buffer lives on that
    // stream, so stream order alone orders every use and cudarc's per-buffer events (host time
    // per launch, and waits a CUDA graph capture cannot take) are turned off before the first
    // buffer exists.
    static DEVICES: std::sync::OnceLock<std::sync::Mutex<Vec<(usize, Device)>>> =
        std::sync::OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = devices.iter().find(|(o, _)| *o == ordinal) {
        return Ok(d.clone());
    }
    let dev = Device::new_cuda(ordinal)
        .with_context(|| format!("--device cuda:{ordinal}: cannot open the GPU"))?;
    if let Device::Cuda(cuda) = &dev {
        // SAFETY: no buffer of this device exists yet, and all of them will live on its stream.
        unsafe { cuda.disable_event_tracking() };
        lorq_quant::cuda::keep_freed_memory(cuda)
            .with_context(|| format!("--device cuda:{ordinal}: memory pool"))?;
    }
    devices.push((ordinal, dev.clone()));
    Ok(dev)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    bail!(
        "--device cuda:{ordinal}: this lorq was built without CUDA (build the GPU binary with scripts/build-cuda.sh)"
    )
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

/// The LoRA shape flags shared by `lorq train` and `lorq estimate` (the QLoRA recipe's defaults).
#[derive(Debug, Clone, Args)]
pub struct LoraFlags {
    /// LoRA rank.
    #[arg(long, default_value_t = 64)]
    pub r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Dropout on each adapted linear's LoRA input.
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// `all-linear` or a comma-separated list (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, default_value = "all-linear")]
    pub target_modules: String,
    /// Scale by alpha/√r instead of alpha/r.
    #[arg(long)]
    pub use_rslora: bool,
}

impl LoraFlags {
    pub fn spec(&self) -> Result<lorq_train::LoraSpec> {
        Ok(lorq_train::LoraSpec {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            targets: lorq_train::LoraSpec::parse_targets(&self.target_modules)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        base: BaseModelArgs,
    }

    #[test]
    fn compute_dtype_defaults_to_bf16_on_a_gpu_and_f32_on_the_cpu() {
        let dtype = |args: &[&str]| {
            Cli::try_parse_from([&["lorq"], args].concat())
                .unwrap()
                .base
                .compute_dtype()
        };
        assert_eq!(dtype(&[]), ComputeDtype::F32);
        assert_eq!(dtype(&["--device", "cpu"]), ComputeDtype::F32);
        assert_eq!(dtype(&["--device", "cuda"]), ComputeDtype::Bf16);
        assert_eq!(dtype(&["--device", "cuda:1"]), ComputeDtype::Bf16);
        assert_eq!(
            dtype(&["--device", "cuda", "--dtype", "f32"]),
            ComputeDtype::F32
        );
        assert_eq!(
            dtype(&["--device", "cpu", "--dtype", "bf16"]),
            ComputeDtype::Bf16
        );
    }
}
