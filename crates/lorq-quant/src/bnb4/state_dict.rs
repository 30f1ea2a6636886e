//! Saving and loading a [`Bnb4Tensor`] under the tensor names transformers writes for a
//! bitsandbytes 4-bit linear with module prefix `P` (`QuantState.as_dict(packed=True)`):
//!
//! | name | dtype, shape |
//! | --- | --- |
//! | `P.weight` | U8 `[(numel + 1) / 2, 1]` packed nibbles |
//! | `P.weight.absmax` | F32 `[blocks]`, or U8 `[blocks]` with double quant |
//! | `P.weight.quant_map` | F32 `[16]` the NF4/FP4 table |
//! | `P.weight.nested_absmax` | F32 `[ceil(blocks / 256)]` (double quant only) |
//! | `P.weight.nested_quant_map` | F32 `[256]` (double quant only) |
//! | `P.weight.quant_state.bitsandbytes__nf4` (`__fp4`) | U8 UTF-8 JSON |
//!
//! The JSON is `{"quant_type", "blocksize", "dtype", "shape"}` plus, with double quant,
//! `"nested_blocksize", "nested_dtype", "nested_offset"`, written with Python's `json.dumps`
//! spacing so the bytes equal bitsandbytes'.

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::{Absmax, Bnb4Tensor, Bnb4Type, NestedAbsmax};
use crate::QuantError;

/// torch's name of a dtype (`str(dtype)` without `torch.`).
pub(crate) fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        DType::U8 => "uint8",
        _ => "unknown",
    }
}

fn dtype_from_torch_name(s: &str) -> Option<DType> {
    match s {
        "float32" => Some(DType::F32),
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

/// A float as Python's `repr` writes it (shortest round-trip digits; exponent form below 1e-4
/// or from 1e16, with a signed two-digit exponent).
pub(crate) fn py_float_repr(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = format!("{v:e}"); // e.g. "-5.25e-2"
    let (mant, exp) = sci.split_once('e').expect("exponent form");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mant) = mant.strip_prefix('-').map_or(("", mant), |m| ("-", m));
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let e = exp as usize;
            if digits.len() <= e + 1 {
                format!("{sign}{digits}{}.0", "0".repeat(e + 1 - digits.len()))
            } else {
                format!("{sign}{}.{}", &digits[..e + 1], &digits[e + 1..])
            }
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        format!(
            "{sign}{m}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    }
}

/// The `quantization_config` object transformers writes into `config.json` for a bitsandbytes
/// 4-bit checkpoint (`compute_dtype`: `bnb_4bit_compute_dtype`).
pub fn quantization_config_4bit(
    quant_type: Bnb4Type,
    double_quant: bool,
    compute_dtype: DType,
) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": torch_dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type.name(),
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

fn u8_tensor(bytes: Vec<u8>, shape: &[usize]) -> Result<Tensor, QuantError> {
    Ok(Tensor::from_vec(bytes, shape, &Device::Cpu)?)
}

fn f32_tensor(v: Vec<f32>) -> Result<Tensor, QuantError> {
    let n = v.len();
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
}

impl Bnb4Tensor {
    /// The key suffix of the quant-state tensor: `quant_state.bitsandbytes__nf4` / `__fp4`.
    pub fn quant_state_key(quant_type: Bnb4Type) -> String {
        format!("quant_state.bitsandbytes__{}", quant_type.name())
    }

    /// The quant state JSON exactly as bitsandbytes serializes it.
    pub fn quant_state_json(&self) -> String {
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}, {}]",
            self.quant_type.name(),
            self.blocksize,
            torch_dtype_name(self.dtype),
            self.shape.0,
            self.shape.1
        );
        if let Absmax::Nested(n) = &self.absmax {
            s += &format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                n.blocksize,
                py_float_repr(n.offset as f64)
            );
        }
        s.push('}');
        s
    }

    /// The tensors of this weight under module prefix `prefix` (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn to_state_dict(&self, prefix: &str) -> Result<Vec<(String, Tensor)>, QuantError> {
        let p = format!("{prefix}.weight");
        let mut out = vec![(
            p.clone(),
            u8_tensor(self.packed.clone(), &[self.packed.len(), 1])?,
        )];
        match &self.absmax {
            Absmax::F32(a) => out.push((format!("{p}.absmax"), f32_tensor(a.clone())?)),
            Absmax::Nested(n) => {
                out.push((
                    format!("{p}.absmax"),
                    u8_tensor(n.codes.clone(), &[n.codes.len()])?,
                ));
                out.push((
                    format!("{p}.nested_absmax"),
                    f32_tensor(n.nested_absmax.clone())?,
                ));
                out.push((format!("{p}.nested_quant_map"), f32_tensor(n.code.clone())?));
            }
        }
        out.push((
            format!("{p}.quant_map"),
            f32_tensor(self.quant_type.code().to_vec())?,
        ));
        let js = self.quant_state_json().into_bytes();
        let len = js.len();
        out.push((
            format!("{p}.{}", Self::quant_state_key(self.quant_type)),
            u8_tensor(js, &[len])?,
        ));
        Ok(out)
    }

    /// Load the weight of module `prefix` from tensors named as in [`Self::to_state_dict`];
    /// `get` returns the tensor of a full name, `None` when absent.
    pub fn from_state_dict(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
    ) -> Result<Self, QuantError> {
        let p = format!("{prefix}.weight");
        let (qs_name, qs) = [Bnb4Type::Nf4, Bnb4Type::Fp4]
            .iter()
            .map(|t| format!("{p}.{}", Self::quant_state_key(*t)))
            .find_map(|name| get(&name).map(|t| (name, t)))
            .ok_or_else(|| {
                QuantError::Invalid(format!(
                    "missing tensor {p}.quant_state.bitsandbytes__nf4 (or __fp4): not a bitsandbytes 4-bit weight"
                ))
            })?;
        let bad = |what: &str| QuantError::Invalid(format!("{qs_name}: bad quant state: {what}"));
        let bytes: Vec<u8> = read_u8(&qs_name, &qs)?;
        let js: Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(&format!("invalid JSON ({e})")))?;
        let quant_type = js["quant_type"]
            .as_str()
            .and_then(Bnb4Type::from_name)
            .ok_or_else(|| bad("\"quant_type\" must be \"nf4\" or \"fp4\""))?;
        if !qs_name.ends_with(quant_type.name()) {
            return Err(bad(&format!(
                "\"quant_type\" {} does not match the tensor name",
                quant_type.name()
            )));
        }
        let blocksize = js["blocksize"]
            .as_u64()
            .ok_or_else(|| bad("missing integer \"blocksize\""))? as usize;
        let dtype = js["dtype"]
            .as_str()
            .and_then(dtype_from_torch_name)
            .ok_or_else(|| bad("\"dtype\" must be float32, float16 or bfloat16"))?;
        let shape: Vec<usize> = js["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_u64().map(|u| u as usize)).collect())
            .ok_or_else(|| bad("missing integer list \"shape\""))?;
        let [rows, cols] = shape[..] else {
            return Err(bad(&format!("\"shape\" {shape:?} is not 2-D [out, in]")));
        };
        let numel = rows * cols;
        let blocks = numel.div_ceil(blocksize.max(1));

        let packed = read_packed(&p, &need(get, &p)?)?;
        if packed.len() != numel.div_ceil(2) {
            return Err(QuantError::Invalid(format!(
                "{p}: expected {} packed bytes for shape {shape:?}, got {}",
                numel.div_ceil(2),
                packed.len()
            )));
        }
        let qm_name = format!("{p}.quant_map");
        let qm = read_f32(&qm_name, &need(get, &qm_name)?, Some(16))?;
        if qm
            .iter()
            .zip(quant_type.code())
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(QuantError::Invalid(format!(
                "{qm_name}: is not bitsandbytes' {} table",
                quant_type.name()
            )));
        }
        let am_name = format!("{p}.absmax");
        let am = need(get, &am_name)?;
        let absmax = if js.get("nested_blocksize").is_some() {
            let nested_blocksize = js["nested_blocksize"]
                .as_u64()
                .ok_or_else(|| bad("\"nested_blocksize\" is not an integer"))?
                as usize;
            let offset = js["nested_offset"]
                .as_f64()
                .ok_or_else(|| bad("missing number \"nested_offset\""))?
                as f32;
            let codes = read_u8(&am_name, &am)?;
            if codes.len() != blocks {
                return Err(count_err(&am_name, blocks, codes.len()));
            }
            let na_name = format!("{p}.nested_absmax");
            let nested_absmax = read_f32(
                &na_name,
                &need(get, &na_name)?,
                Some(blocks.div_ceil(nested_blocksize.max(1))),
            )?;
            let nm_name = format!("{p}.nested_quant_map");
            let code = read_f32(&nm_name, &need(get, &nm_name)?, Some(256))?;
            Absmax::Nested(NestedAbsmax {
                codes,
                nested_absmax,
                code,
                offset,
                blocksize: nested_blocksize,
            })
        } else {
            Absmax::F32(read_f32(&am_name, &am, Some(blocks))?)
        };
        Self::from_parts(quant_type, blocksize, (rows, cols), dtype, packed, absmax)
            .map_err(|e| QuantError::Invalid(format!("{p}: {e}")))
    }
}

fn need(get: &dyn Fn(&str) -> Option<Tensor>, name: &str) -> Result<Tensor, QuantError> {
    get(name).ok_or_else(|| QuantError::Invalid(format!("missing tensor {name}")))
}

fn count_err(name: &str, want: usize, got: usize) -> QuantError {
    QuantError::Invalid(format!("{name}: expected {want} values, got {got}"))
}

fn read_u8(name: &str, t: &Tensor) -> Result<Vec<u8>, QuantError> {
    if t.dtype() != DType::U8 {
        return Err(QuantError::Invalid(format!(
            "{name}: expected dtype U8, got {:?}",
            t.dtype()
        )));
    }
    Ok(t.flatten_all()?.to_vec1()?)
}

fn read_f32(name: &str, t: &Tensor, count: Option<usize>) -> Result<Vec<f32>, QuantError> {
    if t.dtype() != DType::F32 {
        return Err(QuantError::Invalid(format!(
            "{name}: expected dtype F32, got {:?}",
            t.dtype()
        )));
    }
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    match count {
        Some(c) if c != v.len() => Err(count_err(name, c, v.len())),
        _ => Ok(v),
    }
}

/// The packed bytes, whatever `bnb_4bit_quant_storage` dtype holds them (bitsandbytes only
/// reinterprets the same bytes).
fn read_packed(name: &str, t: &Tensor) -> Result<Vec<u8>, QuantError> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1()?,
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        d => {
            return Err(QuantError::Invalid(format!(
                "{name}: packed 4-bit storage of dtype {d:?} is not supported"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::py_float_repr;

    #[test]
    fn floats_print_as_python_repr() {
        for (v, want) in [
            (0.05259713903069496, "0.05259713903069496"),
            (2.6054768562316895, "2.6054768562316895"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (-1.5e-7, "-1.5e-07"),
            (2.0, "2.0"),
            (0.0, "0.0"),
            (123456.0, "123456.0"),
            (1e16, "1e+16"),
            (1.25e17, "1.25e+17"),
            (9999999999999998.0, "9999999999999998.0"),
        ] {
            assert_eq!(py_float_repr(v), want, "{v}");
        }
    }
}
