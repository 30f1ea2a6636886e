//! CUDA graphs: the work one closure queues on candle's stream of a GPU, captured once and then
//! replayed with a single launch (a decode step is ~500 small launches, each costing host time
//! and a gap on the GPU).
//!
//! A captured graph bakes in every kernel argument: device addresses, sizes, grids. What changes
//! between replays must live in device buffers the graph reads (written before each replay with
//! [`write_u32`]); what the graph reads must outlive it ([`keep_alive`] collects device buffers
//! that kernel wrappers use from their own caches during a capture). Buffers the captured work
//! allocates become graph allocations; the graph is instantiated with auto-free-on-launch, so the
//! outputs it returns stay valid until its next replay (copy them out).
//!
//! During a capture nothing runs: a kernel wrapper that would read results back, or upload from
//! host memory, must fail instead ([`capturing`]), which aborts the capture; the caller then runs
//! the work eagerly.

use std::any::Any;
use std::cell::RefCell;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::{
    CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{result, CudaGraph, DevicePtr};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Tensor};

use crate::QuantError;

type Kept = Arc<dyn Any + Send + Sync>;

thread_local! {
    /// What the capture in progress on this thread must keep alive (`None`: not capturing).
    static CAPTURE: RefCell<Option<Vec<Kept>>> = const { RefCell::new(None) };
}

/// Whether this thread is capturing a graph (kernel wrappers must then neither upload from the
/// host nor read back).
pub fn capturing() -> bool {
    CAPTURE.with(|c| c.borrow().is_some())
}

/// Keeps `buffer` alive as long as the graph being captured on this thread (no-op otherwise):
/// for device data a kernel wrapper reads from its own cache.
pub fn keep_alive(buffer: Kept) {
    CAPTURE.with(|c| {
        if let Some(v) = c.borrow_mut().as_mut() {
            v.push(buffer);
        }
    });
}

/// A captured, instantiated graph and what it reads beyond its arguments.
pub struct CapturedGraph {
    graph: CudaGraph,
    _kept: Vec<Kept>,
}

// SAFETY: the graph is only launched through `&self` by its owner, which serializes use (the
// model's step lock); cudarc's CudaGraph holds raw driver handles that are valid on any thread.
unsafe impl Send for CapturedGraph {}
unsafe impl Sync for CapturedGraph {}

impl std::fmt::Debug for CapturedGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CapturedGraph({} kept buffers)", self._kept.len())
    }
}

impl CapturedGraph {
    /// Queues one replay on the stream it was captured on.
    pub fn replay(&self) -> Result<(), QuantError> {
        self.graph.launch().w()?;
        Ok(())
    }
}

/// Captures what `work` queues on `dev`'s stream (relaxed mode: allocations are allowed and
/// become graph allocations). Returns the graph and `work`'s result (tensors whose buffers the
/// graph writes at each replay). Any error of `work` or of the capture aborts it.
pub fn capture<R, E: From<QuantError>>(
    dev: &CudaDevice,
    work: impl FnOnce() -> Result<R, E>,
) -> Result<(CapturedGraph, R), E> {
    if capturing() {
        return Err(QuantError::Invalid(
            "CUDA graph: a capture is already in progress on this thread".into(),
        )
        .into());
    }
    let stream = dev.cuda_stream();
    stream.synchronize().w().map_err(QuantError::from)?;
    // candle's own host copies (an op's layout parameters, a read-back) then fail the capture
    // instead of being recorded as copies from host memory that is gone at replay time.
    let _candle_copies = dev.enable_cuda_graph_htod_cache();
    CAPTURE.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let begun = stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .w();
    let out = match begun {
        Ok(()) => work(),
        Err(e) => Err(QuantError::from(e).into()),
    };
    // End the capture whatever happened, so the stream is usable again.
    let graph = stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let kept = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
    let out = out?;
    let graph = graph
        .w()
        .map_err(QuantError::from)?
        .ok_or_else(|| QuantError::Invalid("CUDA graph: the capture recorded no work".into()))?;
    graph.upload().w().map_err(QuantError::from)?;
    Ok((CapturedGraph { graph, _kept: kept }, out))
}

/// Writes `data` into the contiguous `u32` GPU tensor `dst` (same element count), in stream
/// order: how a graph's inputs change between replays. The host data is staged by the driver
/// before this returns.
pub fn write_u32(dst: &Tensor, data: &[u32]) -> Result<(), QuantError> {
    if dst.dtype() != DType::U32 || !dst.is_contiguous() || dst.elem_count() != data.len() {
        return Err(QuantError::Invalid(format!(
            "CUDA graph input: {} u32 values for a {:?} tensor of {} elements",
            data.len(),
            dst.dtype(),
            dst.elem_count()
        )));
    }
    let dev = super::cuda_device(dst, "graph input")?;
    let (storage, layout) = dst.storage_and_layout();
    let view = super::device_view::<u32>(&storage, layout, data.len(), "CUDA graph input")?;
    let stream = dev.cuda_stream();
    let (ptr, _record) = view.device_ptr(&stream);
    // SAFETY: `ptr` addresses `data.len()` u32 of a live buffer (checked above); the copy is
    // ordered on the stream that every reader of the buffer uses.
    unsafe { result::memcpy_htod_async(ptr, data, stream.cu_stream()) }.w()?;
    Ok(())
}
