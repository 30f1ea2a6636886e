//! LoRAX / TGI routes: `POST /` (the clients' route, `"stream"` in the body), `/generate` and
//! `/generate_stream`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use lorq_model::chat_template::ChatMessage;
use lorq_model::generation::StepToken;
use lorq_model::sampling::SamplingParams;

use crate::body::JsonBody;
use crate::engine::Event;
use crate::error::ApiError;
use crate::request::{adapter_choice, Options, Prompt};
use crate::routes::collect::{collect_all, total_logprob, Collected};
use crate::state::{AppState, Submitted};
use crate::wire::native::*;

type AppStateRef = State<Arc<AppState>>;

/// What a native request asked for beyond the engine's spec.
struct Asked {
    details: bool,
    return_full_text: bool,
    best_of: usize,
    prompt_text: String,
}

pub async fn compat_generate(
    state: AppStateRef,
    JsonBody(req): JsonBody<GenerateRequest>,
) -> Response {
    if req.stream {
        generate_stream_inner(state, req).await
    } else {
        match generate_inner(&state, req).await {
            Ok(r) => Json(vec![r]).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

pub async fn generate(state: AppStateRef, JsonBody(req): JsonBody<GenerateRequest>) -> Response {
    match generate_inner(&state, req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn generate_stream(
    state: AppStateRef,
    JsonBody(req): JsonBody<GenerateRequest>,
) -> Response {
    generate_stream_inner(state, req).await
}

/// Validates the parameters into engine options.
fn options(
    p: &GenerateParameters,
    stream: bool,
    max_best_of: usize,
) -> Result<(Options, usize), ApiError> {
    if p.watermark == Some(true) {
        return Err(ApiError::validation(
            "`watermark` is not supported by lorq; send watermark: false",
        ));
    }
    if p.frequency_penalty.is_some_and(|f| f != 0.0) {
        return Err(ApiError::validation(
            "`frequency_penalty` is not supported; use `repetition_penalty`",
        ));
    }
    let top_k = match p.top_k {
        None => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::validation(format!(
                "`top_k` must be > 0, got {k}"
            )))
        }
    };
    let params = SamplingParams {
        do_sample: p.do_sample.unwrap_or(false),
        temperature: p.temperature,
        top_k,
        top_p: p.top_p,
        typical_p: p.typical_p,
        repetition_penalty: p.repetition_penalty,
        seed: p.seed,
    };
    let best_of = p.best_of.unwrap_or(1) as usize;
    if best_of == 0 {
        return Err(ApiError::validation("`best_of` must be > 0"));
    }
    if best_of > 1 {
        if params.is_greedy() {
            return Err(ApiError::validation(
                "`best_of` > 1 needs sampling (do_sample: true or a temperature/top_k/top_p/typical_p)",
            ));
        }
        if stream {
            return Err(ApiError::validation("`best_of` > 1 cannot be streamed"));
        }
        if best_of > max_best_of {
            return Err(ApiError::validation(format!(
                "`best_of` is {best_of}; at most {max_best_of} is allowed (--max-best-of)"
            )));
        }
    }
    if stream && p.decoder_input_details == Some(true) {
        return Err(ApiError::validation(
            "`decoder_input_details` cannot be used with streaming",
        ));
    }
    let json = match (&p.response_format, &p.grammar) {
        (Some(_), Some(_)) => {
            return Err(ApiError::validation(
                "give either `response_format` or `grammar`, not both",
            ))
        }
        (Some(rf), None) => match rf.kind.as_str() {
            "json_object" | "json_schema" | "json" => Some(rf.schema.clone()),
            "text" => None,
            other => {
                return Err(ApiError::validation(format!(
                    "response_format.type {other:?} is not supported (json_object or text)"
                )))
            }
        },
        (None, Some(g)) => match g.kind.as_str() {
            "json" | "json_object" => Some(if g.value.is_null() {
                None
            } else {
                Some(g.value.clone())
            }),
            other => {
                return Err(ApiError::validation(format!(
                    "grammar.type {other:?} is not supported; only JSON-schema grammars (type \"json\") are"
                )))
            }
        },
        (None, None) => None,
    };
    let top_n = p.return_k_alternatives.or(p.top_n_tokens).unwrap_or(0);
    Ok((
        Options {
            params,
            max_new_tokens: p.max_new_tokens,
            stop: p.stop.clone().unwrap_or_default(),
            ignore_eos: p.ignore_eos_token.unwrap_or(false),
            truncate: p.truncate,
            top_n,
            prefill_details: p.decoder_input_details.unwrap_or(false),
            json,
            fill_context: false,
        },
        best_of,
    ))
}

/// `inputs` as a prompt: with `apply_chat_template`, a JSON list of messages (or a plain string
/// taken as one user message) rendered with the model's chat template.
fn prompt_of(inputs: String, apply_chat_template: bool) -> Result<Prompt, ApiError> {
    if !apply_chat_template {
        return Ok(Prompt::Text(inputs));
    }
    if inputs.trim_start().starts_with('[') {
        let messages: Vec<ChatMessage> = serde_json::from_str(&inputs).map_err(|e| {
            ApiError::validation(format!(
                "apply_chat_template: `inputs` looks like a JSON list but is not a list of {{\"role\", \"content\"}} messages: {e}"
            ))
        })?;
        return Ok(Prompt::Chat(messages));
    }
    Ok(Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: inputs,
    }]))
}

async fn submit(
    state: &AppState,
    req: GenerateRequest,
    stream: bool,
) -> Result<(Vec<Submitted>, Asked), ApiError> {
    let p = req.parameters;
    let (opts, best_of) = options(&p, stream, state.config.max_best_of)?;
    let choice = adapter_choice(
        &state.config.model_id,
        p.adapter_id.clone(),
        p.adapter_source.as_deref(),
        p.merged_adapters.clone(),
    )?;
    let permit = state.permit(best_of)?;
    let prompt = prompt_of(req.inputs, p.apply_chat_template.unwrap_or(false))?;
    let mut opts = opts;
    if best_of > 1 {
        // Candidates differ by seed only: seed, seed + 1, ...
        opts.params.seed = Some(opts.params.seed.unwrap_or_else(rand::random));
    }
    let json = opts.json.clone();
    let (spec, prompt_text) = state.prepare(choice, prompt, opts).await?;
    let specs = state.candidates(spec, best_of, json.as_ref())?;
    let mut permit = Some(permit);
    let mut subs = Vec::with_capacity(best_of);
    for spec in specs {
        subs.push(state.submit(spec, permit.take())?);
    }
    Ok((
        subs,
        Asked {
            details: p.details.unwrap_or(false),
            return_full_text: p.return_full_text.unwrap_or(false),
            best_of,
            prompt_text,
        },
    ))
}

fn token_of(state: &AppState, t: &StepToken) -> Token {
    let tok = &state.model.tokenizer;
    Token {
        id: t.sampled.id,
        text: t.piece.clone(),
        logprob: t.sampled.logprob,
        special: tok.is_special(t.sampled.id),
        alternative_tokens: (!t.alternatives.is_empty()).then(|| alternatives(state, t)),
    }
}

fn alternatives(state: &AppState, t: &StepToken) -> Vec<AlternativeToken> {
    t.alternatives
        .iter()
        .map(|a| AlternativeToken {
            id: a.id,
            text: state
                .model
                .tokenizer
                .decode(&[a.id], false)
                .unwrap_or_default(),
            logprob: a.logprob,
        })
        .collect()
}

fn prefill_of(state: &AppState, c: &Collected) -> Vec<PrefillToken> {
    c.prefill
        .iter()
        .map(|&(id, logprob)| PrefillToken {
            id,
            text: state
                .model
                .tokenizer
                .decode(&[id], false)
                .unwrap_or_default(),
            logprob,
        })
        .collect()
}

fn full_text(asked: &Asked, text: &str) -> String {
    if asked.return_full_text {
        format!("{}{text}", asked.prompt_text)
    } else {
        text.to_string()
    }
}

async fn generate_inner(
    state: &AppState,
    req: GenerateRequest,
) -> Result<GenerateResponse, ApiError> {
    let (subs, asked) = submit(state, req, false).await?;
    let mut all = collect_all(subs).await?;
    // best_of: the candidate with the highest total log-probability answers.
    let best = (0..all.len())
        .max_by(|&a, &b| total_logprob(&all[a]).total_cmp(&total_logprob(&all[b])))
        .expect("at least one candidate");
    let winner = all.remove(best);
    let details = asked.details.then(|| {
        let best_of_sequences = (asked.best_of > 1).then(|| {
            all.iter()
                .map(|c| BestOfSequence {
                    generated_text: full_text(&asked, &c.finished.text),
                    finish_reason: c.finished.reason,
                    generated_tokens: c.finished.generated_tokens,
                    seed: c.finished.seed,
                    prefill: prefill_of(state, c),
                    tokens: c.tokens.iter().map(|t| token_of(state, t)).collect(),
                })
                .collect()
        });
        Details {
            finish_reason: winner.finished.reason,
            prompt_tokens: winner.finished.prompt_tokens,
            generated_tokens: winner.finished.generated_tokens,
            seed: winner.finished.seed,
            prefill: prefill_of(state, &winner),
            tokens: winner.tokens.iter().map(|t| token_of(state, t)).collect(),
            best_of_sequences,
        }
    });
    Ok(GenerateResponse {
        generated_text: full_text(&asked, &winner.finished.text),
        details,
    })
}

async fn generate_stream_inner(State(state): AppStateRef, req: GenerateRequest) -> Response {
    let (mut subs, asked) = match submit(&state, req, true).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let sub = subs.pop().expect("one candidate when streaming");
    Sse::new(native_events(state, sub, asked))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The SSE events of one request: a `StreamResponse` per token, the last with the full text
/// (and details when asked); an error event if generation fails midway. No `[DONE]`: the
/// LoRAX and TGI clients would fail to parse it.
fn native_events(
    state: Arc<AppState>,
    sub: Submitted,
    asked: Asked,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(
        (state, sub, asked, None::<StepToken>, false),
        |(state, mut sub, asked, mut pending, ended)| async move {
            if ended {
                return None;
            }
            loop {
                match sub.events.recv().await {
                    Some(Event::Prefill(_)) => continue,
                    Some(Event::Token(t)) => {
                        // Hold each token back by one, so the last can carry the final text.
                        if let Some(prev) = pending.replace(t) {
                            let ev = StreamResponse {
                                token: token_of(&state, &prev),
                                top_tokens: (!prev.alternatives.is_empty())
                                    .then(|| alternatives(&state, &prev)),
                                generated_text: None,
                                details: None,
                            };
                            return Some((Ok(sse_json(&ev)), (state, sub, asked, pending, false)));
                        }
                    }
                    Some(Event::Finished(f)) => {
                        let last = pending
                            .take()
                            .expect("a finished request generated a token");
                        let ev = StreamResponse {
                            token: token_of(&state, &last),
                            top_tokens: (!last.alternatives.is_empty())
                                .then(|| alternatives(&state, &last)),
                            generated_text: Some(full_text(&asked, &f.text)),
                            details: asked.details.then_some(StreamDetails {
                                finish_reason: f.reason,
                                prompt_tokens: f.prompt_tokens,
                                generated_tokens: f.generated_tokens,
                                seed: f.seed,
                            }),
                        };
                        return Some((Ok(sse_json(&ev)), (state, sub, asked, None, true)));
                    }
                    Some(Event::Failed(e)) => {
                        let ev = SseEvent::default().data(e.body());
                        return Some((Ok(ev), (state, sub, asked, None, true)));
                    }
                    None => {
                        let e = ApiError::new(
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            crate::error::ErrorType::IncompleteGeneration,
                            "the generation engine stopped before the request finished",
                        );
                        return Some((
                            Ok(SseEvent::default().data(e.body())),
                            (state, sub, asked, None, true),
                        ));
                    }
                }
            }
        },
    )
}

pub fn sse_json<T: serde::Serialize>(v: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(v).expect("response types serialize"))
}
