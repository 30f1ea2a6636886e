//! OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions` (streaming ends with
//! `data: [DONE]`, as the OpenAI client requires) and `/v1/models`. `model` names the adapter;
//! `""` or the base model's name means the base model.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use lorq_model::chat_template::ChatMessage;
use lorq_model::generation::{FinishReason, StepToken};
use lorq_model::sampling::SamplingParams;

use crate::body::JsonBody;
use crate::engine::Event;
use crate::error::ApiError;
use crate::request::{adapter_choice, Options, Prompt};
use crate::routes::collect::{collect_all, Collected};
use crate::routes::native::sse_json;
use crate::state::{AppState, Submitted};
use crate::wire::openai::*;

type AppStateRef = State<Arc<AppState>>;

/// Most completions one request may ask for (`n` × prompts).
const MAX_CHOICES: usize = 16;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
    }
}

/// OpenAI sampling fields in lorq's terms. No temperature means 1.0 and sampling, as OpenAI
/// does; temperature 0 is greedy.
fn options(s: &OpenAiSampling, top_n: u32, fill_context: bool) -> Result<Options, ApiError> {
    for (name, v) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::validation(format!(
                "`{name}` is not supported; use `repetition_penalty`"
            )));
        }
    }
    if s.logit_bias
        .as_ref()
        .is_some_and(|b| !(b.is_null() || b.as_object().is_some_and(|o| o.is_empty())))
    {
        return Err(ApiError::validation("`logit_bias` is not supported"));
    }
    let top_k = match s.top_k {
        None | Some(-1) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::validation(format!(
                "`top_k` must be > 0, got {k}"
            )))
        }
    };
    let temperature = s.temperature.unwrap_or(1.0);
    let params = SamplingParams {
        do_sample: temperature > 0.0,
        temperature: Some(temperature),
        top_k,
        top_p: s.top_p,
        typical_p: None,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
    };
    let json = match &s.response_format {
        None => None,
        Some(rf) => match rf.kind.as_str() {
            "text" => None,
            "json_object" => Some(rf.schema.clone()),
            "json_schema" => {
                let schema = rf
                    .json_schema
                    .as_ref()
                    .and_then(|j| j.schema.clone())
                    .or_else(|| rf.schema.clone());
                if schema.is_none() {
                    return Err(ApiError::validation(
                        "response_format json_schema needs `json_schema.schema`",
                    ));
                }
                Some(schema)
            }
            other => {
                return Err(ApiError::validation(format!(
                "response_format.type {other:?} is not supported (text, json_object, json_schema)"
            )))
            }
        },
    };
    Ok(Options {
        params,
        max_new_tokens: s.max_completion_tokens.or(s.max_tokens),
        stop: s.stop.clone().map(OneOrMany::into_vec).unwrap_or_default(),
        ignore_eos: s.ignore_eos_token.unwrap_or(false),
        truncate: None,
        top_n,
        prefill_details: false,
        json,
        fill_context,
    })
}

/// Submits `n` candidates per prompt; returns them in choice order with the prompt texts.
async fn submit_all(
    state: &AppState,
    s: &OpenAiSampling,
    prompts: Vec<Prompt>,
    opts: Options,
) -> Result<(Vec<Submitted>, Vec<String>), ApiError> {
    let n = s.n.unwrap_or(1) as usize;
    if n == 0 {
        return Err(ApiError::validation("`n` must be > 0"));
    }
    let total = n * prompts.len();
    if total > MAX_CHOICES {
        return Err(ApiError::validation(format!(
            "{total} completions were asked for (n × prompts); at most {MAX_CHOICES} are allowed"
        )));
    }
    if prompts.is_empty() {
        return Err(ApiError::validation("`prompt` is empty"));
    }
    let choice = adapter_choice(
        &state.config.model_id,
        s.model.clone(),
        s.adapter_source.as_deref(),
        s.merged_adapters.clone(),
    )?;
    let mut permit = Some(state.permit(total)?);
    let mut subs = Vec::with_capacity(total);
    let mut texts = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let mut o = opts.clone();
        if n > 1 && !o.params.is_greedy() {
            o.params.seed = Some(o.params.seed.unwrap_or_else(rand::random));
        }
        let json = o.json.clone();
        let (spec, text) = state.prepare(choice.clone(), prompt, o).await?;
        texts.push(text);
        let specs = state.candidates(spec, n, json.as_ref())?;
        for spec in specs {
            subs.push(state.submit(spec, permit.take())?);
        }
    }
    Ok((subs, texts))
}

fn usage(results: &[Collected]) -> Usage {
    // Prompt tokens count once per prompt, as OpenAI reports them with n > 1.
    let prompt_tokens = results
        .first()
        .map(|c| c.finished.prompt_tokens)
        .unwrap_or(0);
    let completion_tokens = results.iter().map(|c| c.finished.generated_tokens).sum();
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

fn model_name(state: &AppState, s: &OpenAiSampling) -> String {
    match s.model.as_deref() {
        None | Some("") => state.config.model_id.clone(),
        Some(m) => m.to_string(),
    }
}

fn token_text(state: &AppState, id: u32) -> String {
    state
        .model
        .tokenizer
        .decode(&[id], false)
        .unwrap_or_default()
}

fn chat_logprobs(state: &AppState, tokens: &[StepToken]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| TokenLogprob {
                token: t.piece.clone(),
                logprob: t.sampled.logprob,
                bytes: t.piece.as_bytes().to_vec(),
                top_logprobs: t
                    .alternatives
                    .iter()
                    .map(|a| {
                        let text = token_text(state, a.id);
                        TopLogprob {
                            bytes: text.as_bytes().to_vec(),
                            token: text,
                            logprob: a.logprob,
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn completion_logprobs(
    state: &AppState,
    tokens: &[StepToken],
    offset: usize,
) -> CompletionLogprobs {
    let mut text_offset = Vec::with_capacity(tokens.len());
    let mut at = offset;
    for t in tokens {
        text_offset.push(at);
        at += t.piece.len();
    }
    CompletionLogprobs {
        tokens: tokens.iter().map(|t| t.piece.clone()).collect(),
        token_logprobs: tokens.iter().map(|t| t.sampled.logprob).collect(),
        top_logprobs: tokens
            .iter()
            .map(|t| {
                t.alternatives
                    .iter()
                    .map(|a| (token_text(state, a.id), a.logprob))
                    .collect()
            })
            .collect(),
        text_offset,
    }
}

pub async fn completions(
    state: AppStateRef,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Response {
    match completions_inner(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(
    State(state): AppStateRef,
    req: CompletionRequest,
) -> Result<Response, ApiError> {
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::validation(
            "`best_of` is not supported on /v1/completions; use `n`, or best_of on /generate",
        ));
    }
    let echo = req.echo.unwrap_or(false);
    let top_n = req.logprobs.unwrap_or(0);
    let want_logprobs = req.logprobs.is_some();
    let opts = options(&req.sampling, top_n, false)?;
    let prompts: Vec<Prompt> = req
        .prompt
        .into_vec()
        .into_iter()
        .map(Prompt::Text)
        .collect();
    let n_prompts = prompts.len();
    let (subs, texts) = submit_all(&state, &req.sampling, prompts, opts).await?;
    let per_prompt = subs.len() / n_prompts;
    let id = format!("cmpl-{}", subs[0].id);
    let usage_id = id.clone();
    let model = model_name(&state, &req.sampling);
    let created = now_secs();
    if req.sampling.is_stream() {
        let include_usage = req.sampling.include_usage();
        let state2 = state.clone();
        let chunk = move |index: usize,
                          text: String,
                          tokens: Option<&StepToken>,
                          finish: Option<&'static str>| {
            Completion {
                id: id.clone(),
                object: "text_completion",
                created,
                model: model.clone(),
                system_fingerprint: fingerprint(),
                choices: vec![CompletionChoice {
                    index,
                    logprobs: match (want_logprobs, tokens) {
                        (true, Some(t)) => {
                            Some(completion_logprobs(&state2, std::slice::from_ref(t), 0))
                        }
                        _ => None,
                    },
                    text,
                    finish_reason: finish,
                }],
                usage: None,
            }
        };
        let prefixes: Vec<Option<String>> = (0..subs.len())
            .map(|i| echo.then(|| texts[i / per_prompt].clone()))
            .collect();
        return Ok(openai_sse(subs, move |index, ev| {
            let mut out = Vec::new();
            match ev {
                Merged::Started => {
                    if let Some(p) = &prefixes[index] {
                        out.push(sse_json(&chunk(index, p.clone(), None, None)));
                    }
                }
                Merged::Event(Event::Token(t)) => {
                    out.push(sse_json(&chunk(index, t.piece.clone(), Some(&t), None)));
                }
                Merged::Event(Event::Finished(f)) => {
                    out.push(sse_json(&chunk(
                        index,
                        String::new(),
                        None,
                        Some(finish_reason(f.reason)),
                    )));
                }
                Merged::Event(Event::Prefill(_)) => {}
                Merged::Usage(u) => {
                    if include_usage {
                        out.push(sse_json(&serde_json::json!({
                            "id": usage_id, "object": "text_completion", "created": created,
                            "choices": [], "usage": u
                        })));
                    }
                }
                Merged::Event(Event::Failed(_)) | Merged::Done => {}
            }
            out
        }));
    }
    let results = collect_all(subs).await?;
    let choices = results
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let prefix = if echo {
                texts[i / per_prompt].clone()
            } else {
                String::new()
            };
            CompletionChoice {
                index: i,
                logprobs: want_logprobs
                    .then(|| completion_logprobs(&state, &c.tokens, prefix.len())),
                text: format!("{prefix}{}", c.finished.text),
                finish_reason: Some(finish_reason(c.finished.reason)),
            }
        })
        .collect();
    let mut u = usage(&results);
    u.prompt_tokens *= n_prompts;
    u.total_tokens = u.prompt_tokens + u.completion_tokens;
    Ok(Json(Completion {
        id,
        object: "text_completion",
        created,
        model,
        system_fingerprint: fingerprint(),
        choices,
        usage: Some(u),
    })
    .into_response())
}

fn fingerprint() -> String {
    format!("lorq-{}", env!("CARGO_PKG_VERSION"))
}

fn chat_prompt(messages: Vec<ChatMessageIn>) -> Result<Prompt, ApiError> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t,
            Some(MessageContent::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::validation(format!(
                            "messages[{i}].content: part type {:?} is not supported (text only)",
                            p.kind
                        )));
                    }
                    s.push_str(p.text.as_deref().unwrap_or(""));
                }
                s
            }
        };
        out.push(ChatMessage {
            role: m.role,
            content,
        });
    }
    Ok(Prompt::Chat(out))
}

pub async fn chat_completions(
    state: AppStateRef,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Response {
    match chat_inner(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(State(state): AppStateRef, req: ChatRequest) -> Result<Response, ApiError> {
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::validation(
            "`tools` (function calling) is not supported",
        ));
    }
    let want_logprobs = req.logprobs.unwrap_or(false);
    let top_n = if want_logprobs {
        req.top_logprobs.unwrap_or(0)
    } else {
        0
    };
    let opts = options(&req.sampling, top_n, true)?;
    let prompt = chat_prompt(req.messages)?;
    let (subs, _) = submit_all(&state, &req.sampling, vec![prompt], opts).await?;
    let id = format!("chatcmpl-{}", subs[0].id);
    let model = model_name(&state, &req.sampling);
    let created = now_secs();
    if req.sampling.is_stream() {
        let include_usage = req.sampling.include_usage();
        let state2 = state.clone();
        let chunk = move |index: usize,
                          delta: ChatDelta,
                          t: Option<&StepToken>,
                          finish: Option<&'static str>,
                          usage: Option<Usage>| ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model.clone(),
            system_fingerprint: fingerprint(),
            choices: if usage.is_some() {
                vec![]
            } else {
                vec![ChatChunkChoice {
                    index,
                    delta,
                    logprobs: match (want_logprobs, t) {
                        (true, Some(t)) => Some(chat_logprobs(&state2, std::slice::from_ref(t))),
                        _ => None,
                    },
                    finish_reason: finish,
                }]
            },
            usage,
        };
        return Ok(openai_sse(subs, move |index, ev| {
            let mut out = Vec::new();
            match ev {
                Merged::Started => out.push(sse_json(&chunk(
                    index,
                    ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    },
                    None,
                    None,
                    None,
                ))),
                Merged::Event(Event::Token(t)) => {
                    if !t.piece.is_empty() || want_logprobs {
                        out.push(sse_json(&chunk(
                            index,
                            ChatDelta {
                                role: None,
                                content: Some(t.piece.clone()),
                            },
                            Some(&t),
                            None,
                            None,
                        )))
                    }
                }
                Merged::Event(Event::Finished(f)) => out.push(sse_json(&chunk(
                    index,
                    ChatDelta::default(),
                    None,
                    Some(finish_reason(f.reason)),
                    None,
                ))),
                Merged::Event(Event::Prefill(_)) => {}
                Merged::Usage(u) => {
                    if include_usage {
                        out.push(sse_json(&chunk(
                            0,
                            ChatDelta::default(),
                            None,
                            None,
                            Some(u),
                        )));
                    }
                }
                Merged::Event(Event::Failed(_)) | Merged::Done => {}
            }
            out
        }));
    }
    let results = collect_all(subs).await?;
    let choices = results
        .iter()
        .enumerate()
        .map(|(i, c)| ChatChoice {
            index: i,
            message: ChatMessageOut {
                role: "assistant",
                content: c.finished.text.clone(),
            },
            logprobs: want_logprobs.then(|| chat_logprobs(&state, &c.tokens)),
            finish_reason: finish_reason(c.finished.reason),
        })
        .collect();
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model,
        system_fingerprint: fingerprint(),
        choices,
        usage: usage(&results),
    })
    .into_response())
}

/// An OpenAI SSE stream: `f` turns each event into chunks; a failure becomes an error chunk
/// (which the OpenAI client raises), and `data: [DONE]` ends the stream.
fn openai_sse(
    subs: Vec<Submitted>,
    mut f: impl FnMut(usize, Merged) -> Vec<SseEvent> + Send + 'static,
) -> Response {
    let events = merged_events(subs).flat_map(move |(index, ev)| {
        let out = match &ev {
            Merged::Event(Event::Failed(e)) => vec![SseEvent::default().data(e.body())],
            Merged::Done => vec![SseEvent::default().data("[DONE]")],
            _ => f(index, ev),
        };
        stream::iter(out.into_iter().map(Ok::<_, Infallible>))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Events of several candidates interleaved, tagged with their choice index.
enum Merged {
    Started,
    Event(Event),
    Usage(Usage),
    Done,
}

fn merged_events(subs: Vec<Submitted>) -> impl Stream<Item = (usize, Merged)> {
    let n = subs.len();
    let starts = stream::iter((0..n).map(|i| (i, Merged::Started)));
    let prompt_tokens = subs.first().map(|s| s.prompt_tokens).unwrap_or(0);
    let per_choice = stream::select_all(subs.into_iter().enumerate().map(|(i, sub)| {
        stream::unfold((sub, false), move |(mut sub, ended)| async move {
            if ended {
                return None;
            }
            let ev = sub.events.recv().await;
            match ev {
                Some(e @ (Event::Finished(_) | Event::Failed(_))) => {
                    Some(((i, Merged::Event(e)), (sub, true)))
                }
                Some(e) => Some(((i, Merged::Event(e)), (sub, false))),
                None => {
                    let e = ApiError::new(
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        crate::error::ErrorType::IncompleteGeneration,
                        "the generation engine stopped before the request finished",
                    );
                    Some(((i, Merged::Event(Event::Failed(e))), (sub, true)))
                }
            }
        })
        .boxed()
    }));
    // Count completion tokens as they pass, for the usage chunk at the end.
    let generated = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = generated.clone();
    let body = per_choice.inspect(move |(_, m)| {
        if let Merged::Event(Event::Token(_)) = m {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let tail = stream::once(async move {
        let g = generated.load(std::sync::atomic::Ordering::SeqCst);
        (
            0,
            Merged::Usage(Usage {
                prompt_tokens,
                completion_tokens: g,
                total_tokens: prompt_tokens + g,
            }),
        )
    })
    .chain(stream::once(async { (0, Merged::Done) }));
    starts.chain(body).chain(tail)
}

pub async fn models(State(state): AppStateRef) -> Json<ModelList> {
    let created = now_secs();
    let mut data = vec![ModelCard {
        id: state.config.model_id.clone(),
        object: "model",
        created,
        owned_by: "lorq",
        parent: None,
    }];
    for a in state.store.list() {
        if a.id.starts_with("merged:") {
            continue;
        }
        data.push(ModelCard {
            id: a.id,
            object: "model",
            created,
            owned_by: "lorq",
            parent: Some(state.config.model_id.clone()),
        });
    }
    Json(ModelList {
        object: "list",
        data,
    })
}
