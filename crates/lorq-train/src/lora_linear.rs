//! A frozen base linear (any quantization format) plus one trainable LoRA pair: forward that keeps
//! what the backward needs, and the backward, which returns `dx` and accumulates `dA`, `dB`.
//! The base gets no gradient: its backward is only `dy · W`, with `W` dequantized on the fly.

use candle_core::{DType, Tensor};
use lorq_model::Linear;

use crate::error::Result;
use crate::grad_ops::dropout_mask;
use crate::lora_params::TrainModule;

/// The LoRA side of one linear during a step.
pub struct LoraSlot<'a> {
    pub module: &'a TrainModule,
    /// Position of the pair in the parameter list (`A` at `2·index`, `B` at `2·index + 1`).
    pub index: usize,
    pub scale: f64,
    pub dropout: f64,
    /// Seeds this linear's dropout mask for this micro-batch.
    pub seed: u64,
}

/// What the backward of one linear needs.
pub struct LinearSaved {
    /// The LoRA input after dropout (the plain input without dropout).
    xd: Option<Tensor>,
    /// The scaled keep-mask, when dropout is on.
    mask: Option<Tensor>,
    /// `xd · Aᵀ` `[rows, r]`.
    u: Option<Tensor>,
}

/// `y = x·Wᵀ (+ bias) + scale · (drop(x)·Aᵀ)·Bᵀ`.
pub fn linear_fwd(
    lin: &Linear,
    slot: Option<&LoraSlot<'_>>,
    x: &Tensor,
) -> Result<(Tensor, LinearSaved)> {
    let mut y = lin.base.matmul(x)?;
    if let Some(b) = &lin.bias {
        y = y.broadcast_add(b)?;
    }
    let Some(slot) = slot else {
        return Ok((
            y,
            LinearSaved {
                xd: None,
                mask: None,
                u: None,
            },
        ));
    };
    let dt = x.dtype();
    let (xd, mask) = if slot.dropout > 0.0 {
        let (rows, cols) = x.dims2()?;
        let mask = dropout_mask(rows, cols, slot.dropout, slot.seed, dt, x.device())?;
        ((x * &mask)?, Some(mask))
    } else {
        (x.clone(), None)
    };
    let a = slot.module.a.to_dtype(dt)?;
    let b = slot.module.b.to_dtype(dt)?;
    let u = xd.matmul(&a.t()?)?;
    let y = (y + (u.matmul(&b.t()?)? * slot.scale)?)?;
    Ok((
        y,
        LinearSaved {
            xd: Some(xd),
            mask,
            u: Some(u),
        },
    ))
}

/// Accumulates `dA`, `dB` into `grads` (f32) and returns `dx` when `need_dx`.
pub fn linear_bwd(
    lin: &Linear,
    slot: Option<&LoraSlot<'_>>,
    saved: &LinearSaved,
    dy: &Tensor,
    need_dx: bool,
    grads: &mut [Option<Tensor>],
) -> Result<Option<Tensor>> {
    let dt = dy.dtype();
    let mut dx = if need_dx {
        Some(lin.base.matmul_grad_input(dy)?)
    } else {
        None
    };
    if let (Some(slot), Some(xd), Some(u)) = (slot, &saved.xd, &saved.u) {
        let a = slot.module.a.to_dtype(dt)?;
        let b = slot.module.b.to_dtype(dt)?;
        let db = (dy.t()?.matmul(u)? * slot.scale)?;
        let du = (dy.matmul(&b)? * slot.scale)?;
        let da = du.t()?.matmul(xd)?;
        accumulate(grads, 2 * slot.index, da)?;
        accumulate(grads, 2 * slot.index + 1, db)?;
        if let Some(d) = dx.as_mut() {
            let mut dxl = du.matmul(&a)?;
            if let Some(m) = &saved.mask {
                dxl = (dxl * m)?;
            }
            *d = (&*d + dxl)?;
        }
    }
    Ok(dx)
}

/// `grads[i] += g` in f32.
pub fn accumulate(grads: &mut [Option<Tensor>], i: usize, g: Tensor) -> Result<()> {
    let g = g.to_dtype(DType::F32)?;
    grads[i] = Some(match grads[i].take() {
        Some(prev) => (prev + g)?,
        None => g,
    });
    Ok(())
}
