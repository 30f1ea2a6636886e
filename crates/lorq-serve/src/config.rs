use std::path::PathBuf;
use std::time::Duration;

/// Everything `lorq serve` was started with that the server itself uses.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub hostname: String,
    pub port: u16,
    /// The name `/v1/models` and `/info` report for the base model.
    pub model_id: String,
    /// Compute dtype and quantization, as `/info` reports them.
    pub model_dtype: String,
    pub quantize: Option<String>,
    pub adapter_dirs: Vec<PathBuf>,
    pub preload: Vec<String>,
    pub max_active_adapters: usize,
    pub adapter_cycle: Duration,
    /// Bytes of adapter weights the device tier may hold.
    pub adapter_device_bytes: usize,
    /// Bytes of adapter weights the host-RAM tier may hold.
    pub adapter_host_bytes: usize,
    pub max_batch_total_tokens: usize,
    pub max_batch_prefill_tokens: usize,
    pub max_input_length: usize,
    pub max_total_tokens: usize,
    pub max_concurrent_requests: usize,
    pub max_stop_sequences: usize,
    pub max_best_of: usize,
    pub max_top_n_tokens: usize,
    pub max_body_bytes: usize,
    pub api_key: Option<String>,
    pub shutdown_timeout: Duration,
}

impl ServeConfig {
    /// Checks the limits against each other, as TGI's launcher does.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_input_length == 0 {
            return Err("--max-input-length must be > 0".into());
        }
        if self.max_input_length >= self.max_total_tokens {
            return Err(format!(
                "--max-input-length ({}) must be < --max-total-tokens ({})",
                self.max_input_length, self.max_total_tokens
            ));
        }
        if self.max_batch_prefill_tokens < self.max_input_length {
            return Err(format!(
                "--max-batch-prefill-tokens ({}) must be >= --max-input-length ({}), or the longest prompt could never be prefilled",
                self.max_batch_prefill_tokens, self.max_input_length
            ));
        }
        if self.max_batch_total_tokens < self.max_total_tokens {
            return Err(format!(
                "--max-batch-total-tokens ({}) must be >= --max-total-tokens ({})",
                self.max_batch_total_tokens, self.max_total_tokens
            ));
        }
        if self.max_concurrent_requests == 0 {
            return Err("--max-concurrent-requests must be > 0".into());
        }
        if self.max_active_adapters == 0 {
            return Err("--max-active-adapters must be > 0".into());
        }
        Ok(())
    }
}
