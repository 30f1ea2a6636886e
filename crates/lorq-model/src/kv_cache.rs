use std::sync::Arc;

use candle_core::Tensor;

use crate::error::Result;
use crate::paged_kv::{PagedPool, PagedSeq};

/// Keys and values of one decoder layer for one sequence: `[kv_heads, capacity, head_dim]`,
/// grown by doubling so appends are amortised O(new tokens).
#[derive(Debug, Clone, Default)]
struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// Where a cache keeps its keys and values.
#[derive(Debug)]
enum Store {
    /// Per layer, its own growing tensors (the CPU, and training on any device).
    Contiguous(Vec<LayerCache>),
    /// Blocks of the model's paged pool (a model on the GPU).
    Paged(PagedSeq),
}

/// The KV cache of one sequence, all layers. Not `Clone`: appends write in place, so a copy
/// would alias the same buffers. A paged cache returns its blocks to the pool when dropped.
#[derive(Debug)]
pub struct KvCache {
    store: Store,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            store: Store::Contiguous(vec![LayerCache::default(); num_layers]),
            len: 0,
        }
    }

    /// An empty cache whose pages come from `pool`.
    pub fn paged(pool: Arc<PagedPool>) -> Self {
        Self {
            store: Store::Paged(PagedSeq {
                pool,
                blocks: Vec::new(),
            }),
            len: 0,
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn paged_seq(&mut self) -> Option<&mut PagedSeq> {
        match &mut self.store {
            Store::Paged(p) => Some(p),
            Store::Contiguous(_) => None,
        }
    }

    pub fn is_paged(&self) -> bool {
        matches!(self.store, Store::Paged(_))
    }

    /// Tokens already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes this sequence holds (allocated capacity, all layers, keys and values).
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Contiguous(layers) => layers
                .iter()
                .flat_map(|l| [&l.k, &l.v])
                .flatten()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum(),
            Store::Paged(p) => p.blocks.len() * p.pool.block_bytes(),
        }
    }

    /// Appends `k`, `v` (`[kv_heads, new, head_dim]`) to `layer` and returns all keys and values
    /// `[kv_heads, len + new, head_dim]`. The sequence length advances once every layer is done,
    /// through [`KvCache::advance`].
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let new = k.dim(1)?;
        let total = self.len + new;
        let Store::Contiguous(layers) = &mut self.store else {
            return Err(crate::error::ModelError::Request(
                "a paged KV cache is appended to by the paged attention kernels only".into(),
            ));
        };
        let entry = &mut layers[layer];
        let k_all = grow_and_set(&mut entry.k, k, self.len, total)?;
        let v_all = grow_and_set(&mut entry.v, v, self.len, total)?;
        Ok((k_all, v_all))
    }

    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }
}

fn grow_and_set(
    slot: &mut Option<Tensor>,
    new: &Tensor,
    len: usize,
    total: usize,
) -> Result<Tensor> {
    let (heads, _, hd) = new.dims3()?;
    let cap = slot.as_ref().map_or(0, |t| t.dim(1).unwrap_or(0));
    if cap < total {
        let new_cap = total.max(cap * 2).max(32).next_power_of_two();
        let bigger = Tensor::zeros((heads, new_cap, hd), new.dtype(), new.device())?;
        if let Some(old) = slot.as_ref() {
            if len > 0 {
                bigger.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
        }
        *slot = Some(bigger);
    }
    let buf = slot.as_ref().expect("allocated above");
    buf.slice_set(&new.contiguous()?, 1, len)?;
    Ok(buf.narrow(1, 0, total)?)
}
