//! Tensors as a safetensors file stores them (dtype, shape, little-endian bytes), for the dtypes
//! candle has no type for (I8, I32, I64, ...) and for writing mixed-dtype checkpoints.

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor};

use crate::QuantError;

/// A tensor as a safetensors file stores it: dtype, shape and little-endian bytes. Used for the
/// I8 tensors of the int8 formats, which candle has no dtype for. Implements
/// [`safetensors::View`], so it can be handed to `safetensors::serialize`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn from_i8(shape: &[usize], v: &[i8]) -> Self {
        Self {
            dtype: safetensors::Dtype::I8,
            shape: shape.to_vec(),
            data: v.iter().map(|&b| b as u8).collect(),
        }
    }
    pub fn from_f32(shape: &[usize], v: &[f32]) -> Self {
        Self {
            dtype: safetensors::Dtype::F32,
            shape: shape.to_vec(),
            data: v.iter().flat_map(|f| f.to_le_bytes()).collect(),
        }
    }
    pub fn from_u8(shape: &[usize], v: &[u8]) -> Self {
        Self {
            dtype: safetensors::Dtype::U8,
            shape: shape.to_vec(),
            data: v.to_vec(),
        }
    }
    /// From a tensor as read from a safetensors file.
    pub fn from_view(v: &safetensors::tensor::TensorView<'_>) -> Self {
        Self {
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        }
    }
    /// From a candle tensor (any dtype candle has).
    pub fn from_tensor(t: &Tensor) -> Result<Self, QuantError> {
        use safetensors::View;
        let t = t.contiguous()?;
        Ok(Self {
            dtype: View::dtype(&t),
            shape: t.dims().to_vec(),
            data: View::data(&t).into_owned(),
        })
    }
    /// As a candle tensor (fails for I8, which candle cannot hold).
    pub fn to_tensor(&self) -> Result<Tensor, QuantError> {
        let dt: DType = self.dtype.try_into()?;
        Ok(Tensor::from_raw_buffer(
            &self.data,
            dt,
            &self.shape,
            &Device::Cpu,
        )?)
    }
    fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    /// The values of an I8 tensor named `name` with shape `shape`.
    pub fn i8_values(&self, name: &str, shape: &[usize]) -> Result<Vec<i8>, QuantError> {
        self.check(name, safetensors::Dtype::I8, shape)?;
        Ok(self.data.iter().map(|&b| b as i8).collect())
    }
    /// The values of an F32 tensor named `name` with shape `shape`.
    pub fn f32_values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, QuantError> {
        self.check(name, safetensors::Dtype::F32, shape)?;
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn check(
        &self,
        name: &str,
        dtype: safetensors::Dtype,
        shape: &[usize],
    ) -> Result<(), QuantError> {
        if self.dtype != dtype {
            return Err(QuantError::Invalid(format!(
                "{name}: expected dtype {dtype:?}, got {:?}",
                self.dtype
            )));
        }
        if self.shape != shape {
            return Err(QuantError::Invalid(format!(
                "{name}: expected shape {shape:?}, got {:?}",
                self.shape
            )));
        }
        if self.data.len() != self.elem_count() * dtype.bitsize() / 8 {
            return Err(QuantError::Invalid(format!(
                "{name}: {} bytes do not fit shape {:?}",
                self.data.len(),
                self.shape
            )));
        }
        Ok(())
    }
}

impl safetensors::View for RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

pub(crate) fn need_raw(
    get: &dyn Fn(&str) -> Option<RawTensor>,
    name: &str,
) -> Result<RawTensor, QuantError> {
    get(name).ok_or_else(|| QuantError::Invalid(format!("missing tensor {name}")))
}
