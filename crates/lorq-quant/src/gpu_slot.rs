//! Where a quantized weight keeps its GPU copies: with the `cuda` feature, one upload per GPU in the
//! layout of the fused kernels (`cuda::qgemv`), made on first use; without it, nothing. Constructors
//! write `gpu: GpuSlot::default()` in both builds.

#[cfg(feature = "cuda")]
pub(crate) type GpuSlot = crate::cuda::GpuCache<crate::cuda::qgemv::GpuQuantWeight>;

#[cfg(not(feature = "cuda"))]
#[derive(Debug, Clone, Default)]
pub(crate) struct GpuSlot;
