//! The warpgroup tensor-core kernel of `kernels/qwgmma.cu` (Hopper's `wgmma`, compute capability
//! 9.0): `x · Wᵀ` for 4-bit weights (affine `a4`: GPTQ, AWQ, HQQ 4-bit; table `t4`: NF4, FP4) in
//! the packed layout the GEMV and the tiled kernel read, bf16/f16 activations, for 33 rows and
//! more. The activations are first rewritten once per call (and once for all the weights of a
//! group) into the order of the decoded weight pairs, swizzled for `wgmma`; each block then copies
//! its K steps of them into shared memory with bulk copies while its warps decode the weight codes
//! from registers into `wgmma`'s A operand.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, Tensor};

use super::qgemv::DeviceLayout;
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

/// 33-64 rows: one block of 64 activation rows (lab, H100: 14336x4096 at 64 rows 40.5 us against
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

/// Whether the kernel covers this weight on `dev`: 4-bit codes (affine or table) in groups of a
/// multiple of 32, on a GPU of compute capability 9.0 (`wgmma` is sm_90a only).
pub fn supports(w: &DeviceLayout, dev: &CudaDevice) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && matches!(w.tag.as_str(), "a4" | "t4")
        && w.gsize % 32 == 0
        && matches!(super::fp8_gemm::compute_capability(dev), Ok((9, 0)))
}

/// `(splits, steps per split)`: K splits over blocks only where the row blocks leave more than
/// three quarters of the SMs idle, to one wave (one block per SM: 128 KiB of slots; lab, H100:
/// 4096x14336 at 128 rows 73 us with 4 splits, 87 with 8 in two waves).
fn split_k(n: usize, m: usize, k: usize, rows: usize, sms: usize) -> (usize, usize) {
    let tiles = n.div_ceil(ROWS) * m.div_ceil(rows);
    let steps = k.div_ceil(KSTEP);
    // (The split-K counters hold 16 activation blocks per 16 output rows.)
    let splits = if 4 * tiles > sms || m.div_ceil(rows) > super::qmma_tiled::MAX_SPLIT_M_BLOCKS {
        1
    } else {
        (sms / tiles).min(steps).clamp(1, MAX_SPLITS)
    };
    let per = steps.div_ceil(splits);
    (steps.div_ceil(per), per)
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

/// `x · Wᵢᵀ` of weights sharing `x` (same K: the caller checks): the activations are rewritten
/// once, then one launch per weight.
pub(crate) fn matmul_group(
    dev: &CudaDevice,
    ws: &[&DeviceLayout],
    x: &Tensor,
    m: usize,
) -> Result<Vec<Tensor>, QuantError> {
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
        let sms = super::qmma_tiled::multiprocessors(dev);
        let smem = sh.shared_bytes();
        let mut ys = Vec::with_capacity(ws.len());
        for w in ws {
            let n = w.n;
            let f = function_with_shared(
                dev,
                "qwgmma",
                FATBIN,
                &format!("qwg_{}_{dname}_{}", w.tag, sh.name),
                smem,
            )?;
            // SAFETY: every output element is written by the kernel.
            let y = unsafe { dev.alloc::<T>(m * n)? };
            let (splits, per) = split_k(n, m, k, sh.rows, sms);
            let partial: Option<CudaSlice<f32>> = if splits > 1 {
                // SAFETY: each split writes its whole [m, n] slice before the last block reads it.
                Some(unsafe { dev.alloc::<f32>(splits * m * n)? })
            } else {
                None
            };
            let mut b = stream.launch_builder(&f);
            let null = 0u64;
            w.push_args(&mut b, &null);
            let mpi = mp as i32;
            b.arg(&xp).arg(&mpi).arg(&y);
            match &partial {
                Some(p) => b.arg(p),
                None => b.arg(&null),
            };
            let (mi, ni, ki, pi) = (m as i32, n as i32, k as i32, per as i32);
            b.arg(&w.counters).arg(&mi).arg(&ni).arg(&ki).arg(&pi);
            let cfg = LaunchConfig {
                grid_dim: (
                    n.div_ceil(ROWS) as u32,
                    splits as u32,
                    (mp / sh.rows) as u32,
                ),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: the arguments match `qwg_*` in kernels/qwgmma.cu: xp holds the permuted
            // activations of mp rows (a multiple of the block's rows), y m*n, partial splits*m*n,
            // and the counters (zero between launches) one per 128-row block and activation block
            // (16 per 16 rows: a split launch has at most 16 activation blocks, split_k); shared
            // memory opted in.
            unsafe { b.launch(cfg) }.w()?;
            drop(b);
            drop(partial);
            ys.push(y);
        }
        drop(xp);
        Ok(super::storages(ys, dev))
    }
    let ns: Vec<usize> = ws.iter().map(|w| w.n).collect();
    super::half_group_outputs(
        x,
        &ns,
        m,
        16,
        "qwgmma",
        |cs, start| go::<half::bf16>(dev, ws, cs, start, m, "bf16"),
        |cs, start| go::<half::f16>(dev, ws, cs, start, m, "f16"),
    )
}

#[cfg(test)]
mod tests {
    use super::split_k;

    #[test]
    fn splits_stay_in_one_wave_and_cover_k() {
        for &(n, m, k, rows) in &[
            (14336usize, 128usize, 4096usize, 128usize),
            (4096, 128, 14336, 128),
            (4096, 64, 4096, 64),
            (1024, 40, 4096, 64),
            (130, 200, 512, 128),
        ] {
            let (s, per) = split_k(n, m, k, rows, 132);
            let steps = k.div_ceil(128);
            assert!((1..=8).contains(&s), "{n}x{k} m={m}: {s}");
            assert!(s * per >= steps && (s - 1) * per < steps);
            let tiles = n.div_ceil(128) * m.div_ceil(rows);
            assert!(
                s == 1 || tiles * s <= 132,
                "{n}x{k} m={m}: {tiles} tiles x {s}"
            );
        }
        // gate/up fills the GPU alone; down splits K four ways (32 tiles).
        assert_eq!(split_k(14336, 128, 4096, 128, 132).0, 1);
        assert_eq!(split_k(4096, 128, 14336, 128, 132).0, 4);
    }
}
