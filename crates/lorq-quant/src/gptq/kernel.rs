//! The in-memory form shared by the integer weight-only formats (GPTQ, AWQ GEMM, compressed-tensors
//! pack-quantized) and the fused CPU row kernel on it.
//!
//! Whatever the file layout, each output row `j` is kept as its own dense little-endian bit stream of
//! `in_features` codes (code `i` at bit `i·bits`, fields may straddle 32-bit words — exactly the
//! stream GPTQ keeps per output column and compressed-tensors per output row). A weight element is
//! `scale[j, g] · (code − zero[j, g])` with `g` the group of input channel `i`: `i / group_size`, or
//! `g_idx[i]` (GPTQ act-order). Scales and zeros are held `[out, groups]` so a row reads its own.
//!
//! The row kernel decodes chunks of a row into a stack buffer and hands them to
//! [`crate::cpu::dot_f32`]; no full-weight dequantization happens on the matmul path.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::cpu::{dot_f32, RowDot};
use crate::QuantError;

/// Weight elements decoded at a time by the row kernel (a multiple of 32: chunks start word-aligned
/// for every bit width).
const CHUNK: usize = 512;

/// Which group each input channel belongs to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Groups {
    /// Channel `i` is in group `i / size`.
    Contiguous(usize),
    /// Channel `i` is in group `idx[i]` (GPTQ `g_idx` that is not `i / group_size`).
    Indexed(Vec<u32>),
}

/// The dtype the peer library computes `scale · (code − zero)` in (its scales' dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rounding {
    F32,
    F16,
    BF16,
}

impl Rounding {
    pub(crate) fn of(dtype: safetensors::Dtype) -> Self {
        match dtype {
            safetensors::Dtype::F16 => Rounding::F16,
            safetensors::Dtype::BF16 => Rounding::BF16,
            _ => Rounding::F32,
        }
    }
}

/// Integer codes with per-(row, group) scale and zero.
#[derive(Debug, Clone)]
pub(crate) struct IntWeight {
    /// Output features (rows).
    pub n: usize,
    /// Input features (codes per row).
    pub k: usize,
    pub bits: u32,
    /// 32-bit words per row stream (at least `ceil(k·bits/32)`).
    pub wpr: usize,
    /// `[n, wpr]` row-major.
    pub codes: Vec<u32>,
    pub groups: Groups,
    pub n_groups: usize,
    /// `[n, n_groups]`.
    pub scales: Vec<f32>,
    /// `[n, n_groups]`, integer-valued.
    pub zeros: Vec<f32>,
    /// Each dequantized element is rounded to this dtype.
    pub round: Rounding,
    /// GPU copies (fused CUDA kernels), made on first use.
    pub gpu: crate::gpu_slot::GpuSlot,
}

impl IntWeight {
    /// The fused GPU kernels' layout (GPTQ act-order: columns sorted by group).
    pub(crate) fn gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        use crate::gpu_layout::{sort_by_group, CodeKind, ElementRounding, GpuLayout};
        let rounding = match self.round {
            Rounding::F32 => ElementRounding::None,
            Rounding::F16 => ElementRounding::F16,
            Rounding::BF16 => ElementRounding::Bf16,
        };
        if !matches!(self.bits, 2 | 3 | 4 | 8) {
            return Err(QuantError::Invalid(format!(
                "{}-bit codes have no GPU kernel",
                self.bits
            )));
        }
        let (bits, wpr) = (self.bits, self.wpr);
        let (group, perm) = match &self.groups {
            Groups::Contiguous(size) => (*size, None),
            Groups::Indexed(idx) => {
                let (perm, size) = sort_by_group(idx).ok_or_else(|| {
                    QuantError::Invalid("act-order groups of unequal sizes".into())
                })?;
                (size, Some(perm))
            }
        };
        let col = |c: usize| perm.as_ref().map_or(c, |p: &Vec<u32>| p[c] as usize);
        GpuLayout::pack(
            self.n,
            self.k,
            CodeKind::Affine { bits },
            group,
            self.scales.clone(),
            self.zeros.clone(),
            rounding,
            perm.clone(),
            |r, c| stream_get(&self.codes[r * wpr..(r + 1) * wpr], col(c), bits),
        )
    }
}

/// Code `i` of a dense little-endian stream of `bits`-wide fields.
#[inline(always)]
pub(crate) fn stream_get(words: &[u32], i: usize, bits: u32) -> u32 {
    let bit = i * bits as usize;
    let (w, sh) = (bit / 32, (bit % 32) as u32);
    let mut v = words[w] >> sh;
    if sh + bits > 32 {
        v |= words[w + 1] << (32 - sh);
    }
    v & ((1u32 << bits) - 1)
}

/// Writes code `v` (already masked) at field `i` of a zeroed dense little-endian stream.
#[inline(always)]
pub(crate) fn stream_set(words: &mut [u32], i: usize, bits: u32, v: u32) {
    let bit = i * bits as usize;
    let (w, sh) = (bit / 32, (bit % 32) as u32);
    words[w] |= v << sh;
    if sh + bits > 32 {
        words[w + 1] |= v >> (32 - sh);
    }
}

/// 32-bit words for a stream of `count` fields of `bits` bits.
pub(crate) fn stream_words(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(32)
}

impl IntWeight {
    /// Checks every size and group index.
    pub(crate) fn validate(&self, what: &str) -> Result<(), QuantError> {
        let bad = |m: String| Err(QuantError::Invalid(format!("{what}: {m}")));
        if !(1..=8).contains(&self.bits) {
            return bad(format!("{} bits are not supported", self.bits));
        }
        if self.wpr < stream_words(self.k, self.bits) || self.codes.len() != self.n * self.wpr {
            return bad(format!(
                "{} code words do not hold [{}, {}] {}-bit codes",
                self.codes.len(),
                self.n,
                self.k,
                self.bits
            ));
        }
        if self.scales.len() != self.n * self.n_groups || self.zeros.len() != self.n * self.n_groups
        {
            return bad(format!(
                "{} scales / {} zeros, expected [{}, {}]",
                self.scales.len(),
                self.zeros.len(),
                self.n,
                self.n_groups
            ));
        }
        match &self.groups {
            Groups::Contiguous(gs) => {
                if *gs == 0 || self.k.div_ceil(*gs) != self.n_groups {
                    return bad(format!(
                        "group size {gs} does not give {} groups over {} input features",
                        self.n_groups, self.k
                    ));
                }
            }
            Groups::Indexed(idx) => {
                if idx.len() != self.k {
                    return bad(format!("{} group indices for {} inputs", idx.len(), self.k));
                }
                if let Some(g) = idx.iter().find(|&&g| g as usize >= self.n_groups) {
                    return bad(format!("group index {g} >= {} groups", self.n_groups));
                }
            }
        }
        Ok(())
    }

    /// `g_idx` as the peer libraries write it (`i / group_size` when the groups are contiguous).
    pub(crate) fn g_idx(&self) -> Vec<u32> {
        match &self.groups {
            Groups::Contiguous(gs) => (0..self.k).map(|i| (i / gs) as u32).collect(),
            Groups::Indexed(v) => v.clone(),
        }
    }

    /// The codes of row `j`, input channels `c0 .. c0 + out.len()`, as f32.
    #[inline(always)]
    fn decode_codes(&self, j: usize, c0: usize, out: &mut [f32]) {
        let row = &self.codes[j * self.wpr..(j + 1) * self.wpr];
        let bits = self.bits;
        match bits {
            2 | 4 | 8 if c0.is_multiple_of(32) => {
                let per = (32 / bits) as usize;
                let mask = (1u32 << bits) - 1;
                let w0 = c0 / per;
                for (wi, dst) in out.chunks_mut(per).enumerate() {
                    let w = row[w0 + wi];
                    for (t, d) in dst.iter_mut().enumerate() {
                        *d = ((w >> (bits as usize * t)) & mask) as f32;
                    }
                }
            }
            _ => {
                for (t, d) in out.iter_mut().enumerate() {
                    *d = stream_get(row, c0 + t, bits) as f32;
                }
            }
        }
    }

    /// Dequantized row `j`, input channels `c0 .. c0 + out.len()`: `scale · (code − zero)`, exact in
    /// f32 (f16/bf16 scales, codes of up to 8 bits), then rounded to [`Rounding`] as the peer
    /// library's product in the scales' dtype is.
    #[inline(always)]
    pub(crate) fn fill(&self, j: usize, c0: usize, out: &mut [f32]) {
        self.decode_codes(j, c0, out);
        let g0 = j * self.n_groups;
        let (sc, ze) = (
            &self.scales[g0..g0 + self.n_groups],
            &self.zeros[g0..g0 + self.n_groups],
        );
        match &self.groups {
            Groups::Contiguous(gs) => {
                let mut c = c0;
                let mut done = 0;
                while done < out.len() {
                    let g = c / gs;
                    let seg = ((g + 1) * gs - c).min(out.len() - done);
                    let (s, z) = (sc[g], ze[g]);
                    for v in &mut out[done..done + seg] {
                        *v = s * (*v - z);
                    }
                    done += seg;
                    c += seg;
                }
            }
            Groups::Indexed(idx) => {
                let len = out.len();
                for (v, &g) in out.iter_mut().zip(&idx[c0..c0 + len]) {
                    let g = g as usize;
                    *v = sc[g] * (*v - ze[g]);
                }
            }
        }
        match self.round {
            Rounding::F32 => {}
            Rounding::F16 => out
                .iter_mut()
                .for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
            Rounding::BF16 => out
                .iter_mut()
                .for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        }
    }

    /// The dequantized weight `[n, k]` row-major, f32.
    pub(crate) fn dequantize_f32(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        if self.k == 0 {
            return w;
        }
        w.par_chunks_mut(self.k)
            .enumerate()
            .for_each(|(j, row)| self.fill(j, 0, row));
        w
    }

    pub(crate) fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError> {
        Ok(
            Tensor::from_vec(self.dequantize_f32(), (self.n, self.k), &Device::Cpu)?
                .to_dtype(dtype)?,
        )
    }

    /// `dy · W` (training's input gradient) on `dy`'s device.
    pub(crate) fn matmul_grad_input(&self, dy: &Tensor, what: &str) -> Result<Tensor, QuantError> {
        if let Some(g) =
            crate::gpu_slot::gpu_matmul_grad_input(&self.gpu, dy, what, || self.gpu_layout())?
        {
            return Ok(g);
        }
        let w = self.dequantize(dy.dtype())?.to_device(dy.device())?;
        Ok(dy.matmul(&w)?)
    }

    /// The packed device copy on `dev` for grouped launches (`QuantTensor::gpu_packed`).
    #[cfg(feature = "cuda")]
    pub(crate) fn gpu_packed(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
        what: &str,
    ) -> Result<Option<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>, QuantError> {
        crate::gpu_slot::gpu_packed(&self.gpu, dev, what, || self.gpu_layout())
    }

    /// `x · Wᵀ` for `x` `[.., k]`, in x's dtype: the fused row kernel for up to [`crate::cpu::FUSED_MAX_ROWS`] rows on
    /// CPU, dequantize + f32 GEMM otherwise.
    pub(crate) fn matmul(&self, x: &Tensor, what: &str) -> Result<Tensor, QuantError> {
        if let Some(y) = crate::gpu_slot::gpu_matmul(&self.gpu, x, what, || self.gpu_layout())? {
            return Ok(y);
        }
        crate::cpu::fused_or_dequantized_matmul(&IntRows(self), x, what, || {
            self.dequantize(DType::F32)
        })
    }
}

/// The row-kernel view of an [`IntWeight`].
pub(crate) struct IntRows<'a>(pub &'a IntWeight);

impl RowDot for IntRows<'_> {
    fn rows(&self) -> usize {
        self.0.n
    }
    fn cols(&self) -> usize {
        self.0.k
    }
    fn dot_row(&self, j: usize, x: &[f32], out: &mut [f32]) {
        let k = self.0.k;
        out.iter_mut().for_each(|o| *o = 0.0);
        let mut buf = [0f32; CHUNK];
        let mut c0 = 0;
        while c0 < k {
            let len = CHUNK.min(k - c0);
            self.0.fill(j, c0, &mut buf[..len]);
            for (o, xr) in out.iter_mut().zip(x.chunks_exact(k)) {
                *o += dot_f32(&xr[c0..c0 + len], &buf[..len]);
            }
            c0 += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_round_trip_all_widths() {
        for bits in 1..=8u32 {
            let count = 77;
            let vals: Vec<u32> = (0..count)
                .map(|i| (i as u32 * 7 + 3) & ((1 << bits) - 1))
                .collect();
            let mut w = vec![0u32; stream_words(count, bits)];
            for (i, &v) in vals.iter().enumerate() {
                stream_set(&mut w, i, bits, v);
            }
            for (i, &v) in vals.iter().enumerate() {
                assert_eq!(stream_get(&w, i, bits), v, "bits {bits} i {i}");
            }
        }
    }

    #[test]
    fn gptq_3bit_word_layout() {
        // GPTQ's 3-bit packing: row 10 straddles words 0 and 1 (bits 30-31 and bit 0).
        let mut w = vec![0u32; 3];
        stream_set(&mut w, 10, 3, 0b101);
        assert_eq!(w, vec![0b01 << 30, 0b1, 0]);
        stream_set(&mut w, 21, 3, 0b111);
        assert_eq!(w[1] >> 31, 1);
        assert_eq!(w[2] & 0b11, 0b11);
    }
}
