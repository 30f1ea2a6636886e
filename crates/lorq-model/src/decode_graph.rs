//! Decode steps replayed as CUDA graphs: a decode step of a batch (one new token per sequence,
//! last logits wanted) is the same ~500 launches every time, so after one eager run of a batch
//! layout the next step captures them (`lorq_quant::cuda::graph`) and later steps replay the
//! graph: one launch instead of hundreds, no host time per kernel, no gaps between kernels.
//! Adapters stay active: their launch tables are found by content, so the capture sees them.
//!
//! A graph is fixed to its batch layout: the batch size and each row's adapter, the context
//! capacity (attention is sized for a power of two of the longest context; shorter contexts
//! leave partitions empty), and the KV pool's pages (the pool reallocates when it grows, which
//! drops every graph). The step's tokens, positions, slots and block tables go into the graph's
//! input buffers before each replay. Batches that change every step run eagerly: a layout is
//! captured only on its second step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use candle_core::{DType, Device, Tensor};
use lorq_lora::{BatchAdapters, LoraAdapter};
use lorq_quant::cuda::graph::{capture, write_u32, CapturedGraph};

use crate::error::{ModelError, Result};
use crate::llama::{BatchItem, LlamaModel, LogitsWanted};
use crate::paged_forward::MetaDims;
use crate::paged_kv::BLOCK_SIZE;
use crate::step_logits::StepLogits;

/// The smallest context capacity a graph is captured for (tokens).
const MIN_CONTEXT: usize = 256;
/// Graphs kept per model before the set starts over (each holds its intermediate buffers and
/// keeps its adapters alive).
const MAX_GRAPHS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GraphKey {
    /// Per row: the adapter's address, 0 for the base model.
    adapters: Vec<usize>,
    dims: MetaDims,
}

enum Entry {
    /// Ran eagerly; captured on its next step. `retried`: a capture of it already failed once
    /// (something it needed was missing, e.g. a launch table evicted between the eager step and
    /// the capture: that step ran eagerly and restored it, so the capture is tried once more).
    Seen {
        retried: bool,
    },
    Captured(Box<DecodeGraph>),
    /// The capture failed twice (a kernel path that cannot be captured): always eager.
    Failed,
}

struct DecodeGraph {
    graph: CapturedGraph,
    /// Inputs, written before each replay: token ids, and the step layout.
    ids: Tensor,
    meta: Tensor,
    /// `[batch, vocab]` as the LM head writes it (the model's dtype), rewritten by each replay.
    logits: Tensor,
    /// Read by the graph: the RoPE tables stay alive with it (the adapters' weights are kept by
    /// the capture itself).
    _rope: (Tensor, Tensor),
    /// The adapters of the key: a weak reference keeps an adapter's address from being reused
    /// by another one while this entry exists, and tells when one was dropped (the entry is
    /// then stale: rebuilt if the layout comes back).
    adapters: Vec<Weak<LoraAdapter>>,
}

/// A model's decode graphs.
#[derive(Default)]
pub(crate) struct DecodeGraphs {
    state: Mutex<GraphSet>,
}

#[derive(Default)]
struct GraphSet {
    /// The KV pool's capacity the graphs were captured against.
    pool_blocks: usize,
    entries: HashMap<GraphKey, Entry>,
}

impl std::fmt::Debug for DecodeGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.state.lock().map(|s| s.entries.len()).unwrap_or(0);
        write!(f, "DecodeGraphs({n} layouts)")
    }
}

impl DecodeGraphs {
    /// Batch layouts that run as a captured graph.
    pub(crate) fn captured(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.entries
            .values()
            .filter(|e| matches!(e, Entry::Captured(_)))
            .count()
    }

    /// Drops every graph (e.g. after adapters were unloaded, to free the weights they keep).
    pub(crate) fn clear(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.entries.clear();
    }
}

/// Whether `items` is a decode step a graph can run: paged caches, one new token and the last
/// logits per sequence.
pub(crate) fn is_decode_step(items: &[BatchItem<'_>]) -> bool {
    items
        .iter()
        .all(|it| it.cache.is_paged() && it.tokens.len() == 1 && it.logits == LogitsWanted::Last)
}

impl LlamaModel {
    /// The decode step `items` through a CUDA graph, or `None` when this step runs eagerly (a
    /// layout's first step, or one whose capture failed). Advances the caches when it ran.
    pub(crate) fn decode_graphed(
        &self,
        items: &mut [BatchItem<'_>],
        adapters: &BatchAdapters,
    ) -> Result<Option<StepLogits>> {
        let (Some(graphs), Some(pool), Device::Cuda(cuda)) =
            (&self.decode_graphs, &self.kv_pool, &self.device)
        else {
            return Ok(None);
        };
        let rows = items.len();
        let longest = items.iter().map(|it| it.cache.len() + 1).max().unwrap_or(1);
        let capacity = longest.next_power_of_two().max(MIN_CONTEXT);
        let spans: Vec<(usize, usize, usize)> = items
            .iter()
            .enumerate()
            .map(|(i, it)| (i, 1, it.cache.len()))
            .collect();
        // Takes the new tokens' blocks first: the pool may grow (and move) here.
        let meta = self.paged_meta(items, &spans, capacity / BLOCK_SIZE, capacity)?;
        let ids: Vec<u32> = items.iter().map(|it| it.tokens[0]).collect();
        let key = GraphKey {
            adapters: items
                .iter()
                .map(|it| it.adapter.as_ref().map_or(0, |a| Arc::as_ptr(a) as usize))
                .collect(),
            dims: meta.dims,
        };
        let mut set = graphs.state.lock().unwrap_or_else(|e| e.into_inner());
        let pool_blocks = pool.usage().0;
        if set.pool_blocks != pool_blocks {
            // The pages moved: every graph writes to the old ones.
            set.entries.clear();
            set.pool_blocks = pool_blocks;
        }
        let stale = matches!(
            set.entries.get(&key),
            Some(Entry::Captured(g)) if g.adapters.iter().any(|a| a.strong_count() == 0)
        );
        if stale {
            set.entries.remove(&key);
        }
        match set.entries.get(&key) {
            None => {
                if set.entries.len() >= MAX_GRAPHS {
                    set.entries.clear();
                }
                set.entries.insert(key, Entry::Seen { retried: false });
                return Ok(None);
            }
            Some(Entry::Failed) => return Ok(None),
            Some(Entry::Captured(_)) => {}
            Some(&Entry::Seen { retried }) => {
                let ids_buf = Tensor::zeros(rows, DType::U32, &self.device)?;
                let meta_buf = Tensor::zeros(meta.data.len(), DType::U32, &self.device)?;
                // Filled before each replay below (a capture runs nothing).
                let rope = self.rope.tables(0, capacity)?;
                let captured = capture(cuda, || -> Result<Tensor> {
                    let x = lorq_quant::cuda::fused_ops::embed_rows(&self.embed_tokens, &ids_buf)?;
                    let x = self.layers_on_meta(x, &meta_buf, meta.dims, adapters)?;
                    let x =
                        candle_nn::ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps as f32)?;
                    self.lm_head.forward(&x, adapters)
                });
                let entry = match captured {
                    Ok((graph, logits)) => {
                        tracing::debug!("decode batch of {rows}: captured a CUDA graph");
                        Entry::Captured(Box::new(DecodeGraph {
                            graph,
                            ids: ids_buf,
                            meta: meta_buf,
                            logits,
                            _rope: rope,
                            adapters: items
                                .iter()
                                .filter_map(|it| it.adapter.as_ref().map(Arc::downgrade))
                                .collect(),
                        }))
                    }
                    Err(e) if !retried => {
                        tracing::debug!(
                            "decode batch of {rows}: CUDA graph capture failed ({e}); this step \
                             runs eagerly, the next one captures again"
                        );
                        Entry::Seen { retried: true }
                    }
                    Err(e) => {
                        tracing::warn!(
                            "decode batch of {rows}: CUDA graph capture failed twice ({e}); this \
                             batch layout runs without a graph"
                        );
                        Entry::Failed
                    }
                };
                let failed = !matches!(entry, Entry::Captured(_));
                set.entries.insert(key.clone(), entry);
                if failed {
                    return Ok(None);
                }
            }
        }
        let Some(Entry::Captured(g)) = set.entries.get(&key) else {
            return Err(ModelError::Request(
                "decode graph: internal state lost its entry".into(),
            ));
        };
        write_u32(&g.ids, &ids)?;
        write_u32(&g.meta, &meta.data)?;
        g.graph.replay()?;
        // The graph rewrites its logits at the next replay: hand out a copy.
        let logits = g.logits.copy()?;
        drop(set);
        for it in items.iter_mut() {
            it.cache.advance(1);
        }
        Ok(Some(StepLogits::new(logits, &vec![1; rows])?))
    }
}
