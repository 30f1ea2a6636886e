use std::sync::Arc;

use candle_core::Tensor;
use lorq_lora::LoraAdapter;
use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::llama::{BatchItem, LlamaModel, LogitsWanted};
use crate::sampling::{Sampled, Sampler, SamplingParams};
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
        })
    }

    pub fn seed(&self) -> u64 {
        self.sampler.seed()
    }

    /// Samples from `logits` (`[1, vocab]`), records the token and updates the finish state.
    /// Returns the token and the text it completed.
    pub fn accept(
        &mut self,
        logits: &Tensor,
        tok: &Tokenizer,
        eos: &[u32],
    ) -> Result<(Sampled, String)> {
        let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let s = self.sampler.sample(&row, &self.context);
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
        Ok((s, piece))
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
            .map(|seq| BatchItem {
                // The whole prompt first, then the last generated token.
                tokens: if seq.cache.is_empty() {
                    &seq.request.prompt_ids
                } else {
                    &seq.context[seq.context.len() - 1..]
                },
                cache: &mut seq.cache,
                adapter: seq.request.adapter.clone(),
                logits: LogitsWanted::Last,
            })
            .collect();
        let logits = model.forward(&mut items)?;
        drop(items);
        for (&i, l) in active.iter().zip(&logits) {
            let (s, piece) = seqs[i].accept(l, tok, eos)?;
            on_token(i, s, &piece);
        }
    }
}
