//! GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers"), and the writer of the GPTQ v1 layout for any integer codes.
//!
//! Per linear `W` `[n, k]` with the Hessian `H = 2/N · Σ xᵀx` of its calibration inputs:
//! dead input channels (`H[i,i] = 0`) get `H[i,i] = 1` and zero weights; with act-order the
//! channels are visited by decreasing `H[i,i]`; `H += damp · mean(diag H) · I`; `U` = the upper
//! Cholesky factor of `H⁻¹`. Channels are quantized one at a time, in blocks of 128: the
//! quantization error of channel `i`, divided by `U[i,i]`, is propagated to the later channels of
//! the block through row `i` of `U` at once, and to the channels after the block once per block
//! (the lazy batch update). A group's scale and zero are fitted ([`GroupParams::fit`], GPTQ's
//! min-max range) when its first channel is reached, on the weights as updated so far; with
//! static groups they are fitted on the original weights, before any update, in storage order.
//!
//! Rows of `W` are independent given `U`, so tiles of rows run in parallel (rayon).

use rayon::prelude::*;
use safetensors::Dtype;

use super::kernel::{stream_set, stream_words, Groups, IntWeight, Rounding};
use super::linalg::inverse_cholesky_upper;
use super::{GptqConfig, GptqFormat, GptqTensor};
use crate::input_stats::InputStats;
use crate::rtn::{check_grouping, rtn_quantize, GroupCodes, GroupParams, GroupRange};
use crate::QuantError;

/// GPTQ's options (GPTQModel's `QuantizeConfig` names in the comments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqParams {
    /// 2, 3, 4 or 8 (`bits`).
    pub bits: u32,
    /// `None`: one group over all input channels (`group_size = -1`).
    pub group_size: Option<usize>,
    /// Symmetric grid with zero `2^(bits−1)` (`sym`); asymmetric otherwise.
    pub sym: bool,
    /// Visit channels by decreasing Hessian diagonal, writing `g_idx` (`desc_act`).
    pub act_order: bool,
    /// Fit every group's scale/zero before any update, in storage order (`static_groups`).
    pub static_groups: bool,
    /// Dampening, a fraction of the mean Hessian diagonal (`damp_percent`).
    pub damp: f64,
    /// Channels per lazy-batch block (128 in the reference).
    pub block_size: usize,
}

impl Default for GptqParams {
    fn default() -> Self {
        Self {
            bits: 4,
            group_size: Some(128),
            sym: false,
            act_order: false,
            static_groups: false,
            damp: 0.01,
            block_size: 128,
        }
    }
}

impl GptqParams {
    /// The checkpoint's `quantization_config` (v1 `gptq` format).
    pub fn config(&self) -> GptqConfig {
        GptqConfig {
            bits: self.bits,
            group_size: self.group_size,
            desc_act: self.act_order,
            sym: self.sym,
            format: GptqFormat::V1,
        }
    }

    /// Checks the options against a weight with `k` input features; errors name `what`.
    pub fn check(&self, k: usize, what: &str) -> Result<(), QuantError> {
        if !matches!(self.bits, 2 | 3 | 4 | 8) {
            return Err(QuantError::Invalid(format!(
                "{what}: GPTQ bits must be 2, 3, 4 or 8, got {}",
                self.bits
            )));
        }
        check_grouping(k, self.bits, self.group_size.unwrap_or(k.max(1)), what)?;
        if !(self.damp > 0.0 && self.damp < 1.0) {
            return Err(QuantError::Invalid(format!(
                "{what}: damp must be in (0, 1), got {}",
                self.damp
            )));
        }
        if self.block_size == 0 {
            return Err(QuantError::Invalid(format!("{what}: block size 0")));
        }
        Ok(())
    }
}

/// Rows handled together by one rayon task.
const ROW_TILE: usize = 8;

/// Quantizes `w` `[n, k]` (row-major f32) with GPTQ from the statistics of its inputs.
/// Errors name `what` (the tensor).
pub fn gptq_quantize(
    w: &[f32],
    n: usize,
    k: usize,
    stats: &InputStats,
    p: &GptqParams,
    what: &str,
) -> Result<GptqTensor, QuantError> {
    p.check(k, what)?;
    if w.len() != n * k || stats.k() != k {
        return Err(QuantError::Invalid(format!(
            "{what}: {} weights for [{n}, {k}] with inputs of {} features",
            w.len(),
            stats.k()
        )));
    }
    if stats.rows() == 0 {
        return Err(QuantError::Invalid(format!(
            "{what}: no calibration rows reached this layer"
        )));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::Invalid(format!(
            "{what}: weight element {i} is not finite ({})",
            w[i]
        )));
    }
    let gs = p.group_size.unwrap_or(k);
    let n_groups = k / gs;
    let mut h = stats.hessian();
    let mut w = w.to_vec();
    let mut dead = 0;
    for i in 0..k {
        if h[i * k + i] == 0.0 {
            h[i * k + i] = 1.0;
            for r in 0..n {
                w[r * k + i] = 0.0;
            }
            dead += 1;
        }
    }
    if dead > 0 {
        tracing::debug!("{what}: {dead} dead input channels (zero Hessian diagonal)");
    }
    let range = GroupRange::GptqMinMax { sym: p.sym };
    // Static groups: fitted on the original weights, in storage order.
    let static_params: Option<Vec<GroupParams>> = p.static_groups.then(|| {
        let mut v = Vec::with_capacity(n * n_groups);
        for r in 0..n {
            for g in 0..n_groups {
                v.push(GroupParams::fit(
                    &w[r * k + g * gs..r * k + (g + 1) * gs],
                    p.bits,
                    range,
                ));
            }
        }
        v
    });
    let perm: Vec<usize> = if p.act_order {
        let mut idx: Vec<usize> = (0..k).collect();
        idx.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
        idx
    } else {
        (0..k).collect()
    };
    // Permuted Hessian and weights.
    let mut hp = vec![0f64; k * k];
    for (a, &pa) in perm.iter().enumerate() {
        for (b, &pb) in perm.iter().enumerate() {
            hp[a * k + b] = h[pa * k + pb];
        }
    }
    drop(h);
    let mean_diag = (0..k).map(|i| hp[i * k + i]).sum::<f64>() / k as f64;
    let mut damp = p.damp;
    let u = loop {
        let mut hd = hp.clone();
        for i in 0..k {
            hd[i * k + i] += damp * mean_diag;
        }
        match inverse_cholesky_upper(&hd, k) {
            Ok(u) => break u,
            Err(i) if damp < 1.0 => {
                tracing::warn!(
                    "{what}: Hessian not positive definite at channel {i} with damp {damp}; retrying with {}",
                    (damp * 10.0).min(1.0)
                );
                damp = (damp * 10.0).min(1.0);
                if damp >= 1.0 {
                    damp = 0.999;
                }
            }
            Err(i) => {
                return Err(QuantError::Invalid(format!(
                    "{what}: the Hessian of the calibration inputs is not positive definite (channel {i}) even with damp {damp}"
                )))
            }
        }
    };
    drop(hp);
    let u: Vec<f32> = u.iter().map(|&v| v as f32).collect();
    let mut wp = vec![0f32; n * k];
    for r in 0..n {
        for (a, &pa) in perm.iter().enumerate() {
            wp[r * k + a] = w[r * k + pa];
        }
    }
    drop(w);

    let mut codes = vec![0u8; n * k];
    let mut params = vec![
        GroupParams {
            scale: 1.0,
            zero: 0.0,
            maxq: 1
        };
        n * n_groups
    ];
    let bs = p.block_size;
    wp.par_chunks_mut(ROW_TILE * k)
        .zip(codes.par_chunks_mut(ROW_TILE * k))
        .zip(params.par_chunks_mut(ROW_TILE * n_groups))
        .enumerate()
        .for_each(|(tile, ((wt, ct), pt))| {
            let rows = wt.len() / k;
            let r0 = tile * ROW_TILE;
            let mut err = vec![0f32; rows * bs];
            let mut i1 = 0;
            while i1 < k {
                let i2 = (i1 + bs).min(k);
                for i in i1..i2 {
                    let d = u[i * k + i];
                    let urow = &u[i * k + i + 1..i * k + i2];
                    for r in 0..rows {
                        let row = &mut wt[r * k..(r + 1) * k];
                        let gp = match &static_params {
                            Some(sp) => sp[(r0 + r) * n_groups + perm[i] / gs],
                            None => {
                                if i % gs == 0 {
                                    pt[r * n_groups + i / gs] =
                                        GroupParams::fit(&row[i..i + gs], p.bits, range);
                                }
                                pt[r * n_groups + i / gs]
                            }
                        };
                        let x = row[i];
                        let q = gp.code(x);
                        ct[r * k + perm[i]] = q as u8;
                        let e = (x - gp.dequant(q)) / d;
                        err[r * bs + (i - i1)] = e;
                        for (wj, uj) in row[i + 1..i2].iter_mut().zip(urow) {
                            *wj -= e * uj;
                        }
                    }
                }
                // Lazy batch: the block's errors reach the channels after it at once.
                if i2 < k {
                    for r in 0..rows {
                        let row = &mut wt[r * k + i2..(r + 1) * k];
                        for t in 0..i2 - i1 {
                            let e = err[r * bs + t];
                            if e == 0.0 {
                                continue;
                            }
                            let urow = &u[(i1 + t) * k + i2..(i1 + t + 1) * k];
                            for (wj, uj) in row.iter_mut().zip(urow) {
                                *wj -= e * uj;
                            }
                        }
                    }
                }
                i1 = i2;
            }
        });
    if let Some(sp) = static_params {
        params = sp;
    }
    // Group of each storage-order channel: with act-order (and groups fitted in visiting order),
    // the group of the position the channel was visited at.
    let g_idx: Vec<u32> = if p.act_order && !p.static_groups {
        let mut inv = vec![0usize; k];
        for (a, &pa) in perm.iter().enumerate() {
            inv[pa] = a;
        }
        (0..k).map(|c| (inv[c] / gs) as u32).collect()
    } else {
        (0..k).map(|c| (c / gs) as u32).collect()
    };
    let gc = GroupCodes {
        n,
        k,
        bits: p.bits,
        codes,
        scales: params.iter().map(|q| q.scale).collect(),
        zeros: params.iter().map(|q| q.zero).collect(),
        n_groups,
    };
    GptqTensor::from_codes(p.config(), gc, g_idx, what)
}

/// Round-to-nearest quantization of `w` `[n, k]` with GPTQ's min-max grid, as a GPTQ tensor
/// (the `rtn-int4` baseline; any of GPTQ's bit widths).
pub fn rtn_gptq(
    w: &[f32],
    n: usize,
    k: usize,
    p: &GptqParams,
    what: &str,
) -> Result<GptqTensor, QuantError> {
    p.check(k, what)?;
    let gs = p.group_size.unwrap_or(k);
    let gc = rtn_quantize(w, n, k, p.bits, gs, GroupRange::GptqMinMax { sym: p.sym })
        .map_err(|e| QuantError::Invalid(format!("{what}: {e}")))?;
    let cfg = GptqConfig {
        desc_act: false,
        ..p.config()
    };
    GptqTensor::from_codes(cfg, gc, (0..k).map(|c| (c / gs) as u32).collect(), what)
}

/// The stored v1 `qzeros` row (`zero − 1` per field) from the zeros of one group: for 2, 4 and 8
/// bits a wrapping subtraction of `0x…0101` from whole words (GPTQModel's v2→v1 conversion, which
/// the reader's addition undoes exactly, borrows included); for 3 bits field by field.
fn v1_zero_row(zeros: &[u32], bits: u32) -> Vec<u32> {
    let mut words = vec![0u32; stream_words(zeros.len(), bits)];
    let mask = (1u32 << bits) - 1;
    if 32 % bits == 0 {
        for (i, &z) in zeros.iter().enumerate() {
            stream_set(&mut words, i, bits, z & mask);
        }
        let one: u32 = (0..32 / bits).map(|j| 1u32 << (bits * j)).sum();
        words.iter_mut().for_each(|w| *w = w.wrapping_sub(one));
    } else {
        for (i, &z) in zeros.iter().enumerate() {
            stream_set(&mut words, i, bits, z.wrapping_sub(1) & mask);
        }
    }
    words
}

impl GptqTensor {
    /// A GPTQ v1 tensor (fp16 scales, `g_idx` written) from codes `[n, k]`, per-(row, group) scales
    /// and zeros, and the group of each input channel.
    pub fn from_codes(
        cfg: GptqConfig,
        c: GroupCodes,
        g_idx: Vec<u32>,
        what: &str,
    ) -> Result<Self, QuantError> {
        let (n, k, b) = (c.n, c.k, c.bits);
        if b != cfg.bits || g_idx.len() != k || c.codes.len() != n * k {
            return Err(QuantError::Invalid(format!(
                "{what}: {}-bit codes of {} elements with {} group indices for a {}-bit [{n}, {k}] weight",
                b,
                c.codes.len(),
                g_idx.len(),
                cfg.bits
            )));
        }
        let wpr = stream_words(k, b);
        let mut codes = vec![0u32; n * wpr];
        for r in 0..n {
            let row = &mut codes[r * wpr..(r + 1) * wpr];
            for (i, &q) in c.codes[r * k..(r + 1) * k].iter().enumerate() {
                stream_set(row, i, b, q as u32);
            }
        }
        let g = c.n_groups;
        let zw = stream_words(n, b);
        let mut qzeros = Vec::with_capacity(g * zw);
        for gi in 0..g {
            let z: Vec<u32> = (0..n).map(|r| c.zeros[r * g + gi] as u32).collect();
            qzeros.extend(v1_zero_row(&z, b));
        }
        let contiguous = cfg
            .group_size
            .map(|gs| g_idx.iter().enumerate().all(|(i, &x)| x as usize == i / gs))
            .unwrap_or(false)
            || g == 1;
        let groups = if contiguous {
            Groups::Contiguous(cfg.group_size.unwrap_or(k).max(1))
        } else {
            Groups::Indexed(g_idx)
        };
        let w = IntWeight {
            gpu: Default::default(),
            n,
            k,
            bits: b,
            wpr,
            codes,
            groups,
            n_groups: g,
            scales: c.scales,
            zeros: c.zeros,
            round: Rounding::F16,
        };
        w.validate(what)?;
        Ok(Self {
            cfg,
            w,
            qzeros,
            scale_dtype: Dtype::F16,
            has_g_idx: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gptq::kernel::stream_get;

    #[test]
    fn v1_zero_rows_round_trip_through_the_reader_rule() {
        for bits in [2u32, 3, 4, 8] {
            let zeros: Vec<u32> = (0..16).map(|i| (i * 5) % (1 << bits)).collect();
            let words = v1_zero_row(&zeros, bits);
            // The reader: add one per field (whole words for 2/4/8 bits).
            let back: Vec<u32> = if 32 % bits == 0 {
                let one: u32 = (0..32 / bits).map(|j| 1u32 << (bits * j)).sum();
                let w: Vec<u32> = words.iter().map(|w| w.wrapping_add(one)).collect();
                (0..16).map(|i| stream_get(&w, i, bits)).collect()
            } else {
                (0..16)
                    .map(|i| (stream_get(&words, i, bits) + 1) & ((1 << bits) - 1))
                    .collect()
            };
            assert_eq!(back, zeros, "bits {bits}");
        }
        // Symmetric 4-bit (zero 8) is stored as 0x77777777.
        assert_eq!(v1_zero_row(&[8; 8], 4), vec![0x7777_7777]);
    }
}
