//! Forward passes that keep what their backward needs, and those backward passes, for the pieces
//! of a Llama decoder layer: RMSNorm, RoPE, causal attention (GQA, sliding window), SiLU·mul.
//! Written with candle tensor ops so the same code runs on every device. Reductions that decide
//! the numerics (norm statistics, softmax) run in f32, as transformers does.

use candle_core::{DType, Device, Tensor, D};
use lorq_model::attention::{causal_mask, merge_heads, split_heads};

use crate::error::Result;

/// What the RMSNorm backward needs: the normalised input `x̂ = x·r` and `r = 1/√(mean(x²)+ε)`,
/// both f32.
pub struct RmsNormSaved {
    xhat: Tensor,
    r: Tensor,
}

/// `y = w ⊙ (x · r)` (transformers' `LlamaRMSNorm`: statistics in f32, the normalised input cast
/// back to `x`'s dtype before the weight).
pub fn rms_norm_fwd(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, RmsNormSaved)> {
    let x32 = x.to_dtype(DType::F32)?;
    let r = ((x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?).recip()?;
    let xhat = x32.broadcast_mul(&r)?;
    let y = xhat.to_dtype(x.dtype())?.broadcast_mul(w)?;
    Ok((y, RmsNormSaved { xhat, r }))
}

/// `dx = r ⊙ (g − x̂ · mean(g ⊙ x̂))` with `g = w ⊙ dy` (the weight is frozen: no gradient).
pub fn rms_norm_bwd(s: &RmsNormSaved, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let g = dy
        .to_dtype(DType::F32)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let proj = (&g * &s.xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - s.xhat.broadcast_mul(&proj)?)?.broadcast_mul(&s.r)?;
    Ok(dx.to_dtype(dy.dtype())?)
}

/// RoPE on `[heads, n, hd]` (rotate-half form).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::rotary_emb::rope(&x.unsqueeze(0)?, cos, sin)?.squeeze(0)?)
}

/// The backward of RoPE is the rotation by the opposite angle.
pub fn rope_bwd(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope(&dy.contiguous()?, cos, &sin.neg()?)
}

/// `silu(g) ⊙ u`.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok((g.silu()? * u)?)
}

/// Gradients of `silu(g) ⊙ u`: `(dm ⊙ u ⊙ silu'(g), dm ⊙ silu(g))` with
/// `silu'(g) = σ(g)(1 + g(1 − σ(g)))`, in f32.
pub fn silu_mul_bwd(g: &Tensor, u: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    let dt = dm.dtype();
    let g = g.to_dtype(DType::F32)?;
    let u = u.to_dtype(DType::F32)?;
    let dm = dm.to_dtype(DType::F32)?;
    let sig = candle_nn::ops::sigmoid(&g)?;
    let dsilu = (&sig * ((&g * (1.0 - &sig)?)? + 1.0)?)?;
    let dg = ((&dm * &u)? * dsilu)?;
    let du = (dm * (g * sig)?)?;
    Ok((dg.to_dtype(dt)?, du.to_dtype(dt)?))
}

/// One sequence's attention state kept for the backward.
pub struct AttnSaved {
    /// Roped queries, grouped per KV head: `[kv_heads, group·n, hd]`.
    q: Tensor,
    /// Roped keys `[kv_heads, n, hd]`.
    k: Tensor,
    /// Values `[kv_heads, n, hd]`.
    v: Tensor,
    /// Softmax probabilities `[kv_heads, group·n, n]`, f32.
    p: Tensor,
}

/// The attention geometry of a model.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
}

/// Causal attention of one sequence (`q [n, heads·hd]`, `k`/`v [n, kv_heads·hd]`, RoPE tables
/// `[n, hd/2]`) from position 0: `[n, heads·hd]`, plus what the backward needs.
pub fn attention_fwd(
    s: AttnShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, AttnSaved)> {
    let n = q.dim(0)?;
    let group = s.heads / s.kv_heads;
    let hd = s.head_dim;
    let q = rope(&split_heads(q, s.heads, hd)?, cos, sin)?.reshape((s.kv_heads, group * n, hd))?;
    let k = rope(&split_heads(k, s.kv_heads, hd)?, cos, sin)?;
    let v = split_heads(v, s.kv_heads, hd)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = if n > 1 {
        let mask = causal_mask(n, n, 0, s.window, q.device())?;
        scores
            .reshape((s.kv_heads, group, n, n))?
            .broadcast_add(&mask)?
            .reshape((s.kv_heads, group * n, n))?
    } else {
        scores
    };
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    let o = p.to_dtype(v.dtype())?.matmul(&v)?;
    let out = merge_heads(&o.reshape((s.heads, n, hd))?)?;
    Ok((out, AttnSaved { q, k, v, p }))
}

/// Gradients `(dq, dk, dv)` (`[n, heads·hd]`, `[n, kv_heads·hd]` ×2) of one sequence's attention
/// from the gradient of its output `do_ [n, heads·hd]`.
pub fn attention_bwd(
    s: AttnShape,
    saved: &AttnSaved,
    do_: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = do_.dim(0)?;
    let group = s.heads / s.kv_heads;
    let hd = s.head_dim;
    let dt = do_.dtype();
    let do_ = split_heads(do_, s.heads, hd)?.reshape((s.kv_heads, group * n, hd))?;
    let p = saved.p.to_dtype(dt)?;
    let dv = p.t()?.matmul(&do_)?;
    let dp = do_.matmul(&saved.v.t()?)?.to_dtype(DType::F32)?;
    let row = (&dp * &saved.p)?.sum_keepdim(D::Minus1)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let ds = ((&saved.p * dp.broadcast_sub(&row)?)? * scale)?.to_dtype(dt)?;
    let dq = ds.matmul(&saved.k)?.reshape((s.heads, n, hd))?;
    let dk = ds.t()?.matmul(&saved.q)?;
    let dq = merge_heads(&rope_bwd(&dq, cos, sin)?)?;
    let dk = merge_heads(&rope_bwd(&dk, cos, sin)?)?;
    let dv = merge_heads(&dv)?;
    Ok((dq, dk, dv))
}

/// A dropout keep-mask scaled by `1/(1-p)` (`[rows, cols]`, `dtype`), drawn from a generator
/// seeded by `seed`, so the recomputation under gradient checkpointing draws the same mask. On a
/// CUDA device the mask is drawn there (the device generator reseeded with `seed`); elsewhere on
/// the host.
pub fn dropout_mask(
    rows: usize,
    cols: usize,
    p: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    if device.is_cuda() {
        device.set_seed(seed)?;
        let u = Tensor::rand(0f32, 1f32, (rows, cols), device)?;
        return Ok((u.ge(p)?.to_dtype(dtype)? * keep)?);
    }
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let keep = keep as f32;
    let m: Vec<f32> = (0..rows * cols)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    Ok(Tensor::from_vec(m, (rows, cols), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central finite differences of `f(x)·w` against an analytic gradient.
    fn check_grad(x: &Tensor, w_out: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, analytic: &Tensor) {
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let an = analytic.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let obj = |v: &[f32]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), x.shape(), x.device()).unwrap();
            (f(&t) * w_out)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-3f32;
        let mut worst = 0f64;
        for i in (0..xs.len()).step_by(7) {
            let mut p = xs.clone();
            p[i] += h;
            let mut m = xs.clone();
            m[i] -= h;
            let num = (obj(&p) - obj(&m)) / (2.0 * h as f64);
            let err = (num - an[i] as f64).abs() / (1e-2 + num.abs());
            worst = worst.max(err);
        }
        assert!(worst < 2e-2, "finite-difference mismatch {worst}");
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let x = randn(&[5, 16], 1);
        let w = (randn(&[16], 2) + 1.5).unwrap();
        let dy = randn(&[5, 16], 3);
        let (_, s) = rms_norm_fwd(&x, &w, 1e-6).unwrap();
        let dx = rms_norm_bwd(&s, &w, &dy).unwrap();
        check_grad(&x, &dy, &|t| rms_norm_fwd(t, &w, 1e-6).unwrap().0, &dx);
    }

    #[test]
    fn silu_mul_backward_matches_finite_differences() {
        let g = randn(&[4, 8], 4);
        let u = randn(&[4, 8], 5);
        let dm = randn(&[4, 8], 6);
        let (dg, du) = silu_mul_bwd(&g, &u, &dm).unwrap();
        check_grad(&g, &dm, &|t| silu_mul(t, &u).unwrap(), &dg);
        check_grad(&u, &dm, &|t| silu_mul(&g, t).unwrap(), &du);
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        for window in [None, Some(3)] {
            let s = AttnShape {
                heads: 4,
                kv_heads: 2,
                head_dim: 8,
                window,
            };
            let n = 6;
            let q = randn(&[n, 32], 7);
            let k = randn(&[n, 16], 8);
            let v = randn(&[n, 16], 9);
            let d = randn(&[n, 32], 10);
            let ang: Vec<f32> = (0..n * 4)
                .map(|i| (i / 4) as f32 * 0.3 / (1 + i % 4) as f32)
                .collect();
            let ang = Tensor::from_vec(ang, (n, 4), &Device::Cpu).unwrap();
            let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
            let (_, saved) = attention_fwd(s, &q, &k, &v, &cos, &sin).unwrap();
            let (dq, dk, dv) = attention_bwd(s, &saved, &d, &cos, &sin).unwrap();
            let run = |q: &Tensor, k: &Tensor, v: &Tensor| {
                attention_fwd(s, q, k, v, &cos, &sin).unwrap().0
            };
            check_grad(&q, &d, &|t| run(t, &k, &v), &dq);
            check_grad(&k, &d, &|t| run(&q, t, &v), &dk);
            check_grad(&v, &d, &|t| run(&q, &k, t), &dv);
        }
    }
}
