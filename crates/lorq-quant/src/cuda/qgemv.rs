//! Every weight-only format on the GPU through one packed layout ([`GpuLayout`]): the fused
//! dequantize-GEMV of `kernels/qgemv.cu` for few activation rows, tensor-core kernels for a few
//! more (its first one, and for 2-, 3-, 4- and 8-bit weights the tiled one of
//! [`super::qmma_tiled`], reading the same device buffers), dequantize-to-the-compute-dtype and
//! cuBLAS past that.
//! [`GpuLayout::dequantize_f32`] (the CPU decoder of the same layout) is the reference
//! (`tests/cuda_qgemv.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Storage, Tensor};

use super::fused_ops::{gather_columns, NormHead, NormHeadArg};
use super::{cuda_device, dtype_name, function, qmma_tiled, qwgmma, tensor_from_storage};
use crate::gpu_layout::{group_index_exact, CodeKind, GpuLayout};
use crate::gpu_slot::GpuSlot;
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qgemv.fatbin"));
static HALF2_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qgemv_half2.fatbin"));

/// Activation rows up to which the fused GEMV runs (it reads the weight once per 8 rows); past
/// this the weight is dequantized once per call and multiplied by cuBLAS.
pub const QGEMV_MAX_M: usize = 16;

/// Warps per block (kernels/qgemv.cu `WARPS`).
const WARPS: usize = 8;

/// A weight's device copy, or why the format has none (then the host path runs).
pub enum GpuQuantWeight {
    Ready(Box<DeviceLayout>),
    Unsupported(String),
}

impl std::fmt::Debug for GpuQuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuQuantWeight::Ready(d) => write!(f, "GpuQuantWeight({}x{} {})", d.n, d.k, d.tag),
            GpuQuantWeight::Unsupported(why) => write!(f, "GpuQuantWeight(unsupported: {why})"),
        }
    }
}

/// [`GpuLayout`] on one GPU.
pub struct DeviceLayout {
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) tag: String,
    codes: CudaSlice<u32>,
    scales: CudaSlice<f32>,
    zeros: Option<CudaSlice<f32>>,
    lut: Option<CudaSlice<f32>>,
    /// The code table's bits (empty for affine codes): weights share a grouped launch only with
    /// the same table (NF4 and FP4 are both 4-bit tables).
    lut_host: Vec<u32>,
    wpr: i32,
    pub(super) gsize: i32,
    groups: i32,
    round_mode: i32,
    /// Act-order: the original column of each packed column (gathers x into the packed order),
    /// and its inverse (gathers a dequantized weight back to the original order).
    perm: Option<Tensor>,
    inv_perm: Option<Tensor>,
    /// `perm` on the host: weights share a grouped launch only with the same column order.
    perm_host: Option<Vec<u32>>,
    /// Split-K tickets of the tiled tensor-core kernel (zero between launches), one per block of
    /// its output rows and activation rows.
    pub(super) counters: CudaSlice<u32>,
}

impl DeviceLayout {
    pub fn upload(l: &GpuLayout, dev: &CudaDevice) -> Result<Self, QuantError> {
        let on_gpu = candle_core::Device::Cuda(dev.clone());
        let (perm, inv_perm) = match &l.perm {
            Some(p) => {
                // W[:, p[i]] = packed[:, i]; a column index outside K (a malformed layout) is
                // refused here, so the gathers never read past a row.
                let not_a_permutation = |what: String| {
                    QuantError::Invalid(format!(
                        "act-order column order of a {}x{} weight: {what}, not a permutation of 0..{}",
                        l.n, l.k, l.k
                    ))
                };
                if p.len() != l.k {
                    return Err(not_a_permutation(format!("{} entries", p.len())));
                }
                let mut inv = vec![u32::MAX; l.k];
                for (i, &c) in p.iter().enumerate() {
                    match inv.get_mut(c as usize) {
                        Some(slot) if *slot == u32::MAX => *slot = i as u32,
                        _ => return Err(not_a_permutation(format!("entry {i} is {c}"))),
                    }
                }
                (
                    Some(Tensor::from_slice(p, p.len(), &on_gpu)?),
                    Some(Tensor::from_vec(inv, l.k, &on_gpu)?),
                )
            }
            None => (None, None),
        };
        Ok(Self {
            n: l.n,
            k: l.k,
            tag: l.kind.tag(),
            codes: dev.clone_htod(&l.words)?,
            scales: dev.clone_htod(&l.scales)?,
            zeros: if l.zeros.is_empty() {
                None
            } else {
                Some(dev.clone_htod(&l.zeros)?)
            },
            lut: match &l.kind {
                CodeKind::Table { lut, .. } => Some(dev.clone_htod(lut)?),
                CodeKind::Affine { .. } => None,
            },
            lut_host: match &l.kind {
                CodeKind::Table { lut, .. } => lut.iter().map(|v| v.to_bits()).collect(),
                CodeKind::Affine { .. } => Vec::new(),
            },
            wpr: l.words_per_row() as i32,
            gsize: l.group as i32,
            groups: l.groups() as i32,
            round_mode: l.rounding.mode(),
            perm,
            inv_perm,
            perm_host: l.perm.clone(),
            counters: dev.alloc_zeros::<u32>(
                l.n.div_ceil(qmma_tiled::MIN_ROWS) * qmma_tiled::MAX_SPLIT_M_BLOCKS,
            )?,
        })
    }

    /// The codes as row-major bytes `[n, k]` and one f32 scale per row, where the layout is exactly
    /// that (8-bit table codes without padding, one group per row, no column permutation: FP8
    /// e4m3). The W8A8 FP8 path reads these, so an FP8 weight has one device copy for both paths.
    pub(crate) fn row_major_bytes(&self) -> Option<(CudaView<'_, u8>, CudaView<'_, f32>)> {
        if self.tag != "t8"
            || self.wpr as usize * 4 != self.k
            || self.groups != 1
            || self.perm.is_some()
        {
            return None;
        }
        // SAFETY: each u32 word holds 4 codes little-endian (code c of a row at bit 8c, i.e. byte
        // c), so the n * k / 4 words are the n * k row-major bytes.
        let codes = unsafe { self.codes.transmute::<u8>(self.n * self.k) }?;
        Some((codes, self.scales.slice(0..self.n)))
    }

    /// The split-K tickets (zero between launches), `n.div_ceil(16) * 16` of them.
    pub(crate) fn split_k_counters(&self) -> &CudaSlice<u32> {
        &self.counters
    }

    /// Pushes the `QARGS` every kernel of qgemv.cu (and qmma_tiled.cu, qwgmma.cu) starts with.
    pub(super) fn push_args<'a>(
        &'a self,
        b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
        null: &'a u64,
    ) {
        b.arg(&self.codes).arg(&self.scales);
        match &self.zeros {
            Some(z) => b.arg(z),
            None => b.arg(null),
        };
        match &self.lut {
            Some(l) => b.arg(l),
            None => b.arg(null),
        };
        b.arg(&self.wpr)
            .arg(&self.gsize)
            .arg(&self.groups)
            .arg(&self.round_mode);
    }

    /// [`Self::push_args`] for a launch through `dependent_launch::KernelArgs`.
    pub(super) fn push_kernel_args<'a>(&'a self, b: &mut super::dependent_launch::KernelArgs<'a>) {
        b.buf(&self.codes).buf(&self.scales);
        match &self.zeros {
            Some(z) => b.buf(z),
            None => b.address(0),
        };
        match &self.lut {
            Some(l) => b.buf(l),
            None => b.address(0),
        };
        b.val(&self.wpr)
            .val(&self.gsize)
            .val(&self.groups)
            .val(&self.round_mode);
    }
}

/// The device copy of a weight on `dev`, made on first use from `layout` (whose failure is
/// remembered: the caller falls back to its host path).
pub(crate) fn device_weight(
    slot: &GpuSlot,
    dev: &CudaDevice,
    what: &str,
    layout: impl FnOnce() -> Result<GpuLayout, QuantError>,
) -> Result<Arc<GpuQuantWeight>, QuantError> {
    slot.get_or_upload(dev, |d| match layout() {
        Ok(l) => Ok(GpuQuantWeight::Ready(Box::new(DeviceLayout::upload(
            &l, d,
        )?))),
        Err(e) => {
            tracing::warn!("{what}: no fused GPU kernel for this weight ({e}); the host path runs");
            Ok(GpuQuantWeight::Unsupported(e.to_string()))
        }
    })
}

/// `x · Wᵀ` on the GPU when `x` is there and the weight has a device layout: `Ok(None)` tells the
/// caller to run its own path (CPU tensors, or a weight the kernels cannot express).
pub(crate) fn matmul_on_gpu(
    slot: &GpuSlot,
    x: &Tensor,
    what: &str,
    layout: impl FnOnce() -> Result<GpuLayout, QuantError>,
) -> Result<Option<Tensor>, QuantError> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        return Ok(None);
    };
    match &*device_weight(slot, dev, what, layout)? {
        GpuQuantWeight::Ready(w) => Ok(Some(matmul(w, x, QPath::Auto)?)),
        GpuQuantWeight::Unsupported(_) => Ok(None),
    }
}

/// The dequantized weight `[out, in]` (original column order) on `dev` in `dtype`, when the
/// weight has a device layout.
pub(crate) fn dequantize_on_gpu(
    slot: &GpuSlot,
    dev: &CudaDevice,
    dtype: DType,
    what: &str,
    layout: impl FnOnce() -> Result<GpuLayout, QuantError>,
) -> Result<Option<Tensor>, QuantError> {
    match &*device_weight(slot, dev, what, layout)? {
        GpuQuantWeight::Ready(w) => {
            let wd = dequantize(w, dev, dtype)?;
            Ok(Some(match &w.inv_perm {
                Some(inv) => gather_columns(&wd, inv)?,
                None => wd,
            }))
        }
        GpuQuantWeight::Unsupported(_) => Ok(None),
    }
}

/// Activation rows up to which the tensor-core kernel runs (bf16/f16 activations); past this
/// the weight is dequantized once per call and multiplied by cuBLAS.
pub const QMMA_MAX_M: usize = 128;

/// [`QPath::Auto`]'s row limits (bf16/f16 activations). Affine 4-bit weights the half2 GEMV takes
/// run it for 1..=2 rows ([`AUTO_HALF2_MAX_M`]). Weights the tiled tensor-core kernel
/// covers ([`qmma_tiled::supports`]: 2-, 3-, 4- and 8-bit codes) take it for 2..=64 rows
/// (from 3 with 8-bit codes; to 128 on weights of 32 Mi codes or more; the GEMV below); every
/// other weight takes the GEMV up to 8 rows, the first tensor-core kernel up to 32, dequantize +
/// cuBLAS past that. Act-order weights follow the same limits: every path gathers x's columns
/// into the packed order, dequantize + cuBLAS included (session 22; it used to gather the whole
/// dequantized weight, 2.5-5x slower, and act-order kept the kernels to every row count).
const AUTO_GEMV_MAX_M: usize = 8;
const AUTO_MMA_MAX_M: usize = 32;
/// Measured on an H100 (docs/benchmarks.md "Tiled kernel, second version",
/// docs/bench/kernels-tiled-h100.json) since the kernel streams the weight codes through
/// registers: from 2 rows it is faster than the GEMV on the Llama-3-8B shapes, and up to 64 rows
/// faster than dequantize + cuBLAS. Up to 128 rows on weights of 32 Mi codes and more (session
/// 17, block shape `x1` with 16 n8 tiles: 14336x4096 at 128 rows 82 us against 58 + 49 for the
/// coalesced dequantize + cuBLAS, 4096x14336 98 against 57 + 56); smaller ones dequantize from 65
/// rows (4096x4096: 41-50 us against 19 + 18).
const AUTO_TILED_MIN_M: usize = 2;
/// Up to this many bf16/f16 rows, affine 4-bit weights the half2 GEMV takes run it instead (two
/// rows share each decoded pair; the tiled kernel pays its decode for an 8-row tile). H200,
/// session 30 (GPU time, GPTQ g128, 2 rows): 4096x4096 6.6 us against the tiled kernel's 7.6,
/// 1024x4096 4.0 against 5.8, 14336x4096 15.8 against 19.7, 4096x14336 15.0 against 20.0;
/// batch-2 decode +29-31 %. From 3 rows the tiled kernel stays (the half2 kernel holds at most
/// 2 rows a block: 4 rows would stream the weight twice).
const AUTO_HALF2_MAX_M: usize = 2;

static HALF2_TWO_ROWS: AtomicBool = AtomicBool::new(true);

/// Lets `Auto` take the half2 GEMV for two rows ([`AUTO_HALF2_MAX_M`]; on by default), or keeps
/// it to one (the tiled kernel from two rows, the routing before): `lorq bench decode
/// --compare-half2-rows` measures what it brings.
pub fn set_half2_two_rows(on: bool) {
    HALF2_TWO_ROWS.store(on, Ordering::Relaxed);
}
/// 8-bit codes keep the GEMV at 2 rows (H100, session 18: gate/up 32.6 against 35.5 us, k/v 7.9
/// against 9.1; from 4 rows the tiled kernel is ahead everywhere, 2-4x at 8-16 rows).
const AUTO_TILED_MIN_M_8BIT: usize = 3;
const AUTO_TILED_MAX_M: usize = 64;
const AUTO_TILED_WIDE_MAX_M: usize = 128;
const AUTO_TILED_WIDE_CODES: usize = 1 << 25;
/// The wgmma kernel ([`qwgmma::supports`]: 4-bit codes on a Hopper GPU) from 33 rows on weights
/// of 4 Mi codes and more (a grouped launch counts its weights together) up to 128 rows (256 from
/// 16 Mi codes), from 17 rows on weights of 32 Mi up to 256, and from 17 on groups of 16 Mi
/// (q+k+v, one launch: H200, session 37, GPU time, 6144x4096 at 17 / 24 / 32 rows 20.7 / 21.0 /
/// 21.1 us against the tiled kernel's grouped 20.1 / 22.6 / 26.7 for GPTQ, NF4 22.3 / 22.5 / 22.7
/// against 27.7 / 28.8 / 30.9; at 16 rows the tiled kernel's 16-row blocks stay ahead: 19.1 /
/// 17.0 against 20.1 / 22.1).
/// H200, session 36 (GPU time, with split tiles summed in clusters where they fit:
/// `qwgmma::plan`): 1024x4096 (4 Mi codes) at 33 / 64 / 128 rows 9.3 / 9.6 / 11.3 us wgmma
/// against 14.2 / 16.1 / 12.8 tiled (GPTQ; NF4 10.3 / 10.5 / 12.2 against 15.0 / 16.5 / 12.2;
/// act-order 11.3 / 12.3 / 15.0 against 16.4 / 18.8 / 16.5), at 256 rows 18.1 against 14.5
/// (dequantize + cuBLAS, kept); 4096x4096 (16 Mi) at 256 rows 22.0 against 31.6 dequantize +
/// cuBLAS (NF4 24.9 / 30.2, act-order 27.6 / 38.0). Before: 33-128 rows from 16 Mi codes.
/// H200, session 27 (GPU time, after the kernel's awaited ring): at 17-32 rows the tiled kernel
/// runs its 32-row block and the wgmma kernel its 64-row one, so 32 rows stands for the range:
/// gate/up and down (56 Mi codes) 32.0-36.5 us wgmma against 33.9-55.7 tiled (GPTQ, AWQ, HQQ,
/// NF4, act-order), at 16 rows 31.1-35.0 against 22.7-29.5; q/o (16 Mi) at 32 rows 15.2-17.5
/// against 13.7-16.0 (the tiled kernel stays).
/// H100, session 19, GPTQ 4-bit, us: 14336x4096 at 33 / 64 / 128 / 256 rows 45.0 / 45.4 / 51.8 /
/// 95.6 against 57.1 / 56.6 / 83.7 (tiled) / 121.3 (dequantize + cuBLAS); 4096x4096 at 33 / 64
/// 25.3 / 29.7 against 27.1 / 32.8; at 32 rows the tiled kernel stays ahead (39.8 against 45.2 on
/// gate/up). Session 21, once the split-K tile sum kept 16 loads in flight (the K schedule
/// splits 4096-row weights): 4096x4096 at 128 rows 25.7 (NF4 27.6) against dequantize's 34.6
/// (33.8), at 256 34.7 (38.6) against 38.6 (38.2); 4096x14336 at 128 58.1 (63.6) against 119.6,
/// at 256 108.3 (122.2) against 129.5 (125.2). Act-order, H200, session 22 (GPU time, x gathered
/// on every path): 1024x4096 at 128 rows 16.6 us dequantize + cuBLAS against 21.9 wgmma; at 512
/// rows dequantize + cuBLAS ahead on every shape (25.2 / 51.3 / 160.8 / 183.6 against 32.2 / 57.5
/// / 190.3 / 206.6 for k/v, q/o, gate/up, down).
const AUTO_WGMMA_MIN_M: usize = 33;
const AUTO_WGMMA_WIDE_MIN_M: usize = 17;
const AUTO_WGMMA_MAX_M: usize = 128;
const AUTO_WGMMA_WIDE_MAX_M: usize = 256;
const AUTO_WGMMA_CODES: usize = 1 << 22;
const AUTO_WGMMA_LARGE_CODES: usize = 1 << 24;
const AUTO_WGMMA_WIDE_CODES: usize = 1 << 25;

/// Which GPU path a matmul takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QPath {
    /// The row count, dtype and format decide (see `AUTO_*`): for bf16/f16 activations, the half2
    /// GEMV for 1..=2 rows of affine 4-bit weights it takes; for the weights the tiled kernel
    /// covers, the tiled kernel for 2..=64 rows (2..=128 on large
    /// weights), except 4-bit weights on a Hopper GPU, which take the wgmma kernel on large
    /// weights (from 33 rows to 128 or 256, from 17 to 256 on the largest: `AUTO_WGMMA_*`); otherwise
    /// the GEMV up to 8 rows (f32 activations up to
    /// [`QGEMV_MAX_M`]), the first tensor-core kernel up to 32, else dequantize + cuBLAS.
    Auto,
    /// The fused GEMV with this launch shape.
    Fused(Variant),
    /// The first tensor-core kernel (bf16/f16 activations, every format).
    Mma,
    /// The tiled tensor-core kernel (bf16/f16 activations, the 2-, 3-, 4- and 8-bit codes of
    /// [`qmma_tiled::supports`]); with folded scales where [`qmma_tiled::folds`].
    MmaTiled,
    /// The tiled tensor-core kernel with every weight scaled before the mma, also where
    /// [`qmma_tiled::folds`] (what the folded scales are measured and tested against).
    MmaTiledPerWeight,
    /// The wgmma kernel (bf16/f16 activations, 4-bit codes on a Hopper GPU:
    /// [`qwgmma::supports`]).
    Wgmma,
    /// Dequantize to the compute dtype on the GPU, then cuBLAS.
    Dequantize,
}

enum Route {
    Gemv(Variant),
    Mma,
    /// Folded scales allowed ([`qmma_tiled::folds`] says where they apply).
    MmaTiled {
        fold: bool,
    },
    Wgmma,
    Dequantize,
}

/// A GEMV launch shape: output rows per warp, warps per output row group (K-slices), and the
/// kernel: `qgemv_<kind>_*` in f32 math (kernels/qgemv.cu), or with `half2` one or two bf16/f16
/// activation rows through affine 4-bit codes, two weights per f16 instruction
/// (kernels/qgemv_half2.cu, [`Variant::half2_fits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub rows_per_warp: usize,
    pub split: usize,
    pub half2: bool,
}

/// The half2 kernel's dynamic shared memory (kernels/qgemv_half2.cu): the staged activations, 72
/// bytes per 32 inputs.
fn half2_smem(w: &DeviceLayout) -> usize {
    w.k / 32 * 72
}
/// The same for `mr` activation rows, each staged from a 16-byte boundary (`half2_stage_words`).
fn half2_smem_rows(w: &DeviceLayout, mr: usize) -> usize {
    mr * half2_smem(w).div_ceil(16) * 16
}
/// Shared memory a launch gets without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;
/// The most the half2 kernel opts in to: what every GPU of compute capability 8.x and 9.0 offers a
/// block (99 KiB on the smallest, 8.6 / 8.9): K up to 45,056.
const HALF2_MAX_SMEM: usize = 99 * 1024;

impl Variant {
    const fn f32_math(rows_per_warp: usize, split: usize) -> Variant {
        Variant {
            rows_per_warp,
            split,
            half2: false,
        }
    }

    /// Every compiled shape: f32 math (kernels/qgemv.cu) with rows per warp 4 up to 2 activation
    /// rows of bf16/f16, and the half2 kernel's two (kernels/qgemv_half2.cu).
    pub const ALL: [Variant; 6] = [
        Variant::f32_math(1, 1),
        Variant::f32_math(1, 4),
        Variant::f32_math(4, 1),
        Variant::f32_math(4, 4),
        Variant::half2(2),
        Variant::half2(4),
    ];

    /// The half2 kernel's shapes: 4 rows per warp, 2 or 4 K-slices ([`Variant::half2_for`]).
    pub const fn half2(split: usize) -> Variant {
        Variant {
            rows_per_warp: 4,
            split,
            half2: true,
        }
    }

    /// The half2 kernel's shape for `n` output rows (all the weights of a grouped launch; the
    /// gate/up kernel asks as for one of its weights, so its sums are the GEMVs' bit for bit): 2
    /// K-slices where that still gives 2,048 warps or more, else 4.
    /// Lab, H200, session 28 (docs/benchmarks.md): 2 slices 12.8 -> 11.3 us on 14336x4096, 22.0
    /// -> 18.4 on the 28672-row gate+up launch, 7.6 -> 6.7 on q+k+v, 6.0 -> 5.6 on 4096x4096, even
    /// on 4096x14336; 1024x4096 (512 warps at 2 slices) faster at 4.
    pub fn half2_for(n: usize) -> Variant {
        if n.div_ceil(4) * 2 >= 2048 {
            Variant::half2(2)
        } else {
            Variant::half2(4)
        }
    }

    /// Blocks of one weight of `n` rows (kernels/qgemv.cu, qgemv_half2.cu: WARPS warps per block,
    /// `split` warps per group of `rows_per_warp` output rows; `gated`: the gate/up-SiLU kernel,
    /// whose warps hold half their rows from each weight).
    fn blocks(self, n: usize, gated: bool) -> usize {
        let rows = if gated {
            self.rows_per_warp / 2
        } else {
            self.rows_per_warp
        };
        (n.div_ceil(rows) * self.split).div_ceil(WARPS)
    }

    /// Whether the half2 kernel takes `w` for one activation row: affine 4-bit codes (hqq / GPTQ
    /// / AWQ 4-bit) in groups of a multiple of 32, with K small enough for the staged activations
    /// in shared memory ([`HALF2_MAX_SMEM`]), a code's group exact by multiply-high
    /// ([`group_index_exact`]) and every row's offset in 32 bits (the kernel's `Half2Rows`).
    pub fn half2_fits(w: &DeviceLayout) -> bool {
        Variant::half2_fits_rows(w, 1)
    }

    /// [`Variant::half2_fits`] for `mr` (1 or 2) activation rows per block, each staged.
    pub fn half2_fits_rows(w: &DeviceLayout, mr: usize) -> bool {
        w.tag == "a4"
            && w.gsize % 32 == 0
            && half2_smem_rows(w, mr) <= HALF2_MAX_SMEM
            && group_index_exact(w.k, w.gsize as usize)
            && w.n * w.k / 32 <= u32::MAX as usize
    }

    /// Whether this shape is compiled for `mr` activation rows of `dtype` and takes `w`'s format.
    pub fn compiled(self, w: &DeviceLayout, mr: usize, dtype: DType) -> bool {
        if self.half2 {
            half2_rows(mr, dtype) && Variant::half2_fits_rows(w, mr)
        } else {
            self.f32_math_compiled(mr, dtype)
        }
    }

    /// Whether this f32-math shape is compiled for `mr` activation rows of `dtype` (every format):
    /// rows per warp 4 only up to 2 rows of bf16/f16 (registers).
    fn f32_math_compiled(self, mr: usize, dtype: DType) -> bool {
        self.rows_per_warp == 1 || (mr <= 2 && is_half(dtype))
    }

    /// The shape for `n` output rows (all the weights of a grouped launch): the half2 kernel where
    /// `half2` (it takes the weight) for one or two bf16/f16 rows; for other weights at one bf16/f16 row
    /// f32 math with 4 rows per warp, 4 K-slices below 16,384 rows and 1 from there (H200, session
    /// 28, NF4 codes: 14336x4096 17.7-18.2 us against 18.8-19.4 at one slice, 4096x14336 17.2
    /// against 24.8, 1024x4096 3.6 against 3.8 at one row per warp, but the 28672-row gate+up
    /// launch 32.3 against 30.7 at one slice); otherwise enough warps to fill the GPU (about
    /// 2,048), with the fewest K-slices and the most rows per warp (activations loaded once for
    /// all of them).
    pub fn pick(n: usize, mr: usize, dtype: DType, half2: bool) -> Variant {
        if half2 && half2_rows(mr, dtype) {
            return Variant::half2_for(n);
        }
        if mr == 1 && is_half(dtype) {
            let split = if n.div_ceil(4) >= 4096 { 1 } else { 4 };
            return Variant::f32_math(4, split);
        }
        const WANT: usize = 2048;
        for v in [
            Variant::f32_math(4, 1),
            Variant::f32_math(4, 4),
            Variant::f32_math(1, 1),
        ] {
            if v.f32_math_compiled(mr, dtype) && n.div_ceil(v.rows_per_warp) * v.split >= WANT {
                return v;
            }
        }
        Variant::f32_math(1, 4)
    }

    pub fn name(self) -> String {
        let math = if self.half2 { "half2-" } else { "" };
        format!("{math}r{}s{}", self.rows_per_warp, self.split)
    }
}

/// bf16 or f16: the dtypes of the tensor-core kernels and the half2 GEMV.
fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// The activations the half2 GEMV takes: one or two rows of bf16/f16 per block (f32 rows keep the
/// exact path; `qgemv_a4h_*_m1`, `_m2`).
fn half2_rows(mr: usize, dtype: DType) -> bool {
    mr <= 2 && is_half(dtype)
}

/// The activation rows one GEMV block holds for `m` rows (the `m<mr>` of the kernel names; a
/// launch covers `m` in `ceil(m / mr)` grid rows): what [`Variant::compiled`] is asked with.
pub fn mr_for(m: usize) -> usize {
    match m {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

/// [`QPath::Auto`]'s path for `m` rows of `dtype` (f32/bf16/f16) through `w`, with `n` output rows
/// for the GEMV's launch shape (a grouped launch passes the rows of all its weights). Measured on
/// an H100 (docs/benchmarks.md): for the weights the tiled kernel covers it wins from 2 rows to
/// 64 (to 128 on weights of 32 Mi codes — a grouped launch counts its weights together); for the
/// others the GEMV wins up to 8 rows, the first tensor-core kernel from
/// 9 to 32, dequantize + cuBLAS past that.
///
/// `grouped`: the route of a grouped launch ([`matmul_group`]). 2-bit codes past 64 rows run one
/// launch per weight: their grouped 128-row kernel needs more than 255 registers and spills.
/// `wgmma`: whether the wgmma kernel takes `w` on this GPU ([`qwgmma::supports`]), asked only
/// for the row counts it would serve (`AUTO_WGMMA_*`): most calls (decode at small batches) never
/// look up the GPU's compute capability.
fn auto_route(
    w: &DeviceLayout,
    n: usize,
    m: usize,
    dtype: DType,
    grouped: bool,
    wgmma: impl FnOnce() -> bool,
) -> Route {
    let half = is_half(dtype);
    let codes = n * w.k;
    let (wgmma_min_m, wgmma_max_m) = if codes >= AUTO_WGMMA_WIDE_CODES {
        (AUTO_WGMMA_WIDE_MIN_M, AUTO_WGMMA_WIDE_MAX_M)
    } else if codes >= AUTO_WGMMA_LARGE_CODES {
        // A group in one wgmma launch (q/k/v: `qwgmma::launch_groups`) from 17 rows.
        let min_m = if grouped && qwgmma::grouped_launches() {
            AUTO_WGMMA_WIDE_MIN_M
        } else {
            AUTO_WGMMA_MIN_M
        };
        (min_m, AUTO_WGMMA_WIDE_MAX_M)
    } else if codes >= AUTO_WGMMA_CODES {
        (AUTO_WGMMA_MIN_M, AUTO_WGMMA_MAX_M)
    } else {
        (1, 0)
    };
    if half && (wgmma_min_m..=wgmma_max_m).contains(&m) && wgmma() {
        return Route::Wgmma;
    }
    let half2_max_m = if HALF2_TWO_ROWS.load(Ordering::Relaxed) {
        AUTO_HALF2_MAX_M
    } else {
        1
    };
    if half && m <= half2_max_m && Variant::half2_fits_rows(w, mr_for(m)) {
        return Route::Gemv(Variant::half2_for(n));
    }
    let tiled_min_m = if w.tag == "a8" {
        AUTO_TILED_MIN_M_8BIT
    } else {
        AUTO_TILED_MIN_M
    };
    let tiled_max_m = if n * w.k >= AUTO_TILED_WIDE_CODES && !(grouped && w.tag == "a2") {
        AUTO_TILED_WIDE_MAX_M
    } else {
        AUTO_TILED_MAX_M
    };
    if half && qmma_tiled::supports(w) && (tiled_min_m..=tiled_max_m).contains(&m) {
        Route::MmaTiled {
            fold: qmma_tiled::folded_scales(),
        }
    } else if m <= AUTO_GEMV_MAX_M || (!half && m <= QGEMV_MAX_M) {
        Route::Gemv(Variant::pick(
            n,
            mr_for(m),
            dtype,
            Variant::half2_fits_rows(w, mr_for(m)),
        ))
    } else if half && m <= AUTO_MMA_MAX_M {
        Route::Mma
    } else {
        Route::Dequantize
    }
}

/// `x · Wᵀ` on `x`'s GPU, in `x`'s dtype (f32/bf16/f16; others computed in f32).
pub fn matmul(w: &DeviceLayout, x: &Tensor, path: QPath) -> Result<Tensor, QuantError> {
    let dev = cuda_device(x, "quantized matmul")?;
    let (n, k) = (w.n, w.k);
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        return Err(QuantError::Invalid(format!(
            "{}: activation shape {dims:?} does not end in in_features {k}",
            w.tag
        )));
    }
    let in_dtype = x.dtype();
    let x = match in_dtype {
        DType::F32 | DType::BF16 | DType::F16 => x.clone(),
        _ => x.to_dtype(DType::F32)?,
    };
    let m = x.elem_count() / k.max(1);
    let mut out_dims = dims.clone();
    *out_dims.last_mut().expect("rank >= 1") = n;
    let x2 = x.reshape((m, k))?;
    let half = is_half(x.dtype());
    let tiled = half && qmma_tiled::supports(w);
    let route = match path {
        QPath::Auto => auto_route(w, n, m, x.dtype(), false, || qwgmma::supports(w, dev)),
        QPath::Dequantize => Route::Dequantize,
        QPath::Wgmma => {
            if !half || !qwgmma::supports(w, dev) {
                return Err(QuantError::Invalid(format!(
                    "the wgmma kernel takes bf16/f16 activations and 4-bit codes in groups of a multiple of 32 on a GPU of compute capability 9.0, got {:?} activations, {} in groups of {}",
                    x.dtype(),
                    w.tag,
                    w.gsize
                )));
            }
            Route::Wgmma
        }
        QPath::Mma | QPath::MmaTiled | QPath::MmaTiledPerWeight => {
            if !half {
                return Err(QuantError::Invalid(format!(
                    "the tensor-core kernels take bf16/f16 activations, got {:?}",
                    x.dtype()
                )));
            }
            if path == QPath::Mma {
                Route::Mma
            } else if tiled {
                Route::MmaTiled {
                    fold: path == QPath::MmaTiled,
                }
            } else {
                return Err(QuantError::Invalid(format!(
                    "the tiled tensor-core kernel takes 3-, 4- and 8-bit codes in groups of a multiple of 32 and 2-bit codes in groups of a multiple of 16, got {} in groups of {}",
                    w.tag, w.gsize
                )));
            }
        }
        QPath::Fused(v) => {
            if !v.compiled(w, mr_for(m), x.dtype()) {
                return Err(QuantError::Invalid(format!(
                    "GEMV shape {} is not compiled for {m} rows of {:?} through {} in groups of {} (K {k})",
                    v.name(),
                    x.dtype(),
                    w.tag,
                    w.gsize
                )));
            }
            Route::Gemv(v)
        }
    };
    let y = match route {
        Route::Gemv(v) => gemv(dev, &[w], &in_packed_order(w, x2)?, m, v)?.remove(0),
        Route::Mma => mma(dev, w, &in_packed_order(w, x2)?, m)?,
        Route::MmaTiled { fold } => qmma_tiled::matmul(dev, w, &in_packed_order(w, x2)?, m, fold)?,
        Route::Wgmma => qwgmma::matmul(dev, w, &in_packed_order(w, x2)?, m)?,
        Route::Dequantize => {
            let wd = dequantize(w, dev, x.dtype())?;
            match &w.inv_perm {
                // Act-order: the product in the packed column order (x's columns gathered) where
                // x is the smaller of the two, else the weight's columns back to the original
                // order (W[:, perm[i]] = packed[:, i]).
                Some(_) if m < w.n => in_packed_order(w, x2)?.matmul(&wd.t()?)?,
                Some(inv) => x2.matmul(&gather_columns(&wd, inv)?.t()?)?,
                None => x2.matmul(&wd.t()?)?,
            }
        }
    };
    let y = y.reshape(out_dims)?;
    Ok(if y.dtype() != in_dtype {
        y.to_dtype(in_dtype)?
    } else {
        y
    })
}

/// `x2` `[m, k]` contiguous, with its columns in `w`'s packed order: gathered where `w` is in
/// act-order, as it is otherwise.
fn in_packed_order(w: &DeviceLayout, x2: Tensor) -> Result<Tensor, QuantError> {
    Ok(match &w.perm {
        Some(p) => gather_columns(&x2.contiguous()?, p)?,
        None => x2.contiguous()?,
    })
}

/// The dequantized weight `[out, in]` (packed column order) in `dtype` (f32/bf16/f16) on `dev`.
pub fn dequantize(w: &DeviceLayout, dev: &CudaDevice, dtype: DType) -> Result<Tensor, QuantError> {
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        w: &DeviceLayout,
        name: &str,
    ) -> Result<CudaStorage, QuantError> {
        let (n, k) = (w.n, w.k);
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n * k)? };
        let f = function(dev, "qgemv", FATBIN, name)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let null = 0u64;
        w.push_args(&mut b, &null);
        let (ni, ki) = (n as i32, k as i32);
        b.arg(&out).arg(&ni).arg(&ki);
        // One thread per 8 weights (the kernel strides past 2^16 blocks).
        let blocks = (n * (k / 8)).div_ceil(256).clamp(1, 1 << 16) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `qdequant_*` in kernels/qgemv.cu.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let dtype = match dtype {
        DType::BF16 | DType::F16 => dtype,
        _ => DType::F32,
    };
    let name = format!("qdequant_{}_{}", w.tag, dtype_name(dtype));
    let s = match dtype {
        DType::BF16 => go::<half::bf16>(dev, w, &name)?,
        DType::F16 => go::<half::f16>(dev, w, &name)?,
        _ => go::<f32>(dev, w, &name)?,
    };
    Ok(tensor_from_storage(s, (w.n, w.k)))
}

/// Kernel argument `QGroup` (kernels/common.cuh; qgemv.cu and qmma_tiled.cu): the device
/// pointers and rows of the second and third weight of a grouped launch, and the first block of
/// each (`b1 = b2 = grid` for one weight).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct QGroup {
    codes: [u64; 2],
    scales: [u64; 2],
    zeros: [u64; 2],
    y: [u64; 2],
    n: [i32; 2],
    b1: i32,
    b2: i32,
}

// SAFETY: plain old data laid out as the kernel's `QGroup` (repr(C), 8-byte pointers, ints).
unsafe impl DeviceRepr for QGroup {}

impl QGroup {
    /// The group argument for weights `ws` (outputs `ys`), whose blocks start at `b1` and `b2`,
    /// with the guards that keep the pointers' buffers ordered before the launch.
    pub(crate) fn new<'a, T: DeviceRepr>(
        stream: &'a std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
        ws: &[&'a DeviceLayout],
        ys: &'a [CudaSlice<T>],
        [b1, b2]: [i32; 2],
    ) -> (Self, Vec<impl Drop + 'a>) {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let mut group = QGroup {
            b1,
            b2,
            ..Default::default()
        };
        let mut guards = Vec::new();
        for (i, (wi, yi)) in ws.iter().zip(ys).enumerate().skip(1) {
            let (c, gc) = wi.codes.device_ptr(stream);
            let (sc, gs) = wi.scales.device_ptr(stream);
            let z = match &wi.zeros {
                Some(z) => {
                    let (z, gz) = z.device_ptr(stream);
                    guards.push(gz);
                    z
                }
                None => 0,
            };
            let (y, gy) = yi.device_ptr(stream);
            guards.extend([gc, gs, gy]);
            group.codes[i - 1] = c;
            group.scales[i - 1] = sc;
            group.zeros[i - 1] = z;
            group.y[i - 1] = y;
            group.n[i - 1] = wi.n as i32;
        }
        (group, guards)
    }
}

/// `x · Wᵀ` of every weight in `ws` (1 to 3, same format, K, groups and table; the caller checks)
/// in one GEMV launch: each weight's blocks follow the previous one's, each writes its own output.
fn gemv(
    dev: &CudaDevice,
    ws: &[&DeviceLayout],
    x: &Tensor,
    m: usize,
    v: Variant,
) -> Result<Vec<Tensor>, QuantError> {
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        ws: &[&DeviceLayout],
        x: &CudaStorage,
        start: usize,
        m: usize,
        v: Variant,
        dname: &str,
    ) -> Result<Vec<CudaStorage>, QuantError> {
        let w = ws[0];
        let k = w.k;
        let xs = x.as_cuda_slice::<T>()?.slice(start..start + m * k);
        // SAFETY: every output element is written by the kernel.
        let ys = ws
            .iter()
            .map(|w| unsafe { dev.alloc::<T>(m * w.n) })
            .collect::<Result<Vec<_>, _>>()?;
        let stream = dev.cuda_stream();
        let per: Vec<usize> = ws.iter().map(|w| v.blocks(w.n, false)).collect();
        let (total, starts) = super::group_blocks(&per);
        let (group, guards) = QGroup::new(&stream, ws, &ys, starts);
        let mr = mr_for(m);
        let math = if v.half2 { "h" } else { "" };
        let name = format!(
            "qgemv_{}{math}_{dname}_m{mr}_r{}_s{}",
            w.tag, v.rows_per_warp, v.split
        );
        let smem = if v.half2 { half2_smem_rows(w, mr) } else { 0 };
        let f = if v.half2 {
            half2_function(dev, &name, smem)?
        } else {
            function(dev, "qgemv", FATBIN, &name)?
        };
        let mut b = stream.launch_builder(&f);
        let null = 0u64;
        w.push_args(&mut b, &null);
        let (mi, ni, ki) = (m as i32, w.n as i32, k as i32);
        b.arg(&xs)
            .arg(&ys[0])
            .arg(&mi)
            .arg(&ni)
            .arg(&ki)
            .arg(&group);
        let cfg = LaunchConfig {
            grid_dim: (total as u32, m.div_ceil(mr) as u32, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the arguments match `qgemv_*` in kernels/qgemv.cu and kernels/qgemv_half2.cu
        // (its shared memory opted in above, within `HALF2_MAX_SMEM`: `Variant::half2_fits`); x
        // holds m*k elements from a 16-byte-aligned start (checked by the caller), output j
        // m*n_j; the group's weights share the first one's format, K, groups and table (checked
        // by the callers).
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        drop(guards);
        Ok(super::storages(ys, dev))
    }
    let x = super::aligned(x, 16)?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(QuantError::Invalid("GEMV: x is not on a GPU".into()));
    };
    let start = layout.start_offset();
    let s = match x.dtype() {
        DType::BF16 => go::<half::bf16>(dev, ws, cs, start, m, v, "bf16")?,
        DType::F16 => go::<half::f16>(dev, ws, cs, start, m, v, "f16")?,
        _ => go::<f32>(dev, ws, cs, start, m, v, "f32")?,
    };
    drop(storage);
    Ok(s.into_iter()
        .zip(ws)
        .map(|(s, w)| tensor_from_storage(s, (m, w.n)))
        .collect())
}

/// The half2 kernel `name` (kernels/qgemv_half2.cu), opted in to `smem` bytes of dynamic shared
/// memory past the default 48 KiB (at most [`HALF2_MAX_SMEM`]: `Variant::half2_fits`).
fn half2_function(dev: &CudaDevice, name: &str, smem: usize) -> Result<CudaFunction, QuantError> {
    let f = function(dev, "qgemv_half2", HALF2_FATBIN, name)?;
    if smem > DEFAULT_SMEM {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    Ok(f)
}

/// `SiLU(x · gateᵀ) * (x · upᵀ)` for one bf16/f16 row in one launch of the half2 GEMV
/// (`qgemv_a4h_silu_*`: each warp two rows of gate and the same two of up), rounded as the two
/// GEMVs followed by `fused_ops::silu_mul`; `None` where it does not apply (not one bf16/f16 row,
/// weights the half2 kernel does not take or that cannot share a launch, different row counts).
pub fn matmul_silu_mul(
    gate: &DeviceLayout,
    up: &DeviceLayout,
    x: &Tensor,
) -> Result<Option<Tensor>, QuantError> {
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        gate: &DeviceLayout,
        up: &DeviceLayout,
        up_zeros: &CudaSlice<f32>,
        x: &CudaStorage,
        start: usize,
        dname: &str,
    ) -> Result<CudaStorage, QuantError> {
        let (n, k) = (gate.n, gate.k);
        let xs = x.as_cuda_slice::<T>()?.slice(start..start + k);
        // SAFETY: every output element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        // The shape of either weight's own GEMV (`Auto`): the same sums, bit for bit.
        let v = Variant::half2_for(n);
        let smem = half2_smem(gate);
        let name = format!(
            "qgemv_a4h_silu_{dname}_m1_r{}_s{}",
            v.rows_per_warp, v.split
        );
        let f = half2_function(dev, &name, smem)?;
        let mut b = stream.launch_builder(&f);
        let null = 0u64;
        gate.push_args(&mut b, &null);
        let (ni, ki) = (n as i32, k as i32);
        b.arg(&up.codes)
            .arg(&up.scales)
            .arg(up_zeros)
            .arg(&xs)
            .arg(&y)
            .arg(&ni)
            .arg(&ki);
        let cfg = LaunchConfig {
            grid_dim: (v.blocks(n, true) as u32, 1, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the arguments match `qgemv_a4h_silu_*` in kernels/qgemv_half2.cu (its shared
        // memory opted in, within `HALF2_MAX_SMEM`); x holds k elements from a 16-byte-aligned
        // start, gate and up n x k of one format, K and groups (checked by the caller).
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let half = is_half(x.dtype());
    let one_row = x.dims().last() == Some(&gate.k) && x.elem_count() == gate.k;
    let Some(up_zeros) = &up.zeros else {
        return Ok(None);
    };
    // (Act-order weights would need x's columns gathered first: never here.)
    if !half
        || !one_row
        || gate.n != up.n
        || gate.perm.is_some()
        || !same_kernel(gate, up)
        || !Variant::half2_fits(gate)
    {
        return Ok(None);
    }
    let dev = cuda_device(x, "fused gate/up GEMV")?;
    let x = super::aligned(x, 16)?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(QuantError::Invalid(
            "gate/up GEMV: x is not on a GPU".into(),
        ));
    };
    let start = layout.start_offset();
    let s = match x.dtype() {
        DType::BF16 => go::<half::bf16>(dev, gate, up, up_zeros, cs, start, "bf16")?,
        _ => go::<half::f16>(dev, gate, up, up_zeros, cs, start, "f16")?,
    };
    drop(storage);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = gate.n;
    Ok(Some(tensor_from_storage(s, dims)))
}

/// Launches of the half2 kernels with a norm head so far in this process (tests check that a
/// decode step took them).
static NORM_HEAD_LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many half2 GEMVs ran their input's residual add + RMSNorm themselves so far.
pub fn norm_head_launches() -> u64 {
    NORM_HEAD_LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

/// The half2 kernel's dynamic shared memory with a norm head: the staging (16-byte words), then the
/// norm's output row (kernels/qgemv_half2.cu `half2_stage_words`, `norm_head_stage`).
fn half2_norm_smem(w: &DeviceLayout, elem: usize) -> usize {
    half2_smem(w).div_ceil(16) * 16 + w.k * elem
}

/// The launch of a half2 kernel with a norm head (`qgemv_a4h_norm_*`, `qgemv_a4h_silu_norm_*`):
/// persistent blocks, as many as the GPU holds at once (up to the `blocks` of the plain grid),
/// so each runs the norm once and then takes grid blocks in turn.
fn norm_head_launch(
    dev: &CudaDevice,
    f: &CudaFunction,
    blocks: usize,
    smem: usize,
) -> Result<LaunchConfig, QuantError> {
    let threads = (WARPS * 32) as u32;
    let resident = f
        .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
        .w()? as usize;
    let grid = blocks.min(super::paged_attention::multiprocessors(dev)? * resident.max(1));
    NORM_HEAD_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

/// Whether the half2 kernels with a norm head take `ws` (1-3 weights sharing one launch) and
/// `head` (one bf16/f16 row of the weights' K).
fn norm_head_fits(ws: &[&DeviceLayout], head: &NormHead) -> bool {
    let Some(&w) = ws.first() else {
        return false;
    };
    let dtype = head.residual.dtype();
    is_half(dtype)
        && ws.len() <= 3
        && ws
            .iter()
            .all(|o| o.perm.is_none() && same_kernel(w, o) && Variant::half2_fits(o))
        && head.fits(w.k, dtype)
        && half2_norm_smem(w, dtype.size_in_bytes()) <= HALF2_MAX_SMEM
}

/// The output shape of a one-row product with `n` outputs whose input is `head`'s row.
fn head_out_dims(head: &NormHead, n: usize) -> Vec<usize> {
    let mut dims = head.residual.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    dims
}

/// `x · Wᵢᵀ` for 1-3 affine 4-bit weights sharing `x` (q/k/v at batch 1), where `x` is the norm
/// `head` computes, in one launch of the half2 GEMV that runs the norm itself
/// (`qgemv_a4h_norm_*`): `Some((s, ys))`, `s` the residual sum, each `y` bit for bit
/// `cuda::fused_ops::add_rms_norm` followed by [`matmul_group`]; `None` where it does not apply
/// (not one bf16/f16 row, weights the half2 kernel does not take, a norm wider than one block).
pub fn matmul_group_norm_head(
    ws: &[&DeviceLayout],
    head: &NormHead,
) -> Result<Option<(Tensor, Vec<Tensor>)>, QuantError> {
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        ws: &[&DeviceLayout],
        nh: &NormHeadArg,
        dname: &str,
    ) -> Result<Vec<CudaStorage>, QuantError> {
        let w = ws[0];
        // The grouped GEMV's shape (`Variant::pick` on all the rows): the same sums, bit for bit.
        let v = Variant::half2_for(ws.iter().map(|w| w.n).sum());
        // SAFETY: every output element is written by the kernel.
        let ys = ws
            .iter()
            .map(|w| unsafe { dev.alloc::<T>(w.n) })
            .collect::<Result<Vec<_>, _>>()?;
        let stream = dev.cuda_stream();
        let per: Vec<usize> = ws.iter().map(|w| v.blocks(w.n, false)).collect();
        let (total, starts) = super::group_blocks(&per);
        let (group, guards) = QGroup::new(&stream, ws, &ys, starts);
        let smem = half2_norm_smem(w, std::mem::size_of::<T>());
        let name = format!(
            "qgemv_a4h_norm_{dname}_m1_r{}_s{}",
            v.rows_per_warp, v.split
        );
        let f = half2_function(dev, &name, smem)?;
        let cfg = norm_head_launch(dev, &f, total, smem)?;
        let mut b = stream.launch_builder(&f);
        let null = 0u64;
        w.push_args(&mut b, &null);
        let (ni, ki, bi) = (w.n as i32, w.k as i32, total as i32);
        b.arg(&ys[0]).arg(&ni).arg(&ki).arg(&group).arg(nh).arg(&bi);
        // SAFETY: the arguments match `qgemv_a4h_norm_*` in kernels/qgemv_half2.cu (its shared
        // memory opted in, within `HALF2_MAX_SMEM`: `norm_head_fits`); the head's rows hold K
        // values (`NormHead::fits`), output j n_j; the group's weights share the first one's
        // format, K and groups (`same_kernel`).
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        drop(guards);
        Ok(super::storages(ys, dev))
    }
    if !norm_head_fits(ws, head) {
        return Ok(None);
    }
    let dev = cuda_device(head.residual, "norm-head GEMV")?;
    let k = ws[0].k;
    let (ys, s) = match head.residual.dtype() {
        DType::BF16 => {
            head.run::<half::bf16, _>(dev, k, |nh| go::<half::bf16>(dev, ws, nh, "bf16"))?
        }
        _ => head.run::<half::f16, _>(dev, k, |nh| go::<half::f16>(dev, ws, nh, "f16"))?,
    };
    let ys = ys
        .into_iter()
        .zip(ws)
        .map(|(y, w)| tensor_from_storage(y, head_out_dims(head, w.n)))
        .collect();
    Ok(Some((s, ys)))
}

/// [`matmul_silu_mul`] whose input is the norm `head` computes, in one launch
/// (`qgemv_a4h_silu_norm_*`): `Some((s, SiLU(x · gateᵀ) * (x · upᵀ)))`, bit for bit
/// `cuda::fused_ops::add_rms_norm` followed by [`matmul_silu_mul`]; `None` where it does not
/// apply (as [`matmul_group_norm_head`], or gate and up of different row counts).
pub fn matmul_silu_mul_norm_head(
    gate: &DeviceLayout,
    up: &DeviceLayout,
    head: &NormHead,
) -> Result<Option<(Tensor, Tensor)>, QuantError> {
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        gate: &DeviceLayout,
        up: &DeviceLayout,
        up_zeros: &CudaSlice<f32>,
        nh: &NormHeadArg,
        dname: &str,
    ) -> Result<CudaStorage, QuantError> {
        let (n, k) = (gate.n, gate.k);
        let v = Variant::half2_for(n);
        // SAFETY: every output element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let smem = half2_norm_smem(gate, std::mem::size_of::<T>());
        let name = format!(
            "qgemv_a4h_silu_norm_{dname}_m1_r{}_s{}",
            v.rows_per_warp, v.split
        );
        let f = half2_function(dev, &name, smem)?;
        let blocks = v.blocks(n, true);
        let cfg = norm_head_launch(dev, &f, blocks, smem)?;
        let mut b = stream.launch_builder(&f);
        let null = 0u64;
        gate.push_args(&mut b, &null);
        let (ni, ki, bi) = (n as i32, k as i32, blocks as i32);
        b.arg(&up.codes)
            .arg(&up.scales)
            .arg(up_zeros)
            .arg(&y)
            .arg(&ni)
            .arg(&ki)
            .arg(nh)
            .arg(&bi);
        // SAFETY: the arguments match `qgemv_a4h_silu_norm_*` in kernels/qgemv_half2.cu (its
        // shared memory opted in, within `HALF2_MAX_SMEM`); the head's rows hold K values, gate
        // and up n x k of one format, K and groups (checked by the caller).
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let Some(up_zeros) = &up.zeros else {
        return Ok(None);
    };
    if gate.n != up.n || !norm_head_fits(&[gate, up], head) {
        return Ok(None);
    }
    let dev = cuda_device(head.residual, "norm-head gate/up GEMV")?;
    let (y, s) = match head.residual.dtype() {
        DType::BF16 => head.run::<half::bf16, _>(dev, gate.k, |nh| {
            go::<half::bf16>(dev, gate, up, up_zeros, nh, "bf16")
        })?,
        _ => head.run::<half::f16, _>(dev, gate.k, |nh| {
            go::<half::f16>(dev, gate, up, up_zeros, nh, "f16")
        })?,
    };
    Ok(Some((
        s,
        tensor_from_storage(y, head_out_dims(head, gate.n)),
    )))
}

/// Whether `a` and `b` can share one launch on the same input: same packed format, K, groups,
/// rounding and code table, and the same act-order column order or none (a GPTQ checkpoint's
/// q/k/v or gate/up, quantized on one input's Hessian, share theirs: x is gathered once).
pub(super) fn same_kernel(a: &DeviceLayout, b: &DeviceLayout) -> bool {
    a.tag == b.tag
        && a.k == b.k
        && a.gsize == b.gsize
        && a.groups == b.groups
        && a.round_mode == b.round_mode
        && a.lut_host == b.lut_host
        && a.perm_host == b.perm_host
}

/// `x · Wᵢᵀ` for 2 or 3 weights sharing `x` (q/k/v, gate/up) in one launch, when the automatic
/// path of each would be the GEMV (one row, two for 8-bit codes, up to 8 for the other formats)
/// or the tiled tensor-core kernel (2-, 3-, 4- and 8-bit codes, 2-64 rows, to 128 on large
/// weights) or the wgmma kernel (4-bit codes on Hopper, from 17 or 33 rows by size: the
/// activations rewritten once for all the weights) and they can share a kernel
/// ([`same_kernel`]: act-order weights of one column order too, x gathered once); `None`
/// otherwise (the caller runs one matmul per weight). Decode at batch 1 is launch-bound on the small
/// projections: on an H100 one launch for Llama-3-8B's q, k and v measured 11.4 us against 8.6 +
/// 4.7 + 4.7 apart; at batch 32 the tiled kernel fills the GPU with the group's
/// blocks where the k/v projections alone leave most SMs idle.
pub fn matmul_group(ws: &[&DeviceLayout], x: &Tensor) -> Result<Option<Vec<Tensor>>, QuantError> {
    let Some(&w) = ws.first() else {
        return Ok(Some(Vec::new()));
    };
    if !(2..=3).contains(&ws.len()) || !ws.iter().all(|o| same_kernel(w, o)) {
        return Ok(None);
    }
    let dev = cuda_device(x, "grouped quantized matmul")?;
    let k = w.k;
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) || !matches!(x.dtype(), DType::BF16 | DType::F16 | DType::F32) {
        return Ok(None);
    }
    let m = x.elem_count() / k.max(1);
    if m == 0 {
        return Ok(None);
    }
    let route = group_route(ws, m, x.dtype(), dev);
    if tiled_apart(ws, m, &route) {
        return Ok(None);
    }
    // Act-order (one column order for all: `same_kernel`): x's columns gathered once.
    let x2 = || in_packed_order(w, x.reshape((m, k))?);
    let ys = match route {
        Route::Gemv(v) => gemv(dev, ws, &x2()?, m, v)?,
        Route::MmaTiled { fold } => qmma_tiled::matmul_group(dev, ws, &x2()?, m, fold)?,
        Route::Wgmma => qwgmma::matmul_group(dev, ws, &x2()?, m)?,
        Route::Mma | Route::Dequantize => return Ok(None),
    };
    let mut out = Vec::with_capacity(ys.len());
    for (y, w) in ys.into_iter().zip(ws) {
        let mut d = dims.clone();
        *d.last_mut().expect("rank >= 1") = w.n;
        out.push(y.reshape(d)?);
    }
    Ok(Some(out))
}

static WIDE_GROUPS_APART: AtomicBool = AtomicBool::new(true);

/// Lets [`matmul_group`] run gate/up-sized 4-bit weights at the tiled kernel's rows one launch
/// each ([`tiled_apart`]; on by default), or keeps them in one grouped launch (the routing
/// before): `lorq bench decode --compare-tiled-groups` measures what it brings.
pub fn set_wide_groups_apart(on: bool) {
    WIDE_GROUPS_APART.store(on, Ordering::Relaxed);
}

/// Whether a group the tiled kernel would take (`route`) runs one launch per weight: each of its
/// 4-bit weights has 32 Mi codes or more (an 8B model's gate/up), where each weight's own block
/// shape (`c4` / `c5`, the K split) beats the group's 128-row blocks, which never split K; table
/// codes (NF4, FP4) from 9 rows only. H200, session 37 (GPU time, Llama-3-8B gate+up, one launch
/// against the two weights' own): GPTQ at 4 / 8 / 12 / 16 rows 40.1 / 42.2 / 48.8 / 50.1 us
/// against 36.2 / 37.0 / 45.3 / 45.4, act-order 41.6 / 43.8 / 50.5 / 51.8 against 38.9 / 40.1 /
/// 48.5 / 49.0, HQQ 4-bit 41.6 / 44.9 / 55.1 / 55.5 against 40.1 / 41.1 / 46.5 / 46.6, NF4 49.0 /
/// 50.3 / 60.3 / 63.9 against 52.6 / 52.6 / 58.4 / 58.8; q+k+v (one weight below 32 Mi) and 8-bit
/// gate+up (48.1-58.6 against 58.5-64.5) stay one launch.
fn tiled_apart(ws: &[&DeviceLayout], m: usize, route: &Route) -> bool {
    let w = ws[0];
    matches!(route, Route::MmaTiled { .. })
        && WIDE_GROUPS_APART.load(Ordering::Relaxed)
        && (w.tag == "a4" || (w.tag == "t4" && m > 8))
        && ws.iter().all(|w| w.n * w.k >= AUTO_TILED_WIDE_CODES)
}

/// The automatic route of a group sharing `x` (`ws` non-empty): by the group's total rows.
/// Grouped where it is the GEMV or the tiled kernel (one launch), or the wgmma kernel (one
/// activation pass, one launch per weight).
fn group_route(ws: &[&DeviceLayout], m: usize, dtype: DType, dev: &CudaDevice) -> Route {
    let w = ws[0];
    let n: usize = ws.iter().map(|w| w.n).sum();
    auto_route(w, n, m, dtype, true, || qwgmma::supports(w, dev))
}

/// The kernel [`matmul_group`] runs `ws` (weights that can share a launch) through at `m` rows
/// of `dtype`, as the path that runs one of them alone through it; `None` where the group is not
/// one launch (the caller runs one matmul per weight).
pub fn group_path(ws: &[&DeviceLayout], m: usize, dtype: DType, dev: &CudaDevice) -> Option<QPath> {
    if ws.is_empty() {
        return None;
    }
    let route = group_route(ws, m, dtype, dev);
    if tiled_apart(ws, m, &route) {
        return None;
    }
    match route {
        Route::Gemv(v) => Some(QPath::Fused(v)),
        Route::MmaTiled { fold: true } => Some(QPath::MmaTiled),
        Route::MmaTiled { fold: false } => Some(QPath::MmaTiledPerWeight),
        Route::Wgmma => Some(QPath::Wgmma),
        Route::Mma | Route::Dequantize => None,
    }
}

/// Activation rows per tensor-core block: 16, 32 or 64 (m tiles of 16).
fn m_tiles(m: usize) -> usize {
    match m {
        0..=16 => 1,
        17..=32 => 2,
        _ => 4,
    }
}

fn mma(dev: &CudaDevice, w: &DeviceLayout, x: &Tensor, m: usize) -> Result<Tensor, QuantError> {
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
        let f = function(
            dev,
            "qgemv",
            FATBIN,
            &format!("qmma_{}_{dname}_t{mt}", w.tag),
        )?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let null = 0u64;
        w.push_args(&mut b, &null);
        let (mi, ni, ki) = (m as i32, n as i32, k as i32);
        b.arg(&xs).arg(&y).arg(&mi).arg(&ni).arg(&ki);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(16) as u32, m.div_ceil(16 * mt) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `qmma_*` in kernels/qgemv.cu (8 warps); x holds m*k
        // elements from a 4-byte-aligned start, y m*n.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    // 32-bit loads of activation pairs: a 4-byte-aligned start.
    let s = super::with_half_input(
        x,
        4,
        "mma",
        |cs, start| go::<half::bf16>(dev, w, cs, start, m, "bf16"),
        |cs, start| go::<half::f16>(dev, w, cs, start, m, "f16"),
    )?;
    Ok(tensor_from_storage(s, (m, w.n)))
}

#[cfg(test)]
mod tests {
    use super::Variant;
    use candle_core::DType;

    #[test]
    fn picks_enough_warps() {
        let bf = DType::BF16;
        let pick = |n, mr, dtype| Variant::pick(n, mr, dtype, false).name();
        assert_eq!(pick(14336, 1, bf), "r4s4");
        assert_eq!(pick(28672, 1, bf), "r4s1");
        assert_eq!(pick(14336, 2, bf), "r4s1");
        assert_eq!(pick(4096, 1, bf), "r4s4");
        assert_eq!(pick(1024, 1, bf), "r4s4");
        assert_eq!(pick(4096, 8, bf), "r1s1");
        assert_eq!(pick(1024, 8, bf), "r1s4");
        assert_eq!(pick(4096, 1, DType::F32), "r1s1");
    }

    #[test]
    fn picks_the_half2_kernel_for_one_or_two_half_precision_rows() {
        let pick = |n, mr, dtype| Variant::pick(n, mr, dtype, true).name();
        assert_eq!(pick(28672, 1, DType::BF16), "half2-r4s2");
        assert_eq!(pick(4096, 1, DType::BF16), "half2-r4s2");
        assert_eq!(pick(4088, 1, DType::BF16), "half2-r4s4");
        assert_eq!(pick(1024, 1, DType::F16), "half2-r4s4");
        assert_eq!(pick(28672, 2, DType::BF16), "half2-r4s2");
        assert_eq!(pick(1024, 2, DType::F16), "half2-r4s4");
        // Four rows per block, or f32 rows: the f32-math kernel.
        assert_eq!(pick(28672, 4, DType::BF16), "r1s1");
        assert_eq!(pick(28672, 1, DType::F32), "r1s1");
    }
}
