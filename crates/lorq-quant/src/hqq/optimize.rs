//! hqq 0.2.8's quantizer: min/max initialisation and the proximal zero-point optimizer
//! (`optimize_weights_proximal_legacy`), in fp32 as hqq runs it on CPU.
//!
//! Works on groups laid out contiguously (`[n_groups, group_size]`); the caller maps hqq's grid
//! (axis 1: groups are grid rows; axis 0: grid columns) onto that layout.
//! Every arithmetic step is the same fp32 operation hqq performs, in the same order (products and
//! sums are rounded separately, never fused), so codes, scales and zeros agree with hqq's to float
//! rounding (reductions are summed in f64 here, in fp32 cascades there).

use rayon::prelude::*;

/// The optimizer's settings (hqq's defaults).
#[derive(Debug, Clone, Copy)]
pub struct ProximalParams {
    pub lp_norm: f32,
    pub beta: f32,
    pub iters: usize,
}

impl Default for ProximalParams {
    fn default() -> Self {
        // hqq's defaults also name kappa = 1.01, but the legacy loop never updates beta.
        Self {
            lp_norm: 0.7,
            beta: 10.0,
            iters: 20,
        }
    }
}

/// Result of quantizing a set of groups.
#[derive(Debug, Clone)]
pub struct GroupQuant {
    /// Codes, `[n_groups, group_size]`.
    pub codes: Vec<u8>,
    /// hqq's stored (inverted) scale per group: `W ≈ (code − zero) · scale`.
    pub scale: Vec<f32>,
    /// Zero point per group (a float after optimization).
    pub zero: Vec<f32>,
    /// Optimizer iterations run (0 when not optimizing).
    pub iterations: usize,
}

/// Quantizes `w` (`[n_groups, gs]`) to `nbits` as `Quantizer.quantize(channel_wise=True)` does.
pub fn quantize_groups(
    w: &[f32],
    gs: usize,
    nbits: u32,
    round_zero: bool,
    optimize: Option<ProximalParams>,
) -> GroupQuant {
    assert!(
        w.len().checked_rem(gs) == Some(0),
        "weights must split into groups of {gs}"
    );
    let max_v = ((1u32 << nbits) - 1) as f32;
    let ng = w.len() / gs;
    let mut scale = vec![0f32; ng];
    let mut zero = vec![0f32; ng];
    for (g, grp) in w.chunks_exact(gs).enumerate() {
        let (mn, mx) = grp
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let denom = mx - mn;
        // `max_v / denom` with a Python number on the left is torch's `reciprocal(denom) * max_v`.
        let mut s = (1.0 / denom) * max_v;
        if denom.abs() <= 1e-4 {
            s = 1.0;
        }
        let s = s.min(2e4);
        let mut z = -mn * s;
        if round_zero {
            z = z.round_ties_even();
        }
        scale[g] = s;
        zero[g] = z;
    }
    let iterations = match optimize {
        Some(p) => optimize_zero(w, gs, &scale, &mut zero, max_v, p),
        None => 0,
    };
    let mut codes = vec![0u8; w.len()];
    codes
        .par_chunks_mut(gs)
        .zip(w.par_chunks(gs))
        .enumerate()
        .for_each(|(g, (c, grp))| {
            for (c, &v) in c.iter_mut().zip(grp) {
                *c = quant(v, scale[g], zero[g], max_v) as u8;
            }
        });
    // hqq stores the inverse: scale = 1.0 / scale.
    let scale = scale.into_iter().map(|s| 1.0 / s).collect();
    GroupQuant {
        codes,
        scale,
        zero,
        iterations,
    }
}

#[inline(always)]
fn quant(w: f32, s: f32, z: f32, max_v: f32) -> f32 {
    (w * s + z).round_ties_even().clamp(0.0, max_v)
}

/// hqq's `shrink_lp_op`: `sign(x) · max(|x| − |x|^(p−1) / beta, 0)`.
#[inline(always)]
fn shrink_lp(x: f32, inv_beta: f32, p_minus_1: f32) -> f32 {
    let a = x.abs();
    let out = (a - inv_beta * a.powf(p_minus_1)).max(0.0);
    if x > 0.0 {
        out
    } else if x < 0.0 {
        -out
    } else {
        0.0
    }
}

/// `optimize_weights_proximal_legacy`: each step quantizes with the current zero, measures the
/// mean |W − W_r| and moves the zero; the loop stops at the first step whose error does not improve,
/// keeping the zero that step computed (hqq's quirk). Returns the number of steps run.
fn optimize_zero(
    w: &[f32],
    gs: usize,
    scale: &[f32],
    zero: &mut [f32],
    max_v: f32,
    p: ProximalParams,
) -> usize {
    let inv_beta = 1.0f32 / p.beta;
    let p_minus_1 = p.lp_norm - 1.0;
    let n = w.len();
    let mut best = f32::INFINITY;
    let mut err_g = vec![0f64; zero.len()];
    let mut steps = 0;
    for _ in 0..p.iters {
        steps += 1;
        zero.par_iter_mut()
            .zip(err_g.par_iter_mut())
            .zip(w.par_chunks(gs))
            .zip(scale.par_iter())
            .for_each(|(((z, e), grp), &s)| {
                let (mut err, mut acc) = (0f64, 0f64);
                for &v in grp {
                    let wq = quant(v, s, *z, max_v);
                    let wr = (wq - *z) / s;
                    let d = v - wr;
                    err += d.abs() as f64;
                    let we = shrink_lp(d, inv_beta, p_minus_1);
                    acc += (wq - (v - we) * s) as f64;
                }
                *e = err;
                *z = (acc as f32) / gs as f32;
            });
        let current = (err_g.iter().sum::<f64>() as f32) / n as f32;
        if current < best {
            best = current;
        } else {
            break;
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_group_uses_unit_scale() {
        let w = vec![0.5f32; 8];
        let q = quantize_groups(&w, 8, 4, true, Some(ProximalParams::default()));
        assert_eq!(q.scale, vec![1.0]);
        for (c, v) in q.codes.iter().zip(&w) {
            let d = (*c as f32 - q.zero[0]) * q.scale[0];
            assert!((d - v).abs() < 0.5);
        }
    }

    #[test]
    fn shrink_matches_definition() {
        assert_eq!(shrink_lp(0.0, 0.1, -0.3), 0.0);
        let x = 0.5f32;
        let want = x - 0.1 * x.powf(-0.3);
        assert_eq!(shrink_lp(x, 0.1, -0.3), want.max(0.0));
        assert_eq!(shrink_lp(-x, 0.1, -0.3), -want.max(0.0));
    }
}
