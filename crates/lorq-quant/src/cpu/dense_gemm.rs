//! `y = x · Wᵀ` for dense f32/bf16 weights, written for the shapes LLM inference has on a CPU.
//!
//! Both operands are contiguous along k (`x` `[m, k]`, `W` `[n, k]`), so the kernel works in
//! dot-product form: a tile of `MR` activation rows × `NR` weight rows keeps `MR·NR` vector
//! accumulators in registers, loads each 16-wide chunk of the `MR + NR` rows once and issues
//! `MR·NR` FMAs per chunk (4×4: 8 loads for 16 FMAs). Weight rows are converted to f32 as they are
//! loaded (bf16 is the upper half of an f32, so that is exact). Output rows are split across threads.

use rayon::prelude::*;

const MR: usize = 4;
const NR: usize = 4;
/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;

pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// SIMD dot of an f32 row with a row of this type (the fallback without AVX-512).
    fn dot(x: &[f32], w: &[Self]) -> f32;
    /// 16 elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// AVX-512F must be available and `p` must point at 16 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_dyn(p: *const Self) -> std::arch::x86_64::__m512;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn dot(x: &[f32], w: &[f32]) -> f32 {
        super::dot_f32(x, w)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_dyn(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl WeightElem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    fn dot(x: &[f32], w: &[half::bf16]) -> f32 {
        super::dot_bf16(x, w)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_dyn(p: *const half::bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // bf16 -> f32 is a 16-bit left shift of the bits.
        let v = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))
    }
}

/// `R` activation rows × `C` weight rows, full dot products over `k`.
#[inline(always)]
fn tile<T: WeightElem, const R: usize, const C: usize>(
    x: [&[f32]; R],
    w: [&[T]; C],
    k: usize,
) -> [[f32; C]; R] {
    #[cfg(target_arch = "x86_64")]
    if avx512_available() {
        let xp = x.map(|r| r.as_ptr());
        let wp = w.map(|r| r.as_ptr());
        // SAFETY: AVX-512F was detected; every row holds at least `k` elements (checked by callers).
        return unsafe { avx512::tile::<T, R, C>(xp, wp, k) };
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            out[r][c] = T::dot(x[r], &w[c][..k]);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::WeightElem;

    /// # Safety
    /// AVX-512F must be available and every row must hold at least `k` elements.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<T: WeightElem, const R: usize, const C: usize>(
        x: [*const f32; R],
        w: [*const T; C],
        k: usize,
    ) -> [[f32; C]; R] {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut i = 0;
        while i + 16 <= k {
            let mut wv = [_mm512_setzero_ps(); C];
            for c in 0..C {
                wv[c] = T::load16_dyn(w[c].add(i));
            }
            for r in 0..R {
                let xv = _mm512_loadu_ps(x[r].add(i));
                for c in 0..C {
                    acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
                }
            }
            i += 16;
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                let mut s = _mm512_reduce_add_ps(acc[r][c]);
                for t in i..k {
                    s += *x[r].add(t) * (*w[c].add(t)).to_f32();
                }
                out[r][c] = s;
            }
        }
        out
    }
}

/// Rows `j0..j0+nb` of the output, stored `[nb, m]` in `out`.
fn block<T: WeightElem>(
    w: &[T],
    k: usize,
    j0: usize,
    nb: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let wrow = |j: usize| &w[(j0 + j) * k..(j0 + j + 1) * k];
    let xrow = |i: usize| &x[i * k..(i + 1) * k];
    let mut j = 0;
    while j < nb {
        if j + NR <= nb {
            let ws = [wrow(j), wrow(j + 1), wrow(j + 2), wrow(j + 3)];
            let mut i = 0;
            while i + MR <= m {
                let t = tile::<T, MR, NR>([xrow(i), xrow(i + 1), xrow(i + 2), xrow(i + 3)], ws, k);
                for (r, row) in t.iter().enumerate() {
                    for (c, v) in row.iter().enumerate() {
                        out[(j + c) * m + i + r] = *v;
                    }
                }
                i += MR;
            }
            while i < m {
                let t = tile::<T, 1, NR>([xrow(i)], ws, k);
                for (c, v) in t[0].iter().enumerate() {
                    out[(j + c) * m + i] = *v;
                }
                i += 1;
            }
            j += NR;
        } else {
            let ws = [wrow(j)];
            let mut i = 0;
            while i + MR <= m {
                let t = tile::<T, MR, 1>([xrow(i), xrow(i + 1), xrow(i + 2), xrow(i + 3)], ws, k);
                for r in 0..MR {
                    out[j * m + i + r] = t[r][0];
                }
                i += MR;
            }
            while i < m {
                out[j * m + i] = tile::<T, 1, 1>([xrow(i)], ws, k)[0][0];
                i += 1;
            }
            j += 1;
        }
    }
}

/// `y = x · Wᵀ`: `w` `[n, k]`, `x` `[m, k]`, returns `[m, n]`, all row-major.
pub fn dense_matmul<T: WeightElem>(w: &[T], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert!(
        w.len() >= n * k && x.len() == m * k,
        "dense_matmul: shapes do not match"
    );
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            let j0 = task * ROWS_PER_TASK;
            block(w, k, j0, out.len() / m, x, m, out);
        });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            y[i * n + j] = yt[j * m + i];
        }
    }
    y
}
