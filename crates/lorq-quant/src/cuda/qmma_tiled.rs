//! The tiled tensor-core kernel of `kernels/qmma_tiled.cu`: `x · Wᵀ` for 4-bit weights (affine
//! `a4`: GPTQ, AWQ, HQQ 4-bit; table `t4`: NF4, FP4), 8-bit, 3-bit and 2-bit affine ones (`a8`:
//! GPTQ 8-bit, EETQ; `a3`: HQQ and GPTQ 3-bit; `a2`: HQQ 2-bit) in the packed layout the GEMV
//! reads too (no second device copy), bf16/f16 activations ([`supports`] says which groups).
//! The weight codes stream into registers as in the GEMV; blocks of 16, 32 or 128 output rows (by
//! N and M) × up to 128 activation rows, their warps splitting K. K is also split over several
//! blocks when the row blocks alone would leave most of the GPU idle, the last block of a tile
//! adding the f32 partial sums.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, Tensor};

use super::function_with_shared;
use super::qgemv::{DeviceLayout, QGroup};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qmma_tiled.fatbin"));

/// Fewest output rows per block (block shape `c1`): the split-K counters are sized by it.
pub(crate) const MIN_ROWS: usize = 16;
/// K per step of a warp (kernels/qmma_tiled.cuh: four 32-weight chunks; the wgmma kernel's too).
pub(crate) const KSTEP: usize = 128;
/// Threads per block, every block shape.
const THREADS: usize = 256;
/// Activation-row blocks (of 64) a split-K launch may have: one counter each per row block.
pub(crate) const MAX_SPLIT_M_BLOCKS: usize = 16;
/// Most K splits: each adds `M × N` f32 partial sums of traffic.
const MAX_SPLITS: usize = 16;

/// Whether the kernel covers this weight: 4-bit codes (affine or table) and 8-bit and 3-bit
/// affine codes in groups of a multiple of 32, 2-bit affine codes in groups of a multiple of 16
/// (a 32-code chunk then spans at most two groups, one per word: hqq 2-bit's groups of 16), with
/// K · group size below 2³² ([`crate::gpu_layout::group_index_exact`]).
/// The wgmma kernel reads through the same chunk loads and asks this too (`qwgmma::supports`).
pub fn supports(w: &DeviceLayout) -> bool {
    crate::gpu_layout::group_index_exact(w.k, w.gsize as usize)
        && match w.tag.as_str() {
            "a4" | "t4" | "a8" | "a3" => w.gsize % 32 == 0,
            "a2" => w.gsize % 16 == 0,
            _ => false,
        }
}

/// Most activation rows the folded-scale kernels take (kernels/qmma_tiled.cuh `step_mma_folded`):
/// 2 n8 tiles, and those only in the blocks of `c1` and `c2` ([`folds_in`]).
const FOLD_MAX_M: usize = 16;

static FOLDED_SCALES: AtomicBool = AtomicBool::new(true);

/// Lets launches the folded-scale kernels cover take them ([`folds`]; on by default), or keeps
/// every launch on the per-weight scaled decode: `lorq bench decode --compare-folded-scales`
/// measures what they bring.
pub fn set_folded_scales(on: bool) {
    FOLDED_SCALES.store(on, Ordering::Relaxed);
}

/// Whether the process allows folded scales ([`set_folded_scales`]).
pub fn folded_scales() -> bool {
    FOLDED_SCALES.load(Ordering::Relaxed)
}

/// Whether a launch of `w` alone at `m` rows takes the folded-scale kernel (`f4`) when allowed.
pub fn folds(w: &DeviceLayout, m: usize) -> bool {
    folds_in(w, m, shape(w.n, w.k, m_tiles(m), false, false))
}

/// Whether a launch of `w` at `m` rows in block shape `sh` takes the folded-scale kernel: affine
/// 4-bit codes in groups of a multiple of [`KSTEP`] over a K of a multiple of it (one group per
/// step for every lane); one n8 tile in any shape, two in `c1` and `c2` only. H200, session 31
/// (GPU time, GPTQ g128, against the per-weight scaled decode): 14336x4096 at 4 / 8 rows 18.2 /
/// 18.5 us against 19.8 / 20.2, 4096x14336 18.6 / 18.9 against 19.9 / 20.5; at 12-16 rows the
/// single weights' `c4` / `c5` blocks, which then need more than 128 registers, ran 4-10 %
/// slower (14336x4096 at 16 rows 24.6 against 23.0), the grouped launches' `c1` / `c2` faster
/// (batch-16 decode). Groups of 64 (hqq 4-bit's; folded two a step, each lane loading 16 codes of
/// each) ran 10-17 % slower than their per-weight decode: not folded.
fn folds_in(w: &DeviceLayout, m: usize, sh: Shape) -> bool {
    w.tag == "a4"
        && (w.gsize as usize).is_multiple_of(KSTEP)
        && w.k.is_multiple_of(KSTEP)
        && fold_shape(m, sh)
}

/// The row counts and block shapes the folded-scale kernels are compiled for ([`folds_in`]).
fn fold_shape(m: usize, sh: Shape) -> bool {
    m <= FOLD_MAX_M && (m_tiles(m) == 1 || sh == C1 || sh == C2)
}

/// n8 activation tiles per block for `m` rows: 8, 16, 32, 64 or 128 rows.
fn m_tiles(m: usize) -> usize {
    match m {
        0..=8 => 1,
        9..=16 => 2,
        17..=32 => 4,
        33..=64 => 8,
        _ => 16,
    }
}

/// One of the kernel's block shapes (kernels/qmma_tiled.cu `QMMAT_CFG_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub name: &'static str,
    /// Output rows per block.
    pub rows: usize,
    /// Warps of a row group splitting K inside the block.
    pub k_warps: usize,
    /// Activation slots in shared memory (`run_staged`; 0: activations through L1, `run`).
    pub stages: usize,
    /// Most K splits over blocks.
    pub max_splits: usize,
}

impl Shape {
    /// Dynamic shared memory of a launch with `mt` n8 tiles: each slot holds 8·mt activation rows
    /// of `k_warps` 128-wide steps (kernels/qmma_tiled.cuh `run_staged`, `s_x`).
    fn shared_bytes(&self, mt: usize) -> usize {
        self.stages * 8 * mt * self.k_warps * 128 * 2
    }
}

const C1: Shape = Shape {
    name: "c1",
    rows: 16,
    k_warps: 8,
    stages: 0,
    max_splits: MAX_SPLITS,
};
const C2: Shape = Shape {
    name: "c2",
    rows: 128,
    k_warps: 2,
    stages: 0,
    max_splits: MAX_SPLITS,
};
const C3: Shape = Shape {
    name: "c3",
    rows: 32,
    k_warps: 4,
    stages: 0,
    max_splits: MAX_SPLITS,
};
const C4: Shape = Shape {
    name: "c4",
    rows: 64,
    k_warps: 4,
    stages: 0,
    max_splits: MAX_SPLITS,
};
/// Two row tiles per warp over eight K-slice warps (32 rows): 4096-row affine weights at 9-32
/// rows (session 17 lab, H100: 4096x14336 at 16 / 32 rows 29.2 / 36.2 us against 32.1 / 44.0
/// for `c1`, 4096x4096 11.9 / 14.7 against 12.2 / 16.5).
const C5: Shape = Shape {
    name: "c5",
    rows: 32,
    k_warps: 8,
    stages: 0,
    max_splits: MAX_SPLITS,
};
/// Staged activations, 128 rows (8 row warps, one m16 tile each), 3 slots: 33-64 rows (8 n8
/// tiles) and 65-128 (16: 64 accumulators a lane, 96 KiB of slots, each decoded weight feeding
/// twice the mma); K split over at most 4 blocks (the lab's best for 4096-row weights).
const X1: Shape = Shape {
    name: "x1",
    rows: 128,
    k_warps: 1,
    stages: 3,
    max_splits: 4,
};

/// The block shape for `n` output rows, `mt` n8 tiles and table (`t4`) or affine (`a4`) codes.
/// Measured on an H100 over the Llama-3-8B shapes (docs/benchmarks.md): up to 8 activation rows
/// one 16-row tile per block with all 8 warps on K is fastest everywhere; past that, wide weights
/// (gate/up) reuse each activation load over 32 rows per warp (`c2`) — except table codes at 9-16
/// rows, whose longer decode keeps `c1` ahead of `c2` (grouped launches; single weights take
/// `c4`, below) — and narrower ones keep more blocks (`c1` up to 32 rows where N <= 4096, else
/// `c3`). Session 16's sweep (a lab build of the kernel body with
/// other block shapes, H200): wide affine weights up to 16 rows run 6-14 % faster with two row
/// tiles per warp over four K slices (`c4`) than with `c1` / `c2`; not in a grouped launch, whose
/// kernel needs 130 registers there (one block per SM: batch-16 decode 12 % slower, H100).
/// From 33 rows, weights of 4096 rows and more stage their activations (`x1`: lab, 64 rows,
/// H200: 14336x4096 56.7 us against 68.0, 4096x14336 65.4 against 92.8, 4096x4096 32.6 against
/// 35.4); a grouped launch (which never splits K) only from 8192 rows, below that its 128-row
/// blocks leave the GPU half idle. Session 17 (the K-slice sums without bank conflicts, lab on
/// an H100): single affine weights of up to 4096 rows at 9-32 rows take two row tiles per warp
/// over eight K-slice warps (`c5`); past 64 rows `x1` with 16 n8 tiles (128 activation rows a
/// block; "x2" in the session 17 measurements). Session 21 (labs, H100): a single weight of up
/// to 4096 rows and [`LONG_K`] inputs or more (down_proj) at up to 16 rows takes `c4` with K split
/// to two blocks per SM ([`split_k`]): 4096x14336 at 16 rows 24.6 us against 28.3 for `c5`
/// (GPTQ-style codes), NF4 30.4 against 33.1 for `c1`; and table codes take `c4` on wide single
/// weights too (NF4 14336x4096 at 8 / 16 rows 28.9 / 30.8 against `c1`'s 30.4 / 35.4).
pub(crate) fn shape(n: usize, k: usize, mt: usize, table: bool, grouped: bool) -> Shape {
    match mt {
        16 => X1,
        8 if n >= if grouped { 8192 } else { 4096 } => X1,
        1 | 2 if (n >= 8192 || k >= LONG_K) && !grouped => C4,
        1 => C1,
        2 | 4 if n <= 4096 && !table && !grouped => C5,
        2 if table => C1,
        _ if n >= 8192 => C2,
        2 => C1,
        4 if n <= 4096 => C1,
        _ => C3,
    }
}

pub(crate) fn multiprocessors(dev: &CudaDevice) -> usize {
    static SMS: OnceLock<usize> = OnceLock::new();
    *SMS.get_or_init(|| super::paged_attention::multiprocessors(dev).unwrap_or(132))
}

/// Inputs from which a narrow weight at few rows takes `c4` with K split ([`shape`]).
const LONG_K: usize = 8192;

/// `(splits, steps per split)`. Splitting K over blocks measured slower wherever the row blocks
/// already cover a quarter of the SMs (the partial sums cost more than the idle SMs), so only
/// small weights split, to about two blocks per SM; and `c4` on long K (two blocks per SM at up
/// to 16 rows), whose fewer than one block per SM split to two (session 21 lab, 4096x14336 at 16
/// rows, 64 row blocks: 47.4 us whole, 30.0 / 28.8 / 24.6 in 2 / 3 / 4 splits).
pub(crate) fn split_k(sh: Shape, n: usize, m: usize, k: usize, sms: usize) -> (usize, usize) {
    let tiles = n.div_ceil(sh.rows) * m.div_ceil(8 * m_tiles(m));
    let steps = k.div_ceil(KSTEP);
    let splits = if m.div_ceil(64) > MAX_SPLIT_M_BLOCKS {
        1
    } else if sh == C4 && k >= LONG_K && 4 * tiles > sms && tiles < sms {
        (2 * sms / tiles).clamp(1, sh.max_splits)
    } else if 4 * tiles > sms {
        1
    } else {
        (2 * sms)
            .div_ceil(tiles)
            .min(steps.div_ceil(sh.k_warps))
            .clamp(1, sh.max_splits)
    };
    let per = steps.div_ceil(splits);
    (steps.div_ceil(per), per)
}

/// `x · Wᵀ` for contiguous `x` `[m, k]` (bf16/f16, columns already in the weight's packed order).
/// `fold`: take the folded-scale kernel where it applies ([`folds`]).
pub(crate) fn matmul(
    dev: &CudaDevice,
    w: &DeviceLayout,
    x: &Tensor,
    m: usize,
    fold: bool,
) -> Result<Tensor, QuantError> {
    Ok(matmul_group(dev, &[w], x, m, fold)?.remove(0))
}

/// `x · Wᵢᵀ` of 1 to 3 weights sharing `x` (same format, K, groups and table: the caller checks)
/// in one launch, each weight's row blocks after the previous one's. The block shape follows the
/// group's total rows; a group never splits K (its weights together fill the GPU). `fold`: as
/// [`matmul`].
pub(crate) fn matmul_group(
    dev: &CudaDevice,
    ws: &[&DeviceLayout],
    x: &Tensor,
    m: usize,
    fold: bool,
) -> Result<Vec<Tensor>, QuantError> {
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        ws: &[&DeviceLayout],
        x: &CudaStorage,
        start: usize,
        m: usize,
        dname: &str,
        fold: bool,
    ) -> Result<Vec<CudaStorage>, QuantError> {
        let w = ws[0];
        let (n, k) = (w.n, w.k);
        let xs = x.as_cuda_slice::<T>()?.slice(start..start + m * k);
        // SAFETY: every output element is written by the kernel.
        let ys = ws
            .iter()
            .map(|w| unsafe { dev.alloc::<T>(m * w.n) })
            .collect::<Result<Vec<_>, _>>()?;
        let mt = m_tiles(m);
        let total_n: usize = ws.iter().map(|w| w.n).sum();
        let grouped = ws.len() > 1;
        let sh = shape(total_n, k, mt, w.tag.starts_with('t'), grouped);
        let kernel = if grouped { "qmmatg" } else { "qmmat" };
        let tag = if fold && folds_in(w, m, sh) {
            "f4"
        } else {
            &w.tag
        };
        let smem = sh.shared_bytes(mt);
        let f = function_with_shared(
            dev,
            "qmma_tiled",
            FATBIN,
            &format!("{kernel}_{tag}_{dname}_t{mt}_{}", sh.name),
            smem,
        )?;
        let (splits, per) = if !grouped {
            split_k(sh, n, m, k, multiprocessors(dev))
        } else {
            (1, k.div_ceil(KSTEP))
        };
        let partial: Option<CudaSlice<f32>> = if splits > 1 {
            // SAFETY: each split writes its whole [m, n] slice before the last block reads it.
            Some(unsafe { dev.alloc::<f32>(splits * m * n)? })
        } else {
            None
        };
        let stream = dev.cuda_stream();
        let per_weight: Vec<usize> = ws.iter().map(|w| w.n.div_ceil(sh.rows)).collect();
        let (blocks, starts) = super::group_blocks(&per_weight);
        let (group, guards) = QGroup::new(&stream, ws, &ys, starts);
        let mut b = stream.launch_builder(&f);
        let null = 0u64;
        w.push_args(&mut b, &null);
        match &partial {
            Some(p) => b.arg(&xs).arg(&ys[0]).arg(p),
            None => b.arg(&xs).arg(&ys[0]).arg(&null),
        };
        let (mi, ni, ki, pi) = (m as i32, n as i32, k as i32, per as i32);
        b.arg(&w.counters).arg(&mi).arg(&ni).arg(&ki).arg(&pi);
        if grouped {
            b.arg(&group);
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, splits as u32, m.div_ceil(8 * mt) as u32),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the arguments match `qmmat_*` / `qmmatg_*` in kernels/qmma_tiled.cu; x holds m*k elements
        // from a 16-byte-aligned start (checked by the caller), output j m*n_j, partial
        // splits*m*n, and the counters (zero between launches) one per row block and activation
        // block (MAX_SPLIT_M_BLOCKS of them per MIN_ROWS rows, checked by split_k; a group never
        // splits); the group's weights share the first one's format, K, groups and table.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        drop(guards);
        drop(partial);
        Ok(super::storages(ys, dev))
    }
    super::half_group_outputs(
        x,
        ws,
        m,
        16,
        "qmma_tiled",
        |cs, start| go::<half::bf16>(dev, ws, cs, start, m, "bf16", fold),
        |cs, start| go::<half::f16>(dev, ws, cs, start, m, "f16", fold),
    )
}

#[cfg(test)]
mod tests {
    use super::{m_tiles, shape, split_k, C4, C5};

    /// Every (shape, n8 tiles) `shape` picks is compiled (kernels/qmma_tiled.cu `QMMAT_ALL`: c4
    /// and c5 for one weight only).
    #[test]
    fn picked_shapes_are_compiled() {
        let compiled = |name: &str, mt: usize, grouped: bool| match name {
            "c1" => [1, 2, 4].contains(&mt),
            "c2" => [2, 4].contains(&mt),
            "c3" => [4, 8].contains(&mt),
            "c4" => [1, 2].contains(&mt) && !grouped,
            "c5" => [2, 4].contains(&mt) && !grouped,
            "x1" => [8, 16].contains(&mt),
            _ => false,
        };
        // The folded-scale kernels (`f4`): kernels/qmma_tiled.cu QMMAT_FOLDED.
        let compiled_folded = |name: &str, mt: usize, grouped: bool| match name {
            "c1" => [1, 2].contains(&mt),
            "c2" => mt == 2 && grouped,
            "c4" => mt == 1 && !grouped,
            _ => false,
        };
        for n in [16usize, 576, 1024, 4096, 4097, 6144, 8192, 14336, 28672] {
            for k in [4096usize, 14336] {
                for m in [1usize, 2, 8, 9, 16, 17, 32, 33, 64, 65, 128] {
                    for table in [false, true] {
                        for grouped in [false, true] {
                            let mt = m_tiles(m);
                            let sh = shape(n, k, mt, table, grouped);
                            assert!(
                                compiled(sh.name, mt, grouped),
                                "n={n} k={k} m={m} table={table} grouped={grouped}: {} t{mt}",
                                sh.name
                            );
                            if !table && super::fold_shape(m, sh) {
                                assert!(
                                    compiled_folded(sh.name, mt, grouped),
                                    "folded n={n} k={k} m={m} grouped={grouped}: {} t{mt}",
                                    sh.name
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    fn splits(n: usize, m: usize, k: usize) -> (usize, usize) {
        split_k(shape(n, k, m_tiles(m), true, false), n, m, k, 132)
    }

    fn splits_affine(n: usize, m: usize, k: usize) -> (usize, usize) {
        split_k(shape(n, k, m_tiles(m), false, false), n, m, k, 132)
    }

    #[test]
    fn splits_fill_the_gpu_and_cover_k() {
        for &(n, m, k) in &[
            (4096usize, 16usize, 4096usize),
            (1024, 2, 4096),
            (14336, 64, 4096),
            (4096, 128, 14336),
            (136, 17, 512),
            (130, 1, 4096),
            (4096, 5000, 4096),
        ] {
            let (s, per) = splits(n, m, k);
            let steps = k.div_ceil(128);
            assert!((1..=16).contains(&s), "{n}x{k} m={m}: {s}");
            assert!(s * per >= steps && (s - 1) * per < steps);
        }
        // Big weights never split; a 130-row one does (nine 16-row blocks), by at most the K
        // steps per K-slice warp, and not when K has fewer steps than a block has warps on it.
        // A 4096-row weight at 33-64 rows (x1: 32 blocks of 128 rows) splits K over x1's 4.
        assert_eq!(splits(14336, 16, 4096).0, 1);
        assert_eq!(splits(14336, 64, 4096).0, 1);
        assert_eq!(splits(4096, 64, 14336).0, 4);
        assert_eq!(splits(130, 1, 4096).0, 4);
        assert_eq!(splits(136, 17, 512).0, 1);
        assert_eq!(splits(4096, 5000, 4096).0, 1);
        // down_proj (affine codes) at up to 16 rows: c4, 64 row blocks, 4 splits; not at 17 rows
        // (c5, 128 blocks of 170 registers: one per SM) nor on K of 4096.
        assert_eq!(shape(4096, 14336, 2, false, false), C4);
        assert_eq!(splits_affine(4096, 16, 14336), (4, 28));
        assert_eq!(splits_affine(4096, 8, 14336), (4, 28));
        assert_eq!(splits_affine(4096, 17, 14336).0, 1);
        assert_eq!(shape(4096, 4096, 2, false, false), C5);
        assert_eq!(splits_affine(4096, 16, 4096).0, 1);
        // Table codes too (NF4), on single weights only: a grouped launch keeps c1.
        assert_eq!(shape(4096, 14336, 2, true, false), C4);
        assert_eq!(splits(4096, 16, 14336), (4, 28));
        assert_eq!(shape(14336, 4096, 2, true, false), C4);
        assert_eq!(shape(14336, 4096, 2, true, true).name, "c1");
    }
}
