//! EETQ-style int8 weights: per-output-channel symmetric int8, weight-only (activations stay in
//! their own precision; the kernel dequantizes on the fly).
//!
//! No EETQ reference library can be installed, and EETQ's own CUDA layout (column-interleaved
//! for its GEMM, f16 scales) is a kernel detail, so lorq defines the stored layout, for a
//! module prefix `P`:
//!
//! | name | dtype, shape | meaning |
//! | --- | --- | --- |
//! | `P.weight` | I8 `[out, in]` row-major | `q = round_half_even(w * (127 / absmax_row))`, in -127..=127 |
//! | `P.weight_scale` | F32 `[out]` | `absmax_row / 127` (0 for an all-zero row, whose codes are 0) |
//!
//! Dequantized: `w = q * scale` (f32). `config.json` carries [`quantization_config_eetq`]. The
//! absmax is taken over the weight as given (f32/f16/bf16 values, computed in f32).

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::cpu::{dot_f32, RowDot};
use crate::int8::{read_row_scaled_i8, round_i8};
use crate::raw_tensor::RawTensor;
use crate::{QuantError, QuantTensor};

/// A per-output-channel symmetric int8 weight `[out, in]`.
#[derive(Debug, Clone)]
pub struct EetqTensor {
    q: Vec<i8>,
    scale: Vec<f32>,
    shape: (usize, usize),
    /// GPU copies (fused CUDA kernels), made on first use.
    gpu: crate::gpu_slot::GpuSlot,
}

impl EetqTensor {
    /// Quantize a 2-D f32/f16/bf16 weight.
    pub fn quantize(weight: &Tensor) -> Result<Self, QuantError> {
        let dims = weight.dims();
        if dims.len() != 2 {
            return Err(QuantError::Invalid(format!(
                "eetq: a linear weight must be 2-D [out, in], got shape {dims:?}"
            )));
        }
        let (n, k) = (dims[0], dims[1]);
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut q = vec![0i8; n * k];
        let mut scale = vec![0f32; n];
        if k > 0 {
            for (j, (row, qr)) in w.chunks_exact(k).zip(q.chunks_exact_mut(k)).enumerate() {
                let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                scale[j] = amax / 127.0;
                if amax > 0.0 {
                    let r = 127.0 / amax;
                    for (o, &v) in qr.iter_mut().zip(row) {
                        *o = round_i8(v * r).max(-127);
                    }
                }
            }
        }
        Self::from_parts(q, scale, (n, k))
    }

    pub fn from_parts(
        q: Vec<i8>,
        scale: Vec<f32>,
        shape: (usize, usize),
    ) -> Result<Self, QuantError> {
        if q.len() != shape.0 * shape.1 || scale.len() != shape.0 {
            return Err(QuantError::Invalid(format!(
                "eetq: {} codes and {} scales do not fit shape {shape:?}",
                q.len(),
                scale.len()
            )));
        }
        Ok(Self {
            q,
            scale,
            shape,
            gpu: Default::default(),
        })
    }

    pub fn codes(&self) -> &[i8] {
        &self.q
    }
    pub fn scales(&self) -> &[f32] {
        &self.scale
    }

    /// `P.weight` (I8 `[out, in]`) and `P.weight_scale` (F32 `[out]`).
    pub fn to_state_dict(&self, prefix: &str) -> Vec<(String, RawTensor)> {
        let (n, k) = self.shape;
        vec![
            (
                format!("{prefix}.weight"),
                RawTensor::from_i8(&[n, k], &self.q),
            ),
            (
                format!("{prefix}.weight_scale"),
                RawTensor::from_f32(&[n], &self.scale),
            ),
        ]
    }

    pub fn from_state_dict(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<RawTensor>,
    ) -> Result<Self, QuantError> {
        let w = read_row_scaled_i8(prefix, "weight_scale", get)?;
        Self::from_parts(w.codes, w.scale, w.shape)
    }
}

const CHUNK: usize = 256;

impl RowDot for EetqTensor {
    fn rows(&self) -> usize {
        self.shape.0
    }
    fn cols(&self) -> usize {
        self.shape.1
    }
    fn dot_row(&self, j: usize, x: &[f32], out: &mut [f32]) {
        let k = self.shape.1;
        let row = &self.q[j * k..(j + 1) * k];
        let mut buf = [0f32; CHUNK];
        out.fill(0.0);
        for (c, qs) in row.chunks(CHUNK).enumerate() {
            let w = &mut buf[..qs.len()];
            for (b, &v) in w.iter_mut().zip(qs) {
                *b = v as f32;
            }
            let c0 = c * CHUNK;
            for (o, xr) in out.iter_mut().zip(x.chunks_exact(k)) {
                *o += dot_f32(&xr[c0..c0 + qs.len()], w);
            }
        }
        for o in out.iter_mut() {
            *o *= self.scale[j];
        }
    }
}

impl EetqTensor {
    /// The fused GPU kernels' layout: 8-bit affine codes `q + 128`, zero 128, one group per row.
    pub(crate) fn packed_gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        use crate::gpu_layout::{CodeKind, ElementRounding, GpuLayout};
        let (n, k) = self.shape;
        GpuLayout::pack(
            n,
            k,
            CodeKind::Affine { bits: 8 },
            k,
            self.scale.clone(),
            vec![128.0; n],
            ElementRounding::None,
            None,
            |r, c| (self.q[r * k + c] as i32 + 128) as u32,
        )
    }
}

impl QuantTensor for EetqTensor {
    fn gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        self.packed_gpu_layout()
    }

    fn shape(&self) -> (usize, usize) {
        self.shape
    }

    fn matmul_grad_input(&self, dy: &Tensor) -> Result<Tensor, QuantError> {
        if let Some(g) = crate::gpu_slot::gpu_matmul_grad_input(&self.gpu, dy, "eetq", || {
            self.packed_gpu_layout()
        })? {
            return Ok(g);
        }
        crate::quant_tensor::host_matmul_grad_input(self, dy)
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError> {
        if let Some(y) =
            crate::gpu_slot::gpu_matmul(&self.gpu, x, "eetq", || self.packed_gpu_layout())?
        {
            return Ok(y);
        }
        crate::cpu::fused_or_dequantized_matmul(self, x, "eetq", || self.dequantize(DType::F32))
    }

    #[cfg(feature = "cuda")]
    fn gpu_packed(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<Option<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>, QuantError> {
        crate::gpu_slot::gpu_packed(&self.gpu, dev, "eetq", || self.packed_gpu_layout())
    }

    fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError> {
        let k = self.shape.1.max(1);
        let w: Vec<f32> = self
            .q
            .iter()
            .enumerate()
            .map(|(e, &v)| v as f32 * self.scale[e / k])
            .collect();
        Ok(Tensor::from_vec(w, self.shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scale.len()
    }

    fn format_name(&self) -> String {
        "eetq".into()
    }

    fn state_dict(&self, prefix: &str) -> Result<Vec<(String, RawTensor)>, QuantError> {
        Ok(self.to_state_dict(prefix))
    }
}

/// The `quantization_config` lorq writes for its EETQ layout (transformers' `EetqConfig` keys).
pub fn quantization_config_eetq() -> Value {
    json!({
        "quant_method": "eetq",
        "weights": "int8",
        "modules_to_not_convert": ["lm_head"],
        "lorq_layout": "per-channel-symmetric-int8-v1"
    })
}
