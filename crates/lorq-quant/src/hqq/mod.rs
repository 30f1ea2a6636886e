//! HQQ (half-quadratic quantization) as hqq 0.2.8 does it: `hqq-4bit`, `hqq-3bit`, `hqq-2bit`.
//!
//! The weight `[out, in]` is flattened row-major and regrouped into hqq's grid: axis 1 (the
//! default) `[numel/gs, gs]`, one group per grid row, contiguous along in_features; axis 0
//! `[gs, numel/gs]`, one group per grid column. Each group has a scale and a (float) zero, stored as
//! hqq stores them: `W ≈ (code − zero) · scale`. Codes are bit-packed along the grid's rows
//! ([`bitpack`]); the zero point is tuned by hqq's proximal optimizer ([`optimize`]).

pub mod bitpack;
mod kernel;
pub mod optimize;
mod state_dict;

use candle_core::{DType, Device, Tensor};

use crate::{QuantError, QuantTensor};
pub use bitpack::{PackedCodes, Packing};
pub use optimize::ProximalParams;

/// `weight_quant_params` of hqq's `BaseQuantizeConfig`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HqqConfig {
    pub nbits: u32,
    pub group_size: usize,
    /// 1: groups along in_features (default); 0: hqq's strided axis-0 grouping.
    pub axis: usize,
    pub round_zero: bool,
    pub optimize: bool,
}

impl HqqConfig {
    /// `BaseQuantizeConfig(nbits, group_size)`: axis 1, optimize, round_zero only for 4 bits.
    pub fn new(nbits: u32, group_size: usize) -> Self {
        Self {
            nbits,
            group_size,
            axis: 1,
            round_zero: nbits == 4,
            optimize: true,
        }
    }

    /// LoRAX's settings for `hqq-4bit` (group 64), `hqq-3bit` (64) and `hqq-2bit` (16).
    pub fn lorax(method: &str) -> Option<Self> {
        match method {
            "hqq-4bit" => Some(Self::new(4, 64)),
            "hqq-3bit" => Some(Self::new(3, 64)),
            "hqq-2bit" => Some(Self::new(2, 16)),
            _ => None,
        }
    }
}

/// The dtype hqq dequantizes in (`compute_dtype`); scale and zero are stored in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    F16,
    BF16,
}

impl ComputeDtype {
    pub fn torch_name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "torch.float32",
            ComputeDtype::F16 => "torch.float16",
            ComputeDtype::BF16 => "torch.bfloat16",
        }
    }

    pub fn from_torch_name(s: &str) -> Option<Self> {
        [ComputeDtype::F32, ComputeDtype::F16, ComputeDtype::BF16]
            .into_iter()
            .find(|c| c.torch_name() == s)
    }

    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::F16 => DType::F16,
            ComputeDtype::BF16 => DType::BF16,
        }
    }

    /// Rounds an f32 to this dtype (identity for f32).
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            ComputeDtype::F32 => x,
            ComputeDtype::F16 => half::f16::from_f32(x).to_f32(),
            ComputeDtype::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// An HQQ-quantized weight.
#[derive(Debug, Clone)]
pub struct HqqTensor {
    cfg: HqqConfig,
    shape: (usize, usize),
    packing: Packing,
    packed: PackedCodes,
    /// hqq's grid `[rows, cols]`.
    grid: (usize, usize),
    /// Packed rows.
    prow: usize,
    scale: Vec<f32>,
    zero: Vec<f32>,
    compute: ComputeDtype,
    /// GPU copies (fused CUDA kernels), made on first use.
    gpu: crate::gpu_slot::GpuSlot,
}

/// hqq's grid `[rows, cols]` for a weight of `numel` elements.
fn grid_shape(numel: usize, gs: usize, axis: usize) -> (usize, usize) {
    if axis == 1 {
        (numel / gs, gs)
    } else {
        (gs, numel / gs)
    }
}

impl HqqTensor {
    /// Quantizes `weight` `[out, in]` (any float dtype) as `Quantizer.quantize(..., bitpack=True)`.
    pub fn quantize(weight: &Tensor, cfg: &HqqConfig) -> Result<Self, QuantError> {
        Self::quantize_with(weight, cfg, ProximalParams::default())
    }

    /// [`HqqTensor::quantize`] with explicit optimizer settings.
    pub fn quantize_with(
        weight: &Tensor,
        cfg: &HqqConfig,
        params: ProximalParams,
    ) -> Result<Self, QuantError> {
        if weight.rank() != 2 {
            return Err(QuantError::Invalid(format!(
                "hqq: a linear weight must be 2-D, got {:?}",
                weight.dims()
            )));
        }
        let (out, inp) = weight.dims2()?;
        let numel = out * inp;
        let gs = cfg.group_size;
        if cfg.axis > 1 || numel.checked_rem(gs) != Some(0) {
            return Err(QuantError::Invalid(format!(
                "hqq: group_size {gs} must divide the weight's {numel} elements (axis {}, must be 0 or 1)",
                cfg.axis
            )));
        }
        let packing = Packing::for_nbits(cfg.nbits)?;
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (rows, cols) = grid_shape(numel, gs, cfg.axis);
        packing.packed_rows(rows)?;
        let opt = cfg.optimize.then_some(params);
        let (codes, q) = if cfg.axis == 1 {
            let mut q = optimize::quantize_groups(&w, gs, cfg.nbits, cfg.round_zero, opt);
            (std::mem::take(&mut q.codes), q)
        } else {
            // Groups are grid columns: gather them contiguously, quantize, scatter the codes back.
            let mut t = vec![0f32; numel];
            for i in 0..rows {
                for j in 0..cols {
                    t[j * rows + i] = w[i * cols + j];
                }
            }
            let q = optimize::quantize_groups(&t, gs, cfg.nbits, cfg.round_zero, opt);
            let mut codes = vec![0u8; numel];
            for i in 0..rows {
                for j in 0..cols {
                    codes[i * cols + j] = q.codes[j * rows + i];
                }
            }
            (codes, q)
        };
        let packed = bitpack::pack(packing, &codes, rows, cols)?;
        Self::from_parts(
            (out, inp),
            *cfg,
            packing,
            packed,
            q.scale,
            q.zero,
            ComputeDtype::F32,
        )
    }

    /// Assembles a tensor from its stored parts, checking every size.
    pub fn from_parts(
        shape: (usize, usize),
        cfg: HqqConfig,
        packing: Packing,
        packed: PackedCodes,
        scale: Vec<f32>,
        zero: Vec<f32>,
        compute: ComputeDtype,
    ) -> Result<Self, QuantError> {
        let numel = shape.0 * shape.1;
        let gs = cfg.group_size;
        if cfg.axis > 1 || numel.checked_rem(gs) != Some(0) {
            return Err(QuantError::Invalid(format!(
                "hqq: group_size {gs} / axis {} do not fit a weight of shape {shape:?}",
                cfg.axis
            )));
        }
        let grid = grid_shape(numel, gs, cfg.axis);
        let prow = packing.packed_rows(grid.0)?;
        let want = prow * grid.1;
        let (got, ok_kind) = match (&packed, packing) {
            (PackedCodes::I32(v), Packing::Bit3I32) => (v.len(), true),
            (PackedCodes::U8(v), p) => (v.len(), p != Packing::Bit3I32),
            (PackedCodes::I32(v), _) => (v.len(), false),
        };
        if !ok_kind || got != want {
            return Err(QuantError::Invalid(format!(
                "hqq: W_q holds {got} elements, expected [{prow}, {}] for {} packing of {shape:?} with group_size {gs}",
                grid.1,
                packing.name()
            )));
        }
        let n_groups = numel / gs;
        if scale.len() != n_groups || zero.len() != n_groups {
            return Err(QuantError::Invalid(format!(
                "hqq: scale/zero hold {}/{} values, expected {n_groups} (one per group)",
                scale.len(),
                zero.len()
            )));
        }
        if packing.bits() < cfg.nbits {
            return Err(QuantError::Invalid(format!(
                "hqq: {} packing cannot hold {}-bit codes",
                packing.name(),
                cfg.nbits
            )));
        }
        Ok(Self {
            gpu: Default::default(),
            cfg,
            shape,
            packing,
            packed,
            grid,
            prow,
            scale,
            zero,
            compute,
        })
    }

    pub fn config(&self) -> &HqqConfig {
        &self.cfg
    }
    pub fn packing(&self) -> Packing {
        self.packing
    }
    pub fn packed(&self) -> &PackedCodes {
        &self.packed
    }
    /// hqq's grid `[rows, cols]` (the unpacked `W_q` shape).
    pub fn grid_shape(&self) -> (usize, usize) {
        self.grid
    }
    /// Packed `W_q` shape `[packed_rows, cols]`.
    pub fn packed_shape(&self) -> (usize, usize) {
        (self.prow, self.grid.1)
    }
    /// Per-group scale (hqq's stored, inverted scale).
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }
    pub fn zero(&self) -> &[f32] {
        &self.zero
    }
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.compute
    }
    /// Sets the dtype scale/zero are kept and dequantized in (rounds them to it).
    pub fn set_compute_dtype(&mut self, c: ComputeDtype) {
        self.compute = c;
        for v in self.scale.iter_mut().chain(self.zero.iter_mut()) {
            *v = c.round(*v);
        }
    }
    /// The unpacked codes in hqq's grid layout `[rows, cols]`.
    pub fn codes(&self) -> Vec<u8> {
        bitpack::unpack(self.packing, &self.packed, self.grid.0, self.grid.1)
            .expect("validated at construction")
    }
    /// The dequantized weight, `[out, in]` row-major, equal to `Quantizer.dequantize`.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.shape.0 * self.shape.1];
        self.fill(0, &mut w);
        w
    }
}

impl QuantTensor for HqqTensor {
    fn gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        self.packed_gpu_layout()
    }

    fn shape(&self) -> (usize, usize) {
        self.shape
    }

    fn matmul_grad_input(&self, dy: &Tensor) -> Result<Tensor, QuantError> {
        if let Some(g) = crate::gpu_slot::gpu_matmul_grad_input(&self.gpu, dy, "hqq", || {
            self.packed_gpu_layout()
        })? {
            return Ok(g);
        }
        crate::quant_tensor::host_matmul_grad_input(self, dy)
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError> {
        if let Some(y) =
            crate::gpu_slot::gpu_matmul(&self.gpu, x, "hqq", || self.packed_gpu_layout())?
        {
            return Ok(y);
        }
        crate::cpu::fused_or_dequantized_matmul(&kernel::HqqRows(self), x, "hqq", || {
            self.dequantize(DType::F32)
        })
    }

    #[cfg(feature = "cuda")]
    fn gpu_packed(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<Option<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>, QuantError> {
        crate::gpu_slot::gpu_packed(&self.gpu, dev, "hqq", || self.packed_gpu_layout())
    }

    fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError> {
        Ok(Tensor::from_vec(self.dequantize_f32(), self.shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    fn bytes(&self) -> usize {
        let per = self.compute.dtype().size_in_bytes();
        self.packed.byte_len() + (self.scale.len() + self.zero.len()) * per
    }

    fn format_name(&self) -> String {
        format!("hqq-{}bit", self.cfg.nbits)
    }

    fn state_dict(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, crate::raw_tensor::RawTensor)>, QuantError> {
        crate::quant_tensor::raw_state_dict(self.to_state_dict(prefix)?)
    }
}
