//! Where a quantized weight keeps its GPU copies: with the `cuda` feature, one upload per GPU in the
//! layout of the fused kernels (`cuda::qgemv`), made on first use; without it, nothing. Constructors
//! write `gpu: GpuSlot::default()` in both builds.

#[cfg(feature = "cuda")]
pub(crate) type GpuSlot = crate::cuda::GpuCache<crate::cuda::qgemv::GpuQuantWeight>;

#[cfg(not(feature = "cuda"))]
#[derive(Debug, Clone, Default)]
pub(crate) struct GpuSlot;

use candle_core::Tensor;

use crate::gpu_layout::GpuLayout;
use crate::QuantError;

/// `x · Wᵀ` by the fused GPU kernels when `x` is on a GPU and the weight has a [`GpuLayout`];
/// `None`: the caller runs its host path.
pub(crate) fn gpu_matmul(
    slot: &GpuSlot,
    x: &Tensor,
    what: &str,
    layout: impl FnOnce() -> Result<GpuLayout, QuantError>,
) -> Result<Option<Tensor>, QuantError> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::qgemv::matmul_on_gpu(slot, x, what, layout)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (slot, x, what, layout);
        Ok(None)
    }
}

/// The weight's packed device copy on `dev` (uploaded on first use), `None` when the fused kernels
/// cannot express it: [`crate::QuantTensor::gpu_packed`].
#[cfg(feature = "cuda")]
pub(crate) fn gpu_packed(
    slot: &GpuSlot,
    dev: &candle_core::cuda_backend::CudaDevice,
    what: &str,
    layout: impl FnOnce() -> Result<GpuLayout, QuantError>,
) -> Result<Option<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>, QuantError> {
    let w = crate::cuda::qgemv::device_weight(slot, dev, what, layout)?;
    Ok(matches!(*w, crate::cuda::qgemv::GpuQuantWeight::Ready(_)).then_some(w))
}

/// `dy · W` with `W` dequantized on `dy`'s GPU (training's input gradient), or `None` as
/// [`gpu_matmul`].
pub(crate) fn gpu_matmul_grad_input(
    slot: &GpuSlot,
    dy: &Tensor,
    what: &str,
    layout: impl FnOnce() -> Result<GpuLayout, QuantError>,
) -> Result<Option<Tensor>, QuantError> {
    #[cfg(feature = "cuda")]
    {
        let candle_core::Device::Cuda(dev) = dy.device() else {
            return Ok(None);
        };
        let w = crate::cuda::qgemv::dequantize_on_gpu(slot, dev, dy.dtype(), what, layout)?;
        match w {
            Some(w) => Ok(Some(dy.matmul(&w)?)),
            None => Ok(None),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (slot, dy, what, layout);
        Ok(None)
    }
}
