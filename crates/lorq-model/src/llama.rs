use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lorq_lora::{BatchAdapters, LoraAdapter};
use lorq_quant::method::QuantMethod;
use lorq_quant::DenseTensor;

use crate::attention::{attend, merge_heads, split_heads};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::linear::quantize_weight;
use crate::linear::Linear;
use crate::paged_kv::PagedPool;
use crate::prequantized::CheckpointFormat;
use crate::rope::Rope;
use crate::step_logits::StepLogits;
use crate::weights::WeightFiles;

/// One linear of a decoder layer, in the order the forward applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerLinear {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LayerLinear {
    pub const ALL: [LayerLinear; 7] = [
        LayerLinear::Q,
        LayerLinear::K,
        LayerLinear::V,
        LayerLinear::O,
        LayerLinear::Gate,
        LayerLinear::Up,
        LayerLinear::Down,
    ];

    /// The linear named `name`: its module path (`self_attn.q_proj`) or [`Self::name`].
    pub fn from_name(name: &str) -> Option<LayerLinear> {
        Self::ALL
            .into_iter()
            .find(|w| w.module() == name || w.name() == name)
    }

    /// The last part of the module path (`q_proj`, ...): PEFT's `target_modules` names.
    pub fn name(self) -> &'static str {
        let m = self.module();
        m.rsplit_once('.').map_or(m, |(_, last)| last)
    }

    /// The module path below `model.layers.N.` (`self_attn.q_proj`, ...).
    pub fn module(self) -> &'static str {
        match self {
            LayerLinear::Q => "self_attn.q_proj",
            LayerLinear::K => "self_attn.k_proj",
            LayerLinear::V => "self_attn.v_proj",
            LayerLinear::O => "self_attn.o_proj",
            LayerLinear::Gate => "mlp.gate_proj",
            LayerLinear::Up => "mlp.up_proj",
            LayerLinear::Down => "mlp.down_proj",
        }
    }
}

/// Applies one linear of a decoder layer to its input (`[rows, in]` -> `[rows, out]`).
pub type ApplyLinear<'a> = dyn FnMut(LayerLinear, &Linear, &Tensor) -> Result<Tensor> + 'a;

pub(crate) struct DecoderLayer {
    pub(crate) input_norm: Tensor,
    pub(crate) post_attention_norm: Tensor,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
    pub(crate) window: Option<usize>,
}

impl DecoderLayer {
    fn linear(&self, which: LayerLinear) -> &Linear {
        match which {
            LayerLinear::Q => &self.q,
            LayerLinear::K => &self.k,
            LayerLinear::V => &self.v,
            LayerLinear::O => &self.o,
            LayerLinear::Gate => &self.gate,
            LayerLinear::Up => &self.up,
            LayerLinear::Down => &self.down,
        }
    }

    /// The layer over the rows of `x` (`[rows, hidden]`): sequence `i` holds rows
    /// `spans[i].0 .. spans[i].0 + spans[i].1`, at the positions after `caches[i]`'s, with RoPE
    /// tables `ropes[i]`; its keys and values are appended to `caches[i]` at `cache_layer`. Every
    /// linear goes through `apply`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        c: &ModelConfig,
        x: Tensor,
        spans: &[(usize, usize)],
        ropes: &[(Tensor, Tensor)],
        caches: &mut [&mut KvCache],
        cache_layer: usize,
        apply: &mut ApplyLinear<'_>,
    ) -> Result<Tensor> {
        let eps = c.rms_norm_eps as f32;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let h = candle_nn::ops::rms_norm(&x, &self.input_norm, eps)?;
        let q = apply(LayerLinear::Q, &self.q, &h)?;
        let k = apply(LayerLinear::K, &self.k, &h)?;
        let v = apply(LayerLinear::V, &self.v, &h)?;
        let mut outs = Vec::with_capacity(spans.len());
        for (i, cache) in caches.iter_mut().enumerate() {
            let (start, n) = spans[i];
            let (cos, sin) = &ropes[i];
            let qi = split_heads(&q.narrow(0, start, n)?, heads, hd)?;
            let ki = split_heads(&k.narrow(0, start, n)?, kv_heads, hd)?;
            let vi = split_heads(&v.narrow(0, start, n)?, kv_heads, hd)?;
            let qi = candle_nn::rotary_emb::rope(&qi.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
            let ki = candle_nn::rotary_emb::rope(&ki.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
            let (k_all, v_all) = cache.append(cache_layer, &ki, &vi)?;
            outs.push(merge_heads(&attend(&qi, &k_all, &v_all, self.window)?)?);
        }
        let attn = if outs.len() == 1 {
            outs.pop().expect("one")
        } else {
            Tensor::cat(&outs, 0)?
        };
        let x = (x + apply(LayerLinear::O, &self.o, &attn)?)?;
        let h = candle_nn::ops::rms_norm(&x, &self.post_attention_norm, eps)?;
        let gate = apply(LayerLinear::Gate, &self.gate, &h)?;
        let up = apply(LayerLinear::Up, &self.up, &h)?;
        let act = (gate.silu()? * up)?;
        Ok((x + apply(LayerLinear::Down, &self.down, &act)?)?)
    }
}

/// Which logits a sequence of the batch wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Only the last new token's (generation).
    Last,
    /// Every new token's (scoring, teacher forcing).
    All,
}

/// One sequence's share of a batched step: its new tokens (a prefill chunk or one decode token),
/// its KV cache (the new tokens sit at positions `cache.len()..`), and its adapter.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub adapter: Option<Arc<LoraAdapter>>,
    pub logits: LogitsWanted,
}

/// A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2), written once with flags.
pub struct LlamaModel {
    pub config: ModelConfig,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) embed_tokens: Tensor,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    pub(crate) rope: Rope,
    /// The paged KV pool (a model on the GPU whose head size has a paged-attention kernel).
    pub(crate) kv_pool: Option<Arc<PagedPool>>,
    /// Fused residual-add + RMSNorm and SiLU·mul kernels in the paged (GPU) forward.
    pub(crate) fused_ops: bool,
    /// One GPU launch for q/k/v and one for gate/up in the paged forward where the weights allow
    /// it (`lorq_quant::matmul_group`), else one per projection.
    pub(crate) grouped_matmuls: bool,
    /// At one row, the residual add + RMSNorm runs inside a neighbouring GEMV's launch instead of
    /// its own (paged GPU forward): as the last block's tail of the o and down projections' dense
    /// GEMVs, or as the head of the q/k/v and gate/up half2 GEMVs (affine 4-bit weights).
    pub(crate) norm_tails: bool,
    /// The kernels producing an FP8 (W8A8) projection's input also write its e4m3 codes (the
    /// fused RMSNorm for q/k/v and gate/up, SiLU·mul for down_proj), so that the projection skips
    /// its own quantization launch (paged GPU forward, under `fused_ops`).
    pub(crate) fp8_codes: bool,
    /// Decode steps as CUDA graphs (`decode_graph.rs`); `None`: off, or not a paged GPU model.
    #[cfg(feature = "cuda")]
    pub(crate) decode_graphs: Option<crate::decode_graph::DecodeGraphs>,
}

impl LlamaModel {
    /// Loads every tensor from `weights`, checking names and shapes against `config`, converting
    /// to the compute `dtype`.
    /// With `quantize`, every decoder-layer linear is quantized as it is read (one full-precision
    /// tensor in memory at a time); embeddings, norms and the LM head stay in `dtype`.
    pub fn load(
        config: ModelConfig,
        weights: &WeightFiles,
        dtype: DType,
        device: &Device,
        quantize: Option<QuantMethod>,
    ) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let load = |name: &str, shape: &[usize]| weights.load(name, shape, dtype, device);
        let prequantized = CheckpointFormat::detect(c, weights, weights.dir())?;
        if let Some(f) = &prequantized {
            f.check_requested(quantize)?;
            tracing::info!("pre-quantized checkpoint: {}", f.method_name());
        }
        let quantize = if prequantized.is_some() {
            None
        } else {
            quantize
        };
        let progress = indicatif::ProgressBar::new(c.num_hidden_layers as u64 * 7);
        match quantize {
            Some(q) => {
                progress.set_style(
                    indicatif::ProgressStyle::with_template(
                        "quantizing ({msg}) [{bar:30}] {pos}/{len} linears, {eta} left",
                    )
                    .expect("valid template"),
                );
                progress.set_message(q.name());
            }
            None => progress.set_draw_target(indicatif::ProgressDrawTarget::hidden()),
        }
        let linear = |path: String, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let name = format!("{path}.weight");
            let base = match (&prequantized, quantize) {
                (Some(f), _) => f.load_linear(weights, &path, (out, inp), device)?,
                (None, Some(q)) => {
                    let w = weights.load_as_stored(&name, &[out, inp], device)?;
                    let t = quantize_weight(q, &name, &w)?;
                    progress.inc(1);
                    t
                }
                (None, None) => lorq_quant::method::dense(load(&name, &[out, inp])?)?,
            };
            let bias = if bias {
                Some(load(&format!("{path}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Linear { path, base, bias })
        };
        let embed_tokens = load("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let layer_linear = |w: LayerLinear| {
                let (out, inp) = c.linear_shape(w);
                let bias = match w {
                    LayerLinear::Q | LayerLinear::K | LayerLinear::V => c.qkv_bias,
                    LayerLinear::O => c.o_bias,
                    LayerLinear::Gate | LayerLinear::Up | LayerLinear::Down => c.mlp_bias,
                };
                linear(format!("{p}.{}", w.module()), out, inp, bias)
            };
            layers.push(DecoderLayer {
                input_norm: load(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_attention_norm: load(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q: layer_linear(LayerLinear::Q)?,
                k: layer_linear(LayerLinear::K)?,
                v: layer_linear(LayerLinear::V)?,
                o: layer_linear(LayerLinear::O)?,
                gate: layer_linear(LayerLinear::Gate)?,
                up: layer_linear(LayerLinear::Up)?,
                down: layer_linear(LayerLinear::Down)?,
                window: c.sliding_window[i],
            });
        }
        progress.finish_and_clear();
        let norm = load("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings || !weights.contains("lm_head.weight") {
            if !c.tie_word_embeddings {
                tracing::warn!(
                    "no lm_head.weight in the checkpoint: using the tied input embeddings"
                );
            }
            Linear {
                path: "lm_head".into(),
                base: Arc::new(DenseTensor::new(embed_tokens.clone())?),
                bias: None,
            }
        } else {
            // Kept in full precision, as bitsandbytes, GPTQ and AWQ leave the LM head.
            Linear {
                path: "lm_head".into(),
                base: lorq_quant::method::dense(load("lm_head.weight", &[c.vocab_size, h])?)?,
                bias: None,
            }
        };
        Self::assemble(config, dtype, device, embed_tokens, layers, norm, lm_head)
    }

    /// The model from its parts: RoPE tables, and the paged KV pool where the GPU path applies.
    pub(crate) fn assemble(
        config: ModelConfig,
        dtype: DType,
        device: &Device,
        embed_tokens: Tensor,
        layers: Vec<DecoderLayer>,
        norm: Tensor,
        lm_head: Linear,
    ) -> Result<Self> {
        let rope = Rope::new(&config, dtype, device)?;
        let kv_pool = crate::paged_forward::supports_paged(&config, dtype, device).then(|| {
            Arc::new(PagedPool::new(
                layers.len(),
                config.num_key_value_heads,
                config.head_dim,
                dtype,
                device,
            ))
        });
        Ok(Self {
            config,
            dtype,
            device: device.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            #[cfg(feature = "cuda")]
            decode_graphs: kv_pool
                .as_ref()
                .and_then(|_| graphs_usable(device))
                .map(|()| crate::decode_graph::DecodeGraphs::default()),
            rope,
            kv_pool,
            fused_ops: true,
            grouped_matmuls: true,
            norm_tails: true,
            fp8_codes: true,
        })
    }

    /// The paged KV pool, when this model runs the paged GPU path.
    pub fn kv_pool(&self) -> Option<&Arc<PagedPool>> {
        self.kv_pool.as_ref()
    }

    /// Turns the fused residual-add + RMSNorm and SiLU·mul GPU kernels on or off (candle's ops
    /// otherwise), e.g. to measure what they bring.
    pub fn set_fused_ops(&mut self, on: bool) {
        self.fused_ops = on;
        self.clear_cuda_graphs();
    }

    /// Turns the grouped q/k/v and gate/up launches of the paged GPU forward on or off (one
    /// matmul per projection otherwise), e.g. to measure what they bring.
    pub fn set_grouped_matmuls(&mut self, on: bool) {
        self.grouped_matmuls = on;
        self.clear_cuda_graphs();
    }

    /// Turns the GEMVs' norm tails and heads of the paged GPU forward on or off (the norm's own
    /// launch otherwise), e.g. to measure what they bring.
    pub fn set_norm_tails(&mut self, on: bool) {
        self.norm_tails = on;
        self.clear_cuda_graphs();
    }

    /// Turns the FP8 codes written by the norm and SiLU·mul kernels on or off (each FP8
    /// projection quantizes its input itself otherwise), e.g. to measure what they bring. On,
    /// they are written for the projections that want them
    /// (`lorq_quant::cuda::fp8_gemm::wants_offered_activations`).
    pub fn set_fp8_codes(&mut self, on: bool) {
        self.fp8_codes = on;
        self.clear_cuda_graphs();
    }

    /// Turns CUDA graphs for decode steps on or off (on by default for a paged GPU model whose
    /// device does not track events across streams); a no-op elsewhere.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        #[cfg(feature = "cuda")]
        {
            self.decode_graphs = (on && self.kv_pool.is_some())
                .then(|| graphs_usable(&self.device))
                .flatten()
                .map(|()| crate::decode_graph::DecodeGraphs::default());
        }
        #[cfg(not(feature = "cuda"))]
        let _ = on;
    }

    /// Whether decode steps run as CUDA graphs.
    pub fn cuda_graphs(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.decode_graphs.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Batch layouts whose decode steps currently replay a captured CUDA graph.
    pub fn captured_cuda_graphs(&self) -> usize {
        #[cfg(feature = "cuda")]
        return self.decode_graphs.as_ref().map_or(0, |g| g.captured());
        #[cfg(not(feature = "cuda"))]
        0
    }

    /// Drops the captured decode graphs (they keep their adapters' weights alive, and the kernels
    /// of the settings they were captured with): after unloading adapters, or a setting changed.
    pub fn clear_cuda_graphs(&self) {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.decode_graphs {
            g.clear();
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty KV cache: paged in the model's pool on the GPU, contiguous per layer otherwise.
    pub fn new_cache(&self) -> KvCache {
        match &self.kv_pool {
            Some(pool) => KvCache::paged(pool.clone()),
            None => KvCache::new(self.layers.len()),
        }
    }

    /// Every linear of the model, in order, with its module path.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .chain(std::iter::once(&self.lm_head))
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Linear `which` of decoder layer `layer` (panics past [`Self::num_layers`]).
    pub fn layer_linear(&self, layer: usize, which: LayerLinear) -> &Linear {
        self.layers[layer].linear(which)
    }

    /// The RMSNorm weight before the attention (`input_layernorm`) or before the MLP
    /// (`post_attention_layernorm`) of decoder layer `layer`.
    pub fn layer_norm_weight(&self, layer: usize, post_attention: bool) -> &Tensor {
        let l = &self.layers[layer];
        if post_attention {
            &l.post_attention_norm
        } else {
            &l.input_norm
        }
    }

    /// The final RMSNorm weight (before the LM head).
    pub fn final_norm_weight(&self) -> &Tensor {
        &self.norm
    }

    /// The LM head (the tied input embeddings when the config ties them).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// Whether the LM head is stored in the compute dtype (not quantized).
    pub fn lm_head_is_dense(&self) -> bool {
        self.lm_head.base.dense_weight().is_some()
    }

    /// Whether the LM head is the input embedding table itself (tied and not quantized: a
    /// quantized head of a tied model is a copy beside the table).
    pub fn lm_head_is_embedding_table(&self) -> bool {
        self.config.tie_word_embeddings && self.lm_head_is_dense()
    }

    /// The LM head's weight while it is still in the compute dtype; an error once quantized.
    pub(crate) fn dense_lm_head(&self) -> Result<Tensor> {
        self.lm_head
            .base
            .dense_weight()
            .cloned()
            .ok_or_else(|| ModelError::Request("the LM head is already quantized".into()))
    }

    /// Quantizes the LM head (the output projection) with `method` too, a load-time method.
    /// bitsandbytes, PEFT, LoRAX and lorq by default keep it in the compute dtype; torchao's
    /// `quantize_` and gpt-fast's int4 quantize it with the other linears (GPTQModel:
    /// `lm_head=True`). On Llama-3-8B it is 1.05 GB of bf16, a fifth of what a 4-bit decode step
    /// reads. With tied embeddings the head becomes a quantized copy; the input embeddings stay.
    pub fn quantize_lm_head(&mut self, method: QuantMethod) -> Result<()> {
        if !method.is_jit() {
            return Err(ModelError::Request(format!(
                "the LM head can only be quantized with a load-time method, not {}",
                method.name()
            )));
        }
        let w = self.dense_lm_head()?;
        self.lm_head.base = quantize_weight(method, "lm_head.weight", &w)?;
        tracing::info!("LM head quantized with {}", method.name());
        Ok(())
    }

    /// RoPE `(cos, sin)` tables `[len, head_dim/2]` for positions `start..start+len`.
    pub fn rope_tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        self.rope.tables(start, len)
    }

    /// The sliding-window size of decoder layer `layer`, if it has one.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.layers[layer].window
    }

    /// The token embeddings `[ids, hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let c = &self.config;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::Request(format!(
                "token id {bad} is outside the vocabulary (size {})",
                c.vocab_size
            )));
        }
        let t = Tensor::from_vec(ids.to_vec(), ids.len(), &self.device)?;
        Ok(self.embed_tokens.index_select(&t, 0)?)
    }

    /// Decoder layer `layer` alone over independent sequences that start at position 0: `x` holds
    /// their hidden states `[Σ lens, hidden]` one after the other; every linear goes through
    /// `apply` (e.g. the quantizers' calibration, which sees each linear's input). The same code
    /// as [`Self::forward`].
    pub fn forward_layer(
        &self,
        layer: usize,
        x: &Tensor,
        lens: &[usize],
        apply: &mut ApplyLinear<'_>,
    ) -> Result<Tensor> {
        let l = self.layers.get(layer).ok_or_else(|| {
            ModelError::Request(format!(
                "layer {layer} does not exist ({} layers)",
                self.layers.len()
            ))
        })?;
        let mut spans = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &n in lens {
            spans.push((at, n));
            at += n;
        }
        if at != x.dim(0)? {
            return Err(ModelError::Request(format!(
                "sequence lengths add up to {at} rows, the hidden states have {}",
                x.dim(0)?
            )));
        }
        let ropes = lens
            .iter()
            .map(|&n| self.rope.tables(0, n))
            .collect::<Result<Vec<_>>>()?;
        let mut caches: Vec<KvCache> = lens.iter().map(|_| KvCache::new(1)).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        l.forward(&self.config, x.clone(), &spans, &ropes, &mut refs, 0, apply)
    }

    /// Bytes of all weights (embedding counted once when tied to a dense LM head).
    pub fn weight_bytes(&self) -> usize {
        let t = |x: &Tensor| x.elem_count() * x.dtype().size_in_bytes();
        let mut total = t(&self.embed_tokens) + t(&self.norm);
        for l in &self.layers {
            total += t(&l.input_norm) + t(&l.post_attention_norm);
        }
        for lin in self.linears() {
            if lin.path == "lm_head" && self.lm_head_is_embedding_table() {
                continue;
            }
            total += lin.base.bytes() + lin.bias.as_ref().map_or(0, t);
        }
        total
    }

    /// Checks that every module of `adapter` exists in this model with fitting shapes.
    pub fn check_adapter(&self, adapter: &LoraAdapter) -> Result<()> {
        let err = |message: String| ModelError::AdapterMismatch {
            adapter: adapter.path.clone(),
            message,
        };
        for (path, m) in adapter.modules() {
            let lin = self.linears().find(|l| &l.path == path).ok_or_else(|| {
                err(format!(
                    "targets module {path:?}, which this model ({}) does not have",
                    self.config.architecture.name()
                ))
            })?;
            if m.in_features() != lin.in_features() || m.out_features() != lin.out_features() {
                return Err(err(format!(
                    "module {path}: the adapter's delta [out {}, in {}] does not fit the base weight [out {}, in {}]",
                    m.out_features(),
                    m.in_features(),
                    lin.out_features(),
                    lin.in_features()
                )));
            }
        }
        Ok(())
    }

    /// One batched step over sequences of different lengths (prefill and decode mixed).
    /// Returns, per item, f32 logits `[n, vocab]` (n = 1 for `Last`, the new-token count for `All`).
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Tensor>> {
        self.forward_step(items)?.into_items()
    }

    /// [`LlamaModel::forward`] with the logits left as the LM head wrote them (one tensor, the
    /// model's dtype, on its device), for a caller that picks tokens there.
    pub fn forward_step(&self, items: &mut [BatchItem<'_>]) -> Result<StepLogits> {
        if items.is_empty() {
            let none = Tensor::zeros((0, self.config.vocab_size), self.dtype, &self.device)?;
            return StepLogits::new(none, &[]);
        }
        let paged = items.iter().filter(|it| it.cache.is_paged()).count();
        if paged > 0 && paged < items.len() {
            return Err(ModelError::Request(
                "a batch mixes paged and contiguous KV caches; make every cache with new_cache()"
                    .into(),
            ));
        }
        let c = &self.config;
        let mut ids = Vec::new();
        let mut adapters = BatchAdapters::new();
        let mut spans = Vec::with_capacity(items.len()); // (row start, new tokens, cache offset)
        for it in items.iter() {
            if it.tokens.is_empty() {
                return Err(ModelError::Request("a batch item has no tokens".into()));
            }
            if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::Request(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    c.vocab_size
                )));
            }
            spans.push((ids.len(), it.tokens.len(), it.cache.len()));
            ids.extend_from_slice(it.tokens);
            adapters.push(it.tokens.len(), it.adapter.clone());
        }
        #[cfg(feature = "cuda")]
        if paged == items.len() && crate::decode_graph::is_decode_step(items) {
            if let Some(out) = self.decode_graphed(items, &adapters)? {
                return Ok(out);
            }
        }
        let rows = ids.len();
        let ids = Tensor::from_vec(ids, rows, &self.device)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        let eps = c.rms_norm_eps as f32;
        if paged > 0 {
            x = self.layers_paged(x, items, &spans, &adapters)?;
        } else {
            let ropes = spans
                .iter()
                .map(|&(_, n, off)| self.rope.tables(off, n))
                .collect::<Result<Vec<_>>>()?;
            let row_spans: Vec<(usize, usize)> = spans.iter().map(|&(s, n, _)| (s, n)).collect();
            let mut caches: Vec<&mut KvCache> = items.iter_mut().map(|it| &mut *it.cache).collect();
            let mut apply = |_: LayerLinear, lin: &Linear, h: &Tensor| lin.forward(h, &adapters);
            for (li, layer) in self.layers.iter().enumerate() {
                x = layer.forward(c, x, &row_spans, &ropes, &mut caches, li, &mut apply)?;
            }
        }
        for (it, &(_, n, _)) in items.iter_mut().zip(&spans) {
            it.cache.advance(n);
        }
        // Only the rows whose logits are wanted go through the norm and the LM head.
        let mut pick = Vec::new();
        let mut head_adapters = BatchAdapters::new();
        let mut counts = Vec::with_capacity(items.len());
        for (it, &(start, n, _)) in items.iter().zip(&spans) {
            let range = match it.logits {
                LogitsWanted::Last => start + n - 1..start + n,
                LogitsWanted::All => start..start + n,
            };
            counts.push(range.len());
            head_adapters.push(range.len(), it.adapter.clone());
            pick.extend(range.map(|r| r as u32));
        }
        let x = if pick.len() == rows {
            x
        } else {
            let n = pick.len();
            x.index_select(&Tensor::from_vec(pick, n, &self.device)?, 0)?
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        StepLogits::new(self.lm_head.forward(&x, &head_adapters)?, &counts)
    }
}

/// `Some(())` when CUDA graphs can capture `device`'s work: a GPU whose context does not order
/// streams with per-buffer events (a capture cannot wait on events recorded before it; lorq's
/// CLI turns the tracking off, every buffer living on candle's one stream per GPU).
#[cfg(feature = "cuda")]
fn graphs_usable(device: &Device) -> Option<()> {
    let Device::Cuda(cuda) = device else {
        return None;
    };
    if cuda
        .cuda_stream()
        .context()
        .is_managing_stream_synchronization()
    {
        tracing::debug!("CUDA graphs off: the device tracks events across streams");
        return None;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::LayerLinear;

    #[test]
    fn layer_linears_by_peft_name_or_module_path() {
        let names: Vec<&str> = LayerLinear::ALL.iter().map(|w| w.name()).collect();
        assert_eq!(
            names,
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj"
            ]
        );
        for w in LayerLinear::ALL {
            assert_eq!(LayerLinear::from_name(w.name()), Some(w));
            assert_eq!(LayerLinear::from_name(w.module()), Some(w));
        }
        assert_eq!(LayerLinear::from_name("lm_head"), None);
        assert_eq!(LayerLinear::from_name("proj"), None);
        assert_eq!(LayerLinear::from_name(""), None);
    }
}
