use candle_core::{DType, Device, Storage, Tensor};

use crate::cpu::dense_matmul;
use crate::{QuantError, QuantTensor};

/// Activation rows up to which the row-streaming kernel beats a blocked GEMM (the weight is read
/// once either way; past this the GEMM's register tiling wins).
const SMALL_M: usize = 16;

/// An unquantized weight (f32, f16 or bf16), `[out, in]` row-major.
#[derive(Debug, Clone)]
pub struct DenseTensor {
    weight: Tensor,
}

impl DenseTensor {
    pub fn new(weight: Tensor) -> Result<Self, QuantError> {
        if weight.rank() != 2 {
            return Err(QuantError::Invalid(format!(
                "a linear weight must be 2-D [out, in], got shape {:?}",
                weight.dims()
            )));
        }
        Ok(Self {
            weight: weight.contiguous()?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The row-streaming CPU kernel for few activation rows; `None` where it does not apply.
    fn small_m_matmul(&self, x: &Tensor) -> Result<Option<Tensor>, QuantError> {
        let Device::Cpu = self.weight.device() else {
            return Ok(None);
        };
        let k = self.weight.dim(1)?;
        let m = x.elem_count() / k;
        if m > SMALL_M || !matches!(self.weight.dtype(), DType::F32 | DType::BF16) {
            return Ok(None);
        }
        let mut out_shape = x.dims().to_vec();
        *out_shape.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (storage, layout) = self.weight.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let start = layout.start_offset();
        let (n, k) = (self.weight.dim(0)?, k);
        let y = match self.weight.dtype() {
            DType::F32 => dense_matmul(&cpu.as_slice::<f32>()?[start..], n, k, &xs, m),
            _ => dense_matmul(&cpu.as_slice::<half::bf16>()?[start..], n, k, &xs, m),
        };
        Ok(Some(
            Tensor::from_vec(y, out_shape, x.device())?.to_dtype(x.dtype())?,
        ))
    }
}

impl QuantTensor for DenseTensor {
    fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    fn dense_weight(&self) -> Option<&Tensor> {
        Some(&self.weight)
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError> {
        if let Some(y) = self.small_m_matmul(x)? {
            return Ok(y);
        }
        #[cfg(feature = "cuda")]
        if let Some(y) = crate::cuda::dense_gemv::gemv(x, &self.weight)? {
            return Ok(y);
        }
        let in_dtype = x.dtype();
        let x = x.to_dtype(self.weight.dtype())?;
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        Ok(y.to_dtype(in_dtype)?)
    }

    fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError> {
        Ok(self.weight.to_dtype(dtype)?)
    }

    fn bytes(&self) -> usize {
        self.weight.elem_count() * self.weight.dtype().size_in_bytes()
    }

    fn format_name(&self) -> String {
        format!("{:?}", self.weight.dtype()).to_lowercase()
    }

    fn state_dict(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, crate::raw_tensor::RawTensor)>, QuantError> {
        Ok(vec![(
            format!("{prefix}.weight"),
            crate::raw_tensor::RawTensor::from_tensor(&self.weight)?,
        )])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_explicit_product() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).unwrap();
        let x = Tensor::new(&[[1f32, 0., -1.]], &dev).unwrap();
        let t = DenseTensor::new(w).unwrap();
        let y: Vec<Vec<f32>> = t.matmul(&x).unwrap().to_vec2().unwrap();
        assert_eq!(y, vec![vec![-2.0, -2.0]]);
        assert_eq!(t.shape(), (2, 3));
        assert_eq!(t.bytes(), 24);
    }

    /// The row-streaming kernel (m <= SMALL_M) and the GEMM path agree with candle's matmul,
    /// for f32 and bf16 weights.
    #[test]
    fn small_and_large_m_agree_with_candle() {
        let dev = Device::Cpu;
        let (n, k) = (200, 96);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let wd = w.to_dtype(dtype).unwrap();
            let t = DenseTensor::new(wd.clone()).unwrap();
            for m in [1, 3, 16, 17, 40] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let want = x
                    .matmul(&wd.to_dtype(DType::F32).unwrap().t().unwrap())
                    .unwrap();
                let got = t.matmul(&x).unwrap();
                let d: f32 = (got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let tol = if dtype == DType::F32 || m <= SMALL_M {
                    1e-5
                } else {
                    2e-2
                };
                assert!(d / scale < tol, "{dtype:?} m={m}: rel diff {}", d / scale);
            }
        }
    }

    #[test]
    fn rejects_non_matrix() {
        let w = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let err = DenseTensor::new(w).unwrap_err().to_string();
        assert!(err.contains("2-D"), "{err}");
    }
}
