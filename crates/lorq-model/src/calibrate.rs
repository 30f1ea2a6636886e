//! Calibration-based quantization of a model folder (`lorq quantize --method gptq|awq|rtn-int4`).
//!
//! Calibration: the text (a `.txt` file, or `.jsonl` records with a `"text"` string, joined by
//! blank lines) is tokenized without special tokens and `samples` windows of `seq_len` tokens are
//! drawn at seeded random offsets (the whole text once when it is shorter than `seq_len`).
//!
//! The model runs one decoder layer at a time over all windows, each window a sequence from
//! position 0, through [`LlamaModel::forward_layer`] (the forward's own layer code). The first time
//! a linear is applied, it is quantized from the inputs reaching it, which already went through the
//! quantized linears before it, in this layer and the earlier ones (GPTQ's sequential order):
//! q/k/v together from the normed input, then o, then gate/up, then down. The layer's output, from
//! the quantized linears, is the next layer's input.
//!
//! GPTQ ([`lorq_quant::gptq::quantize`]) writes the GPTQ v1 layout. AWQ
//! ([`lorq_quant::awq::quantize`]) searches one input scale per group of linears, as AutoAWQ
//! groups them for Llama: q/k/v with the scale folded into `input_layernorm`, gate/up into
//! `post_attention_layernorm`, down into `up_proj`'s output rows, and o into `v_proj`'s output rows
//! only when their shapes allow it (no grouped-query attention), else o is not scaled; it writes
//! the AutoAWQ GEMM layout. Until folded, the calibration forward applies an AWQ linear as
//! `Q(W·s) · (x / s)`, which is what the folded model computes. RTN (`rtn-int4`) needs no
//! calibration: each linear is rounded to nearest with GPTQ's grid, in the GPTQ v1 layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lorq_quant::awq::quantize::{awq_clip, awq_search_scale, AwqParams};
use lorq_quant::awq::AwqTensor;
use lorq_quant::gptq::quantize::{gptq_quantize, rtn_gptq, GptqParams};
use lorq_quant::gptq::GptqTensor;
use lorq_quant::input_stats::InputStats;
use lorq_quant::{QuantTensor, RawTensor};
use rand::{Rng, SeedableRng};

use crate::checkpoint_writer::{
    bits_per_weight, prepare_output, progress_bar, write_checkpoint, QuantizeOptions,
    QuantizeSummary, Replacements,
};
use crate::config::ModelConfig;
use crate::error::{io_err, ModelError, Result};
use crate::linear::Linear;
use crate::llama::{LayerLinear, LlamaModel};
use crate::tokenizer::Tokenizer;

/// The GPTQModel release whose GPTQ v1 conventions lorq's writer follows (verified by loading).
pub const GPTQMODEL_CONVENTION: &str = "gptqmodel:7.7.0";

/// A calibration-based method and its options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CalibratedMethod {
    Gptq(GptqParams),
    Awq(AwqParams),
    /// Round to nearest (GPTQ's grid and layout; `act_order`/`static_groups`/`damp` unused).
    /// Calibration is optional: with it, the output error of every linear is measured.
    Rtn(GptqParams),
}

impl CalibratedMethod {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Gptq(_) => "gptq",
            Self::Awq(_) => "awq",
            Self::Rtn(_) => "rtn-int4",
        }
    }

    pub fn needs_calibration(&self) -> bool {
        !matches!(self, Self::Rtn(_))
    }

    /// The checkpoint's `quantization_config`. GPTQ's carries GPTQModel's `meta`: the options,
    /// and as `quantizer` lorq plus the GPTQModel version whose v1 zero-point convention (a
    /// whole-word `zero − 1`, see [`GptqTensor::from_codes`]) the file follows. GPTQModel refuses
    /// an asymmetric v1 checkpoint whose `meta.quantizer` names no GPTQModel ≥ 0.9 (older tools
    /// wrote zeros of 0 differently).
    fn quantization_config(&self) -> serde_json::Value {
        let gptq = |p: &GptqParams, method: &str| {
            let mut v = p.config().to_json();
            v["meta"] = serde_json::json!({
                "quantizer": [
                    format!("lorq:{}", env!("CARGO_PKG_VERSION")),
                    GPTQMODEL_CONVENTION
                ],
                "lorq_method": method,
                "damp_percent": p.damp,
                "static_groups": p.static_groups,
                "true_sequential": true,
            });
            v
        };
        match self {
            Self::Gptq(p) => gptq(p, "gptq"),
            Self::Rtn(p) => gptq(
                &GptqParams {
                    act_order: false,
                    static_groups: false,
                    ..*p
                },
                "rtn",
            ),
            Self::Awq(p) => lorq_quant::awq::AwqConfig {
                bits: 4,
                group_size: p.group_size,
            }
            .to_json(),
        }
    }
}

/// Where the calibration windows come from.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationSpec {
    /// A `.txt` file, or `.jsonl` with a `"text"` string per line.
    pub path: PathBuf,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
}

/// The text of a calibration file (see the module notes). Errors name the file and line.
pub fn calibration_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    if !jsonl {
        return Ok(text);
    }
    let mut parts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| {
            ModelError::Request(format!(
                "calibration file {} line {}: {m}",
                path.display(),
                i + 1
            ))
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        match v.get("text") {
            Some(serde_json::Value::String(s)) => parts.push(s.clone()),
            Some(other) => return Err(bad(format!("\"text\" is not a string: {other}"))),
            None => return Err(bad("no \"text\" key".into())),
        }
    }
    Ok(parts.join("\n\n"))
}

/// The calibration windows (token ids) of `spec`, tokenized with `tok`.
pub fn calibration_windows(tok: &Tokenizer, spec: &CalibrationSpec) -> Result<Vec<Vec<u32>>> {
    if spec.samples == 0 || spec.seq_len == 0 {
        return Err(ModelError::Request(format!(
            "calibration needs at least one sample of at least one token (got {} samples of {} tokens)",
            spec.samples, spec.seq_len
        )));
    }
    let ids = tok.encode(&calibration_text(&spec.path)?)?;
    if ids.is_empty() {
        return Err(ModelError::Request(format!(
            "calibration file {} holds no text (0 tokens)",
            spec.path.display()
        )));
    }
    if ids.len() <= spec.seq_len {
        tracing::warn!(
            "calibration file {} has {} tokens, fewer than --calibration-seq-len {}: using it once, whole",
            spec.path.display(),
            ids.len(),
            spec.seq_len
        );
        return Ok(vec![ids]);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    Ok((0..spec.samples)
        .map(|_| {
            let s = rng.random_range(0..=ids.len() - spec.seq_len);
            ids[s..s + spec.seq_len].to_vec()
        })
        .collect())
}

/// How well one linear was quantized, on the calibration inputs that reached it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinearReport {
    pub path: String,
    pub out_features: usize,
    pub in_features: usize,
    /// `‖(W − Ŵ)X‖ / ‖WX‖` over the calibration rows `X`.
    pub rel_error: f64,
    /// The same for round-to-nearest (GPTQ's grid, same bits and group size) on the same `X`.
    pub rtn_rel_error: f64,
    /// AWQ: the ratio `α` of the scale kept (0 = no scaling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub awq_ratio: Option<f32>,
}

/// What [`quantize_calibrated`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibratedSummary {
    #[serde(flatten)]
    pub summary: QuantizeSummary,
    pub calibration_samples: usize,
    pub calibration_tokens: usize,
    pub linears: Vec<LinearReport>,
}

/// A quantized linear of the layer being calibrated.
enum Quantized {
    Gptq(GptqTensor),
    /// Stored `Q(W·s)`; applied as `Q(W·s)·(x/s)` until `s` is folded.
    Awq {
        t: AwqTensor,
        s: Vec<f32>,
    },
}

impl Quantized {
    fn tensor(&self) -> &dyn QuantTensor {
        match self {
            Quantized::Gptq(t) => t,
            Quantized::Awq { t, .. } => t,
        }
    }
}

fn stage_of(which: LayerLinear) -> &'static [LayerLinear] {
    use LayerLinear::*;
    match which {
        Q | K | V => &[Q, K, V],
        O => &[O],
        Gate | Up => &[Gate, Up],
        Down => &[Down],
    }
}

fn f32_weight(lin: &Linear) -> Result<Vec<f32>> {
    Ok(lin
        .base
        .dequantize(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The quantization state of one decoder layer during its calibration forward.
struct LayerRun<'a> {
    model: &'a LlamaModel,
    layer: usize,
    method: CalibratedMethod,
    done: HashMap<LayerLinear, Quantized>,
    /// AWQ scales to divide the input norm / post-attention norm weights by.
    norm_scales: [Option<Vec<f32>>; 2],
    /// AWQ scales to divide linears' output rows by (with their bias).
    row_scales: Vec<(LayerLinear, Vec<f32>)>,
    reports: Vec<LinearReport>,
}

impl LayerRun<'_> {
    fn path(&self, which: LayerLinear) -> String {
        format!("model.layers.{}.{}", self.layer, which.module())
    }

    fn apply(&mut self, which: LayerLinear, lin: &Linear, x: &Tensor) -> Result<Tensor> {
        if !self.done.contains_key(&which) {
            self.quantize_stage(which, x)?;
        }
        let mut y = match &self.done[&which] {
            Quantized::Gptq(t) => t.matmul(x)?,
            Quantized::Awq { t, s } => t.matmul_unscaled(x, s)?,
        };
        if let Some(b) = &lin.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    fn report(
        &mut self,
        which: LayerLinear,
        stats: &InputStats,
        w: &[f32],
        deq: &[f32],
        rtn: &GptqParams,
        awq_ratio: Option<f32>,
    ) -> Result<()> {
        let lin = self.model.layer_linear(self.layer, which);
        let (n, k) = (lin.out_features(), lin.in_features());
        let path = self.path(which);
        let gram = stats.gram_tensor()?;
        let norm = lorq_quant::input_stats::output_error_with(&gram, w, &vec![0.0; w.len()], k)?
            .max(1e-30);
        let err = lorq_quant::input_stats::output_error_with(&gram, w, deq, k)?;
        let r = rtn_gptq(w, n, k, rtn, &path)?.dequantize_f32();
        let rtn_err = lorq_quant::input_stats::output_error_with(&gram, w, &r, k)?;
        self.reports.push(LinearReport {
            path,
            out_features: n,
            in_features: k,
            rel_error: (err / norm).sqrt(),
            rtn_rel_error: (rtn_err / norm).sqrt(),
            awq_ratio,
        });
        Ok(())
    }

    fn quantize_stage(&mut self, which: LayerLinear, x: &Tensor) -> Result<()> {
        let stage = stage_of(which);
        let k = self.model.layer_linear(self.layer, which).in_features();
        let mut stats = InputStats::new(k);
        stats.add(x).map_err(|e| ModelError::Tensor {
            name: format!("{}.weight", self.path(which)),
            message: format!("calibration inputs: {e}"),
        })?;
        let tensor_err = |path: &str, e: lorq_quant::QuantError| ModelError::Tensor {
            name: format!("{path}.weight"),
            message: e.to_string(),
        };
        match self.method {
            CalibratedMethod::Gptq(p) | CalibratedMethod::Rtn(p) => {
                for &lw in stage {
                    let lin = self.model.layer_linear(self.layer, lw);
                    let (n, k) = (lin.out_features(), lin.in_features());
                    let w = f32_weight(lin)?;
                    let path = self.path(lw);
                    let t = match self.method {
                        CalibratedMethod::Gptq(_) => gptq_quantize(&w, n, k, &stats, &p, &path),
                        _ => rtn_gptq(&w, n, k, &p, &path),
                    }
                    .map_err(|e| tensor_err(&path, e))?;
                    self.report(lw, &stats, &w, &t.dequantize_f32(), &p, None)?;
                    self.done.insert(lw, Quantized::Gptq(t));
                }
            }
            CalibratedMethod::Awq(p) => {
                let weights: Vec<(LayerLinear, Vec<f32>, usize)> = stage
                    .iter()
                    .map(|&lw| {
                        let lin = self.model.layer_linear(self.layer, lw);
                        Ok((lw, f32_weight(lin)?, lin.out_features()))
                    })
                    .collect::<Result<_>>()?;
                let group_name = self.path(stage[0]);
                let v = self.model.layer_linear(self.layer, LayerLinear::V);
                let o = self.model.layer_linear(self.layer, LayerLinear::O);
                let scaled = which != LayerLinear::O
                    || (v.out_features() == o.out_features() && v.in_features() == o.in_features());
                let (s, ratio) = if scaled {
                    let lin: Vec<(&[f32], usize)> =
                        weights.iter().map(|(_, w, n)| (w.as_slice(), *n)).collect();
                    let r = awq_search_scale(&lin, &stats, &p, &group_name)
                        .map_err(|e| tensor_err(&group_name, e))?;
                    tracing::debug!(
                        "{group_name}: AWQ ratio {} (output error {:.4e}, RTN {:.4e})",
                        r.ratio,
                        r.error,
                        r.rtn_error
                    );
                    (r.scales, r.ratio)
                } else {
                    (vec![1.0; k], 0.0)
                };
                let gptq_like = GptqParams {
                    bits: 4,
                    group_size: Some(p.group_size),
                    ..GptqParams::default()
                };
                for (lw, w, n) in &weights {
                    let path = self.path(*lw);
                    let mut ws: Vec<f32> = w
                        .chunks(k)
                        .flat_map(|row| row.iter().zip(&s).map(|(a, b)| a * b))
                        .collect();
                    if p.clip && !matches!(lw, LayerLinear::Q | LayerLinear::K) {
                        awq_clip(&mut ws, *n, &stats, &s, &p, &path)
                            .map_err(|e| tensor_err(&path, e))?;
                    }
                    let t = AwqTensor::quantize(&ws, *n, k, p.group_size, &path)
                        .map_err(|e| tensor_err(&path, e))?;
                    let deq: Vec<f32> = t
                        .dequantize_f32()
                        .chunks(k)
                        .flat_map(|row| row.iter().zip(&s).map(|(a, b)| a / b))
                        .collect();
                    self.report(*lw, &stats, w, &deq, &gptq_like, Some(ratio))?;
                    self.done.insert(*lw, Quantized::Awq { t, s: s.clone() });
                }
                match which {
                    LayerLinear::Q | LayerLinear::K | LayerLinear::V => {
                        self.norm_scales[0] = Some(s)
                    }
                    LayerLinear::Gate | LayerLinear::Up => self.norm_scales[1] = Some(s),
                    LayerLinear::O if scaled => self.row_scales.push((LayerLinear::V, s)),
                    LayerLinear::Down => self.row_scales.push((LayerLinear::Up, s)),
                    LayerLinear::O => {}
                }
            }
        }
        Ok(())
    }

    /// The tensors this layer writes in place of the source's (quantized linears, and for AWQ the
    /// norms and biases the scales were folded into), keyed by the source tensor they replace.
    fn finish(
        mut self,
        stored: &dyn Fn(&str) -> Option<safetensors::Dtype>,
    ) -> Result<(Replacements, usize, usize)> {
        let mut out = HashMap::new();
        let to_raw = |name: &str, t: Tensor| -> Result<(String, RawTensor)> {
            let dt = stored(name).ok_or_else(|| ModelError::Tensor {
                name: name.to_string(),
                message: "missing from the source weights".into(),
            })?;
            let dt: DType = dt
                .try_into()
                .map_err(|e: candle_core::Error| ModelError::Tensor {
                    name: name.to_string(),
                    message: e.to_string(),
                })?;
            Ok((name.to_string(), RawTensor::from_tensor(&t.to_dtype(dt)?)?))
        };
        let row_scales = std::mem::take(&mut self.row_scales);
        for (lw, s) in row_scales {
            let path = self.path(lw);
            if let Some(Quantized::Awq { t, .. }) = self.done.get_mut(&lw) {
                t.divide_rows(&s, &path)?;
            }
            if let Some(b) = &self.model.layer_linear(self.layer, lw).bias {
                let sv = Tensor::from_vec(s, b.dims(), b.device())?.to_dtype(b.dtype())?;
                let name = format!("{path}.bias");
                let e = to_raw(&name, (b / sv)?)?;
                out.insert(name, vec![e]);
            }
        }
        for (i, post) in [false, true].into_iter().enumerate() {
            if let Some(s) = &self.norm_scales[i] {
                let w = self.model.layer_norm_weight(self.layer, post);
                let sv = Tensor::from_vec(s.clone(), w.dims(), w.device())?.to_dtype(w.dtype())?;
                let name = format!(
                    "model.layers.{}.{}.weight",
                    self.layer,
                    if post {
                        "post_attention_layernorm"
                    } else {
                        "input_layernorm"
                    }
                );
                let e = to_raw(&name, (w / sv)?)?;
                out.insert(name, vec![e]);
            }
        }
        let (mut params, mut bytes) = (0, 0);
        for lw in LayerLinear::ALL {
            let path = self.path(lw);
            let q = self.done.get(&lw).ok_or_else(|| ModelError::Tensor {
                name: format!("{path}.weight"),
                message: "was never reached by the calibration forward".into(),
            })?;
            let t = q.tensor();
            let (n, k) = t.shape();
            params += n * k;
            bytes += t.bytes();
            out.insert(format!("{path}.weight"), t.state_dict(&path)?);
        }
        Ok((out, params, bytes))
    }
}

/// Quantizes the full-precision model folder `src` with `method` into `out`, calibrated on
/// `calibration` (required unless RTN). See the module notes.
pub fn quantize_calibrated(
    src: &Path,
    out: &Path,
    method: CalibratedMethod,
    calibration: Option<&CalibrationSpec>,
    opts: QuantizeOptions,
) -> Result<CalibratedSummary> {
    let start = Instant::now();
    let config = ModelConfig::load(src)?;
    // Options are checked against every linear's shape before anything is written.
    let h = config.hidden_size;
    let q_out = config.num_attention_heads * config.head_dim;
    let kv_out = config.num_key_value_heads * config.head_dim;
    let shapes = [
        ("self_attn.q_proj", q_out, h),
        ("self_attn.k_proj", kv_out, h),
        ("self_attn.o_proj", h, q_out),
        ("mlp.down_proj", h, config.intermediate_size),
        ("mlp.up_proj", config.intermediate_size, h),
    ];
    for (m, n, k) in shapes {
        let what = format!("{m} [{n}, {k}]");
        let r = match method {
            CalibratedMethod::Gptq(p) | CalibratedMethod::Rtn(p) => p.check(k, &what),
            CalibratedMethod::Awq(p) => {
                if !n.is_multiple_of(8) {
                    Err(lorq_quant::QuantError::Invalid(format!(
                        "{what}: AWQ GEMM needs output features in multiples of 8"
                    )))
                } else {
                    lorq_quant::rtn::check_grouping(k, 4, p.group_size, &what)
                }
            }
        };
        r.map_err(|e| ModelError::Request(format!("{}: {e}", method.name())))?;
    }
    let tokenizer = Tokenizer::load(src)?;
    let windows = match (calibration, method.needs_calibration()) {
        (Some(spec), _) => calibration_windows(&tokenizer, spec)?,
        (None, true) => {
            return Err(ModelError::Request(format!(
                "{} needs calibration text (--calibration FILE.txt or FILE.jsonl)",
                method.name()
            )))
        }
        _ => vec![],
    };
    let weights = prepare_output(src, out, opts.force)?;
    let device = Device::Cpu;
    let model = LlamaModel::load(config, &weights, DType::F32, &device, None)?;
    let lens: Vec<usize> = windows.iter().map(Vec::len).collect();
    let tokens: usize = lens.iter().sum();
    let n_layers = model.num_layers();
    let progress = progress_bar(n_layers, "layers", method.name(), opts.progress);
    let stored = |name: &str| weights.raw_info(name).map(|(d, _)| d);
    let mut replace = HashMap::new();
    let (mut params, mut bytes) = (0, 0);
    let mut reports = Vec::new();
    let mut x = if tokens > 0 {
        Some(model.embed(&windows.concat())?)
    } else {
        None
    };
    for layer in 0..n_layers {
        progress.set_message(format!("layer {layer}"));
        let mut run = LayerRun {
            model: &model,
            layer,
            method,
            done: HashMap::new(),
            norm_scales: [None, None],
            row_scales: vec![],
            reports: vec![],
        };
        match x.take() {
            Some(h) => {
                let y = model
                    .forward_layer(layer, &h, &lens, &mut |w, lin, inp| run.apply(w, lin, inp))?;
                x = Some(y);
            }
            None => {
                // RTN without calibration: every linear on its own.
                for lw in LayerLinear::ALL {
                    let lin = model.layer_linear(layer, lw);
                    let (n, k) = (lin.out_features(), lin.in_features());
                    let p = match method {
                        CalibratedMethod::Rtn(p) => p,
                        _ => unreachable!("only RTN runs without calibration"),
                    };
                    let path = run.path(lw);
                    let t = rtn_gptq(&f32_weight(lin)?, n, k, &p, &path)?;
                    run.done.insert(lw, Quantized::Gptq(t));
                }
            }
        }
        let mean = |f: fn(&LinearReport) -> f64| {
            run.reports.iter().map(f).sum::<f64>() / run.reports.len().max(1) as f64
        };
        if !run.reports.is_empty() {
            tracing::info!(
                "layer {layer}: mean relative output error {:.4} ({} {:.4})",
                mean(|r| r.rel_error),
                "rtn",
                mean(|r| r.rtn_rel_error)
            );
        }
        reports.append(&mut run.reports);
        let (r, p, b) = run.finish(&stored)?;
        replace.extend(r);
        params += p;
        bytes += b;
        progress.inc(1);
    }
    progress.finish_and_clear();
    drop(x);
    let quantized_linears = n_layers * LayerLinear::ALL.len();
    let (tensors, file_bytes) =
        write_checkpoint(src, out, &weights, replace, method.quantization_config())?;
    Ok(CalibratedSummary {
        summary: QuantizeSummary {
            method: method.name().to_string(),
            out: out.to_path_buf(),
            tensors,
            quantized_linears,
            bytes: file_bytes,
            linear_params: params,
            linear_bytes: bytes,
            bits_per_weight: bits_per_weight(bytes, params),
            seconds: start.elapsed().as_secs_f64(),
        },
        calibration_samples: windows.len(),
        calibration_tokens: tokens,
        linears: reports,
    })
}
