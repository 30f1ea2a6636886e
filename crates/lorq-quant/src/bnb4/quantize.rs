//! Blockwise 4-bit quantization (`quantize_4bit` / `dequantize_4bit` of bitsandbytes 0.50).
//!
//! The input is the row-major flattened weight, cut into blocks of `blocksize` consecutive
//! elements (the last one may be short). Per block: `absmax = max |x|` (f32);
//! `scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)` (the short last block divides instead:
//! `x / max(absmax, 1e-38)`); the code is the bucket of `scaled` among the midpoints of the sorted
//! table, an exact tie going to the lower code. Codes are packed two per byte, element `2i` in the
//! high nibble; an odd count is padded with the code of 0.0.

use super::codes::{fp4_code, midpoints, FP4_ORDER, NF4_CODE};
use super::Bnb4Type;

const IDENTITY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// bitsandbytes clamps absmax to this before taking its reciprocal (an all-zero block gives codes of 0).
const TINY: f32 = 1e-38;

struct Bucketizer {
    mids: [f32; 15],
    order: [u8; 16],
}

impl Bucketizer {
    fn new(qt: Bnb4Type) -> Self {
        match qt {
            Bnb4Type::Nf4 => Self {
                mids: midpoints(&NF4_CODE, &IDENTITY),
                order: IDENTITY,
            },
            Bnb4Type::Fp4 => Self {
                mids: midpoints(fp4_code(), &FP4_ORDER),
                order: FP4_ORDER,
            },
        }
    }

    /// `torch.bucketize(v, mids)` (right=False: the count of midpoints strictly below `v`),
    /// mapped back from sorted position to code.
    #[inline]
    fn code(&self, v: f32) -> u8 {
        let pos = self.mids.iter().filter(|&&m| m < v).count();
        self.order[pos]
    }
}

/// Quantize `x` (the flattened weight, as f32) into packed nibbles and per-block f32 absmax.
pub fn quantize_4bit(x: &[f32], blocksize: usize, qt: Bnb4Type) -> (Vec<u8>, Vec<f32>) {
    assert!(blocksize > 0);
    let n = x.len();
    let bucket = Bucketizer::new(qt);
    let full = n - n % blocksize;
    let mut codes: Vec<u8> = Vec::with_capacity(n + 1);
    let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
    for (b, block) in x.chunks(blocksize).enumerate() {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        let am = am.max(TINY);
        if b * blocksize < full {
            let r = 1.0 / am;
            codes.extend(block.iter().map(|&v| bucket.code((v * r).clamp(-1.0, 1.0))));
        } else {
            codes.extend(
                block
                    .iter()
                    .map(|&v| bucket.code((v / am).clamp(-1.0, 1.0))),
            );
        }
    }
    if n % 2 == 1 {
        codes.push(bucket.code(0.0));
    }
    let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

/// The nibble of element `e` of the packed stream.
#[inline]
pub fn nibble(packed: &[u8], e: usize) -> u8 {
    let b = packed[e / 2];
    if e & 1 == 0 {
        b >> 4
    } else {
        b & 0x0f
    }
}

/// `out[i] = code[nibble(start + i)] * scales[(start + i) / blocksize]`, in f32 (bitsandbytes'
/// dequantization, before the cast to the weight dtype).
pub fn dequantize_range(
    packed: &[u8],
    scales: &[f32],
    blocksize: usize,
    code: &[f32; 16],
    start: usize,
    out: &mut [f32],
) {
    let end = start + out.len();
    let mut e = start;
    while e < end {
        let block = e / blocksize;
        let seg_end = ((block + 1) * blocksize).min(end);
        let s = scales[block];
        let lut: [f32; 16] = std::array::from_fn(|i| code[i] * s);
        let o = &mut out[e - start..seg_end - start];
        let mut i = 0;
        let mut ee = e;
        if ee % 2 == 1 && i < o.len() {
            o[0] = lut[(packed[ee / 2] & 0x0f) as usize];
            i = 1;
            ee += 1;
        }
        // Whole bytes: two elements each.
        let pairs = (o.len() - i) / 2;
        let bytes = &packed[ee / 2..ee / 2 + pairs];
        for (k, &byte) in bytes.iter().enumerate() {
            o[i + 2 * k] = lut[(byte >> 4) as usize];
            o[i + 2 * k + 1] = lut[(byte & 0x0f) as usize];
        }
        i += 2 * pairs;
        if i < o.len() {
            o[i] = lut[(packed[(ee + 2 * pairs) / 2] >> 4) as usize];
        }
        e = seg_end;
    }
}
