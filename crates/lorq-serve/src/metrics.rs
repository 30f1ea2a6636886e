//! Prometheus metrics, served as text on `GET /metrics`. Request metrics carry an `adapter`
//! label (`base` for the base model, the adapter id, or `merged` for `merged_adapters`).

use prometheus::{
    exponential_buckets, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_success: IntCounterVec,
    pub request_failure: IntCounterVec,
    pub rejected: IntCounterVec,
    pub cancelled: IntCounter,
    pub queue_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub time_per_output_token: HistogramVec,
    pub request_duration: HistogramVec,
    pub generated_tokens: IntCounterVec,
    pub prompt_tokens: IntCounterVec,
    pub queue_size: IntGauge,
    pub running: IntGauge,
    pub batch_size: Histogram,
    pub batch_current_size: IntGauge,
    pub forward_duration: HistogramVec,
    pub tokens_per_second: Gauge,
    pub adapter_tokens_per_second: GaugeVec,
    pub adapters: IntGaugeVec,
    pub adapter_bytes: IntGaugeVec,
    pub adapter_loads: IntCounterVec,
    pub adapter_evictions: IntCounterVec,
}

fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 18).expect("valid buckets")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let hist_vec = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique");
            h
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let int_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("lorq_batch_size", "Sequences per forward step")
                .buckets(exponential_buckets(1.0, 2.0, 10).expect("valid buckets")),
        )
        .expect("valid metric");
        registry
            .register(Box::new(batch_size.clone()))
            .expect("unique");
        let tokens_per_second = Gauge::new(
            "lorq_tokens_per_second",
            "Generated tokens per second over the last few seconds",
        )
        .expect("valid metric");
        registry
            .register(Box::new(tokens_per_second.clone()))
            .expect("unique");
        let adapter_tokens_per_second = GaugeVec::new(
            Opts::new(
                "lorq_adapter_tokens_per_second",
                "Generated tokens per second over the last few seconds, per adapter",
            ),
            &["adapter"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(adapter_tokens_per_second.clone()))
            .expect("unique");
        let cancelled = IntCounter::new(
            "lorq_request_cancelled",
            "Requests whose client went away before they finished",
        )
        .expect("valid metric");
        registry
            .register(Box::new(cancelled.clone()))
            .expect("unique");
        Self {
            requests: counter_vec("lorq_request_count", "Requests received", &["adapter"]),
            request_success: counter_vec(
                "lorq_request_success",
                "Requests that finished",
                &["adapter"],
            ),
            request_failure: counter_vec(
                "lorq_request_failure",
                "Requests that failed, by error type",
                &["adapter", "err"],
            ),
            rejected: counter_vec(
                "lorq_request_rejected",
                "Requests refused before queueing, by reason",
                &["reason"],
            ),
            cancelled,
            queue_duration: hist_vec(
                "lorq_request_queue_duration_seconds",
                "Time from arrival to the first forward step",
                &["adapter"],
                latency_buckets(),
            ),
            time_to_first_token: hist_vec(
                "lorq_request_time_to_first_token_seconds",
                "Time from arrival to the first generated token",
                &["adapter"],
                latency_buckets(),
            ),
            time_per_output_token: hist_vec(
                "lorq_request_time_per_output_token_seconds",
                "Mean time per generated token after the first",
                &["adapter"],
                latency_buckets(),
            ),
            request_duration: hist_vec(
                "lorq_request_duration_seconds",
                "Time from arrival to the last token",
                &["adapter"],
                latency_buckets(),
            ),
            generated_tokens: counter_vec(
                "lorq_generated_tokens_total",
                "Generated tokens",
                &["adapter"],
            ),
            prompt_tokens: counter_vec("lorq_prompt_tokens_total", "Prompt tokens", &["adapter"]),
            queue_size: int_gauge("lorq_queue_size", "Requests waiting to join the batch"),
            running: int_gauge("lorq_running_requests", "Sequences in the running batch"),
            batch_size,
            batch_current_size: int_gauge(
                "lorq_batch_current_size",
                "Sequences in the last forward step",
            ),
            forward_duration: hist_vec(
                "lorq_batch_forward_duration_seconds",
                "Duration of one forward step, by kind (prefill: has new prompts; decode)",
                &["kind"],
                latency_buckets(),
            ),
            tokens_per_second,
            adapter_tokens_per_second,
            adapters: int_gauge_vec(
                "lorq_adapters_loaded",
                "Adapters held in memory, by tier (device, host)",
                &["tier"],
            ),
            adapter_bytes: int_gauge_vec(
                "lorq_adapter_bytes",
                "Bytes of adapter weights held, by tier",
                &["tier"],
            ),
            adapter_loads: counter_vec(
                "lorq_adapter_loads",
                "Adapter loads from disk or merges, by outcome (ok, error)",
                &["outcome"],
            ),
            adapter_evictions: counter_vec(
                "lorq_adapter_evictions",
                "Adapters moved down a tier (device->host) or dropped (host->disk)",
                &["from"],
            ),
            registry,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buf).expect("the text encoder writes UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
