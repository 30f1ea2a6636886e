//! The `--quantize` methods, with LoRAX's names, and just-in-time quantization of a dense weight.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::bnb4::{Bnb4Tensor, Bnb4Type};
use crate::eetq::EetqTensor;
use crate::fp8::{Fp8Strategy, Fp8Tensor};
use crate::hqq::{HqqConfig, HqqTensor};
use crate::int8::Int8Tensor;
use crate::{DenseTensor, QuantError, QuantTensor};

/// A quantization method as `--quantize` names it (LoRAX's spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMethod {
    /// LLM.int8 (`Linear8bitLt`, outlier threshold 6.0).
    Bitsandbytes,
    BitsandbytesNf4 {
        double_quant: bool,
    },
    BitsandbytesFp4,
    Eetq,
    Hqq4,
    Hqq3,
    Hqq2,
    Fp8,
    Awq,
    Gptq,
}

impl QuantMethod {
    pub const NAMES: [&'static str; 10] = [
        "bitsandbytes",
        "bitsandbytes-nf4",
        "bitsandbytes-fp4",
        "eetq",
        "hqq-4bit",
        "hqq-3bit",
        "hqq-2bit",
        "fp8",
        "awq",
        "gptq",
    ];

    /// Parses a LoRAX name; `None` for `none`.
    pub fn parse(name: &str) -> Result<Option<Self>, QuantError> {
        Ok(Some(match name {
            "none" => return Ok(None),
            "bitsandbytes" => Self::Bitsandbytes,
            "bitsandbytes-nf4" => Self::BitsandbytesNf4 { double_quant: true },
            "bitsandbytes-fp4" => Self::BitsandbytesFp4,
            "eetq" => Self::Eetq,
            "hqq-4bit" => Self::Hqq4,
            "hqq-3bit" => Self::Hqq3,
            "hqq-2bit" => Self::Hqq2,
            "fp8" => Self::Fp8,
            "awq" => Self::Awq,
            "gptq" => Self::Gptq,
            other => {
                return Err(QuantError::Invalid(format!(
                    "unknown quantization method {other:?}; choose one of none, auto, {}",
                    Self::NAMES.join(", ")
                )))
            }
        }))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bitsandbytes => "bitsandbytes",
            Self::BitsandbytesNf4 { .. } => "bitsandbytes-nf4",
            Self::BitsandbytesFp4 => "bitsandbytes-fp4",
            Self::Eetq => "eetq",
            Self::Hqq4 => "hqq-4bit",
            Self::Hqq3 => "hqq-3bit",
            Self::Hqq2 => "hqq-2bit",
            Self::Fp8 => "fp8",
            Self::Awq => "awq",
            Self::Gptq => "gptq",
        }
    }

    /// Whether the method quantizes a full-precision weight at load time (GPTQ and AWQ need a
    /// calibrated, pre-quantized checkpoint).
    pub fn is_jit(self) -> bool {
        !matches!(self, Self::Awq | Self::Gptq)
    }

    /// Quantizes one full-precision weight `[out, in]` (f32/f16/bf16, as stored).
    pub fn quantize(self, weight: &Tensor) -> Result<Arc<dyn QuantTensor>, QuantError> {
        Ok(match self {
            Self::Bitsandbytes => Arc::new(Int8Tensor::quantize(weight)?),
            Self::BitsandbytesNf4 { double_quant } => {
                Arc::new(Bnb4Tensor::quantize(weight, Bnb4Type::Nf4, double_quant)?)
            }
            Self::BitsandbytesFp4 => Arc::new(Bnb4Tensor::quantize(weight, Bnb4Type::Fp4, false)?),
            Self::Eetq => Arc::new(EetqTensor::quantize(weight)?),
            Self::Hqq4 | Self::Hqq3 | Self::Hqq2 => {
                let cfg = HqqConfig::lorax(self.name()).expect("an hqq method");
                Arc::new(HqqTensor::quantize(&weight.to_dtype(DType::F32)?, &cfg)?)
            }
            // Scales in the weight's own dtype, as compressed-tensors writes them.
            Self::Fp8 => Arc::new(Fp8Tensor::quantize(weight, Fp8Strategy::Channel, weight.dtype())?),
            Self::Awq | Self::Gptq => {
                return Err(QuantError::Invalid(format!(
                    "{} is calibration-based: it loads a pre-quantized checkpoint (quantization_config in config.json) \
                     and cannot quantize a full-precision weight at load time; use `lorq quantize --method {}` first",
                    self.name(),
                    self.name()
                )))
            }
        })
    }
}

impl QuantMethod {
    /// The `quantization_config` object a checkpoint quantized with this method carries in
    /// `config.json`, as the peer writes it: transformers' bitsandbytes 4-bit (compute dtype
    /// float32) and 8-bit objects, compressed-tensors' float-quantized FP8 (per-channel weights,
    /// weight-only), lorq's own EETQ object, and for HQQ (transformers has no HQQ serialization)
    /// `{"quant_method": "hqq", "quant_config": {weight_quant_params...}, "skip_modules": ["lm_head"]}`
    /// with hqq's `BaseQuantizeConfig` parameters. `Null` for the calibration-based methods.
    pub fn quantization_config(self) -> serde_json::Value {
        use crate::bnb4::quantization_config_4bit;
        use crate::fp8::Fp8Activations;
        use serde_json::json;
        match self {
            Self::Bitsandbytes => crate::int8::quantization_config_8bit(),
            Self::BitsandbytesNf4 { double_quant } => {
                quantization_config_4bit(Bnb4Type::Nf4, double_quant, DType::F32)
            }
            Self::BitsandbytesFp4 => quantization_config_4bit(Bnb4Type::Fp4, false, DType::F32),
            Self::Eetq => crate::eetq::quantization_config_eetq(),
            Self::Hqq4 | Self::Hqq3 | Self::Hqq2 => {
                let c = HqqConfig::lorax(self.name()).expect("an hqq method");
                json!({
                    "quant_method": "hqq",
                    "quant_config": {
                        "weight_quant_params": {
                            "nbits": c.nbits,
                            "channel_wise": true,
                            "group_size": c.group_size,
                            "optimize": c.optimize,
                            "round_zero": c.round_zero,
                            "axis": c.axis,
                            "view_as_float": false
                        },
                        "scale_quant_params": null,
                        "zero_quant_params": null,
                        "offload_meta": false
                    },
                    "skip_modules": ["lm_head"]
                })
            }
            Self::Fp8 => Fp8Tensor::quantization_config(
                Fp8Strategy::Channel,
                Fp8Activations::None,
                &["lm_head"],
            ),
            Self::Awq | Self::Gptq => serde_json::Value::Null,
        }
    }
}

/// A dense weight kept as is (`--quantize none`).
pub fn dense(weight: Tensor) -> Result<Arc<dyn QuantTensor>, QuantError> {
    Ok(Arc::new(DenseTensor::new(weight)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn every_name_parses_back() {
        for n in QuantMethod::NAMES {
            assert_eq!(QuantMethod::parse(n).unwrap().unwrap().name(), n);
        }
        assert_eq!(QuantMethod::parse("none").unwrap(), None);
        let e = QuantMethod::parse("int3").unwrap_err().to_string();
        assert!(e.contains("int3") && e.contains("hqq-4bit"), "{e}");
    }

    /// Every JIT method quantizes a weight whose dequantized form is close to the original, and
    /// whose matmul agrees with dequantize-then-matmul.
    #[test]
    fn jit_methods_round_trip() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (96, 128), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 128), &dev).unwrap();
        for n in QuantMethod::NAMES {
            let m = QuantMethod::parse(n).unwrap().unwrap();
            if !m.is_jit() {
                assert!(m.quantize(&w).is_err());
                continue;
            }
            let q = m.quantize(&w).unwrap();
            assert_eq!(q.shape(), (96, 128));
            let wd = q.dequantize(DType::F32).unwrap();
            let err: f32 = (&wd - &w)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            let var: f32 = w.sqr().unwrap().mean_all().unwrap().to_scalar().unwrap();
            assert!(err / var < 0.2, "{n}: relative MSE {}", err / var);
            let want = x.matmul(&wd.t().unwrap()).unwrap();
            let got = q.matmul(&x).unwrap();
            let d: f32 = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            let s: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            // LLM.int8 also quantizes the activations, so it is further from the dequantized product.
            let tol = if n == "bitsandbytes" { 2e-2 } else { 1e-4 };
            assert!(d / s < tol, "{n}: fused matmul differs by {}", d / s);
        }
    }
}
