//! compressed-tensors (0.20) `pack-quantized` integer weights, symmetric, activations unquantized
//! (W4A16, also W8A16): the format llm-compressor and vLLM use.
//!
//! Tensors under a module prefix `P`: `P.weight_packed` I32 `[out, ceil(in·bits/32)]`,
//! `P.weight_scale` (the model's float dtype, BF16 typically) `[out, G]` (`G = ceil(in/group_size)`,
//! 1 for the `channel` strategy), `P.weight_shape` I64 `[2] = [out, in]`. Each row is a dense
//! little-endian bit stream of `in` fields (element `i` at bit `i·bits`), each the signed value
//! plus `2^(bits−1)`: `W[o, i] = (u − 2^(bits−1)) · scale[o, i / group_size]`, computed (as
//! compressed-tensors decompresses it) in the scale's dtype: the exact f32 product rounded once to
//! bf16, bit for bit the weight transformers decompresses.

use candle_core::{DType, Tensor};
use safetensors::Dtype;
use serde_json::Value;

use crate::gptq::kernel::{stream_get, stream_words, Groups, IntWeight, Rounding};
use crate::gptq::state_dict::{float_raw, float_values, i32_raw, i64_values, shape_of, u32_values};
use crate::raw_tensor::{need_raw, RawTensor};
use crate::{QuantError, QuantTensor};

/// The weight scheme of a compressed-tensors `pack-quantized` checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressedIntConfig {
    /// 4 or 8.
    pub num_bits: u32,
    /// `None` for the `channel` strategy (one scale per output row).
    pub group_size: Option<usize>,
    /// The config group's `targets` (module class names or `re:` patterns).
    pub targets: Vec<String>,
    /// Modules left unquantized (`ignore`).
    pub ignore: Vec<String>,
}

fn key_err(key: &str, v: &Value, why: &str) -> QuantError {
    QuantError::Invalid(format!("quantization_config: {key} = {v}: {why}"))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

impl CompressedIntConfig {
    /// Parses a checkpoint's `quantization_config`; refuses anything but symmetric int weights
    /// (4 or 8 bits, group or channel strategy, static) with unquantized activations in the
    /// `pack-quantized` format, naming the key and value.
    pub fn from_json(cfg: &Value) -> Result<Self, QuantError> {
        if !cfg.is_object() {
            return Err(QuantError::Invalid(format!(
                "quantization_config must be a JSON object, got {cfg}"
            )));
        }
        let qm = cfg.get("quant_method").unwrap_or(&Value::Null);
        if qm.as_str() != Some("compressed-tensors") {
            return Err(key_err(
                "quant_method",
                qm,
                "expected \"compressed-tensors\"",
            ));
        }
        if let Some(s) = cfg.get("quantization_status").filter(|v| !v.is_null()) {
            if s.as_str() != Some("compressed") {
                return Err(key_err(
                    "quantization_status",
                    s,
                    "only compressed checkpoints are supported",
                ));
            }
        }
        let groups = cfg
            .get("config_groups")
            .and_then(Value::as_object)
            .filter(|g| !g.is_empty())
            .ok_or_else(|| {
                QuantError::Invalid(
                    "quantization_config: missing or empty key config_groups".into(),
                )
            })?;
        let top_format = cfg.get("format").filter(|v| !v.is_null());
        let mut out: Option<Self> = None;
        for (name, grp) in groups {
            let at = |k: &str| format!("config_groups.{name}.{k}");
            let fmt = grp
                .get("format")
                .filter(|v| !v.is_null())
                .map(|v| (at("format"), v))
                .or(top_format.map(|v| ("format".to_string(), v)));
            if let Some((k, v)) = fmt {
                if v.as_str() != Some("pack-quantized") {
                    return Err(key_err(
                        &k,
                        v,
                        "only the pack-quantized integer format is handled here",
                    ));
                }
            }
            for k in ["input_activations", "output_activations"] {
                if let Some(v) = grp.get(k).filter(|v| !v.is_null()) {
                    return Err(key_err(
                        &at(k),
                        v,
                        "only weight-only (A16) schemes are supported",
                    ));
                }
            }
            let w = grp
                .get("weights")
                .filter(|v| v.is_object())
                .ok_or_else(|| {
                    QuantError::Invalid(format!(
                        "quantization_config: missing key {}",
                        at("weights")
                    ))
                })?;
            let wk = |k: &str| format!("config_groups.{name}.weights.{k}");
            let get = |k: &str| w.get(k).unwrap_or(&Value::Null);
            if get("type").as_str() != Some("int") {
                return Err(key_err(&wk("type"), get("type"), "expected \"int\""));
            }
            let num_bits = match get("num_bits").as_u64() {
                Some(b @ (4 | 8)) => b as u32,
                _ => return Err(key_err(&wk("num_bits"), get("num_bits"), "expected 4 or 8")),
            };
            if get("symmetric").as_bool() != Some(true) {
                return Err(key_err(
                    &wk("symmetric"),
                    get("symmetric"),
                    "only symmetric pack-quantized weights are supported",
                ));
            }
            if get("dynamic").as_bool() == Some(true) {
                return Err(key_err(
                    &wk("dynamic"),
                    get("dynamic"),
                    "weights must be static",
                ));
            }
            let actorder = get("actorder");
            if !(actorder.is_null() || actorder.as_bool() == Some(false)) {
                return Err(key_err(
                    &wk("actorder"),
                    actorder,
                    "act-order (weight_g_idx) is not supported",
                ));
            }
            let group_size = match get("strategy").as_str() {
                Some("group") => match get("group_size").as_i64() {
                    Some(g) if g > 0 => Some(g as usize),
                    _ => {
                        return Err(key_err(
                            &wk("group_size"),
                            get("group_size"),
                            "expected a positive integer",
                        ))
                    }
                },
                Some("channel") => None,
                _ => {
                    return Err(key_err(
                        &wk("strategy"),
                        get("strategy"),
                        "expected \"group\" or \"channel\"",
                    ))
                }
            };
            let this = Self {
                num_bits,
                group_size,
                targets: strings(grp.get("targets")),
                ignore: strings(cfg.get("ignore")),
            };
            match &out {
                Some(prev) if (prev.num_bits, prev.group_size) != (num_bits, group_size) => {
                    return Err(QuantError::Invalid(format!(
                        "quantization_config: config_groups.{name} differs from the other groups; \
                         several weight schemes in one checkpoint are not supported"
                    )))
                }
                Some(_) => {}
                None => out = Some(this),
            }
        }
        Ok(out.expect("at least one group"))
    }
}

/// A compressed-tensors pack-quantized symmetric integer weight `[out, in]`.
#[derive(Debug, Clone)]
pub struct CompressedIntTensor {
    cfg: CompressedIntConfig,
    w: IntWeight,
    scale_dtype: Dtype,
}

impl CompressedIntTensor {
    /// Loads module `prefix` (`weight_packed`, `weight_scale`, `weight_shape`). Errors name the tensor;
    /// a `weight_zero_point` (asymmetric) or `weight_g_idx` (act-order) is refused.
    pub fn from_state_dict(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<RawTensor>,
        cfg: &CompressedIntConfig,
    ) -> Result<Self, QuantError> {
        for extra in ["weight_zero_point", "weight_g_idx"] {
            let name = format!("{prefix}.{extra}");
            if get(&name).is_some() {
                return Err(QuantError::Invalid(format!(
                    "{name}: asymmetric / act-order pack-quantized weights are not supported"
                )));
            }
        }
        let b = cfg.num_bits;
        let sh_name = format!("{prefix}.weight_shape");
        let shape = i64_values(&need_raw(get, &sh_name)?, &sh_name, &[2])?;
        if shape.iter().any(|&d| d <= 0) {
            return Err(QuantError::Invalid(format!(
                "{sh_name}: invalid weight shape {shape:?}"
            )));
        }
        let (n, k) = (shape[0] as usize, shape[1] as usize);
        let wp_name = format!("{prefix}.weight_packed");
        let wp = need_raw(get, &wp_name)?;
        shape_of(&wp, &wp_name, Dtype::I32, 2)?;
        let wpr = stream_words(k, b);
        let codes = u32_values(&wp, &wp_name, &[n, wpr]).map_err(|e| {
            QuantError::Invalid(format!("{e} (weight_shape [{n}, {k}] at {b} bits)"))
        })?;
        let gs = cfg.group_size.unwrap_or(k);
        let g = k.div_ceil(gs);
        let sc_name = format!("{prefix}.weight_scale");
        let (scales, scale_dtype) = float_values(&need_raw(get, &sc_name)?, &sc_name, &[n, g])?;
        let w = IntWeight {
            gpu: Default::default(),
            n,
            k,
            bits: b,
            wpr,
            codes,
            groups: Groups::Contiguous(gs),
            n_groups: g,
            scales,
            zeros: vec![(1u32 << (b - 1)) as f32; n * g],
            round: Rounding::of(scale_dtype),
        };
        w.validate(prefix)?;
        Ok(Self {
            cfg: cfg.clone(),
            w,
            scale_dtype,
        })
    }

    /// The tensors under module prefix `prefix`, byte for byte as they were loaded.
    pub fn to_state_dict(&self, prefix: &str) -> Vec<(String, RawTensor)> {
        let w = &self.w;
        let shape = [w.n as i64, w.k as i64];
        vec![
            (
                format!("{prefix}.weight_packed"),
                i32_raw(&[w.n, w.wpr], &w.codes),
            ),
            (
                format!("{prefix}.weight_scale"),
                float_raw(&[w.n, w.n_groups], &w.scales, self.scale_dtype),
            ),
            (
                format!("{prefix}.weight_shape"),
                RawTensor {
                    dtype: Dtype::I64,
                    shape: vec![2],
                    data: shape.iter().flat_map(|d| d.to_le_bytes()).collect(),
                },
            ),
        ]
    }

    pub fn config(&self) -> &CompressedIntConfig {
        &self.cfg
    }
    /// The signed value of element `[n, k]` (in `[-2^(bits-1), 2^(bits-1))`).
    pub fn value(&self, n: usize, k: usize) -> i32 {
        let u = stream_get(
            &self.w.codes[n * self.w.wpr..(n + 1) * self.w.wpr],
            k,
            self.w.bits,
        );
        u as i32 - (1 << (self.w.bits - 1))
    }
    /// The dequantized weight `[out, in]` row-major in f32 (exact).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        self.w.dequantize_f32()
    }
}

impl QuantTensor for CompressedIntTensor {
    fn shape(&self) -> (usize, usize) {
        (self.w.n, self.w.k)
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError> {
        self.w.matmul(x, "compressed-tensors")
    }

    #[cfg(feature = "cuda")]
    fn gpu_packed(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<Option<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>, QuantError> {
        self.w.gpu_packed(dev, "compressed-tensors")
    }

    fn gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        self.w.gpu_layout()
    }

    fn matmul_grad_input(&self, dy: &Tensor) -> Result<Tensor, QuantError> {
        self.w.matmul_grad_input(dy, "compressed-tensors")
    }

    fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError> {
        self.w.dequantize(dtype)
    }

    fn bytes(&self) -> usize {
        self.w.codes.len() * 4 + self.w.scales.len() * self.scale_dtype.bitsize() / 8 + 16
    }

    fn format_name(&self) -> String {
        format!("w{}a16", self.cfg.num_bits)
    }

    fn state_dict(&self, prefix: &str) -> Result<Vec<(String, RawTensor)>, QuantError> {
        Ok(self.to_state_dict(prefix))
    }
}
