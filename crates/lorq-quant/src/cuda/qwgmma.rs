//! The warpgroup tensor-core kernel of `kernels/qwgmma.cu` (Hopper's `wgmma`, compute capability
//! 9.0): `x · Wᵀ` for 4-bit weights (affine `a4`: GPTQ, AWQ, HQQ 4-bit; table `t4`: NF4, FP4) in
//! the packed layout the GEMV and the tiled kernel read, bf16/f16 activations, from 17 or 33 rows
//! by size (`qgemv.rs` `AUTO_WGMMA_*`). The activations are first rewritten once per call (and
//! once for all the weights of a group) into the order of the decoded weight pairs, swizzled for
//! `wgmma`; each block then copies
//! its K steps of them into shared memory with bulk copies while its warps decode the weight codes
//! from registers into `wgmma`'s A operand. Each weight's kernel is a dependent launch of the one
//! before it (the permute, or the group's previous weight): its blocks load their first weight
//! codes while that kernel still runs, and wait for it before they read the activations.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, Tensor};

use super::dependent_launch::{clusters_fit, KernelArgs, MAX_CLUSTER};
use super::qgemv::{DeviceLayout, QGroup};
use super::qmma_tiled::KSTEP;
use super::{function, function_with_shared};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qwgmma.fatbin"));

/// Threads per block: two warpgroups (kernels/qwgmma.cu `qwg::THREADS`).
const THREADS: usize = 256;
/// Output rows per block: 64 per warpgroup.
const ROWS: usize = 128;
/// Most K splits over blocks.
const MAX_SPLITS: usize = 8;

/// A block shape (kernels/qwgmma.cu `QWG_CFG_*`): activation rows per block and shared-memory
/// activation slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    name: &'static str,
    rows: usize,
    stages: usize,
}

impl Shape {
    /// Dynamic shared memory: the slots (each two 64-wide halves of `rows` 128-byte rows) and 1 KiB
    /// to align them to the 128-byte swizzle's 1024-byte atoms.
    fn shared_bytes(self) -> usize {
        self.stages * self.rows * 256 + 1024
    }
}

/// Up to 64 rows: one block of 64 activation rows (lab, H100: 14336x4096 at 64 rows 40.5 us against
/// 42.4 for 128-row blocks); past that blocks of 128.
fn shape(m: usize) -> Shape {
    if m <= 64 {
        Shape {
            name: "n64",
            rows: 64,
            stages: 8,
        }
    } else {
        Shape {
            name: "n128",
            rows: 128,
            stages: 4,
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the kernel on or off for the whole process (on by default), e.g. to measure what it
/// brings (`lorq bench decode --compare-wgmma`); off, [`supports`] is false.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the kernel covers this weight on `dev`: 4-bit codes (affine or table) that the tiled
/// kernel's chunk loads serve (groups of a multiple of 32, K · group size below 2³²:
/// [`super::qmma_tiled::supports`]), on a GPU of compute capability 9.0 (`wgmma` is sm_90a only).
pub fn supports(w: &DeviceLayout, dev: &CudaDevice) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && matches!(w.tag.as_str(), "a4" | "t4")
        && super::qmma_tiled::supports(w)
        && matches!(super::fp8_gemm::compute_capability(dev), Ok((9, 0)))
}

/// How the blocks share the tiles' K steps (kernels/wgmma.cuh `segment_at`): `per_block` K steps
/// per block of the tiles (128 output rows x `rows` activation rows; `row_blocks` 128-row blocks of
/// outputs, of one weight or of a group's weights) laid end to end. A tile cut by
/// block boundaries is summed in up to `slots` segments through f32 partial sums, which cost
/// traffic (a 128x128 tile's 64 KiB written and read back per segment, against its 256 KiB of
/// codes at K 4096) and a pipeline fill per segment: so tiles are whole (`per_block` = K steps)
/// unless there are at most `split_until` of them (this kernel: half the SMs, [`split_until`]);
/// then each SM gets the same share (stream-K), at most [`MAX_SPLITS`] segments per tile.
/// H100, session 20, GPTQ 4-bit, us, whole tiles -> shared: 14336x4096 at 128 rows (112 tiles)
/// 51.8 -> 64.7, at 256 95.6 -> 112.8, 4096x14336 at 512 165.7 -> 214.8; 4096x14336 at 256 rows
/// (64 tiles) 158.3 -> 120.8 (the earlier rule split only below 33 tiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Schedule {
    pub per_block: usize,
    pub blocks: usize,
    pub slots: usize,
}

impl Schedule {
    /// Each of `tiles` tiles of `steps` K steps cut into `splits` equal runs (`splits` divides
    /// `steps`), one block each: whole tiles at 1, a cluster's splits above (no L2 slots).
    pub(super) fn split_evenly(tiles: usize, steps: usize, splits: usize) -> Self {
        Self {
            per_block: steps / splits,
            blocks: tiles * splits,
            slots: 1,
        }
    }
}

/// The most tiles this kernel shares out over the SMs: half of them (fewer tiles leave at least
/// half of the SMs idle).
fn split_until(sms: usize) -> usize {
    sms / 2
}

/// Tiles of a weight of `n` output rows at `m` activation rows in blocks of `rows`.
fn weight_tiles(n: usize, m: usize, rows: usize) -> usize {
    n.div_ceil(ROWS) * m.div_ceil(rows)
}

pub(super) fn schedule(
    row_blocks: usize,
    m: usize,
    k: usize,
    rows: usize,
    sms: usize,
    split_until: usize,
) -> Schedule {
    let tiles = row_blocks * m.div_ceil(rows);
    let steps = k.div_ceil(KSTEP);
    let total = tiles * steps;
    // (The split-K counters hold 16 activation blocks per 16 output rows.)
    let per_block =
        if tiles > split_until || m.div_ceil(rows) > super::qmma_tiled::MAX_SPLIT_M_BLOCKS {
            steps
        } else {
            total.div_ceil(sms.max(1)).max(steps.div_ceil(MAX_SPLITS))
        };
    // Segments per tile: one for whole tiles.
    let slots = if per_block == steps {
        1
    } else {
        (0..tiles)
            .map(|t| (t * steps + steps - 1) / per_block - t * steps / per_block + 1)
            .max()
            .unwrap_or(1)
    };
    Schedule {
        per_block,
        blocks: total.div_ceil(per_block),
        slots,
    }
}

thread_local! {
    static CLUSTER_SUMS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turns the cluster sums of both wgmma kernels (this one's [`plan`] and the FP8
/// kernel's cluster schedule, `fp8_wgmma`) on or off for the calling thread's products (on by
/// default), e.g. to measure what they bring; off, split tiles are summed through L2 partial sums
/// and tickets. Per thread: a test comparing the two leaves the other threads' products alone.
pub fn set_cluster_sums(on: bool) {
    CLUSTER_SUMS.set(on);
}

/// Whether [`set_cluster_sums`] is on for this thread.
pub(super) fn cluster_sums() -> bool {
    CLUSTER_SUMS.get()
}

thread_local! {
    static GROUPED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Weights one launch computes at most (kernels/qwgmma.cu `part_at`: the first weight and a
/// `QGroup`'s two).
const MAX_GROUP: usize = 3;

/// Turns the one launch of the wgmma kernels for weights sharing their input (this kernel's
/// [`matmul_group`], the FP8 kernel's `fp8_gemm::matmul_group`) on or off for the calling
/// thread's products (on by default), e.g. to measure what it brings; off, each weight is its
/// own launch (on activations rewritten or quantized once).
pub fn set_grouped_launches(on: bool) {
    GROUPED.set(on);
}

/// Whether [`set_grouped_launches`] is on for this thread.
pub(super) fn grouped_launches() -> bool {
    GROUPED.get()
}

/// How a launch of weights of `ns` output rows (one, or a group's) shares out their tiles: the
/// [`schedule`], and above 1 the blocks of a cluster. Where the stream-K schedule would cut tiles
/// and sum them through L2, with `clusters`
/// (while [`set_cluster_sums`] is on): the most equal splits of each tile (dividing its K steps,
/// at most `MAX_CLUSTER`) launched as one thread-block cluster, summed from the blocks' shared
/// memory (kernels/qwgmma.cu `in_cluster`: the same sums in the same order, without the partial
/// sums' round trip through L2, the fence and the ticket), where that keeps at least stream-K's
/// blocks busy and `fits(splits, clusters)` (every cluster resident at once). Outputs must be a
/// multiple of 4 (the sums' stores). On an H200 the 8-tile k/v products at 33-128 rows run 8
/// splits so; the 32-tile q/o and down_proj products keep stream-K (30 clusters of 4 fit, not 32).
pub(super) fn plan(
    (ns, m, k): (&[usize], usize, usize),
    rows: usize,
    sms: usize,
    clusters: bool,
    fits: impl Fn(usize, usize) -> bool,
) -> (Schedule, usize) {
    let row_blocks: usize = ns.iter().map(|n| n.div_ceil(ROWS)).sum();
    let streamed = schedule(row_blocks, m, k, rows, sms, split_until(sms));
    if !clusters || streamed.slots == 1 || !ns.iter().all(|n| n.is_multiple_of(4)) {
        return (streamed, 1);
    }
    let tiles: usize = ns.iter().map(|&n| weight_tiles(n, m, rows)).sum();
    let steps = k.div_ceil(KSTEP);
    match (2..=MAX_CLUSTER.min(sms / tiles.max(1)))
        .rev()
        .find(|&s| steps.is_multiple_of(s) && tiles * s >= streamed.blocks && fits(s, tiles))
    {
        Some(s) => (Schedule::split_evenly(tiles, steps, s), s),
        None => (streamed, 1),
    }
}

/// One launch of [`matmul_group`], planned before the activation permute: its weights, their
/// schedule and cluster size, their tiles end to end (`tiles`, the second and third weight's
/// first tile `starts`), outputs and split tiles' partial sums.
struct Launch<'a, 'w, T> {
    weights: &'a [&'w DeviceLayout],
    plan: Schedule,
    cluster: usize,
    tiles: usize,
    starts: [i32; 2],
    ys: Vec<CudaSlice<T>>,
    partial: Option<CudaSlice<f32>>,
}

/// `x · Wᵀ` for contiguous `x` `[m, k]` (bf16/f16, columns already in the weight's packed order).
pub(crate) fn matmul(
    dev: &CudaDevice,
    w: &DeviceLayout,
    x: &Tensor,
    m: usize,
) -> Result<Tensor, QuantError> {
    Ok(matmul_group(dev, &[w], x, m)?.remove(0))
}

/// The launches [`matmul_group`] makes for `ws` at `m` rows on this thread: all of them in one
/// (up to three weights that could share a GEMV launch, `qgemv::same_kernel`, while
/// [`set_grouped_launches`] is on) where one of them alone would leave half the SMs idle (k/v's
/// 8-16 tiles: their launch splits its tiles), else one per weight. H200, session 37 (GPU time,
/// GPTQ g128, Llama-3-8B): q+k+v in one launch 20.1 / 21.6 / 22.3 / 27.4 / 33.6 us at 16 / 33 /
/// 64 / 128 / 256 rows against 25.8 / 27.2 / 28.6 / 35.5 / 52.4 apart; gate+up (112 tiles each)
/// apart 0-1.5 % ahead of one launch (with two launches the second one's blocks load their first
/// codes on the SMs the first leaves idle).
pub fn launch_groups<'a, 'w>(
    dev: &CudaDevice,
    ws: &'a [&'w DeviceLayout],
    m: usize,
) -> Vec<&'a [&'w DeviceLayout]> {
    let until = split_until(super::qmma_tiled::multiprocessors(dev));
    let rows = shape(m).rows;
    let small = |w: &DeviceLayout| weight_tiles(w.n, m, rows) <= until;
    let one = grouped_launches()
        && ws.len() <= MAX_GROUP
        && ws.iter().any(|w| small(w))
        && ws.iter().all(|w| super::qgemv::same_kernel(ws[0], w));
    if one {
        vec![ws]
    } else {
        ws.chunks(1).collect()
    }
}

/// `x · Wᵢᵀ` of weights sharing `x` `[m, k]` (bf16/f16, columns already in the weights' packed
/// order; weights the kernel [`supports`]): the activations are rewritten once, then one launch
/// for all of them, their tiles end to end, or one per weight ([`launch_groups`]); each launch a
/// dependent launch of the kernel before it (`dependent_launch`). q/k/v's 48 tiles at 33-128
/// rows fill the SMs that q's 32 and k's and v's 8 apiece left idle, three times over.
pub fn matmul_group(
    dev: &CudaDevice,
    ws: &[&DeviceLayout],
    x: &Tensor,
    m: usize,
) -> Result<Vec<Tensor>, QuantError> {
    let (k, tag) = ws.first().map_or((0, ""), |w| (w.k, w.tag.as_str()));
    if let Some(w) = ws
        .iter()
        .find(|w| w.k != k || w.tag != tag || !supports(w, dev))
    {
        return Err(QuantError::Invalid(format!(
            "wgmma group: a [{}, {}] weight of codes `{}` beside [_, {k}] `{tag}` weights (one \
             code kind and K for all, each taken by the kernel: `supports`)",
            w.n, w.k, w.tag
        )));
    }
    if x.dims() != [m, k] {
        return Err(QuantError::Invalid(format!(
            "wgmma group: activations {:?}, expected [{m}, {k}]",
            x.dims()
        )));
    }
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        ws: &[&DeviceLayout],
        x: &CudaStorage,
        start: usize,
        m: usize,
        dname: &str,
    ) -> Result<Vec<CudaStorage>, QuantError> {
        let k = ws[0].k;
        let sh = shape(m);
        let kp = k.div_ceil(KSTEP) * KSTEP;
        let mp = m.div_ceil(sh.rows) * sh.rows;
        let xs = x.as_cuda_slice::<T>()?.slice(start..start + m * k);
        let stream = dev.cuda_stream();
        let sms = super::qmma_tiled::multiprocessors(dev);
        // The weights share one kernel (`qgemv::same_kernel`).
        let name = format!("qwg_{}_{dname}_{}", ws[0].tag, sh.name);
        let smem = sh.shared_bytes();
        let f = function_with_shared(dev, "qwgmma", FATBIN, &name, smem)?;
        // Every buffer first, then the launches back to back: inside a CUDA graph capture an
        // allocation between two launches would cut their programmatic edge
        // (`dependent_launch`).
        let fits = |splits, clusters| {
            clusters_fit(dev, &f, &name, (THREADS as u32, smem), (splits, clusters))
        };
        let mut launches = Vec::with_capacity(ws.len());
        for lw in launch_groups(dev, ws, m) {
            let ns: Vec<usize> = lw.iter().map(|w| w.n).collect();
            let (plan, cluster) = plan((&ns, m, k), sh.rows, sms, cluster_sums(), fits);
            let tiles: Vec<usize> = ns.iter().map(|&n| weight_tiles(n, m, sh.rows)).collect();
            let (total_tiles, starts) = super::group_blocks(&tiles);
            if plan.slots > 1 && total_tiles > lw[0].counters.len() {
                return Err(QuantError::Invalid(format!(
                    "wgmma launch of {total_tiles} split tiles: the first weight has {} split-K \
                     counters",
                    lw[0].counters.len()
                )));
            }
            // SAFETY: every output element is written by the kernel.
            let ys = ns
                .iter()
                .map(|&n| unsafe { dev.alloc::<T>(m * n) })
                .collect::<Result<Vec<_>, _>>()?;
            let partial: Option<CudaSlice<f32>> = if plan.slots > 1 {
                // SAFETY: a split tile's segments each write their part of slot (split) before
                // the tile's last block reads them.
                Some(unsafe { dev.alloc::<f32>(plan.slots * m * ns.iter().sum::<usize>())? })
            } else {
                None
            };
            launches.push(Launch {
                weights: lw,
                plan,
                cluster,
                tiles: total_tiles,
                starts,
                ys,
                partial,
            });
        }
        // SAFETY: the permute kernel writes all mp * kp elements (zeros past m and k).
        let xp = unsafe { dev.alloc::<T>(mp * kp)? };
        {
            let f = function(dev, "qwgmma", FATBIN, &format!("qwg_permute_{dname}"))?;
            let units = mp * kp / 32;
            let mut b = stream.launch_builder(&f);
            let (mi, ki, kpi, mpi) = (m as i32, k as i32, kp as i32, mp as i32);
            b.arg(&xs).arg(&xp).arg(&mi).arg(&ki).arg(&kpi).arg(&mpi);
            let cfg = LaunchConfig {
                grid_dim: (units.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `qwg_permute_*`: x holds m*k elements from a 16-byte-aligned start
            // (the caller's `aligned`), k a multiple of 32 (the packed layout's), xp mp*kp.
            unsafe { b.launch(cfg) }.w()?;
        }
        let (mpi, mi, ki) = (mp as i32, m as i32, k as i32);
        let mut ys = Vec::with_capacity(ws.len());
        // Freed after the last launch (a free between launches would cut their edge too).
        let mut partials = Vec::with_capacity(launches.len());
        for l in launches {
            let (w, plan, cluster) = (l.weights[0], l.plan, l.cluster);
            let (group, guards) = QGroup::new(&stream, l.weights, &l.ys, l.starts);
            let (ni, pi) = (w.n as i32, plan.per_block as i32);
            let (si, ti) = (plan.slots as i32, l.tiles as i32);
            let ci = i32::from(cluster > 1);
            let mut b = KernelArgs::new(&stream);
            w.push_kernel_args(&mut b);
            b.buf(&xp).val(&mpi).buf(&l.ys[0]);
            match &l.partial {
                Some(p) => b.buf(p),
                None => b.address(0),
            };
            b.buf(&w.counters)
                .val(&mi)
                .val(&ni)
                .val(&ki)
                .val(&pi)
                .val(&ci)
                .val(&si)
                .val(&ti)
                .val(&group);
            b.in_clusters(cluster as u32);
            let cfg = LaunchConfig {
                grid_dim: (plan.blocks as u32, 1, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: the arguments match `qwg_*` in kernels/qwgmma.cu: xp holds the permuted
            // activations of mp rows (a multiple of the block's rows); the launch's weights (one
            // code kind and K: `matmul_group` checks; one group size and table:
            // `launch_groups`) their outputs m*n each,
            // partial slots*m*n per weight end to end, and the counters (zero between launches)
            // one per tile of the launch (checked above where tiles are split); shared memory
            // opted in; in clusters, the grid is the tiles' whole clusters, one segment a block,
            // every n % 4 == 0 (`plan`). The kernel loads only weight codes (and the code table)
            // before `wait_for_producers()`.
            unsafe { b.launch_dependent(&f, cfg) }?;
            drop(guards);
            partials.push(l.partial);
            ys.extend(l.ys);
        }
        drop(partials);
        drop(xp);
        Ok(super::storages(ys, dev))
    }
    super::half_group_outputs(
        x,
        ws,
        m,
        16,
        "qwgmma",
        |cs, start| go::<half::bf16>(dev, ws, cs, start, m, "bf16"),
        |cs, start| go::<half::f16>(dev, ws, cs, start, m, "f16"),
    )
}

#[cfg(test)]
mod tests {
    use super::{split_until, MAX_SPLITS};

    /// Clusters where stream-K would cut tiles, with as many blocks, resident, n % 4 == 0.
    #[test]
    fn plan_sums_split_tiles_in_clusters_where_they_fit() {
        let all = |_: usize, _: usize| true;
        let plan = |(n, m, k), rows, clusters, fits: &dyn Fn(usize, usize) -> bool| {
            super::plan((&[n], m, k), rows, 132, clusters, fits)
        };
        // k/v at 128 rows: 8 tiles of 32 steps, stream-K's 64 blocks of 4 steps; 8 splits.
        let (s, c) = plan((1024, 128, 4096), 128, true, &all);
        assert_eq!((s.per_block, s.blocks, s.slots, c), (4, 64, 1, 8));
        // Switched off, an odd output count, or clusters that do not all fit: stream-K.
        let streamed = schedule(1024, 128, 4096, 128, 132);
        assert_eq!(plan((1024, 128, 4096), 128, false, &all), (streamed, 1));
        assert_eq!(plan((1022, 128, 4096), 128, true, &all).1, 1);
        assert_eq!(
            plan((1024, 128, 4096), 128, true, &|_, _| false),
            (streamed, 1)
        );
        // q/o at 128 rows: 32 tiles, stream-K's 128 blocks; 4 splits if 32 clusters of 4 fit,
        // else stream-K (2 splits would leave half of its blocks' SMs idle).
        let (s, c) = plan((4096, 128, 4096), 128, true, &all);
        assert_eq!((s.per_block, s.blocks, c), (8, 128, 4));
        let thirty_of_four = |s: usize, clusters: usize| s < 4 || clusters <= 30;
        assert_eq!(plan((4096, 128, 4096), 128, true, &thirty_of_four).1, 1);
        // Whole tiles (gate/up at 128 rows) stay whole.
        assert_eq!(plan((14336, 128, 4096), 128, true, &all).1, 1);
        // A group's tiles end to end: k+v at 128 rows, 16 tiles in clusters of 8; q+k+v at 64
        // rows, 48 tiles: clusters of 2 would keep 96 SMs busy against stream-K's 128 blocks of
        // 12 steps.
        let group = |ns: &[usize], m| super::plan((ns, m, 4096), 64.max(m), 132, true, all);
        let (s, c) = group(&[1024, 1024], 128);
        assert_eq!((s.per_block, s.blocks, s.slots, c), (4, 128, 1, 8));
        let (s, c) = group(&[4096, 1024, 1024], 64);
        assert_eq!((s.per_block, s.blocks, c), (12, 128, 1));
        assert!(s.slots > 1);
        // One output count not a multiple of 4 keeps the group out of clusters.
        assert_eq!(group(&[1024, 1022], 128).1, 1);
    }

    fn schedule(n: usize, m: usize, k: usize, rows: usize, sms: usize) -> super::Schedule {
        super::schedule(n.div_ceil(128), m, k, rows, sms, split_until(sms))
    }

    /// The kernel's `segment_at`: (tile, first step, end step, split, splits) of each block.
    fn segments(n: usize, m: usize, k: usize, rows: usize, sms: usize) -> Vec<Vec<[usize; 5]>> {
        let p = schedule(n, m, k, rows, sms);
        let steps = k.div_ceil(128);
        let total = n.div_ceil(128) * m.div_ceil(rows) * steps;
        (0..p.blocks)
            .map(|b| {
                let (mut cur, end) = (b * p.per_block, total.min((b + 1) * p.per_block));
                let mut v = Vec::new();
                while cur < end {
                    let tile = cur / steps;
                    let st0 = cur - tile * steps;
                    let st1 = steps.min(st0 + end - cur);
                    let (first, b0) = (tile * steps, tile * steps / p.per_block);
                    v.push([
                        tile,
                        st0,
                        st1,
                        b - b0,
                        (first + steps - 1) / p.per_block - b0 + 1,
                    ]);
                    cur += st1 - st0;
                }
                v
            })
            .collect()
    }

    #[test]
    fn blocks_share_every_k_step_once_in_one_wave() {
        for &(n, m, k, rows) in &[
            (14336usize, 128usize, 4096usize, 128usize),
            (14336, 256, 4096, 128),
            (14336, 512, 4096, 128),
            (4096, 128, 14336, 128),
            (4096, 64, 4096, 64),
            (1024, 40, 4096, 64),
            (130, 200, 512, 128),
            (8200, 300, 288, 128),
            (4096, 2100, 4096, 128),
        ] {
            let p = schedule(n, m, k, rows, 132);
            let (tiles, steps) = (n.div_ceil(128) * m.div_ceil(rows), k.div_ceil(128));
            let mut seen = vec![Vec::new(); tiles];
            for (b, segs) in segments(n, m, k, rows, 132).iter().enumerate() {
                assert!(!segs.is_empty(), "{n}x{k} m={m}: block {b} has no steps");
                for &[tile, st0, st1, split, splits] in segs {
                    assert!(st0 < st1 && st1 <= steps);
                    seen[tile].push((split, splits, st0, st1));
                }
            }
            for (tile, segs) in seen.iter_mut().enumerate() {
                segs.sort();
                let splits = segs.len();
                assert!(
                    splits <= p.slots && splits <= MAX_SPLITS + 1,
                    "{n}x{k} m={m}: tile {tile}"
                );
                let mut next = 0;
                for (i, &(split, count, st0, st1)) in segs.iter().enumerate() {
                    assert_eq!(
                        (split, count, st0),
                        (i, splits, next),
                        "{n}x{k} m={m}: tile {tile}"
                    );
                    next = st1;
                }
                assert_eq!(next, steps, "{n}x{k} m={m}: tile {tile} covered");
            }
            if 2 * tiles <= 132 && m.div_ceil(rows) <= 16 {
                assert!(p.blocks <= 132, "{n}x{k} m={m}: {} blocks", p.blocks);
                assert!(p.blocks >= 66 || p.per_block * 8 >= steps, "{n}x{k} m={m}");
            } else {
                assert_eq!(
                    (p.per_block, p.slots),
                    (steps, 1),
                    "{n}x{k} m={m}: whole tiles"
                );
            }
        }
        // gate/up at 128 rows: 112 whole tiles; down at 256 rows: 64 tiles of 112 steps shared
        // by 131 blocks of 55 steps (the tiles in three or four segments).
        let whole = |blocks| super::Schedule {
            per_block: 32,
            blocks,
            slots: 1,
        };
        assert_eq!(schedule(14336, 128, 4096, 128, 132), whole(112));
        assert_eq!(schedule(14336, 256, 4096, 128, 132), whole(224));
        assert_eq!(
            schedule(4096, 256, 14336, 128, 132),
            super::Schedule {
                per_block: 55,
                blocks: 131,
                slots: 4
            }
        );
    }
}
