//! The paged KV pool of a model on the GPU: per decoder layer one K and one V tensor
//! `[num_blocks, kv_heads, block_size, head_dim]`, shared by every sequence; a sequence holds a
//! block table (block ids, the same for every layer) and returns its blocks when its cache drops.
//! The pool grows by doubling (the old pages are copied into the bigger tensors), so memory is
//! spent only on tokens actually cached, and sequences of any length share it without copying.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Tokens per block (vLLM's default).
pub const BLOCK_SIZE: usize = 16;

/// The pages of every layer and the free block list.
struct PoolState {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    capacity: usize,
    free: Vec<u32>,
}

/// A model's KV pages on one device.
pub struct PagedPool {
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    state: Mutex<PoolState>,
}

impl std::fmt::Debug for PagedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (cap, free) = self.usage();
        write!(f, "PagedPool({cap} blocks, {free} free)")
    }
}

impl PagedPool {
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            num_layers,
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
            state: Mutex::new(PoolState {
                k: Vec::new(),
                v: Vec::new(),
                capacity: 0,
                free: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves consistent data (only pushes and pops).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of one block over all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        2 * self.num_layers
            * self.kv_heads
            * BLOCK_SIZE
            * self.head_dim
            * self.dtype.size_in_bytes()
    }

    /// `(capacity, free)` in blocks.
    pub fn usage(&self) -> (usize, usize) {
        let s = self.lock();
        (s.capacity, s.free.len())
    }

    /// Grows the pool so that `blocks` more are free (pre-sizing avoids growth copies later).
    pub fn reserve(&self, blocks: usize) -> Result<()> {
        let mut s = self.lock();
        self.grow(&mut s, blocks)
    }

    fn grow(&self, s: &mut PoolState, need_free: usize) -> Result<()> {
        if s.free.len() >= need_free {
            return Ok(());
        }
        let want = s.capacity + (need_free - s.free.len());
        let cap = want.max(s.capacity * 2).max(64);
        if cap > i32::MAX as usize / BLOCK_SIZE {
            return Err(ModelError::Request(format!(
                "KV cache: {cap} blocks of {BLOCK_SIZE} tokens is past the addressable range"
            )));
        }
        let shape = (cap, self.kv_heads, BLOCK_SIZE, self.head_dim);
        let bigger = |old: Option<&Tensor>| -> Result<Tensor> {
            let t = Tensor::zeros(shape, self.dtype, &self.device)?;
            if let Some(old) = old {
                t.slice_set(old, 0, 0)?;
            }
            Ok(t)
        };
        let mut k = Vec::with_capacity(self.num_layers);
        let mut v = Vec::with_capacity(self.num_layers);
        for l in 0..self.num_layers {
            k.push(bigger(s.k.get(l))?);
            v.push(bigger(s.v.get(l))?);
        }
        tracing::debug!(
            "KV pool grows from {} to {cap} blocks ({} MiB)",
            s.capacity,
            (cap * self.block_bytes()) >> 20
        );
        s.k = k;
        s.v = v;
        // Lower ids handed out first (pop takes from the end).
        s.free.extend((s.capacity as u32..cap as u32).rev());
        s.capacity = cap;
        Ok(())
    }

    /// `n` free block ids (the pool grows if needed).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn alloc(&self, n: usize) -> Result<Vec<u32>> {
        let mut s = self.lock();
        self.grow(&mut s, n)?;
        let at = s.free.len() - n;
        Ok(s.free.split_off(at))
    }

    fn release(&self, blocks: &[u32]) {
        self.lock().free.extend_from_slice(blocks);
    }

    /// The K and V pages of `layer` (handles to the pool's current tensors).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn layer(&self, layer: usize) -> (Tensor, Tensor) {
        let s = self.lock();
        (s.k[layer].clone(), s.v[layer].clone())
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

/// One sequence's block table in a pool; its blocks go back to the pool when it drops.
#[derive(Debug)]
pub(crate) struct PagedSeq {
    pub(crate) pool: Arc<PagedPool>,
    pub(crate) blocks: Vec<u32>,
}

impl PagedSeq {
    /// Makes room for `tokens` tokens in all.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn ensure(&mut self, tokens: usize) -> Result<()> {
        let need = tokens.div_ceil(BLOCK_SIZE);
        if need > self.blocks.len() {
            let more = self.pool.alloc(need - self.blocks.len())?;
            self.blocks.extend(more);
        }
        Ok(())
    }

    /// The slot (block · BLOCK_SIZE + offset) of position `pos`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn slot(&self, pos: usize) -> u32 {
        self.blocks[pos / BLOCK_SIZE] * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32
    }
}

impl Drop for PagedSeq {
    fn drop(&mut self) {
        self.pool.release(&self.blocks);
    }
}
