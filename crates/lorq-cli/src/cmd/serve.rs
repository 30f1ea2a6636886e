use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use lorq_serve::{ServeConfig, Server};

use crate::cmd::plan::parse_size_arg;
use crate::common::BaseModelArgs;

/// Serve one base model with many LoRA adapters over HTTP: LoRAX/TGI routes (`POST /`,
/// `/generate`, `/generate_stream`), OpenAI routes (`/v1/completions`, `/v1/chat/completions`,
/// `/v1/models`; `model` = adapter id), `/health`, `/info`, `/metrics`, `/tokenize` and
/// `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, `/v1/lora_adapters`.
/// Every flag can also be set by the environment variable shown.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq serve --model default --adapter-dir ./adapters --port 8080
  curl -s localhost:8080/generate -H 'Content-Type: application/json' \\
       -d '{\"inputs\": \"Hello\", \"parameters\": {\"adapter_id\": \"my-org/my-adapter\", \"max_new_tokens\": 20}}'
  lorq serve --model ./llama --quantize bitsandbytes-nf4 --adapter-dir ./adapters --preload org/a --api-key secret")]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: BaseModelArgs,
    /// A folder whose sub-folders are adapters; an adapter id is a path under it (`org/name`).
    /// Repeat for several roots (searched in order).
    #[arg(long = "adapter-dir", env = "LORQ_ADAPTER_DIR", value_delimiter = ',')]
    pub adapter_dirs: Vec<PathBuf>,
    /// Adapter ids to load at start (the server refuses to start if one fails).
    #[arg(long, env = "LORQ_PRELOAD", value_delimiter = ',')]
    pub preload: Vec<String>,
    /// Most adapters admitting new requests at once (LoRAX fairness); others wait their turn.
    #[arg(long, default_value_t = 128, env = "LORQ_MAX_ACTIVE_ADAPTERS")]
    pub max_active_adapters: usize,
    /// How long an active adapter keeps its slot while other adapters wait, in seconds.
    #[arg(long, default_value_t = 2.0, env = "LORQ_ADAPTER_CYCLE_TIME_S")]
    pub adapter_cycle_time_s: f64,
    /// Fraction of the device's memory the device tier of the adapter cache may use.
    #[arg(long, default_value_t = 0.1, env = "LORQ_ADAPTER_MEMORY_FRACTION")]
    pub adapter_memory_fraction: f64,
    /// Bytes for the device tier as a size (e.g. 512MiB); overrides --adapter-memory-fraction.
    #[arg(long, env = "LORQ_ADAPTER_DEVICE_MEMORY")]
    pub adapter_device_memory: Option<String>,
    /// Host RAM for adapters moved out of the device tier (e.g. 4GiB) before they are dropped.
    #[arg(long, default_value = "4GiB", env = "LORQ_ADAPTER_HOST_MEMORY")]
    pub adapter_host_memory: String,
    /// Tokens (prompt + max_new_tokens) all running requests together may hold.
    #[arg(long, default_value_t = 16384, env = "LORQ_MAX_BATCH_TOTAL_TOKENS")]
    pub max_batch_total_tokens: usize,
    /// Prompt tokens one step may prefill.
    #[arg(long, default_value_t = 4096, env = "LORQ_MAX_BATCH_PREFILL_TOKENS")]
    pub max_batch_prefill_tokens: usize,
    /// Longest prompt in tokens (longer ones are refused unless the request sets `truncate`).
    #[arg(long, default_value_t = 1024, env = "LORQ_MAX_INPUT_LENGTH")]
    pub max_input_length: usize,
    /// Most tokens (prompt + generated) one request may reach.
    #[arg(long, default_value_t = 2048, env = "LORQ_MAX_TOTAL_TOKENS")]
    pub max_total_tokens: usize,
    /// Requests in flight (queued or running) before new ones get 429 `overloaded`.
    #[arg(long, default_value_t = 128, env = "LORQ_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: usize,
    #[arg(long, default_value_t = 4, env = "LORQ_MAX_STOP_SEQUENCES")]
    pub max_stop_sequences: usize,
    #[arg(long, default_value_t = 4, env = "LORQ_MAX_BEST_OF")]
    pub max_best_of: usize,
    /// Most alternatives per token (`return_k_alternatives`, `top_n_tokens`, `top_logprobs`).
    #[arg(long, default_value_t = 10, env = "LORQ_MAX_TOP_N_TOKENS")]
    pub max_top_n_tokens: usize,
    /// Largest request body in bytes (larger ones get 413).
    #[arg(long, default_value_t = 2 * 1024 * 1024, env = "LORQ_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,
    #[arg(long, default_value = "127.0.0.1", env = "LORQ_HOSTNAME")]
    pub hostname: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080, env = "LORQ_PORT")]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on every route but /health.
    #[arg(long, env = "LORQ_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds in-flight requests get to finish after SIGTERM before the server stops.
    #[arg(long, default_value_t = 30.0, env = "LORQ_SHUTDOWN_TIMEOUT_S")]
    pub shutdown_timeout_s: f64,
    /// The name the base model goes by in /v1/models (default: its folder name).
    #[arg(long, env = "LORQ_MODEL_ID")]
    pub model_id: Option<String>,
}

/// Total memory of this machine in bytes (Linux `/proc/meminfo`), the device of the CPU backend.
fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn run(a: ServeArgs) -> Result<()> {
    if !(a.adapter_memory_fraction > 0.0 && a.adapter_memory_fraction <= 1.0) {
        anyhow::bail!(
            "--adapter-memory-fraction must be in (0, 1], got {}",
            a.adapter_memory_fraction
        );
    }
    if !(a.adapter_cycle_time_s >= 0.0 && a.adapter_cycle_time_s.is_finite()) {
        anyhow::bail!("--adapter-cycle-time-s must be >= 0");
    }
    for d in &a.adapter_dirs {
        if !d.is_dir() {
            anyhow::bail!("--adapter-dir {} is not a folder", d.display());
        }
    }
    let host_bytes = parse_size_arg("--adapter-host-memory", &a.adapter_host_memory)?;
    let adapter_device_bytes = match &a.adapter_device_memory {
        Some(s) => parse_size_arg("--adapter-device-memory", s)? as usize,
        // The CPU backend's device memory is the machine's RAM.
        None => {
            (host_memory_bytes().unwrap_or(8 << 30) as f64 * a.adapter_memory_fraction) as usize
        }
    };
    let model = a.model.load()?;
    let model_id = a.model_id.clone().unwrap_or_else(|| {
        model
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "base".into())
    });
    let config = ServeConfig {
        hostname: a.hostname.clone(),
        port: a.port,
        model_id,
        model_dtype: format!("{:?}", a.model.compute_dtype()).to_lowercase(),
        quantize: (a.model.quantize != "auto" && a.model.quantize != "none")
            .then(|| a.model.quantize.clone()),
        adapter_dirs: a.adapter_dirs.clone(),
        preload: a.preload.clone(),
        max_active_adapters: a.max_active_adapters,
        adapter_cycle: Duration::from_secs_f64(a.adapter_cycle_time_s),
        adapter_device_bytes,
        adapter_host_bytes: host_bytes as usize,
        max_batch_total_tokens: a.max_batch_total_tokens,
        max_batch_prefill_tokens: a.max_batch_prefill_tokens,
        max_input_length: a.max_input_length,
        max_total_tokens: a.max_total_tokens,
        max_concurrent_requests: a.max_concurrent_requests,
        max_stop_sequences: a.max_stop_sequences,
        max_best_of: a.max_best_of,
        max_top_n_tokens: a.max_top_n_tokens,
        max_body_bytes: a.max_body_bytes,
        api_key: a.api_key.clone(),
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout_s.max(0.0)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = Server::start(config, model).await?;
        let listener = lorq_serve::bind(&server.state.config).await?;
        let addr = listener.local_addr()?;
        // Scripts and tests read this line to find the port.
        eprintln!("lorq serve: listening on http://{addr}");
        server.run(listener, lorq_serve::shutdown_signal()).await?;
        eprintln!("lorq serve: stopped");
        Ok::<_, anyhow::Error>(())
    })
}
