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
//! holds one weight (plus the adapters) at a time. [`MergedTensors`] yields the merged tensors
//! one at a time for other writers too (`lorq export` quantizes them as they come).

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
    create_output_dir, write_config_and_copy_files, write_model_file, Replacements,
    QUANTIZED_LINEARS,
};
use crate::config::ModelConfig;
use crate::error::{io_err, ModelError, Result};
use crate::linear::quantize_weight;
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
pub(crate) fn dtype_name(d: DType) -> &'static str {
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

/// One tensor of a merged checkpoint, in the order [`MergedTensors`] yields them.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// The linear module (`model.layers.N.self_attn.q_proj`, `lm_head`) when the tensor is a
    /// linear weight that may receive a `ΔW`; `None` for tensors copied from the source.
    pub module: Option<String>,
}

impl PlannedTensor {
    /// A decoder linear's weight: what quantized checkpoints store quantized (never `lm_head`).
    pub fn is_decoder_linear(&self) -> bool {
        self.module.as_deref().is_some_and(|m| m != "lm_head")
    }
}

/// The tensors of a base checkpoint with adapters merged into it, computed one at a time on
/// request (see the module docs): what `lorq merge` writes and `lorq export` quantizes.
pub struct MergedTensors<'a> {
    src: PathBuf,
    config: ModelConfig,
    weights: WeightFiles,
    format: Option<CheckpointFormat>,
    quantize: Option<QuantMethod>,
    adapters: &'a [(Arc<LoraAdapter>, f64)],
    spec: &'a MergeSpec,
    dtype: DType,
    plan: Vec<PlannedTensor>,
    merged_linears: usize,
    base: String,
}

impl<'a> MergedTensors<'a> {
    /// Opens `src` and checks every adapted module against the base (nothing is computed yet).
    /// `dtype` and `quantize` as in [`MergeOptions`].
    pub fn open(
        src: &Path,
        adapters: &'a [(Arc<LoraAdapter>, f64)],
        spec: &'a MergeSpec,
        dtype: Option<DType>,
        quantize: Option<QuantMethod>,
    ) -> Result<Self> {
        let config = ModelConfig::load(src)?;
        let weights = WeightFiles::open(src)?;
        let format = CheckpointFormat::detect(&config, &weights, src)?;
        if let Some(f) = &format {
            f.check_requested(quantize)?;
        } else if let Some(q) = quantize {
            if !q.is_jit() {
                return Err(ModelError::Request(format!(
                    "--quantize {} needs a calibrated, pre-quantized checkpoint; pass that checkpoint as \
                     the model instead (it is dequantized before merging)",
                    q.name()
                )));
            }
        }
        let quantize = if format.is_some() { None } else { quantize };
        let dtype = match dtype {
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
        let (plan, linears) = plan_tensors(&config, &weights);
        let merged_linears = check_adapters(&config, adapters, spec, &linears)?;
        let wanted: std::collections::HashSet<&str> =
            plan.iter().map(|t| t.name.as_str()).collect();
        for (name, ..) in weights.inventory() {
            if !wanted.contains(name.as_str()) {
                if format.is_some() {
                    tracing::debug!("not written (quantization state): {name}");
                } else {
                    tracing::warn!(
                        "{name} is not a tensor of the {} architecture; not written",
                        config.architecture.name()
                    );
                }
            }
        }
        let base = match (&format, quantize) {
            (Some(f), _) => f.method_name(),
            (None, Some(q)) => format!("{} (quantized, then dequantized)", q.name()),
            (None, None) => weights
                .raw_info("model.layers.0.self_attn.q_proj.weight")
                .map(|(d, _)| format!("{d:?}").to_lowercase())
                .unwrap_or_else(|| "unknown".into()),
        };
        Ok(Self {
            src: src.to_path_buf(),
            config,
            weights,
            format,
            quantize,
            adapters,
            spec,
            dtype,
            plan,
            merged_linears,
            base,
        })
    }

    /// The tensors of the merged checkpoint (the plain architecture's, `lm_head` when the source
    /// has one), in order.
    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.plan
    }

    /// The output dtype every tensor is rounded to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Linears that receive a `ΔW`.
    pub fn merged_linears(&self) -> usize {
        self.merged_linears
    }

    /// The base's format as read (see [`MergeSummary::base`]).
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Tensor `t` of the merged checkpoint in the output dtype: a linear is its base weight
    /// (dequantized if needed) plus the merged `ΔW`, summed in f32; other tensors are the source's.
    pub fn tensor(&self, t: &PlannedTensor) -> Result<Tensor> {
        let dev = Device::Cpu;
        let Some(module) = &t.module else {
            return Ok(self
                .weights
                .load_as_stored(&t.name, &t.shape, &dev)?
                .to_dtype(self.dtype)?);
        };
        let shape = (t.shape[0], t.shape[1]);
        // lm_head is never quantized, as the peers and lorq's loader leave it.
        let (format, quantize) = match t.is_decoder_linear() {
            true => (self.format.as_ref(), self.quantize),
            false => (None, None),
        };
        let w = match (format, quantize) {
            (Some(f), _) => f
                .load_linear(&self.weights, module, shape, &dev)?
                .dequantize(DType::F32)?,
            (None, Some(q)) => {
                let w = self.weights.load_as_stored(&t.name, &t.shape, &dev)?;
                quantize_weight(q, &t.name, &w)?.dequantize(DType::F32)?
            }
            (None, None) => self
                .weights
                .load_as_stored(&t.name, &t.shape, &dev)?
                .to_dtype(DType::F32)?,
        };
        let merged =
            match merged_module_delta(self.adapters, self.spec, module, &DareMasks::Seeded)? {
                Some(delta) => (w + delta.to_device(&dev)?)?,
                None => w,
            };
        Ok(merged.to_dtype(self.dtype)?)
    }

    /// Writes `out/config.json` (the source's without `quantization_config`, `dtype` set to the
    /// output dtype, plus `quantization_config` when given) and copies the tokenizer, chat
    /// template and generation files.
    pub fn write_config(
        &self,
        out: &Path,
        quantization_config: Option<serde_json::Value>,
    ) -> Result<()> {
        let dtype = self.dtype;
        write_config_and_copy_files(&self.src, out, |obj| {
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
            if let Some(q) = quantization_config {
                obj.insert("quantization_config".into(), q);
            }
        })
    }

    /// Writes `out/model.safetensors`: every planned tensor, computed while the file is written,
    /// except those named in `held`, which are written as the tensors given there (a quantized
    /// linear's state dict). Returns the number of tensors written and the file's bytes; on error
    /// the file is removed.
    pub(crate) fn write_model(
        &self,
        out: &Path,
        mut held: Replacements,
        progress: &indicatif::ProgressBar,
    ) -> Result<(usize, u64)> {
        let writer = Writer {
            merged: self,
            error: Mutex::new(None),
            progress,
        };
        let mut entries: Vec<(String, Entry<'_>)> = Vec::new();
        for t in &self.plan {
            match held.remove(&t.name) {
                Some(ts) => entries.extend(ts.into_iter().map(|(n, r)| {
                    (
                        n,
                        Entry {
                            source: Source::Held(r),
                            writer: &writer,
                        },
                    )
                })),
                None => entries.push((
                    t.name.clone(),
                    Entry {
                        source: Source::Merged(t),
                        writer: &writer,
                    },
                )),
            }
        }
        if let Some(name) = held.keys().next() {
            return Err(ModelError::Tensor {
                name: name.clone(),
                message: "not a tensor of the merged checkpoint".into(),
            });
        }
        let written = write_model_file(out, entries.iter().map(|(n, e)| (n.as_str(), e)));
        let failed = writer
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(e) = failed {
            let _ = std::fs::remove_file(out.join("model.safetensors"));
            return Err(e);
        }
        let file = written?;
        let bytes = std::fs::metadata(&file).map_err(io_err(&file))?.len();
        Ok((entries.len(), bytes))
    }
}

/// The tensors of the plain architecture of `c` (with `lm_head` when `weights` has one), and the
/// shapes `[out, in]` of the linears that may be adapted.
fn plan_tensors(
    c: &ModelConfig,
    weights: &WeightFiles,
) -> (Vec<PlannedTensor>, BTreeMap<String, (usize, usize)>) {
    let h = c.hidden_size;
    let t = |name: String, shape: Vec<usize>, module: Option<String>| PlannedTensor {
        name,
        shape,
        module,
    };
    let mut plan = vec![t(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
        None,
    )];
    let mut linears = BTreeMap::new();
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            plan.push(t(format!("{p}.{norm}.weight"), vec![h], None));
        }
        for m in QUANTIZED_LINEARS {
            let (o, inp) = linear_shape(c, m);
            let module = format!("{p}.{m}");
            plan.push(t(
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
                plan.push(t(format!("{module}.bias"), vec![o], None));
            }
            linears.insert(module, (o, inp));
        }
    }
    plan.push(t("model.norm.weight".into(), vec![h], None));
    if weights.contains("lm_head.weight") {
        plan.push(t(
            "lm_head.weight".into(),
            vec![c.vocab_size, h],
            Some("lm_head".into()),
        ));
        if !c.tie_word_embeddings {
            linears.insert("lm_head".into(), (c.vocab_size, h));
        }
    }
    (plan, linears)
}

/// Every adapted module must be a linear of this model with the adapter's shape. Returns the
/// number of adapted modules.
fn check_adapters(
    c: &ModelConfig,
    adapters: &[(Arc<LoraAdapter>, f64)],
    spec: &MergeSpec,
    linears: &BTreeMap<String, (usize, usize)>,
) -> Result<usize> {
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
    Ok(modules.len())
}

/// Writing a merged checkpoint: the first error met (a [`safetensors::View`] cannot return one)
/// and the progress bar, advanced once per linear computed.
struct Writer<'a> {
    merged: &'a MergedTensors<'a>,
    error: Mutex<Option<ModelError>>,
    progress: &'a indicatif::ProgressBar,
}

enum Source<'a> {
    /// Computed while written.
    Merged(&'a PlannedTensor),
    /// Computed before (a quantized linear's tensors).
    Held(RawTensor),
}

struct Entry<'a> {
    source: Source<'a>,
    writer: &'a Writer<'a>,
}

impl Entry<'_> {
    fn compute(&self, t: &PlannedTensor) -> Result<Vec<u8>> {
        if let Some(m) = &t.module {
            self.writer.progress.set_message(m.clone());
        }
        let data = RawTensor::from_tensor(&self.writer.merged.tensor(t)?)?.data;
        if t.module.is_some() {
            self.writer.progress.inc(1);
        }
        let want = safetensors::View::data_len(&self);
        if data.len() != want {
            return Err(ModelError::Tensor {
                name: t.name.clone(),
                message: format!("{} bytes computed, {want} expected", data.len()),
            });
        }
        Ok(data)
    }
}

impl safetensors::View for &Entry<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match &self.source {
            Source::Held(r) => r.dtype,
            Source::Merged(_) => st_dtype(self.writer.merged.dtype),
        }
    }
    fn shape(&self) -> &[usize] {
        match &self.source {
            Source::Held(r) => &r.shape,
            Source::Merged(t) => &t.shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let t = match &self.source {
            Source::Held(r) => return Cow::Borrowed(&r.data),
            Source::Merged(t) => t,
        };
        match self.compute(t) {
            Ok(d) => Cow::Owned(d),
            Err(err) => {
                let mut slot = self.writer.error.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(err);
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        let n: usize = self.shape().iter().product();
        n * self.dtype().bitsize() / 8
    }
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    }
}

/// A progress bar over the linears of `merged` on stderr (hidden unless `show`).
pub(crate) fn linear_progress(
    merged: &MergedTensors<'_>,
    what: &str,
    show: bool,
) -> indicatif::ProgressBar {
    let n = merged
        .tensors()
        .iter()
        .filter(|t| t.module.is_some())
        .count();
    let progress = indicatif::ProgressBar::new(n as u64);
    if show {
        if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
            "{what} ({{prefix}}) [{{bar:30}}] {{pos}}/{{len}} linears, {{eta}} left {{wide_msg}}"
        )) {
            progress.set_style(style.progress_chars("=> "));
        }
    } else {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    progress
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
    let merged = MergedTensors::open(src, adapters, spec, opts.dtype, opts.quantize)?;
    create_output_dir(out, opts.force)?;
    let progress = linear_progress(&merged, "merging", opts.progress);
    progress.set_prefix(spec.strategy.name());
    let written = merged.write_model(out, Replacements::new(), &progress);
    progress.finish_and_clear();
    let (tensors, bytes) = written?;
    merged.write_config(out, None)?;
    Ok(MergeSummary {
        out: out.to_path_buf(),
        strategy: spec.strategy.name().to_string(),
        adapters: adapters.iter().map(|(a, _)| a.path.clone()).collect(),
        weights: adapters.iter().map(|(_, w)| *w).collect(),
        base: merged.base().to_string(),
        dtype: dtype_name(merged.dtype()).to_string(),
        tensors,
        merged_linears: merged.merged_linears(),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
