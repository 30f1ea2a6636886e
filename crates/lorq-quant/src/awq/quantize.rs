//! AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization"), as AutoAWQ runs it
//! (`awq/quantize/quantizer.py`), producing the GEMM layout of [`super::AwqTensor`].
//!
//! For the linears that share one input `x` (q/k/v after the input norm, gate/up after the
//! post-attention norm, o alone, down alone), a per-input-channel scale `s` is searched on a grid
//! of 20 ratios `α ∈ {0, 0.05, …, 0.95}`: `s = mean|x|^α` (AutoAWQ's `duo_scaling` instead
//! divides by `mean(w/max|w| per group)^(1−α)`), clamped at 1e-4 and normalized by
//! `√(max s · min s)`. The ratio kept is the one whose group-quantized scaled weights,
//! `Ŵ = Q(W·diag(s))·diag(1/s)`, give the smallest output error `Σ_x ‖(W − Ŵ)x‖²` summed over the
//! linears of the group. `α = 0` is plain round-to-nearest, so the search never does worse than
//! RTN on the calibration data. The caller folds `1/s` into the operation before (a norm's weight,
//! or the previous linear's output rows) and stores `Q(W·diag(s))`.
//!
//! Difference from AutoAWQ: the output error is measured on each linear's own output, from the
//! Gram matrix `Σ xᵀx` of all calibration tokens (exact, and cheap on a CPU), where AutoAWQ runs the
//! whole attention block or MLP (`module2inspect`) on its calibration batch.
//!
//! Optional clipping (AutoAWQ's `_search_best_clip`, not for q/k): per output row and group, the
//! range `±max|w|` is shrunk by `i/20`, `i < 10`; the shrink kept minimizes that group's share of
//! the output error, `Δᵀ G_g Δ` with `G_g` the group's block of the (scaled) inputs' Gram matrix.

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use safetensors::Dtype;

use super::{AwqConfig, AwqTensor};
use crate::gptq::kernel::{stream_set, stream_words, Groups, IntWeight, Rounding};
use crate::input_stats::{output_error_with, InputStats};
use crate::rtn::{check_grouping, rtn_quantize, GroupParams, GroupRange};
use crate::QuantError;

/// AWQ's options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwqParams {
    /// Input channels per group (AutoAWQ `q_group_size`, 128).
    pub group_size: usize,
    /// Ratios on the search grid (20).
    pub n_grid: usize,
    /// AutoAWQ's `duo_scaling`: `s = x_mean^α / w_mean^(1−α)`.
    pub duo_scaling: bool,
    /// Search a clipping range per row and group.
    pub clip: bool,
}

impl Default for AwqParams {
    fn default() -> Self {
        Self {
            group_size: 128,
            n_grid: 20,
            duo_scaling: false,
            clip: false,
        }
    }
}

/// The scale chosen for a group of linears.
#[derive(Debug, Clone, PartialEq)]
pub struct AwqScale {
    /// Per input channel; multiply the weights' columns, divide the input.
    pub scales: Vec<f32>,
    /// The ratio `α` kept.
    pub ratio: f32,
    /// Output error `Σ ‖(W − Ŵ)x‖²` with these scales, and with `s = 1` (plain RTN).
    pub error: f64,
    pub rtn_error: f64,
}

/// AWQ's pseudo-quantization of `w` `[n, k]`: the weight the stored codes stand for.
fn pseudo_quantize(w: &[f32], n: usize, k: usize, gs: usize) -> Result<Vec<f32>, QuantError> {
    let q = rtn_quantize(w, n, k, 4, gs, GroupRange::AwqMinMax)?;
    Ok(q.dequantize(|c| c / gs))
}

fn scaled_columns(w: &[f32], k: usize, s: &[f32], inverse: bool) -> Vec<f32> {
    w.par_chunks(k.max(1))
        .flat_map_iter(|row| {
            row.iter()
                .zip(s)
                .map(move |(v, f)| if inverse { v / f } else { v * f })
        })
        .collect()
}

/// Searches the input-channel scale shared by `linears` (each `(weight [n, k] row-major, n)`),
/// whose common input has the statistics `stats`. Errors name `what`.
pub fn awq_search_scale(
    linears: &[(&[f32], usize)],
    stats: &InputStats,
    p: &AwqParams,
    what: &str,
) -> Result<AwqScale, QuantError> {
    let k = stats.k();
    check_grouping(k, 4, p.group_size, what)?;
    if stats.rows() == 0 {
        return Err(QuantError::Invalid(format!(
            "{what}: no calibration rows reached this layer"
        )));
    }
    for (w, n) in linears {
        if w.len() != n * k {
            return Err(QuantError::Invalid(format!(
                "{what}: {} weights do not form [{n}, {k}]",
                w.len()
            )));
        }
    }
    let gs = p.group_size;
    let x_mean = stats.abs_mean();
    let w_mean: Vec<f32> = if p.duo_scaling {
        // Mean over every row of |w| / max|w| of its group.
        let mut acc = vec![0f64; k];
        let mut rows = 0usize;
        for (w, n) in linears {
            for r in 0..*n {
                let row = &w[r * k..(r + 1) * k];
                for (gi, g) in row.chunks(gs).enumerate() {
                    let m = g.iter().fold(0f32, |a, v| a.max(v.abs())) + 1e-6;
                    let c0 = gi * gs;
                    for (j, v) in g.iter().enumerate() {
                        acc[c0 + j] += (v.abs() / m) as f64;
                    }
                }
            }
            rows += n;
        }
        acc.iter()
            .map(|v| (v / rows.max(1) as f64) as f32)
            .collect()
    } else {
        vec![]
    };
    let gram = stats.gram_tensor()?;
    let error_of = |s: &[f32]| -> Result<f64, QuantError> {
        let mut e = 0.0;
        for (w, n) in linears {
            let q = pseudo_quantize(&scaled_columns(w, k, s, false), *n, k, gs)?;
            e += output_error_with(&gram, w, &scaled_columns(&q, k, s, true), k)?;
        }
        Ok(e)
    };
    let ones = vec![1f32; k];
    let rtn_error = error_of(&ones)?;
    let mut best = AwqScale {
        scales: ones,
        ratio: 0.0,
        error: rtn_error,
        rtn_error,
    };
    for i in 1..p.n_grid {
        let ratio = i as f32 / p.n_grid as f32;
        let mut s: Vec<f32> = (0..k)
            .map(|c| {
                let v = if p.duo_scaling {
                    x_mean[c].powf(ratio) / (w_mean[c].powf(1.0 - ratio) + 1e-4)
                } else {
                    x_mean[c].powf(ratio)
                };
                v.max(1e-4)
            })
            .collect();
        let (mx, mn) = s
            .iter()
            .fold((0f32, f32::INFINITY), |(a, b), &v| (a.max(v), b.min(v)));
        let norm = (mx * mn).sqrt();
        for v in &mut s {
            *v /= norm;
            if !v.is_finite() {
                *v = 1.0;
            }
        }
        let e = error_of(&s)?;
        tracing::trace!("{what}: ratio {ratio}: output error {e}");
        if e < best.error {
            best = AwqScale {
                scales: s,
                ratio,
                error: e,
                rtn_error,
            };
        }
    }
    Ok(best)
}

/// Clips `w` `[n, k]` (already scaled by `s`, row-major) in place per row and group (module
/// notes), with `stats` the statistics of the unscaled inputs and `s` the scales (inputs are
/// divided by them). Shrink factors `1 − i/n_grid`, `i < n_grid/2`.
pub fn awq_clip(
    w: &mut [f32],
    n: usize,
    stats: &InputStats,
    s: &[f32],
    p: &AwqParams,
    what: &str,
) -> Result<(), QuantError> {
    let k = stats.k();
    check_grouping(k, 4, p.group_size, what)?;
    if w.len() != n * k || s.len() != k {
        return Err(QuantError::Invalid(format!(
            "{what}: {} weights / {} scales for [{n}, {k}]",
            w.len(),
            s.len()
        )));
    }
    let gs = p.group_size;
    let g = stats.gram();
    // Per group, its block of the scaled inputs' Gram matrix (f32).
    let blocks: Vec<Vec<f32>> = (0..k / gs)
        .map(|gi| {
            let c0 = gi * gs;
            let mut b = vec![0f32; gs * gs];
            for i in 0..gs {
                for j in 0..gs {
                    b[i * gs + j] =
                        (g[(c0 + i) * k + c0 + j] / (s[c0 + i] as f64 * s[c0 + j] as f64)) as f32;
                }
            }
            b
        })
        .collect();
    let steps = p.n_grid / 2;
    w.par_chunks_mut(k).for_each(|row| {
        let mut cur = vec![0f32; gs];
        let mut d = vec![0f32; gs];
        for (gi, grp) in row.chunks_mut(gs).enumerate() {
            let blk = &blocks[gi];
            let org_max = grp.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (mut best_max, mut best_err) = (org_max, f64::INFINITY);
            for i in 0..steps {
                let m = org_max * (1.0 - i as f32 / p.n_grid as f32);
                for (c, v) in cur.iter_mut().zip(grp.iter()) {
                    *c = v.clamp(-m, m);
                }
                let gp = GroupParams::fit(&cur, 4, GroupRange::AwqMinMax);
                for ((dd, c), v) in d.iter_mut().zip(&cur).zip(grp.iter()) {
                    *dd = gp.dequant(gp.code(*c)) - v;
                }
                let mut e = 0f64;
                for a in 0..gs {
                    let r = &blk[a * gs..(a + 1) * gs];
                    let t: f32 = r.iter().zip(&d).map(|(x, y)| x * y).sum();
                    e += (d[a] * t) as f64;
                }
                if e < best_err {
                    best_err = e;
                    best_max = m;
                }
            }
            for v in grp.iter_mut() {
                *v = v.clamp(-best_max, best_max);
            }
        }
    });
    Ok(())
}

impl AwqTensor {
    /// Round-to-nearest AWQ quantization (4-bit, zero point, `group_size`) of `w` `[n, k]`
    /// row-major f32 (the scaled and clipped weight), fp16 scales. `n` must be a multiple of 8
    /// (8 output columns per packed word).
    pub fn quantize(
        w: &[f32],
        n: usize,
        k: usize,
        group_size: usize,
        what: &str,
    ) -> Result<Self, QuantError> {
        if !n.is_multiple_of(8) {
            return Err(QuantError::Invalid(format!(
                "{what}: AWQ GEMM packs 8 output features per word; {n} is not a multiple of 8"
            )));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::Invalid(format!(
                "{what}: weight element {i} is not finite ({})",
                w[i]
            )));
        }
        let c = rtn_quantize(w, n, k, 4, group_size, GroupRange::AwqMinMax)
            .map_err(|e| QuantError::Invalid(format!("{what}: {e}")))?;
        let wpr = stream_words(k, 4);
        let mut codes = vec![0u32; n * wpr];
        for r in 0..n {
            let row = &mut codes[r * wpr..(r + 1) * wpr];
            for (i, &q) in c.codes[r * k..(r + 1) * k].iter().enumerate() {
                stream_set(row, i, 4, q as u32);
            }
        }
        let iw = IntWeight {
            gpu: Default::default(),
            n,
            k,
            bits: 4,
            wpr,
            codes,
            groups: Groups::Contiguous(group_size),
            n_groups: c.n_groups,
            scales: c.scales,
            zeros: c.zeros,
            round: Rounding::F16,
        };
        iw.validate(what)?;
        Ok(Self {
            cfg: AwqConfig {
                bits: 4,
                group_size,
            },
            w: iw,
            scale_dtype: Dtype::F16,
        })
    }

    /// Divides output row `r` by `s[r]` (AWQ folding the next layer's input scale into this
    /// layer's output): every scale of the row is divided, rounded to fp16; codes and zeros stay.
    pub fn divide_rows(&mut self, s: &[f32], what: &str) -> Result<(), QuantError> {
        let (n, g) = (self.w.n, self.w.n_groups);
        if s.len() != n {
            return Err(QuantError::Invalid(format!(
                "{what}: {} row scales for {n} output features",
                s.len()
            )));
        }
        for (row, f) in self.w.scales.chunks_mut(g.max(1)).zip(s) {
            for v in row {
                *v = half::f16::from_f32(*v / f).to_f32();
            }
        }
        Ok(())
    }

    /// `x · Wᵀ` where the stored weight is `W·diag(s)`: `x` is divided by `s` first. The linear the
    /// calibration forward runs while the scale is not yet folded into the previous operation.
    pub fn matmul_unscaled(&self, x: &Tensor, s: &[f32]) -> Result<Tensor, QuantError> {
        let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
        let inv = Tensor::from_vec(inv, (1, s.len()), &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        let xs = x.broadcast_mul(&inv)?;
        crate::QuantTensor::matmul(self, &xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_divide_through_the_scales() {
        let (n, k) = (8, 32);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 10.0)
            .collect();
        let mut t = AwqTensor::quantize(&w, n, k, 16, "m").unwrap();
        let before = t.dequantize_f32();
        let s: Vec<f32> = (0..n).map(|r| 1.0 + r as f32 / 4.0).collect();
        t.divide_rows(&s, "m").unwrap();
        let after = t.dequantize_f32();
        for r in 0..n {
            for c in 0..k {
                let want = before[r * k + c] / s[r];
                assert!((after[r * k + c] - want).abs() <= 2e-3 * want.abs() + 1e-6);
            }
        }
        let e = AwqTensor::quantize(&w[..4 * k], 4, k, 16, "m.q").unwrap_err();
        assert!(e.to_string().contains("multiple of 8"), "{e}");
    }
}
