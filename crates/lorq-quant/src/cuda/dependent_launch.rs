//! Programmatic dependent launch (compute capability 9.0+): a kernel launched with it may start
//! its blocks while the kernel ahead of it in the stream still runs, once every block of that
//! kernel has called `launch_dependents()` (kernels/common.cuh). The FP8 wgmma kernel uses the
//! head start to stream the first stages of its weight — which no kernel writes — while the
//! activation quantization ahead of it (`fp8_act.cu` `quant_rows`) runs, and waits for the codes
//! (`wait_for_producers()`) before it copies them. Inside a CUDA graph capture the launch becomes
//! a programmatic edge when the two kernels are adjacent in the stream (no allocation between:
//! `fp8_gemm::matmul_with` allocates the product's buffers before it quantizes).
//!
//! Only kernels that call `wait_for_producers()` before touching another kernel's data may be
//! launched so ([`KernelArgs::launch_dependent`]); on older GPUs, or when turned off
//! ([`set_enabled`]), the launch is an ordinary one. (Session 14 tried the same for the one-row
//! GEMVs of decode and measured no gain there: docs/benchmarks.md.)
//!
//! cudarc's launch builder has no launch attributes, so [`KernelArgs`] collects the argument
//! pointers itself and calls `cuLaunchKernelEx`, keeping cudarc's per-buffer guards (its stream
//! ordering events) alive across the launch as the builder does.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};

use crate::QuantError;

static ENABLED: AtomicBool = AtomicBool::new(true);
static MADE: AtomicU64 = AtomicU64::new(0);

/// Dependent launches made so far in this process (tests check that a path used them).
pub fn launches_made() -> u64 {
    MADE.load(Ordering::Relaxed)
}

/// Turns programmatic dependent launches on or off for the whole process (on by default), e.g.
/// to measure what they bring; off, every launch waits for the kernel before it.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether dependent launches are turned on ([`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Buffers and values of a launch, pushed in the kernel's parameter order.
pub(crate) struct KernelArgs<'a> {
    stream: &'a CudaStream,
    params: Vec<*mut c_void>,
    /// Device addresses, each boxed so that its address stays put until the launch (a plain
    /// `Vec<u64>` would move them when it grows).
    #[allow(clippy::vec_box)]
    _addresses: Vec<Box<u64>>,
    guards: Vec<SyncOnDrop<'a>>,
    /// Blocks a thread-block cluster (1: no clusters).
    cluster: u32,
}

impl<'a> KernelArgs<'a> {
    pub(crate) fn new(stream: &'a CudaStream) -> Self {
        Self {
            stream,
            params: Vec::new(),
            _addresses: Vec::new(),
            guards: Vec::new(),
            cluster: 1,
        }
    }

    /// Launches the grid in clusters of `blocks` consecutive blocks (compute capability 9.0+;
    /// the grid a multiple of it).
    pub(crate) fn in_clusters(&mut self, blocks: u32) -> &mut Self {
        self.cluster = blocks;
        self
    }

    /// A buffer's device address (its guard orders the buffer's other users around the launch).
    pub(crate) fn buf<T>(&mut self, b: &'a impl DevicePtr<T>) -> &mut Self {
        let (address, guard) = b.device_ptr(self.stream);
        self.guards.push(guard);
        self.address(address)
    }

    /// A device address already taken (0 for a null pointer).
    pub(crate) fn address(&mut self, address: u64) -> &mut Self {
        let slot = Box::new(address);
        self.params.push(&*slot as *const u64 as *mut c_void);
        self._addresses.push(slot);
        self
    }

    /// A value passed by copy (its address is read at the launch).
    pub(crate) fn val<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.params.push(v as *const T as *mut c_void);
        self
    }

    /// Launches `f` so that it may start before the kernel ahead of it ends (see the module)
    /// while [`enabled`], an ordinary launch otherwise. For GPUs of compute capability 9.0+
    /// (the callers' kernels run on nothing older).
    ///
    /// # Safety
    /// The arguments match `f`'s parameters, and `f` calls `wait_for_producers()` before it
    /// reads or writes memory another kernel writes or reads.
    pub(crate) unsafe fn launch_dependent(
        mut self,
        f: &CudaFunction,
        cfg: LaunchConfig,
    ) -> Result<(), QuantError> {
        let dependent = enabled();
        self.stream.context().bind_to_thread().w()?;
        let mut attrs = Vec::with_capacity(2);
        if dependent {
            // SAFETY: a zeroed attribute value is a valid union (plain integers).
            let mut a = sys::CUlaunchAttribute {
                id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value: std::mem::zeroed(),
            };
            a.value.programmaticStreamSerializationAllowed = 1;
            attrs.push(a);
        }
        if self.cluster > 1 {
            attrs.push(cluster_attribute(self.cluster));
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: attrs.len() as u32,
        };
        // SAFETY: the parameters point at live values for the call (the caller's contract).
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            self.params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
        .w()?;
        if dependent {
            MADE.fetch_add(1, Ordering::Relaxed);
        }
        drop(self.guards);
        Ok(())
    }
}

/// The launch attribute that groups a grid's consecutive blocks in clusters of `blocks`.
pub(crate) fn cluster_attribute(blocks: u32) -> sys::CUlaunchAttribute {
    // SAFETY: a zeroed attribute value is a valid union (plain integers).
    let mut a = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
        pad: [0; 4],
        value: unsafe { std::mem::zeroed() },
    };
    a.value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
        x: blocks,
        y: 1,
        z: 1,
    };
    a
}

/// Blocks a cluster may have without the non-portable opt-in.
pub(crate) const MAX_CLUSTER: usize = 8;

/// Whether `clusters` clusters of `blocks` blocks of `f` are all resident at once
/// ([`resident_clusters`]); where the driver cannot say, no (a warning: the caller sums its split
/// tiles through L2 instead).
pub(crate) fn clusters_fit(
    dev: &CudaDevice,
    f: &CudaFunction,
    name: &str,
    block: (u32, usize),
    (blocks, clusters): (usize, usize),
) -> bool {
    match resident_clusters(dev, f, name, block, blocks) {
        Ok(c) => c >= clusters,
        Err(e) => {
            tracing::warn!("{e}; split tiles summed through L2 instead");
            false
        }
    }
}

/// Clusters of `blocks` blocks of `f` (`threads` threads and `smem` bytes of shared memory each)
/// resident at once on the device (cached: a property of the kernel and the GPU).
fn resident_clusters(
    dev: &CudaDevice,
    f: &CudaFunction,
    name: &str,
    (threads, smem): (u32, usize),
    blocks: usize,
) -> Result<usize, QuantError> {
    type Key = (usize, String, usize);
    static SEEN: OnceLock<Mutex<HashMap<Key, usize>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let key = (stream.context().ordinal(), name.to_string(), blocks);
    let mut seen = SEEN.get_or_init(Default::default).lock().expect("poisoned");
    if let Some(&n) = seen.get(&key) {
        return Ok(n);
    }
    let mut attr = cluster_attribute(blocks as u32);
    let config = sys::CUlaunchConfig {
        gridDimX: (blocks * 64) as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    let mut n = 0i32;
    stream.context().bind_to_thread().w()?;
    // SAFETY: the config points at a live attribute; the function is loaded in this context.
    let r = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &config) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(QuantError::Invalid(format!(
            "cuOccupancyMaxActiveClusters refused {name} in clusters of {blocks}: {r:?}"
        )));
    }
    let n = n.max(0) as usize;
    tracing::debug!("{name}: {n} clusters of {blocks} blocks resident at once");
    seen.insert(key, n);
    Ok(n)
}
