//! Pre-quantized AWQ weights in the GEMM layout (AutoAWQ `WQLinear_GEMM`, GPTQModel `FORMAT.GEMM`), 4-bit.
//!
//! Tensors under a module prefix `P` (K in, N out, G = K / group_size):
//! `P.qweight` I32 `[K, N/8]`, `P.qzeros` I32 `[G, N/8]`, `P.scales` F16 `[G, N]`; no `g_idx`.
//! Both packed tensors hold 8 output columns per word in AWQ's interleaved order: nibble `i`
//! (bits `4i..4i+3`) of word `c` holds column `8c + [0, 2, 4, 6, 1, 3, 5, 7][i]`.
//! Zeros carry no offset: `W[n, k] = scales[g, n] · (q[k, n] − zeros[g, n])`, `g = k / group_size`.
//! The libraries compute this in the scales' dtype (fp16), and so does lorq (exact f32 product
//! rounded once), so `dequantize` equals their `dequantize_gemm` bit for bit.

pub mod quantize;

use candle_core::{DType, Tensor};
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::gptq::kernel::{stream_get, stream_set, stream_words, Groups, IntWeight, Rounding};
use crate::gptq::state_dict::{float_raw, float_values, i32_raw, shape_of, transpose, u32_values};
use crate::raw_tensor::{need_raw, RawTensor};
use crate::{QuantError, QuantTensor};

/// Logical column (within a word's 8) held by nibble `i`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Nibble holding logical column `c` (within a word's 8).
pub const AWQ_REVERSE_ORDER: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The `quantization_config` of an AWQ GEMM checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwqConfig {
    /// Always 4.
    pub bits: u32,
    pub group_size: usize,
}

fn key_err(key: &str, v: &Value, why: &str) -> QuantError {
    QuantError::Invalid(format!("quantization_config: {key} = {v}: {why}"))
}

impl AwqConfig {
    /// Parses a checkpoint's `quantization_config` (transformers/AutoAWQ keys `bits`, `group_size`,
    /// `version`, `zero_point`; GPTQModel's `format`/`checkpoint_format`; AutoAWQ's `w_bit`,
    /// `q_group_size`). Refuses anything but 4-bit GEMM with zero points, naming the key and value.
    pub fn from_json(cfg: &Value) -> Result<Self, QuantError> {
        if !cfg.is_object() {
            return Err(QuantError::Invalid(format!(
                "quantization_config must be a JSON object, got {cfg}"
            )));
        }
        if let Some(m) = cfg.get("quant_method") {
            if !m.as_str().is_some_and(|s| s.eq_ignore_ascii_case("awq")) {
                return Err(key_err("quant_method", m, "expected \"awq\""));
            }
        }
        let find = |keys: &[&'static str]| {
            keys.iter()
                .find_map(|k| cfg.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
        };
        let (bkey, bv) = find(&["bits", "w_bit"])
            .ok_or_else(|| QuantError::Invalid("quantization_config: missing key bits".into()))?;
        if bv.as_u64() != Some(4) {
            return Err(key_err(bkey, bv, "AWQ GEMM weights must be 4-bit"));
        }
        let (gkey, gv) = find(&["group_size", "q_group_size"]).ok_or_else(|| {
            QuantError::Invalid("quantization_config: missing key group_size".into())
        })?;
        let group_size = match gv.as_i64() {
            Some(g) if g > 0 => g as usize,
            _ => return Err(key_err(gkey, gv, "expected a positive integer")),
        };
        for key in ["version", "checkpoint_format", "format"] {
            if let Some(v) = cfg.get(key).filter(|v| !v.is_null()) {
                if !v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("gemm")) {
                    return Err(key_err(key, v, "only the GEMM layout of AWQ is supported"));
                }
            }
        }
        if let Some(z) = cfg.get("zero_point").filter(|v| !v.is_null()) {
            if z.as_bool() != Some(true) {
                return Err(key_err(
                    "zero_point",
                    z,
                    "AWQ without zero points is not supported",
                ));
            }
        }
        Ok(Self {
            bits: 4,
            group_size,
        })
    }

    /// The `quantization_config` as transformers writes it for an AutoAWQ GEMM checkpoint.
    pub fn to_json(&self) -> Value {
        json!({
            "bits": self.bits,
            "group_size": self.group_size,
            "modules_to_not_convert": null,
            "quant_method": "awq",
            "version": "gemm",
            "zero_point": true,
        })
    }
}

/// An AWQ GEMM 4-bit linear weight `[out, in]`.
#[derive(Debug, Clone)]
pub struct AwqTensor {
    cfg: AwqConfig,
    w: IntWeight,
    scale_dtype: Dtype,
}

/// Unpacks AWQ-interleaved words `[rows, cols/8]` into `[rows, cols]` codes.
fn unpack_awq(words: &[u32], rows: usize, cols: usize) -> Vec<u8> {
    let wc = cols / 8;
    let mut out = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let w = words[r * wc + c / 8];
            out[r * cols + c] = ((w >> (4 * AWQ_REVERSE_ORDER[c % 8])) & 0xF) as u8;
        }
    }
    out
}

/// Packs `[rows, cols]` 4-bit codes into AWQ-interleaved words `[rows, cols/8]`.
fn pack_awq(codes: &[u8], rows: usize, cols: usize) -> Vec<u32> {
    let wc = cols / 8;
    let mut out = vec![0u32; rows * wc];
    for r in 0..rows {
        for c in 0..cols {
            out[r * wc + c / 8] |= (codes[r * cols + c] as u32) << (4 * AWQ_REVERSE_ORDER[c % 8]);
        }
    }
    out
}

impl AwqTensor {
    /// Loads module `prefix` from `qweight`, `qzeros`, `scales` as AutoAWQ / GPTQModel save them.
    /// Errors name the tensor.
    pub fn from_state_dict(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<RawTensor>,
        cfg: &AwqConfig,
    ) -> Result<Self, QuantError> {
        let qw_name = format!("{prefix}.qweight");
        let qw = need_raw(get, &qw_name)?;
        let qs = shape_of(&qw, &qw_name, Dtype::I32, 2)?;
        let (k, n) = (qs[0], qs[1] * 8);
        let gs = cfg.group_size;
        if k % gs != 0 {
            return Err(QuantError::Invalid(format!(
                "{qw_name}: {k} input features (shape {qs:?}) are not a multiple of group_size {gs}"
            )));
        }
        let g = k / gs;
        let sc_name = format!("{prefix}.scales");
        let (scales, scale_dtype) = float_values(&need_raw(get, &sc_name)?, &sc_name, &[g, n])?;
        let qz_name = format!("{prefix}.qzeros");
        let qz = u32_values(&need_raw(get, &qz_name)?, &qz_name, &[g, n / 8])?;
        let words = u32_values(&qw, &qw_name, &[k, n / 8])?;
        let codes_kn = unpack_awq(&words, k, n);
        let wpr = stream_words(k, 4);
        let mut codes = vec![0u32; n * wpr];
        for (kk, row) in codes_kn.chunks_exact(n.max(1)).enumerate() {
            for (j, &c) in row.iter().enumerate() {
                stream_set(&mut codes[j * wpr..(j + 1) * wpr], kk, 4, c as u32);
            }
        }
        let zeros: Vec<f32> = transpose(&unpack_awq(&qz, g, n), g, n)
            .into_iter()
            .map(f32::from)
            .collect();
        let w = IntWeight {
            gpu: Default::default(),
            n,
            k,
            bits: 4,
            wpr,
            codes,
            groups: Groups::Contiguous(gs),
            n_groups: g,
            scales: transpose(&scales, g, n),
            zeros,
            round: Rounding::of(scale_dtype),
        };
        w.validate(prefix)?;
        Ok(Self {
            cfg: *cfg,
            w,
            scale_dtype,
        })
    }

    /// The tensors under module prefix `prefix`, byte for byte as they were loaded.
    pub fn to_state_dict(&self, prefix: &str) -> Vec<(String, RawTensor)> {
        let w = &self.w;
        let (n, k, g) = (w.n, w.k, w.n_groups);
        let mut codes_kn = vec![0u8; k * n];
        for j in 0..n {
            let row = &w.codes[j * w.wpr..(j + 1) * w.wpr];
            for kk in 0..k {
                codes_kn[kk * n + j] = stream_get(row, kk, 4) as u8;
            }
        }
        let zeros: Vec<u8> = transpose(&w.zeros, n, g).iter().map(|&z| z as u8).collect();
        vec![
            (
                format!("{prefix}.qweight"),
                i32_raw(&[k, n / 8], &pack_awq(&codes_kn, k, n)),
            ),
            (
                format!("{prefix}.qzeros"),
                i32_raw(&[g, n / 8], &pack_awq(&zeros, g, n)),
            ),
            (
                format!("{prefix}.scales"),
                float_raw(&[g, n], &transpose(&w.scales, n, g), self.scale_dtype),
            ),
        ]
    }

    pub fn config(&self) -> &AwqConfig {
        &self.cfg
    }
    /// The 4-bit code of element `[n, k]`.
    pub fn code(&self, n: usize, k: usize) -> u32 {
        stream_get(&self.w.codes[n * self.w.wpr..(n + 1) * self.w.wpr], k, 4)
    }
    /// The dequantized weight `[out, in]` row-major in f32 (exact).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        self.w.dequantize_f32()
    }
}

impl QuantTensor for AwqTensor {
    fn shape(&self) -> (usize, usize) {
        (self.w.n, self.w.k)
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError> {
        self.w.matmul(x, "awq")
    }

    #[cfg(feature = "cuda")]
    fn gpu_packed(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<Option<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>, QuantError> {
        self.w.gpu_packed(dev, "awq")
    }

    fn gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        self.w.gpu_layout()
    }

    fn matmul_grad_input(&self, dy: &Tensor) -> Result<Tensor, QuantError> {
        self.w.matmul_grad_input(dy, "awq")
    }

    fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError> {
        self.w.dequantize(dtype)
    }

    fn bytes(&self) -> usize {
        let w = &self.w;
        w.codes.len() * 4 + w.n_groups * w.n / 2 + w.scales.len() * self.scale_dtype.bitsize() / 8
    }

    fn format_name(&self) -> String {
        "awq-4bit".into()
    }

    fn state_dict(&self, prefix: &str) -> Result<Vec<(String, RawTensor)>, QuantError> {
        Ok(self.to_state_dict(prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_matches_awq_order() {
        // Column 8c + AWQ_ORDER[i] sits in nibble i.
        let codes: Vec<u8> = (0..8).collect();
        let w = pack_awq(&codes, 1, 8)[0];
        for (i, &col) in AWQ_ORDER.iter().enumerate() {
            assert_eq!((w >> (4 * i)) & 0xF, col as u32);
        }
        assert_eq!(unpack_awq(&[w], 1, 8), codes);
    }
}
