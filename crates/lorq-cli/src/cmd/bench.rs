use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use lorq_model::{BatchItem, LogitsWanted};
use serde_json::json;

use crate::common::ModelArgs;

#[path = "bench_adapters.rs"]
pub mod bench_adapters;
#[path = "bench_decode.rs"]
pub mod bench_decode;
#[path = "bench_fp8.rs"]
pub mod bench_fp8;
#[cfg(feature = "cuda")]
#[path = "bench_groups_cuda.rs"]
pub mod bench_groups_cuda;
#[path = "bench_kernels.rs"]
pub mod bench_kernels;
#[cfg(feature = "cuda")]
#[path = "bench_kernels_cuda.rs"]
pub mod bench_kernels_cuda;
#[path = "bench_peer.rs"]
pub mod bench_peer;
#[path = "bench_quantize.rs"]
pub mod bench_quantize;

/// Benchmarks (speed is measured here, never asserted in tests).
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Prefill and decode throughput on the CPU.
    Generate(BenchGenerateArgs),
    /// Linear-layer kernels on the CPU: dense f32/bf16, every JIT format fused, and
    /// dequantize-then-matmul, checked then timed.
    Kernels(bench_kernels::BenchKernelsArgs),
    /// Many LoRA adapters in one batch (one shrink + one expand launch per module on a GPU)
    /// against the base matmul, Llama-3-8B shapes.
    Adapters(bench_adapters::BenchAdaptersArgs),
    /// Just-in-time quantization of a whole model's linears per format on the GPU (seeded random
    /// weights of a model shape), one CPU layer beside it, codes checked against the CPU.
    Quantize(bench_quantize::BenchQuantizeArgs),
    /// W8A8 FP8 through cuBLASLt on the GPU against bf16 cuBLAS (checked, then timed).
    Fp8(bench_fp8::BenchFp8Args),
    /// Decode tokens/s of a random model shape (paged KV, fused ops on CUDA) vs the roofline.
    Decode(bench_decode::BenchDecodeArgs),
}

#[derive(Debug, Args)]
#[command(after_help = "Example:
  lorq bench generate --dtype f32 --batch-sizes 1,8 --prompt-tokens 128 --new-tokens 64 --json")]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch_sizes: Vec<usize>,
    /// Prompt length in tokens (taken from a fixed English text, repeated as needed).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed repetitions (the best is reported); one untimed warm-up runs first.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long)]
    pub json: bool,
}

const TEXT: &str = "The history of the city begins with a small settlement on the river. Over the \
centuries merchants, farmers and craftsmen arrived, built bridges and markets, and the town grew \
into a busy centre of trade. ";

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Generate(g) => generate(g),
        BenchWhat::Kernels(k) => bench_kernels::run(k),
        BenchWhat::Adapters(a) => bench_adapters::run(&a, &crate::common::parse_device(&a.device)?),
        BenchWhat::Quantize(q) => bench_quantize::run(q),
        BenchWhat::Fp8(f) => bench_fp8::run(f),
        BenchWhat::Decode(d) => bench_decode::run(d),
    }
}

fn generate(a: BenchGenerateArgs) -> Result<()> {
    let (m, adapter) = a.model.load()?;
    let mut ids = Vec::new();
    while ids.len() < a.prompt_tokens {
        ids.extend(m.tokenizer.encode(TEXT)?);
    }
    ids.truncate(a.prompt_tokens);
    let model = &m.model;
    // Prefill: one sequence of `prompt_tokens`.
    let mut prefill_best = f64::INFINITY;
    for rep in 0..=a.repeats {
        let mut cache = model.new_cache();
        let t = Instant::now();
        model.forward(&mut [BatchItem {
            tokens: &ids,
            cache: &mut cache,
            adapter: adapter.clone(),
            logits: LogitsWanted::Last,
        }])?;
        if rep > 0 {
            prefill_best = prefill_best.min(t.elapsed().as_secs_f64());
        }
    }
    let mut rows = vec![json!({
        "phase": "prefill", "batch": 1, "tokens": ids.len(),
        "seconds": prefill_best, "tokens_per_s": ids.len() as f64 / prefill_best,
    })];
    // Decode: `batch` sequences after the same prompt, `new_tokens` greedy steps each.
    for &batch in &a.batch_sizes {
        let mut best = f64::INFINITY;
        for rep in 0..=a.repeats {
            let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
            let mut items: Vec<BatchItem> = caches
                .iter_mut()
                .map(|c| BatchItem {
                    tokens: &ids,
                    cache: c,
                    adapter: adapter.clone(),
                    logits: LogitsWanted::Last,
                })
                .collect();
            let mut next = greedy_ids(&model.forward_step(&mut items)?)?;
            let t = Instant::now();
            for _ in 0..a.new_tokens {
                let tokens: Vec<[u32; 1]> = next.iter().map(|&n| [n]).collect();
                let mut items: Vec<BatchItem> = caches
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(c, t)| BatchItem {
                        tokens: t,
                        cache: c,
                        adapter: adapter.clone(),
                        logits: LogitsWanted::Last,
                    })
                    .collect();
                next = greedy_ids(&model.forward_step(&mut items)?)?;
            }
            if rep > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        let n = batch * a.new_tokens;
        rows.push(json!({
            "phase": "decode", "batch": batch, "tokens": n, "context": ids.len(),
            "seconds": best, "tokens_per_s": n as f64 / best,
            "ms_per_step": best * 1e3 / a.new_tokens as f64,
        }));
    }
    let report = json!({
        "engine": "lorq",
        // The folder name only: reports are committed, machine paths are not.
        "model": m.dir.file_name().map(|n| n.to_string_lossy().into_owned()),
        "dtype": format!("{:?}", model.dtype()).to_lowercase(),
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "rows": rows,
    });
    if a.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Every sequence's greedy next token (on the logits' device).
fn greedy_ids(logits: &lorq_model::StepLogits) -> Result<Vec<u32>> {
    Ok(logits.greedy_each()?.into_iter().map(|s| s.id).collect())
}
