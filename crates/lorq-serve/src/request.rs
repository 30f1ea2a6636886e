//! Turning a request of any of the three APIs into a validated [`JobSpec`]: prompt tokens,
//! limits, sampling parameters, the adapter, and the JSON constraint.

use std::sync::Arc;

use lorq_lora::LoraAdapter;
use lorq_model::chat_template::ChatMessage;
use lorq_model::sampling::SamplingParams;

use crate::engine::JobSpec;
use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::native::MergedAdapters;

/// Which weights serve the request.
#[derive(Debug, Clone)]
pub enum AdapterChoice {
    Base,
    Id(String),
    Merged(MergedAdapters),
}

/// The prompt: raw text, or chat messages rendered with the model's template.
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// Sampling and output options common to every API, already in lorq's terms.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub params: SamplingParams,
    pub max_new_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub truncate: Option<u32>,
    pub top_n: u32,
    pub prefill_details: bool,
    /// `Some(None)`: any JSON object; `Some(Some(schema))`: JSON matching the schema.
    pub json: Option<Option<serde_json::Value>>,
    /// Without `max_new_tokens`, generate up to `--max-total-tokens` (OpenAI chat) instead of
    /// the default 20.
    pub fill_context: bool,
}

/// Default for `max_new_tokens` when a request leaves it out (TGI's).
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 20;

impl AppState {
    /// Validates and tokenizes; loads (or merges) the adapter. Returns the spec and the
    /// prompt text (for `return_full_text` / `echo`).
    pub async fn prepare(
        &self,
        adapter: AdapterChoice,
        prompt: Prompt,
        opts: Options,
    ) -> Result<(JobSpec, String), ApiError> {
        let cfg = &self.config;
        let text = match prompt {
            Prompt::Text(t) => t,
            Prompt::Chat(messages) => {
                if messages.is_empty() {
                    return Err(ApiError::validation("`messages` is empty"));
                }
                self.model
                    .render_chat(&messages)
                    .map_err(|e| ApiError::validation(e.to_string()))?
            }
        };
        if text.is_empty() {
            return Err(ApiError::validation("the prompt (`inputs`) is empty"));
        }
        opts.params
            .validate()
            .map_err(|e| ApiError::validation(e.to_string()))?;
        if opts.stop.len() > cfg.max_stop_sequences {
            return Err(ApiError::validation(format!(
                "`stop` has {} sequences; at most {} are allowed (--max-stop-sequences)",
                opts.stop.len(),
                cfg.max_stop_sequences
            )));
        }
        if opts.top_n as usize > cfg.max_top_n_tokens {
            return Err(ApiError::validation(format!(
                "{} alternatives per token were asked for; at most {} are allowed",
                opts.top_n, cfg.max_top_n_tokens
            )));
        }
        let mut ids = self
            .model
            .tokenizer
            .encode(&text)
            .map_err(|e| ApiError::validation(e.to_string()))?;
        if let Some(t) = opts.truncate {
            if t == 0 {
                return Err(ApiError::validation("`truncate` must be > 0"));
            }
            let t = t as usize;
            if ids.len() > t {
                ids.drain(..ids.len() - t);
            }
        }
        if ids.is_empty() {
            return Err(ApiError::validation("the prompt has no tokens"));
        }
        if ids.len() > cfg.max_input_length {
            return Err(ApiError::validation(format!(
                "the prompt has {} tokens, more than --max-input-length {} (use `truncate` to keep the last tokens)",
                ids.len(),
                cfg.max_input_length
            )));
        }
        let max_new = match (opts.max_new_tokens, opts.fill_context) {
            (Some(n), _) => n as usize,
            (None, false) => DEFAULT_MAX_NEW_TOKENS as usize,
            (None, true) => cfg.max_total_tokens.saturating_sub(ids.len()),
        };
        if max_new == 0 {
            return Err(ApiError::validation("`max_new_tokens` must be > 0"));
        }
        if ids.len() + max_new > cfg.max_total_tokens {
            return Err(ApiError::validation(format!(
                "prompt tokens ({}) + max_new_tokens ({max_new}) = {} exceeds --max-total-tokens {}",
                ids.len(),
                ids.len() + max_new,
                cfg.max_total_tokens
            )));
        }
        let constraint = match opts.json {
            None => None,
            Some(schema) => Some(self.json_constraint(schema.as_ref())?),
        };
        let (adapter_key, adapter) = self.resolve_adapter(adapter).await?;
        let spec = JobSpec {
            prompt_ids: ids,
            adapter_key,
            adapter,
            params: opts.params,
            max_new_tokens: max_new,
            stop: opts.stop,
            ignore_eos: opts.ignore_eos,
            top_n: opts.top_n as usize,
            prefill_details: opts.prefill_details,
            constraint,
        };
        Ok((spec, text))
    }

    /// `spec` and `n - 1` more candidates of the same request (best_of, n): each with the next
    /// seed and its own JSON constraint.
    pub fn candidates(
        &self,
        spec: JobSpec,
        n: usize,
        json: Option<&Option<serde_json::Value>>,
    ) -> Result<Vec<JobSpec>, ApiError> {
        let mut specs = Vec::with_capacity(n);
        for i in 1..n {
            let constraint = match json {
                None => None,
                Some(s) => Some(self.json_constraint(s.as_ref())?),
            };
            let seed = spec.params.seed.map(|s| s.wrapping_add(i as u64));
            specs.push(spec.fork(seed, constraint));
        }
        specs.insert(0, spec);
        Ok(specs)
    }

    async fn resolve_adapter(
        &self,
        choice: AdapterChoice,
    ) -> Result<(Option<String>, Option<Arc<LoraAdapter>>), ApiError> {
        match choice {
            AdapterChoice::Base => Ok((None, None)),
            AdapterChoice::Id(id) => {
                let a = self.store.get(&id).await?;
                Ok((Some(id), Some(a)))
            }
            AdapterChoice::Merged(spec) => {
                let (key, a) = self.store.get_merged(&spec).await?;
                Ok((Some(key), Some(a)))
            }
        }
    }
}

/// The adapter a LoRAX request names: `merged_adapters` wins, then `adapter_id`; the base
/// model's own name and `""` mean the base. Only `local` sources exist here.
pub fn adapter_choice(
    model_id: &str,
    adapter_id: Option<String>,
    adapter_source: Option<&str>,
    merged: Option<MergedAdapters>,
) -> Result<AdapterChoice, ApiError> {
    match adapter_source {
        None | Some("local") => {}
        Some(s @ ("hub" | "s3" | "pbase")) => {
            return Err(ApiError::validation(format!(
                "adapter_source {s:?} is not supported: lorq serves adapters from --adapter-dir only (adapter_source \"local\"); download the adapter into an adapter directory"
            )))
        }
        Some(s) => {
            return Err(ApiError::validation(format!(
                "adapter_source {s:?} is unknown; the only supported source is \"local\""
            )))
        }
    }
    if let Some(m) = merged {
        return Ok(AdapterChoice::Merged(m));
    }
    match adapter_id {
        None => Ok(AdapterChoice::Base),
        Some(id) if id.is_empty() || id == model_id => Ok(AdapterChoice::Base),
        Some(id) => Ok(AdapterChoice::Id(id)),
    }
}
