//! Round-to-nearest symmetric INT4 with a per-block absmax scale: the "Int4" baseline the QLoRA
//! write-up compares NF4 and FP4 against (blocks of 64 over the row-major weight, codes −7..7,
//! scale = absmax/7, one f32 scale per block). Used as a reference row by `lorq quant-report`.
//!
//! Also the group-wise min-max quantizer every servable integer format lorq writes shares
//! ([`GroupRange`], [`GroupParams`], [`rtn_quantize`]): `lorq quantize --method rtn-int4` (written in
//! the GPTQ layout), GPTQ's per-group scale/zero, and AWQ's pseudo-quantizer. Scales are rounded
//! to fp16 (the dtype the GPTQ and AWQ checkpoints store them in) before any code is chosen, and a
//! dequantized element is `f16(scale · (q − zero))`, the product the readers compute, so the
//! quantizers see exactly the weights the written checkpoint holds.

use crate::QuantError;

/// Block size of the QLoRA comparison (bitsandbytes' 4-bit block size).
pub const RTN_INT4_BLOCK: usize = 64;

/// The dequantized weight `w` takes after symmetric absmax INT4 rounding, and the bytes that
/// format holds (4-bit codes + one f32 scale per block).
pub fn rtn_int4_round_trip(w: &[f32], block: usize) -> (Vec<f32>, usize) {
    let mut out = Vec::with_capacity(w.len());
    for chunk in w.chunks(block) {
        let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = absmax / 7.0;
        if scale == 0.0 {
            out.extend(std::iter::repeat_n(0.0, chunk.len()));
            continue;
        }
        out.extend(
            chunk
                .iter()
                .map(|v| (v / scale).round_ties_even().clamp(-7.0, 7.0) * scale),
        );
    }
    let bytes = w.len().div_ceil(2) + 4 * w.len().div_ceil(block);
    (out, bytes)
}

/// How the range of a group is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupRange {
    /// GPTQ (GPTQModel's `Quantizer.find_params`): the range always contains 0
    /// (`min(x.min, 0) .. max(x.max, 0)`); symmetric: `±max|x|` with zero `(maxq + 1) / 2`.
    GptqMinMax { sym: bool },
    /// AWQ (`pseudo_quantize_tensor`, zero point on): `x.min .. x.max`, scale
    /// `max(max − min, 1e-5) / maxq`, zero `clamp(−round(min / scale), 0, maxq)`.
    AwqMinMax,
}

/// Scale and zero of one group of one output row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupParams {
    /// Rounded to fp16 (and never 0).
    pub scale: f32,
    /// An integer in `0 ..= maxq`.
    pub zero: f32,
    pub maxq: u32,
}

fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

impl GroupParams {
    /// The parameters of the values `x` (one group of one row) at `bits` bits.
    pub fn fit(x: &[f32], bits: u32, range: GroupRange) -> Self {
        let maxq = (1u32 << bits) - 1;
        let (mut lo, mut hi) = x
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if x.is_empty() {
            (lo, hi) = (0.0, 0.0);
        }
        let (scale, zero) = match range {
            GroupRange::GptqMinMax { sym } => {
                lo = lo.min(0.0);
                hi = hi.max(0.0);
                if sym {
                    hi = hi.max(-lo);
                    if lo < 0.0 {
                        lo = -hi;
                    }
                }
                if lo == 0.0 && hi == 0.0 {
                    (lo, hi) = (-1.0, 1.0);
                }
                let scale = Self::stored_scale((hi - lo) / maxq as f32);
                let zero = if sym {
                    maxq.div_ceil(2) as f32
                } else {
                    (-lo / scale).round_ties_even().clamp(0.0, maxq as f32)
                };
                (scale, zero)
            }
            GroupRange::AwqMinMax => {
                let scale = Self::stored_scale((hi - lo).max(1e-5) / maxq as f32);
                let zero = (-(lo / scale).round_ties_even()).clamp(0.0, maxq as f32);
                (scale, zero)
            }
        };
        Self { scale, zero, maxq }
    }

    /// `s` rounded up to the next fp16 (so the range is never clipped by the rounding), kept
    /// positive and finite.
    pub fn stored_scale(s: f32) -> f32 {
        let s = s.abs();
        if s.is_nan() || s > 65504.0 {
            return 65504.0;
        }
        let mut h = half::f16::from_f32(s);
        if h.to_f32() < s {
            h = half::f16::from_bits(h.to_bits() + 1);
        }
        if h.to_f32() > 0.0 {
            h.to_f32()
        } else {
            half::f16::from_bits(1).to_f32()
        }
    }

    /// The code of `v`: `clamp(round(v / scale) + zero, 0, maxq)`.
    #[inline]
    pub fn code(&self, v: f32) -> u32 {
        ((v / self.scale).round_ties_even() + self.zero).clamp(0.0, self.maxq as f32) as u32
    }

    /// The weight code `q` stands for, as the readers compute it: `f16(scale · (q − zero))`.
    #[inline]
    pub fn dequant(&self, q: u32) -> f32 {
        f16_round(self.scale * (q as f32 - self.zero))
    }
}

/// Integer codes of a weight `[n, k]` with per-(row, group) parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupCodes {
    pub n: usize,
    pub k: usize,
    pub bits: u32,
    /// `[n, k]` row-major.
    pub codes: Vec<u8>,
    /// `[n, groups]` (fp16 values).
    pub scales: Vec<f32>,
    /// `[n, groups]`, integers.
    pub zeros: Vec<f32>,
    pub n_groups: usize,
}

impl GroupCodes {
    /// The dequantized weight `[n, k]` for channel groups `group_of(i)`.
    pub fn dequantize(&self, group_of: impl Fn(usize) -> usize) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for r in 0..self.n {
            for c in 0..self.k {
                let g = r * self.n_groups + group_of(c);
                let p = GroupParams {
                    scale: self.scales[g],
                    zero: self.zeros[g],
                    maxq: (1 << self.bits) - 1,
                };
                w[r * self.k + c] = p.dequant(self.codes[r * self.k + c] as u32);
            }
        }
        w
    }
}

/// Checks `bits` and `group_size` against a weight with `k` input features.
pub fn check_grouping(
    k: usize,
    bits: u32,
    group_size: usize,
    what: &str,
) -> Result<(), QuantError> {
    if !(2..=8).contains(&bits) {
        return Err(QuantError::Invalid(format!(
            "{what}: {bits} bits are not supported (2 to 8)"
        )));
    }
    if group_size == 0 || !k.is_multiple_of(group_size) {
        return Err(QuantError::Invalid(format!(
            "{what}: group size {group_size} does not divide the {k} input features"
        )));
    }
    Ok(())
}

/// Round-to-nearest group-wise quantization of `w` `[n, k]` (row-major f32): each row's groups of
/// `group_size` consecutive input channels get their own scale and zero ([`GroupParams::fit`]).
pub fn rtn_quantize(
    w: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    group_size: usize,
    range: GroupRange,
) -> Result<GroupCodes, QuantError> {
    check_grouping(k, bits, group_size, "rtn")?;
    if w.len() != n * k {
        return Err(QuantError::Invalid(format!(
            "rtn: {} weights do not form [{n}, {k}]",
            w.len()
        )));
    }
    let g = k / group_size;
    let mut codes = vec![0u8; n * k];
    let mut scales = vec![0f32; n * g];
    let mut zeros = vec![0f32; n * g];
    for r in 0..n {
        for gi in 0..g {
            let c0 = gi * group_size;
            let x = &w[r * k + c0..r * k + c0 + group_size];
            let p = GroupParams::fit(x, bits, range);
            scales[r * g + gi] = p.scale;
            zeros[r * g + gi] = p.zero;
            for (j, &v) in x.iter().enumerate() {
                codes[r * k + c0 + j] = p.code(v) as u8;
            }
        }
    }
    Ok(GroupCodes {
        n,
        k,
        bits,
        codes,
        scales,
        zeros,
        n_groups: g,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gptq_and_awq_group_params() {
        // GPTQ asym: range [min(x,0), max(x,0)] = [-1, 3] over 15 steps.
        let p = GroupParams::fit(&[-1.0, 0.5, 3.0], 4, GroupRange::GptqMinMax { sym: false });
        assert_eq!(p.scale, GroupParams::stored_scale(4.0 / 15.0));
        assert!(p.scale >= 4.0 / 15.0 && p.scale < 4.0 / 15.0 * 1.001);
        assert_eq!(p.zero, (1.0 / p.scale).round_ties_even());
        assert_eq!(p.code(3.0), 15);
        assert_eq!(p.code(-1.0), 0);
        // All positive: the range still starts at 0, zero = 0.
        let p = GroupParams::fit(&[1.0, 2.0], 4, GroupRange::GptqMinMax { sym: false });
        assert_eq!((p.zero, p.code(0.0)), (0.0, 0));
        // Symmetric: zero 8, scale 2·max|x|/15.
        let p = GroupParams::fit(&[-3.0, 1.0], 4, GroupRange::GptqMinMax { sym: true });
        assert_eq!(
            (p.zero, p.scale),
            (8.0, GroupParams::stored_scale(6.0 / 15.0))
        );
        // AWQ: the range is the data's own, [1, 2].
        let p = GroupParams::fit(&[1.0, 2.0], 4, GroupRange::AwqMinMax);
        assert_eq!(p.scale, GroupParams::stored_scale(1.0 / 15.0));
        assert_eq!(p.zero, 0.0);
        assert_eq!((p.code(1.0), p.code(2.0)), (15, 15)); // AWQ's zero clamp at 0 clips the low end
        let p = GroupParams::fit(&[-2.0, 2.0], 4, GroupRange::AwqMinMax);
        assert_eq!(p.zero, 7.0);
        // Zero weights: a finite, positive scale.
        let p = GroupParams::fit(&[0.0; 4], 3, GroupRange::GptqMinMax { sym: false });
        assert!(p.scale > 0.0 && p.dequant(p.code(0.0)) == 0.0);
    }

    #[test]
    fn rtn_error_is_at_most_half_a_step() {
        let (n, k) = (5, 64);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        for bits in [2, 3, 4, 8] {
            let q =
                rtn_quantize(&w, n, k, bits, 32, GroupRange::GptqMinMax { sym: false }).unwrap();
            let d = q.dequantize(|c| c / 32);
            for r in 0..n {
                for c in 0..k {
                    let s = q.scales[r * 2 + c / 32];
                    let e = (d[r * k + c] - w[r * k + c]).abs();
                    let tol = 0.5 * s + 1e-3 * w[r * k + c].abs() + 1e-6;
                    assert!(e <= tol, "bits {bits} err {e} step {s}");
                }
            }
        }
        let e = rtn_quantize(&w, n, k, 5, 48, GroupRange::AwqMinMax).unwrap_err();
        assert!(
            e.to_string().contains("48") && e.to_string().contains("64"),
            "{e}"
        );
        let e = rtn_quantize(&w, n, k, 9, 32, GroupRange::AwqMinMax).unwrap_err();
        assert!(e.to_string().contains("9 bits"), "{e}");
    }

    #[test]
    fn codes_scales_and_bytes() {
        // absmax 7 -> scale 1: values round to integers, ties to even.
        let w = [7.0, -7.0, 2.5, 3.5, 0.4, -0.6, 0.0, 1.49];
        let (d, bytes) = rtn_int4_round_trip(&w, 8);
        assert_eq!(d, vec![7.0, -7.0, 2.0, 4.0, 0.0, -1.0, 0.0, 1.0]);
        assert_eq!(bytes, 4 + 4);
        let (z, _) = rtn_int4_round_trip(&[0.0; 4], 64);
        assert_eq!(z, vec![0.0; 4]);
    }
}
