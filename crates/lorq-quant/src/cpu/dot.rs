//! Dot products of an f32 activation row with one weight row, in each stored element type.
//!
//! Each kernel is written once as plain Rust over 16-wide chunks (16 independent accumulators, so
//! the compiler keeps one vector register of partial sums) and dispatched by `simd_dispatch!`.

use super::dispatch::simd_dispatch;

const LANES: usize = 16;

#[inline(always)]
fn dot_f32_generic(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let xc = x.chunks_exact(LANES);
    let wc = w.chunks_exact(LANES);
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        for i in 0..LANES {
            acc[i] = a[i].mul_add(b[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in xr.iter().zip(wr) {
        s += a * b;
    }
    s
}

#[inline(always)]
fn bf16_to_f32(b: half::bf16) -> f32 {
    // Exact: bf16 is the upper half of an f32.
    f32::from_bits((b.to_bits() as u32) << 16)
}

#[inline(always)]
fn dot_bf16_generic(x: &[f32], w: &[half::bf16]) -> f32 {
    let mut acc = [0f32; LANES];
    let xc = x.chunks_exact(LANES);
    let wc = w.chunks_exact(LANES);
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        for i in 0..LANES {
            acc[i] = a[i].mul_add(bf16_to_f32(b[i]), acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, &b) in xr.iter().zip(wr) {
        s += a * bf16_to_f32(b);
    }
    s
}

simd_dispatch!(pub fn dot_f32(x: &[f32], w: &[f32]) -> f32 => dot_f32_generic);
simd_dispatch!(pub fn dot_bf16(x: &[f32], w: &[half::bf16]) -> f32 => dot_bf16_generic);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_match_f64_reference() {
        for n in [1, 15, 16, 17, 64, 577] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let w: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2).collect();
            let want: f64 = x.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((dot_f32(&x, &w) as f64 - want).abs() < 1e-4, "n={n}");
            let wb: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
            let want_b: f64 = x.iter().zip(&wb).map(|(a, b)| *a as f64 * b.to_f64()).sum();
            assert!((dot_bf16(&x, &wb) as f64 - want_b).abs() < 1e-4, "n={n}");
        }
    }
}
