//! Round-to-nearest symmetric INT4 with a per-block absmax scale: the "Int4" baseline the QLoRA
//! write-up compares NF4 and FP4 against (blocks of 64 over the row-major weight, codes −7..7,
//! scale = absmax/7, one f32 scale per block). Used as a reference row by `lorq quant-report`;
//! a servable RTN format (GPTQ layout, `--method rtn-int4`) comes with the export issue.

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

#[cfg(test)]
mod tests {
    use super::*;

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
