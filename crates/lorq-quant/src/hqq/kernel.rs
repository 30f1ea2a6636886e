//! Dequantization straight from the packed codes, and the fused row kernel built on it.
//!
//! Flat weight index `f` sits at grid `(f / cols, f % cols)`; a run of consecutive `f` within one
//! grid row reads consecutive packed elements at one bit shift, with one scale/zero (axis 1) or one
//! scale/zero per element (axis 0). Runs are decoded into a small stack buffer; no full-weight
//! dequantization happens on the matmul path.

use super::{ComputeDtype, HqqTensor, PackedCodes};
use crate::cpu::dispatch::simd_dispatch;
use crate::cpu::{dot_f32, RowDot};

/// Weight elements decoded at a time by the row kernel.
const CHUNK: usize = 512;

trait Word: Copy {
    fn bits(self) -> u32;
}
impl Word for u8 {
    #[inline(always)]
    fn bits(self) -> u32 {
        self as u32
    }
}
impl Word for i32 {
    #[inline(always)]
    fn bits(self) -> u32 {
        self as u32
    }
}

impl HqqTensor {
    /// Writes the dequantized flat weight elements `f0 .. f0 + out.len()` into `out`, exactly as
    /// hqq's `(W_q − zero) · scale` in the compute dtype.
    #[inline(always)]
    pub(super) fn fill(&self, f0: usize, out: &mut [f32]) {
        match self.compute {
            ComputeDtype::F32 => self.fill_with(f0, out, |x| x),
            c => self.fill_with(f0, out, move |x| c.round(x)),
        }
    }

    #[inline(always)]
    fn fill_with(&self, f0: usize, out: &mut [f32], rnd: impl Fn(f32) -> f32 + Copy) {
        let cols = self.grid.1;
        let mut done = 0;
        while done < out.len() {
            let f = f0 + done;
            let (r, c) = (f / cols, f % cols);
            let seg = (cols - c).min(out.len() - done);
            let (slot, pr) = (r / self.prow, r % self.prow);
            let shift = self.packing.shift(slot);
            let mask = self.packing.mask();
            let base = pr * cols + c;
            let dst = &mut out[done..done + seg];
            let axis1 = self.cfg.axis == 1;
            match &self.packed {
                PackedCodes::U8(v) => {
                    self.decode(&v[base..base + seg], dst, shift, mask, r, c, axis1, rnd)
                }
                PackedCodes::I32(v) => {
                    self.decode(&v[base..base + seg], dst, shift, mask, r, c, axis1, rnd)
                }
            }
            done += seg;
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn decode<W: Word>(
        &self,
        src: &[W],
        dst: &mut [f32],
        shift: u32,
        mask: u32,
        r: usize,
        c: usize,
        axis1: bool,
        rnd: impl Fn(f32) -> f32 + Copy,
    ) {
        if axis1 {
            let (z, s) = (self.zero[r], self.scale[r]);
            for (o, &b) in dst.iter_mut().zip(src) {
                *o = rnd(rnd(((b.bits() >> shift) & mask) as f32 - z) * s);
            }
        } else {
            let n = dst.len();
            let (zs, ss) = (&self.zero[c..c + n], &self.scale[c..c + n]);
            for (((o, &b), &z), &s) in dst.iter_mut().zip(src).zip(zs).zip(ss) {
                *o = rnd(rnd(((b.bits() >> shift) & mask) as f32 - z) * s);
            }
        }
    }
}

impl HqqTensor {
    /// The fused GPU kernels' layout (groups along in_features only: axis 1).
    pub(crate) fn packed_gpu_layout(
        &self,
    ) -> Result<crate::gpu_layout::GpuLayout, crate::QuantError> {
        use crate::gpu_layout::{CodeKind, ElementRounding, GpuLayout};
        if self.cfg.axis != 1 {
            return Err(crate::QuantError::Invalid(
                "hqq axis-0 grouping has no GPU kernel".into(),
            ));
        }
        let (n, k) = self.shape;
        let g = self.grid.1;
        let rounding = match self.compute {
            ComputeDtype::F32 => ElementRounding::None,
            ComputeDtype::F16 => ElementRounding::F16Twice,
            ComputeDtype::BF16 => ElementRounding::Bf16Twice,
        };
        let mask = self.packing.mask();
        let code = |r: usize, c: usize| {
            let f = r * k + c;
            let (gr, gc) = (f / g, f % g);
            let (slot, pr) = (gr / self.prow, gr % self.prow);
            let i = pr * g + gc;
            let w = match &self.packed {
                PackedCodes::U8(v) => v[i].bits(),
                PackedCodes::I32(v) => v[i].bits(),
            };
            (w >> self.packing.shift(slot)) & mask
        };
        GpuLayout::pack(
            n,
            k,
            CodeKind::Affine {
                bits: self.cfg.nbits,
            },
            g,
            self.scale.clone(),
            self.zero.clone(),
            rounding,
            None,
            code,
        )
    }
}

const L: usize = 16;

/// Adds `((code − z) · s) · x` over one group into 16 lane accumulators (the dequantized value is
/// hqq's, bit for bit); returns the sum of the elements past the last full 16-lane chunk.
#[inline(always)]
fn group_dot<W: Word>(
    acc: &mut [f32; L],
    src: &[W],
    shift: u32,
    mask: u32,
    z: f32,
    s: f32,
    x: &[f32],
) -> f32 {
    let (sc, xc) = (src.chunks_exact(L), x.chunks_exact(L));
    let (sr, xr) = (sc.remainder(), xc.remainder());
    for (a, b) in sc.zip(xc) {
        for i in 0..L {
            let w = (((a[i].bits() >> shift) & mask) as f32 - z) * s;
            acc[i] = w.mul_add(b[i], acc[i]);
        }
    }
    let mut t = 0f32;
    for (a, b) in sr.iter().zip(xr) {
        t += ((((a.bits() >> shift) & mask) as f32 - z) * s) * b;
    }
    t
}

/// Row `j` · `x` for axis 1 with group_size | in_features: groups `j·k/gs ..` are grid rows, each
/// one contiguous run of packed elements at one shift.
#[inline(always)]
fn fused_row<W: Word>(t: &HqqTensor, packed: &[W], j: usize, x: &[f32]) -> f32 {
    let gs = t.cfg.group_size;
    let per_row = t.shape.1 / gs;
    let mask = t.packing.mask();
    let g0 = j * per_row;
    let (mut slot, mut pr) = (g0 / t.prow, g0 % t.prow);
    let mut acc = [0f32; L];
    let mut tail = 0f32;
    for (gi, xs) in x.chunks_exact(gs).enumerate() {
        let g = g0 + gi;
        let src = &packed[pr * gs..(pr + 1) * gs];
        tail += group_dot(
            &mut acc,
            src,
            t.packing.shift(slot),
            mask,
            t.zero[g],
            t.scale[g],
            xs,
        );
        pr += 1;
        if pr == t.prow {
            pr = 0;
            slot += 1;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One output row: for a single activation row (axis 1, fp32 compute, groups within rows) the
/// codes are decoded straight into the dot product; otherwise row chunks are decoded into a stack
/// buffer once and dotted with every activation row.
#[inline(always)]
fn dot_row_generic(t: &HqqTensor, j: usize, x: &[f32], out: &mut [f32]) {
    let k = t.shape.1;
    let gs = t.cfg.group_size;
    out.iter_mut().for_each(|o| *o = 0.0);
    if out.len() == 1
        && t.cfg.axis == 1
        && t.compute == ComputeDtype::F32
        && k.checked_rem(gs) == Some(0)
    {
        out[0] = match &t.packed {
            PackedCodes::U8(v) => fused_row(t, v, j, x),
            PackedCodes::I32(v) => fused_row(t, v, j, x),
        };
        return;
    }
    let mut buf = [0f32; CHUNK];
    let mut c0 = 0;
    while c0 < k {
        let n = CHUNK.min(k - c0);
        t.fill(j * k + c0, &mut buf[..n]);
        for (o, xr) in out.iter_mut().zip(x.chunks_exact(k)) {
            *o += dot_f32(&xr[c0..c0 + n], &buf[..n]);
        }
        c0 += n;
    }
}

simd_dispatch!(fn dot_row(t: &HqqTensor, j: usize, x: &[f32], out: &mut [f32]) => dot_row_generic);

/// The row-kernel view of an [`HqqTensor`].
pub(super) struct HqqRows<'a>(pub &'a HqqTensor);

impl RowDot for HqqRows<'_> {
    fn rows(&self) -> usize {
        self.0.shape.0
    }
    fn cols(&self) -> usize {
        self.0.shape.1
    }
    fn dot_row(&self, j: usize, x: &[f32], out: &mut [f32]) {
        dot_row(self.0, j, x, out)
    }
}
