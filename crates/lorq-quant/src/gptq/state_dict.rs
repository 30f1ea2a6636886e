//! GPTQ tensors under a module prefix `P`, as GPTQModel / auto-gptq write them:
//! `P.qweight` I32 `[K·b/32, N]` (input channels packed along K, lowest channel in the lowest bits,
//! 3-bit fields straddling words), `P.qzeros` I32 `[G, N·b/32]` (the same packing along N),
//! `P.scales` F16 `[G, N]`, `P.g_idx` I32 `[K]`.
//!
//! Also the raw-tensor helpers the other integer formats (AWQ, compressed-tensors) share.

use safetensors::Dtype;

use super::kernel::{stream_get, stream_words, Groups, IntWeight, Rounding};
use super::{GptqConfig, GptqFormat, GptqTensor};
use crate::raw_tensor::{need_raw, RawTensor};
use crate::QuantError;

fn check(t: &RawTensor, name: &str, dtypes: &[Dtype], shape: &[usize]) -> Result<(), QuantError> {
    if !dtypes.contains(&t.dtype) {
        return Err(QuantError::Invalid(format!(
            "{name}: expected dtype {}, got {:?}",
            dtypes
                .iter()
                .map(|d| format!("{d:?}"))
                .collect::<Vec<_>>()
                .join(" or "),
            t.dtype
        )));
    }
    if t.shape != shape {
        return Err(QuantError::Invalid(format!(
            "{name}: expected shape {shape:?}, got {:?}",
            t.shape
        )));
    }
    let n: usize = shape.iter().product();
    if t.data.len() != n * t.dtype.bitsize() / 8 {
        return Err(QuantError::Invalid(format!(
            "{name}: {} bytes do not fit shape {shape:?} of {:?}",
            t.data.len(),
            t.dtype
        )));
    }
    Ok(())
}

/// The shape of tensor `name`, which must have `rank` dimensions and dtype `dtype`.
pub(crate) fn shape_of(
    t: &RawTensor,
    name: &str,
    dtype: Dtype,
    rank: usize,
) -> Result<Vec<usize>, QuantError> {
    if t.dtype != dtype || t.shape.len() != rank {
        return Err(QuantError::Invalid(format!(
            "{name}: expected a {rank}-D {dtype:?} tensor, got {:?} of shape {:?}",
            t.dtype, t.shape
        )));
    }
    Ok(t.shape.clone())
}

/// Values of an I32 tensor, as u32 words.
pub(crate) fn u32_values(
    t: &RawTensor,
    name: &str,
    shape: &[usize],
) -> Result<Vec<u32>, QuantError> {
    check(t, name, &[Dtype::I32], shape)?;
    Ok(t.data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Values of an I64 tensor.
pub(crate) fn i64_values(
    t: &RawTensor,
    name: &str,
    shape: &[usize],
) -> Result<Vec<i64>, QuantError> {
    check(t, name, &[Dtype::I64], shape)?;
    Ok(t.data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Values of an F16, BF16 or F32 tensor, as f32 (exact), with the stored dtype.
pub(crate) fn float_values(
    t: &RawTensor,
    name: &str,
    shape: &[usize],
) -> Result<(Vec<f32>, Dtype), QuantError> {
    check(t, name, &[Dtype::F16, Dtype::BF16, Dtype::F32], shape)?;
    let v = match t.dtype {
        Dtype::F16 => t
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => t
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    Ok((v, t.dtype))
}

/// A float tensor in `dtype` (F16, BF16 or F32) from f32 values (exact for values read from it).
pub(crate) fn float_raw(shape: &[usize], v: &[f32], dtype: Dtype) -> RawTensor {
    let data = match dtype {
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    RawTensor {
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

/// An I32 tensor from u32 words.
pub(crate) fn i32_raw(shape: &[usize], v: &[u32]) -> RawTensor {
    RawTensor {
        dtype: Dtype::I32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// `[rows, cols]` row-major → `[cols, rows]`.
pub(crate) fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::default(); v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// Undoes the `gptq` (v1) format's "zero − 1" on one qzeros row, as GPTQModel does on load: for 2,
/// 4 and 8 bits an add of `0x…0101` to whole words (so a borrow written on save is carried back), for
/// other widths (fields straddling words) field by field.
fn v1_to_v2_row(words: &mut [u32], count: usize, bits: u32) {
    if 32 % bits == 0 {
        let one: u32 = (0..32 / bits).map(|j| 1u32 << (bits * j)).sum();
        words.iter_mut().for_each(|w| *w = w.wrapping_add(one));
    } else {
        let mask = (1u32 << bits) - 1;
        let vals: Vec<u32> = (0..count)
            .map(|i| (stream_get(words, i, bits) + 1) & mask)
            .collect();
        words.fill(0);
        for (i, v) in vals.into_iter().enumerate() {
            super::kernel::stream_set(words, i, bits, v);
        }
    }
}

impl GptqTensor {
    /// Loads module `prefix` from tensors named as GPTQModel saves them (`get` returns `None` for
    /// an absent name). `g_idx` may be absent unless `desc_act` is set. Errors name the tensor.
    pub fn from_state_dict(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<RawTensor>,
        cfg: &GptqConfig,
    ) -> Result<Self, QuantError> {
        let b = cfg.bits;
        let qw_name = format!("{prefix}.qweight");
        let qw = need_raw(get, &qw_name)?;
        let qs = shape_of(&qw, &qw_name, Dtype::I32, 2)?;
        let (kp, n) = (qs[0], qs[1]);
        let gi_name = format!("{prefix}.g_idx");
        let g_idx_raw = get(&gi_name);
        if cfg.desc_act && g_idx_raw.is_none() {
            return Err(QuantError::Invalid(format!(
                "missing tensor {gi_name} (required with desc_act=true)"
            )));
        }
        let k = match &g_idx_raw {
            Some(t) => shape_of(t, &gi_name, Dtype::I32, 1)?[0],
            None => {
                if (kp * 32) % b as usize != 0 {
                    return Err(QuantError::Invalid(format!(
                        "{qw_name}: {kp} rows of 32-bit words do not hold whole {b}-bit input channels"
                    )));
                }
                kp * 32 / b as usize
            }
        };
        if kp != stream_words(k, b) {
            return Err(QuantError::Invalid(format!(
                "{qw_name}: expected shape [{}, {n}] for {k} input features at {b} bits, got {qs:?}",
                stream_words(k, b)
            )));
        }
        let gs = cfg.group_size.unwrap_or(k).max(1);
        let n_groups = k.div_ceil(gs).max(1);
        let sc_name = format!("{prefix}.scales");
        let sc_raw = need_raw(get, &sc_name)?;
        if sc_raw.shape.len() == 2 && sc_raw.shape[1] == n && sc_raw.shape[0] != n_groups {
            return Err(QuantError::Invalid(format!(
                "{sc_name}: expected shape [{n_groups}, {n}] ({k} input features from {qw_name} {qs:?}, group_size {}), got {:?}",
                cfg.group_size.map_or(-1, |g| g as i64),
                sc_raw.shape
            )));
        }
        let (scales, scale_dtype) = float_values(&sc_raw, &sc_name, &[n_groups, n])?;
        let qz_name = format!("{prefix}.qzeros");
        let zw = stream_words(n, b);
        let qzeros = u32_values(&need_raw(get, &qz_name)?, &qz_name, &[n_groups, zw])?;
        let mut zcorr = qzeros.clone();
        if cfg.format == GptqFormat::V1 {
            for row in zcorr.chunks_exact_mut(zw.max(1)) {
                v1_to_v2_row(row, n, b);
            }
        }
        let mut zeros = vec![0f32; n * n_groups];
        for g in 0..n_groups {
            let row = &zcorr[g * zw..(g + 1) * zw];
            for j in 0..n {
                zeros[j * n_groups + g] = stream_get(row, j, b) as f32;
            }
        }
        let groups = match &g_idx_raw {
            None => Groups::Contiguous(gs),
            Some(t) => {
                let v = u32_values(t, &gi_name, &[k])?;
                if let Some((i, &g)) = v.iter().enumerate().find(|(_, &g)| g as usize >= n_groups) {
                    return Err(QuantError::Invalid(format!(
                        "{gi_name}: entry {i} is {}, outside the {n_groups} groups of {sc_name}",
                        g as i32
                    )));
                }
                if v.iter().enumerate().all(|(i, &g)| g as usize == i / gs) {
                    Groups::Contiguous(gs)
                } else {
                    Groups::Indexed(v)
                }
            }
        };
        let words = u32_values(&qw, &qw_name, &[kp, n])?;
        let w = IntWeight {
            gpu: Default::default(),
            n,
            k,
            bits: b,
            wpr: kp,
            codes: transpose(&words, kp, n),
            groups,
            n_groups,
            scales: transpose(&scales, n_groups, n),
            zeros,
            round: Rounding::of(scale_dtype),
        };
        w.validate(prefix)?;
        Ok(Self {
            cfg: *cfg,
            w,
            qzeros,
            scale_dtype,
            has_g_idx: g_idx_raw.is_some(),
        })
    }

    /// The tensors under module prefix `prefix`, with the names, dtypes and bytes they were loaded
    /// from (`g_idx` only if it was present).
    pub fn to_state_dict(&self, prefix: &str) -> Vec<(String, RawTensor)> {
        let w = &self.w;
        let (n, g) = (w.n, w.n_groups);
        let mut out = vec![
            (
                format!("{prefix}.qweight"),
                i32_raw(&[w.wpr, n], &transpose(&w.codes, n, w.wpr)),
            ),
            (
                format!("{prefix}.qzeros"),
                i32_raw(&[g, stream_words(n, w.bits)], &self.qzeros),
            ),
            (
                format!("{prefix}.scales"),
                float_raw(&[g, n], &transpose(&w.scales, n, g), self.scale_dtype),
            ),
        ];
        if self.has_g_idx {
            out.push((format!("{prefix}.g_idx"), i32_raw(&[w.k], &w.g_idx())));
        }
        out
    }
}
