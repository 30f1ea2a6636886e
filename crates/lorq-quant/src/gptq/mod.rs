//! Pre-quantized GPTQ weights as GPTQModel 7.7 (and auto-gptq) write them: bits 2, 3, 4, 8; any group
//! size including -1 (one group); act-order (`desc_act`, `g_idx`); symmetric or not; the `gptq` (v1)
//! format, whose stored zeros are `zero − 1`, and `gptq_v2`, which stores them as they are.
//!
//! `W[n, k] = scales[g, n] · (q[k, n] − zero[g, n])` with `g = g_idx[k]` (`k / group_size` without
//! act-order). GPTQModel computes this product in the scales' dtype (fp16); so does lorq (the exact
//! f32 product, rounded once to fp16), so `dequantize` equals GPTQModel's `dequantize_weight()` bit
//! for bit, in any output dtype that holds fp16 values exactly.
//!
//! Tensor layout: [`state_dict`]. Quantizing a full-precision weight (GPTQ from calibration
//! statistics, or round-to-nearest) into this layout: [`quantize`]. The in-memory form and the fused CPU kernel, shared with AWQ and
//! compressed-tensors: [`kernel`].

pub(crate) mod kernel;
mod linalg;
pub mod quantize;
pub(crate) mod state_dict;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::{QuantError, QuantTensor};
use kernel::IntWeight;

/// How the zeros are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptqFormat {
    /// `checkpoint_format: "gptq"`: stored zero = zero − 1 (auto-gptq's convention).
    V1,
    /// `checkpoint_format: "gptq_v2"`: zeros stored as they are.
    V2,
}

impl GptqFormat {
    pub fn name(self) -> &'static str {
        match self {
            GptqFormat::V1 => "gptq",
            GptqFormat::V2 => "gptq_v2",
        }
    }
}

/// The `quantization_config` of a GPTQ checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptqConfig {
    /// 2, 3, 4 or 8.
    pub bits: u32,
    /// `None` for `group_size: -1` (one group over all input features).
    pub group_size: Option<usize>,
    /// Act-order: `g_idx` maps each input channel to its group.
    pub desc_act: bool,
    pub sym: bool,
    pub format: GptqFormat,
}

fn key_err(key: &str, v: &Value, why: &str) -> QuantError {
    QuantError::Invalid(format!("quantization_config: {key} = {v}: {why}"))
}

fn opt_bool(cfg: &Value, key: &str, default: bool) -> Result<bool, QuantError> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(key_err(key, v, "expected true or false")),
    }
}

impl GptqConfig {
    /// Parses a checkpoint's `quantization_config` (GPTQModel's keys, or auto-gptq's
    /// `quantize_config.json`). Refuses what lorq cannot load, naming the key and value.
    pub fn from_json(cfg: &Value) -> Result<Self, QuantError> {
        if !cfg.is_object() {
            return Err(QuantError::Invalid(format!(
                "quantization_config must be a JSON object, got {cfg}"
            )));
        }
        if let Some(m) = cfg.get("quant_method") {
            if !m.as_str().is_some_and(|s| s.eq_ignore_ascii_case("gptq")) {
                return Err(key_err("quant_method", m, "expected \"gptq\""));
            }
        }
        let bits_v = cfg
            .get("bits")
            .ok_or_else(|| QuantError::Invalid("quantization_config: missing key bits".into()))?;
        let bits = match bits_v.as_u64() {
            Some(b @ (2 | 3 | 4 | 8)) => b as u32,
            _ => return Err(key_err("bits", bits_v, "GPTQ bits must be 2, 3, 4 or 8")),
        };
        let gs_v = cfg.get("group_size").unwrap_or(&Value::Null);
        let group_size = match gs_v.as_i64() {
            Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            None if gs_v.is_null() => {
                return Err(QuantError::Invalid(
                    "quantization_config: missing key group_size".into(),
                ))
            }
            _ => {
                return Err(key_err(
                    "group_size",
                    gs_v,
                    "expected -1 or a positive integer",
                ))
            }
        };
        let desc_act = opt_bool(cfg, "desc_act", false)?;
        let sym = opt_bool(cfg, "sym", true)?;
        if opt_bool(cfg, "is_marlin_format", false)? {
            return Err(key_err(
                "is_marlin_format",
                &Value::Bool(true),
                "Marlin-repacked GPTQ checkpoints are not supported",
            ));
        }
        let (fkey, fv) = ["checkpoint_format", "format"]
            .iter()
            .find_map(|k| cfg.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
            .unwrap_or(("format", &Value::Null));
        let format = match fv.as_str().map(str::to_ascii_lowercase).as_deref() {
            None if fv.is_null() => GptqFormat::V1,
            Some("gptq") => GptqFormat::V1,
            Some("gptq_v2") => GptqFormat::V2,
            _ => {
                return Err(key_err(
                    fkey,
                    fv,
                    "supported GPTQ checkpoint formats are \"gptq\" and \"gptq_v2\"",
                ))
            }
        };
        if let Some(p) = cfg.get("pack_dtype").filter(|v| !v.is_null()) {
            if p.as_str() != Some("int32") {
                return Err(key_err("pack_dtype", p, "only int32 packing is supported"));
            }
        }
        Ok(Self {
            bits,
            group_size,
            desc_act,
            sym,
            format,
        })
    }

    /// The `quantization_config` as GPTQModel writes it (without `meta`).
    pub fn to_json(&self) -> Value {
        json!({
            "bits": self.bits,
            "checkpoint_format": self.format.name(),
            "desc_act": self.desc_act,
            "format": self.format.name(),
            "group_size": self.group_size.map_or(-1, |g| g as i64),
            "lm_head": false,
            "method": "gptq",
            "pack_dtype": "int32",
            "quant_method": "gptq",
            "sym": self.sym,
        })
    }
}

/// A GPTQ-quantized linear weight `[out, in]`.
#[derive(Debug, Clone)]
pub struct GptqTensor {
    cfg: GptqConfig,
    w: IntWeight,
    /// `qzeros` words as stored (v1 offset included), for a byte-exact save.
    qzeros: Vec<u32>,
    scale_dtype: safetensors::Dtype,
    has_g_idx: bool,
}

impl GptqTensor {
    pub fn config(&self) -> &GptqConfig {
        &self.cfg
    }
    /// Group of each input channel (`g_idx`).
    pub fn g_idx(&self) -> Vec<u32> {
        self.w.g_idx()
    }
    /// The integer code of element `[n, k]`.
    pub fn code(&self, n: usize, k: usize) -> u32 {
        kernel::stream_get(
            &self.w.codes[n * self.w.wpr..(n + 1) * self.w.wpr],
            k,
            self.w.bits,
        )
    }
    /// The zero point (after the v1 correction) of output `n`, group `g`.
    pub fn zero(&self, n: usize, g: usize) -> u32 {
        self.w.zeros[n * self.w.n_groups + g] as u32
    }
    /// The scale of output `n`, group `g`.
    pub fn scale(&self, n: usize, g: usize) -> f32 {
        self.w.scales[n * self.w.n_groups + g]
    }
    pub fn n_groups(&self) -> usize {
        self.w.n_groups
    }
    /// The dequantized weight `[out, in]` row-major in f32 (exact; see the module notes).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        self.w.dequantize_f32()
    }
}

impl QuantTensor for GptqTensor {
    fn shape(&self) -> (usize, usize) {
        (self.w.n, self.w.k)
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError> {
        self.w.matmul(x, "gptq")
    }

    #[cfg(feature = "cuda")]
    fn gpu_packed(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<Option<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>, QuantError> {
        self.w.gpu_packed(dev, "gptq")
    }

    fn gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        self.w.gpu_layout()
    }

    fn matmul_grad_input(&self, dy: &Tensor) -> Result<Tensor, QuantError> {
        self.w.matmul_grad_input(dy, "gptq")
    }

    fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError> {
        self.w.dequantize(dtype)
    }

    fn bytes(&self) -> usize {
        let w = &self.w;
        (w.codes.len() + self.qzeros.len()) * 4
            + w.scales.len() * self.scale_dtype.bitsize() / 8
            + if self.has_g_idx { w.k * 4 } else { 0 }
    }

    fn format_name(&self) -> String {
        format!("gptq-{}bit", self.cfg.bits)
    }

    fn state_dict(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, crate::raw_tensor::RawTensor)>, QuantError> {
        Ok(self.to_state_dict(prefix))
    }
}
