//! The [`QuantTensor`] impl of [`Bnb4Tensor`]: a fused row kernel straight from the packed
//! nibbles for few activation rows, dequantize-then-GEMM past that.

use candle_core::{DType, Device, Tensor};

use super::{quantize::dequantize_range, Bnb4Tensor};
use crate::cpu::{dot_f32, fused_or_dequantized_matmul, RowDot};
use crate::{QuantError, QuantTensor};

/// Weight elements dequantized at a time into a stack buffer by the row kernel.
const CHUNK: usize = 256;

impl RowDot for Bnb4Tensor {
    fn rows(&self) -> usize {
        self.shape.0
    }
    fn cols(&self) -> usize {
        self.shape.1
    }
    fn dot_row(&self, j: usize, x: &[f32], out: &mut [f32]) {
        let k = self.shape.1;
        let code = self.quant_type.code();
        #[cfg(target_arch = "x86_64")]
        if k.is_multiple_of(self.blocksize)
            && self.blocksize.is_multiple_of(16)
            && avx512::available()
        {
            // SAFETY: AVX-512F was detected; rows start on block boundaries (k % blocksize == 0),
            // so every 16-element group is 8 whole bytes inside `packed`.
            unsafe {
                avx512::dot_row(
                    &self.packed,
                    &self.scales,
                    self.blocksize,
                    code,
                    j,
                    k,
                    x,
                    out,
                )
            };
            return;
        }
        let mut buf = [0f32; CHUNK];
        out.fill(0.0);
        let mut c0 = 0;
        while c0 < k {
            let len = CHUNK.min(k - c0);
            let w = &mut buf[..len];
            dequantize_range(
                &self.packed,
                &self.scales,
                self.blocksize,
                code,
                j * k + c0,
                w,
            );
            for (o, xr) in out.iter_mut().zip(x.chunks_exact(k)) {
                *o += dot_f32(&xr[c0..c0 + len], w);
            }
            c0 += len;
        }
    }
}

/// The 4-bit row kernel with AVX-512: the 16-entry code table times the block's absmax sits in one
/// register, and `vpermps` turns 16 nibbles into 16 weights in one instruction, so decoding costs
/// a few instructions per 16 weights instead of a scalar lookup per weight.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }

    /// `out[r] = x[r] · W[j]` for every activation row, four rows at a time so that the
    /// accumulators stay in registers (the nibble decode is repeated per group of four rows).
    ///
    /// # Safety
    /// AVX-512F must be available, `k % blocksize == 0`, `blocksize % 16 == 0`, and `packed`,
    /// `scales`, `x` must hold the whole weight, its block scales and `out.len()` rows of `k`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dot_row(
        packed: &[u8],
        scales: &[f32],
        blocksize: usize,
        code: &[f32; 16],
        j: usize,
        k: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        let mut r0 = 0;
        while r0 < out.len() {
            let xs = &x[r0 * k..];
            let o = &mut out[r0..];
            match o.len() {
                1 => rows::<1>(packed, scales, blocksize, code, j, k, xs, o),
                2 => rows::<2>(packed, scales, blocksize, code, j, k, xs, o),
                3 => rows::<3>(packed, scales, blocksize, code, j, k, xs, o),
                _ => rows::<4>(packed, scales, blocksize, code, j, k, xs, o),
            }
            r0 += 4;
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<const R: usize>(
        packed: &[u8],
        scales: &[f32],
        blocksize: usize,
        code: &[f32; 16],
        j: usize,
        k: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        let codev = _mm512_loadu_ps(code.as_ptr());
        // Element 2i is the high nibble of byte i, element 2i+1 the low one: after duplicating
        // each byte into two lanes, even lanes shift right by 4 (vpermps reads the low 4 bits).
        let shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
        let mut acc = [_mm512_setzero_ps(); R];
        let row0 = j * k;
        for blk in 0..k / blocksize {
            let scale = *scales.get_unchecked(row0 / blocksize + blk);
            let lut = _mm512_mul_ps(codev, _mm512_set1_ps(scale));
            for c in 0..blocksize / 16 {
                let col = blk * blocksize + c * 16;
                let bytes =
                    _mm_loadl_epi64(packed.as_ptr().add((row0 + col) / 2) as *const __m128i);
                let idx = _mm512_srlv_epi32(
                    _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes)),
                    shifts,
                );
                let w = _mm512_permutexvar_ps(idx, lut);
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(x.as_ptr().add(r * k + col)), w, *a);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(a);
        }
    }
}

impl Bnb4Tensor {
    /// The fused GPU kernels' layout: 4-bit table codes (nibbles reordered low-first), the
    /// resolved absmax of each block as its scale. Needs blocks inside rows.
    pub(crate) fn packed_gpu_layout(
        &self,
    ) -> Result<crate::gpu_layout::GpuLayout, crate::QuantError> {
        use crate::gpu_layout::{CodeKind, ElementRounding, GpuLayout};
        let (n, k) = self.shape;
        let packed = self.packed();
        GpuLayout::pack(
            n,
            k,
            CodeKind::Table {
                bits: 4,
                lut: self.quant_type().code().to_vec(),
            },
            self.blocksize(),
            self.block_scales().to_vec(),
            Vec::new(),
            ElementRounding::None,
            None,
            |r, c| {
                let e = r * k + c;
                let b = packed[e / 2] as u32;
                if e % 2 == 0 {
                    b >> 4
                } else {
                    b & 15
                }
            },
        )
    }
}

impl QuantTensor for Bnb4Tensor {
    fn gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        self.packed_gpu_layout()
    }

    fn shape(&self) -> (usize, usize) {
        self.shape
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            // The packed layout (absmax resolved to f32 per block; measured faster on an H100
            // than reading bitsandbytes' own layout, double quantization included);
            // bitsandbytes' layout through its own kernels where the packed one cannot go
            // (in_features % 32 != 0).
            if let Some(y) = crate::gpu_slot::gpu_matmul(&self.packed_gpu, x, "bnb4", || {
                self.packed_gpu_layout()
            })? {
                return Ok(y);
            }
            return crate::cuda::bnb4::matmul(self, x, crate::cuda::bnb4::Bnb4Path::Auto);
        }
        fused_or_dequantized_matmul(self, x, &self.format_name(), || self.dequantize(DType::F32))
    }

    #[cfg(feature = "cuda")]
    fn gpu_packed(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<Option<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>, QuantError> {
        crate::gpu_slot::gpu_packed(&self.packed_gpu, dev, "bnb4", || self.packed_gpu_layout())
    }

    fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError> {
        let w = Tensor::from_vec(self.dequantize_f32(), self.shape, &Device::Cpu)?;
        Ok(w.to_dtype(dtype)?)
    }

    fn matmul_grad_input(&self, dy: &Tensor) -> Result<Tensor, QuantError> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = dy.device() {
            let w = crate::cuda::bnb4::dequantize(self, dev, dy.dtype())?;
            return Ok(dy.matmul(&w)?);
        }
        crate::quant_tensor::host_matmul_grad_input(self, dy)
    }

    fn bytes(&self) -> usize {
        let absmax = match &self.absmax {
            super::Absmax::F32(a) => 4 * a.len(),
            super::Absmax::Nested(n) => {
                n.codes.len() + 4 * n.nested_absmax.len() + 4 * n.code.len() + 4
            }
        };
        self.packed.len() + absmax + 4 * 16
    }

    fn format_name(&self) -> String {
        let dq = if self.double_quant() { "+dq" } else { "" };
        format!("{}{dq}", self.quant_type.name())
    }

    fn state_dict(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, crate::raw_tensor::RawTensor)>, QuantError> {
        crate::quant_tensor::raw_state_dict(self.to_state_dict(prefix)?)
    }
}
