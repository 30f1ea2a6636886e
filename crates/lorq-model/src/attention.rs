//! Causal attention of one sequence over its keys and values, and the head reshapes around it.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Causal (optionally sliding-window) attention of one sequence's new queries over its cache.
///
/// `q`: `[heads, new, hd]`, `k`/`v`: `[kv_heads, total, hd]` where the new queries sit at
/// positions `total-new .. total`. Grouped-query heads share a KV head without copying it: the
/// queries of the `heads/kv_heads` heads of a group are stacked along the row axis.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> Result<Tensor> {
    let (heads, new, hd) = q.dims3()?;
    let (kv_heads, total, _) = k.dims3()?;
    let group = heads / kv_heads;
    let q = q.reshape((kv_heads, group * new, hd))?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let offset = total - new;
    let needs_mask = new > 1 || window.is_some_and(|w| total > w);
    let scores = if needs_mask {
        let mask = causal_mask(new, total, offset, window, q.device())?;
        scores
            .reshape((kv_heads, group, new, total))?
            .broadcast_add(&mask)?
            .reshape((kv_heads, group * new, total))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    let out = probs.matmul(v)?; // [kv_heads, group*new, hd]
    Ok(out.reshape((heads, new, hd))?)
}

/// Additive mask `[new, total]`: query `i` (position `offset+i`) sees key `j` when `j <= offset+i`
/// and, with a window `w`, `offset+i - j < w` (transformers' sliding-window semantics).
pub fn causal_mask(
    new: usize,
    total: usize,
    offset: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; new * total];
    for i in 0..new {
        let pos = offset + i;
        for j in 0..total {
            let visible = j <= pos && window.is_none_or(|w| pos - j < w);
            if !visible {
                m[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (new, total), device)?)
}

/// `[rows, heads*hd]` -> `[heads, rows, hd]`, contiguous.
pub fn split_heads(x: &Tensor, heads: usize, hd: usize) -> Result<Tensor> {
    let rows = x.dim(0)?;
    Ok(x.reshape((rows, heads, hd))?
        .transpose(0, 1)?
        .contiguous()?)
}

/// `[heads, rows, hd]` -> `[rows, heads*hd]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (heads, rows, hd) = x.dims3()?;
    Ok(x.transpose(0, 1)?
        .contiguous()?
        .reshape((rows, heads * hd))?)
}
