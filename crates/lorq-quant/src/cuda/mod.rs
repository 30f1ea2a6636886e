//! CUDA kernels (feature `cuda`): CUDA C in `kernels/*.cu`, compiled by nvcc at build time into a
//! fatbin (SASS for sm_90a plus PTX, see `build.rs`), embedded, loaded once per GPU through the
//! driver API and launched on candle's stream of the activation's device, so they order with
//! candle's own kernels and cuBLAS calls.

pub mod bnb4;
pub mod dense_gemv;
pub mod dependent_launch;
pub mod fp8_gemm;
pub mod fp8_mma;
pub mod fp8_wgmma;
pub mod fused_ops;
pub mod graph;
pub mod int8_llm;
pub mod paged_attention;
pub mod qgemv;
pub mod qmma_tiled;
pub mod quantize;
pub mod qwgmma;
pub mod sampling;
pub mod sgmv;
pub mod side_stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Shape, Storage, Tensor};

use crate::QuantError;

/// The kernel `name` of the embedded fatbin `module` on `dev`'s GPU (modules and functions are
/// loaded once per GPU and cached).
pub fn function(
    dev: &CudaDevice,
    module: &'static str,
    fatbin: &'static [u8],
    name: &str,
) -> Result<CudaFunction, QuantError> {
    function_with_shared(dev, module, fatbin, name, 0)
}

/// [`function`] for a kernel whose launches take up to `shared_bytes` of dynamic shared memory:
/// its limit is raised to that once, when it is loaded (a kernel gets 48 KiB, static and dynamic
/// together, without asking; qmma_tiled's x1 takes 48 KiB of dynamic at 8 n8 tiles, 96 KiB at
/// 16).
pub(crate) fn function_with_shared(
    dev: &CudaDevice,
    module: &'static str,
    fatbin: &'static [u8],
    name: &str,
    shared_bytes: usize,
) -> Result<CudaFunction, QuantError> {
    type Key = (usize, String);
    type Modules = HashMap<(usize, &'static str), Arc<CudaModule>>;
    static MODULES: OnceLock<Mutex<Modules>> = OnceLock::new();
    static FUNCS: OnceLock<Mutex<HashMap<Key, CudaFunction>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let ordinal = ctx.ordinal();
    let key = (ordinal, format!("{module}::{name}"));
    let mut funcs = FUNCS
        .get_or_init(Default::default)
        .lock()
        .expect("poisoned");
    if let Some(f) = funcs.get(&key) {
        return Ok(f.clone());
    }
    let md = {
        let mut mods = MODULES
            .get_or_init(Default::default)
            .lock()
            .expect("poisoned");
        match mods.get(&(ordinal, module)) {
            Some(m) => m.clone(),
            None => {
                let m = ctx.load_module(Ptx::from_binary(fatbin.to_vec())).w()?;
                mods.insert((ordinal, module), m.clone());
                m
            }
        }
    };
    let f = md.load_function(name).w()?;
    if shared_bytes > 0 {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared_bytes as i32,
        )
        .w()?;
    }
    funcs.insert(key, f.clone());
    Ok(f)
}

/// The kernel-name suffix of an activation dtype (`bf16`, `f16`, else `f32`: other dtypes are
/// computed in f32).
pub(crate) fn dtype_name(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::BF16 => "bf16",
        candle_core::DType::F16 => "f16",
        _ => "f32",
    }
}

/// The `len` elements of a GPU tensor's buffer from its start offset, as a kernel argument
/// (`storage`, `layout`: the tensor's `storage_and_layout()`, kept borrowed by the caller).
pub(crate) fn device_view<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a Storage,
    layout: &candle_core::Layout,
    len: usize,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>, QuantError> {
    let Storage::Cuda(cs) = storage else {
        return Err(QuantError::Invalid(format!("{what} is not on a GPU")));
    };
    let start = layout.start_offset();
    Ok(cs.as_cuda_slice::<T>()?.slice(start..start + len))
}

/// Block layout of a grouped launch (qgemv.cu `QGroup`, dense_gemv.cu `DGroup`): each weight's
/// blocks follow the previous one's. Returns the grid size and the first block of the second and
/// third weight (the grid size where there is none).
pub(crate) fn group_blocks(blocks: &[usize]) -> (usize, [i32; 2]) {
    let total: usize = blocks.iter().sum();
    let mut starts = [total as i32; 2];
    let mut first = 0;
    for (i, b) in blocks.iter().enumerate().take(3) {
        if i > 0 {
            starts[i - 1] = first as i32;
        }
        first += b;
    }
    (total, starts)
}

/// `x` itself when it is contiguous and its data starts `align_bytes`-aligned (what the kernels'
/// vector loads need), else a contiguous copy (which starts at offset 0).
pub(crate) fn aligned(x: &Tensor, align_bytes: usize) -> Result<Tensor, QuantError> {
    let start = x.layout().start_offset() * x.dtype().size_in_bytes();
    if x.is_contiguous() && start.is_multiple_of(align_bytes) {
        Ok(x.clone())
    } else {
        // `force_contiguous`, not `contiguous`/`copy`: those keep a view's start offset.
        Ok(x.force_contiguous()?)
    }
}

/// The input of a bf16/f16 launch: `x` made contiguous from an `align_bytes`-aligned start, its
/// GPU storage and start offset handed to `bf16` or `f16` by dtype (the storage stays borrowed
/// until the launch returns); other dtypes are refused, naming `what`.
pub(crate) fn with_half_input<R>(
    x: &Tensor,
    align_bytes: usize,
    what: &str,
    bf16: impl FnOnce(&CudaStorage, usize) -> Result<R, QuantError>,
    f16: impl FnOnce(&CudaStorage, usize) -> Result<R, QuantError>,
) -> Result<R, QuantError> {
    let x = aligned(x, align_bytes)?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(QuantError::Invalid(format!("{what}: x is not on a GPU")));
    };
    let start = layout.start_offset();
    match x.dtype() {
        DType::BF16 => bf16(cs, start),
        DType::F16 => f16(cs, start),
        other => Err(QuantError::Invalid(format!(
            "{what}: bf16/f16 activations only, got {other:?}"
        ))),
    }
}

/// The outputs `[m, wᵢ.n]` of a bf16/f16 launch over the packed weights `ws` sharing `x`
/// ([`with_half_input`]; zeros without launching when there is nothing to compute).
pub(crate) fn half_group_outputs(
    x: &Tensor,
    ws: &[&qgemv::DeviceLayout],
    m: usize,
    align_bytes: usize,
    what: &str,
    bf16: impl FnOnce(&CudaStorage, usize) -> Result<Vec<CudaStorage>, QuantError>,
    f16: impl FnOnce(&CudaStorage, usize) -> Result<Vec<CudaStorage>, QuantError>,
) -> Result<Vec<Tensor>, QuantError> {
    if m == 0 || ws.iter().any(|w| w.n == 0) {
        return ws
            .iter()
            .map(|w| Ok(Tensor::zeros((m, w.n), x.dtype(), x.device())?))
            .collect();
    }
    let s = with_half_input(x, align_bytes, what, bf16, f16)?;
    Ok(s.into_iter()
        .zip(ws)
        .map(|(s, w)| tensor_from_storage(s, (m, w.n)))
        .collect())
}

/// Candle storages for a launch's output buffers `ys` on `dev`.
pub(crate) fn storages<T: candle_core::cuda_backend::CudaDType>(
    ys: Vec<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>>,
    dev: &CudaDevice,
) -> Vec<CudaStorage> {
    ys.into_iter()
        .map(|y| CudaStorage::wrap_cuda_slice(y, dev.clone()))
        .collect()
}

/// Wraps a freshly written device buffer as a contiguous tensor of `shape`.
pub fn tensor_from_storage(storage: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// Per-GPU copies of a weight's device data, made on first use (cloning a tensor gives an empty
/// cache: the copy uploads its own).
pub struct GpuCache<T>(Mutex<Vec<(usize, Arc<T>)>>);

impl<T> Default for GpuCache<T> {
    fn default() -> Self {
        Self(Mutex::new(Vec::new()))
    }
}

impl<T> Clone for GpuCache<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T> std::fmt::Debug for GpuCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|v| v.len()).unwrap_or(0);
        write!(f, "GpuCache({n} GPUs)")
    }
}

impl<T> GpuCache<T> {
    pub fn get_or_upload(
        &self,
        dev: &CudaDevice,
        upload: impl FnOnce(&CudaDevice) -> Result<T, QuantError>,
    ) -> Result<Arc<T>, QuantError> {
        let ordinal = dev.cuda_stream().context().ordinal();
        let mut v = self.0.lock().expect("poisoned");
        if let Some((_, t)) = v.iter().find(|(o, _)| *o == ordinal) {
            return Ok(t.clone());
        }
        if graph::capturing() {
            // An upload cannot be captured (it reads host memory now, not at replay).
            return Err(QuantError::Invalid(
                "a weight's first GPU upload happened during a CUDA graph capture".into(),
            ));
        }
        let t = Arc::new(upload(dev)?);
        v.push((ordinal, t.clone()));
        Ok(t)
    }
}

/// Keeps the memory that `dev`'s buffers free in the stream-ordered pool they came from instead
/// of handing it back to the driver at every synchronize. The default pool's release threshold
/// is 0: each synchronize unmapped what was free, and the next call mapped it again (the bf16
/// weight of every dequantize + cuBLAS call, 117 MB for an 8B model's gate/up; every activation
/// of an eager decode step). PyTorch's caching allocator holds freed memory the same way. Call
/// once per GPU; a GPU without memory pools (its buffers come from `cuMemAlloc`) is left as is.
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<(), QuantError> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let cu_dev = ctx.cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` receives the device's default pool; the attribute takes a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev)
            .result()
            .w()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .w()?;
    }
    Ok(())
}

/// The CUDA device of `x`, or an error naming `what`.
pub fn cuda_device<'a>(x: &'a Tensor, what: &str) -> Result<&'a CudaDevice, QuantError> {
    match x.device() {
        Device::Cuda(d) => Ok(d),
        d => Err(QuantError::Invalid(format!(
            "{what}: expected a CUDA tensor, got one on {d:?}"
        ))),
    }
}

/// GPU `ordinal` when this machine has a usable one, else why not (no NVIDIA driver, no such
/// device): what the GPU tests print when they skip.
pub fn usable_gpu(ordinal: usize) -> Result<Device, String> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { candle_core::cuda_backend::cudarc::driver::sys::is_culib_present() } {
        return Err("no NVIDIA driver (libcuda.so.1) on this machine".into());
    }
    let dev = Device::new_cuda(ordinal).map_err(|e| format!("no usable GPU {ordinal}: {e}"))?;
    if let Device::Cuda(c) = &dev {
        keep_freed_memory(c).map_err(|e| format!("GPU {ordinal}: {e}"))?;
    }
    Ok(dev)
}
