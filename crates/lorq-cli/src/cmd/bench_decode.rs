//! `lorq bench decode`: decode throughput of a model shape with seeded random weights (no files),
//! per weight format and batch size, after a prefill of `--context` tokens per sequence, in
//! tokens/s and in % of the memory roofline: the HBM bandwidth (measured in the same run with a
//! large device-to-device copy) over the bytes one decode step must read (every weight read
//! once, the KV cache of every sequence, the adapters in use). Greedy tokens (argmax on the
//! device) feed the next step, as a server's would. Rows with adapters also give the byte ceiling:
//! the share of the no-adapter speed a memory-bound step keeps once it reads the adapters too.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use lorq_lora::LoraAdapter;
use lorq_model::generation::top_logprobs;
use lorq_model::random_model::{random_adapters, shape_config};
use lorq_model::{
    pick_step, BatchItem, LayerLinear, LlamaModel, LogitsWanted, PickRequest, Sampler,
    SamplingParams, StepPick,
};
use lorq_quant::method::QuantMethod;
use rayon::prelude::*;
use serde_json::{json, Value};

use super::bench_kernels::{command_line, utc_date};
use super::greedy_ids;
use crate::common::{parse_device, ComputeDtype, SamplingFlags};

#[derive(Debug, Args)]
#[command(after_help = "Example:
  lorq bench decode --device cuda --shape llama-3-8b --dtype bf16 \\
      --quantize none,bitsandbytes-nf4 --batch-sizes 1,32 --context 512 --new-tokens 64 --json decode.json")]
pub struct BenchDecodeArgs {
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Model shape: llama-3-8b, smollm2-135m or tiny.
    #[arg(long, default_value = "llama-3-8b")]
    pub shape: String,
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: ComputeDtype,
    /// Weight formats (`none` = dense in --dtype), comma-separated; `gptq` and `awq` round the
    /// random weights to nearest in their 4-bit format, groups of 128 (nothing to calibrate).
    #[arg(long, value_delimiter = ',', default_value = "none")]
    pub quantize: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub batch_sizes: Vec<usize>,
    /// Prompt tokens per sequence (prefilled before timing).
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Timed decode steps.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Distinct random LoRA adapters, round-robin over the batch rows; comma-separated counts,
    /// 0 = no adapter.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub adapters: Vec<usize>,
    /// Rank of the random adapters.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// The linears the random adapters target, PEFT's `target_modules` (`q_proj,v_proj` is
    /// PEFT's default for Llama); default: all seven.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub adapter_modules: Vec<String>,
    /// Also time each case with candle's ops instead of the fused RMSNorm / SiLU·mul kernels.
    #[arg(long)]
    pub compare_fused: bool,
    /// Also time each case with one launch per projection instead of one for q/k/v and one for
    /// gate/up.
    #[arg(long)]
    pub compare_grouped: bool,
    /// Also time each case with adapters with the LoRA shrink queued on the main stream
    /// instead of on a side stream beside the base matmul (graph steps only).
    #[arg(long)]
    pub compare_lora_overlap: bool,
    /// Also time each case without the wgmma kernels (Hopper): 4-bit weights at 33-256 rows then
    /// take the tiled kernel or dequantize + cuBLAS, FP8 W8A8 at 17-64 rows lorq's mma kernel or
    /// cuBLASLt. `wgmma` in the rows.
    #[arg(long)]
    pub compare_wgmma: bool,
    /// Also time each case with the half2 GEMV kept to one activation row (two rows of affine
    /// 4-bit weights then take the tiled tensor-core kernel, the routing before session 30).
    /// `half2_two_rows` in the rows.
    #[arg(long)]
    pub compare_half2_rows: bool,
    /// Also time each case with the tiled kernel scaling every weight before the mma where it
    /// would fold the scales after it (affine 4-bit codes in groups of a multiple of 128, up to
    /// 16 rows: the kernels before session 31). `folded_scales` in the rows.
    #[arg(long)]
    pub compare_folded_scales: bool,
    /// Also time each case with gate/up-sized 4-bit weights at 3-16 rows in one grouped launch of
    /// the tiled kernel instead of one launch each (the routing before session 37).
    /// `tiled_wide_groups_apart` in the rows.
    #[arg(long)]
    pub compare_tiled_groups: bool,
    /// Also time each case with the 8-head attention blocks for GQA groups of up to 4 query
    /// heads instead of the 4-head ones (fewer registers, more blocks per SM); FMA kernels only
    /// (f32 caches, or the FMA rows of --compare-attention-mma; a combination of switches that
    /// would time the same kernels as another is timed once). `attention_4_head_blocks` in the rows.
    #[arg(long)]
    pub compare_attention_blocks: bool,
    /// Also time each case with the FMA attention kernels (one round of keys or values at a
    /// time in registers, dot products across lanes) instead of the tensor-core ones (16-bit
    /// caches). `attention_mma` in the rows.
    #[arg(long)]
    pub compare_attention_mma: bool,
    /// Also time each case's prefill with one attention block per prompt token instead of the
    /// query tiles that share a block's keys (16-bit caches, tensor-core kernels).
    /// `prefill_tiles` in the rows.
    #[arg(long)]
    pub compare_prefill_tiles: bool,
    /// Also time each case with the decode attention's keys per partition forced to each of
    /// these (multiples of 16 up to 256, e.g. 32, 64, 128, 192, 256) instead of the automatic
    /// choice. `attention_partition_keys` in the rows (null: automatic).
    #[arg(long, value_delimiter = ',', value_parser = partition_keys)]
    pub compare_attention_partitions: Vec<usize>,
    /// Also time each quantized format with its LM head quantized by the same method (after the
    /// cases with it in --dtype, as bitsandbytes, PEFT and LoRAX keep it; torchao's int4 and
    /// gpt-fast quantize it). `lm_head_quantized` in the rows.
    #[arg(long)]
    pub compare_quantized_lm_head: bool,
    /// Also time each case with the residual add + RMSNorm in its own launch instead of inside a
    /// one-row GEMV's (batch 1: the tail of the o / down projection on dense weights, the head of
    /// q/k/v and gate/up on affine 4-bit ones; `norm_tails` in the rows says whether allowed).
    #[arg(long)]
    pub compare_norm_tails: bool,
    /// Also time each case with every FP8 projection quantizing its input itself instead of
    /// taking the e4m3 codes the RMSNorm and SiLU·mul kernels write (`fp8_codes` in the rows).
    #[arg(long)]
    pub compare_fp8_codes: bool,
    /// Also time each case with programmatic dependent launches off (the FP8 wgmma kernel then
    /// waits for the kernel before it to end before it starts streaming its weight;
    /// `dependent_launches` in the rows).
    #[arg(long)]
    pub compare_dependent_launches: bool,
    /// Also time each case with the wgmma kernels' split tiles summed through L2 partial sums
    /// instead of in thread-block clusters: for FP8, session 34's schedule and routing (the
    /// kernel taken for long-K weights and 17-64 rows of wide ones, against whole tiles or a
    /// tile's splits in a cluster and every weight up to 64 rows); for 4-bit weights at 17-256
    /// rows, stream-K everywhere (against the k/v-sized products' splits in clusters).
    /// `cluster_sums` in the rows (`--compare-fp8-cluster-sums`, its earlier name, still works).
    #[arg(long, alias = "compare-fp8-cluster-sums")]
    pub compare_cluster_sums: bool,
    /// Also time each case with weights sharing an input (q/k/v, gate/up) on a wgmma kernel (FP8,
    /// 4-bit) as one launch each instead of one launch for the group, their tiles end to end
    /// (`wgmma_grouped` in the rows; `--compare-fp8-grouped`, its earlier name, still works).
    #[arg(long, alias = "compare-fp8-grouped")]
    pub compare_wgmma_grouped: bool,
    /// Also time each case with every sequence's token picked on the host instead of on the
    /// device (`device_picks` in the rows). Greedy: its logits row copied back alone (f32) and
    /// its argmax and log-softmax taken there, as `lorq serve` did before session 38; with the
    /// sampling flags: the batch's rows in one copy, sampled on CPU threads, the path `lorq
    /// serve` takes for typical-p, constrained requests and alternatives.
    #[arg(long)]
    pub compare_host_picks: bool,
    /// Sample each step's tokens (seeded per sequence from --seed) as `lorq serve`'s sampler
    /// would instead of taking the argmax: on a GPU with temperature / top-k / top-p and the
    /// repetition penalty (over the sequence's new tokens), on the host with typical-p.
    #[command(flatten)]
    pub sampling: SamplingFlags,
    /// Also report each token's N most likely alternatives (`top_n_tokens` / `top_logprobs`):
    /// on a GPU ranked there; with --compare-host-picks, from the rows on the host
    /// (`alternatives` in the rows).
    #[arg(long, default_value_t = 0)]
    pub top_n: usize,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Timed repetitions of each case (prefill + decode again; the best decode is reported).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Keep cudarc's per-buffer event tracking (candle's default; it records CUDA events on
    /// every kernel argument, which costs host time per launch). Off by default here: lorq
    /// runs one stream per GPU, where the events order nothing.
    #[arg(long)]
    pub event_tracking: bool,
    /// Decode steps without CUDA graphs (`off`), with them (`on`: captured on a batch layout's
    /// second step, replayed after), or each case both ways (`both`).
    #[arg(long, default_value = "on", value_parser = ["on", "off", "both"])]
    pub cuda_graphs: String,
    /// Write the report (JSON) here; rows are printed either way.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// `--compare-attention-partitions`' keys per partition: a multiple of 16 (the tensor-core
/// kernels' key tiles) from 16 to 256 (the most one attention block scores).
fn partition_keys(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(k) if (16..=256).contains(&k) && k % 16 == 0 => Ok(k),
        _ => Err(format!(
            "{s:?}: keys per partition are a multiple of 16 from 16 to 256"
        )),
    }
}

/// The settings of one `--compare-*` switch to time each case with: on, then off where the switch
/// is asked for (`compare`) and the device is a GPU; else only on (the default).
fn switch_modes(compare: bool, dev: &Device) -> &'static [bool] {
    if compare && dev.is_cuda() {
        &[true, false]
    } else {
        &[true]
    }
}

/// One setting of the boolean `--compare-*` switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Switches {
    fused: bool,
    grouped: bool,
    norm_tails: bool,
    fp8_codes: bool,
    dependent_launches: bool,
    cluster_sums: bool,
    wgmma_grouped: bool,
    lora_overlap: bool,
    wgmma: bool,
    half2_two_rows: bool,
    folded_scales: bool,
    tiled_wide_groups_apart: bool,
    /// Greedy tokens picked on the device for the whole batch (else per sequence on the host);
    /// the bench's own, not a kernel switch.
    device_picks: bool,
}

impl Switches {
    /// Every setting to time: each switch on, then also off where it is compared (the first
    /// switch varying slowest).
    fn compared(a: &BenchDecodeArgs, adapters: bool, dev: &Device) -> Vec<Switches> {
        let asked = [
            a.compare_fused,
            a.compare_grouped,
            a.compare_norm_tails,
            a.compare_fp8_codes,
            a.compare_dependent_launches,
            a.compare_cluster_sums,
            a.compare_wgmma_grouped,
            a.compare_lora_overlap && adapters,
            a.compare_wgmma,
            a.compare_half2_rows,
            a.compare_folded_scales,
            a.compare_tiled_groups,
            a.compare_host_picks,
        ];
        let mut settings = vec![Vec::with_capacity(asked.len())];
        for &compare in &asked {
            settings = settings
                .into_iter()
                .flat_map(|s| {
                    switch_modes(compare, dev).iter().map(move |&on| {
                        let mut s = s.clone();
                        s.push(on);
                        s
                    })
                })
                .collect();
        }
        settings
            .into_iter()
            .map(|s| Switches {
                fused: s[0],
                grouped: s[1],
                norm_tails: s[2],
                fp8_codes: s[3],
                dependent_launches: s[4],
                cluster_sums: s[5],
                wgmma_grouped: s[6],
                lora_overlap: s[7],
                wgmma: s[8],
                half2_two_rows: s[9],
                folded_scales: s[10],
                tiled_wide_groups_apart: s[11],
                device_picks: s[12],
            })
            .collect()
    }

    /// Applies the setting to the model and to lorq_quant's kernel switches: process-wide, or
    /// for the wgmma kernels' cluster sums and grouped launches this thread (the one that runs
    /// the model).
    fn set(self, model: &mut LlamaModel) {
        model.set_fused_ops(self.fused);
        model.set_grouped_matmuls(self.grouped);
        model.set_norm_tails(self.norm_tails);
        model.set_fp8_codes(self.fp8_codes);
        #[cfg(feature = "cuda")]
        {
            use lorq_quant::cuda as k;
            k::qwgmma::set_enabled(self.wgmma);
            k::fp8_wgmma::set_enabled(self.wgmma);
            k::qgemv::set_half2_two_rows(self.half2_two_rows);
            k::qmma_tiled::set_folded_scales(self.folded_scales);
            k::qgemv::set_wide_groups_apart(self.tiled_wide_groups_apart);
            k::dependent_launch::set_enabled(self.dependent_launches);
            k::qwgmma::set_cluster_sums(self.cluster_sums);
            k::qwgmma::set_grouped_launches(self.wgmma_grouped);
            k::side_stream::set_enabled(self.lora_overlap);
        }
    }
}

/// The attention kernels' process-wide switches (lorq_quant's `paged_attention`): 4-head FMA
/// blocks for GQA groups of up to 4 heads, tensor-core kernels for 16-bit caches, the decode
/// attention's keys per partition (`None`: automatic), and query tiles for prefill rows.
fn set_attention_switches(four_head_blocks: bool, mma: bool, keys: Option<usize>, tiles: bool) {
    #[cfg(feature = "cuda")]
    {
        use lorq_quant::cuda::paged_attention as pa;
        pa::set_4_head_blocks(four_head_blocks);
        pa::set_tensor_core_attention(mma);
        pa::set_partition_keys(keys);
        pa::set_prefill_tiles(tiles);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (four_head_blocks, mma, keys, tiles);
}

/// Seconds of the device's work queued so far (waits for it).
fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// HBM bandwidth in bytes/s: a 2 GiB device-to-device copy (cuMemcpyDtoD; read + write bytes),
/// best of 6.
#[cfg(feature = "cuda")]
fn measure_bandwidth(dev: &Device) -> Result<Option<f64>> {
    let Device::Cuda(cuda) = dev else {
        return Ok(None);
    };
    let n = 1usize << 29; // f32 elements: 2 GiB
    let src = cuda.alloc_zeros::<f32>(n)?;
    let mut dst = cuda.alloc_zeros::<f32>(n)?;
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        sync(dev)?;
        let t = Instant::now();
        cuda.memcpy_dtod(&src, &mut dst)?;
        sync(dev)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(Some(2.0 * (n * 4) as f64 / best))
}

#[cfg(not(feature = "cuda"))]
fn measure_bandwidth(_dev: &Device) -> Result<Option<f64>> {
    Ok(None)
}

fn card(dev: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Ok(n) = super::bench_kernels_cuda::card_name(dev) {
        return n;
    }
    match dev {
        Device::Cpu => "cpu".into(),
        d => format!("{d:?}"),
    }
}

/// Bytes a decode step reads besides the KV cache: every weight but the embedding table (only
/// the batch's rows of it are read).
fn weight_bytes_read(model: &LlamaModel) -> usize {
    let c = &model.config;
    let embed = c.vocab_size * c.hidden_size * model.dtype().size_in_bytes();
    if model.lm_head_is_embedding_table() {
        model.weight_bytes()
    } else {
        model.weight_bytes() - embed
    }
}

/// The attention switches to time: (4-head FMA blocks, tensor-core kernels, keys per partition,
/// prefill tiles), as the kernels see them — f32 caches have no tensor-core kernels, the 4-head
/// switch is the FMA kernels' and the prefill tiles need tensor cores — so a combination that would
/// time the same kernels as an earlier one is dropped.
fn attention_modes(
    blocks: &[bool],
    mma: &[bool],
    tiles: &[bool],
    partitions: &[Option<usize>],
    sixteen_bit: bool,
) -> Vec<(bool, bool, Option<usize>, bool)> {
    let mut modes = Vec::new();
    for &b in blocks {
        for &m in mma {
            for &t in tiles {
                for &p in partitions {
                    let m = m && sixteen_bit;
                    let mode = (b || m, m, p, t && m);
                    if !modes.contains(&mode) {
                        modes.push(mode);
                    }
                }
            }
        }
    }
    modes
}

struct Case<'a> {
    model: &'a LlamaModel,
    batch: usize,
    adapters: &'a [Arc<LoraAdapter>],
}

/// Seconds of one case: prefill, decode (`new_tokens` steps), and of the decode the host time
/// spent inside `forward` (issuing the work; the GPU runs behind it until the argmax).
struct Timing {
    prefill_s: f64,
    decode_s: f64,
    forward_host_s: f64,
}

fn run_case(
    case: &Case<'_>,
    a: &BenchDecodeArgs,
    dev: &Device,
    device_picks: bool,
) -> Result<Timing> {
    let model = case.model;
    let mut picker = Picker::new(a, case.batch, device_picks)?;
    let vocab = model.config.vocab_size as u64;
    if let Some(pool) = model.kv_pool() {
        let per_seq = (a.context + a.new_tokens + 8).div_ceil(lorq_model::paged_kv::BLOCK_SIZE);
        pool.reserve(case.batch * per_seq)?;
    }
    let mut caches: Vec<_> = (0..case.batch).map(|_| model.new_cache()).collect();
    let adapter_of = |i: usize| -> Option<Arc<LoraAdapter>> {
        (!case.adapters.is_empty()).then(|| case.adapters[i % case.adapters.len()].clone())
    };
    // Prompts: seeded token ids, different per sequence.
    let prompts: Vec<Vec<u32>> = (0..case.batch)
        .map(|s| {
            (0..a.context.max(1))
                .map(|t| ((s as u64 * 7919 + t as u64 * 104_729 + a.seed) % vocab) as u32)
                .collect()
        })
        .collect();
    sync(dev)?;
    let t = Instant::now();
    // Prefill in chunks of at most 16k rows (the attention grid's row limit is 65535).
    let per_step = (16_384 / a.context.max(1)).max(1);
    let mut next = Vec::with_capacity(case.batch);
    for start in (0..case.batch).step_by(per_step) {
        let end = (start + per_step).min(case.batch);
        let mut items: Vec<BatchItem> = caches[start..end]
            .iter_mut()
            .enumerate()
            .map(|(j, c)| BatchItem {
                tokens: &prompts[start + j],
                cache: c,
                adapter: adapter_of(start + j),
                logits: LogitsWanted::Last,
            })
            .collect();
        let logits = model.forward_step(&mut items)?;
        next.extend(picker.pick(logits, start)?);
    }
    sync(dev)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut host = 0f64;
    let mut step = |next: &mut Vec<u32>, host: &mut f64| -> Result<()> {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&n| [n]).collect();
        let mut items: Vec<BatchItem> = caches
            .iter_mut()
            .zip(&tokens)
            .enumerate()
            .map(|(i, (c, t))| BatchItem {
                tokens: t,
                cache: c,
                adapter: adapter_of(i),
                logits: LogitsWanted::Last,
            })
            .collect();
        let t = Instant::now();
        let logits = model.forward_step(&mut items)?;
        *host += t.elapsed().as_secs_f64();
        *next = picker.pick(logits, 0)?;
        Ok(())
    };
    // Two untimed steps (kernel loading, first-use uploads).
    for _ in 0..2 {
        step(&mut next, &mut host)?;
    }
    sync(dev)?;
    host = 0.0;
    let t = Instant::now();
    for _ in 0..a.new_tokens {
        step(&mut next, &mut host)?;
    }
    sync(dev)?;
    Ok(Timing {
        prefill_s,
        decode_s: t.elapsed().as_secs_f64(),
        forward_host_s: host,
    })
}

/// How a case picks each step's tokens: greedy or sampled, on the device or on the host.
struct Picker {
    /// One per sequence when sampling or reporting alternatives; empty for plain greedy.
    samplers: Vec<Sampler>,
    /// Each sequence's tokens picked so far (the repetition penalty's context).
    picked: Vec<Vec<u32>>,
    alternatives: usize,
    device: bool,
}

impl Picker {
    fn new(a: &BenchDecodeArgs, batch: usize, device: bool) -> Result<Self> {
        let params = a.sampling.params(None);
        params.validate().context("the sampling flags")?;
        let samplers = if plain_greedy(&params) && a.top_n == 0 {
            vec![]
        } else {
            (0..batch as u64)
                .map(|i| {
                    Sampler::new(SamplingParams {
                        seed: Some(a.seed.wrapping_add(i)),
                        ..params.clone()
                    })
                })
                .collect()
        };
        Ok(Self {
            samplers,
            picked: vec![vec![]; batch],
            alternatives: a.top_n,
            device,
        })
    }

    /// The next tokens of the step's sequences, the first of which is sequence `first` of the
    /// case (prefill runs in chunks).
    fn pick(&mut self, logits: lorq_model::StepLogits, first: usize) -> Result<Vec<u32>> {
        if self.samplers.is_empty() {
            return if self.device {
                greedy_ids(&logits)
            } else {
                host_picks(logits)
            };
        }
        let span = first..first + logits.len();
        let samplers = &mut self.samplers[span.clone()];
        let picked = &mut self.picked[span];
        // The device picks what it can (pick_step); the host samples the rest in parallel. The
        // host way: every row back in one copy.
        let picks = {
            let mut requests: Vec<PickRequest> = samplers
                .iter_mut()
                .zip(&*picked)
                .map(|(sampler, context)| PickRequest {
                    sampler,
                    context,
                    alternatives: self.alternatives,
                    needs_row: !self.device,
                })
                .collect();
            pick_step(&logits, &mut requests)?
        };
        let ids: Vec<u32> = samplers
            .par_iter_mut()
            .zip(picks)
            .zip(&*picked)
            .map(|((s, pick), context)| match pick {
                StepPick::Token(t, alternatives) => {
                    std::hint::black_box(alternatives);
                    t.id
                }
                StepPick::Row(row) => {
                    std::hint::black_box(top_logprobs(&row, self.alternatives));
                    s.sample(&row, context).id
                }
            })
            .collect();
        for (context, &id) in picked.iter_mut().zip(&ids) {
            context.push(id);
        }
        Ok(ids)
    }
}

/// Greedy tokens the way a host-side sampler takes them: each sequence's f32 row copied back on
/// its own, then its argmax and log-softmax (the sampler's greedy branch) on the host.
fn host_picks(logits: lorq_model::StepLogits) -> Result<Vec<u32>> {
    logits
        .into_items()?
        .iter()
        .map(|l| {
            let row: Vec<f32> = l.get(l.dim(0)? - 1)?.to_vec1()?;
            let id = lorq_model::sampling::argmax(&row);
            std::hint::black_box(lorq_model::sampling::log_softmax_at(&row, id));
            Ok(id as u32)
        })
        .collect()
}

/// Greedy with no repetition penalty: the argmax of the logits alone (`greedy_ids` /
/// `host_picks`); anything else picks through samplers.
fn plain_greedy(p: &SamplingParams) -> bool {
    p.is_greedy() && p.penalty().is_none()
}

/// The rows' `sampling`: "greedy", or the sampler's settings.
fn sampling_row(a: &BenchDecodeArgs) -> Value {
    let p = a.sampling.params(None);
    if plain_greedy(&p) {
        return json!("greedy");
    }
    json!({
        "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
        "typical_p": p.typical_p, "repetition_penalty": p.repetition_penalty,
    })
}

pub fn run(a: BenchDecodeArgs) -> Result<()> {
    let dev = parse_device(&a.device)?;
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(cuda), true) = (&dev, a.event_tracking) {
        // SAFETY: no buffer exists yet (parse_device turned the tracking off for lorq's one
        // stream per GPU; this measures what it costs).
        unsafe { cuda.cuda_stream().context().enable_event_tracking() };
    }
    let config = shape_config(&a.shape)?;
    let dtype = a.dtype.dtype();
    if a.context == 0 || a.new_tokens == 0 {
        bail!("--context and --new-tokens must be at least 1");
    }
    let adapter_modules = a
        .adapter_modules
        .iter()
        .map(|name| {
            LayerLinear::from_name(name.trim()).with_context(|| {
                format!("--adapter-modules: {name:?} is not a decoder-layer linear (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bandwidth = measure_bandwidth(&dev)?;
    if let Some(bw) = bandwidth {
        eprintln!("HBM bandwidth (2 GiB copy): {:.0} GB/s", bw / 1e9);
    }
    let card = card(&dev);
    let mut rows: Vec<Value> = Vec::new();
    for q in &a.quantize {
        let method = QuantMethod::parse(q).with_context(|| format!("--quantize {q}"))?;
        let t = Instant::now();
        let mut model = LlamaModel::random(config.clone(), dtype, &dev, method, a.seed)
            .with_context(|| format!("building a random {} ({q})", a.shape))?;
        let build_s = t.elapsed().as_secs_f64();
        let format =
            method.map_or_else(|| format!("{dtype:?}").to_lowercase(), |m| m.name().into());
        eprintln!("{format}: random {} built in {build_s:.1}s", a.shape);
        let c = &model.config;
        let kv_per_token =
            2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype.size_in_bytes();
        // The cases with the LM head in --dtype, then (compared) with it quantized by `method`.
        let mut head_quantizers = vec![None];
        if a.compare_quantized_lm_head {
            head_quantizers.extend(method.map(Some));
        }
        for head_quantizer in head_quantizers {
            if let Some(m) = head_quantizer {
                let t = Instant::now();
                // Calibrated formats: rounded to nearest, as the random model's layers are.
                if m.is_jit() {
                    model.quantize_lm_head(m)
                } else {
                    model.round_lm_head_into(m)
                }
                .with_context(|| format!("{format}: quantizing the LM head"))?;
                eprintln!(
                    "{format}: LM head quantized in {:.1}s",
                    t.elapsed().as_secs_f64()
                );
            }
            let weights_read = weight_bytes_read(&model);
            for &n_adapters in &a.adapters {
                let adapters = random_adapters(&model, n_adapters, a.rank, &adapter_modules)?;
                let adapter_bytes = adapters.first().map_or(0, |x| x.bytes());
                for &batch in &a.batch_sizes {
                    let graph_modes: &[bool] = match (a.cuda_graphs.as_str(), dev.is_cuda()) {
                        ("both", true) => &[true, false],
                        ("on", true) => &[true],
                        _ => &[false],
                    };
                    let block_modes = switch_modes(a.compare_attention_blocks, &dev);
                    let mma_modes = switch_modes(a.compare_attention_mma, &dev);
                    let mut partition_modes: Vec<Option<usize>> = vec![None];
                    if dev.is_cuda() {
                        partition_modes
                            .extend(a.compare_attention_partitions.iter().map(|&p| Some(p)));
                    }
                    let tile_modes = switch_modes(a.compare_prefill_tiles, &dev);
                    let attn_modes = attention_modes(
                        block_modes,
                        mma_modes,
                        tile_modes,
                        &partition_modes,
                        dtype != DType::F32,
                    );
                    let compared = Switches::compared(&a, n_adapters > 0, &dev);
                    let modes = compared.iter().flat_map(|&sw| {
                        attn_modes
                            .iter()
                            .flat_map(move |&at| graph_modes.iter().map(move |&g| (sw, at, g)))
                    });
                    for (sw, (attn4, mma, part_keys, tiles), graphs) in modes {
                        sw.set(&mut model);
                        set_attention_switches(attn4, mma, part_keys, tiles);
                        model.set_cuda_graphs(graphs);
                        let case = Case {
                            model: &model,
                            batch,
                            adapters: &adapters,
                        };
                        // The best decode of the repeats, and the best prefill on its own (the
                        // first repeat's also loads kernels).
                        let mut best: Option<Timing> = None;
                        let mut prefill_s = f64::INFINITY;
                        for _ in 0..a.repeats.max(1) {
                            let t = run_case(&case, &a, &dev, sw.device_picks)
                                .with_context(|| format!("{format}, batch {batch}"))?;
                            prefill_s = prefill_s.min(t.prefill_s);
                            if best.as_ref().is_none_or(|b| t.decode_s < b.decode_s) {
                                best = Some(t);
                            }
                        }
                        let Timing {
                            decode_s,
                            forward_host_s,
                            ..
                        } = best.expect("at least one repeat");
                        let step_s = decode_s / a.new_tokens as f64;
                        // Average keys per sequence over the timed steps (2 untimed steps first).
                        let mean_ctx = a.context as f64 + 2.0 + (a.new_tokens as f64 + 1.0) / 2.0;
                        let kv_bytes = batch as f64 * mean_ctx * kv_per_token as f64;
                        // Each distinct adapter of the batch is read once per step.
                        let used_adapters = n_adapters.min(batch) as f64 * adapter_bytes as f64;
                        let base_bytes = weights_read as f64 + kv_bytes;
                        let bytes_per_step = base_bytes + used_adapters;
                        let roofline = bandwidth.map(|bw| batch as f64 * bw / bytes_per_step);
                        let tps = batch as f64 / step_s;
                        let mut row = json!({
                            "format": format,
                            "batch": batch,
                            "context": a.context,
                            "tokens_per_s": tps,
                            "ms_per_step": step_s * 1e3,
                            "weight_bytes": model.weight_bytes(),
                            "lm_head_quantized": !model.lm_head_is_dense(),
                            "roofline_tokens_per_s": roofline,
                            "pct_of_roofline": roofline.map(|r| 100.0 * tps / r),
                            "bytes_per_step": bytes_per_step,
                            "kv_bytes_per_step": kv_bytes,
                            "adapter_bytes_per_step": used_adapters,
                            // What a memory-bound step with these adapters can keep of the
                            // no-adapter speed: the bytes without them over the bytes with them.
                            "byte_ceiling_pct_of_no_adapter": 100.0 * base_bytes / bytes_per_step,
                            "adapters": n_adapters,
                            "rank": if n_adapters > 0 { Some(a.rank) } else { None },
                            "adapter_modules": (n_adapters > 0).then_some(&a.adapter_modules),
                            "fused_ops": sw.fused,
                            "grouped_matmuls": sw.grouped,
                            "norm_tails": sw.norm_tails && sw.fused,
                            "fp8_codes": sw.fp8_codes && sw.fused,
                            "dependent_launches": sw.dependent_launches,
                            "cluster_sums": sw.cluster_sums,
                            "wgmma_grouped": sw.wgmma_grouped,
                            "lora_overlap": n_adapters > 0 && sw.lora_overlap && model.cuda_graphs(),
                            "wgmma": sw.wgmma,
                            "half2_two_rows": sw.half2_two_rows,
                            "folded_scales": sw.folded_scales,
                            "tiled_wide_groups_apart": sw.tiled_wide_groups_apart,
                            "device_picks": sw.device_picks,
                            "attention_4_head_blocks": attn4,
                            "attention_mma": mma && dev.is_cuda(),
                            "attention_partition_keys": part_keys,
                            "cuda_graphs": model.cuda_graphs(),
                            "captured_graphs": model.captured_cuda_graphs(),
                            "paged_kv": model.kv_pool().is_some(),
                            "prefill_s": prefill_s,
                            "prefill_tokens_per_s": (batch * a.context.max(1)) as f64 / prefill_s,
                            "prefill_tiles": tiles && dev.is_cuda(),
                            "forward_host_ms_per_step": forward_host_s * 1e3 / a.new_tokens as f64,
                            "event_tracking": a.event_tracking || !dev.is_cuda(),
                            "build_s": build_s,
                        });
                        // (past serde_json's macro recursion limit inside json!)
                        row["sampling"] = sampling_row(&a);
                        row["alternatives"] = json!(a.top_n);
                        eprintln!("{row}");
                        rows.push(row);
                    }
                }
            }
        }
    }
    let report = json!({
        "engine": "lorq",
        "bench": "decode",
        "shape": a.shape,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "card": card,
        "hbm_bytes_per_s": bandwidth,
        "bandwidth_source": "measured: 2 GiB cuMemcpyDtoD, read + write bytes, best of 6",
        "new_tokens": a.new_tokens,
        "date": utc_date(),
        "command": command_line(),
        "rows": rows,
    });
    match &a.json {
        Some(path) => std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::attention_modes;

    #[test]
    fn attention_modes_time_each_kernel_choice_once() {
        let both = [true, false];
        let bf16 = attention_modes(&both, &both, &both, &[None, Some(64)], true);
        assert_eq!(
            bf16,
            vec![
                (true, true, None, true),
                (true, true, Some(64), true),
                (true, true, None, false),
                (true, true, Some(64), false),
                (true, false, None, false),
                (true, false, Some(64), false),
                (false, false, None, false),
                (false, false, Some(64), false),
            ]
        );
        let f32 = attention_modes(&both, &both, &both, &[None], false);
        assert_eq!(
            f32,
            vec![(true, false, None, false), (false, false, None, false)]
        );
        let plain = attention_modes(&[true], &[true], &[true], &[None], true);
        assert_eq!(plain, vec![(true, true, None, true)]);
    }
}
