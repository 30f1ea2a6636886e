use candle_core::{DType, Tensor};

use crate::{QuantError, QuantTensor};

/// An unquantized weight (f32, f16 or bf16). Kept transposed-contiguous as given; matmul
/// casts the input to the weight's dtype and the result back.
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
        Ok(Self { weight })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl QuantTensor for DenseTensor {
    fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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

    #[test]
    fn rejects_non_matrix() {
        let w = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let err = DenseTensor::new(w).unwrap_err().to_string();
        assert!(err.contains("2-D"), "{err}");
    }
}
