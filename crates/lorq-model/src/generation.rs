use std::sync::Arc;

use candle_core::Tensor;
use lorq_lora::LoraAdapter;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::llama::{BatchItem, LlamaModel, LogitsWanted};
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::step_logits::StepLogits;
use crate::step_picks::{pick_step, PickRequest, StepPick};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Why a sequence stopped, spelled as TGI/LoRAX clients expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

/// One generation request, tokenized.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub adapter: Option<Arc<LoraAdapter>>,
}

/// Restricts which tokens may come next (e.g. JSON that matches a schema).
pub trait TokenConstraint: Send {
    /// Sets the logit of every token that may not come next to `-inf`; `eos` are the EOS ids.
    fn mask_logits(&self, logits: &mut [f32], eos: &[u32]);
    /// Moves past the chosen token.
    fn advance(&mut self, token: u32) -> Result<()>;
}

/// What one decoding step produced for a sequence.
#[derive(Debug, Clone)]
pub struct StepToken {
    pub sampled: Sampled,
    /// The text this token completed (empty while a multi-byte character is split).
    pub piece: String,
    /// The `top_n` most likely tokens under the model's raw distribution, best first.
    pub alternatives: Vec<Sampled>,
}

/// A sequence in flight: its cache, sampler, generated tokens and text so far.
pub struct Sequence {
    pub request: GenerationRequest,
    pub cache: KvCache,
    sampler: Sampler,
    decoder: StreamDecoder,
    pub generated: Vec<Sampled>,
    pub text: String,
    pub finish: Option<FinishReason>,
    context: Vec<u32>,
    constraint: Option<Box<dyn TokenConstraint>>,
}

impl Sequence {
    pub fn new(model: &LlamaModel, request: GenerationRequest) -> Result<Self> {
        request.params.validate()?;
        if request.prompt_ids.is_empty() {
            return Err(ModelError::Request("the prompt has no tokens".into()));
        }
        if let Some(a) = &request.adapter {
            model.check_adapter(a)?;
        }
        let context = request.prompt_ids.clone();
        Ok(Self {
            sampler: Sampler::new(request.params.clone()),
            cache: model.new_cache(),
            decoder: StreamDecoder::new(true),
            generated: Vec::new(),
            text: String::new(),
            finish: if request.max_new_tokens == 0 {
                Some(FinishReason::Length)
            } else {
                None
            },
            context,
            request,
            constraint: None,
        })
    }

    /// Decodes under `constraint` from now on.
    pub fn set_constraint(&mut self, constraint: Box<dyn TokenConstraint>) {
        self.constraint = Some(constraint);
    }

    /// This sequence's part of the next batched step: the whole prompt first, then the last
    /// generated token.
    pub fn batch_item(&mut self, logits: LogitsWanted) -> BatchItem<'_> {
        BatchItem {
            tokens: if self.cache.is_empty() {
                &self.request.prompt_ids
            } else {
                &self.context[self.context.len() - 1..]
            },
            cache: &mut self.cache,
            adapter: self.request.adapter.clone(),
            logits,
        }
    }

    pub fn seed(&self) -> u64 {
        self.sampler.seed()
    }

    /// This sequence's part of [`pick_step`], reporting `top_n` alternatives: it needs its row on
    /// the host for a constraint.
    fn pick_request(&mut self, top_n: usize) -> PickRequest<'_> {
        PickRequest {
            sampler: &mut self.sampler,
            context: &self.context,
            alternatives: top_n,
            needs_row: self.constraint.is_some(),
        }
    }

    /// Records a token picked where the logits are, with its alternatives ([`StepPick::Token`]).
    fn accept_picked(
        &mut self,
        s: Sampled,
        alternatives: Vec<Sampled>,
        tok: &Tokenizer,
        eos: &[u32],
    ) -> Result<StepToken> {
        let piece = self.record(s, tok, eos)?;
        Ok(StepToken {
            sampled: s,
            piece,
            alternatives,
        })
    }

    /// Samples from one row of logits (changed in place by the constraint's mask), records the
    /// token and updates the finish state; also returns the `top_n` alternatives.
    pub fn accept_scores(
        &mut self,
        row: &mut [f32],
        tok: &Tokenizer,
        eos: &[u32],
        top_n: usize,
    ) -> Result<StepToken> {
        let alternatives = top_logprobs(row, top_n);
        if let Some(c) = &self.constraint {
            c.mask_logits(row, eos);
        }
        let s = self.sampler.sample(row, &self.context);
        // EOS carries no text: the constraint only allowed it once the value was complete.
        if let Some(c) = self.constraint.as_mut().filter(|_| !eos.contains(&s.id)) {
            c.advance(s.id)?;
        }
        let piece = self.record(s, tok, eos)?;
        Ok(StepToken {
            sampled: s,
            piece,
            alternatives,
        })
    }

    fn record(&mut self, s: Sampled, tok: &Tokenizer, eos: &[u32]) -> Result<String> {
        self.context.push(s.id);
        self.generated.push(s);
        let is_eos = !self.request.ignore_eos && eos.contains(&s.id);
        let piece = self.decoder.push(tok, s.id)?;
        let tail_from = self.text.len();
        self.text.push_str(&piece);
        if is_eos {
            self.finish = Some(FinishReason::EosToken);
        } else if self.stop_matched(tail_from) {
            self.finish = Some(FinishReason::StopSequence);
        } else if self.generated.len() >= self.request.max_new_tokens {
            self.finish = Some(FinishReason::Length);
        }
        Ok(piece)
    }

    /// Whether a stop sequence ends within the text added since byte `tail_from`.
    fn stop_matched(&self, tail_from: usize) -> bool {
        self.request.stop.iter().any(|s| {
            let mut from = tail_from.saturating_sub(s.len());
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            !s.is_empty() && self.text[from..].contains(s.as_str())
        })
    }

    pub fn token_ids(&self) -> Vec<u32> {
        self.generated.iter().map(|s| s.id).collect()
    }
}

/// Picks every sequence's next token from a step's logits (item `i` is `seqs[i]`'s, its last row
/// the next token's) and records it: [`pick_step`] picks what it can where the logits are, the
/// rest sample from their rows on the host in parallel. `top_n[i]`: the alternatives `seqs[i]`
/// reports. The outer error is the step's (a failed launch or copy); the inner ones are each
/// sequence's own (e.g. its constraint refused the token).
pub fn accept_step(
    seqs: &mut [&mut Sequence],
    logits: &StepLogits,
    tok: &Tokenizer,
    eos: &[u32],
    top_n: &[usize],
) -> Result<Vec<Result<StepToken>>> {
    if logits.len() != seqs.len() || top_n.len() != seqs.len() {
        return Err(ModelError::Request(format!(
            "accept_step: {} sequences, {} items of logits, {} top_n",
            seqs.len(),
            logits.len(),
            top_n.len()
        )));
    }
    let picks = {
        let mut requests: Vec<PickRequest> = seqs
            .iter_mut()
            .zip(top_n)
            .map(|(seq, &n)| seq.pick_request(n))
            .collect();
        pick_step(logits, &mut requests)?
    };
    // Sampling a 128k vocabulary takes the host ~1 ms per sequence: the batch's in parallel.
    Ok(seqs
        .par_iter_mut()
        .zip(picks)
        .zip(top_n)
        .map(|((seq, pick), &top_n)| match pick {
            StepPick::Token(s, alternatives) => seq.accept_picked(s, alternatives, tok, eos),
            StepPick::Row(mut row) => seq.accept_scores(&mut row, tok, eos, top_n),
        })
        .collect())
}

/// Runs `seqs` together until every one finishes: one prefill step for all prompts, then decode
/// steps over the unfinished ones. `on_token(index, token, text)` sees every token as it comes.
pub fn run_to_completion(
    model: &LlamaModel,
    tok: &Tokenizer,
    eos: &[u32],
    seqs: &mut [Sequence],
    mut on_token: impl FnMut(usize, Sampled, &str),
) -> Result<()> {
    loop {
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].finish.is_none())
            .collect();
        if active.is_empty() {
            return Ok(());
        }
        let mut items: Vec<BatchItem<'_>> = seqs
            .iter_mut()
            .filter(|s| s.finish.is_none())
            .map(|seq| seq.batch_item(LogitsWanted::Last))
            .collect();
        let logits = model.forward_step(&mut items)?;
        drop(items);
        let mut running: Vec<&mut Sequence> =
            seqs.iter_mut().filter(|s| s.finish.is_none()).collect();
        let steps = accept_step(&mut running, &logits, tok, eos, &vec![0; active.len()])?;
        for (&i, step) in active.iter().zip(steps) {
            let step = step?;
            on_token(i, step.sampled, &step.piece);
        }
    }
}

/// The `n` most likely tokens of `logits` with their log-probabilities, best first (the smaller
/// index on ties).
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<Sampled> {
    if n == 0 {
        return vec![];
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(idx.len());
    // Larger first, the smaller index on ties (at the cut too: the GPU's top_rows takes the same).
    let order = |&a: &usize, &b: &usize| logits[b].total_cmp(&logits[a]).then(a.cmp(&b));
    idx.select_nth_unstable_by(n - 1, order);
    idx.truncate(n);
    idx.sort_by(order);
    idx.into_iter()
        .map(|i| Sampled {
            id: i as u32,
            logprob: logits[i] - log_z,
        })
        .collect()
}

/// Log-probability of each prompt token given the ones before it: `None` for the first, then
/// from `logits` (`[n, vocab]`, one row per prompt position).
pub fn prompt_logprobs(logits: &Tensor, prompt: &[u32]) -> Result<Vec<Option<f32>>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let mut out = Vec::with_capacity(prompt.len());
    out.push(None);
    for (row, &next) in rows.iter().zip(&prompt[1..]) {
        out.push(Some(crate::sampling::log_softmax_at(row, next as usize)));
    }
    Ok(out)
}

impl TokenConstraint for crate::json_constraint::JsonConstraint {
    fn mask_logits(&self, logits: &mut [f32], eos: &[u32]) {
        crate::json_constraint::JsonConstraint::mask_logits(self, logits, eos)
    }
    fn advance(&mut self, token: u32) -> Result<()> {
        crate::json_constraint::JsonConstraint::advance(self, token)
    }
}
