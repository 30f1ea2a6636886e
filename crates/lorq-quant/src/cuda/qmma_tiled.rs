//! The tiled tensor-core kernel of `kernels/qmma_tiled.cu`: `x · Wᵀ` for 4-bit weights (affine
//! `a4`: GPTQ, AWQ, HQQ 4-bit; table `t4`: NF4, FP4) in the packed layout the GEMV reads too (no
//! second device copy), bf16/f16 activations, groups of a multiple of 32. Blocks of 128 output
//! rows × up to 64 activation rows; K is split over several blocks when the row blocks alone would
//! leave the GPU idle, the last block of a tile adding the f32 partial sums.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Storage, Tensor};

use super::qgemv::DeviceLayout;
use super::{function, tensor_from_storage};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qmma_tiled.fatbin"));

/// Output rows per block (kernels/qmma_tiled.cu `ROWS`, also its thread count).
pub(crate) const ROWS: usize = 128;
/// K per pipeline step (`KSTEP`) and pipeline depth (`STAGES`).
const KSTEP: usize = 128;
const STAGES: usize = 4;
/// Activation-row blocks (of 64) a split-K launch may have: one counter each per row block.
pub(crate) const MAX_SPLIT_M_BLOCKS: usize = 16;
/// Most K splits: each adds `M × N` f32 partial sums of traffic.
const MAX_SPLITS: usize = 16;

/// Whether the kernel covers this weight: 4-bit codes, groups of a multiple of 32.
pub fn supports(w: &DeviceLayout) -> bool {
    matches!(w.tag.as_str(), "a4" | "t4") && w.gsize % 32 == 0
}

/// n8 activation tiles per block for `m` rows: 8, 16, 32 or 64 rows.
fn m_tiles(m: usize) -> usize {
    match m {
        0..=8 => 1,
        9..=16 => 2,
        17..=32 => 4,
        _ => 8,
    }
}

/// Bytes of one pipeline stage (kernels/qmma_tiled.cu `Stage`).
fn stage_bytes(mt: usize, table: bool) -> usize {
    ROWS * 4 * 16 + 8 * mt * 16 * 16 + ROWS * 4 * 4 + if table { 16 } else { ROWS * 4 * 4 }
}

fn multiprocessors(dev: &CudaDevice) -> usize {
    static SMS: OnceLock<usize> = OnceLock::new();
    *SMS.get_or_init(|| super::paged_attention::multiprocessors(dev).unwrap_or(132))
}

/// `(splits, steps per split)`: enough blocks for about two per multiprocessor.
pub(crate) fn split_k(n: usize, m: usize, k: usize, sms: usize) -> (usize, usize) {
    let tiles = n.div_ceil(ROWS) * m.div_ceil(8 * m_tiles(m));
    let steps = k.div_ceil(KSTEP);
    let want = 2 * sms;
    let splits = if tiles >= want || m.div_ceil(64) > MAX_SPLIT_M_BLOCKS {
        1
    } else {
        want.div_ceil(tiles).min(steps).min(MAX_SPLITS)
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
    #[allow(clippy::too_many_arguments)]
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        w: &DeviceLayout,
        x: &CudaStorage,
        start: usize,
        m: usize,
        dname: &str,
    ) -> Result<CudaStorage, QuantError> {
        let (n, k) = (w.n, w.k);
        let xs = x.as_cuda_slice::<T>()?.slice(start..start + m * k);
        // SAFETY: every output element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(m * n)? };
        let mt = m_tiles(m);
        let table = w.tag.starts_with('t');
        let f = function(
            dev,
            "qmma_tiled",
            FATBIN,
            &format!("qmmat_{}_{dname}_t{mt}", w.tag),
        )?;
        let smem = STAGES * stage_bytes(mt, table);
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let (splits, per) = split_k(n, m, k, multiprocessors(dev));
        let partial: Option<CudaSlice<f32>> = if splits > 1 {
            // SAFETY: each split writes its whole [m, n] slice before the last block reads it.
            Some(unsafe { dev.alloc::<f32>(splits * m * n)? })
        } else {
            None
        };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let null = 0u64;
        w.push_args(&mut b, &null);
        match &partial {
            Some(p) => b.arg(&xs).arg(&y).arg(p),
            None => b.arg(&xs).arg(&y).arg(&null),
        };
        let (mi, ni, ki, pi) = (m as i32, n as i32, k as i32, per as i32);
        b.arg(&w.counters).arg(&mi).arg(&ni).arg(&ki).arg(&pi);
        let cfg = LaunchConfig {
            grid_dim: (
                n.div_ceil(ROWS) as u32,
                splits as u32,
                m.div_ceil(8 * mt) as u32,
            ),
            block_dim: (ROWS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the arguments match `qmmat_*` in kernels/qmma_tiled.cu; x holds m*k elements
        // from a 16-byte-aligned start (checked by the caller), y m*n, partial splits*m*n, and the
        // counters (zero between launches) one per row block and activation block
        // (MAX_SPLIT_M_BLOCKS of them per row block, checked by split_k).
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        drop(partial);
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    if m == 0 || w.n == 0 {
        return Ok(Tensor::zeros((m, w.n), x.dtype(), x.device())?);
    }
    let x = super::aligned(x, 16)?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(QuantError::Invalid("qmma_tiled: x is not on a GPU".into()));
    };
    let start = layout.start_offset();
    let s = match x.dtype() {
        DType::BF16 => go::<half::bf16>(dev, w, cs, start, m, "bf16")?,
        DType::F16 => go::<half::f16>(dev, w, cs, start, m, "f16")?,
        other => {
            return Err(QuantError::Invalid(format!(
                "qmma_tiled: bf16/f16 activations only, got {other:?}"
            )))
        }
    };
    drop(storage);
    Ok(tensor_from_storage(s, (m, w.n)))
}

#[cfg(test)]
mod tests {
    use super::split_k;

    #[test]
    fn splits_fill_the_gpu_and_cover_k() {
        for &(n, m, k) in &[
            (4096usize, 16usize, 4096usize),
            (1024, 2, 4096),
            (14336, 64, 4096),
            (4096, 128, 14336),
            (136, 17, 512),
            (4096, 5000, 4096),
        ] {
            let (splits, per) = split_k(n, m, k, 132);
            let steps = k.div_ceil(128);
            assert!((1..=16).contains(&splits), "{n}x{k} m={m}: {splits}");
            assert!(splits * per >= steps && (splits - 1) * per < steps);
        }
        assert_eq!(split_k(14336, 16, 4096, 132).0, 3);
        assert_eq!(split_k(4096, 5000, 4096, 132).0, 1);
    }
}
