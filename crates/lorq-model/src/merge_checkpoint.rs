//! Merges LoRA adapters into a base checkpoint (`lorq merge`): every adapted linear becomes
//! `W + ΔW`, with `ΔW` the adapters combined in ΔW space by [`lorq_lora::merge`] (the same
//! per-module computation the server uses for merged adapters).
//!
//! The base may be full precision or quantized: a pre-quantized checkpoint (`quantization_config`
//! or hqq tensors) is read in its format and dequantized, and `quantize` reproduces the quantized
//! base an adapter was trained on (QLoRA: `bitsandbytes-nf4`) by quantizing and dequantizing each
//! linear first. The sum is formed in f32 and rounded once to the output dtype.
//!
//! The output is a plain Hugging Face folder: `model.safetensors` with exactly the tensors of the
//! unquantized architecture (embeddings, norms, linears, biases, `lm_head` when the source has
//! one) in the output dtype, `config.json` = the source's without `quantization_config` and with
//! `dtype`/`torch_dtype` set to the output dtype, and the tokenizer, chat template and generation
//! files of the source. Tensors are produced one at a time while the file is written, so memory
//! holds one weight (plus the adapters) at a time.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lorq_lora::merge::{merged_module_delta, merged_modules, DareMasks, MergeSpec};
use lorq_lora::LoraAdapter;
use lorq_quant::method::QuantMethod;
use lorq_quant::RawTensor;

use crate::checkpoint_writer::{
    create_output_dir, write_config_and_copy_files, write_model_file, QUANTIZED_LINEARS,
};
use crate::config::ModelConfig;
use crate::error::{io_err, ModelError, Result};
use crate::prequantized::CheckpointFormat;
use crate::weights::WeightFiles;

/// Options of [`merge_checkpoint`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeOptions {
    /// Output dtype (f32, f16 or bf16); `None`: the source config's `dtype`/`torch_dtype`, else f32.
    pub dtype: Option<DType>,
    /// Quantize and dequantize each linear of a full-precision base before adding `ΔW`.
    pub quantize: Option<QuantMethod>,
    /// Write into an existing non-empty output folder (its files of the same names are replaced).
    pub force: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// What [`merge_checkpoint`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeSummary {
    pub out: PathBuf,
    pub strategy: String,
    pub adapters: Vec<PathBuf>,
    pub weights: Vec<f64>,
    /// The base's format as read: `f32`/`f16`/`bf16`, a pre-quantized method name, or
    /// `<method> (quantized, then dequantized)`.
    pub base: String,
    pub dtype: String,
    /// Tensors in the written `model.safetensors`.
    pub tensors: usize,
    /// Linears that received a `ΔW`.
    pub merged_linears: usize,
    /// Size of `model.safetensors` in bytes.
    pub bytes: u64,
    pub seconds: f64,
}

/// The `config.json` spelling of a float dtype.
fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// The weight shape `[out, in]` of linear `module` (relative to `model.layers.N.`).
fn linear_shape(c: &ModelConfig, module: &str) -> (usize, usize) {
    let h = c.hidden_size;
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    match module {
        "self_attn.q_proj" => (q, h),
        "self_attn.k_proj" | "self_attn.v_proj" => (kv, h),
        "self_attn.o_proj" => (h, q),
        "mlp.gate_proj" | "mlp.up_proj" => (c.intermediate_size, h),
        "mlp.down_proj" => (h, c.intermediate_size),
        other => unreachable!("not a decoder linear: {other}"),
    }
}

/// One tensor of the output file.
enum Kind {
    /// Copied from the source (converted to the output dtype).
    Copy,
    /// A linear weight: base (dequantized if needed) plus the merged `ΔW`. `lm_head` is never
    /// quantized (`quantized` false), as the peers and lorq's loader leave it.
    Linear { module: String, quantized: bool },
}

struct Entry<'a> {
    name: String,
    shape: Vec<usize>,
    kind: Kind,
    ctx: &'a Ctx<'a>,
}

/// What the tensors are computed from, and the first error met while writing (a
/// [`safetensors::View`] cannot return one).
struct Ctx<'a> {
    weights: &'a WeightFiles,
    format: Option<CheckpointFormat>,
    quantize: Option<QuantMethod>,
    adapters: &'a [(Arc<LoraAdapter>, f64)],
    spec: &'a MergeSpec,
    dtype: DType,
    st_dtype: safetensors::Dtype,
    error: Mutex<Option<ModelError>>,
    progress: indicatif::ProgressBar,
}

impl Ctx<'_> {
    fn tensor(&self, e: &Entry<'_>) -> Result<Tensor> {
        let dev = Device::Cpu;
        match &e.kind {
            Kind::Copy => Ok(self
                .weights
                .load_as_stored(&e.name, &e.shape, &dev)?
                .to_dtype(self.dtype)?),
            Kind::Linear { module, quantized } => {
                self.progress.set_message(module.clone());
                let shape = (e.shape[0], e.shape[1]);
                let (format, quantize) = match quantized {
                    true => (self.format.as_ref(), self.quantize),
                    false => (None, None),
                };
                let w = match (format, quantize) {
                    (Some(f), _) => f
                        .load_linear(self.weights, module, shape, &dev)?
                        .dequantize(DType::F32)?,
                    (None, Some(q)) => {
                        let w = self.weights.load_as_stored(&e.name, &e.shape, &dev)?;
                        q.quantize(&w)
                            .map_err(|err| ModelError::Tensor {
                                name: e.name.clone(),
                                message: format!("{} quantization failed: {err}", q.name()),
                            })?
                            .dequantize(DType::F32)?
                    }
                    (None, None) => self
                        .weights
                        .load_as_stored(&e.name, &e.shape, &dev)?
                        .to_dtype(DType::F32)?,
                };
                let merged = match merged_module_delta(
                    self.adapters,
                    self.spec,
                    module,
                    &DareMasks::Seeded,
                )? {
                    Some(delta) => (w + delta.to_device(&dev)?)?,
                    None => w,
                };
                self.progress.inc(1);
                Ok(merged.to_dtype(self.dtype)?)
            }
        }
    }
}

impl safetensors::View for &Entry<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.ctx.st_dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let computed = self
            .ctx
            .tensor(self)
            .and_then(|t| Ok(RawTensor::from_tensor(&t)?.data));
        match computed {
            Ok(d) if d.len() == self.data_len() => Cow::Owned(d),
            other => {
                let err = match other {
                    Err(e) => e,
                    Ok(d) => ModelError::Tensor {
                        name: self.name.clone(),
                        message: format!(
                            "{} bytes computed, {} expected",
                            d.len(),
                            self.data_len()
                        ),
                    },
                };
                let mut slot = self.ctx.error.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(err);
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.ctx.dtype.size_in_bytes()
    }
}

/// Merges `adapters` (each with its weight, combined per `spec`) into the model folder `src` and
/// writes a plain checkpoint to `out` (see the module docs).
pub fn merge_checkpoint(
    src: &Path,
    adapters: &[(Arc<LoraAdapter>, f64)],
    spec: &MergeSpec,
    out: &Path,
    opts: MergeOptions,
) -> Result<MergeSummary> {
    let start = Instant::now();
    let config = ModelConfig::load(src)?;
    let weights = WeightFiles::open(src)?;
    let format = CheckpointFormat::detect(&config, &weights, src)?;
    if let Some(f) = &format {
        f.check_requested(opts.quantize)?;
    } else if let Some(q) = opts.quantize {
        if !q.is_jit() {
            return Err(ModelError::Request(format!(
                "--quantize {} needs a calibrated, pre-quantized checkpoint; pass that checkpoint as \
                 the model instead (it is dequantized before merging)",
                q.name()
            )));
        }
    }
    let quantize = if format.is_some() {
        None
    } else {
        opts.quantize
    };
    let dtype = match opts.dtype {
        Some(d @ (DType::F32 | DType::F16 | DType::BF16)) => d,
        Some(other) => {
            return Err(ModelError::Request(format!(
                "output dtype {other:?} is not one of f32, f16, bf16"
            )))
        }
        None => match config.torch_dtype.as_deref() {
            Some("float16") => DType::F16,
            Some("bfloat16") => DType::BF16,
            _ => DType::F32,
        },
    };
    let st_dtype = match dtype {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    };

    // The tensors of the plain architecture, and the linears' shapes.
    let c = &config;
    let h = c.hidden_size;
    let mut plan: Vec<(String, Vec<usize>, Option<String>)> = Vec::new(); // name, shape, linear module
    plan.push((
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
        None,
    ));
    let mut linears: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            plan.push((format!("{p}.{norm}.weight"), vec![h], None));
        }
        for m in QUANTIZED_LINEARS {
            let (o, inp) = linear_shape(c, m);
            let module = format!("{p}.{m}");
            plan.push((
                format!("{module}.weight"),
                vec![o, inp],
                Some(module.clone()),
            ));
            let bias = match m {
                "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => c.qkv_bias,
                "self_attn.o_proj" => c.o_bias,
                _ => c.mlp_bias,
            };
            if bias {
                plan.push((format!("{module}.bias"), vec![o], None));
            }
            linears.insert(module, (o, inp));
        }
    }
    plan.push(("model.norm.weight".into(), vec![h], None));
    let has_lm_head = weights.contains("lm_head.weight");
    if has_lm_head {
        plan.push((
            "lm_head.weight".into(),
            vec![c.vocab_size, h],
            Some("lm_head".into()),
        ));
        if !c.tie_word_embeddings {
            linears.insert("lm_head".into(), (c.vocab_size, h));
        }
    }

    // Every adapted module must be a linear of this model with the adapter's shape.
    let modules = merged_modules(adapters, spec)?;
    for (module, &(o, inp)) in &modules {
        let owner = adapters
            .iter()
            .find(|(a, _)| a.module(module).is_some())
            .map(|(a, _)| a.path.clone())
            .unwrap_or_default();
        let mismatch = |message: String| ModelError::AdapterMismatch {
            adapter: owner.clone(),
            message,
        };
        if module == "lm_head" && c.tie_word_embeddings {
            return Err(mismatch(
                "adapts lm_head, but this model ties lm_head to the input embeddings: merging would \
                 change the embeddings too"
                    .into(),
            ));
        }
        match linears.get(module) {
            None => {
                return Err(mismatch(format!(
                    "targets module {module:?}, which this model ({}) does not have",
                    c.architecture.name()
                )))
            }
            Some(&(lo, li)) if (lo, li) != (o, inp) => {
                return Err(mismatch(format!(
                    "module {module}: the adapter's delta [out {o}, in {inp}] does not fit the base weight [out {lo}, in {li}]"
                )))
            }
            Some(_) => {}
        }
    }
    let plain: std::collections::HashSet<&str> = plan.iter().map(|(n, ..)| n.as_str()).collect();
    for (name, ..) in weights.inventory() {
        if !plain.contains(name.as_str()) {
            if format.is_some() {
                tracing::debug!("not written (quantization state): {name}");
            } else {
                tracing::warn!(
                    "{name} is not a tensor of the {} architecture; not written",
                    c.architecture.name()
                );
            }
        }
    }

    create_output_dir(out, opts.force)?;

    let n_linears = plan.iter().filter(|(_, _, l)| l.is_some()).count();
    let progress = indicatif::ProgressBar::new(n_linears as u64);
    if opts.progress {
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "merging ({prefix}) [{bar:30}] {pos}/{len} linears, {eta} left {wide_msg}",
        ) {
            progress.set_style(style.progress_chars("=> "));
        }
        progress.set_prefix(spec.strategy.name());
    } else {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let base = match (&format, quantize) {
        (Some(f), _) => f.method_name(),
        (None, Some(q)) => format!("{} (quantized, then dequantized)", q.name()),
        (None, None) => weights
            .raw_info("model.layers.0.self_attn.q_proj.weight")
            .map(|(d, _)| format!("{d:?}").to_lowercase())
            .unwrap_or_else(|| "unknown".into()),
    };
    let ctx = Ctx {
        weights: &weights,
        format,
        quantize,
        adapters,
        spec,
        dtype,
        st_dtype,
        error: Mutex::new(None),
        progress,
    };
    let entries: Vec<Entry<'_>> = plan
        .into_iter()
        .map(|(name, shape, linear)| Entry {
            name,
            shape,
            kind: match linear {
                Some(module) => Kind::Linear {
                    quantized: module != "lm_head",
                    module,
                },
                None => Kind::Copy,
            },
            ctx: &ctx,
        })
        .collect();
    let written = write_model_file(out, entries.iter().map(|e| (e.name.as_str(), e)));
    ctx.progress.finish_and_clear();
    let failed = ctx.error.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(e) = failed {
        let _ = std::fs::remove_file(out.join("model.safetensors"));
        return Err(e);
    }
    let file = written?;
    // config.json: the source's, unquantized, in the output dtype.
    write_config_and_copy_files(src, out, |obj| {
        obj.remove("quantization_config");
        let mut set = false;
        for key in ["dtype", "torch_dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), dtype_name(dtype).into());
                set = true;
            }
        }
        if !set {
            obj.insert("dtype".into(), dtype_name(dtype).into());
        }
    })?;
    let bytes = std::fs::metadata(&file).map_err(io_err(&file))?.len();
    Ok(MergeSummary {
        out: out.to_path_buf(),
        strategy: spec.strategy.name().to_string(),
        adapters: adapters.iter().map(|(a, _)| a.path.clone()).collect(),
        weights: adapters.iter().map(|(_, w)| *w).collect(),
        base,
        dtype: dtype_name(dtype).to_string(),
        tensors: entries.len(),
        merged_linears: modules.len(),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
