//! Sliding-window perplexity of a token sequence, as in Hugging Face's "perplexity of fixed-length
//! models": windows of `ctx` tokens start every `stride` tokens; each window scores only the tokens
//! the previous window did not reach (the first window scores all but its first token), so every
//! token from the second on is scored exactly once, with up to `ctx - stride` tokens of context
//! before the first scored one.
//!
//! Unlike the snippet in the transformers docs (which multiplies the mean loss by `trg_len - 1`),
//! the sum here is the exact sum of per-token negative log-likelihoods, and `tokens` the exact
//! count of scored tokens.

use std::sync::Arc;

use lorq_lora::LoraAdapter;

use crate::error::{ModelError, Result};
use crate::llama::{BatchItem, LlamaModel, LogitsWanted};

/// What [`sliding_window_nll`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PplResult {
    /// Sum of `-log p(token | context)` over the scored tokens (natural log).
    pub nll: f64,
    /// Number of scored tokens (`ids.len() - 1` when `stride < ctx`).
    pub tokens: usize,
    /// `exp(nll / tokens)`.
    pub ppl: f64,
    /// Number of forward passes (windows).
    pub windows: usize,
}

/// One window: the tokens `begin..end` go through the model, the targets `first..end` are scored
/// (each from the logits of the position before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub first: usize,
}

/// The windows for `n` tokens (the transformers loop: `begin = 0, stride, 2·stride, …` until a
/// window reaches the end).
pub fn windows(n: usize, ctx: usize, stride: usize) -> Result<Vec<Window>> {
    if ctx < 2 {
        return Err(ModelError::Request(format!(
            "the context length must be at least 2 tokens (got {ctx})"
        )));
    }
    if stride == 0 || stride > ctx {
        return Err(ModelError::Request(format!(
            "the stride must be between 1 and the context length {ctx} (got {stride})"
        )));
    }
    if n < 2 {
        return Err(ModelError::Request(format!(
            "perplexity needs at least 2 tokens (got {n})"
        )));
    }
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    loop {
        let end = (begin + ctx).min(n);
        // With `stride == ctx` a window's first token has no context: it is not scored.
        let first = prev_end.max(begin + 1);
        out.push(Window { begin, end, first });
        if end == n {
            return Ok(out);
        }
        prev_end = end;
        begin += stride;
    }
}

/// Sliding-window negative log-likelihood and perplexity of `ids` under `model` (with `adapter`).
/// `on_progress(scored, total)` is called after every window with the number of tokens scored so
/// far and the number that will be scored in all.
pub fn sliding_window_nll(
    model: &LlamaModel,
    ids: &[u32],
    adapter: Option<Arc<LoraAdapter>>,
    ctx: usize,
    stride: usize,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<PplResult> {
    let plan = windows(ids.len(), ctx, stride)?;
    let total: usize = plan.iter().map(|w| w.end - w.first).sum();
    let mut nll = 0f64;
    let mut scored = 0usize;
    for w in &plan {
        let mut cache = model.new_cache();
        let logits = model.forward(&mut [BatchItem {
            tokens: &ids[w.begin..w.end],
            cache: &mut cache,
            adapter: adapter.clone(),
            logits: LogitsWanted::All,
        }])?;
        // Row r predicts token begin + r + 1: the targets first..end are rows first-1-begin.. .
        let rows = logits[0]
            .narrow(0, w.first - 1 - w.begin, w.end - w.first)?
            .to_vec2::<f32>()?;
        for (row, &target) in rows.iter().zip(&ids[w.first..w.end]) {
            nll -= log_prob(row, target as usize);
        }
        scored += w.end - w.first;
        on_progress(scored, total);
    }
    Ok(PplResult {
        nll,
        tokens: scored,
        ppl: (nll / scored as f64).exp(),
        windows: plan.len(),
    })
}

/// `log_softmax(row)[i]` in f64 (the sum over thousands of tokens keeps full precision).
fn log_prob(row: &[f32], i: usize) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    row[i] as f64 - lse
}
