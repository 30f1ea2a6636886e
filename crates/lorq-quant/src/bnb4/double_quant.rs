//! Double quantization of the 4-bit block absmax (`compress_statistics=True`).
//!
//! `offset = mean(absmax)`; `absmax - offset` is quantized blockwise (blocks of 256) with the
//! signed dynamic 8-bit map, each nested block keeping its own f32 absmax. Dequantized:
//! `absmax[b] = map[code[b]] * nested_absmax[b / 256] + offset`, all in f32.
//!
//! bitsandbytes' CPU build picks the 8-bit codes with a native approximate binary search, which
//! is not always the nearest code (about 1 value in 200 gets a neighbour). lorq picks the nearest
//! code (ties to the lower one, as bitsandbytes' portable kernel does), so codes of a fresh
//! quantization agree with bitsandbytes' to within a code or two; dequantizing bitsandbytes' own
//! codes is exact.

use super::codes::dynamic_map;
use crate::QuantError;

/// bitsandbytes' nested block size.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The 8-bit-compressed absmax of a double-quantized 4-bit tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One 8-bit code per 4-bit block.
    pub codes: Vec<u8>,
    /// f32 absmax of each block of `blocksize` codes.
    pub nested_absmax: Vec<f32>,
    /// The 256-entry map the codes index (as stored in the checkpoint).
    pub code: Vec<f32>,
    /// The mean subtracted before quantizing.
    pub offset: f32,
    /// Codes per nested block (256 in bitsandbytes).
    pub blocksize: usize,
}

impl NestedAbsmax {
    /// Compress `absmax` the way `quantize_4bit(..., compress_statistics=True)` does.
    pub fn quantize(absmax: &[f32]) -> Self {
        // torch's mean is a float32 reduction; f64 accumulation rounds to the same value or one ulp off.
        let offset = if absmax.is_empty() {
            0.0
        } else {
            (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32
        };
        let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
        let code = dynamic_map();
        let (codes, nested_absmax) = quantize_blockwise(&centred, code, NESTED_BLOCKSIZE);
        Self {
            codes,
            nested_absmax,
            code: code.to_vec(),
            offset,
            blocksize: NESTED_BLOCKSIZE,
        }
    }

    /// The f32 absmax of every 4-bit block.
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(b, &c)| {
                self.code[c as usize] * self.nested_absmax[b / self.blocksize] + self.offset
            })
            .collect()
    }

    /// Checks the parts agree with each other (`what` names the tensor for errors).
    pub fn validate(&self, what: &str) -> Result<(), QuantError> {
        if self.code.len() != 256 {
            return Err(QuantError::Invalid(format!(
                "{what}.nested_quant_map: expected 256 values, got {}",
                self.code.len()
            )));
        }
        if self.blocksize == 0
            || self.nested_absmax.len() != self.codes.len().div_ceil(self.blocksize)
        {
            return Err(QuantError::Invalid(format!(
                "{what}.nested_absmax: expected {} values for {} absmax codes in blocks of {}, got {}",
                self.codes.len().div_ceil(self.blocksize.max(1)),
                self.codes.len(),
                self.blocksize,
                self.nested_absmax.len()
            )));
        }
        Ok(())
    }
}

/// 8-bit blockwise quantization with a sorted 256-entry map: per block `absmax = max |x|`,
/// `scaled = clamp(x * (1 / absmax), -1, 1)` (division for a short last block), nearest code with
/// ties to the lower one.
pub fn quantize_blockwise(x: &[f32], code: &[f32; 256], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let full = x.len() - x.len() % blocksize;
    let mut out = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for (b, block) in x.chunks(blocksize).enumerate() {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        let am = am.max(1e-38);
        let r = 1.0 / am;
        for &v in block {
            let s = if b * blocksize < full { v * r } else { v / am };
            // Count of midpoints strictly below s (torch.bucketize, right=False).
            out.push(mids.partition_point(|&m| m < s.clamp(-1.0, 1.0)) as u8);
        }
    }
    (out, absmax)
}
