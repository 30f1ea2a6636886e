//! LLM.int8 weights as bitsandbytes' `Linear8bitLt` holds them (inference, `has_fp16_weights=False`),
//! plus [`RawTensor`], the stored form of tensors candle cannot hold (I8).
//!
//! Quantization (bitsandbytes `Int8Params._quantize`): the weight is cast to f16, then per row
//! `SCB = max |w|` (f32) and `CB = round_half_even(w * (127 / SCB))` (i8).
//!
//! Matmul (`MatMul8bitLt.forward` with `threshold`, 6.0 by default): the activations `x [m, k]`
//! are cast to f16; every column holding some `|x| >= threshold` is an outlier column. Outlier
//! elements are zeroed, each row quantized to i8 with its own absmax `SCA` (so a row's scale
//! ignores its outliers) and the outlier columns zeroed in the i8 activations. Then
//! `y = i32(CA · CBᵀ) * (SCA ⊗ SCB) * 6.200124e-5` (f32, cast to x's dtype) plus, in x's dtype,
//! `x[:, outlier] · W_deq[:, outlier]ᵀ` with `W_deq = CB * SCB * (1/127)`: outlier columns keep
//! the activations' full precision against the dequantized weight columns.
//!
//! Stored (transformers' 8-bit checkpoints, module prefix `P`): `P.weight` I8 `[out, in]`,
//! `P.SCB` F32 `[out]`, `P.weight_format` U8 scalar `0` (row-major).

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::raw_tensor::{need_raw, RawTensor};
use crate::{QuantError, QuantTensor};

/// bitsandbytes' (and LoRAX's, and transformers') outlier threshold.
pub const DEFAULT_THRESHOLD: f32 = 6.0;
/// `1/127` as bitsandbytes writes it.
const INV_127: f32 = 0.007_874_016; // the f32 of 7.874015718698502e-3
/// `1/127²` as bitsandbytes writes it.
const INV_127_SQ: f32 = 6.200_124e-5;

/// Row-wise int8 codes `[out, in]` with one f32 scale per row.
pub(crate) struct RowScaledI8 {
    pub codes: Vec<i8>,
    pub scale: Vec<f32>,
    pub shape: (usize, usize),
}

/// Reads `prefix.weight` (I8 `[out, in]`) and its per-row f32 scale `prefix.<scale_key>` (`[out]`),
/// the layout LLM.int8 (`SCB`) and EETQ (`weight_scale`) share.
pub(crate) fn read_row_scaled_i8(
    prefix: &str,
    scale_key: &str,
    get: &dyn Fn(&str) -> Option<RawTensor>,
) -> Result<RowScaledI8, QuantError> {
    let w_name = format!("{prefix}.weight");
    let w = need_raw(get, &w_name)?;
    if w.shape.len() != 2 {
        return Err(QuantError::Invalid(format!(
            "{w_name}: expected a 2-D [out, in] I8 tensor, got shape {:?}",
            w.shape
        )));
    }
    let (n, k) = (w.shape[0], w.shape[1]);
    let codes = w.i8_values(&w_name, &[n, k])?;
    let s_name = format!("{prefix}.{scale_key}");
    let scale = need_raw(get, &s_name)?.f32_values(&s_name, &[n])?;
    Ok(RowScaledI8 {
        codes,
        scale,
        shape: (n, k),
    })
}

/// Round half to even (torch.round / numpy.rint) of an f32 into i8 range.
#[inline]
pub(crate) fn round_i8(v: f32) -> i8 {
    v.round_ties_even().clamp(-128.0, 127.0) as i8
}

/// An LLM.int8 weight `[out, in]`: i8 codes `CB` and per-row f32 absmax `SCB`.
#[derive(Debug, Clone)]
pub struct Int8Tensor {
    cb: Vec<i8>,
    scb: Vec<f32>,
    shape: (usize, usize),
    threshold: f32,
    /// GPU copies (fused CUDA kernels), made on first use.
    gpu: crate::gpu_slot::GpuSlot,
    /// GPU copies for the LLM.int8 kernels.
    #[cfg(feature = "cuda")]
    llm_gpu: crate::cuda::int8_llm::Int8Cache,
}

impl Int8Tensor {
    /// Quantize a 2-D f32/f16/bf16 weight as `Linear8bitLt` does (through f16), threshold 6.0.
    pub fn quantize(weight: &Tensor) -> Result<Self, QuantError> {
        let dims = weight.dims();
        if dims.len() != 2 {
            return Err(QuantError::Invalid(format!(
                "int8: a linear weight must be 2-D [out, in], got shape {dims:?}"
            )));
        }
        let (n, k) = (dims[0], dims[1]);
        let w: Vec<f32> = weight
            .to_dtype(DType::F16)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let mut cb = vec![0i8; n * k];
        let mut scb = vec![0f32; n];
        for (j, (row, q)) in w
            .chunks_exact(k.max(1))
            .zip(cb.chunks_exact_mut(k.max(1)))
            .enumerate()
        {
            scb[j] = quantize_row(row, q);
        }
        Self::from_parts(cb, scb, (n, k))
    }

    pub fn from_parts(
        cb: Vec<i8>,
        scb: Vec<f32>,
        shape: (usize, usize),
    ) -> Result<Self, QuantError> {
        if cb.len() != shape.0 * shape.1 || scb.len() != shape.0 {
            return Err(QuantError::Invalid(format!(
                "int8: {} codes and {} scales do not fit shape {shape:?}",
                cb.len(),
                scb.len()
            )));
        }
        Ok(Self {
            gpu: Default::default(),
            #[cfg(feature = "cuda")]
            llm_gpu: Default::default(),
            cb,
            scb,
            shape,
            threshold: DEFAULT_THRESHOLD,
        })
    }

    /// The outlier threshold (0 turns the decomposition off).
    pub fn with_threshold(mut self, threshold: f32) -> Self {
        self.threshold = threshold;
        self
    }
    pub fn threshold(&self) -> f32 {
        self.threshold
    }
    pub fn cb(&self) -> &[i8] {
        &self.cb
    }
    pub fn scb(&self) -> &[f32] {
        &self.scb
    }

    /// Dequantized weight element (j, c) in f32: `CB * SCB * (1/127)`.
    #[inline]
    fn deq(&self, j: usize, c: usize) -> f32 {
        self.cb[j * self.shape.1 + c] as f32 * self.scb[j] * INV_127
    }

    /// The tensors under module prefix `prefix`, as transformers writes an 8-bit checkpoint.
    pub fn to_state_dict(&self, prefix: &str) -> Vec<(String, RawTensor)> {
        let (n, k) = self.shape;
        vec![
            (
                format!("{prefix}.weight"),
                RawTensor::from_i8(&[n, k], &self.cb),
            ),
            (
                format!("{prefix}.SCB"),
                RawTensor::from_f32(&[n], &self.scb),
            ),
            (
                format!("{prefix}.weight_format"),
                RawTensor::from_u8(&[], &[0]),
            ),
        ]
    }

    /// Load from tensors named as in [`Self::to_state_dict`] (`weight_format` may be absent; if
    /// present it must be 0, row-major).
    pub fn from_state_dict(
        prefix: &str,
        get: &dyn Fn(&str) -> Option<RawTensor>,
    ) -> Result<Self, QuantError> {
        let w = read_row_scaled_i8(prefix, "SCB", get)?;
        let f_name = format!("{prefix}.weight_format");
        if let Some(f) = get(&f_name) {
            if f.dtype != safetensors::Dtype::U8 || f.data != [0] {
                return Err(QuantError::Invalid(format!(
                    "{f_name}: only weight_format 0 (row-major) is supported, got {:?} {:?}",
                    f.dtype, f.data
                )));
            }
        }
        Self::from_parts(w.codes, w.scale, w.shape)
    }

    /// `y = x · Wᵀ` (bitsandbytes' mixed int8 decomposition) on `m` f32 activation rows holding
    /// x's values; `round` rounds an f32 to x's dtype (identity for f32).
    fn matmul_f32(&self, xs: &[f32], m: usize, round: fn(f32) -> f32) -> Vec<f32> {
        let (n, k) = self.shape;
        let thr = self.threshold;
        // 1. f16 activations, outlier columns.
        let a16: Vec<f32> = xs.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let mut is_outlier = vec![false; k];
        if thr > 0.0 {
            for row in a16.chunks_exact(k) {
                for (c, &v) in row.iter().enumerate() {
                    if v.abs() >= thr {
                        is_outlier[c] = true;
                    }
                }
            }
        }
        let outliers: Vec<usize> = (0..k).filter(|&c| is_outlier[c]).collect();
        // 2. Row-wise i8 activations; outlier elements excluded from the row absmax.
        let mut ca = vec![0i8; m * k];
        let mut sca = vec![0f32; m];
        let mut tmp = vec![0f32; k];
        for i in 0..m {
            for (t, &v) in tmp.iter_mut().zip(&a16[i * k..(i + 1) * k]) {
                *t = if thr > 0.0 && v.abs() >= thr { 0.0 } else { v };
            }
            sca[i] = quantize_row(&tmp, &mut ca[i * k..(i + 1) * k]);
            for &c in &outliers {
                ca[i * k + c] = 0;
            }
        }
        // 3. i32 products, rescaled; plus the outlier columns in x's precision.
        let wdq: Vec<f32> = (0..n)
            .flat_map(|j| outliers.iter().map(move |&c| (j, c)))
            .map(|(j, c)| round(self.deq(j, c)))
            .collect();
        let no = outliers.len();
        let finish = |acc: i32, i: usize, j: usize| -> f32 {
            let mut y = round(acc as f32 * (sca[i] * self.scb[j]) * INV_127_SQ);
            for (t, &c) in outliers.iter().enumerate() {
                y += xs[i * k + c] * wdq[j * no + t];
            }
            y
        };
        let mut y = vec![0f32; m * n];
        if m <= crate::cpu::FUSED_MAX_ROWS {
            // Fused: each weight row read once for all m activation rows.
            let mut yt = vec![0f32; n * m];
            yt.par_chunks_mut(64 * m)
                .enumerate()
                .for_each(|(task, chunk)| {
                    for (r, out) in chunk.chunks_mut(m).enumerate() {
                        let j = task * 64 + r;
                        let wrow = &self.cb[j * k..(j + 1) * k];
                        for (i, o) in out.iter_mut().enumerate() {
                            *o = finish(dot_i8(&ca[i * k..(i + 1) * k], wrow), i, j);
                        }
                    }
                });
            for j in 0..n {
                for i in 0..m {
                    y[i * n + j] = yt[j * m + i];
                }
            }
        } else {
            // f32 GEMM of the i8 values (bitsandbytes' portable int8_linear_matmul).
            let dev = Device::Cpu;
            let gemm = || -> candle_core::Result<Vec<f32>> {
                let a = Tensor::from_vec(
                    ca.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                    (m, k),
                    &dev,
                )?;
                let b = Tensor::from_vec(
                    self.cb.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                    (n, k),
                    &dev,
                )?;
                a.matmul(&b.t()?)?.flatten_all()?.to_vec1()
            };
            let acc = gemm().expect("CPU f32 matmul");
            y.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = finish(acc[i * n + j] as i32, i, j);
                }
            });
        }
        y
    }
}

/// Row-wise absmax quantization of one row: returns the absmax (0 → all codes 0).
fn quantize_row(row: &[f32], out: &mut [i8]) -> f32 {
    let s = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if s == 0.0 {
        out.fill(0);
        return s;
    }
    // torch evaluates `127.0 / row_stats` (a Python scalar over a tensor) as
    // `reciprocal(row_stats) * 127`, which rounds differently from a true division.
    let r = (1.0 / s) * 127.0;
    for (o, &v) in out.iter_mut().zip(row) {
        *o = round_i8(v * r);
    }
    s
}

#[inline(always)]
fn dot_i8_generic(a: &[i8], b: &[i8]) -> i32 {
    const L: usize = 32;
    let mut acc = [0i32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..L {
            acc[i] += x[i] as i32 * y[i] as i32;
        }
    }
    let mut s: i32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += *x as i32 * *y as i32;
    }
    s
}

/// Exact i32 dot product of two i8 rows (AVX-512 / AVX2 builds picked at run time).
pub(crate) fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    type Kernel = fn(&[i8], &[i8]) -> i32;
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    let k = KERNEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw")]
            unsafe fn avx512(a: &[i8], b: &[i8]) -> i32 {
                dot_i8_generic(a, b)
            }
            #[target_feature(enable = "avx2")]
            unsafe fn avx2(a: &[i8], b: &[i8]) -> i32 {
                dot_i8_generic(a, b)
            }
            if std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: the features were detected on this CPU.
                return |a, b| unsafe { avx512(a, b) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the feature was detected on this CPU.
                return |a, b| unsafe { avx2(a, b) };
            }
        }
        dot_i8_generic
    });
    k(a, b)
}

fn rounder(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::BF16 => |v| bf16::from_f32(v).to_f32(),
        DType::F16 => |v| f16::from_f32(v).to_f32(),
        _ => |v| v,
    }
}

impl Int8Tensor {
    /// The fused GPU kernels' layout: 8-bit affine codes `CB + 128`, zero 128, scale `SCB/127`
    /// per row — the weight-only view (training's `dy · W`; the forward matmul runs LLM.int8's
    /// own GPU kernels, `cuda::int8_llm`).
    pub(crate) fn packed_gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        use crate::gpu_layout::{CodeKind, ElementRounding, GpuLayout};
        let (n, k) = self.shape;
        GpuLayout::pack(
            n,
            k,
            CodeKind::Affine { bits: 8 },
            k,
            self.scb.iter().map(|s| s * INV_127).collect(),
            vec![128.0; n],
            ElementRounding::None,
            None,
            |r, c| (self.cb[r * k + c] as i32 + 128) as u32,
        )
    }
}

impl QuantTensor for Int8Tensor {
    fn gpu_layout(&self) -> Result<crate::gpu_layout::GpuLayout, QuantError> {
        self.packed_gpu_layout()
    }

    fn shape(&self) -> (usize, usize) {
        self.shape
    }

    fn matmul_grad_input(&self, dy: &Tensor) -> Result<Tensor, QuantError> {
        if let Some(g) = crate::gpu_slot::gpu_matmul_grad_input(&self.gpu, dy, "int8", || {
            self.packed_gpu_layout()
        })? {
            return Ok(g);
        }
        crate::quant_tensor::host_matmul_grad_input(self, dy)
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor, QuantError> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && self.shape.1.is_multiple_of(32) {
            return crate::cuda::int8_llm::matmul(
                &self.llm_gpu,
                &self.cb,
                &self.scb,
                self.shape,
                self.threshold,
                x,
            );
        }
        let (n, k) = self.shape;
        let dims = x.dims();
        if dims.last() != Some(&k) {
            return Err(QuantError::Invalid(format!(
                "int8: activation shape {dims:?} does not end in in_features {k}"
            )));
        }
        let m = x.elem_count() / k.max(1);
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let y = self.matmul_f32(&xs, m, rounder(x.dtype()));
        let mut out_shape = dims.to_vec();
        *out_shape.last_mut().expect("rank >= 1") = n;
        Ok(Tensor::from_vec(y, out_shape, x.device())?.to_dtype(x.dtype())?)
    }

    fn dequantize(&self, dtype: DType) -> Result<Tensor, QuantError> {
        let (n, k) = self.shape;
        let w: Vec<f32> = (0..n * k).map(|e| self.deq(e / k, e % k)).collect();
        Ok(Tensor::from_vec(w, (n, k), &Device::Cpu)?.to_dtype(dtype)?)
    }

    fn bytes(&self) -> usize {
        self.cb.len() + 4 * self.scb.len()
    }

    fn format_name(&self) -> String {
        "int8".into()
    }

    fn state_dict(&self, prefix: &str) -> Result<Vec<(String, RawTensor)>, QuantError> {
        Ok(self.to_state_dict(prefix))
    }
}

/// The `quantization_config` object transformers writes for a bitsandbytes 8-bit checkpoint.
pub fn quantization_config_8bit() -> Value {
    json!({
        "_load_in_4bit": false,
        "_load_in_8bit": true,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": false,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": false,
        "load_in_8bit": true,
        "quant_method": "bitsandbytes"
    })
}
