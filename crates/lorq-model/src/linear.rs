use std::sync::Arc;

use candle_core::Tensor;
use lorq_lora::BatchAdapters;
use lorq_quant::QuantTensor;

use crate::error::{ModelError, Result};

/// A linear layer: a base weight in any format, an optional bias, and a LoRA slot filled per
/// batch row by [`BatchAdapters`]. The model never knows the base's format.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Module path as PEFT names it, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    pub base: Arc<dyn QuantTensor>,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `x`: `[rows, in]` -> `[rows, out]`.
    pub fn forward(&self, x: &Tensor, adapters: &BatchAdapters) -> Result<Tensor> {
        let mut y = self.base.matmul(x)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if adapters.has_adapters() {
            y = adapters.apply(&self.path, x, y)?;
        }
        Ok(y)
    }

    pub fn in_features(&self) -> usize {
        self.base.shape().1
    }

    pub fn out_features(&self) -> usize {
        self.base.shape().0
    }
}

/// Quantizes the full-precision weight `name` with `method`; a failure names the tensor.
pub(crate) fn quantize_weight(
    method: lorq_quant::method::QuantMethod,
    name: &str,
    w: &Tensor,
) -> Result<Arc<dyn QuantTensor>> {
    method.quantize(w).map_err(|e| ModelError::Tensor {
        name: name.to_string(),
        message: format!("{} quantization failed: {e}", method.name()),
    })
}
