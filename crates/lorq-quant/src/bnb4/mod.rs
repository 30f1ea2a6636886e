//! bitsandbytes 4-bit weights (NF4 and FP4, optionally double-quantized), bit-compatible with
//! bitsandbytes 0.50 and with the checkpoints transformers writes for `load_in_4bit`.
//!
//! Layout (bitsandbytes' own): the weight `[out, in]` is flattened row-major and cut into blocks
//! of `blocksize` (64) elements, each with an f32 absmax; every element is a 4-bit index into the
//! NF4 or FP4 table, two per byte, element `2i` in the high nibble. With double quantization the
//! absmax are themselves stored as 8-bit codes (see [`double_quant`]).
//!
//! - [`codes`]: the NF4/FP4 tables and the dynamic 8-bit map.
//! - [`quantize`]: blockwise quantize/dequantize on flat f32 data.
//! - [`double_quant`]: the nested absmax.
//! - `kernel`: the [`QuantTensor`](crate::QuantTensor) impl with the fused row kernel.
//! - `state_dict`: the HF/transformers tensor names and the `quantization_config`.

pub mod codes;
pub mod double_quant;
mod kernel;
pub mod quantize;
mod state_dict;

use candle_core::{DType, Tensor};

pub use double_quant::NestedAbsmax;
pub use state_dict::quantization_config_4bit;

use crate::QuantError;

/// bitsandbytes' default (and transformers') 4-bit block size.
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// The 4-bit table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bnb4Type {
    Nf4,
    Fp4,
}

impl Bnb4Type {
    /// `nf4` / `fp4`, as bitsandbytes spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(Self::Nf4),
            "fp4" => Some(Self::Fp4),
            _ => None,
        }
    }

    /// The 16 values the 4-bit codes index, in [-1, 1].
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            Self::Nf4 => &codes::NF4_CODE,
            Self::Fp4 => codes::fp4_code(),
        }
    }
}

/// The per-block absmax: plain f32, or 8-bit compressed (double quantization).
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    Nested(NestedAbsmax),
}

/// A bitsandbytes 4-bit weight `[out, in]`.
#[derive(Debug, Clone)]
pub struct Bnb4Tensor {
    quant_type: Bnb4Type,
    blocksize: usize,
    shape: (usize, usize),
    /// The dtype of the weight before quantization (the quant state's `dtype`).
    dtype: DType,
    packed: Vec<u8>,
    absmax: Absmax,
    /// The f32 absmax of every block (dequantized when nested): what the kernels multiply by.
    scales: Vec<f32>,
    /// Device copies for the CUDA kernels, uploaded on first use.
    #[cfg(feature = "cuda")]
    gpu: crate::cuda::GpuCache<crate::cuda::bnb4::Bnb4Gpu>,
    /// Device copies in the packed layout (the tensor-core kernel for several rows).
    #[cfg(feature = "cuda")]
    packed_gpu: crate::gpu_slot::GpuSlot,
}

impl Bnb4Tensor {
    /// Quantize a 2-D f32/f16/bf16 weight `[out, in]` exactly as `bitsandbytes.functional.quantize_4bit`
    /// with blocksize 64 (`double_quant` = `compress_statistics`).
    pub fn quantize(
        weight: &Tensor,
        quant_type: Bnb4Type,
        double_quant: bool,
    ) -> Result<Self, QuantError> {
        Self::quantize_with_blocksize(weight, quant_type, double_quant, DEFAULT_BLOCKSIZE)
    }

    pub fn quantize_with_blocksize(
        weight: &Tensor,
        quant_type: Bnb4Type,
        double_quant: bool,
        blocksize: usize,
    ) -> Result<Self, QuantError> {
        let dims = weight.dims();
        if dims.len() != 2 {
            return Err(QuantError::Invalid(format!(
                "{}: a linear weight must be 2-D [out, in], got shape {dims:?}",
                quant_type.name()
            )));
        }
        let dtype = weight.dtype();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(QuantError::Invalid(format!(
                "{}: weights must be f32, f16 or bf16, got {dtype:?}",
                quant_type.name()
            )));
        }
        check_blocksize(blocksize)?;
        let x: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (packed, absmax) = quantize::quantize_4bit(&x, blocksize, quant_type);
        let absmax = if double_quant {
            Absmax::Nested(NestedAbsmax::quantize(&absmax))
        } else {
            Absmax::F32(absmax)
        };
        Self::from_parts(
            quant_type,
            blocksize,
            (dims[0], dims[1]),
            dtype,
            packed,
            absmax,
        )
    }

    /// Assemble from stored parts (checked for consistent sizes).
    pub fn from_parts(
        quant_type: Bnb4Type,
        blocksize: usize,
        shape: (usize, usize),
        dtype: DType,
        packed: Vec<u8>,
        absmax: Absmax,
    ) -> Result<Self, QuantError> {
        check_blocksize(blocksize)?;
        let n = shape.0 * shape.1;
        if packed.len() != n.div_ceil(2) {
            return Err(QuantError::Invalid(format!(
                "packed 4-bit weight: expected {} bytes for shape {shape:?}, got {}",
                n.div_ceil(2),
                packed.len()
            )));
        }
        let blocks = n.div_ceil(blocksize);
        let scales = match &absmax {
            Absmax::F32(a) => a.clone(),
            Absmax::Nested(nest) => {
                nest.validate("absmax")?;
                nest.dequantize()
            }
        };
        if scales.len() != blocks {
            return Err(QuantError::Invalid(format!(
                "absmax: expected {blocks} values (blocks of {blocksize} over {n} elements), got {}",
                scales.len()
            )));
        }
        Ok(Self {
            quant_type,
            blocksize,
            shape,
            dtype,
            packed,
            absmax,
            scales,
            #[cfg(feature = "cuda")]
            gpu: Default::default(),
            #[cfg(feature = "cuda")]
            packed_gpu: Default::default(),
        })
    }

    pub fn quant_type(&self) -> Bnb4Type {
        self.quant_type
    }
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }
    /// The dtype of the weight before quantization.
    pub fn orig_dtype(&self) -> DType {
        self.dtype
    }
    /// Packed nibbles, `(numel + 1) / 2` bytes.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }
    pub fn double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Nested(_))
    }
    /// The f32 absmax of every block, after undoing double quantization.
    pub fn block_scales(&self) -> &[f32] {
        &self.scales
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn gpu_cache(&self) -> &crate::cuda::GpuCache<crate::cuda::bnb4::Bnb4Gpu> {
        &self.gpu
    }

    /// The dequantized weight as flat f32 (bitsandbytes' values before the cast to a dtype).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.shape.0 * self.shape.1];
        quantize::dequantize_range(
            &self.packed,
            &self.scales,
            self.blocksize,
            self.quant_type.code(),
            0,
            &mut out,
        );
        out
    }
}

fn check_blocksize(blocksize: usize) -> Result<(), QuantError> {
    if !(blocksize.is_power_of_two() && (32..=4096).contains(&blocksize)) {
        return Err(QuantError::Invalid(format!(
            "4-bit blocksize must be a power of two in 32..=4096, got {blocksize}"
        )));
    }
    Ok(())
}
