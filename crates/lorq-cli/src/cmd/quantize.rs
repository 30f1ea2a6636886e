use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lorq_model::calibrate::{quantize_calibrated, CalibratedMethod, CalibrationSpec};
use lorq_model::checkpoint_writer::{quantize_checkpoint_on, QuantizeOptions};
use lorq_model::export::{ExportMethod, ExportQuantization};
use lorq_quant::awq::quantize::AwqParams;
use lorq_quant::gptq::quantize::GptqParams;
use lorq_quant::method::QuantMethod;

/// Quantize a full-precision model folder and write the checkpoint in the peer library's own
/// layout: bitsandbytes 4-bit/8-bit as transformers saves them, `HQQLinear.state_dict()` names,
/// compressed-tensors FP8, lorq's own int8 layout for eetq; with calibration text, GPTQ (the GPTQ
/// v1 layout GPTQModel and transformers load) and AWQ (AutoAWQ's GEMM layout), and the
/// round-to-nearest baseline rtn-int4 (GPTQ layout, no calibration). Embeddings, norms and
/// lm_head are copied unchanged (AWQ folds its scales into the norms); tokenizer and generation
/// files are copied.
#[derive(Debug, Args)]
#[command(
    after_help = "Calibration (gptq, awq): --calibration-samples windows of --calibration-seq-len
tokens at seeded random offsets of the text (a .txt file, or .jsonl with a \"text\" string per
line). The model runs layer by layer over them; each linear is quantized from the inputs reaching
it through the already-quantized linears before it.

Examples:
  lorq quantize --method bitsandbytes-nf4 --out ./smollm2-nf4
  lorq quantize --model ./llama-3-8b --method hqq-4bit --device cuda --out ./llama-3-8b-hqq4
  lorq quantize --model ./my-model --method hqq-4bit --out ./my-model-hqq4 --json
  lorq quantize --method gptq --calibration wikitext-2/valid.txt --calibration-samples 64 \\
      --calibration-seq-len 512 --act-order --out ./smollm2-gptq4
  lorq quantize --method awq --awq-clip --calibration data.jsonl --out ./smollm2-awq4
  lorq quantize --method rtn-int4 --bits 3 --out ./smollm2-rtn3"
)]
pub struct QuantizeArgs {
    /// A Hugging Face model folder (full-precision weights), or `default`.
    #[arg(long, default_value = "default", env = "LORQ_MODEL")]
    pub model: String,
    #[command(flatten)]
    pub quant: QuantizeFlags,
    /// Seed of the calibration window offsets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The output folder (created; must be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Write into an existing, non-empty output folder.
    #[arg(long)]
    pub force: bool,
    /// Where the linears are quantized: `cpu`, `cuda` or `cuda:N` (each weight is uploaded,
    /// quantized on the GPU and its codes written; the checkpoint is the same as on the CPU).
    /// gptq, awq and rtn-int4 run on the CPU.
    // Not read from LORQ_DEVICE: a serving setting must not refuse the CPU-only methods here.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print a JSON summary (method, tensors, bytes, seconds, bits per weight; with calibration
    /// the relative output error of every linear and of RTN on the same inputs).
    #[arg(long)]
    pub json: bool,
}

// The quantization flags, shared by `lorq quantize` and `lorq export` (flattened into both).
#[derive(Debug, Args)]
pub struct QuantizeFlags {
    /// bitsandbytes-nf4, bitsandbytes-fp4, bitsandbytes (LLM.int8), eetq, hqq-4bit, hqq-3bit,
    /// hqq-2bit, fp8; with calibration gptq or awq; rtn-int4 (round to nearest, GPTQ layout).
    #[arg(long)]
    pub method: String,
    /// bitsandbytes-nf4 without double quantization of the absmax.
    #[arg(long)]
    pub no_double_quant: bool,
    /// Calibration text for gptq/awq: a .txt file or .jsonl with a "text" string per line.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    pub calibration_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 2048)]
    pub calibration_seq_len: usize,
    /// Bits per weight: gptq and rtn-int4 2, 3, 4 or 8; awq 4.
    #[arg(long)]
    pub bits: Option<u32>,
    /// Input channels per scale/zero group (gptq and rtn-int4: -1 = one group per row).
    #[arg(long, allow_hyphen_values = true)]
    pub group_size: Option<i64>,
    /// Symmetric grid (zero point 2^(bits-1)); gptq and rtn-int4.
    #[arg(long, conflicts_with = "asym")]
    pub sym: bool,
    /// Asymmetric grid with a zero point per group (the default).
    #[arg(long)]
    pub asym: bool,
    /// GPTQ: quantize input channels by decreasing Hessian diagonal (writes g_idx; desc_act).
    #[arg(long)]
    pub act_order: bool,
    /// GPTQ: fit every group's scale/zero before the updates, in storage order.
    #[arg(long)]
    pub static_groups: bool,
    /// GPTQ: dampening, as a fraction of the mean Hessian diagonal.
    #[arg(long)]
    pub damp: Option<f64>,
    /// AWQ: search a clipping range per row and group (not for q/k).
    #[arg(long)]
    pub awq_clip: bool,
    /// AWQ: AutoAWQ's duo scaling (s = x_mean^a / w_mean^(1-a)).
    #[arg(long)]
    pub awq_duo_scaling: bool,
}

impl QuantizeFlags {
    /// The calibration-method options given, by flag name (to refuse them for other methods).
    fn calibrated_flags(&self) -> Vec<&'static str> {
        let mut v = vec![];
        let mut f = |on: bool, name| {
            if on {
                v.push(name)
            }
        };
        f(self.calibration.is_some(), "--calibration");
        f(self.bits.is_some(), "--bits");
        f(self.group_size.is_some(), "--group-size");
        f(self.sym, "--sym");
        f(self.asym, "--asym");
        f(self.act_order, "--act-order");
        f(self.static_groups, "--static-groups");
        f(self.damp.is_some(), "--damp");
        f(self.awq_clip, "--awq-clip");
        f(self.awq_duo_scaling, "--awq-duo-scaling");
        v
    }

    fn calibrated_method(&self) -> Result<CalibratedMethod> {
        let name = self.method.as_str();
        let refuse = |flag: &str, methods: &str| -> Result<()> {
            bail!("{flag} applies to --method {methods} only (got --method {name})")
        };
        let group_size = match self.group_size {
            None => Some(128),
            Some(-1) if name != "awq" => None,
            Some(g) if g > 0 => Some(g as usize),
            Some(g) => bail!(
                "--group-size {g}: expected a positive number of input channels{}",
                if name == "awq" {
                    ""
                } else {
                    " or -1 (one group)"
                }
            ),
        };
        if name != "gptq" {
            for (on, flag) in [
                (self.act_order, "--act-order"),
                (self.static_groups, "--static-groups"),
                (self.damp.is_some(), "--damp"),
            ] {
                if on {
                    refuse(flag, "gptq")?;
                }
            }
        }
        if name != "awq" {
            for (on, flag) in [
                (self.awq_clip, "--awq-clip"),
                (self.awq_duo_scaling, "--awq-duo-scaling"),
            ] {
                if on {
                    refuse(flag, "awq")?;
                }
            }
        }
        if name == "awq" {
            if let Some(b) = self.bits.filter(|&b| b != 4) {
                bail!("--bits {b}: AWQ (GEMM layout) is 4-bit only");
            }
            if self.sym {
                bail!(
                    "--sym: AWQ uses an asymmetric grid with zero points (AutoAWQ's GEMM layout)"
                );
            }
            return Ok(CalibratedMethod::Awq(AwqParams {
                group_size: group_size.expect("awq group size is positive"),
                clip: self.awq_clip,
                duo_scaling: self.awq_duo_scaling,
                ..AwqParams::default()
            }));
        }
        let bits = self.bits.unwrap_or(4);
        if !matches!(bits, 2 | 3 | 4 | 8) {
            bail!("--bits {bits}: {name} supports 2, 3, 4 or 8 bits");
        }
        let p = GptqParams {
            bits,
            group_size,
            sym: self.sym,
            act_order: self.act_order,
            static_groups: self.static_groups,
            damp: self.damp.unwrap_or(0.01),
            ..GptqParams::default()
        };
        if !(p.damp > 0.0 && p.damp < 1.0) {
            bail!("--damp {}: expected a fraction in (0, 1)", p.damp);
        }
        Ok(if name == "gptq" {
            CalibratedMethod::Gptq(p)
        } else {
            CalibratedMethod::Rtn(p)
        })
    }

    /// The method and its options, checked: flags that do not apply to `--method` are refused.
    /// `seed` places the calibration windows.
    pub fn resolve(&self, seed: u64) -> Result<ExportMethod> {
        if matches!(self.method.as_str(), "gptq" | "awq" | "rtn-int4") {
            return self.resolve_calibrated(seed);
        }
        if let Some(flag) = self.calibrated_flags().first() {
            bail!(
                "{flag} applies to --method gptq, awq or rtn-int4 only (got --method {})",
                self.method
            );
        }
        let mut method = QuantMethod::parse(&self.method)?.with_context(|| {
            format!(
                "--method none: nothing to quantize; choose one of {}, rtn-int4",
                QuantMethod::NAMES.join(", ")
            )
        })?;
        if self.no_double_quant {
            match &mut method {
                QuantMethod::BitsandbytesNf4 { double_quant } => *double_quant = false,
                _ => bail!("--no-double-quant applies to bitsandbytes-nf4 only"),
            }
        }
        Ok(ExportMethod::Jit(method))
    }

    fn resolve_calibrated(&self, seed: u64) -> Result<ExportMethod> {
        if self.no_double_quant {
            bail!("--no-double-quant applies to bitsandbytes-nf4 only");
        }
        let method = self.calibrated_method()?;
        if method.needs_calibration() && self.calibration.is_none() {
            bail!(
                "--method {} needs --calibration FILE (.txt, or .jsonl with a \"text\" string per line)",
                self.method
            );
        }
        if self.calibration_samples == 0 || self.calibration_seq_len == 0 {
            bail!(
                "--calibration-samples and --calibration-seq-len must be at least 1 (got {} and {})",
                self.calibration_samples,
                self.calibration_seq_len
            );
        }
        let spec = self.calibration.as_ref().map(|p| CalibrationSpec {
            path: p.clone(),
            samples: self.calibration_samples,
            seq_len: self.calibration_seq_len,
            seed,
        });
        if !method.needs_calibration() && spec.is_some() {
            eprintln!("lorq: rtn-int4 needs no calibration; --calibration only measures the output error of each linear");
        }
        Ok(ExportMethod::Calibrated(method, spec))
    }
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let method = a.quant.resolve(a.seed)?;
    let device = crate::common::parse_device(&a.device)?;
    if !device.is_cpu() && matches!(method, ExportMethod::Calibrated(..)) {
        bail!(
            "--device {}: --method {} runs on the CPU (only the just-in-time methods quantize on a GPU); drop --device",
            a.device,
            method.name()
        );
    }
    let dir = lorq_model::pull::resolve_model(&a.model)?;
    let opts = QuantizeOptions {
        force: a.force,
        progress: true,
    };
    let context = || format!("quantizing {} with {}", dir.display(), method.name());
    let done = match &method {
        ExportMethod::Jit(m) => ExportQuantization::Jit(
            quantize_checkpoint_on(&dir, &a.out, *m, opts, &device).with_context(context)?,
        ),
        ExportMethod::Calibrated(m, spec) => ExportQuantization::Calibrated(
            quantize_calibrated(&dir, &a.out, *m, spec.as_ref(), opts).with_context(context)?,
        ),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        print_quantization(&done);
    }
    Ok(())
}

/// The human-readable lines of a quantization summary (`lorq quantize`, `lorq export`).
pub fn print_quantization(done: &ExportQuantization) {
    let sum = done.summary();
    println!(
        "wrote {} ({} tensors, {} linears quantized with {}, {:.2} bits/weight, {} bytes) in {:.1} s",
        sum.out.display(),
        sum.tensors,
        sum.quantized_linears,
        sum.method,
        sum.bits_per_weight,
        sum.bytes,
        sum.seconds
    );
    if let ExportQuantization::Calibrated(s) = done {
        if !s.linears.is_empty() {
            let n = s.linears.len() as f64;
            println!(
                "calibration: {} windows, {} tokens; mean relative output error {:.4} (round-to-nearest on the same inputs: {:.4})",
                s.calibration_samples,
                s.calibration_tokens,
                s.linears.iter().map(|r| r.rel_error).sum::<f64>() / n,
                s.linears.iter().map(|r| r.rtn_rel_error).sum::<f64>() / n
            );
        }
    }
}
