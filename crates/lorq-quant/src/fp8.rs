//! FP8 (e4m3fn) weights with per-tensor or per-output-channel scales, in compressed-tensors'
//! `float-quantized` layout: `P.weight` F8_E4M3 `[out, in]`, `P.weight_scale` (`[out, 1]` per
//! channel, `[1]` per tensor; BF16 or F32), optional `P.input_scale`. `W = e4m3(q) · scale`.
//!
//! On CPU the weight is emulated: the row kernel decodes e4m3 codes through a 256-entry table,
//! activations stay in full precision (weight-only).

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::cpu::dispatch::simd_dispatch;
use crate::cpu::{dot_f32, fused_or_dequantized_matmul, RowDot};
use crate::{QuantError, QuantTensor};

/// Largest finite e4m3fn value.
pub const E4M3_MAX: f32 = 448.0;
const CHUNK: usize = 512;

/// `x.to(torch.float8_e4m3fn)` as torch 2.15 does it on CPU: round to nearest even, saturating
/// to ±448 (±inf included), NaN → 0x7f with the sign bit kept.
pub fn f32_to_e4m3fn(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = f32::from_bits(bits & 0x7fff_ffff);
    if a.is_nan() {
        return sign | 0x7f;
    }
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    if a < 2f32.powi(-6) {
        // Subnormal range: multiples of 2^-9 (exact scaling, then round half to even).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let ab = a.to_bits();
    // Keep 3 of 23 mantissa bits, rounding half to even; a carry moves into the exponent.
    let r = (ab + 0x7ffff + ((ab >> 20) & 1)) >> 20;
    let code = r - ((127 - 7) << 3);
    sign | code.min(0x7e) as u8
}

const fn decode_e4m3(b: u8) -> f32 {
    let e = ((b >> 3) & 0xf) as u32;
    let m = (b & 7) as u32;
    let mag = if e == 15 && m == 7 {
        f32::NAN
    } else if e == 0 {
        m as f32 / 512.0
    } else {
        f32::from_bits(((e + 120) << 23) | (m << 20))
    };
    if b & 0x80 != 0 {
        -mag
    } else {
        mag
    }
}

const fn make_lut() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = decode_e4m3(i as u8);
        i += 1;
    }
    t
}

/// `s · 2^120` where that is exact and finite (the fast decode folds the exponent bias into it).
#[inline(always)]
fn scaled_2_120(s: f32) -> Option<f32> {
    let v = s * f32::from_bits((120 + 127) << 23);
    (v.is_finite() && v != 0.0 && s.is_normal()).then_some(v)
}

/// `e4m3(b) · s` for `s2 = s · 2^120`: the code's exponent and mantissa bits placed in an f32
/// are the value times 2^-120 (normal and subnormal codes alike). NaN codes read as ±480.
#[inline(always)]
fn decode_scaled(b: u8, s2: f32) -> f32 {
    let b = b as u32;
    f32::from_bits(((b & 0x7f) << 20) | ((b & 0x80) << 24)) * s2
}

/// Round-to-nearest-even to bf16 for finite values (branch-free, vectorisable).
#[inline(always)]
fn round_bf16_finite(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
}

/// e4m3fn code → f32 (exact).
pub static E4M3_LUT: [f32; 256] = make_lut();

pub fn e4m3fn_to_f32(b: u8) -> f32 {
    E4M3_LUT[b as usize]
}

/// How the weight scale is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Strategy {
    /// One scale for the whole tensor (`weight_scale` `[1]`).
    Tensor,
    /// One scale per output channel (`weight_scale` `[out, 1]`).
    Channel,
}

/// How activations are described in the `quantization_config` (lorq's CPU path does not quantize them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Activations {
    /// `FP8_DYNAMIC`: per-token scales computed at run time.
    DynamicToken,
    /// `FP8`: a static per-tensor `input_scale` stored beside the weight.
    StaticTensor,
    /// Weight-only (`input_activations: null`).
    None,
}

/// An FP8 e4m3fn weight with its scales.
#[derive(Debug, Clone)]
pub struct Fp8Tensor {
    shape: (usize, usize),
    codes: Vec<u8>,
    /// One value (tensor) or one per output row (channel), as stored (already in `scale_dtype`).
    scale: Vec<f32>,
    scale_dtype: DType,
    input_scale: Option<Tensor>,
    /// GPU copies (fused CUDA kernels), made on first use.
    gpu: crate::gpu_slot::GpuSlot,
    /// GPU copies for the FP8 tensor-core path (`cuda::fp8_gemm`), made on first use.
    #[cfg(feature = "cuda")]
    pub(crate) lt: crate::cuda::GpuCache<crate::cuda::fp8_gemm::Fp8LtWeight>,
}

fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn err(msg: String) -> QuantError {
    QuantError::Invalid(format!("fp8: {msg}"))
}

/// The raw e4m3 bytes of an F8E4M3 tensor.
pub fn f8_bytes(t: &Tensor) -> Result<Vec<u8>, QuantError> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F8E4M3(v)) => {
            let (a, b) = layout
                .contiguous_offsets()
                .ok_or_else(|| err("non-contiguous F8E4M3 tensor".into()))?;
            Ok(v[a..b].iter().map(|x| x.to_bits()).collect())
        }
        _ => Err(err(format!(
            "expected an F8E4M3 tensor, got {:?}",
            t.dtype()
        ))),
    }
}

impl Fp8Tensor {
    /// Quantizes `weight` `[out, in]` as compressed-tensors does (symmetric, scale = absmax / 448,
    /// the scale rounded to `scale_dtype` (zero → that dtype's epsilon) before dividing, values
    /// clamped to ±448 and cast to e4m3fn). `w / scale` is rounded to the weight's dtype first, as
    /// torch divides a bf16/f16 weight by its scale in that dtype.
    pub fn quantize(
        weight: &Tensor,
        strategy: Fp8Strategy,
        scale_dtype: DType,
    ) -> Result<Self, QuantError> {
        if !matches!(scale_dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(err(format!(
                "scale dtype must be F32, BF16 or F16, got {scale_dtype:?}"
            )));
        }
        let (out, inp) = weight.dims2().map_err(|_| {
            err(format!(
                "a linear weight must be 2-D, got {:?}",
                weight.dims()
            ))
        })?;
        let w_dtype = weight.dtype();
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let absmax = |s: &[f32]| s.iter().fold(0f32, |m, v| m.max(v.abs()));
        let raw: Vec<f32> = match strategy {
            Fp8Strategy::Tensor => vec![absmax(&w)],
            Fp8Strategy::Channel => w.chunks_exact(inp.max(1)).map(absmax).take(out).collect(),
        };
        let eps = match scale_dtype {
            DType::BF16 => half::bf16::EPSILON.to_f32(),
            DType::F16 => half::f16::EPSILON.to_f32(),
            _ => f32::EPSILON,
        };
        let scale: Vec<f32> = raw
            .iter()
            .map(|m| {
                let s = round_to(scale_dtype, m / E4M3_MAX);
                if s == 0.0 {
                    eps
                } else {
                    s
                }
            })
            .collect();
        let mut codes = vec![0u8; out * inp];
        for (r, (c, row)) in codes
            .chunks_exact_mut(inp.max(1))
            .zip(w.chunks_exact(inp.max(1)))
            .enumerate()
        {
            let s = scale[if strategy == Fp8Strategy::Channel {
                r
            } else {
                0
            }];
            for (c, &v) in c.iter_mut().zip(row) {
                *c = f32_to_e4m3fn(round_to(w_dtype, v / s).clamp(-E4M3_MAX, E4M3_MAX));
            }
        }
        Ok(Self {
            gpu: Default::default(),
            #[cfg(feature = "cuda")]
            lt: Default::default(),
            shape: (out, inp),
            codes,
            scale,
            scale_dtype,
            input_scale: None,
        })
    }

    /// Assembles from codes `[out, in]` and scales (1 or `out` values, in `scale_dtype`).
    pub fn from_parts(
        shape: (usize, usize),
        codes: Vec<u8>,
        scale: Vec<f32>,
        scale_dtype: DType,
        input_scale: Option<Tensor>,
    ) -> Result<Self, QuantError> {
        if codes.len() != shape.0 * shape.1 {
            return Err(err(format!("{} codes for shape {shape:?}", codes.len())));
        }
        if scale.len() != 1 && scale.len() != shape.0 {
            return Err(err(format!(
                "{} scales, expected 1 or {}",
                scale.len(),
                shape.0
            )));
        }
        Ok(Self {
            gpu: Default::default(),
            #[cfg(feature = "cuda")]
            lt: Default::default(),
            shape,
            codes,
            scale,
            scale_dtype,
            input_scale,
        })
    }

    pub fn strategy(&self) -> Fp8Strategy {
        if self.scale.len() == 1 && self.shape.0 != 1 {
            Fp8Strategy::Tensor
        } else {
            Fp8Strategy::Channel
        }
    }
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }
    pub fn scale_dtype(&self) -> DType {
        self.scale_dtype
    }
    pub fn input_scale(&self) -> Option<&Tensor> {
        self.input_scale.as_ref()
    }
    pub fn set_input_scale(&mut self, t: Option<Tensor>) {
        self.input_scale = t;
    }

    #[inline(always)]
    fn row_scale(&self, j: usize) -> f32 {
        if self.scale.len() == 1 {
            self.scale[0]
        } else {
            self.scale[j]
        }
    }

    /// Row `j`, columns `c0 .. c0 + out.len()`, dequantized as compressed-tensors does
    /// (`q.to(scale.dtype) * scale`, i.e. rounded to the scale's dtype).
    #[inline(always)]
    fn fill(&self, j: usize, c0: usize, out: &mut [f32]) {
        let src = &self.codes[j * self.shape.1 + c0..][..out.len()];
        let s = self.row_scale(j);
        match (self.scale_dtype, scaled_2_120(s)) {
            (DType::F32, Some(s2)) => out
                .iter_mut()
                .zip(src)
                .for_each(|(o, &b)| *o = decode_scaled(b, s2)),
            (DType::BF16, Some(s2)) => out
                .iter_mut()
                .zip(src)
                .for_each(|(o, &b)| *o = round_bf16_finite(decode_scaled(b, s2))),
            (d, _) => out
                .iter_mut()
                .zip(src)
                .for_each(|(o, &b)| *o = round_to(d, E4M3_LUT[b as usize] * s)),
        }
    }

    /// The dequantized weight `[out, in]` row-major.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let (n, k) = self.shape;
        let mut w = vec![0f32; n * k];
        for (j, row) in w.chunks_exact_mut(k.max(1)).enumerate().take(n) {
            self.fill(j, 0, row);
        }
        w
    }

    /// compressed-tensors' tensors for this weight under `prefix` (`P.weight`, `P.weight_scale`,
    /// and `P.input_scale` when set).
    pub fn to_state_dict(&self, prefix: &str) -> Result<Vec<(String, Tensor)>, QuantError> {
        let dev = Device::Cpu;
        let w = Tensor::from_raw_buffer(
            &self.codes,
            DType::F8E4M3,
            &[self.shape.0, self.shape.1],
            &dev,
        )?;
        let s = Tensor::from_vec(self.scale.clone(), (self.scale.len(), 1), &dev)?;
        let s = if self.strategy() == Fp8Strategy::Tensor {
            s.reshape(1)?
        } else {
            s
        };
        let mut v = vec![
            (format!("{prefix}.weight"), w),
            (
                format!("{prefix}.weight_scale"),
                s.to_dtype(self.scale_dtype)?,
            ),
        ];
        if let Some(i) = &self.input_scale {
            v.push((format!("{prefix}.input_scale"), i.clone()));
        }
        Ok(v)
    }

    /// Reads `P.weight` (F8_E4M3 `[out, in]`), `P.weight_scale` (`[out, 1]`, `[out]`, `[1]` or a
    /// scalar) and the optional `P.input_scale`. Errors name the tensor.
    pub fn from_state_dict(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
    ) -> Result<Self, QuantError> {
        let wn = format!("{prefix}.weight");
        let sn = format!("{prefix}.weight_scale");
        let w = get(&wn).ok_or_else(|| err(format!("missing tensor `{wn}`")))?;
        if w.dtype() != DType::F8E4M3 || w.rank() != 2 {
            return Err(err(format!(
                "`{wn}` must be F8_E4M3 [out, in], got {:?} {:?}",
                w.dtype(),
                w.dims()
            )));
        }
        let (out, inp) = w.dims2()?;
        let s = get(&sn).ok_or_else(|| err(format!("missing tensor `{sn}`")))?;
        if !matches!(s.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Err(err(format!(
                "`{sn}` must be F32, BF16 or F16, got {:?}",
                s.dtype()
            )));
        }
        let n = s.elem_count();
        let channel_ok = n == out && (s.dims() == [out, 1] || s.dims() == [out]);
        let tensor_ok = n == 1 && s.rank() <= 2;
        if !channel_ok && !tensor_ok {
            return Err(err(format!(
                "`{sn}` has shape {:?}, expected [{out}, 1] (per channel) or [1] (per tensor)",
                s.dims()
            )));
        }
        let scale: Vec<f32> = s.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let input_scale = get(&format!("{prefix}.input_scale"));
        Self::from_parts((out, inp), f8_bytes(&w)?, scale, s.dtype(), input_scale)
    }

    /// The `quantization_config` compressed-tensors 0.20.0 writes for a float-quantized FP8
    /// checkpoint (keys sorted as it writes them).
    pub fn quantization_config(
        strategy: Fp8Strategy,
        acts: Fp8Activations,
        ignore: &[&str],
    ) -> serde_json::Value {
        use serde_json::json;
        let strategy = match strategy {
            Fp8Strategy::Tensor => "tensor",
            Fp8Strategy::Channel => "channel",
        };
        let input = match acts {
            Fp8Activations::DynamicToken => {
                json!({"dynamic": true, "group_size": null, "num_bits": 8,
                "strategy": "token", "symmetric": true, "type": "float"})
            }
            Fp8Activations::StaticTensor => {
                json!({"dynamic": false, "group_size": null, "num_bits": 8,
                "observer": "static_minmax", "strategy": "tensor", "symmetric": true, "type": "float"})
            }
            Fp8Activations::None => serde_json::Value::Null,
        };
        json!({
            "config_groups": {"group_0": {
                "format": "float-quantized",
                "input_activations": input,
                "output_activations": null,
                "targets": ["Linear"],
                "weights": {"dynamic": false, "group_size": null, "num_bits": 8, "strategy": strategy,
                            "symmetric": true, "type": "float"}
            }},
            "format": "float-quantized",
            "global_compression_ratio": null,
            "ignore": ignore,
            "kv_cache_scheme": null,
            "moe_sparsity_config": null,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": "0.20.0"
        })
    }
}

/// One output row: for one activation row decoded straight into the dot product, otherwise
/// decoded once per chunk into a stack buffer and dotted with each activation row.
#[inline(always)]
fn dot_row_generic(t: &Fp8Tensor, j: usize, x: &[f32], out: &mut [f32]) {
    const L: usize = 16;
    let k = t.shape.1;
    out.iter_mut().for_each(|o| *o = 0.0);
    if let (1, DType::F32 | DType::BF16, Some(s2)) =
        (out.len(), t.scale_dtype, scaled_2_120(t.row_scale(j)))
    {
        let bf16 = t.scale_dtype == DType::BF16;
        let row = &t.codes[j * k..(j + 1) * k];
        let mut acc = [0f32; L];
        let (rc, xc) = (row.chunks_exact(L), x.chunks_exact(L));
        let (rr, xr) = (rc.remainder(), xc.remainder());
        let dec = |b: u8| {
            let v = decode_scaled(b, s2);
            if bf16 {
                round_bf16_finite(v)
            } else {
                v
            }
        };
        for (a, b) in rc.zip(xc) {
            for i in 0..L {
                acc[i] = dec(a[i]).mul_add(b[i], acc[i]);
            }
        }
        out[0] = acc.iter().sum::<f32>() + rr.iter().zip(xr).map(|(&a, b)| dec(a) * b).sum::<f32>();
        return;
    }
    let mut buf = [0f32; CHUNK];
    let mut c0 = 0;
    while c0 < k {
        let n = CHUNK.min(k - c0);
        t.fill(j, c0, &mut buf[..n]);
        for (o, xr) in out.iter_mut().zip(x.chunks_exact(k)) {
            *o += dot_f32(&xr[c0..c0 + n], &buf[..n]);
        }
        c0 += n;
    }
}

simd_dispatch!(fn dot_row(t: &Fp8Tensor, j: usize, x: &[f32], out: &mut [f32]) => dot_row_generic);

struct Fp8Rows<'a>(&'a Fp8Tensor);

impl RowDot for Fp8Rows<'_> {
    fn rows(&self) -> usize {
        self.0.shape.0
    }
    fn cols(&self) -> usize {
        self.0.shape.1
    }
    fn dot_row(&self, j: usize, x: &[f32], out: &mut [f32]) {
        dot_row(self.0, j, x, out)
    }
}

impl Fp8Tensor {
    /// The fused GPU kernels' layout: e4m3 codes through a 256-entry table, one scale per row.
    pub(crate) fn packed_gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        use crate::gpu_layout::{CodeKind, ElementRounding, GpuLayout};
        let (n, k) = self.shape;
        let rounding = match self.scale_dtype {
            DType::BF16 => ElementRounding::Bf16,
            DType::F16 => ElementRounding::F16,
            _ => ElementRounding::None,
        };
        GpuLayout::pack(
            n,
            k,
            CodeKind::Table {
                bits: 8,
                lut: E4M3_LUT.to_vec(),
            },
            k,
            (0..n).map(|j| self.row_scale(j)).collect(),
            Vec::new(),
            rounding,
            None,
            |r, c| self.codes[r * k + c] as u32,
        )
    }
}

impl QuantTensor for Fp8Tensor {
    fn gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        self.packed_gpu_layout()
    }

    fn shape(&self) -> (usize, usize) {
        self.shape
    }

    fn matmul_grad_input(&self, dy: &Tensor) -> Result<Tensor, QuantError> {
        if let Some(g) = crate::gpu_slot::gpu_matmul_grad_input(&self.gpu, dy, "fp8", || {
            self.packed_gpu_layout()
        })? {
            return Ok(g);
        }
        crate::quant_tensor::host_matmul_grad_input(self, dy)
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError> {
        // FP8 tensor cores (W8A8: lorq's kernel or cuBLASLt) on compute capability 8.9+, from
        // `fp8_gemm::min_rows` rows (one for the large weights, two for the others).
        #[cfg(feature = "cuda")]
        if let Some(y) = crate::cuda::fp8_gemm::matmul_if_supported(self, x)? {
            return Ok(y);
        }
        if let Some(y) =
            crate::gpu_slot::gpu_matmul(&self.gpu, x, "fp8", || self.packed_gpu_layout())?
        {
            return Ok(y);
        }
        fused_or_dequantized_matmul(&Fp8Rows(self), x, "fp8", || self.dequantize(DType::F32))
    }

    /// W8A8 on FP8 tensor cores is faster than the grouped weight-only kernels where it is taken
    /// (from 2 rows, up to 5x per projection at 4-16 rows on an H100; gate/up from 1 row), so
    /// each projection runs alone there.
    #[cfg(feature = "cuda")]
    fn gpu_runs_alone(&self, x: &Tensor) -> Result<bool, QuantError> {
        crate::cuda::fp8_gemm::takes_tensor_cores(self, x)
    }

    #[cfg(feature = "cuda")]
    fn gpu_wants_fp8_codes(&self, x: &Tensor) -> Result<bool, QuantError> {
        crate::cuda::fp8_gemm::wants_offered_activations(self, x)
    }

    #[cfg(feature = "cuda")]
    fn as_fp8(&self) -> Option<&crate::fp8::Fp8Tensor> {
        Some(self)
    }

    #[cfg(feature = "cuda")]
    fn gpu_packed(
        &self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<Option<std::sync::Arc<crate::cuda::qgemv::GpuQuantWeight>>, QuantError> {
        crate::gpu_slot::gpu_packed(&self.gpu, dev, "fp8", || self.packed_gpu_layout())
    }

    fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError> {
        Ok(Tensor::from_vec(self.dequantize_f32(), self.shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    fn bytes(&self) -> usize {
        self.codes.len() + self.scale.len() * self.scale_dtype.size_in_bytes()
    }

    fn format_name(&self) -> String {
        "fp8".to_string()
    }

    fn state_dict(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, crate::raw_tensor::RawTensor)>, QuantError> {
        crate::quant_tensor::raw_state_dict(self.to_state_dict(prefix)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arithmetic decode used by the kernels equals the table times the scale, bf16 rounding
    /// included.
    #[test]
    fn fast_decode_equals_table() {
        for s in [1.0f32, 3.1e-4, 0.0078125, 2.5, 1e-30] {
            let s2 = scaled_2_120(s).unwrap();
            for b in 0..=255u8 {
                if b & 0x7f == 0x7f {
                    continue;
                }
                let want = E4M3_LUT[b as usize] * s;
                assert_eq!(
                    decode_scaled(b, s2).to_bits(),
                    want.to_bits(),
                    "b={b:#04x} s={s}"
                );
                assert_eq!(
                    round_bf16_finite(want).to_bits(),
                    round_to(DType::BF16, want).to_bits()
                );
            }
        }
        assert!(scaled_2_120(1e30).is_none());
    }
}
