//! Seeded random Llama-family models of a named shape, built in memory without files: speed does
//! not depend on weight values, so GPU benchmarks run 8B shapes this way. Weights are N(0, 0.02²)
//! (the same values for a seed on every machine and thread count), norms 1; with a quantization
//! method every decoder-layer linear is quantized as a loaded checkpoint would be (on the GPU when
//! the model is there, else on the host, all cores).

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use lorq_quant::method::QuantMethod;
use lorq_quant::{DenseTensor, QuantTensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::linear::{quantize_weight, Linear};
use crate::llama::{DecoderLayer, LayerLinear, LlamaModel};
use lorq_lora::{LoraAdapter, LoraConfig, LoraModule, TargetModules};

/// Standard deviation of the random weights.
pub const WEIGHT_STD: f32 = 0.02;

/// Named shapes: `llama-3-8b`, `smollm2-135m`, and `tiny` (a few layers, for tests).
pub fn shape_config(name: &str) -> Result<ModelConfig> {
    let json = match name {
        "llama-3-8b" => {
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":128256,"hidden_size":4096,
            "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":8,"rms_norm_eps":1e-5,"rope_theta":500000.0,
            "max_position_embeddings":8192,"tie_word_embeddings":false,"bos_token_id":128000,
            "eos_token_id":128001}"#
        }
        "smollm2-135m" => {
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
            "num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000.0,
            "max_position_embeddings":8192,"tie_word_embeddings":true,"bos_token_id":1,
            "eos_token_id":2}"#
        }
        "tiny" => {
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":512,"hidden_size":256,
            "intermediate_size":512,"num_hidden_layers":3,"num_attention_heads":8,
            "num_key_value_heads":2,"head_dim":64,"rms_norm_eps":1e-5,"rope_theta":10000.0,
            "max_position_embeddings":2048,"tie_word_embeddings":false,"bos_token_id":1,
            "eos_token_id":2}"#
        }
        other => {
            return Err(ModelError::Request(format!(
                "unknown model shape {other:?} (llama-3-8b, smollm2-135m, tiny)"
            )))
        }
    };
    ModelConfig::parse(json, Path::new(name))
}

/// Values per independently seeded chunk (the values do not depend on how chunks are spread
/// over threads).
const CHUNK: usize = 1 << 16;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Chunk `chunk` of the N(0, std²) stream `seed` (Box–Muller over splitmix64).
fn fill_chunk(seed: u64, chunk: usize, out: &mut [f32], std: f32) {
    let mut state = splitmix(seed ^ splitmix(chunk as u64));
    let mut uniform = || {
        state = splitmix(state);
        ((state >> 11) as f64 + 1.0) / (1u64 << 53) as f64 // (0, 1]
    };
    for pair in out.chunks_mut(2) {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        pair[0] = (r * t.cos()) as f32 * std;
        if pair.len() > 1 {
            pair[1] = (r * t.sin()) as f32 * std;
        }
    }
}

/// `len` seeded N(0, std²) values; `threads` > 1 spreads the chunks over threads.
pub fn seeded_randn(seed: u64, len: usize, std: f32, threads: usize) -> Vec<f32> {
    let mut out = vec![0f32; len];
    let chunks: Vec<(usize, &mut [f32])> = out.chunks_mut(CHUNK).enumerate().collect();
    let threads = threads.clamp(1, chunks.len().max(1));
    let per = chunks.len().div_ceil(threads).max(1);
    let mut groups: Vec<Vec<(usize, &mut [f32])>> = Vec::new();
    let mut it = chunks.into_iter().peekable();
    while it.peek().is_some() {
        groups.push(it.by_ref().take(per).collect());
    }
    std::thread::scope(|s| {
        for g in groups {
            s.spawn(move || {
                for (i, c) in g {
                    fill_chunk(seed, i, c, std);
                }
            });
        }
    });
    out
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Seed of tensor number `index` of the model.
fn tensor_seed(seed: u64, index: usize) -> u64 {
    splitmix(seed.wrapping_mul(0x100_0000_01B3) ^ index as u64)
}

impl LlamaModel {
    /// A model of `config` with seeded random weights (N(0, 0.02²), norms 1) in `dtype` on
    /// `device`; with `quantize`, every decoder-layer linear is quantized with it (embeddings,
    /// norms and the LM head stay in `dtype`, as with a loaded checkpoint). The calibrated
    /// formats (GPTQ, AWQ: 4-bit, groups of 128) are rounded to nearest on the host, as a
    /// loaded checkpoint arrives there: random weights have nothing to calibrate against, and
    /// the format, not its codes, is what a benchmark of its kernels measures. The same `seed`
    /// gives the same weights on any device.
    pub fn random(
        config: ModelConfig,
        dtype: DType,
        device: &Device,
        quantize: Option<QuantMethod>,
        seed: u64,
    ) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let n = cores();
        let dense = |index: usize, shape: (usize, usize)| -> Result<Tensor> {
            let v = seeded_randn(tensor_seed(seed, index), shape.0 * shape.1, WEIGHT_STD, n);
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        let ones = |len: usize| -> Result<Tensor> {
            Ok(Tensor::ones(len, DType::F32, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        // Tensor indices: 0 embed, 1 lm_head, then 7 linears (+ biases at 10_000+) per layer.
        let index = |layer: usize, w: LayerLinear| {
            2 + layer * 7
                + LayerLinear::ALL
                    .iter()
                    .position(|&x| x == w)
                    .expect("listed")
        };
        let jobs: Vec<(usize, LayerLinear)> = (0..c.num_hidden_layers)
            .flat_map(|l| LayerLinear::ALL.map(|w| (l, w)))
            .collect();
        let mut linears: Vec<Option<Linear>> = (0..jobs.len()).map(|_| None).collect();
        let make = |&(l, w): &(usize, LayerLinear), threads: usize| -> Result<Linear> {
            let (out, inp) = c.linear_shape(w);
            let path = format!("model.layers.{l}.{}", w.module());
            let v = seeded_randn(
                tensor_seed(seed, index(l, w)),
                out * inp,
                WEIGHT_STD,
                threads,
            );
            let base = match quantize {
                Some(q) if !q.is_jit() => {
                    rtn_calibrated_format(q, &v, out, inp, &format!("{path}.weight"))?
                }
                Some(q) => {
                    // On a GPU the weight is quantized there (`quantize_weight`), as a model
                    // loaded with `--device cuda --quantize` is.
                    let t = Tensor::from_vec(v, (out, inp), &Device::Cpu)?.to_device(device)?;
                    quantize_weight(q, &format!("{path}.weight"), &t)?
                }
                None => {
                    let t = Tensor::from_vec(v, (out, inp), &Device::Cpu)?
                        .to_dtype(dtype)?
                        .to_device(device)?;
                    lorq_quant::method::dense(t)?
                }
            };
            let bias_wanted = match w {
                LayerLinear::Q | LayerLinear::K | LayerLinear::V => c.qkv_bias,
                LayerLinear::O => c.o_bias,
                LayerLinear::Gate | LayerLinear::Up | LayerLinear::Down => c.mlp_bias,
            };
            let bias = if bias_wanted {
                let v = seeded_randn(tensor_seed(seed, 10_000 + index(l, w)), out, WEIGHT_STD, 1);
                Some(
                    Tensor::from_vec(v, out, &Device::Cpu)?
                        .to_dtype(dtype)?
                        .to_device(device)?,
                )
            } else {
                None
            };
            Ok(Linear { path, base, bias })
        };
        if quantize.is_some_and(|q| device.is_cpu() || !q.is_jit()) {
            // One linear per core at a time: quantization on the host is the slow part.
            let next = Mutex::new(0usize);
            let done: Mutex<Vec<(usize, Result<Linear>)>> = Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for _ in 0..n.min(jobs.len()) {
                    s.spawn(|| loop {
                        let i = {
                            let mut g = next.lock().unwrap_or_else(|e| e.into_inner());
                            let i = *g;
                            *g += 1;
                            i
                        };
                        if i >= jobs.len() {
                            break;
                        }
                        let r = make(&jobs[i], 1);
                        done.lock().unwrap_or_else(|e| e.into_inner()).push((i, r));
                    });
                }
            });
            for (i, r) in done.into_inner().unwrap_or_else(|e| e.into_inner()) {
                linears[i] = Some(r?);
            }
        } else {
            for (i, job) in jobs.iter().enumerate() {
                linears[i] = Some(make(job, n)?);
            }
        }
        let mut linears = linears.into_iter().map(|l| l.expect("every job ran"));
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let mut next = || linears.next().expect("7 per layer");
            layers.push(DecoderLayer {
                input_norm: ones(h)?,
                post_attention_norm: ones(h)?,
                q: next(),
                k: next(),
                v: next(),
                o: next(),
                gate: next(),
                up: next(),
                down: next(),
                window: c.sliding_window[l],
            });
        }
        let embed_tokens = dense(0, (c.vocab_size, h))?;
        let lm_head = Linear {
            path: "lm_head".into(),
            base: if c.tie_word_embeddings {
                Arc::new(DenseTensor::new(embed_tokens.clone())?)
            } else {
                lorq_quant::method::dense(dense(1, (c.vocab_size, h))?)?
            },
            bias: None,
        };
        let norm = ones(h)?;
        Self::assemble(config, dtype, device, embed_tokens, layers, norm, lm_head)
    }
}

impl LlamaModel {
    /// The LM head rounded to nearest into a calibrated format (GPTQ, AWQ), as [`Self::random`]
    /// rounds the decoder linears: for benchmarks of random models, beside
    /// [`Self::quantize_lm_head`] for the load-time methods (a real checkpoint's head is
    /// calibrated with its layers, or kept in full precision).
    pub fn round_lm_head_into(&mut self, method: QuantMethod) -> Result<()> {
        let w = self.dense_lm_head()?;
        let (n, k) = w.dims2()?;
        let v: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        self.lm_head.base = rtn_calibrated_format(method, &v, n, k, "lm_head.weight")?;
        Ok(())
    }
}

/// `w` `[n, k]` rounded to nearest into a calibrated method's 4-bit format, groups of 128
/// (GPTQ: asymmetric, the default of GPTQModel and AutoGPTQ; AWQ: GEMM packing, zero point).
fn rtn_calibrated_format(
    q: QuantMethod,
    w: &[f32],
    n: usize,
    k: usize,
    what: &str,
) -> Result<Arc<dyn QuantTensor>> {
    use lorq_quant::gptq::quantize::{rtn_gptq, GptqParams};
    Ok(match q {
        QuantMethod::Gptq => Arc::new(rtn_gptq(w, n, k, &GptqParams::default(), what)?),
        QuantMethod::Awq => Arc::new(lorq_quant::awq::AwqTensor::quantize(w, n, k, 128, what)?),
        m => {
            return Err(ModelError::Request(format!(
                "{}: quantized at load time, not rounded into a calibrated format",
                m.name()
            )))
        }
    })
}

/// `n` random rank-`rank` adapters (N(0, 0.02²) A and B, scale 2) on the decoder-layer linears
/// `targets` of every layer of `model` (`LayerLinear::ALL`: all of them), on its device and in
/// its dtype: for benchmarks and tests of many adapters.
pub fn random_adapters(
    model: &LlamaModel,
    n: usize,
    rank: usize,
    targets: &[LayerLinear],
) -> Result<Vec<Arc<LoraAdapter>>> {
    if targets.is_empty() {
        return Err(ModelError::Request(
            "random adapters: no target module given".into(),
        ));
    }
    let (dev, dtype) = (model.device(), model.dtype());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut modules = std::collections::HashMap::new();
        for l in 0..model.num_layers() {
            for &w in targets {
                let lin = model.layer_linear(l, w);
                let a =
                    Tensor::randn(0f32, 0.02, (rank, lin.in_features()), dev)?.to_dtype(dtype)?;
                let b =
                    Tensor::randn(0f32, 0.02, (lin.out_features(), rank), dev)?.to_dtype(dtype)?;
                modules.insert(lin.path.clone(), LoraModule::low_rank(a, b, 2.0));
            }
        }
        let config = LoraConfig {
            r: rank,
            lora_alpha: 2.0 * rank as f64,
            use_rslora: false,
            target_modules: TargetModules::Names(
                targets.iter().map(|w| w.name().to_string()).collect(),
            ),
            exclude_modules: None,
            rank_pattern: vec![],
            alpha_pattern: vec![],
            layers_to_transform: None,
            layers_pattern: None,
            base_model_name_or_path: None,
        };
        let a = LoraAdapter::from_modules(format!("random-adapter-{i}").into(), config, modules)?;
        out.push(Arc::new(a));
    }
    Ok(out)
}
