//! Pre-quantized checkpoints: which format a folder holds (from `config.json`'s
//! `quantization_config`, or hqq's own tensor names), and reading each linear in that format.

use std::sync::Arc;

use candle_core::Device;
use lorq_quant::awq::{AwqConfig, AwqTensor};
use lorq_quant::bnb4::Bnb4Tensor;
use lorq_quant::compressed_int::{CompressedIntConfig, CompressedIntTensor};
use lorq_quant::eetq::EetqTensor;
use lorq_quant::fp8::Fp8Tensor;
use lorq_quant::gptq::{GptqConfig, GptqTensor};
use lorq_quant::hqq::HqqTensor;
use lorq_quant::int8::Int8Tensor;
use lorq_quant::method::QuantMethod;
use lorq_quant::QuantTensor;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::WeightFiles;

/// The format of a pre-quantized checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckpointFormat {
    /// bitsandbytes 4-bit as transformers saves it (`nf4`/`fp4`, optional double quant).
    Bnb4 {
        quant_type: String,
        double_quant: bool,
    },
    /// bitsandbytes LLM.int8 as transformers saves it.
    Bnb8,
    /// `HQQLinear.state_dict()` under each module path.
    Hqq { nbits: u32 },
    /// compressed-tensors `float-quantized` FP8.
    Fp8,
    /// lorq's own EETQ int8 layout (`P.weight` I8, `P.weight_scale` F32; see `lorq_quant::eetq`).
    Eetq,
    /// GPTQ (`gptq` v1 or `gptq_v2`), as GPTQModel/AutoGPTQ write it.
    Gptq(GptqConfig),
    /// AutoAWQ GEMM 4-bit.
    Awq(AwqConfig),
    /// compressed-tensors `pack-quantized` integer weights (W4A16/W8A16).
    CompressedInt(CompressedIntConfig),
}

impl CheckpointFormat {
    /// Reads the format from the config, or from the tensor names for hqq (which writes none).
    pub fn detect(
        cfg: &ModelConfig,
        weights: &WeightFiles,
        dir: &std::path::Path,
    ) -> Result<Option<Self>> {
        let err = |message: String| ModelError::Config {
            path: dir.join("config.json"),
            message,
        };
        let hqq_nbits = || -> Result<Option<Self>> {
            if weights.contains("model.layers.0.self_attn.q_proj.W_q") {
                let nbits = weights
                    .get_tensor("model.layers.0.self_attn.q_proj.nbits", &Device::Cpu)
                    .and_then(|t| t.to_dtype(candle_core::DType::F32).ok())
                    .and_then(|t| t.flatten_all().ok()?.to_vec1::<f32>().ok())
                    .and_then(|v| v.first().copied())
                    .ok_or_else(|| err("hqq tensors without a readable `nbits`".into()))?;
                return Ok(Some(Self::Hqq {
                    nbits: nbits as u32,
                }));
            }
            Ok(None)
        };
        let Some(q) = &cfg.quantization_config else {
            return hqq_nbits();
        };
        let method = q["quant_method"].as_str().unwrap_or_default();
        match method {
            "bitsandbytes" => {
                if q["load_in_4bit"].as_bool() == Some(true) {
                    Ok(Some(Self::Bnb4 {
                        quant_type: q["bnb_4bit_quant_type"]
                            .as_str()
                            .unwrap_or("fp4")
                            .to_string(),
                        double_quant: q["bnb_4bit_use_double_quant"].as_bool().unwrap_or(false),
                    }))
                } else if q["load_in_8bit"].as_bool() == Some(true) {
                    Ok(Some(Self::Bnb8))
                } else {
                    Err(err("quantization_config: bitsandbytes with neither load_in_4bit nor load_in_8bit".into()))
                }
            }
            "compressed-tensors" => match q["format"].as_str() {
                Some("float-quantized") => Ok(Some(Self::Fp8)),
                Some("pack-quantized") => Ok(Some(Self::CompressedInt(
                    CompressedIntConfig::from_json(q).map_err(|e| err(e.to_string()))?,
                ))),
                other => Err(err(format!(
                    "quantization_config: compressed-tensors format {other:?} is not supported \
                     (float-quantized and pack-quantized are)"
                ))),
            },
            "eetq" => Ok(Some(Self::Eetq)),
            "hqq" => match hqq_nbits()? {
                Some(f) => Ok(Some(f)),
                None => Err(err("quantization_config: hqq, but the weights hold no \
                     `model.layers.0.self_attn.q_proj.W_q`"
                    .into())),
            },
            "gptq" => Ok(Some(Self::Gptq(
                GptqConfig::from_json(q).map_err(|e| err(e.to_string()))?,
            ))),
            "awq" => Ok(Some(Self::Awq(
                AwqConfig::from_json(q).map_err(|e| err(e.to_string()))?,
            ))),
            other => Err(err(format!(
                "quantization_config: unknown quant_method {other:?}"
            ))),
        }
    }

    /// The `--quantize` name this format answers to.
    pub fn method_name(&self) -> String {
        match self {
            Self::Bnb4 { quant_type, .. } => format!("bitsandbytes-{quant_type}"),
            Self::Bnb8 => "bitsandbytes".into(),
            Self::Hqq { nbits } => format!("hqq-{nbits}bit"),
            Self::Fp8 => "fp8".into(),
            Self::Eetq => "eetq".into(),
            Self::Gptq(_) => "gptq".into(),
            Self::Awq(_) => "awq".into(),
            Self::CompressedInt(_) => "compressed-tensors".into(),
        }
    }

    /// Refuses a `--quantize` that contradicts the checkpoint.
    pub fn check_requested(&self, requested: Option<QuantMethod>) -> Result<()> {
        if let Some(q) = requested {
            if q.name() != self.method_name() {
                return Err(ModelError::Request(format!(
                    "the checkpoint is pre-quantized as {}; --quantize {} contradicts it (use --quantize auto or {})",
                    self.method_name(),
                    q.name(),
                    self.method_name()
                )));
            }
        }
        Ok(())
    }

    /// The linear at `path` (e.g. `model.layers.0.self_attn.q_proj`), read in this format.
    pub fn load_linear(
        &self,
        weights: &WeightFiles,
        path: &str,
        shape: (usize, usize),
        device: &Device,
    ) -> Result<Arc<dyn QuantTensor>> {
        let get = |name: &str| weights.get_tensor(name, device);
        let raw = |name: &str| weights.get_raw(name);
        let t: Arc<dyn QuantTensor> = match self {
            Self::Bnb4 { .. } => Arc::new(Bnb4Tensor::from_state_dict(path, &get)?),
            Self::Bnb8 => Arc::new(Int8Tensor::from_state_dict(path, &raw)?),
            Self::Hqq { .. } => Arc::new(HqqTensor::from_state_dict(path, &get)?),
            Self::Fp8 => Arc::new(Fp8Tensor::from_state_dict(path, &get)?),
            Self::Eetq => Arc::new(EetqTensor::from_state_dict(path, &raw)?),
            Self::Gptq(cfg) => Arc::new(GptqTensor::from_state_dict(path, &raw, cfg)?),
            Self::Awq(cfg) => Arc::new(AwqTensor::from_state_dict(path, &raw, cfg)?),
            Self::CompressedInt(cfg) => {
                Arc::new(CompressedIntTensor::from_state_dict(path, &raw, cfg)?)
            }
        };
        if t.shape() != shape {
            return Err(ModelError::Tensor {
                name: format!("{path}.weight"),
                message: format!(
                    "quantized weight has shape {:?}, config.json gives {:?}",
                    t.shape(),
                    shape
                ),
            });
        }
        Ok(t)
    }
}
