//! The training loop: micro-batches with gradient accumulation, clipping, the optimizer and its
//! schedule, logging (`metrics.jsonl`, progress bar), eval and checkpoints at each save, resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use lorq_model::LlamaModel;
use serde_json::json;

use crate::checkpoint::{self, TrainerState};
use crate::data::{Batcher, Dataset, LoadedData};
use crate::error::{io_err, Result, TrainError};
use crate::lora_params::{LoraParams, LoraSpec};
use crate::optim::{
    build_optimizer, clip_grad_norm, lr_at, AdamWConfig, LrSchedulerKind, OptimizerKind,
};
use crate::step::{eval_nll, forward_backward, MicroBatch};

/// The options of one run (the QLoRA recipe's defaults live in the CLI).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub lora: LoraSpec,
    pub lr: f64,
    pub scheduler: LrSchedulerKind,
    pub warmup_steps: usize,
    /// Passes over the data, used when `max_steps` is `None`.
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// 0 turns clipping off.
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub optim: OptimizerKind,
    pub gradient_checkpointing: bool,
    /// Checkpoint (and eval) every this many steps; 0: only at the end.
    pub save_steps: usize,
    pub logging_steps: usize,
    pub seed: u64,
    /// `base_model_name_or_path` written into the adapter config.
    pub base_model: Option<String>,
    pub progress: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    /// Mean loss of the last step.
    pub last_loss: f64,
    /// Mean loss over the first logged window and the last one.
    pub first_window_loss: Option<f64>,
    pub last_window_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    /// Tokens (inputs) processed in this process (a resumed run counts from the resume).
    pub tokens: usize,
    pub seconds: f64,
    pub resumed_from: Option<PathBuf>,
    pub history: Vec<serde_json::Value>,
}

impl TrainOptions {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("--grad-accum must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr {} must be a positive number", self.lr));
        }
        if self.max_steps == Some(0) {
            return bad("--max-steps must be at least 1".into());
        }
        if self.max_steps.is_none() && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return bad(format!("--epochs {} must be positive", self.epochs));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            return bad(format!(
                "--max-grad-norm {} must be >= 0",
                self.max_grad_norm
            ));
        }
        Ok(())
    }

    /// Optimizer steps of the run.
    pub fn total_steps(&self, train: &Dataset) -> usize {
        match self.max_steps {
            Some(n) => n,
            None => {
                let per_epoch = train
                    .steps_per_epoch(self.batch_size)
                    .div_ceil(self.grad_accum);
                ((per_epoch as f64 * self.epochs).ceil() as usize).max(1)
            }
        }
    }

    /// The options a resume must not change.
    fn fingerprint(&self, total_steps: usize, train: &Dataset) -> serde_json::Value {
        json!({
            "r": self.lora.r,
            "lora_alpha": self.lora.alpha,
            "lora_dropout": self.lora.dropout,
            "use_rslora": self.lora.use_rslora,
            "target_modules": self.lora.targets.describe(),
            "lr": self.lr,
            "lr_scheduler": self.scheduler.name(),
            "warmup_steps": self.warmup_steps,
            "total_steps": total_steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_grad_norm": self.max_grad_norm,
            "weight_decay": self.weight_decay,
            "optim": self.optim.name(),
            "seed": self.seed,
            "train_examples": train.len(),
        })
    }
}

/// Dropout seed of micro-batch `micro` of optimizer step `step`.
fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((step as u64) << 16) ^ micro as u64
}

/// Mean loss over `ds` (`(Σ nll / tokens)`), in batches of `batch_size`.
pub fn evaluate(
    model: &LlamaModel,
    lora: &LoraParams,
    ds: &Dataset,
    batch_size: usize,
) -> Result<f64> {
    let (mut nll, mut n) = (0.0, 0usize);
    for chunk in ds.examples().chunks(batch_size.max(1)) {
        let b = MicroBatch::from_examples(chunk)?;
        nll += eval_nll(model, lora, &b)?;
        n += b.num_targets();
    }
    if n == 0 {
        return Err(TrainError::Config(
            "the eval data has no trained tokens".into(),
        ));
    }
    Ok(nll / n as f64)
}

fn append_metrics(out: &Path, line: &serde_json::Value) -> Result<()> {
    let file = out.join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .map_err(io_err(&file))?;
    writeln!(f, "{line}").map_err(io_err(&file))
}

/// Trains `opts.lora` pairs on `data` over the frozen `model`; writes checkpoints, metrics and the
/// final PEFT adapter into `out`. `resume`: a `checkpoint-<step>` folder to continue from.
pub fn train(
    model: &LlamaModel,
    data: &LoadedData,
    opts: &TrainOptions,
    out: &Path,
    resume: Option<&Path>,
) -> Result<TrainSummary> {
    opts.validate()?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let train_ds = &data.train;
    let total_steps = opts.total_steps(train_ds);
    let fingerprint = opts.fingerprint(total_steps, train_ds);
    let mut batcher = Batcher::new(train_ds, opts.batch_size, opts.seed)?;
    let adam = AdamWConfig {
        weight_decay: opts.weight_decay,
        ..AdamWConfig::default()
    };
    let base_model = opts.base_model.as_deref();

    let (mut lora, mut step, mut history) = match resume {
        None => {
            let lora = LoraParams::init(model, opts.lora.clone(), opts.seed)?;
            let metrics = out.join("metrics.jsonl");
            if metrics.exists() {
                std::fs::remove_file(&metrics).map_err(io_err(&metrics))?;
            }
            (lora, 0, Vec::new())
        }
        Some(dir) => {
            let state = checkpoint::load_state(dir)?;
            if state.fingerprint != fingerprint {
                let (a, b) = (&state.fingerprint, &fingerprint);
                let differ: Vec<String> = b
                    .as_object()
                    .expect("object")
                    .iter()
                    .filter(|(k, v)| a.get(*k) != Some(*v))
                    .map(|(k, v)| {
                        format!(
                            "{k}: checkpoint {} vs now {v}",
                            a.get(k).unwrap_or(&json!(null))
                        )
                    })
                    .collect();
                return Err(TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: format!(
                        "was made with other options; resume with the same ones ({})",
                        differ.join("; ")
                    ),
                });
            }
            batcher.restore(state.data)?;
            let lora = LoraParams::load_peft(model, opts.lora.clone(), dir)?;
            // metrics.jsonl restarts from the checkpoint's history: later lines were never kept.
            let metrics = out.join("metrics.jsonl");
            let mut text = String::new();
            for l in &state.log_history {
                text.push_str(&l.to_string());
                text.push('\n');
            }
            std::fs::write(&metrics, text).map_err(io_err(&metrics))?;
            tracing::info!("resuming from {} at step {}", dir.display(), state.step);
            (lora, state.step, state.log_history)
        }
    };
    let mut optimizer = build_optimizer(opts.optim, adam, &lora.tensors())?;
    if let Some(dir) = resume {
        let tensors = checkpoint::load_optimizer_state(dir, model.device())?;
        optimizer.load_state_dict(&tensors)?;
    }

    let bar = indicatif::ProgressBar::new(total_steps as u64);
    if opts.progress {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "train [{bar:30}] {pos}/{len} steps {msg} ({elapsed} elapsed, {eta} left)",
            )
            .expect("valid template"),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_position(step as u64);

    // The peak reported at the end is the training's, not the model load's.
    reset_peak_rss();
    let started = Instant::now();
    let mut tokens_done = 0usize;
    let mut window = (0.0f64, 0usize, 0usize, Instant::now()); // nll, targets, tokens, since
    let mut last_loss = f64::NAN;
    let mut eval_loss = None;
    let resumed_from = resume.map(Path::to_path_buf);
    while step < total_steps {
        let micro: Vec<MicroBatch> = (0..opts.grad_accum)
            .map(|_| MicroBatch::from_examples(&batcher.next_batch()))
            .collect::<Result<_>>()?;
        let targets: usize = micro.iter().map(MicroBatch::num_targets).sum();
        let tokens: usize = micro.iter().map(|m| m.tokens.len()).sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; 2 * lora.modules.len()];
        let mut nll = 0.0;
        if targets > 0 {
            let scale = 1.0 / targets as f64;
            for (j, mb) in micro.iter().enumerate() {
                nll += forward_backward(
                    model,
                    &lora,
                    mb,
                    scale,
                    opts.gradient_checkpointing,
                    dropout_seed(opts.seed, step, j),
                    &mut grads,
                )?;
            }
        }
        let params = lora.tensors();
        let mut grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&params)
            .map(|(g, p)| match g {
                Some(g) => Ok(g),
                None => Ok(p.zeros_like()?),
            })
            .collect::<Result<_>>()?;
        let max_norm = if opts.max_grad_norm > 0.0 {
            opts.max_grad_norm
        } else {
            f64::INFINITY
        };
        let grad_norm = clip_grad_norm(&mut grads, max_norm)?;
        let lr = lr_at(
            opts.scheduler,
            opts.lr,
            step,
            opts.warmup_steps,
            total_steps,
        );
        let mut params = params;
        optimizer.step(&mut params, &grads, lr)?;
        lora.set_tensors(params)?;
        step += 1;
        tokens_done += tokens;
        let loss = if targets > 0 {
            nll / targets as f64
        } else {
            f64::NAN
        };
        if !loss.is_finite() && targets > 0 {
            return Err(TrainError::Config(format!(
                "the loss became {loss} at step {step}: lower --lr (now {}) or check the data",
                opts.lr
            )));
        }
        last_loss = loss;
        window.0 += nll;
        window.1 += targets;
        window.2 += tokens;
        let tok_s = window.2 as f64 / window.3.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tok_s:.0} tok/s"));
        bar.set_position(step as u64);
        if step % opts.logging_steps.max(1) == 0 || step == total_steps {
            let line = json!({
                "step": step,
                "epoch": batcher.position().epoch as f64
                    + batcher.position().index as f64 / train_ds.len() as f64,
                "loss": if window.1 > 0 { window.0 / window.1 as f64 } else { f64::NAN },
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tok_s,
                "elapsed_s": started.elapsed().as_secs_f64(),
            });
            append_metrics(out, &line)?;
            history.push(line);
            window = (0.0, 0, 0, Instant::now());
        }
        let save_now = (opts.save_steps > 0 && step % opts.save_steps == 0) || step == total_steps;
        if save_now {
            if let Some(eval) = &data.eval {
                let l = evaluate(model, &lora, eval, opts.batch_size)?;
                let line = json!({"step": step, "eval_loss": l, "eval_ppl": l.exp()});
                append_metrics(out, &line)?;
                history.push(line);
                bar.println(format!(
                    "step {step}: eval loss {l:.4}, perplexity {:.2}",
                    l.exp()
                ));
                eval_loss = Some(l);
            }
            let state = TrainerState {
                step,
                total_steps,
                data: batcher.position(),
                seed: opts.seed,
                fingerprint: fingerprint.clone(),
                log_history: history.clone(),
            };
            let dir = checkpoint::save(out, &lora, base_model, optimizer.as_ref(), &state)?;
            tracing::info!("saved {}", dir.display());
        }
    }
    bar.finish_and_clear();
    lora.save_peft(out, base_model)?;
    let train_losses: Vec<f64> = history
        .iter()
        .filter_map(|l| l.get("loss").and_then(|v| v.as_f64()))
        .collect();
    Ok(TrainSummary {
        steps: step,
        last_loss,
        first_window_loss: train_losses.first().copied(),
        last_window_loss: train_losses.last().copied(),
        eval_loss,
        tokens: tokens_done,
        seconds: started.elapsed().as_secs_f64(),
        resumed_from,
        history,
    })
}

/// The process's peak resident memory (Linux `VmHWM`), if the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Restarts the kernel's peak-RSS counter (Linux `clear_refs` 5); a no-op where unsupported.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
