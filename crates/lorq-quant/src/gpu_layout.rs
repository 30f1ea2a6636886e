//! The one packed layout the fused GPU kernels read (`kernels/qgemv.cu`), built on the host from
//! any weight-only format, and its CPU decoder — the reference those kernels are tested against.
//!
//! Per output row, a dense little-endian stream of `bits`-bit codes (code `k` at bit `k·bits`);
//! `in_features % 32 == 0`, so 32 weights are exactly `bits` 32-bit words, word-aligned. Inputs
//! come in groups of `group` (8, 16 or a multiple of 32) sharing a scale and, for affine codes, a zero:
//! affine `w = s·(q − z)` (GPTQ, AWQ, compressed-tensors, HQQ, EETQ, LLM.int8 weights); table
//! `w = lut[q]·s` (bitsandbytes NF4/FP4, FP8 e4m3). Each element is rounded as the format's CPU
//! kernel rounds it ([`ElementRounding`]), so the exact (f32) GPU path equals the CPU bit for bit
//! up to summation order. GPTQ act-order weights get their input columns sorted by group at
//! build time; the kernel then reads `x[:, perm]`.

use crate::QuantError;

/// How the codes turn into values.
#[derive(Debug, Clone, PartialEq)]
pub enum CodeKind {
    /// `s·(q − z)` with `bits` ∈ {2, 3, 4, 8}.
    Affine { bits: u32 },
    /// `lut[q]·s`, `lut` with `2^bits` entries, `bits` ∈ {4, 8}.
    Table { bits: u32, lut: Vec<f32> },
}

impl CodeKind {
    pub fn bits(&self) -> u32 {
        match self {
            CodeKind::Affine { bits } | CodeKind::Table { bits, .. } => *bits,
        }
    }

    /// The kernel-name tag (`a4`, `t8`, ...).
    pub fn tag(&self) -> String {
        match self {
            CodeKind::Affine { bits } => format!("a{bits}"),
            CodeKind::Table { bits, .. } => format!("t{bits}"),
        }
    }
}

/// The rounding the format's CPU kernel applies to each dequantized element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementRounding {
    None,
    /// `round(s·(q − z))` / `round(lut[q]·s)` to f16 / bf16 (GPTQ/AWQ scales' dtype, FP8 bf16
    /// scales).
    F16,
    Bf16,
    /// hqq: `round(round(q − z)·s)`.
    F16Twice,
    Bf16Twice,
}

impl ElementRounding {
    /// The kernel's `round_mode` argument.
    pub fn mode(self) -> i32 {
        match self {
            ElementRounding::None => 0,
            ElementRounding::F16 => 1,
            ElementRounding::Bf16 => 2,
            ElementRounding::F16Twice => 5,
            ElementRounding::Bf16Twice => 6,
        }
    }

    fn round(self, v: f32) -> f32 {
        match self {
            ElementRounding::None => v,
            ElementRounding::F16 | ElementRounding::F16Twice => half::f16::from_f32(v).to_f32(),
            ElementRounding::Bf16 | ElementRounding::Bf16Twice => half::bf16::from_f32(v).to_f32(),
        }
    }

    fn twice(self) -> bool {
        matches!(self, ElementRounding::F16Twice | ElementRounding::Bf16Twice)
    }
}

/// The GPU kernels' group of input `pos` (kernels/common.cuh `group_magic`): the high word of
/// `pos · ⌈2³² / group⌉`, a multiply instead of a division. Equal to `pos / group` whenever
/// `pos · group < 2³²` ([`group_index_exact`]).
pub fn group_index(pos: u32, group: u32) -> u32 {
    let magic = (u32::MAX / group).wrapping_add(1);
    ((pos as u64 * magic as u64) >> 32) as u32
}

/// Whether [`group_index`] is exact for every input of a `k`-input weight in groups of `group`:
/// `k · group < 2³²` (the tensor-core kernels take only such weights).
pub fn group_index_exact(k: usize, group: usize) -> bool {
    (k as u64).saturating_mul(group as u64) < (1u64 << 32)
}

/// A weight `[n, k]` in the GPU kernels' layout (host copy).
#[derive(Debug, Clone)]
pub struct GpuLayout {
    pub n: usize,
    pub k: usize,
    pub kind: CodeKind,
    /// `[n, k·bits/32]`.
    pub words: Vec<u32>,
    /// Inputs per group (8, 16 or a multiple of 32, dividing `k`).
    pub group: usize,
    /// `[n, k/group]`.
    pub scales: Vec<f32>,
    /// `[n, k/group]`; empty for table codes.
    pub zeros: Vec<f32>,
    pub rounding: ElementRounding,
    /// Input column `i` of the packed weight is column `perm[i]` of the original (act-order).
    pub perm: Option<Vec<u32>>,
}

impl GpuLayout {
    /// Packs `n × k` codes given by `code(row, col)` (already in packed column order).
    #[allow(clippy::too_many_arguments)]
    pub fn pack(
        n: usize,
        k: usize,
        kind: CodeKind,
        group: usize,
        scales: Vec<f32>,
        zeros: Vec<f32>,
        rounding: ElementRounding,
        perm: Option<Vec<u32>>,
        code: impl Fn(usize, usize) -> u32 + Sync,
    ) -> Result<Self, QuantError> {
        use rayon::prelude::*;
        let bits = kind.bits() as usize;
        let group_ok = matches!(group, 8 | 16) || (group > 0 && group.is_multiple_of(32));
        if !k.is_multiple_of(32) || !group_ok || !k.is_multiple_of(group) {
            return Err(QuantError::Invalid(format!(
                "GPU layout needs in_features % 32 == 0 and groups of 8, 16 or a multiple of 32 dividing it (in_features {k}, group {group})"
            )));
        }
        let groups = k / group;
        let table = matches!(kind, CodeKind::Table { .. });
        if scales.len() != n * groups || (!table && zeros.len() != n * groups) {
            return Err(QuantError::Invalid(format!(
                "GPU layout: {} scales / {} zeros for [{n}, {groups}] groups",
                scales.len(),
                zeros.len()
            )));
        }
        let wpr = k * bits / 32;
        let mut words = vec![0u32; n * wpr];
        words.par_chunks_mut(wpr).enumerate().for_each(|(r, row)| {
            for c in 0..k {
                let bit = c * bits;
                let (w, sh) = (bit / 32, bit % 32);
                let v = code(r, c);
                row[w] |= v << sh;
                if sh + bits > 32 {
                    row[w + 1] |= v >> (32 - sh);
                }
            }
        });
        Ok(Self {
            n,
            k,
            kind,
            words,
            group,
            scales,
            zeros,
            rounding,
            perm,
        })
    }

    pub fn words_per_row(&self) -> usize {
        self.k * self.kind.bits() as usize / 32
    }

    pub fn groups(&self) -> usize {
        self.k / self.group
    }

    /// Code `c` of row `r` (packed column order).
    pub fn code(&self, r: usize, c: usize) -> u32 {
        let bits = self.kind.bits() as usize;
        let row = &self.words[r * self.words_per_row()..];
        let bit = c * bits;
        let (w, sh) = (bit / 32, bit % 32);
        let mut v = row[w] >> sh;
        if sh + bits > 32 {
            v |= row[w + 1] << (32 - sh);
        }
        v & ((1u32 << bits) - 1)
    }

    /// Element `(r, c)` (packed column order) exactly as the kernels compute it.
    pub fn element(&self, r: usize, c: usize) -> f32 {
        let g = r * self.groups() + c / self.group;
        let q = self.code(r, c);
        let s = self.scales[g];
        match &self.kind {
            CodeKind::Table { lut, .. } => self.rounding.round(lut[q as usize] * s),
            CodeKind::Affine { .. } => {
                let mut d = q as f32 - self.zeros[g];
                if self.rounding.twice() {
                    d = self.rounding.round(d);
                }
                self.rounding.round(d * s)
            }
        }
    }

    /// The weight `[n, k]` in the original column order (the kernels' CPU reference).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut out = vec![0f32; n * k];
        for r in 0..n {
            for c in 0..k {
                let col = self.perm.as_ref().map_or(c, |p| p[c] as usize);
                out[r * k + col] = self.element(r, c);
            }
        }
        out
    }

    /// Bytes the kernels read per pass over the weight.
    pub fn device_bytes(&self) -> usize {
        4 * (self.words.len() + self.scales.len() + self.zeros.len())
    }
}

/// Input columns sorted by group (stable), when every group then spans whole chunks of equal size:
/// `(perm, group size)`; `None` when act-order groups are uneven.
pub(crate) fn sort_by_group(g_idx: &[u32]) -> Option<(Vec<u32>, usize)> {
    let mut perm: Vec<u32> = (0..g_idx.len() as u32).collect();
    perm.sort_by_key(|&i| g_idx[i as usize]);
    let groups = g_idx.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut counts = vec![0usize; groups];
    for &g in g_idx {
        counts[g as usize] += 1;
    }
    let size = *counts.first()?;
    if counts.iter().any(|&c| c != size) {
        return None;
    }
    Some((perm, size))
}
