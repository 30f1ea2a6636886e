//! The code tables of the bitsandbytes family: NF4, FP4 and the signed dynamic 8-bit map used by
//! double quantization. Values are the f32 numbers bitsandbytes 0.50 holds in its tables.

use std::sync::OnceLock;

/// NF4 (NormalFloat4, QLoRA): 16 quantiles of N(0, 1) normalised to [-1, 1]; already sorted.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];

/// FP4 (1 sign bit, 2 exponent bits, 1 mantissa bit, bias 2) in bit-pattern order, before
/// normalisation by its largest magnitude (12). Bit 3 is the sign; code 8 is "-0", which
/// bitsandbytes' table holds as +0.0 (its Python literal `-0` is the integer zero), so it
/// dequantizes to +0.0.
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// FP4 codes in ascending value order. +0 (code 0) sorts before -0 (code 8), as torch's argsort
/// puts them; with the "ties go to the lower bucket" rule this maps (-0.0026, 0] to +0 and
/// (0, 0.0026] to -0, which is bitsandbytes' observable behaviour.
pub const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// The FP4 table normalised to [-1, 1], indexed by code.
pub fn fp4_code() -> &'static [f32; 16] {
    static T: OnceLock<[f32; 16]> = OnceLock::new();
    T.get_or_init(|| FP4_RAW.map(|v| v / 12.0))
}

/// Sorted-order midpoints `(s[i] + s[i+1]) / 2` (f32) of a 16-entry table sorted by `order`.
pub(crate) fn midpoints(code: &[f32; 16], order: &[u8; 16]) -> [f32; 15] {
    std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0)
}

/// The signed dynamic 8-bit map (`create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`): 256 sorted values in [-0.99297, 1]. For exponent level `i` in 0..7, the
/// midpoints of `2^i + 1` evenly spaced f32 values in [0.1, 1] are scaled by `10^(i-6)` (and
/// negated), plus 0 and 1.
pub fn dynamic_map() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut data: Vec<f32> = Vec::with_capacity(256);
        for i in 0..7i32 {
            let n = (1usize << i) + 1;
            let b = linspace_f32(0.1, 1.0, n);
            // Python's `10 ** (i - 6)` is a double; torch multiplies in f32.
            let scale = [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0][i as usize] as f32;
            for w in b.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                data.push(scale * mean);
                data.push(-scale * mean);
            }
        }
        data.push(0.0);
        data.push(1.0);
        data.sort_by(|a, b| a.total_cmp(b));
        data.try_into().expect("256 values")
    })
}

/// `torch.linspace(start, end, n, dtype=float32)` as torch's CPU kernel computes it: the f32 step
/// `(end - start) / (n - 1)`; the first half counted up from `start`, the second half down from
/// `end`, each element one fused multiply-add (checked bit for bit against torch 2.15).
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp4_order_sorts_the_table() {
        let c = fp4_code();
        for w in FP4_ORDER.windows(2) {
            assert!(c[w[0] as usize] <= c[w[1] as usize]);
        }
        let mut seen = FP4_ORDER.to_vec();
        seen.sort();
        assert_eq!(seen, (0..16).collect::<Vec<u8>>());
    }

    #[test]
    fn dynamic_map_ends() {
        let m = dynamic_map();
        assert_eq!(m[255], 1.0);
        assert!((m[0] + 0.992_968_75).abs() < 1e-7, "{}", m[0]);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
    }
}
