use candle_core::{DType, Tensor};

use crate::raw_tensor::RawTensor;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

/// A weight matrix `[out_features, in_features]` stored in some format.
///
/// `matmul` is the only operation on the hot path: `y = x · Wᵀ` for `x` of shape `[.., in]`.
/// Its gradient with respect to `x` (`dy · W`) is all training needs: base weights are frozen.
pub trait QuantTensor: Send + Sync + std::fmt::Debug {
    /// `[out_features, in_features]`.
    fn shape(&self) -> (usize, usize);
    /// `x · Wᵀ`, with `x` of shape `[.., in_features]`, in `x`'s dtype.
    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError>;
    /// The full-precision weight `[out, in]` in `dtype`.
    fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError>;
    /// `dy · W` for `dy` of shape `[rows, out_features]`: the input gradient of [`Self::matmul`]
    /// (training's only use of a frozen weight in the backward), on `dy`'s device and dtype. The
    /// default dequantizes on the host; formats with a device dequantization override it.
    fn matmul_grad_input(&self, dy: &Tensor) -> Result<Tensor, QuantError> {
        host_matmul_grad_input(self, dy)
    }
    /// The weight in the fused GPU kernels' packed layout (`gpu_layout.rs`), or why it has none.
    fn gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        Err(QuantError::Invalid(format!(
            "{} has no packed GPU layout",
            self.format_name()
        )))
    }
    /// The packed device copy the fused GPU kernels read on `dev` (uploaded on first use), for
    /// [`matmul_group`]; `None`: this weight takes only its own path there.
    #[cfg(feature = "cuda")]
    fn gpu_packed(
        &self,
        _dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<Option<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>, QuantError> {
        Ok(None)
    }
    /// Whether this weight's own matmul of `x` takes a GPU path the grouped kernels do not have
    /// (FP8 tensor cores), so that [`matmul_group`] runs the group one weight at a time.
    #[cfg(feature = "cuda")]
    fn gpu_runs_alone(&self, _x: &Tensor) -> Result<bool, QuantError> {
        Ok(false)
    }
    /// The FP8 weight this is (for [`matmul_group`]'s one launch of FP8 weights sharing an
    /// input); `None` for every other format.
    #[cfg(feature = "cuda")]
    fn as_fp8(&self) -> Option<&crate::fp8::Fp8Tensor> {
        None
    }
    /// Whether this weight's GPU matmul of `x` would quantize `x` to e4m3 with one dynamic scale
    /// per row (FP8 W8A8) in a launch that the kernel producing `x` should take over, writing the
    /// codes in its own launch (`cuda::fused_ops::add_rms_norm_fp8`,
    /// `cuda::fp8_gemm::with_offered_activations`; see `cuda::fp8_gemm::wants_offered_activations`).
    #[cfg(feature = "cuda")]
    fn gpu_wants_fp8_codes(&self, _x: &Tensor) -> Result<bool, QuantError> {
        Ok(false)
    }
    /// The unquantized weight `[out, in]` of a dense tensor (for [`matmul_group`]); `None` for
    /// every quantized format.
    fn dense_weight(&self) -> Option<&Tensor> {
        None
    }
    /// Bytes held by the weight and its quantization constants.
    fn bytes(&self) -> usize;
    /// Short name of the format, as `lorq inspect` shows it (`f32`, `bf16`, `nf4`, ...).
    fn format_name(&self) -> String;
    /// The tensors this weight is stored as in its peer's checkpoint layout, named
    /// `prefix.<key>` (`prefix` = the module path, e.g. `model.layers.0.self_attn.q_proj`); a
    /// dense weight is `prefix.weight`. Bias tensors are not included.
    fn state_dict(&self, prefix: &str) -> Result<Vec<(String, RawTensor)>, QuantError>;
}

/// `x · Wᵢᵀ` for several weights sharing the input `x` (q/k/v, gate/up): one fused GPU launch
/// for all of them where they allow it (same packed format, few activation rows: decode), else
/// one [`QuantTensor::matmul`] each. Each output equals the weight's own matmul up to the order
/// of the f32 sums.
pub fn matmul_group(ws: &[&dyn QuantTensor], x: &Tensor) -> Result<Vec<Tensor>, QuantError> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = x.device() {
        if let Some(ys) = gpu_matmul_group(ws, x, dev)? {
            return Ok(ys);
        }
    }
    ws.iter().map(|w| w.matmul(x)).collect()
}

#[cfg(feature = "cuda")]
fn gpu_matmul_group(
    ws: &[&dyn QuantTensor],
    x: &Tensor,
    dev: &candle_core::cuda_backend::CudaDevice,
) -> Result<Option<Vec<Tensor>>, QuantError> {
    if ws.len() < 2 {
        return Ok(None);
    }
    let fp8: Option<Vec<&crate::fp8::Fp8Tensor>> = ws.iter().map(|w| w.as_fp8()).collect();
    if let Some(fp8) = fp8 {
        if let Some(ys) = crate::cuda::fp8_gemm::matmul_group(&fp8, x)? {
            return Ok(Some(ys));
        }
    }
    for w in ws {
        if w.gpu_runs_alone(x)? {
            // One weight at a time, x quantized once for all of them (FP8's W8A8).
            return crate::cuda::fp8_gemm::with_shared_activations(|| {
                ws.iter()
                    .map(|w| w.matmul(x))
                    .collect::<Result<Vec<_>, _>>()
            })
            .map(Some);
        }
    }
    let dense: Vec<&Tensor> = ws.iter().filter_map(|w| w.dense_weight()).collect();
    if dense.len() == ws.len() {
        return crate::cuda::dense_gemv::gemv_group(x, &dense);
    }
    with_gpu_layouts(ws, dev, |l| crate::cuda::qgemv::matmul_group(l, x))
}

/// Each weight's device copy in the packed layout, `None` if any has none; kept alive while
/// [`ready_layouts`] borrows them.
#[cfg(feature = "cuda")]
fn gpu_packed_all(
    ws: &[&dyn QuantTensor],
    dev: &candle_core::cuda_backend::CudaDevice,
) -> Result<Option<Vec<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>>, QuantError> {
    let mut held = Vec::with_capacity(ws.len());
    for w in ws {
        match w.gpu_packed(dev)? {
            Some(d) => held.push(d),
            None => return Ok(None),
        }
    }
    Ok(Some(held))
}

/// The layouts of `held`, `None` if any format has no GPU kernel.
#[cfg(feature = "cuda")]
fn ready_layouts(
    held: &[std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>],
) -> Option<Vec<&crate::cuda::qgemv::DeviceLayout>> {
    use crate::cuda::qgemv::GpuQuantWeight;
    held.iter()
        .map(|d| match &**d {
            GpuQuantWeight::Ready(l) => Some(&**l),
            GpuQuantWeight::Unsupported(_) => None,
        })
        .collect()
}

/// `f` over the packed GPU layouts of `ws` (uploaded on first use); `None` where any weight has no
/// packed GPU form or its format no GPU kernel.
#[cfg(feature = "cuda")]
fn with_gpu_layouts<R>(
    ws: &[&dyn QuantTensor],
    dev: &candle_core::cuda_backend::CudaDevice,
    f: impl FnOnce(&[&crate::cuda::qgemv::DeviceLayout]) -> Result<Option<R>, QuantError>,
) -> Result<Option<R>, QuantError> {
    let Some(held) = gpu_packed_all(ws, dev)? else {
        return Ok(None);
    };
    let Some(layouts) = ready_layouts(&held) else {
        return Ok(None);
    };
    f(&layouts)
}

/// `SiLU(x · gateᵀ) * (x · upᵀ)` in one GPU launch where the weights allow it (one bf16/f16 row,
/// decode at batch 1: dense weights, or affine 4-bit ones through the half2 GEMV), rounded as the
/// two matmuls followed by `silu_mul`; `None` elsewhere (the caller runs the matmuls and the
/// activation).
pub fn matmul_silu_mul(
    gate: &dyn QuantTensor,
    up: &dyn QuantTensor,
    x: &Tensor,
) -> Result<Option<Tensor>, QuantError> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = x.device() {
        if let (Some(g), Some(u)) = (gate.dense_weight(), up.dense_weight()) {
            return crate::cuda::dense_gemv::silu_mul_gemv(x, g, u);
        }
        return with_gpu_layouts(&[gate, up], dev, |l| {
            crate::cuda::qgemv::matmul_silu_mul(l[0], l[1], x)
        });
    }
    let _ = (gate, up, x);
    Ok(None)
}

/// `x · Wᵀ` for one activation row on the GPU with the residual add + RMSNorm of its output
/// (`tail`) in the same launch: `Some((s, y))` for a dense bf16/f16 weight (the one-row dense
/// GEMV), rounded as [`QuantTensor::matmul`] followed by `cuda::fused_ops::add_rms_norm`; `None`
/// for every quantized format (measured on an H100: the packed GEMVs' decode steps were 1-2 %
/// slower with the tail than with the norm's own launch, docs/benchmarks.md).
#[cfg(feature = "cuda")]
pub fn matmul_add_rms_norm(
    w: &dyn QuantTensor,
    x: &Tensor,
    tail: &crate::cuda::fused_ops::AddNorm,
) -> Result<Option<(Tensor, Tensor)>, QuantError> {
    match w.dense_weight() {
        Some(d) if x.device().is_cuda() => crate::cuda::dense_gemv::gemv_add_rms_norm(x, d, tail),
        _ => Ok(None),
    }
}

/// [`matmul_group`] (1-3 weights) at one activation row on the GPU where the row is the residual
/// add + RMSNorm `head` computes, the norm run by the GEMV's launch itself: `Some((s, ys))`, `s`
/// the residual sum, rounded as `cuda::fused_ops::add_rms_norm` followed by the products; `None`
/// where it does not apply (only affine 4-bit weights on the half2 GEMV take it: hqq / GPTQ / AWQ
/// 4-bit at batch 1, bf16/f16).
#[cfg(feature = "cuda")]
pub fn matmul_group_norm_head(
    ws: &[&dyn QuantTensor],
    head: &crate::cuda::fused_ops::NormHead,
) -> Result<Option<(Tensor, Vec<Tensor>)>, QuantError> {
    let candle_core::Device::Cuda(dev) = head.residual.device() else {
        return Ok(None);
    };
    with_gpu_layouts(ws, dev, |l| {
        crate::cuda::qgemv::matmul_group_norm_head(l, head)
    })
}

/// [`matmul_silu_mul`] where the row is the residual add + RMSNorm `head` computes, in the same
/// launch: `Some((s, act))`; `None` where it does not apply (as [`matmul_group_norm_head`]).
#[cfg(feature = "cuda")]
pub fn matmul_silu_mul_norm_head(
    gate: &dyn QuantTensor,
    up: &dyn QuantTensor,
    head: &crate::cuda::fused_ops::NormHead,
) -> Result<Option<(Tensor, Tensor)>, QuantError> {
    let candle_core::Device::Cuda(dev) = head.residual.device() else {
        return Ok(None);
    };
    with_gpu_layouts(&[gate, up], dev, |l| {
        crate::cuda::qgemv::matmul_silu_mul_norm_head(l[0], l[1], head)
    })
}

/// `dy · W` with `W` dequantized on the host and moved to `dy`'s device (the default of
/// [`QuantTensor::matmul_grad_input`]).
pub fn host_matmul_grad_input<T: QuantTensor + ?Sized>(
    t: &T,
    dy: &Tensor,
) -> Result<Tensor, QuantError> {
    let w = t.dequantize(dy.dtype())?.to_device(dy.device())?;
    Ok(dy.matmul(&w)?)
}

/// Converts a candle state dict into raw safetensors tensors.
pub(crate) fn raw_state_dict(
    v: Vec<(String, Tensor)>,
) -> Result<Vec<(String, RawTensor)>, QuantError> {
    v.into_iter()
        .map(|(n, t)| Ok((n, RawTensor::from_tensor(&t)?)))
        .collect()
}
