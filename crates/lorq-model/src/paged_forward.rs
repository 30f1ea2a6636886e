//! The decoder layers of a batched step on the GPU over the paged KV cache: per layer one launch
//! for RoPE + the append of every new token's key and value and one for the attention of every
//! new token of the batch (its split merged in the same launch) — a decode step does all three in
//! the attention launch — and the fused residual-add + RMSNorm and SiLU·mul
//! kernels, instead of a loop over the sequences of candle ops. The batch layout (positions,
//! slots, block tables) is uploaded once per step and shared by every layer. The contiguous path
//! in `llama.rs` (the CPU, and training) is the reference.

use candle_core::{DType, Device, Tensor};
use lorq_lora::BatchAdapters;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::llama::{BatchItem, LlamaModel};

/// The sizes of a paged step's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct MetaDims {
    /// New tokens of the step.
    pub rows: usize,
    /// Sequences (rows of the block tables).
    pub seqs: usize,
    /// Block-table entries per sequence.
    pub max_blocks: usize,
    /// The longest context a row attends to (sizes the attention split).
    pub max_ctx: usize,
    /// Every sequence has at most one new token (a decode step): the attention launch also
    /// does the RoPE and the KV append.
    pub decode: bool,
    /// Query tiles of the prefill attention (`paged_attention::prefill_tiles`); 0: one
    /// attention block per row (decode steps, f32 caches, kernels switched off).
    pub tiles: usize,
}

/// A paged step's layout on the host: positions, sequences and slots of every new token, the
/// block tables padded to `dims.max_blocks`, then the attention's zeroed merge tickets
/// (`paged_attention::tickets_needed` of them; each attention launch leaves them zeroed), the
/// GEMV norm tails' ticket, then `dims.tiles` prefill query tiles (first row, rows).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct PagedMeta {
    pub data: Vec<u32>,
    pub dims: MetaDims,
}

/// Whether a model of `config` in `dtype` on `device` runs the paged GPU path.
pub(crate) fn supports_paged(config: &ModelConfig, dtype: DType, device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    {
        use lorq_quant::cuda::paged_attention::HEAD_DIMS;
        device.is_cuda()
            && HEAD_DIMS.contains(&config.head_dim)
            && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            && config.num_key_value_heads > 0
            && config
                .num_attention_heads
                .is_multiple_of(config.num_key_value_heads)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (config, dtype, device);
        false
    }
}

impl LlamaModel {
    /// Every decoder layer over `x` (`[rows, hidden]`) with paged caches; `spans[i]` = (first
    /// row, new tokens, cached tokens) of item `i`. Blocks for the new tokens are taken from the
    /// pool here; the caches' lengths advance afterwards (the caller).
    #[cfg(not(feature = "cuda"))]
    pub(crate) fn layers_paged(
        &self,
        _x: Tensor,
        _items: &mut [BatchItem<'_>],
        _spans: &[(usize, usize, usize)],
        _adapters: &BatchAdapters,
    ) -> Result<Tensor> {
        Err(ModelError::Request(
            "paged KV caches need a CUDA build (the `cuda` feature) and a model on the GPU".into(),
        ))
    }

    /// Every decoder layer over `x` (`[rows, hidden]`) with paged caches; `spans[i]` = (first
    /// row, new tokens, cached tokens) of item `i`. Blocks for the new tokens are taken from the
    /// pool here; the caches' lengths advance afterwards (the caller).
    #[cfg(feature = "cuda")]
    pub(crate) fn layers_paged(
        &self,
        x: Tensor,
        items: &mut [BatchItem<'_>],
        spans: &[(usize, usize, usize)],
        adapters: &BatchAdapters,
    ) -> Result<Tensor> {
        let meta = self.paged_meta(items, spans, 1, 0)?;
        let data = Tensor::from_slice(&meta.data, meta.data.len(), &self.device)?;
        self.layers_on_meta(x, &data, meta.dims, adapters)
    }

    /// The shape of one layer's KV pages.
    #[cfg(feature = "cuda")]
    fn page_shape(&self) -> lorq_quant::cuda::paged_attention::PageShape {
        let c = &self.config;
        lorq_quant::cuda::paged_attention::PageShape {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            block_size: crate::paged_kv::BLOCK_SIZE,
        }
    }

    /// The host side of a paged step: takes the blocks the new tokens need from the pool and
    /// lays out positions, sequences, slots of every new token, then the block tables padded to
    /// at least `min_blocks` per sequence; the longest context is at least `min_ctx`. (A CUDA
    /// graph asks for fixed sizes, so that its replays all read the same shapes.)
    #[cfg(feature = "cuda")]
    pub(crate) fn paged_meta(
        &self,
        items: &mut [BatchItem<'_>],
        spans: &[(usize, usize, usize)],
        min_blocks: usize,
        min_ctx: usize,
    ) -> Result<PagedMeta> {
        use lorq_quant::cuda::paged_attention::{
            prefill_tile_tokens, prefill_tiles, tickets_needed,
        };
        let pool = self.kv_pool.as_ref().ok_or_else(|| {
            ModelError::Request("this model has no paged KV pool (not on a GPU)".into())
        })?;
        let rows: usize = spans.iter().map(|s| s.1).sum();
        let mut row_pos = Vec::with_capacity(rows);
        let mut row_seq = Vec::with_capacity(rows);
        let mut row_slot = Vec::with_capacity(rows);
        let mut max_ctx = min_ctx;
        let mut tables = Vec::with_capacity(items.len());
        for (i, (it, &(_, n, off))) in items.iter_mut().zip(spans).enumerate() {
            let seq = it.cache.paged_seq().ok_or_else(|| {
                ModelError::Request("a batch mixes paged and contiguous KV caches".into())
            })?;
            if !std::sync::Arc::ptr_eq(&seq.pool, pool) {
                return Err(ModelError::Request(
                    "a KV cache belongs to another model's pool; make it with this model's new_cache()"
                        .into(),
                ));
            }
            seq.ensure(off + n)?;
            for p in off..off + n {
                row_pos.push(p as u32);
                row_seq.push(i as u32);
                row_slot.push(seq.slot(p));
            }
            max_ctx = max_ctx.max(off + n);
            tables.push(seq.blocks.clone());
        }
        if rows > 65_535 {
            return Err(ModelError::Request(format!(
                "a step of {rows} new tokens is more than the 65535 the attention grid takes; \
                 split the prefill into chunks"
            )));
        }
        let max_blocks = tables
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(1)
            .max(min_blocks)
            .max(1);
        // One upload per step: positions, sequences, slots, then the padded block tables.
        let mut data = Vec::with_capacity(3 * rows + items.len() * max_blocks);
        data.extend_from_slice(&row_pos);
        data.extend_from_slice(&row_seq);
        data.extend_from_slice(&row_slot);
        for t in &tables {
            data.extend_from_slice(t);
            data.extend(std::iter::repeat_n(0, max_blocks - t.len()));
        }
        // Zeroed tickets: the attention's, then the GEMV norm tails' one.
        let c = &self.config;
        data.extend(std::iter::repeat_n(
            0,
            tickets_needed(rows, c.num_attention_heads, c.num_key_value_heads) + 1,
        ));
        let decode = spans.iter().all(|s| s.1 <= 1);
        // Prefill steps: the rows of each sequence in query tiles (they share its keys). A decode
        // row of a mixed step is a one-row tile whose block walks its whole context unsplit, so
        // a step whose decode rows reach further back than its longest prompt keeps one block
        // per row (the decode kernel splits long contexts).
        let end = |one_row: bool| {
            spans
                .iter()
                .filter(|s| (s.1 <= 1) == one_row)
                .map(|s| s.1 + s.2)
                .max()
                .unwrap_or(0)
        };
        let tiles = match prefill_tile_tokens(self.dtype, self.page_shape()) {
            Some(tokens) if !decode && end(true) <= end(false) => {
                prefill_tiles(spans.iter().map(|s| (s.0, s.1)), tokens)
            }
            _ => Vec::new(),
        };
        data.extend_from_slice(&tiles);
        Ok(PagedMeta {
            data,
            dims: MetaDims {
                rows,
                seqs: items.len(),
                max_blocks,
                max_ctx,
                decode,
                tiles: tiles.len() / 2,
            },
        })
    }

    /// The device side of a paged step: every decoder layer over `x` with the step's layout
    /// `meta` (a `u32` GPU tensor laid out by [`Self::paged_meta`]). Queues GPU work only (no
    /// upload, no read-back), so a CUDA graph can capture it.
    #[cfg(feature = "cuda")]
    pub(crate) fn layers_on_meta(
        &self,
        mut x: Tensor,
        meta: &Tensor,
        dims: MetaDims,
        adapters: &BatchAdapters,
    ) -> Result<Tensor> {
        use crate::linear::Linear;
        use lorq_quant::cuda::fp8_gemm::{with_offered_activations, QuantizedActivations};
        use lorq_quant::cuda::fused_ops::{
            add_rms_norm, add_rms_norm_fp8, silu_mul, silu_mul_fp8, AddNorm, NormHead,
        };
        use lorq_quant::cuda::paged_attention::{
            attention, decode_attention, multiprocessors, prefill_attention, rope_append,
            tickets_needed, NewTokens, PagedBatch,
        };
        let c = &self.config;
        let pool = self.kv_pool.as_ref().ok_or_else(|| {
            ModelError::Request("this model has no paged KV pool (not on a GPU)".into())
        })?;
        let Device::Cuda(cuda) = &self.device else {
            return Err(ModelError::Request(
                "paged KV caches need the model on a GPU".into(),
            ));
        };
        let MetaDims {
            rows,
            seqs,
            max_blocks,
            max_ctx,
            decode,
            tiles,
        } = dims;
        let row_pos = meta.narrow(0, 0, rows)?;
        let row_seq = meta.narrow(0, rows, rows)?;
        let row_slot = meta.narrow(0, 2 * rows, rows)?;
        let block_tables = meta
            .narrow(0, 3 * rows, seqs * max_blocks)?
            .reshape((seqs, max_blocks))?;
        let attention_tickets = tickets_needed(rows, c.num_attention_heads, c.num_key_value_heads);
        let tickets = meta.narrow(0, 3 * rows + seqs * max_blocks, attention_tickets)?;
        let norm_ticket = meta.narrow(0, 3 * rows + seqs * max_blocks + attention_tickets, 1)?;
        let prefill_tiles = (tiles > 0)
            .then(|| {
                meta.narrow(
                    0,
                    3 * rows + seqs * max_blocks + attention_tickets + 1,
                    2 * tiles,
                )
            })
            .transpose()?;
        let (cos, sin) = self.rope.tables(0, max_ctx)?;
        let batch = PagedBatch {
            row_pos: &row_pos,
            row_seq: &row_seq,
            row_slot: &row_slot,
            block_tables: &block_tables,
            max_keys: max_ctx,
            sms: multiprocessors(cuda)?,
            tickets: Some(&tickets),
        };
        let shape = self.page_shape();
        let eps = c.rms_norm_eps as f32;
        let fused = self.fused_ops;
        // Linears sharing an input: one launch where allowed, or one forward each.
        let group = |ls: &[&Linear], h: &Tensor| -> Result<Vec<Tensor>> {
            if self.grouped_matmuls {
                Linear::forward_group(ls, h, adapters)
            } else {
                ls.iter().map(|l| l.forward(h, adapters)).collect()
            }
        };
        // x + d, then RMSNorm with w: one fused kernel, or candle's add and rms_norm. Where the
        // projection reading the result (`next`) wants its rows' e4m3 codes (FP8 W8A8), the
        // fused kernel writes them too, and they go to the projection through `with_codes`.
        let add_norm = |x: &Tensor,
                        d: &Tensor,
                        w: &Tensor,
                        next: &Linear|
         -> Result<(Tensor, Tensor, Option<QuantizedActivations>)> {
            if !fused {
                let s = (x + d)?;
                let y = candle_nn::ops::rms_norm(&s, w, eps)?;
                return Ok((s, y, None));
            }
            if self.fp8_codes && next.base.gpu_wants_fp8_codes(x)? {
                if let Some((s, y, q)) = add_rms_norm_fp8(x, d, w, eps)? {
                    return Ok((s, y, Some(q)));
                }
            }
            let (s, y) = add_rms_norm(x, d, w, eps)?;
            Ok((s, y, None))
        };
        // `l(input)` with `residual + l(input)` and its RMSNorm with `w` in the same launch (one
        // row: the GEMV's last block runs the norm), where `l` and `next` (the projection reading
        // the norm) allow it; `None`: run `l` and `add_norm`.
        let linear_add_norm = |l: &Linear,
                               input: &Tensor,
                               residual: &Tensor,
                               w: &Tensor,
                               next: &Linear|
         -> Result<Option<(Tensor, Tensor)>> {
            if !fused || !self.norm_tails || next.base.gpu_wants_fp8_codes(residual)? {
                return Ok(None);
            }
            let tail = AddNorm {
                residual,
                weight: w,
                eps,
                ticket: &norm_ticket,
            };
            l.forward_add_norm(input, &tail, adapters)
        };
        // The residual add + RMSNorm run by the launch of the projections reading it (decode at
        // batch 1 on affine 4-bit weights: every block of the half2 GEMV norms the row itself),
        // under the same switch as the tails; `None`: run `add_norm` and the projections.
        let heads = fused && self.norm_tails && self.grouped_matmuls;
        // `f` (the projections reading `h`) with `h`'s e4m3 codes offered, where a kernel made them.
        fn with_codes<R>(
            h: &Tensor,
            codes: Option<QuantizedActivations>,
            f: impl FnOnce() -> Result<R>,
        ) -> Result<R> {
            match codes {
                Some(q) => with_offered_activations(h, q, f)?,
                None => f(),
            }
        }
        let mut carry = Carry::Nothing;
        for (li, layer) in self.layers.iter().enumerate() {
            let carried = std::mem::replace(&mut carry, Carry::Nothing);
            let qkv_ls = [&layer.q, &layer.k, &layer.v];
            let headed = match &carried {
                Carry::Delta(d) if heads => {
                    let nh = NormHead {
                        residual: &x,
                        delta: d,
                        weight: &layer.input_norm,
                        eps,
                    };
                    Linear::forward_group_norm_head(&qkv_ls, &nh, adapters)?
                }
                _ => None,
            };
            // One launch for q, k and v where the weights allow it (decode); one output each.
            let qkv = match headed {
                Some((s, qkv)) => {
                    x = s;
                    qkv
                }
                None => {
                    let (h, codes) = match carried {
                        Carry::Normed(h) => (h, None),
                        Carry::Nothing => {
                            (candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?, None)
                        }
                        Carry::Delta(d) => {
                            let (s, y, codes) = add_norm(&x, &d, &layer.input_norm, &layer.q)?;
                            x = s;
                            (y, codes)
                        }
                    };
                    with_codes(&h, codes, || group(&qkv_ls, &h))?
                }
            };
            let (q, k, v) = (
                qkv[0].contiguous()?,
                qkv[1].contiguous()?,
                qkv[2].contiguous()?,
            );
            let (kc, vc) = pool.layer(li);
            let layer_batch = PagedBatch {
                max_keys: layer.window.map_or(max_ctx, |w| w.min(max_ctx)),
                ..batch
            };
            let (b, w) = (&layer_batch, layer.window);
            let new = NewTokens {
                q: &q,
                k: &k,
                v: &v,
                cos: &cos,
                sin: &sin,
            };
            let attn = if decode {
                decode_attention(new, b, &kc, &vc, shape, w)?
            } else {
                let q = rope_append(new, &batch, &kc, &vc, shape)?;
                match &prefill_tiles {
                    Some(t) => prefill_attention(&q, &kc, &vc, b, t, shape, w)?,
                    None => attention(&q, &kc, &vc, b, shape, w)?,
                }
            };
            let post_norm = &layer.post_attention_norm;
            let mlp_in = match linear_add_norm(&layer.o, &attn, &x, post_norm, &layer.gate)? {
                Some((s, h)) => {
                    x = s;
                    MlpInput::Normed(h, None)
                }
                None => {
                    let o = layer.o.forward(&attn, adapters)?;
                    let headed = if heads {
                        let nh = NormHead {
                            residual: &x,
                            delta: &o,
                            weight: post_norm,
                            eps,
                        };
                        Linear::silu_mul_pair_norm_head(&layer.gate, &layer.up, &nh, adapters)?
                    } else {
                        None
                    };
                    match headed {
                        Some((s, act)) => {
                            x = s;
                            MlpInput::Activated(act)
                        }
                        None => {
                            let (s, h, codes) = add_norm(&x, &o, post_norm, &layer.gate)?;
                            x = s;
                            MlpInput::Normed(h, codes)
                        }
                    }
                }
            };
            // SiLU(gate)·up, with its e4m3 codes where down_proj wants them (FP8 W8A8).
            let act_codes =
                |gate: &Tensor, up: &Tensor| -> Result<(Tensor, Option<QuantizedActivations>)> {
                    if self.fp8_codes && layer.down.base.gpu_wants_fp8_codes(gate)? {
                        if let Some((y, q)) = silu_mul_fp8(gate, up)? {
                            return Ok((y, Some(q)));
                        }
                    }
                    Ok((silu_mul(gate, up)?, None))
                };
            let (act, codes) = match mlp_in {
                MlpInput::Activated(act) => (act, None),
                MlpInput::Normed(h, codes) => {
                    // Decode at batch 1 on dense or affine 4-bit weights: the two projections
                    // and SiLU·mul in one launch.
                    let paired = if fused && codes.is_none() {
                        Linear::silu_mul_pair(&layer.gate, &layer.up, &h, adapters)?
                    } else {
                        None
                    };
                    match paired {
                        Some(act) => (act, None),
                        None => {
                            let gate_up =
                                with_codes(&h, codes, || group(&[&layer.gate, &layer.up], &h))?;
                            let (gate, up) = (&gate_up[0], &gate_up[1]);
                            if fused {
                                act_codes(gate, up)?
                            } else {
                                ((gate.silu()? * up)?, None)
                            }
                        }
                    }
                }
            };
            let tail = match self.layers.get(li + 1) {
                Some(next) => linear_add_norm(&layer.down, &act, &x, &next.input_norm, &next.q)?,
                None => None,
            };
            carry = match tail {
                Some((s, h)) => {
                    x = s;
                    Carry::Normed(h)
                }
                None => Carry::Delta(with_codes(&act, codes, || {
                    layer.down.forward(&act, adapters)
                })?),
            };
        }
        if let Carry::Delta(d) = carry {
            x = (x + d)?;
        }
        Ok(x)
    }
}

/// The MLP's input after the attention block: its normed row (with FP8 codes where the norm made
/// them), or already SiLU(gate)·up where the gate/up launch ran the norm itself.
#[cfg(feature = "cuda")]
enum MlpInput {
    Normed(
        Tensor,
        Option<lorq_quant::cuda::fp8_gemm::QuantizedActivations>,
    ),
    Activated(Tensor),
}

/// What a layer of the paged forward hands the next one besides the residual stream.
#[cfg(feature = "cuda")]
enum Carry {
    /// Nothing: the next layer norms the residual stream itself (the first layer).
    Nothing,
    /// The MLP's output, added into the residual stream by the next layer's fused norm.
    Delta(Tensor),
    /// The next layer's normed input already: the down projection ran the residual add and the
    /// norm as its tail.
    Normed(Tensor),
}
