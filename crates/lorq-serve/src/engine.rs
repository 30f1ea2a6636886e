//! The generation loop: one thread owns the model and runs continuous batching. Each step
//! takes in new requests, drops those whose client left, admits waiting ones (see
//! [`crate::scheduler`]), runs one batched forward over every running sequence (prefills and
//! decodes mixed, each with its own adapter), and sends each sequence's token to its client.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lorq_lora::LoraAdapter;
use lorq_model::generation::{
    accept_step, prompt_logprobs, FinishReason, GenerationRequest, Sequence, StepToken,
    TokenConstraint,
};
use lorq_model::llama::LogitsWanted;
use lorq_model::sampling::SamplingParams;
use lorq_model::{LoadedModel, StepLogits};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::scheduler::{Budgets, Queued, Scheduler};

/// A validated request, ready for the engine.
pub struct JobSpec {
    pub prompt_ids: Vec<u32>,
    /// Metrics label and fairness key: `None` for the base model.
    pub adapter_key: Option<String>,
    pub adapter: Option<Arc<LoraAdapter>>,
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Alternatives to report per generated token.
    pub top_n: usize,
    /// Report the prompt tokens' log-probabilities.
    pub prefill_details: bool,
    pub constraint: Option<Box<dyn TokenConstraint>>,
}

impl JobSpec {
    /// Another candidate of the same request (best_of, n) with its own seed and constraint.
    pub fn fork(&self, seed: Option<u64>, constraint: Option<Box<dyn TokenConstraint>>) -> Self {
        let mut params = self.params.clone();
        params.seed = seed;
        Self {
            prompt_ids: self.prompt_ids.clone(),
            adapter_key: self.adapter_key.clone(),
            adapter: self.adapter.clone(),
            params,
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            top_n: self.top_n,
            prefill_details: self.prefill_details,
            constraint,
        }
    }
}

/// What the engine tells a request's handler, in order: maybe `Prefill`, then `Token`s, then
/// `Finished` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Prefill(Vec<(u32, Option<f32>)>),
    Token(StepToken),
    Finished(Finished),
    Failed(ApiError),
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub seed: Option<u64>,
    pub text: String,
}

pub struct Job {
    pub id: u64,
    pub spec: JobSpec,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

impl Queued for Job {
    fn adapter_key(&self) -> Option<&str> {
        self.spec.adapter_key.as_deref()
    }
    fn prompt_tokens(&self) -> usize {
        self.spec.prompt_ids.len()
    }
    fn max_tokens(&self) -> usize {
        self.spec.prompt_ids.len() + self.spec.max_new_tokens
    }
    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }
}

struct Running {
    id: u64,
    label: String,
    key: Option<String>,
    events: UnboundedSender<Event>,
    arrived: Instant,
    first_token: Option<Instant>,
    max_tokens: usize,
    top_n: usize,
    prefill_details: bool,
    report_seed: bool,
    seq: Sequence,
    done: bool,
}

/// Tokens per second over a sliding window, overall and per adapter.
struct Throughput {
    window: Duration,
    events: VecDeque<(Instant, String, usize)>,
}

impl Throughput {
    fn record(&mut self, now: Instant, counts: HashMap<String, usize>, metrics: &Metrics) {
        for (label, n) in counts {
            self.events.push_back((now, label, n));
        }
        while self
            .events
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > self.window)
        {
            self.events.pop_front();
        }
        let secs = self.window.as_secs_f64();
        let mut per: HashMap<&str, usize> = HashMap::new();
        for (_, l, n) in &self.events {
            *per.entry(l).or_default() += n;
        }
        metrics
            .tokens_per_second
            .set(per.values().sum::<usize>() as f64 / secs);
        for (l, n) in per {
            metrics
                .adapter_tokens_per_second
                .with_label_values(&[l])
                .set(n as f64 / secs);
        }
    }
}

pub fn label_of(key: &Option<String>) -> String {
    match key {
        None => "base".into(),
        Some(k) if k.starts_with("merged:") => "merged".into(),
        Some(k) => k.clone(),
    }
}

pub struct Engine {
    model: Arc<LoadedModel>,
    metrics: Arc<Metrics>,
    scheduler: Scheduler<Job>,
    running: Vec<Running>,
    throughput: Throughput,
}

impl Engine {
    pub fn new(model: Arc<LoadedModel>, budgets: Budgets, metrics: Arc<Metrics>) -> Self {
        Self {
            model,
            metrics,
            scheduler: Scheduler::new(budgets),
            running: Vec::new(),
            throughput: Throughput {
                window: Duration::from_secs(5),
                events: VecDeque::new(),
            },
        }
    }

    /// Runs until every sender of `jobs` is gone and nothing is left to finish.
    pub fn run(mut self, jobs: Receiver<Job>) {
        loop {
            if self.running.is_empty() && self.scheduler.is_empty() {
                match jobs.recv() {
                    Ok(j) => self.scheduler.push(j),
                    Err(_) => return,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(j) => self.scheduler.push(j),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.drop_cancelled();
            self.admit();
            self.metrics.queue_size.set(self.scheduler.waiting() as i64);
            self.metrics.running.set(self.running.len() as i64);
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    fn drop_cancelled(&mut self) {
        for j in self.scheduler.take_cancelled() {
            self.metrics.cancelled.inc();
            tracing::info!(
                request = j.id,
                adapter = label_of(&j.spec.adapter_key),
                "cancelled while queued (client gone)"
            );
        }
        let metrics = &self.metrics;
        self.running.retain(|r| {
            let gone = r.events.is_closed();
            if gone {
                metrics.cancelled.inc();
                tracing::info!(
                    request = r.id,
                    adapter = r.label,
                    generated = r.seq.generated.len(),
                    "cancelled (client gone); slot freed"
                );
            }
            !gone
        });
    }

    fn admit(&mut self) {
        let running_tokens = self.running.iter().map(|r| r.max_tokens).sum();
        let keys: Vec<Option<String>> = self.running.iter().map(|r| r.key.clone()).collect();
        for job in self.scheduler.admit(Instant::now(), running_tokens, &keys) {
            let label = label_of(&job.spec.adapter_key);
            let max_tokens = job.max_tokens();
            let spec = job.spec;
            let request = GenerationRequest {
                prompt_ids: spec.prompt_ids,
                params: spec.params.clone(),
                max_new_tokens: spec.max_new_tokens,
                stop: spec.stop,
                ignore_eos: spec.ignore_eos,
                adapter: spec.adapter,
            };
            match Sequence::new(&self.model.model, request) {
                Ok(mut seq) => {
                    if let Some(c) = spec.constraint {
                        seq.set_constraint(c);
                    }
                    self.metrics
                        .queue_duration
                        .with_label_values(&[&label])
                        .observe(job.arrived.elapsed().as_secs_f64());
                    self.running.push(Running {
                        id: job.id,
                        label,
                        key: spec.adapter_key,
                        events: job.events,
                        arrived: job.arrived,
                        first_token: None,
                        max_tokens,
                        top_n: spec.top_n,
                        prefill_details: spec.prefill_details,
                        report_seed: !spec.params.is_greedy(),
                        seq,
                        done: false,
                    });
                }
                Err(e) => {
                    let err = ApiError::validation(e.to_string());
                    fail_metrics(&self.metrics, &label, &err);
                    let _ = job.events.send(Event::Failed(err));
                }
            }
        }
    }

    fn step(&mut self) {
        let prefill = self.running.iter().any(|r| r.seq.cache.is_empty());
        let started = Instant::now();
        let wants: Vec<LogitsWanted> = self
            .running
            .iter()
            .map(|r| {
                if r.seq.cache.is_empty() && r.prefill_details {
                    LogitsWanted::All
                } else {
                    LogitsWanted::Last
                }
            })
            .collect();
        let result = {
            let mut items: Vec<_> = self
                .running
                .iter_mut()
                .zip(&wants)
                .map(|(r, &w)| r.seq.batch_item(w))
                .collect();
            self.model.model.forward_step(&mut items)
        };
        let batch = self.running.len();
        self.metrics.batch_size.observe(batch as f64);
        self.metrics.batch_current_size.set(batch as i64);
        self.metrics
            .forward_duration
            .with_label_values(&[if prefill { "prefill" } else { "decode" }])
            .observe(started.elapsed().as_secs_f64());
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // A failed step fails the sequences in it, not the server.
                tracing::error!("forward step over {batch} sequences failed: {e}");
                self.fail_running(&ApiError::generation(format!(
                    "the forward step failed: {e}"
                )));
                return;
            }
        };
        let now = Instant::now();
        let mut produced: HashMap<String, usize> = HashMap::new();
        let steps = match self.accept_all(&logits) {
            Ok(steps) => steps,
            Err(err) => {
                tracing::error!(
                    "picking the tokens of a step over {batch} sequences failed: {err}"
                );
                self.fail_running(&err);
                return;
            }
        };
        for (r, step) in self.running.iter_mut().zip(steps) {
            match step {
                Ok(step) => {
                    *produced.entry(r.label.clone()).or_default() += 1;
                    if r.first_token.is_none() {
                        r.first_token = Some(now);
                        self.metrics
                            .time_to_first_token
                            .with_label_values(&[&r.label])
                            .observe(now.duration_since(r.arrived).as_secs_f64());
                    }
                    let _ = r.events.send(Event::Token(step));
                    if let Some(reason) = r.seq.finish {
                        finish(r, reason, now, &self.metrics);
                    }
                }
                Err(err) => {
                    r.done = true;
                    fail_metrics(&self.metrics, &r.label, &err);
                    let _ = r.events.send(Event::Failed(err));
                }
            }
        }
        for (label, n) in &produced {
            self.metrics
                .generated_tokens
                .with_label_values(&[label])
                .inc_by(*n as u64);
        }
        self.throughput.record(now, produced, &self.metrics);
        self.running.retain(|r| !r.done);
    }
}

fn fail_metrics(metrics: &Metrics, label: &str, err: &ApiError) {
    metrics
        .request_failure
        .with_label_values(&[label, err.kind()])
        .inc();
}

impl Engine {
    /// Fails every running sequence with `err` (a step that failed as a whole).
    fn fail_running(&mut self, err: &ApiError) {
        for r in self.running.drain(..) {
            fail_metrics(&self.metrics, &r.label, err);
            let _ = r.events.send(Event::Failed(err.clone()));
        }
    }

    /// Every running sequence's next token from the step's logits (see
    /// [`lorq_model::generation::accept_step`]), after sending the prompt's log-probabilities to
    /// those that asked. The outer error fails the step; an inner one its sequence.
    fn accept_all(
        &mut self,
        logits: &StepLogits,
    ) -> Result<Vec<Result<StepToken, ApiError>>, ApiError> {
        let gen_err = |e: lorq_model::ModelError| ApiError::generation(e.to_string());
        for (i, r) in self.running.iter().enumerate() {
            let rows = logits.rows(i).map_err(gen_err)?;
            if rows > 1 || (r.prefill_details && r.seq.generated.is_empty()) {
                let prompt = &r.seq.request.prompt_ids;
                let lp = if rows == prompt.len() {
                    prompt_logprobs(&logits.item(i).map_err(gen_err)?, prompt).map_err(gen_err)?
                } else {
                    vec![None; prompt.len()]
                };
                let _ = r
                    .events
                    .send(Event::Prefill(prompt.iter().copied().zip(lp).collect()));
            }
        }
        let top_n: Vec<usize> = self.running.iter().map(|r| r.top_n).collect();
        let mut seqs: Vec<&mut Sequence> = self.running.iter_mut().map(|r| &mut r.seq).collect();
        let steps = accept_step(
            &mut seqs,
            logits,
            &self.model.tokenizer,
            &self.model.eos_token_ids,
            &top_n,
        )
        .map_err(gen_err)?;
        Ok(steps.into_iter().map(|s| s.map_err(gen_err)).collect())
    }
}

fn finish(r: &mut Running, reason: FinishReason, now: Instant, metrics: &Metrics) {
    r.done = true;
    // Let go of the adapter before the client hears back, so the cache sees it unheld.
    r.seq.request.adapter = None;
    let generated = r.seq.generated.len();
    let total = now.duration_since(r.arrived);
    metrics.request_success.with_label_values(&[&r.label]).inc();
    metrics
        .request_duration
        .with_label_values(&[&r.label])
        .observe(total.as_secs_f64());
    metrics
        .prompt_tokens
        .with_label_values(&[&r.label])
        .inc_by(r.seq.request.prompt_ids.len() as u64);
    let first = r.first_token.unwrap_or(now);
    if generated > 1 {
        metrics
            .time_per_output_token
            .with_label_values(&[&r.label])
            .observe(now.duration_since(first).as_secs_f64() / (generated - 1) as f64);
    }
    tracing::info!(
        request = r.id,
        adapter = r.label,
        prompt_tokens = r.seq.request.prompt_ids.len(),
        generated_tokens = generated,
        finish = ?reason,
        ttft_ms = (first.duration_since(r.arrived).as_secs_f64() * 1e3) as u64,
        total_ms = (total.as_secs_f64() * 1e3) as u64,
        "request done"
    );
    let _ = r.events.send(Event::Finished(Finished {
        reason,
        prompt_tokens: r.seq.request.prompt_ids.len(),
        generated_tokens: generated,
        seed: r.report_seed.then(|| r.seq.seed()),
        text: r.seq.text.clone(),
    }));
}
