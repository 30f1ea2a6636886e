use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lorq_model::sliding_window_nll;
use serde_json::json;

use crate::common::ModelArgs;

/// Quality evaluations of a model (with its quantization and adapter).
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub what: EvalWhat,
}

#[derive(Debug, Subcommand)]
pub enum EvalWhat {
    /// Sliding-window perplexity of a text file (Hugging Face's fixed-length-model method).
    Ppl(EvalPplArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Windows of --ctx tokens start every --stride tokens; each window scores only the
tokens the previous one did not reach (the first scores all but its first token), so every token
after the first is scored once, with at least ctx - stride tokens of context once past the first
window. The file is read as is and tokenized without special tokens.

Examples:
  lorq eval ppl --data data/wikitext-2/test.txt --max-tokens 8192 --json
  lorq eval ppl --model ./my-model --quantize bitsandbytes-nf4 --adapter ./my-adapter --data test.txt"
)]
pub struct EvalPplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A UTF-8 text file (e.g. WikiText-2's test split as one file).
    #[arg(long)]
    pub data: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Tokens between the starts of two windows (at most --ctx; equal to --ctx, windows do not
    /// overlap and the first token of each window is not scored).
    #[arg(long, default_value_t = 256)]
    pub stride: usize,
    /// Evaluate only the first N tokens of the file.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Print one JSON object (model, quantize, adapter, data, ctx, stride, tokens, nll, ppl, seconds, ...).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    match a.what {
        EvalWhat::Ppl(p) => ppl(p),
    }
}

fn ppl(a: EvalPplArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.data)
        .with_context(|| format!("reading --data {}", a.data.display()))?;
    let t_load = Instant::now();
    let (m, adapter) = a.model.load()?;
    let load_seconds = t_load.elapsed().as_secs_f64();
    let mut ids = m.tokenizer.encode(&text)?;
    let file_tokens = ids.len();
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    if ids.len() < 2 {
        bail!(
            "{} has {} token(s): perplexity needs at least 2",
            a.data.display(),
            ids.len()
        );
    }
    let bar = ProgressBar::new((ids.len() - 1) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "perplexity [{bar:30}] {pos}/{len} tokens, {per_sec}, {eta} left",
        )
        .expect("valid template"),
    );
    let t = Instant::now();
    let r = sliding_window_nll(&m.model, &ids, adapter, a.ctx, a.stride, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    let seconds = t.elapsed().as_secs_f64();
    bar.finish_and_clear();
    // Throughput counts every token that went through the model (overlaps included).
    let tokens_per_s = ids.len() as f64 / seconds;
    if a.json {
        let v = json!({
            "model": a.model.base.model,
            "quantize": a.model.base.quantize,
            "adapter": a.model.adapter,
            "dtype": format!("{:?}", a.model.base.compute_dtype()).to_lowercase(),
            "data": a.data,
            "ctx": a.ctx,
            "stride": a.stride,
            "input_tokens": ids.len(),
            "file_tokens": file_tokens,
            "windows": r.windows,
            "tokens": r.tokens,
            "nll": r.nll,
            "mean_nll": r.nll / r.tokens as f64,
            "ppl": r.ppl,
            "seconds": seconds,
            "load_seconds": load_seconds,
            "tokens_per_s": tokens_per_s,
        });
        println!("{v}");
    } else {
        println!("perplexity: {:.4}", r.ppl);
        println!(
            "NLL: {:.4} total, {:.6} per token",
            r.nll,
            r.nll / r.tokens as f64
        );
        println!(
            "tokens: {} scored of {} evaluated ({} in the file), {} windows of {} every {}",
            r.tokens,
            ids.len(),
            file_tokens,
            r.windows,
            a.ctx,
            a.stride
        );
        println!("time: {seconds:.2} s ({tokens_per_s:.1} tok/s), model load {load_seconds:.2} s");
    }
    Ok(())
}
