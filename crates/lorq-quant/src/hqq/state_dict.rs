//! `HQQLinear.state_dict()` of hqq 0.2.8 (safetensors-encoded): read and write.
//!
//! Under a module path `P`, keys `P.<key>`: `W_q` (packed, U8 or I32 for 3-bit), `scale` and `zero` (compute
//! dtype; `[groups, 1]` for axis 1, `[1, groups]` for axis 0), and hqq's metadata encoded as
//! tensors (`encode_safetensor_type`): ints as I32 scalars, `shape` as I64 `[2]`, strings as U8 ASCII
//! vectors, bools as U8 scalars. `bias` belongs to the linear layer and is not handled here.

use candle_core::{DType, Device, Tensor};

use super::{ComputeDtype, HqqConfig, HqqTensor, PackedCodes, Packing};
use crate::QuantError;

fn err(msg: String) -> QuantError {
    QuantError::Invalid(format!("hqq: {msg}"))
}

fn scalar_u8(v: u8) -> Result<Tensor, QuantError> {
    Ok(Tensor::from_vec(vec![v], (), &Device::Cpu)?)
}
fn scalar_i32(v: i32) -> Result<Tensor, QuantError> {
    Ok(Tensor::from_vec(vec![v], (), &Device::Cpu)?)
}
fn ascii(s: &str) -> Result<Tensor, QuantError> {
    Ok(Tensor::from_vec(
        s.as_bytes().to_vec(),
        s.len(),
        &Device::Cpu,
    )?)
}

/// Reads the integer in a one-element tensor of an integer dtype.
fn int_of(t: &Tensor, name: &str) -> Result<i64, QuantError> {
    let bad = || {
        err(format!(
            "`{name}` must be an integer scalar, got {:?} {:?}",
            t.dtype(),
            t.dims()
        ))
    };
    if t.elem_count() != 1 {
        return Err(bad());
    }
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?[0] as i64,
        DType::U32 => t.to_vec1::<u32>()?[0] as i64,
        DType::I16 => t.to_vec1::<i16>()?[0] as i64,
        DType::I32 => t.to_vec1::<i32>()?[0] as i64,
        DType::I64 => t.to_vec1::<i64>()?[0],
        _ => return Err(bad()),
    })
}

fn string_of(t: &Tensor, name: &str) -> Result<String, QuantError> {
    if t.dtype() != DType::U8 || t.rank() != 1 {
        return Err(err(format!(
            "`{name}` must be a U8 ASCII vector, got {:?} {:?}",
            t.dtype(),
            t.dims()
        )));
    }
    String::from_utf8(t.to_vec1::<u8>()?).map_err(|_| err(format!("`{name}` is not ASCII")))
}

fn floats_of(t: &Tensor, name: &str) -> Result<Vec<f32>, QuantError> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        }
        d => Err(err(format!("`{name}` must be F32, F16 or BF16, got {d:?}"))),
    }
}

/// Little-endian bytes of a CPU tensor of a numeric dtype (for `view_as_float` W_q).
fn raw_bytes(t: &Tensor, name: &str) -> Result<Vec<u8>, QuantError> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::I32 => t
            .to_vec1::<i32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        d => return Err(err(format!("`{name}` has unsupported dtype {d:?}"))),
    })
}

impl HqqTensor {
    /// The tensors `HQQLinear.state_dict()` holds for this weight, named `prefix.key` (prefix = the module path), in hqq's
    /// order (bias excluded).
    pub fn to_state_dict(&self, prefix: &str) -> Result<Vec<(String, Tensor)>, QuantError> {
        let dev = Device::Cpu;
        let (prow, cols) = self.packed_shape();
        let w_q = match &self.packed {
            PackedCodes::U8(v) => Tensor::from_vec(v.clone(), (prow, cols), &dev)?,
            PackedCodes::I32(v) => Tensor::from_vec(v.clone(), (prow, cols), &dev)?,
        };
        let ng = self.scale.len();
        let sz_shape = if self.cfg.axis == 1 { (ng, 1) } else { (1, ng) };
        let dt = self.compute.dtype();
        let scale = Tensor::from_vec(self.scale.clone(), sz_shape, &dev)?.to_dtype(dt)?;
        let zero = Tensor::from_vec(self.zero.clone(), sz_shape, &dev)?.to_dtype(dt)?;
        let shape = Tensor::from_vec(vec![self.shape.0 as i64, self.shape.1 as i64], 2, &dev)?;
        let entries: Vec<(&str, Tensor)> = vec![
            ("W_q", w_q),
            ("nbits", scalar_i32(self.cfg.nbits as i32)?),
            ("group_size", scalar_i32(self.cfg.group_size as i32)?),
            ("shape", shape),
            ("scale", scale),
            ("zero", zero),
            ("axis", scalar_i32(self.cfg.axis as i32)?),
            ("packing", ascii(self.packing.name())?),
            ("unpack_view_dtype", ascii(self.packing.view_dtype_name())?),
            ("view_as_float", scalar_u8(0)?),
            ("quant_scale", scalar_u8(0)?),
            ("quant_zero", scalar_u8(0)?),
            ("compute_dtype", ascii(self.compute.torch_name())?),
            ("offload_meta", scalar_u8(0)?),
            ("encoded_state_dict", scalar_u8(1)?),
            ("stores_quant_config", scalar_u8(1)?),
            ("channel_wise", scalar_u8(1)?),
            ("optimize", scalar_u8(self.cfg.optimize as u8)?),
            ("round_zero", scalar_u8(self.cfg.round_zero as u8)?),
        ];
        Ok(entries
            .into_iter()
            .map(|(k, t)| (format!("{prefix}.{k}"), t))
            .collect())
    }

    /// Reads an `HQQLinear` state dict (as hqq 0.2.8 saves it) from `get("{prefix}.{key}")` (prefix = the module path).
    /// Errors name the offending tensor.
    pub fn from_state_dict(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
    ) -> Result<Self, QuantError> {
        let name = |k: &str| format!("{prefix}.{k}");
        let need =
            |k: &str| get(&name(k)).ok_or_else(|| err(format!("missing tensor `{}`", name(k))));
        let flag = |k: &str| -> Result<bool, QuantError> {
            match get(&name(k)) {
                Some(t) => Ok(int_of(&t, &name(k))? != 0),
                None => Ok(false),
            }
        };
        let w_q = need("W_q")?;
        let nbits = int_of(&need("nbits")?, &name("nbits"))?;
        let gs = int_of(&need("group_size")?, &name("group_size"))?;
        let axis = int_of(&need("axis")?, &name("axis"))?;
        let shape_t = need("shape")?;
        let dims: Vec<i64> = match shape_t.dtype() {
            DType::I64 | DType::I32 if shape_t.elem_count() == 2 => {
                shape_t.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?
            }
            _ => {
                return Err(err(format!(
                    "`{}` must be an I64 [2] tensor [out, in], got {:?} {:?}",
                    name("shape"),
                    shape_t.dtype(),
                    shape_t.dims()
                )))
            }
        };
        if !(1..=8).contains(&nbits) {
            return Err(err(format!(
                "`{}` = {nbits} is not a supported bit width",
                name("nbits")
            )));
        }
        if gs <= 0 || !(0..=1).contains(&axis) || dims.iter().any(|&d| d <= 0) {
            return Err(err(format!(
                "bad metadata under `{prefix}`: group_size {gs}, axis {axis}, shape {dims:?}"
            )));
        }
        for k in ["quant_scale", "quant_zero", "offload_meta"] {
            if flag(k)? {
                return Err(err(format!(
                    "`{}` is set: quantized or offloaded scale/zero are not supported",
                    name(k)
                )));
            }
        }
        let packing = match get(&name("packing")) {
            Some(t) => {
                let s = string_of(&t, &name("packing"))?;
                Packing::from_name(&s).ok_or_else(|| {
                    err(format!(
                        "`{}` = {s:?} is not a known packing",
                        name("packing")
                    ))
                })?
            }
            None => Packing::for_nbits(nbits as u32)?,
        };
        let scale_t = need("scale")?;
        let scale = floats_of(&scale_t, &name("scale"))?;
        let zero = floats_of(&need("zero")?, &name("zero"))?;
        let compute = match get(&name("compute_dtype")) {
            Some(t) => {
                let s = string_of(&t, &name("compute_dtype"))?;
                ComputeDtype::from_torch_name(&s).ok_or_else(|| {
                    err(format!(
                        "`{}` = {s:?} is not a supported dtype",
                        name("compute_dtype")
                    ))
                })?
            }
            None => match scale_t.dtype() {
                DType::F16 => ComputeDtype::F16,
                DType::BF16 => ComputeDtype::BF16,
                _ => ComputeDtype::F32,
            },
        };
        let shape = (dims[0] as usize, dims[1] as usize);
        let (gs, axis) = (gs as usize, axis as usize);
        let numel = shape.0 * shape.1;
        if numel.checked_rem(gs) != Some(0) {
            return Err(err(format!(
                "`{}` = {gs} does not divide shape {shape:?}",
                name("group_size")
            )));
        }
        let ng = numel / gs;
        for (k, n) in [("scale", scale.len()), ("zero", zero.len())] {
            if n != ng {
                return Err(err(format!(
                    "`{}` holds {n} values, expected {ng} (one per group of {gs})",
                    name(k)
                )));
            }
        }
        let grid = super::grid_shape(numel, gs, axis);
        let prow = packing
            .packed_rows(grid.0)
            .map_err(|e| err(format!("`{}`: {e}", name("W_q"))))?;
        let want = [prow, grid.1];
        let view_i32 = packing == Packing::Bit3I32;
        let view_as_float = flag("view_as_float")?;
        let packed = if view_as_float || !matches!(w_q.dtype(), DType::U8 | DType::I32) {
            if !view_as_float {
                return Err(err(format!(
                    "`{}` has dtype {:?}, expected U8 or I32",
                    name("W_q"),
                    w_q.dtype()
                )));
            }
            let b = raw_bytes(&w_q, &name("W_q"))?;
            let elem = if view_i32 { 4 } else { 1 };
            if b.len() != want[0] * want[1] * elem {
                return Err(err(format!(
                    "`{}` holds {} bytes, expected {:?} elements of {elem} byte(s)",
                    name("W_q"),
                    b.len(),
                    want
                )));
            }
            if view_i32 {
                PackedCodes::I32(
                    b.chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )
            } else {
                PackedCodes::U8(b)
            }
        } else {
            let expect_dt = if view_i32 { DType::I32 } else { DType::U8 };
            if w_q.dtype() != expect_dt {
                return Err(err(format!(
                    "`{}` has dtype {:?}, expected {expect_dt:?} for {} packing",
                    name("W_q"),
                    w_q.dtype(),
                    packing.name()
                )));
            }
            if w_q.dims() != want {
                return Err(err(format!(
                    "`{}` has shape {:?}, expected {want:?} for {} packing of {shape:?} with group_size {gs}, axis {axis}",
                    name("W_q"),
                    w_q.dims(),
                    packing.name()
                )));
            }
            match expect_dt {
                DType::I32 => PackedCodes::I32(w_q.flatten_all()?.to_vec1()?),
                _ => PackedCodes::U8(w_q.flatten_all()?.to_vec1()?),
            }
        };
        let cfg = HqqConfig {
            nbits: nbits as u32,
            group_size: gs,
            axis,
            round_zero: flag("round_zero")?,
            optimize: get(&name("optimize")).is_none() || flag("optimize")?,
        };
        HqqTensor::from_parts(shape, cfg, packing, packed, scale, zero, compute)
            .map_err(|e| err(format!("under `{prefix}`: {e}")))
    }
}
