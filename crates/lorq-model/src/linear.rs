use std::sync::Arc;

use candle_core::Tensor;
use lorq_lora::{BatchAdapters, PendingDelta};
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
    /// `x`: `[rows, in]` -> `[rows, out]`. The adapters' delta is begun before the base matmul
    /// (its first half only reads `x`: a CUDA graph runs it beside the matmul).
    pub fn forward(&self, x: &Tensor, adapters: &BatchAdapters) -> Result<Tensor> {
        let pending = self.begin_delta(x, adapters)?;
        let y = self.add_bias(self.base.matmul(x)?)?;
        Ok(match pending {
            Some(p) => p.finish(y)?,
            None => y,
        })
    }

    /// [`Self::forward`] of linears that share the input `x` (q/k/v, gate/up): the base matmuls
    /// in one GPU launch where the weights allow it ([`lorq_quant::matmul_group`]: decode), then
    /// each one's bias, and the adapters' expands in one launch.
    pub fn forward_group(
        ls: &[&Linear],
        x: &Tensor,
        adapters: &BatchAdapters,
    ) -> Result<Vec<Tensor>> {
        // The adapters' shrinks of the group in one launch (beside the base matmuls in a graph).
        let pending = if adapters.has_adapters() {
            let paths: Vec<&str> = ls.iter().map(|l| l.path.as_str()).collect();
            adapters.begin_group(&paths, x)?
        } else {
            ls.iter().map(|_| None).collect()
        };
        let bases: Vec<&dyn QuantTensor> = ls.iter().map(|l| &*l.base).collect();
        let ys = lorq_quant::matmul_group(&bases, x)?;
        let ys = ls
            .iter()
            .zip(ys)
            .map(|(l, y)| l.add_bias(y))
            .collect::<Result<Vec<_>>>()?;
        Ok(PendingDelta::finish_all(pending, ys)?)
    }

    /// `SiLU(gate(x)) * up(x)` in one GPU launch where it applies (no adapter and no bias on
    /// either, weights [`lorq_quant::matmul_silu_mul`] takes: decode at batch 1); `None` where the
    /// caller runs both linears and the activation.
    pub fn silu_mul_pair(
        gate: &Linear,
        up: &Linear,
        x: &Tensor,
        adapters: &BatchAdapters,
    ) -> Result<Option<Tensor>> {
        if adapters.has_adapters() || gate.bias.is_some() || up.bias.is_some() {
            return Ok(None);
        }
        Ok(lorq_quant::matmul_silu_mul(&*gate.base, &*up.base, x)?)
    }

    /// `self(x)` at one row with the residual add + RMSNorm of the output (`tail`) in the same GPU
    /// launch: `Some((s, y))` where [`lorq_quant::matmul_add_rms_norm`] applies and there is no
    /// adapter or bias (decode at batch 1); `None` where the caller runs the linear and the norm.
    #[cfg(feature = "cuda")]
    pub fn forward_add_norm(
        &self,
        x: &Tensor,
        tail: &lorq_quant::cuda::fused_ops::AddNorm,
        adapters: &BatchAdapters,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if adapters.has_adapters() || self.bias.is_some() {
            return Ok(None);
        }
        Ok(lorq_quant::matmul_add_rms_norm(&*self.base, x, tail)?)
    }

    /// `ls(x)` (1-3 linears sharing x) in one GPU launch where x is the residual add + RMSNorm
    /// `head` computes, run by that launch: `Some((s, ys))` where
    /// [`lorq_quant::matmul_group_norm_head`] applies and there is no adapter or bias (decode at
    /// batch 1 on affine 4-bit weights); `None` where the caller runs the norm and the linears.
    #[cfg(feature = "cuda")]
    pub fn forward_group_norm_head(
        ls: &[&Linear],
        head: &lorq_quant::cuda::fused_ops::NormHead,
        adapters: &BatchAdapters,
    ) -> Result<Option<(Tensor, Vec<Tensor>)>> {
        if adapters.has_adapters() || ls.iter().any(|l| l.bias.is_some()) {
            return Ok(None);
        }
        let bases: Vec<&dyn QuantTensor> = ls.iter().map(|l| &*l.base).collect();
        Ok(lorq_quant::matmul_group_norm_head(&bases, head)?)
    }

    /// [`Self::silu_mul_pair`] where x is the residual add + RMSNorm `head` computes, in the same
    /// launch: `Some((s, act))`, or `None` (as [`Self::forward_group_norm_head`]).
    #[cfg(feature = "cuda")]
    pub fn silu_mul_pair_norm_head(
        gate: &Linear,
        up: &Linear,
        head: &lorq_quant::cuda::fused_ops::NormHead,
        adapters: &BatchAdapters,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if adapters.has_adapters() || gate.bias.is_some() || up.bias.is_some() {
            return Ok(None);
        }
        Ok(lorq_quant::matmul_silu_mul_norm_head(
            &*gate.base,
            &*up.base,
            head,
        )?)
    }

    fn begin_delta<'a>(
        &'a self,
        x: &Tensor,
        adapters: &'a BatchAdapters,
    ) -> Result<Option<PendingDelta<'a>>> {
        if !adapters.has_adapters() {
            return Ok(None);
        }
        Ok(adapters.begin(&self.path, x)?)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    pub fn in_features(&self) -> usize {
        self.base.shape().1
    }

    pub fn out_features(&self) -> usize {
        self.base.shape().0
    }
}

/// Quantizes the full-precision weight `name` with `method`; a failure names the tensor.
/// A weight on a GPU is quantized there (the same codes as the host quantizer, see
/// `lorq_quant::cuda::quantize`); only the packed result comes back to the host.
pub(crate) fn quantize_weight(
    method: lorq_quant::method::QuantMethod,
    name: &str,
    w: &Tensor,
) -> Result<Arc<dyn QuantTensor>> {
    let q = if w.device().is_cuda() {
        quantize_on_gpu(method, w)
    } else {
        method.quantize(w)
    };
    q.map_err(|e| ModelError::Tensor {
        name: name.to_string(),
        message: format!("{} quantization failed: {e}", method.name()),
    })
}

#[cfg(feature = "cuda")]
fn quantize_on_gpu(
    method: lorq_quant::method::QuantMethod,
    w: &Tensor,
) -> std::result::Result<Arc<dyn QuantTensor>, lorq_quant::QuantError> {
    use lorq_quant::cuda::quantize;
    if quantize::has_gpu_quantizer(method) {
        return quantize::quantize(method, w);
    }
    // Said once per method: every linear of a model takes this path.
    static WARNED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if !warned.contains(&method.name()) {
        warned.push(method.name());
        tracing::warn!(
            "{}: no GPU quantizer; quantizing on the host (the weights are copied there and back)",
            method.name()
        );
    }
    drop(warned);
    method.quantize(&w.to_device(&candle_core::Device::Cpu)?)
}

#[cfg(not(feature = "cuda"))]
fn quantize_on_gpu(
    method: lorq_quant::method::QuantMethod,
    w: &Tensor,
) -> std::result::Result<Arc<dyn QuantTensor>, lorq_quant::QuantError> {
    // Without the `cuda` feature no tensor can be on a GPU; kept for the signature.
    method.quantize(w)
}
