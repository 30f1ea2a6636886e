//! W8A8 FP8 on GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper): the
//! activations are quantized to e4m3 on the GPU (`kernels/fp8_act.cu`: per token, per tensor or
//! by the checkpoint's static `input_scale`), then `y = (x_q · W_qᵀ) · (s_x ⊗ s_w)` runs through
//! cuBLASLt with f32 accumulation and a bf16/f16/f32 output.
//!
//! At few rows, where cuBLASLt's FP8 kernels stream the weight slowly, lorq's own tensor-core
//! kernels (`fp8_mma.rs`; on Hopper `fp8_wgmma.rs`) run the product from the same buffers instead.
//!
//! Scales: both per tensor → cuBLASLt's scalar A/B scale pointers; otherwise its outer-vector
//! mode (`OUTER_VEC_32F`: one f32 per weight row and one per token, cuBLAS 12.9+) and, where the
//! library refuses that mode, an unscaled f32 product followed by our own scaling epilogue.
//!
//! Layout (cuBLAS is column-major): W `[n, k]` row-major is a `k × n` column-major matrix used
//! transposed (A, `op = T`), x_q `[m, k]` a `k × m` one (B, `op = N`): the "TN" layout FP8 needs,
//! and D `n × m` column-major is y `[m, n]` row-major. The CPU reference (quantize x the same
//! way, multiply decoded e4m3 values in f32) lives in `tests/cuda_fp8.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Storage, Tensor, WithDType};

use super::qgemv::GpuQuantWeight;
use super::{
    cuda_device, dependent_launch, dtype_name, fp8_mma, fp8_wgmma, function, tensor_from_storage,
};
use crate::fp8::{Fp8Strategy, Fp8Tensor};
use crate::{QuantError, QuantTensor};

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fp8_act.fatbin"));

/// Activation rows from which [`matmul_if_supported`] takes this path for weights below
/// [`ONE_ROW_MIN_WEIGHTS`]: from two rows on, the W8A8 kernel streams the weight faster than the
/// weight-only tensor-core path (2-3x at 16 rows on an H100, docs/benchmarks.md).
pub const MIN_M: usize = 2;

/// Weights of at least this many elements take W8A8 from one row: there lorq's FP8 kernel,
/// activation quantization included, beats the 8-bit weight-only GEMV. GPU time of graph-replayed
/// calls on an H100, one row (docs/benchmarks.md): 14336x4096 27.2 us against 35.7, 4096x14336
/// 29.3 against 31.7; smaller weights stay on the GEMV (4096x4096 13.0 against 13.2, 1024x4096
/// 8.3 against 5.3), which also keeps their activations unrounded.
pub const ONE_ROW_MIN_WEIGHTS: usize = 1 << 25;

/// Activation rows from which an `[n, k]` FP8 weight takes the W8A8 path.
pub fn min_rows(n: usize, k: usize) -> usize {
    if n.saturating_mul(k) >= ONE_ROW_MIN_WEIGHTS {
        1
    } else {
        MIN_M
    }
}

/// cuBLASLt's workspace per stream (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// How the activations get their e4m3 scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActQuant {
    /// One scale per row (token): `absmax(row) / 448` (compressed-tensors' `FP8_DYNAMIC`).
    DynamicPerToken,
    /// One scale for the whole activation: `absmax(x) / 448` (two launches).
    DynamicPerTensor,
    /// A fixed scale, the checkpoint's `input_scale` (compressed-tensors' static `FP8`).
    Static(f32),
}

/// Which kernel runs the quantized product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Kernel {
    /// lorq's kernels where they were measured faster (on Hopper the wgmma kernel for every
    /// weight up to 64 rows and some to 128, [`super::fp8_wgmma::takes`]; elsewhere the mma
    /// kernel at few rows, [`super::fp8_mma::shape`]), else cuBLASLt.
    Auto,
    /// cuBLASLt (scalar or outer-vector scales), our epilogue where the library refuses.
    CublasLt,
    /// cuBLASLt's unscaled f32 product + our scaling kernel (tests compare both).
    CublasLtOwnEpilogue,
    /// lorq's tensor-core kernel at any row count (`kernels/fp8_mma.cu`; in_features % 32 == 0).
    Mma,
    /// lorq's warpgroup kernel at any row count (`kernels/fp8_wgmma.cu`; compute capability 9.0,
    /// in_features % 128 == 0, the weight in the packed layout's device copy).
    Wgmma,
}

/// A weight on the GPU for this path: the e4m3 codes `[n, k]` as stored and one f32 scale per
/// output row (a per-tensor scale repeated), and the static input scale read once.
pub struct Fp8LtWeight {
    n: usize,
    k: usize,
    buffers: WeightBuffers,
    per_tensor: bool,
    input_scale: Option<f32>,
}

/// Where a weight's codes and row scales live on the GPU.
enum WeightBuffers {
    /// The packed layout's device copy, which the weight-only GEMV (one activation row) reads too:
    /// its 8-bit codes are the same row-major bytes, so the weight is on the GPU once.
    Packed(Arc<GpuQuantWeight>),
    /// A copy of its own, for weights the packed layout cannot hold (in_features % 32 != 0).
    Own {
        codes: CudaSlice<u8>,
        scales: CudaSlice<f32>,
    },
}

impl std::fmt::Debug for Fp8LtWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fp8LtWeight({}x{})", self.n, self.k)
    }
}

fn err(msg: String) -> QuantError {
    QuantError::Invalid(format!("fp8 (cuBLASLt): {msg}"))
}

/// The f32 value of a checkpoint's `input_scale` (one positive finite element).
fn read_input_scale(t: &Tensor) -> Result<f32, QuantError> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    match v.as_slice() {
        [s] if s.is_finite() && *s > 0.0 => Ok(*s),
        _ => Err(err(format!(
            "input_scale must be one positive finite value, got {v:?}"
        ))),
    }
}

impl Fp8LtWeight {
    fn upload(t: &Fp8Tensor, dev: &CudaDevice) -> Result<Self, QuantError> {
        let (n, k) = t.shape();
        // The packed layout needs in_features % 32 == 0 (asking for it otherwise would warn that
        // the weight has no fused kernel).
        let packed = match k.is_multiple_of(32) {
            true => t.gpu_packed(dev)?.filter(|w| row_major_bytes(w).is_some()),
            false => None,
        };
        let buffers = match packed {
            Some(w) => WeightBuffers::Packed(w),
            None => {
                let scales: Vec<f32> = match t.scale() {
                    [s] => vec![*s; n],
                    s => s.to_vec(),
                };
                WeightBuffers::Own {
                    codes: dev.clone_htod(t.codes())?,
                    scales: dev.clone_htod(&scales)?,
                }
            }
        };
        Ok(Self {
            n,
            k,
            buffers,
            per_tensor: t.strategy() == Fp8Strategy::Tensor,
            input_scale: t.input_scale().map(read_input_scale).transpose()?,
        })
    }

    /// The codes `[n, k]` and the `n` row scales.
    fn buffers(&self) -> Result<(CudaView<'_, u8>, CudaView<'_, f32>), QuantError> {
        match &self.buffers {
            WeightBuffers::Packed(w) => row_major_bytes(w)
                .ok_or_else(|| err("the packed layout no longer holds row-major codes".into())),
            WeightBuffers::Own { codes, scales } => Ok((codes.slice(..), scales.slice(..))),
        }
    }

    /// The split-K tickets of the packed layout's device copy (none for a copy of its own).
    fn counters(&self) -> Option<&CudaSlice<u32>> {
        match &self.buffers {
            WeightBuffers::Packed(w) => match w.as_ref() {
                GpuQuantWeight::Ready(l) => Some(l.split_k_counters()),
                GpuQuantWeight::Unsupported(_) => None,
            },
            WeightBuffers::Own { .. } => None,
        }
    }

    /// Whether this weight reads the packed layout's device copy (one copy per GPU for every path).
    pub fn shares_packed_copy(&self) -> bool {
        matches!(self.buffers, WeightBuffers::Packed(_))
    }
}

fn row_major_bytes(w: &GpuQuantWeight) -> Option<(CudaView<'_, u8>, CudaView<'_, f32>)> {
    match w {
        GpuQuantWeight::Ready(l) => l.row_major_bytes(),
        GpuQuantWeight::Unsupported(_) => None,
    }
}

fn weight(t: &Fp8Tensor, dev: &CudaDevice) -> Result<Arc<Fp8LtWeight>, QuantError> {
    t.lt.get_or_upload(dev, |d| Fp8LtWeight::upload(t, d))
}

/// Uploads the weight for this path to `dev` now (else the first matmul does).
pub fn prepare(t: &Fp8Tensor, dev: &CudaDevice) -> Result<(), QuantError> {
    weight(t, dev).map(|_| ())
}

/// Whether `t`'s buffers for this path on `dev` are the packed layout's (the GEMV's) device copy.
pub fn shares_packed_copy(t: &Fp8Tensor, dev: &CudaDevice) -> Result<bool, QuantError> {
    Ok(weight(t, dev)?.shares_packed_copy())
}

/// `(major, minor)` compute capability of `dev`'s GPU (asked once per GPU).
pub fn compute_capability(dev: &CudaDevice) -> Result<(i32, i32), QuantError> {
    static KNOWN: OnceLock<Mutex<HashMap<usize, (i32, i32)>>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let ordinal = ctx.ordinal();
    let mut known = KNOWN
        .get_or_init(Default::default)
        .lock()
        .expect("poisoned");
    if let Some(cc) = known.get(&ordinal) {
        return Ok(*cc);
    }
    let major = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let minor = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .w()?;
    known.insert(ordinal, (major, minor));
    Ok((major, minor))
}

/// Whether `dev` has FP8 tensor cores (compute capability 8.9 or newer).
pub fn has_fp8_tensor_cores(dev: &CudaDevice) -> Result<bool, QuantError> {
    Ok(compute_capability(dev)? >= (8, 9))
}

/// Why `(n, k)` cannot take this path, if it cannot: cuBLASLt's FP8 kernels need 16-aligned
/// leading dimensions.
pub fn shape_unsupported(n: usize, k: usize) -> Option<String> {
    (!k.is_multiple_of(16) || !n.is_multiple_of(16)).then(|| {
        format!("FP8 cuBLASLt needs in_features and out_features divisible by 16, got [{n}, {k}]")
    })
}

/// The activations in e4m3 with one f32 scale per row (per-tensor scales repeated per row).
pub struct QuantizedActivations {
    pub m: usize,
    pub k: usize,
    pub codes: CudaSlice<u8>,
    pub scales: CudaSlice<f32>,
    /// One scale for every row (static or dynamic per-tensor).
    pub per_tensor: bool,
}

impl QuantizedActivations {
    /// The codes `[m, k]` and the `m` scales on the host.
    pub fn to_host(&self, dev: &CudaDevice) -> Result<(Vec<u8>, Vec<f32>), QuantError> {
        Ok((dev.clone_dtoh(&self.codes)?, dev.clone_dtoh(&self.scales)?))
    }
}

/// Threads per row: one 8-element load per thread per pass, 32..1024.
fn row_threads(k: usize) -> u32 {
    (k.div_ceil(8).next_multiple_of(32)).clamp(32, 1024) as u32
}

/// Blocks sharing a row in the cluster kernel (kernels/fp8_act.cu `ROW_CLUSTER`).
const ROW_CLUSTER: usize = 8;

/// 8-value chunks a thread of the cluster kernel holds at most (kernels/fp8_act.cu `HOLD_CHUNKS`).
const HOLD_CHUNKS: usize = 4;

/// The threads per block of the cluster kernel (`fp8_quant_rows_cluster_*`: a row's chunks
/// shared by [`ROW_CLUSTER`] blocks) where it runs: per-token dynamic scales, compute capability
/// 9.0+, 1-8 rows of 8192+ values (down_proj's input), where one block per row leaves most SMs
/// idle and each converts a long row alone. H200 (session 34, graph GPU time): 14336 values at
/// 1 / 16 rows 3.1 / 3.3 us against 4.3 / 4.4 one block per row; slower on 4096 values (3.0
/// against 2.4) and past 32 rows (14336 at 64 / 128 rows 5.8 / 8.9 against 5.1 / 5.3). At 16
/// rows its 128 blocks held the SMs that the FP8 wgmma kernel, launched as its dependent in
/// clusters, needed to start streaming its weight (session 35: down_proj's W8A8 call 23.7 us,
/// 4.1 above the product on ready codes, against 1.1-1.4 at 1, 4 and 32 rows). One 8-value
/// chunk a thread, at most [`HOLD_CHUNKS`].
fn cluster_threads(
    dev: &CudaDevice,
    act: ActQuant,
    m: usize,
    k: usize,
) -> Result<Option<u32>, QuantError> {
    if act != ActQuant::DynamicPerToken || m > 8 || k < 8192 || compute_capability(dev)?.0 < 9 {
        return Ok(None);
    }
    let per_block = (k / 8).div_ceil(ROW_CLUSTER);
    let threads = per_block.next_multiple_of(32).min(1024);
    Ok((per_block <= HOLD_CHUNKS * threads).then_some(threads as u32))
}

/// `x` `[m, k]` (f32/bf16/f16, on a GPU; other dtypes go through f32) to e4m3 codes and scales.
pub fn quantize_activations(x: &Tensor, act: ActQuant) -> Result<QuantizedActivations, QuantError> {
    let dev = cuda_device(x, "fp8 activation quantization")?;
    let (m, k) = x
        .dims2()
        .map_err(|_| err(format!("activations must be [m, k], got {:?}", x.dims())))?;
    if !k.is_multiple_of(8) || m == 0 {
        return Err(err(format!(
            "activation quantization needs m > 0 and k % 8 == 0, got [{m}, {k}]"
        )));
    }
    if let ActQuant::Static(s) = act {
        if !(s.is_finite() && s > 0.0) {
            return Err(err(format!("static input scale must be positive, got {s}")));
        }
    }
    let x = match x.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => x.clone(),
        _ => x.to_dtype(DType::F32)?,
    };
    // 16-byte-aligned contiguous rows (the kernel loads 8 elements at a time).
    let x = super::aligned(&x, 16)?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(err("activations are not on a GPU".into()));
    };
    let start = layout.start_offset();
    // SAFETY: the kernels write every code and every scale.
    let codes = unsafe { dev.alloc::<u8>(m * k)? };
    let scales = unsafe { dev.alloc::<f32>(m)? };
    let qa = QuantizedActivations {
        m,
        k,
        codes,
        scales,
        per_tensor: act != ActQuant::DynamicPerToken,
    };
    match x.dtype() {
        DType::BF16 => launch_quant::<half::bf16>(dev, cs, start, &qa, act)?,
        DType::F16 => launch_quant::<half::f16>(dev, cs, start, &qa, act)?,
        _ => launch_quant::<f32>(dev, cs, start, &qa, act)?,
    }
    Ok(qa)
}

fn launch_quant<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    cs: &CudaStorage,
    start: usize,
    qa: &QuantizedActivations,
    act: ActQuant,
) -> Result<(), QuantError> {
    let (m, k) = (qa.m, qa.k);
    let xs = cs.as_cuda_slice::<T>()?.slice(start..start + m * k);
    let name = dtype_name(T::DTYPE);
    let stream = dev.cuda_stream();
    let cfg = LaunchConfig {
        grid_dim: (m as u32, 1, 1),
        block_dim: (row_threads(k), 1, 1),
        shared_mem_bytes: 0,
    };
    let (mi, ki) = (m as i32, k as i32);
    if let Some(threads) = cluster_threads(dev, act, m, k)? {
        let f = function(
            dev,
            "fp8_act",
            FATBIN,
            &format!("fp8_quant_rows_cluster_{name}"),
        )?;
        let mut b = stream.launch_builder(&f);
        b.arg(&xs).arg(&qa.codes).arg(&qa.scales).arg(&ki);
        let cfg = LaunchConfig {
            grid_dim: ((m * ROW_CLUSTER) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `fp8_quant_rows_cluster_*` (kernels/fp8_act.cu): codes hold m*k bytes,
        // scales m floats; the grid is whole clusters of ROW_CLUSTER blocks (the kernel's
        // compiled cluster size), each slice within blockDim * HOLD_CHUNKS chunks.
        unsafe { b.launch(cfg) }.w()?;
        return Ok(());
    }
    let rowmax = if act == ActQuant::DynamicPerTensor {
        // SAFETY: fp8_absmax_rows writes all m row maxima.
        let rowmax = unsafe { dev.alloc::<f32>(m)? };
        let f = function(dev, "fp8_act", FATBIN, &format!("fp8_absmax_rows_{name}"))?;
        let mut b = stream.launch_builder(&f);
        b.arg(&xs).arg(&rowmax).arg(&ki);
        // SAFETY: matches `fp8_absmax_rows_*` (kernels/fp8_act.cu): x holds m*k elements from a
        // 16-byte-aligned start, rowmax m.
        unsafe { b.launch(cfg) }.w()?;
        Some(rowmax)
    } else {
        None
    };
    let (mode, s) = match act {
        ActQuant::DynamicPerToken => (0i32, 0f32),
        ActQuant::Static(s) => (1, s),
        ActQuant::DynamicPerTensor => (2, 0.0),
    };
    let f = function(dev, "fp8_act", FATBIN, &format!("fp8_quant_rows_{name}"))?;
    let mut b = stream.launch_builder(&f);
    let null = 0u64;
    b.arg(&xs).arg(&qa.codes).arg(&qa.scales);
    match &rowmax {
        Some(r) => b.arg(r),
        None => b.arg(&null),
    };
    b.arg(&mi).arg(&ki).arg(&mode).arg(&s);
    // SAFETY: matches `fp8_quant_rows_*`; codes hold m*k bytes, scales m floats, rowmax (mode
    // 2 only) m floats.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Which scaling a cuBLASLt plan is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LtScaling {
    /// Scalar A/B scale pointers (both per tensor).
    Scalar,
    /// One f32 per weight row (A) and per token (B).
    OuterVec,
    /// No scales: the f32 product goes through `fp8_scale_out_*`.
    Unscaled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    n: usize,
    k: usize,
    m: usize,
    scaling: LtScaling,
    out: DType,
}

/// A matmul descriptor, its layouts and the algorithm the heuristic chose, for one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created once by `Plan::new` and is destroyed once here.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

fn cuda_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        _ => sys::cudaDataType::CUDA_R_32F,
    }
}

fn lt_err(what: &str, e: lt::CublasError) -> QuantError {
    err(format!("cuBLASLt {what}: {e:?}"))
}

/// Sets one matmul-descriptor attribute to `v`.
///
/// # Safety
/// `desc` is live and `T` is the attribute's C type.
unsafe fn set_attr<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<(), QuantError> {
    lt::set_matmul_desc_attribute(
        desc,
        attr,
        v as *const T as *const _,
        std::mem::size_of::<T>(),
    )
    .map_err(|e| lt_err(&format!("setting {attr:?}"), e))
}

impl Plan {
    /// Descriptor and layouts for `key`, the scale pointers set (the heuristic may look at
    /// them), and the heuristic's first algorithm.
    fn new(
        handle: sys::cublasLtHandle_t,
        key: PlanKey,
        scale_a: u64,
        scale_b: u64,
    ) -> Result<Self, QuantError> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| lt_err("matmul descriptor", e))?;
        let layout = |t, rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(t, rows as u64, cols as u64, ld as i64)
                .map_err(|e| lt_err("matrix layout", e))
        };
        let e4m3 = sys::cudaDataType::CUDA_R_8F_E4M3;
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: unsafe { std::mem::zeroed() },
        };
        plan.a = layout(e4m3, key.k, key.n, key.k)?;
        plan.b = layout(e4m3, key.k, key.m, key.k)?;
        plan.d = layout(cuda_type(key.out), key.n, key.m, key.n)?;
        // SAFETY: the descriptor is live; the value types are the attributes' C types.
        unsafe {
            set_attr(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?; // CUBLAS_OP_T
            set_attr(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?; // CUBLAS_OP_N
            if key.scaling == LtScaling::OuterVec {
                let mode =
                    sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
                set_attr(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode)?;
                set_attr(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode)?;
            }
            plan.set_scales(key.scaling, scale_a, scale_b)?;
        }
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        let ws = WORKSPACE_BYTES;
        // SAFETY: every handle is live; the result array holds `want` entries.
        let found = unsafe {
            let r = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const _,
                std::mem::size_of::<usize>(),
            );
            let mut results: [sys::cublasLtMatmulHeuristicResult_t; 4] = std::mem::zeroed();
            let mut count = 0i32;
            let h = r.and_then(|_| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    handle,
                    desc,
                    plan.a,
                    plan.b,
                    plan.d,
                    plan.d,
                    pref,
                    results.len() as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
                .result()
            });
            let _ = lt::destroy_matmul_pref(pref);
            h.map_err(|e| lt_err("algorithm heuristic", e))?;
            results[..count.max(0) as usize]
                .iter()
                .find(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
        };
        plan.algo = found.ok_or_else(|| {
            err(format!(
                "no cuBLASLt algorithm for {:?} (n={}, k={}, m={}, out {:?})",
                key.scaling, key.n, key.k, key.m, key.out
            ))
        })?;
        Ok(plan)
    }

    /// # Safety
    /// The descriptor is live; the pointers stay valid until the matmul using them has run.
    unsafe fn set_scales(&self, scaling: LtScaling, a: u64, b: u64) -> Result<(), QuantError> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        if scaling != LtScaling::Unscaled {
            set_attr(self.desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a)?;
            set_attr(self.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b)?;
        }
        Ok(())
    }
}

/// cuBLASLt state of one stream: handle, workspace (one per stream: kernels on one stream never
/// overlap), plans per shape, and whether the outer-vector scale mode works here.
struct LtState {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: HashMap<PlanKey, Plan>,
    outer_vec_ok: bool,
}

// SAFETY: the handle and descriptors are only used under the state's mutex.
unsafe impl Send for LtState {}

/// Plans kept per stream before the cache is cleared (every distinct token count is a shape).
const MAX_PLANS: usize = 4096;

fn lt_state(stream: &Arc<CudaStream>) -> Result<Arc<Mutex<LtState>>, QuantError> {
    type States = Mutex<HashMap<usize, Arc<Mutex<LtState>>>>;
    static STATES: OnceLock<States> = OnceLock::new();
    let key = stream.cu_stream() as usize;
    let mut states = STATES
        .get_or_init(Default::default)
        .lock()
        .expect("poisoned");
    if let Some(s) = states.get(&key) {
        return Ok(s.clone());
    }
    let handle = lt::create_handle().map_err(|e| lt_err("handle", e))?;
    // SAFETY: cuBLASLt only uses it as scratch memory.
    let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.w()?;
    let s = Arc::new(Mutex::new(LtState {
        handle,
        workspace,
        plans: HashMap::new(),
        outer_vec_ok: true,
    }));
    states.insert(key, s.clone());
    Ok(s)
}

/// The loaded cuBLASLt's version (e.g. 130100 for 13.1.0).
pub fn cublaslt_version() -> usize {
    // SAFETY: a plain query without arguments.
    unsafe { sys::cublasLtGetVersion() }
}

/// Whether cuBLASLt has applied outer-vector scales on `dev`'s stream so far (`false` once it
/// refused them and the own epilogue took over).
pub fn outer_vec_in_use(dev: &CudaDevice) -> Result<bool, QuantError> {
    let state = lt_state(&dev.cuda_stream())?;
    let st = state.lock().expect("poisoned");
    Ok(st.outer_vec_ok)
}

/// `(x_q · W_qᵀ) · (s_x ⊗ s_w)` `[m, n]` in `out` (bf16/f16/f32) from quantized activations.
pub fn gemm_quantized(
    t: &Fp8Tensor,
    qx: &QuantizedActivations,
    dev: &CudaDevice,
    out: DType,
    kernel: Fp8Kernel,
) -> Result<Tensor, QuantError> {
    Product::new(t, qx.m, dev, out, kernel)?.run(qx, dev)
}

/// One product of a weight at `m` rows: the kernel it runs on, chosen (and for the wgmma kernel,
/// its output allocated) before the activations are quantized, so that the quantization and the
/// product are adjacent launches (`dependent_launch`).
struct Product {
    w: Arc<Fp8LtWeight>,
    m: usize,
    out: DType,
    kernel: Fp8Kernel,
    /// The wgmma kernel's output, where it runs.
    wgmma: Option<fp8_wgmma::Output>,
}

impl Product {
    fn new(
        t: &Fp8Tensor,
        m: usize,
        dev: &CudaDevice,
        out: DType,
        kernel: Fp8Kernel,
    ) -> Result<Self, QuantError> {
        let w = weight(t, dev)?;
        if let Some(why) = shape_unsupported(w.n, w.k) {
            return Err(err(why));
        }
        let out = product_dtype(out);
        let wgmma = match kernel {
            Fp8Kernel::Wgmma => true,
            Fp8Kernel::Auto => runs_wgmma(&w, m, dev),
            _ => false,
        };
        let wgmma = if wgmma {
            Some(fp8_wgmma::output(dev, out, (m, w.n, w.k))?)
        } else {
            None
        };
        Ok(Self {
            w,
            m,
            out,
            kernel,
            wgmma,
        })
    }

    fn run(self, qx: &QuantizedActivations, dev: &CudaDevice) -> Result<Tensor, QuantError> {
        let w = &self.w;
        if qx.k != w.k || qx.m != self.m {
            return Err(err(format!(
                "activations are [{}, {}], the product was planned for [{}, {}]",
                qx.m, qx.k, self.m, w.k
            )));
        }
        let dims = (qx.m, w.n, w.k);
        let (xq, sx) = (&qx.codes.slice(..), &qx.scales.slice(..));
        if let Some(out) = self.wgmma {
            let ys = fp8_wgmma::gemm(dev, out, &[w.buffers()?], xq, sx, w.counters())?;
            let y = ys.into_iter().next().expect("one weight, one output");
            return Ok(tensor_from_storage(y, (qx.m, w.n)));
        }
        let (wq, sw) = w.buffers()?;
        let (wq, sw) = (&wq, &sw);
        let mma = match self.kernel {
            Fp8Kernel::Mma => Some(fp8_mma::shape(w.n, qx.m).unwrap_or(fp8_mma::Shape::K2)),
            Fp8Kernel::Auto if fp8_mma::supports(w.k) => fp8_mma::shape(w.n, qx.m),
            _ => None,
        };
        let s = match (self.out, mma) {
            (DType::BF16, Some(sh)) => fp8_mma::gemm::<half::bf16>(dev, sh, wq, sw, xq, sx, dims)?,
            (DType::F16, Some(sh)) => fp8_mma::gemm::<half::f16>(dev, sh, wq, sw, xq, sx, dims)?,
            (_, Some(sh)) => fp8_mma::gemm::<f32>(dev, sh, wq, sw, xq, sx, dims)?,
            (DType::BF16, None) => gemm_typed::<half::bf16>(dev, w, qx, self.kernel)?,
            (DType::F16, None) => gemm_typed::<half::f16>(dev, w, qx, self.kernel)?,
            (_, None) => gemm_typed::<f32>(dev, w, qx, self.kernel)?,
        };
        Ok(tensor_from_storage(s, (qx.m, w.n)))
    }
}

fn gemm_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    w: &Fp8LtWeight,
    qx: &QuantizedActivations,
    kernel: Fp8Kernel,
) -> Result<CudaStorage, QuantError> {
    let (n, m) = (w.n, qx.m);
    let stream = dev.cuda_stream();
    let state = lt_state(&stream)?;
    let mut st = state.lock().expect("poisoned");
    // SAFETY: cuBLASLt writes every output element.
    let y = unsafe { dev.alloc::<T>(m * n)? };
    let wanted = if kernel == Fp8Kernel::CublasLtOwnEpilogue {
        LtScaling::Unscaled
    } else if w.per_tensor && qx.per_tensor {
        LtScaling::Scalar
    } else if st.outer_vec_ok {
        LtScaling::OuterVec
    } else {
        LtScaling::Unscaled
    };
    if wanted != LtScaling::Unscaled {
        match run_lt(&mut st, &stream, w, qx, &y, T::DTYPE, wanted) {
            Ok(()) => return Ok(CudaStorage::wrap_cuda_slice(y, dev.clone())),
            Err(e) if wanted == LtScaling::OuterVec => {
                static WARNED: AtomicBool = AtomicBool::new(false);
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "fp8: cuBLASLt refused outer-vector scales ({e}); scaling in a separate kernel"
                    );
                }
                st.outer_vec_ok = false;
            }
            Err(e) => return Err(e),
        }
    }
    // Unscaled f32 product, then y = acc · s_x[row] · s_w[col].
    // SAFETY: cuBLASLt writes every element.
    let acc = unsafe { dev.alloc::<f32>(m * n)? };
    run_lt(
        &mut st,
        &stream,
        w,
        qx,
        &acc,
        DType::F32,
        LtScaling::Unscaled,
    )?;
    drop(st);
    let f = function(
        dev,
        "fp8_act",
        FATBIN,
        &format!("fp8_scale_out_{}", dtype_name(T::DTYPE)),
    )?;
    let (_, sw) = w.buffers()?;
    let mut b = stream.launch_builder(&f);
    let (mi, ni) = (m as i32, n as i32);
    b.arg(&acc)
        .arg(&y)
        .arg(&qx.scales)
        .arg(&sw)
        .arg(&mi)
        .arg(&ni);
    let blocks = (m * n).div_ceil(256).clamp(1, 132 * 16) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `fp8_scale_out_*`: acc and y hold m*n elements, sx m, sw n.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// One cuBLASLt matmul into `d` (`[m, n]` of `out`), building the shape's plan on first use.
fn run_lt<D: DevicePtr<E>, E>(
    st: &mut LtState,
    stream: &Arc<CudaStream>,
    w: &Fp8LtWeight,
    qx: &QuantizedActivations,
    d: &D,
    out: DType,
    scaling: LtScaling,
) -> Result<(), QuantError> {
    let key = PlanKey {
        n: w.n,
        k: w.k,
        m: qx.m,
        scaling,
        out,
    };
    let (wq, sw) = w.buffers()?;
    let (pa, _ga) = wq.device_ptr(stream);
    let (pb, _gb) = qx.codes.device_ptr(stream);
    let (sa, _gsa) = sw.device_ptr(stream);
    let (sb, _gsb) = qx.scales.device_ptr(stream);
    let (pd, _gd) = d.device_ptr(stream);
    let (ws, _gw) = st.workspace.device_ptr(stream);
    if !st.plans.contains_key(&key) {
        if st.plans.len() >= MAX_PLANS {
            st.plans.clear();
        }
        let plan = Plan::new(st.handle, key, sa, sb)?;
        st.plans.insert(key, plan);
    }
    let plan = &st.plans[&key];
    let (alpha, beta) = (1f32, 0f32);
    // SAFETY: the plan's layouts describe these buffers (A: n*k codes, B: m*k codes, D: m*n
    // elements of `out`), the scale vectors hold n and m floats, and all stay alive (guards
    // above) until the work enqueued on `stream` has been ordered after them.
    unsafe {
        plan.set_scales(scaling, sa, sb)?;
        lt::matmul(
            st.handle,
            plan.desc,
            &alpha as *const f32 as *const _,
            &beta as *const f32 as *const _,
            pa as *const _,
            plan.a,
            pb as *const _,
            plan.b,
            pd as *const _,
            plan.d,
            pd as *mut _,
            plan.d,
            &plan.algo,
            ws as *mut _,
            WORKSPACE_BYTES,
            stream.cu_stream() as *mut _,
        )
        .map_err(|e| lt_err("matmul", e))
    }
}

/// `x · Wᵀ` through FP8 tensor cores: x `[.., k]` quantized by `act` (default: the weight's
/// static `input_scale` if it has one, else per token), output in x's dtype (bf16/f16/f32;
/// others computed in f32 and cast back). Errors on GPUs without FP8 tensor cores and on shapes
/// cuBLASLt's FP8 kernels cannot take ([`shape_unsupported`]).
pub fn matmul_with(
    t: &Fp8Tensor,
    x: &Tensor,
    act: Option<ActQuant>,
    kernel: Fp8Kernel,
) -> Result<Tensor, QuantError> {
    let dev = cuda_device(x, "fp8 cuBLASLt matmul")?;
    if !has_fp8_tensor_cores(dev)? {
        let (a, b) = compute_capability(dev)?;
        return Err(err(format!(
            "FP8 tensor cores need compute capability 8.9+, this GPU has {a}.{b}"
        )));
    }
    let (n, k) = t.shape();
    if let Some(why) = shape_unsupported(n, k) {
        return Err(err(why));
    }
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        return Err(err(format!(
            "activation shape {dims:?} does not end in in_features {k}"
        )));
    }
    let m = x.elem_count() / k.max(1);
    let w = weight(t, dev)?;
    let act = act.unwrap_or(match w.input_scale {
        Some(s) => ActQuant::Static(s),
        None => ActQuant::DynamicPerToken,
    });
    // The product first (its output allocated), then the activations: adjacent launches.
    let product = Product::new(t, m, dev, x.dtype(), kernel)?;
    let qx = shared_activations(x, act, || quantize_activations(&x.reshape((m, k))?, act))?;
    shaped_like_input(product.run(&qx, dev)?, &dims, n, x.dtype())
}

/// The dtype a product writes for activations of `dtype`: bf16 / f16 as they are, f32 else.
fn product_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => dtype,
        _ => DType::F32,
    }
}

/// A product's `[m, n]` output `y` in the input's shape `dims` (its last dimension `n`) and
/// `dtype`.
fn shaped_like_input(
    y: Tensor,
    dims: &[usize],
    n: usize,
    dtype: DType,
) -> Result<Tensor, QuantError> {
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n;
    let y = y.reshape(out_dims)?;
    Ok(if y.dtype() != dtype {
        y.to_dtype(dtype)?
    } else {
        y
    })
}

/// `x · Wᵢᵀ` of FP8 weights sharing `x` (q/k/v, gate/up) in one launch of the wgmma kernel, their
/// tiles end to end (`fp8_wgmma::group_output`): where every weight's own product would run on
/// that kernel (`Fp8Kernel::Auto`), with per-token dynamic activation scales (static
/// `input_scale`s differ per weight), and the group's tiles are whole or summed in clusters.
/// `None` sends the caller to one product per weight. q/k/v's 48 tiles fill more SMs than q's 32
/// and k's and v's 8 apiece, and the three fixed costs are paid once. Off with
/// `qwgmma::set_grouped_launches` (the switch of both wgmma kernels' groups).
pub fn matmul_group(ts: &[&Fp8Tensor], x: &Tensor) -> Result<Option<Vec<Tensor>>, QuantError> {
    if !super::qwgmma::grouped_launches() || !(2..=fp8_wgmma::MAX_WEIGHTS).contains(&ts.len()) {
        return Ok(None);
    }
    let candle_core::Device::Cuda(dev) = x.device() else {
        return Ok(None);
    };
    let k = ts[0].shape().1;
    let (dims, m) = (x.dims().to_vec(), x.elem_count() / k.max(1));
    if dims.last() != Some(&k) {
        return Ok(None);
    }
    // (From one row: k/v alone stay on the weight-only GEMV at one row, `min_rows`, but beside q
    // in one launch they cost little more than q alone.)
    if !has_fp8_tensor_cores(dev)? {
        return Ok(None);
    }
    let mut ws = Vec::with_capacity(ts.len());
    for t in ts {
        let (n, tk) = t.shape();
        if tk != k || t.input_scale().is_some() || shape_unsupported(n, k).is_some() {
            return Ok(None);
        }
        let w = weight(t, dev)?;
        if !runs_wgmma(&w, m, dev) {
            return Ok(None);
        }
        ws.push(w);
    }
    let ns: Vec<usize> = ws.iter().map(|w| w.n).collect();
    // The outputs first, then the activations: adjacent launches (`dependent_launch`).
    let Some(output) = fp8_wgmma::group_output(dev, product_dtype(x.dtype()), m, &ns, k)? else {
        return Ok(None);
    };
    let act = ActQuant::DynamicPerToken;
    let qx = shared_activations(x, act, || quantize_activations(&x.reshape((m, k))?, act))?;
    let buffers = ws
        .iter()
        .map(|w| w.buffers())
        .collect::<Result<Vec<_>, _>>()?;
    let (xq, sx) = (&qx.codes.slice(..), &qx.scales.slice(..));
    let ys = fp8_wgmma::gemm(dev, output, &buffers, xq, sx, None)?;
    ys.into_iter()
        .zip(&ns)
        .map(|(y, &n)| shaped_like_input(tensor_from_storage(y, (m, n)), &dims, n, x.dtype()))
        .collect::<Result<Vec<_>, QuantError>>()
        .map(Some)
}

/// Activations quantized inside [`with_shared_activations`], by input tensor and scaling.
type SharedActivations = Vec<(candle_core::TensorId, ActQuant, Arc<QuantizedActivations>)>;

thread_local! {
    static SHARED: std::cell::RefCell<Option<SharedActivations>> = const { std::cell::RefCell::new(None) };
    /// Codes the producer of an activation tensor made in its own launch ([`with_offered_activations`]).
    static OFFERED: std::cell::RefCell<Option<(candle_core::TensorId, Arc<QuantizedActivations>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` (the FP8 projections reading `x`) with the per-token e4m3 codes of `x` already made
/// by the kernel that produced `x` (`fused_ops::add_rms_norm_fp8`), so that they skip their own
/// quantization launch. The codes are dropped when `f` returns (inside a graph capture they are
/// the capture's allocations).
pub fn with_offered_activations<R>(
    x: &Tensor,
    qa: QuantizedActivations,
    f: impl FnOnce() -> R,
) -> Result<R, QuantError> {
    let k = x.dims().last().copied().unwrap_or(0);
    if qa.per_tensor || qa.k != k || qa.m * k != x.elem_count() {
        return Err(err(format!(
            "offered activations [{}, {}] (per tensor: {}) do not fit x {:?}",
            qa.m,
            qa.k,
            qa.per_tensor,
            x.dims()
        )));
    }
    let outer = OFFERED.with(|o| o.borrow_mut().replace((x.id(), Arc::new(qa))));
    let r = f();
    OFFERED.with(|o| *o.borrow_mut() = outer);
    Ok(r)
}

/// Whether the kernel producing `x` should write its per-token e4m3 codes for `t`'s GPU product
/// ([`with_offered_activations`]): the product quantizes `x` per token (dynamic scales, the JIT
/// default), and not, at up to 64 rows, into the wgmma kernel launched as a programmatic
/// dependent of that quantization, which streams its weight's first stages while the
/// quantization runs. There the product's own quantization was the faster of the two (H200, fp8
/// decode of the Llama-3-8B shape, session 34: batch 1 / 8 / 32 +3.5 / +3.5 / +1.4 % against the
/// codes of the norm and SiLU·mul, whose one block per row converts a whole row alone); at 128
/// rows the codes were faster (the 128-row tiles' ring holds 3 stages, and the quantization is
/// longer).
pub fn wants_offered_activations(t: &Fp8Tensor, x: &Tensor) -> Result<bool, QuantError> {
    if t.input_scale().is_some() || !takes_tensor_cores(t, x)? {
        return Ok(false);
    }
    let dev = cuda_device(x, "fp8 activation quantization")?;
    let m = x.elem_count() / t.shape().1.max(1);
    let w = weight(t, dev)?;
    Ok(m > 64 || !(dependent_launch::enabled() && runs_wgmma(&w, m, dev)))
}

/// Whether `Fp8Kernel::Auto` runs `w`'s product at `m` rows on the wgmma kernel (it reads the
/// packed layout's split-K counters).
fn runs_wgmma(w: &Fp8LtWeight, m: usize, dev: &CudaDevice) -> bool {
    fp8_wgmma::takes(w.n, m, w.k, dev) && w.counters().is_some()
}

/// Runs `f` (the matmuls of weights sharing one input: q/k/v, gate/up) with each input tensor
/// quantized once per activation scaling instead of once per weight. Outside it nothing is kept.
pub fn with_shared_activations<R>(f: impl FnOnce() -> R) -> R {
    let outer = SHARED.with(|s| s.borrow_mut().replace(Vec::new()));
    let r = f();
    SHARED.with(|s| *s.borrow_mut() = outer);
    r
}

/// `x` quantized by `act`: from the enclosing [`with_shared_activations`] scope when it already
/// holds it, else by `quantize` (and kept there for the scope's other weights).
fn shared_activations(
    x: &Tensor,
    act: ActQuant,
    quantize: impl FnOnce() -> Result<QuantizedActivations, QuantError>,
) -> Result<Arc<QuantizedActivations>, QuantError> {
    let id = x.id();
    if act == ActQuant::DynamicPerToken {
        let offered = OFFERED.with(|o| {
            o.borrow()
                .as_ref()
                .filter(|(i, _)| *i == id)
                .map(|(_, q)| q.clone())
        });
        if let Some(q) = offered {
            return Ok(q);
        }
    }
    let hit = SHARED.with(|s| {
        s.borrow().as_ref().and_then(|v| {
            v.iter()
                .find(|(i, a, _)| *i == id && *a == act)
                .map(|(_, _, q)| q.clone())
        })
    });
    if let Some(q) = hit {
        return Ok(q);
    }
    let q = Arc::new(quantize()?);
    SHARED.with(|s| {
        if let Some(v) = s.borrow_mut().as_mut() {
            v.push((id, act, q.clone()));
        }
    });
    Ok(q)
}

/// Whether `Fp8Tensor::matmul` runs `x · Wᵀ` on FP8 tensor cores: `x` on a GPU with compute
/// capability 8.9+, at least [`min_rows`] rows and a supported shape (with a one-time warning
/// on GPUs older than 8.9, where FP8 weights are decoded instead).
pub fn takes_tensor_cores(t: &Fp8Tensor, x: &Tensor) -> Result<bool, QuantError> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        return Ok(false);
    };
    let (n, k) = t.shape();
    if x.elem_count() / k.max(1) < min_rows(n, k) || shape_unsupported(n, k).is_some() {
        return Ok(false);
    }
    if !has_fp8_tensor_cores(dev)? {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            let (a, b) = compute_capability(dev)?;
            tracing::warn!(
                "fp8: this GPU (compute capability {a}.{b}) has no FP8 tensor cores (8.9+); \
                 FP8 weights are decoded to the activation dtype instead"
            );
        }
        return Ok(false);
    }
    Ok(true)
}

/// `Fp8Tensor::matmul`'s GPU dispatch: `Some(y)` through FP8 tensor cores where
/// [`takes_tensor_cores`], `None` sends the caller to its weight-only path.
pub fn matmul_if_supported(t: &Fp8Tensor, x: &Tensor) -> Result<Option<Tensor>, QuantError> {
    if !takes_tensor_cores(t, x)? {
        return Ok(None);
    }
    matmul_with(t, x, None, Fp8Kernel::Auto).map(Some)
}
