//! What every route shares: the model, the adapter cache, the engine's queue and the limits.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use lorq_model::generation::TokenConstraint;
use lorq_model::json_constraint::{JsonConstraint, JsonSchema, TokenPieces};
use lorq_model::LoadedModel;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::adapters::AdapterStore;
use crate::config::ServeConfig;
use crate::engine::{label_of, Event, Job, JobSpec};
use crate::error::ApiError;
use crate::metrics::Metrics;

pub struct AppState {
    pub config: ServeConfig,
    pub model: Arc<LoadedModel>,
    pub store: AdapterStore,
    pub metrics: Arc<Metrics>,
    /// Taken (closed) at shutdown so the engine ends once in-flight work is done.
    jobs: Mutex<Option<Sender<Job>>>,
    in_flight: Arc<AtomicUsize>,
    next_id: AtomicU64,
    pub shutting_down: AtomicBool,
    pieces: OnceLock<Arc<TokenPieces>>,
    pub started: Instant,
}

/// Holds `n` of the `--max-concurrent-requests` slots until dropped.
pub struct Permit(Arc<AtomicUsize>, usize);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::SeqCst);
    }
}

/// A submitted request: its events, and the slot it holds.
pub struct Submitted {
    pub id: u64,
    pub events: UnboundedReceiver<Event>,
    pub prompt_tokens: usize,
    _permit: Option<Permit>,
}

impl AppState {
    pub fn new(
        config: ServeConfig,
        model: Arc<LoadedModel>,
        metrics: Arc<Metrics>,
        jobs: Sender<Job>,
    ) -> Self {
        let store = AdapterStore::new(
            config.adapter_dirs.clone(),
            model.clone(),
            config.adapter_device_bytes,
            config.adapter_host_bytes,
            metrics.clone(),
        );
        Self {
            config,
            model,
            store,
            metrics,
            jobs: Mutex::new(Some(jobs)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            pieces: OnceLock::new(),
            started: Instant::now(),
        }
    }

    /// Takes a concurrency slot, or answers 429 `overloaded` past `--max-concurrent-requests`.
    pub fn permit(&self, n: usize) -> Result<Permit, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            self.metrics
                .rejected
                .with_label_values(&["shutting_down"])
                .inc();
            return Err(ApiError::unavailable(
                "the server is shutting down and accepts no new requests",
            ));
        }
        let max = self.config.max_concurrent_requests;
        let prev = self.in_flight.fetch_add(n, Ordering::SeqCst);
        if prev + n > max {
            self.in_flight.fetch_sub(n, Ordering::SeqCst);
            self.metrics
                .rejected
                .with_label_values(&["overloaded"])
                .inc();
            return Err(ApiError::overloaded(format!(
                "Model is overloaded: {prev} requests in flight, --max-concurrent-requests is {max}"
            )));
        }
        Ok(Permit(self.in_flight.clone(), n))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Queues `spec` for the engine; the request's permit rides with one of its candidates.
    pub fn submit(&self, spec: JobSpec, permit: Option<Permit>) -> Result<Submitted, ApiError> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = unbounded_channel();
        let prompt_tokens = spec.prompt_ids.len();
        self.metrics
            .requests
            .with_label_values(&[&label_of(&spec.adapter_key)])
            .inc();
        let job = Job {
            id,
            spec,
            events: tx,
            arrived: Instant::now(),
        };
        let guard = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(jobs) if jobs.send(job).is_ok() => Ok(Submitted {
                id,
                events: rx,
                prompt_tokens,
                _permit: permit,
            }),
            _ => Err(ApiError::unavailable(
                "the server is shutting down and accepts no new requests",
            )),
        }
    }

    /// Stops accepting work; the engine finishes what it has, then ends.
    pub fn close(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// A fresh constraint for JSON matching `schema` (`None`: any JSON object).
    pub fn json_constraint(
        &self,
        schema: Option<&serde_json::Value>,
    ) -> Result<Box<dyn TokenConstraint>, ApiError> {
        let compiled = JsonSchema::compile(schema)
            .map_err(|e| ApiError::validation(format!("response_format schema: {e}")))?;
        let pieces = match self.pieces.get() {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(
                    TokenPieces::new(&self.model.tokenizer)
                        .map_err(|e| ApiError::generation(e.to_string()))?,
                );
                self.pieces.get_or_init(|| p).clone()
            }
        };
        Ok(Box::new(JsonConstraint::new(Arc::new(compiled), pieces)))
    }
}
