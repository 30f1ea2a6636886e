//! Next-token cross-entropy through the final norm and the (frozen) LM head, in chunks of rows so
//! the `[rows, vocab]` logits never exist whole, and only for the rows that have a target.

use candle_core::{DType, Tensor, D};
use lorq_model::LlamaModel;

use crate::error::Result;
use crate::grad_ops::{rms_norm_bwd, rms_norm_fwd};

/// Rows of logits materialised at once (f32 `[LOSS_CHUNK_ROWS, vocab]`).
pub const LOSS_CHUNK_ROWS: usize = 256;
/// `[LOSS_CHUNK_ROWS, vocab]` f32 tensors alive at once at the peak of a chunk (the shifted
/// logits, the probabilities, and the gradient being formed).
pub const LOSS_CHUNK_TENSORS: usize = 3;

/// The summed negative log-likelihood of `targets` (`(row, token)`: the hidden state at `row`
/// predicts `token`) and, with `grad_scale`, the gradient of `grad_scale · Σ nll` with respect
/// to the final hidden states `x [rows, hidden]`.
pub fn head_loss(
    model: &LlamaModel,
    x: &Tensor,
    targets: &[(u32, u32)],
    grad_scale: Option<f64>,
) -> Result<(f64, Option<Tensor>)> {
    let dev = x.device();
    let dt = x.dtype();
    let head = model.lm_head();
    let norm_w = model.final_norm_weight();
    let eps = model.config.rms_norm_eps;
    let mut dx = match grad_scale {
        Some(_) => Some(x.zeros_like()?),
        None => None,
    };
    let mut total = 0f64;
    for chunk in targets.chunks(LOSS_CHUNK_ROWS) {
        let c = chunk.len();
        let rows = Tensor::from_vec(chunk.iter().map(|t| t.0).collect::<Vec<_>>(), c, dev)?;
        let tok = Tensor::from_vec(chunk.iter().map(|t| t.1).collect::<Vec<_>>(), (c, 1), dev)?;
        let h = x.index_select(&rows, 0)?;
        let (hn, saved) = rms_norm_fwd(&h, norm_w, eps)?;
        let mut logits = head.base.matmul(&hn)?;
        if let Some(b) = &head.bias {
            logits = logits.broadcast_add(b)?;
        }
        let logits = logits.to_dtype(DType::F32)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let shifted = logits.broadcast_sub(&max)?;
        drop(logits);
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let nll = (&lse - shifted.gather(&tok, 1)?)?;
        total += nll.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if let (Some(scale), Some(dx)) = (grad_scale, dx.as_mut()) {
            let p = shifted.broadcast_sub(&lse)?.exp()?;
            drop(shifted);
            let minus_one = Tensor::full(-1f32, (c, 1), dev)?;
            let dlogits = (p.scatter_add(&tok, &minus_one, 1)? * scale)?;
            drop(p);
            let dhn = head.base.matmul_grad_input(&dlogits.to_dtype(dt)?)?;
            let dh = rms_norm_bwd(&saved, norm_w, &dhn)?;
            *dx = dx.index_add(&rows, &dh, 0)?;
        }
    }
    Ok((total, dx))
}
