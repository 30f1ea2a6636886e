//! `torch.nn.utils.clip_grad_norm_` (norm_type 2, foreach path): the total norm is the L2 norm of the
//! per-tensor f32 norms; the coefficient is `max_norm * reciprocal(total + 1e-6)` in f32, clamped
//! to 1.0, and multiplies every gradient.

use crate::Result;
use candle_core::{DType, Tensor};

/// The f32 L2 norm of one tensor (accumulated in f64, rounded once).
fn tensor_norm(t: &Tensor) -> Result<f32> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let sum: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
    Ok(sum.sqrt() as f32)
}

/// Clip `grads` in place to a total L2 norm of `max_norm`; returns the total norm before clipping
/// (NaN/inf pass through as in torch with `error_if_nonfinite=False`).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let mut sum = 0f64;
    for g in grads.iter() {
        let n = tensor_norm(g)? as f64;
        sum += n * n;
    }
    let total = sum.sqrt() as f32;
    // `max_norm / (total_norm + 1e-6)` is Tensor.__rtruediv__: reciprocal, then multiply.
    let coef = (1.0f32 / (total + 1e-6f32)) * max_norm as f32;
    // torch.clamp(max=1.0) keeps NaN.
    let coef = if coef > 1.0 { 1.0 } else { coef };
    if coef != 1.0 {
        for g in grads.iter_mut() {
            let c = Tensor::new(coef, g.device())?.to_dtype(g.dtype())?;
            *g = g.broadcast_mul(&c)?;
        }
    }
    Ok(total as f64)
}
