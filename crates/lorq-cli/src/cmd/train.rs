use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lorq_model::LoadedModel;
use lorq_quant::method::QuantMethod;
use lorq_train::data::{load_train_eval, DataOptions, EvalData, Formatter};
use lorq_train::optim::{LrSchedulerKind, OptimizerKind};
use lorq_train::TrainOptions;

use crate::common::{ComputeDtype, LoraFlags};

/// Fine-tune a LoRA adapter with QLoRA: the base frozen in NF4 with double quantization (or any
/// --quantize format, or none), LoRA on every linear, paged 8-bit AdamW, gradient checkpointing.
/// Writes a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) into --out,
/// `checkpoint-<step>/` folders, metrics.jsonl and a loss curve.
///
/// Data: JSONL with `text`, or Alpaca `instruction`/`input`/`output`, or chat `messages`
/// (rendered with the model's chat template); the loss is taken on the completion only for the
/// last two unless --train-on-prompt.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq train --data train.jsonl --out ./my-adapter
  lorq train --model ./base --data chat.jsonl --eval-split 0.05 --max-steps 500 --save-steps 100 --out ./run
  lorq train --data train.jsonl --out ./run --resume
  lorq train --data train.jsonl --quantize none --optim adamw --r 16 --target-modules q_proj,v_proj --out ./run")]
pub struct TrainArgs {
    /// The base model: a Hugging Face folder, or `default` (SmolLM2-135M-Instruct).
    #[arg(long, default_value = "default", env = "LORQ_MODEL")]
    pub model: String,
    /// Training data (JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: the adapter, checkpoints, metrics.
    #[arg(long)]
    pub out: PathBuf,
    /// Base quantization (LoRAX's names, or `none`).
    #[arg(long, default_value = "bitsandbytes-nf4")]
    pub quantize: String,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = ComputeDtype::F32)]
    pub dtype: ComputeDtype,
    /// `cpu`, `cuda` or `cuda:N` (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub lora: LoraFlags,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// constant_with_warmup, cosine, linear or constant.
    #[arg(long, default_value = "constant_with_warmup")]
    pub lr_scheduler: String,
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    /// Passes over the data (ignored with --max-steps).
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 4)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// 0 turns clipping off.
    #[arg(long, default_value_t = 0.3)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.001)]
    pub weight_decay: f64,
    /// paged_adamw_8bit, adamw_8bit, paged_adamw_32bit or adamw.
    #[arg(long, default_value = "paged_adamw_8bit")]
    pub optim: String,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
    /// Concatenate rows into chunks of exactly --max-seq-len tokens.
    #[arg(long)]
    pub packing: bool,
    /// Also train on the prompt tokens of Alpaca and chat rows.
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Skip (and count) bad data rows instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Eval data (JSONL), scored at each save.
    #[arg(long, conflicts_with = "eval_split")]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training rows for eval.
    #[arg(long)]
    pub eval_split: Option<f64>,
    /// Save a checkpoint (and eval) every N steps; 0: only at the end.
    #[arg(long, default_value_t = 0)]
    pub save_steps: usize,
    #[arg(long, default_value_t = 10)]
    pub logging_steps: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Continue from the latest checkpoint in --out.
    #[arg(long, conflicts_with = "resume_from")]
    pub resume: bool,
    /// Continue from this checkpoint folder.
    #[arg(long)]
    pub resume_from: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let device = crate::common::parse_device(&a.device)?;
    let dir = lorq_model::pull::resolve_model(&a.model)?;
    let quantize = QuantMethod::parse(&a.quantize)?;
    if let Some(q) = quantize {
        if !q.is_jit() {
            bail!(
                "--quantize {}: the base is quantized at load for training; use a just-in-time method (bitsandbytes-nf4, bitsandbytes-fp4, bitsandbytes, eetq, hqq-4bit/3bit/2bit, fp8) or none",
                q.name()
            );
        }
    }
    let spec = a.lora.spec()?;
    let opts = TrainOptions {
        lora: spec,
        lr: a.lr,
        scheduler: LrSchedulerKind::parse(&a.lr_scheduler)?,
        warmup_steps: a.warmup_steps,
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_grad_norm: a.max_grad_norm,
        weight_decay: a.weight_decay,
        optim: OptimizerKind::parse(&a.optim)?,
        gradient_checkpointing: a.gradient_checkpointing,
        save_steps: a.save_steps,
        logging_steps: a.logging_steps,
        seed: a.seed,
        base_model: Some(a.model.clone()),
        progress: !a.json,
    };
    let resume = if let Some(d) = &a.resume_from {
        Some(d.clone())
    } else if a.resume {
        match lorq_train::checkpoint::latest(&a.out)? {
            Some(d) => Some(d),
            None => bail!(
                "--resume: no checkpoint-<step> folder in {} (start without --resume)",
                a.out.display()
            ),
        }
    } else {
        None
    };
    if let Some(f) = a.eval_split {
        if !(f > 0.0 && f < 1.0) {
            bail!("--eval-split {f} must be between 0 and 1");
        }
    }
    let data_opts = DataOptions {
        max_seq_len: a.max_seq_len,
        train_on_prompt: a.train_on_prompt,
        packing: a.packing,
        skip_bad_rows: a.skip_bad_rows,
        seed: a.seed,
    };
    let eval = match (&a.eval_data, a.eval_split) {
        (Some(p), _) => EvalData::File(p.clone()),
        (None, Some(f)) => EvalData::Split(f),
        (None, None) => EvalData::None,
    };
    let formatter = Formatter::from_model_dir(&dir)?;
    let data = load_train_eval(&a.data, &eval, &formatter, &data_opts)?;
    let report = &data.train_report;
    if !a.json {
        eprintln!(
            "lorq: {}: {} rows, {} used, {} bad (skipped), {} truncated, {} without trained tokens; {} sequences, {} tokens ({} trained)",
            a.data.display(),
            report.rows,
            report.used_rows,
            report.bad_rows,
            report.truncated_rows,
            report.fully_masked_rows,
            data.train.len(),
            data.train.num_tokens(),
            data.train.num_label_tokens()
        );
        for r in &report.bad_row_reasons {
            eprintln!("lorq:   skipped {r}");
        }
    }
    let loaded = LoadedModel::load_quantized(&dir, a.dtype.dtype(), &device, quantize)
        .with_context(|| format!("loading model {}", dir.display()))?;
    let total = opts.total_steps(&data.train);
    if !a.json {
        eprintln!(
            "lorq: training r={} alpha={} on {} ({}), {} steps of {}×{} sequences, {}, lr {} ({}), checkpointing {}",
            a.lora.r,
            a.lora.lora_alpha,
            a.lora.target_modules,
            quantize.map_or("full precision", |q| q.name()),
            total,
            a.batch_size,
            a.grad_accum,
            opts.optim.name(),
            a.lr,
            opts.scheduler.name(),
            if a.gradient_checkpointing { "on" } else { "off" }
        );
    }
    let summary = lorq_train::train(&loaded.model, &data, &opts, &a.out, resume.as_deref())?;
    let peak = lorq_train::trainer::peak_rss_bytes();
    let png = a.out.join("loss.png");
    let plotted = lorq_train::plot::loss_curve(&summary.history, &png);
    if let Err(e) = &plotted {
        tracing::warn!("no loss curve: {e}");
    }
    let tok_s = summary.tokens as f64 / summary.seconds.max(1e-9);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "out": a.out,
                "steps": summary.steps,
                "first_loss": summary.first_window_loss,
                "last_loss": summary.last_window_loss,
                "eval_loss": summary.eval_loss,
                "eval_ppl": summary.eval_loss.map(f64::exp),
                "tokens": summary.tokens,
                "seconds": summary.seconds,
                "tokens_per_s": tok_s,
                "peak_rss_bytes": peak,
                "resumed_from": summary.resumed_from,
            })
        );
    } else {
        println!(
            "trained {} steps in {:.1}s ({:.0} tokens/s); loss {} -> {}{}; peak RSS {}",
            summary.steps,
            summary.seconds,
            tok_s,
            summary
                .first_window_loss
                .map_or("-".into(), |l| format!("{l:.4}")),
            summary
                .last_window_loss
                .map_or("-".into(), |l| format!("{l:.4}")),
            summary.eval_loss.map_or(String::new(), |l| format!(
                "; eval loss {l:.4} (perplexity {:.2})",
                l.exp()
            )),
            peak.map_or("-".into(), lorq_quant::select::format_size)
        );
        println!(
            "adapter: {} (serve it: lorq serve --model {} --adapter-dir {} ; then request adapter_id {:?})",
            a.out.display(),
            a.model,
            a.out.parent().map_or(".".into(), |p| if p.as_os_str().is_empty() { ".".into() } else { p.display().to_string() }),
            a.out.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned())
        );
        if plotted.is_ok() {
            println!("loss curve: {}", png.display());
        }
    }
    Ok(())
}
