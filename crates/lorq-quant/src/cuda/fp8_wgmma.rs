//! The W8A8 FP8 product on Hopper's warpgroup tensor-core instruction (`kernels/fp8_wgmma.cu`:
//! `wgmma` m64nNk32 e4m3, compute capability 9.0). It reads the same buffers as the cuBLASLt path
//! and `fp8_mma.rs` (row-major e4m3 weight codes and f32 row scales, activation codes and
//! per-token scales as `quantize_activations` writes them), copied into shared memory by the
//! tensor-memory accelerator through tensor maps made here per call (host work only).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, WithDType};

use super::dependent_launch::{clusters_fit, KernelArgs, MAX_CLUSTER};
use super::qmma_tiled::KSTEP;
use super::qwgmma::schedule;
use super::{dtype_name, function_with_shared};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fp8_wgmma.fatbin"));

/// Threads per block: two consumer warpgroups and a producer (kernels/fp8_wgmma.cu
/// `fp8wg::THREADS`).
const THREADS: u32 = 384;

/// Output rows of a tile (`fp8wg::ROWS`): the weight's box height.
const TILE_ROWS: usize = 128;

/// K steps a stage of the ring holds (the `G` of every kernels/fp8_wgmma.cu `FP8WG_CFG_*`).
const STAGE_STEPS: usize = 2;

/// A block shape (kernels/fp8_wgmma.cu `FP8WG_CFG_*`): its activation rows and the stages of its
/// ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    name: &'static str,
    rows: usize,
    stages: usize,
}

impl Shape {
    /// Dynamic shared memory: the ring (each stage [`STAGE_STEPS`] K steps of 128 weight rows and
    /// `rows` activation rows, 128 bytes each) and 1 KiB to align it to the swizzle's 1024-byte
    /// atoms.
    fn shared_bytes(self) -> usize {
        self.stages * STAGE_STEPS * (TILE_ROWS + self.rows) * KSTEP + 1024
    }
}

/// The narrowest block that holds `m` activation rows (16, 32, 64, 128); past 128 rows, blocks of
/// 128.
pub fn shape(m: usize) -> Shape {
    let (name, rows, stages) = match m {
        0..=16 => ("n16", 16, 6),
        17..=32 => ("n32", 32, 5),
        33..=64 => ("n64", 64, 4),
        _ => ("n128", 128, 3),
    };
    Shape { name, rows, stages }
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the kernel on or off for the whole process (on by default), e.g. to measure what it
/// brings; off, [`supports`] is false.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the kernel takes an `[n, k]` weight on `dev`: whole 128-wide K steps, on a GPU of
/// compute capability 9.0 (`wgmma` is sm_90a only).
pub fn supports(k: usize, dev: &CudaDevice) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && k.is_multiple_of(KSTEP)
        && k > 0
        && matches!(super::fp8_gemm::compute_capability(dev), Ok((9, 0)))
}

/// Whether `Fp8Kernel::Auto` takes this kernel for an `[n, k]` weight at `m` activation rows.
/// With the cluster schedule ([`plan`], H200, session 35, bf16 cuBLAS / this kernel with the
/// activation quantization / lorq's mma kernel / cuBLASLt, us): every weight up to 64 rows
/// (q/o at 1 row 12.8 / 9.6 / 11.0 / 16.5, k/v at 16 rows 7.3 / 6.7 / 8.0 / 15.2, gate/up at 16
/// 30.3 / 19.2 / 23.4 / 28.0, down at 64 36.0 / 24.3 / 54.9 / 42.2), and at 65-128 rows weights
/// of at most 4096 outputs or at least 8192 inputs (q/o at 128 rows 16.1 against cuBLASLt's
/// 16.9, down 31.0 against 43.1); wide 4096-input weights (gate/up) at 128 rows go to cuBLASLt
/// (23.3 against 24.3). Without it (session 34's stream-K schedule): up to 128 rows of weights
/// with at least 8192 inputs and 17-64 rows of weights with more than 1024 outputs, where that
/// schedule beat the mma kernel and cuBLASLt.
pub fn takes(n: usize, m: usize, k: usize, dev: &CudaDevice) -> bool {
    let long_k = k >= 8192 && (1..=128).contains(&m);
    let routed = if super::qwgmma::cluster_sums() {
        (1..=64).contains(&m) || (long_k || (n <= 4096 && (65..=128).contains(&m)))
    } else {
        long_k || (n > 1024 && (17..=64).contains(&m))
    };
    routed && supports(k, dev)
}

/// The most tiles (128 output rows x a block's activation rows) whose K steps are shared out over
/// the SMs through L2 partial sums: fewer than one per SM. More tiles run whole, one block each.
fn split_until(sms: usize) -> usize {
    sms.saturating_sub(1)
}

/// The most activation rows x K steps a block of the cluster schedule sums: down_proj at 128 rows
/// in 2 splits (128 x 56) spent longer in its tensor cores on 64 SMs than the stream-K schedule's
/// 128 blocks did with their partial sums (29.1 against 27.1 us); at 64 rows (64 x 56) the two
/// were even, and shorter tiles (q/o at 128 rows: 128 x 16) won with clusters.
const MAX_BLOCK_WORK: usize = 64 * 64;

/// Tiles of weights with `ns` output rows at `m` activation rows, laid end to end.
fn tile_count(sh: Shape, m: usize, ns: &[usize]) -> usize {
    ns.iter().map(|n| n.div_ceil(TILE_ROWS)).sum::<usize>() * m.div_ceil(sh.rows)
}

/// How a launch shares out the tiles: the blocks' K steps and, above 1, the blocks of a cluster
/// (a tile's equal splits, summed in shared memory: kernels/fp8_wgmma.cu `in_cluster`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    schedule: super::qwgmma::Schedule,
    cluster: usize,
}

/// With `clusters` (while `qwgmma::set_cluster_sums` is on): at least three tiles for every four
/// SMs run whole, one block each (no partial sums at all); fewer are cut into the most equal
/// splits (at most [`MAX_CLUSTER`], dividing the K steps) that leave a block per SM, each tile's
/// splits one cluster, as long as a block's tensor-core work stays within [`MAX_BLOCK_WORK`];
/// `fits(splits)` says whether every such cluster is resident at once (a second wave of clusters
/// would cost more than the sums save: an H200 holds 30 clusters of 4 of this kernel's blocks,
/// not the 32 of q/o's and down_proj's tiles, but 66 of 2). Otherwise, and without `clusters`:
/// the stream-K [`schedule`] (split tiles summed through L2).
///
/// H200, session 35, the kernel alone, us, stream-K -> clusters: gate/up (112 tiles, whole) at
/// 16 rows 21.7 -> 17.6, at 128 30.5 -> 22.8; q/o (2 splits) at 16 10.0 -> 9.7, at 128 16.8 ->
/// 14.3; k/v (8 splits) at 16 7.1 -> 5.6; down (2 splits) at 16 19.8 -> 19.2, at 128 27.1 -> 29.1
/// (past [`MAX_BLOCK_WORK`]: stream-K).
fn plan(
    sh: Shape,
    (m, ns, k): (usize, &[usize], usize),
    sms: usize,
    clusters: bool,
    fits: impl Fn(usize) -> bool,
) -> Option<Plan> {
    let tiles = tile_count(sh, m, ns);
    let steps = k.div_ceil(KSTEP);
    let whole = super::qwgmma::Schedule::split_evenly(tiles, steps, 1);
    if clusters && tiles > 0 {
        if 4 * tiles >= 3 * sms {
            return Some(Plan {
                schedule: whole,
                cluster: 1,
            });
        }
        let most = (sms / tiles).min(MAX_CLUSTER);
        let small = |s: usize| sh.rows * (steps / s) <= MAX_BLOCK_WORK;
        if let Some(splits) = (2..=most)
            .rev()
            .find(|&s| steps.is_multiple_of(s) && small(s) && fits(s))
        {
            return Some(Plan {
                schedule: super::qwgmma::Schedule::split_evenly(tiles, steps, splits),
                cluster: splits,
            });
        }
    }
    // (Stream-K's partial sums and tickets are one weight's: a group has none.)
    match ns {
        [n] => Some(Plan {
            schedule: schedule(n.div_ceil(TILE_ROWS), m, k, sh.rows, sms, split_until(sms)),
            cluster: 1,
        }),
        _ => None,
    }
}

/// A `CUtensorMap`, passed by value as the kernel's `__grid_constant__` `fp8wg::TensorMap`.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TensorMap(sys::CUtensorMap);

// SAFETY: 128 plain bytes, 64-byte aligned: the layout of the kernel's `fp8wg::TensorMap`.
unsafe impl DeviceRepr for TensorMap {}

/// The tensor map of `rows` x `cols` row-major bytes at `ptr`, copied in boxes of 128 bytes x
/// `box_rows` rows, 128-byte swizzled (as `wgmma` reads K-major operands); rows past `rows` arrive
/// as zeros.
fn tensor_map(
    ptr: sys::CUdeviceptr,
    rows: usize,
    cols: usize,
    box_rows: usize,
    what: &str,
) -> Result<TensorMap, QuantError> {
    // The copy engine's rules: a 16-byte aligned start and row pitch, at most 256 rows a box.
    if !ptr.is_multiple_of(16) || !cols.is_multiple_of(16) || box_rows > 256 || rows == 0 {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: the {what} ([{rows}, {cols}] bytes at {ptr:#x}) cannot be copied by \
             tensor maps (16-byte aligned rows needed)"
        )));
    }
    let dims = [cols as u64, rows as u64];
    let strides = [cols as u64];
    let boxes = [KSTEP as u32, box_rows as u32];
    let elements = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: the arrays hold rank 2 (strides rank - 1) entries; the map is written by the call.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elements.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: cuTensorMapEncodeTiled refused the {what} ([{rows}, {cols}] bytes, \
             boxes of {box_rows} rows): {r:?}"
        )));
    }
    // SAFETY: written by the successful call above.
    Ok(TensorMap(unsafe { map.assume_init() }))
}

/// The kernel's `fp8wg::Weights` (kernels/fp8_wgmma.cu, the same layout): up to three weights'
/// codes (tensor maps), row scales and outputs, and their output rows.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Weights {
    maps: [[u64; 16]; MAX_WEIGHTS],
    sw: [u64; MAX_WEIGHTS],
    y: [u64; MAX_WEIGHTS],
    n: [i32; MAX_WEIGHTS],
    count: i32,
}

// SAFETY: plain integers in the kernel's `fp8wg::Weights` layout (448 bytes, 64-byte aligned).
unsafe impl DeviceRepr for Weights {}

/// Weights one launch computes at most (`fp8wg::MAX_WEIGHTS`).
pub(crate) const MAX_WEIGHTS: usize = 3;

/// A product's outputs (and split-K partial sums), allocated before its activations are
/// quantized: the quantization kernel and this one are then adjacent in the stream, so that a
/// graph capture joins them by a programmatic edge (`dependent_launch`; an allocation between
/// them would be a graph node of its own).
pub(crate) struct Output {
    ys: Vec<CudaStorage>,
    ns: Vec<usize>,
    partial: Option<CudaSlice<f32>>,
    shape: Shape,
    plan: Plan,
    f: CudaFunction,
    m: usize,
    k: usize,
}

/// The output `[m, n]` in `dtype` (bf16/f16/f32) of an `[n, k]` weight's product at `m` rows.
pub(crate) fn output(
    dev: &CudaDevice,
    dtype: DType,
    (m, n, k): (usize, usize, usize),
) -> Result<Output, QuantError> {
    group_output(dev, dtype, m, &[n], k)?.ok_or_else(|| {
        QuantError::Invalid(format!(
            "fp8 wgmma kernel: no schedule for [{n}, {k}] at {m} rows"
        ))
    })
}

/// The outputs `[m, nᵢ]` of weights `[nᵢ, k]` sharing their activations (q/k/v, gate/up) in one
/// launch, their tiles laid end to end: `None` where the tiles would need the stream-K schedule
/// (a group's tiles are whole or summed in clusters).
pub(crate) fn group_output(
    dev: &CudaDevice,
    dtype: DType,
    m: usize,
    ns: &[usize],
    k: usize,
) -> Result<Option<Output>, QuantError> {
    if !supports(k, dev)
        || m == 0
        || ns.is_empty()
        || ns.len() > MAX_WEIGHTS
        || ns.iter().any(|n| *n == 0 || !n.is_multiple_of(4))
    {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: needs compute capability 9.0, in_features % 128 == 0, 1-3 weights \
             of out_features % 4 == 0 and m > 0, got {ns:?} x {k} at {m} rows"
        )));
    }
    let shape = shape(m);
    if !matches!(dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: writes bf16, f16 or f32, not {dtype:?}"
        )));
    }
    let name = format!("fp8wg_{}_{}", dtype_name(dtype), shape.name);
    let smem = shape.shared_bytes();
    let f = function_with_shared(dev, "fp8_wgmma", FATBIN, &name, smem)?;
    let tiles = tile_count(shape, m, ns);
    let fits = |splits| clusters_fit(dev, &f, &name, (THREADS, smem), (splits, tiles));
    let sms = super::qmma_tiled::multiprocessors(dev);
    let Some(plan) = plan(shape, (m, ns, k), sms, super::qwgmma::cluster_sums(), fits) else {
        return Ok(None);
    };
    let ys = ns
        .iter()
        // SAFETY: every output element is written by the kernel.
        .map(|&n| unsafe { dev.alloc_uninit(&(m, n).into(), dtype) })
        .collect::<Result<Vec<_>, _>>()?;
    let partial = if plan.schedule.slots > 1 {
        // SAFETY: a split tile's segments each write their part of slot (split) before the tile's
        // last block reads them.
        Some(unsafe { dev.alloc::<f32>(plan.schedule.slots * m * ns[0])? })
    } else {
        None
    };
    Ok(Some(Output {
        ys,
        ns: ns.to_vec(),
        partial,
        shape,
        plan,
        f,
        m,
        k,
    }))
}

/// `yᵢ[m, nᵢ] = (xq · wqᵢᵀ) · sx[m] · swᵢ[nᵢ]` into `out` (from [`output`] / [`group_output`]):
/// `ws` the weights' `wq` `[nᵢ, k]` row-major e4m3 codes and `sw` nᵢ f32 scales, `xq` `[m, k]`
/// codes and `sx` m scales; `counters` the single weight's split-K tickets (zero between
/// launches, at least `n.div_ceil(16) * 16`: the packed layout's), needed where its schedule
/// splits tiles through L2. Launched as a programmatic dependent of the kernel before it
/// (`dependent_launch`).
pub(crate) fn gemm(
    dev: &CudaDevice,
    out: Output,
    ws: &[(CudaView<'_, u8>, CudaView<'_, f32>)],
    xq: &CudaView<'_, u8>,
    sx: &CudaView<'_, f32>,
    counters: Option<&CudaSlice<u32>>,
) -> Result<Vec<CudaStorage>, QuantError> {
    let (m, k) = (out.m, out.k);
    let sized = ws.len() == out.ns.len()
        && ws
            .iter()
            .zip(&out.ns)
            .all(|((wq, sw), &n)| wq.len() >= n * k && sw.len() >= n);
    if !sized || xq.len() < m * k || sx.len() < m {
        return Err(QuantError::Invalid(format!(
            "fp8 wgmma kernel: needs the codes and scales of {:?} x {k} weights, [{m}, {k}] \
             activation codes and {m} activation scales",
            out.ns
        )));
    }
    // A splitting schedule is one weight's: one ticket per tile, within the packed layout's
    // n/16*16.
    let tiles = tile_count(out.shape, m, &out.ns);
    let counters = match (out.plan.schedule.slots > 1, counters) {
        (false, _) => None,
        (true, Some(c)) if c.len() >= out.ns[0].div_ceil(16) * 16 && c.len() >= tiles => Some(c),
        (true, _) => {
            return Err(QuantError::Invalid(format!(
                "fp8 wgmma kernel: [{}, {k}] at {m} rows splits {tiles} tiles through L2 and \
                 needs the weight's split-K counters (one per tile, at least {})",
                out.ns[0],
                out.ns[0].div_ceil(16) * 16
            )))
        }
    };
    match out.ys[0].dtype() {
        DType::BF16 => launch::<half::bf16>(dev, &out, ws, xq, sx, counters)?,
        DType::F16 => launch::<half::f16>(dev, &out, ws, xq, sx, counters)?,
        _ => launch::<f32>(dev, &out, ws, xq, sx, counters)?,
    }
    Ok(out.ys)
}

fn launch<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    out: &Output,
    ws: &[(CudaView<'_, u8>, CudaView<'_, f32>)],
    xq: &CudaView<'_, u8>,
    sx: &CudaView<'_, f32>,
    counters: Option<&CudaSlice<u32>>,
) -> Result<(), QuantError> {
    let (sh, plan, m, k) = (out.shape, out.plan, out.m, out.k);
    let stream = dev.cuda_stream();
    // The weights' buffers are passed inside `Weights` and the codes read through tensor maps:
    // the guards order the buffers' other users around this launch, as views passed as
    // arguments would.
    let mut guards = Vec::with_capacity(3 * ws.len() + 1);
    let mut weights = Weights {
        maps: [[0; 16]; MAX_WEIGHTS],
        sw: [0; MAX_WEIGHTS],
        y: [0; MAX_WEIGHTS],
        n: [0; MAX_WEIGHTS],
        count: ws.len() as i32,
    };
    for (g, ((wq, sw), (y, &n))) in ws.iter().zip(out.ys.iter().zip(&out.ns)).enumerate() {
        let (wp, wguard) = wq.device_ptr(&stream);
        let (sp, sguard) = sw.device_ptr(&stream);
        let (yp, yguard) = y.as_cuda_slice::<T>()?.device_ptr(&stream);
        guards.extend([wguard, sguard, yguard]);
        weights.maps[g] = tensor_map(wp, n, k, TILE_ROWS, "weight codes")?.0.opaque;
        weights.sw[g] = sp;
        weights.y[g] = yp;
        weights.n[g] = n as i32;
    }
    // Unused slots repeat the first weight's map (never read).
    for g in ws.len()..MAX_WEIGHTS {
        weights.maps[g] = weights.maps[0];
    }
    let (xp, xguard) = xq.device_ptr(&stream);
    guards.push(xguard);
    let mx = tensor_map(xp, m, k, sh.rows, "activation codes")?;
    let (mi, ki) = (m as i32, k as i32);
    let (pi, ci) = (plan.schedule.per_block as i32, i32::from(plan.cluster > 1));
    let mut b = KernelArgs::new(&stream);
    b.val(&weights).val(&mx).buf(sx);
    match &out.partial {
        Some(p) => b.buf(p),
        None => b.address(0),
    };
    match counters {
        Some(c) => b.buf(c),
        None => b.address(0),
    };
    b.val(&mi).val(&ki).val(&pi).val(&ci);
    b.in_clusters(plan.cluster as u32);
    let cfg = LaunchConfig {
        grid_dim: (plan.schedule.blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: sh.shared_bytes() as u32,
    };
    // SAFETY: matches `fp8wg_*` (kernels/fp8_wgmma.cu): `weights` holds each weight's map of its
    // nᵢ*k codes, nᵢ scales and [m, nᵢ] output (checked by the caller), the activations' map xq's
    // m*k codes, sx m; partial slots*m*n and counters one per tile where a single weight's
    // schedule splits tiles through L2 (at most 16 activation blocks per 128 output rows, within
    // the n/16*16 checked), null otherwise; shared memory opted in; in clusters, the grid is the
    // tiles' whole clusters, one segment a block (`plan`). The kernel copies only weight codes
    // before `wait_for_producers()`.
    unsafe { b.launch_dependent(&out.f, cfg) }?;
    drop(guards);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dynamic shared memory a block may ask for: Hopper's 227 KiB opt-in less 1 KiB for the
    /// kernel's static shared memory (227 KiB of dynamic memory alone is refused at launch).
    const MAX_SHARED: usize = 226 * 1024;

    #[test]
    fn shapes_cover_every_row_count() {
        for (m, rows) in [
            (1, 16),
            (16, 16),
            (17, 32),
            (32, 32),
            (33, 64),
            (64, 64),
            (65, 128),
            (128, 128),
            (300, 128),
        ] {
            assert_eq!(shape(m).rows, rows, "m = {m}");
        }
        for m in [16, 32, 64, 128] {
            let sh = shape(m);
            assert!(sh.shared_bytes() <= MAX_SHARED, "m = {m}");
            // The ring holds at least 3 stages (two in flight while one is summed) and 6 K steps.
            assert!(sh.stages >= 3 && sh.stages * STAGE_STEPS >= 6, "m = {m}");
        }
    }

    #[test]
    fn blocks_share_k_steps() {
        let stream_k = |sh, (m, n, k): (usize, usize, usize)| {
            plan(sh, (m, &[n], k), 132, false, |_| true)
                .unwrap()
                .schedule
        };
        // gate/up and down at 16-64 rows: 112 and 32 tiles on 132 SMs, shared out 28 steps a block.
        for m in [16, 32, 64] {
            let sh = shape(m);
            for (n, k) in [(14336, 4096), (4096, 14336)] {
                let p = stream_k(sh, (m, n, k));
                assert_eq!((p.per_block, p.blocks), (28, 128), "{n}x{k} m={m}");
            }
        }
        // 448 whole tiles at 64 rows: one block each, every K step.
        let p = stream_k(shape(64), (64, 57344, 4096));
        assert_eq!((p.per_block, p.slots, p.blocks), (32, 1, 448));
        // down_proj at 128 rows: one 128-row activation block, 32 tiles shared out.
        let p = stream_k(shape(128), (128, 4096, 14336));
        assert_eq!((p.per_block, p.blocks), (28, 128));
        let p = stream_k(shape(16), (16, 57344, 14336));
        assert_eq!((p.per_block, p.slots), (112, 1));
    }

    #[test]
    fn clusters_hold_a_tiles_equal_splits() {
        let grouped = |m: usize, ns: &[usize], k: usize, fits: &dyn Fn(usize) -> bool| {
            plan(shape(m), (m, ns, k), 132, true, fits).map(|p| {
                (
                    p.schedule.per_block,
                    p.schedule.blocks,
                    p.schedule.slots,
                    p.cluster,
                )
            })
        };
        let clustered = |m: usize, n: usize, k: usize, fits: &dyn Fn(usize) -> bool| {
            grouped(m, &[n], k, fits).expect("one weight always has a schedule")
        };
        let all = |_: usize| true;
        // down_proj and q/o (32 tiles): 4 splits a tile, one cluster each, at every row count.
        for m in [1, 16, 32, 64, 128] {
            assert_eq!(clustered(m, 4096, 14336, &all), (28, 128, 1, 4), "m = {m}");
            assert_eq!(clustered(m, 4096, 4096, &all), (8, 128, 1, 4), "m = {m}");
        }
        // Clusters of 4 not all resident (an H200): 2 splits, but not for down_proj's 128-row
        // blocks (128 x 56 steps, past MAX_BLOCK_WORK: stream-K).
        let two = |s: usize| s <= 2;
        assert_eq!(clustered(128, 4096, 4096, &two), (16, 64, 1, 2));
        assert_eq!(clustered(64, 4096, 14336, &two), (56, 64, 1, 2));
        assert_eq!(clustered(128, 4096, 14336, &two), (28, 128, 4, 1));
        // gate/up (112 tiles, past 3/4 of the SMs): whole tiles, no sums.
        assert_eq!(clustered(16, 14336, 4096, &all), (32, 112, 1, 1));
        // k/v (8 tiles): at most 8 blocks a cluster.
        assert_eq!(clustered(16, 1024, 4096, &all), (4, 64, 1, 8));
        // 3 steps: no split divides them evenly past 3.
        assert_eq!(clustered(16, 1024, 384, &all), (1, 24, 1, 3));
        // Groups: q/k/v's 48 tiles in clusters of 2, gate/up's 224 whole; none in stream-K.
        let qkv = [4096, 1024, 1024];
        assert_eq!(grouped(16, &qkv, 4096, &all), Some((16, 96, 1, 2)));
        assert_eq!(
            grouped(64, &[14336, 14336], 4096, &all),
            Some((32, 224, 1, 1))
        );
        assert_eq!(grouped(16, &qkv, 4096, &|_| false), None);
        assert_eq!(plan(shape(16), (16, &qkv, 4096), 132, false, all), None);
        // No cluster resident: the stream-K schedule.
        let p = plan(shape(16), (16, &[4096], 14336), 132, true, |_| false).unwrap();
        assert_eq!(
            (p.schedule.per_block, p.schedule.blocks, p.cluster),
            (28, 128, 1)
        );
    }
}
