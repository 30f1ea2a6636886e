//! Writes a quantized checkpoint in the peer library's own layout (`lorq quantize`).
//!
//! Every decoder linear (`model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.weight`)
//! is read from the full-precision folder as stored, quantized, and kept only in its quantized
//! form (one full-precision tensor in memory at a time); every other tensor (embeddings, norms,
//! `lm_head`, biases) is copied unchanged, as transformers leaves them unquantized. The output
//! folder holds `model.safetensors` (tensor names, dtypes and shapes as the peer writes them, see
//! [`lorq_quant::QuantTensor::state_dict`]), `config.json` = the source config plus the method's
//! `quantization_config` ([`QuantMethod::quantization_config`]), and the tokenizer/generation
//! files of the source folder.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use lorq_quant::method::QuantMethod;
use lorq_quant::RawTensor;

use crate::config::ModelConfig;
use crate::error::{io_err, ModelError, Result};
use crate::linear::quantize_weight;
use crate::prequantized::CheckpointFormat;
use crate::weights::WeightFiles;

/// The decoder linears a checkpoint quantizes, relative to `model.layers.N.`.
pub const QUANTIZED_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Files copied from the source folder when present.
pub const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// What [`quantize_checkpoint`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeSummary {
    pub method: String,
    pub out: PathBuf,
    /// Tensors in the written `model.safetensors`.
    pub tensors: usize,
    /// Linears quantized.
    pub quantized_linears: usize,
    /// Size of `model.safetensors` in bytes.
    pub bytes: u64,
    /// Weights of the quantized linears and the bytes they take (codes and constants).
    pub linear_params: usize,
    pub linear_bytes: usize,
    /// `8 · linear_bytes / linear_params`.
    pub bits_per_weight: f64,
    pub seconds: f64,
}

/// Options of [`quantize_checkpoint`].
#[derive(Debug, Clone, Copy, Default)]
pub struct QuantizeOptions {
    /// Write into an existing non-empty output folder (its files of the same names are replaced).
    pub force: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

fn is_quantized_linear(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return false;
    };
    layer.parse::<usize>().is_ok()
        && rest
            .strip_suffix(".weight")
            .is_some_and(|m| QUANTIZED_LINEARS.contains(&m))
}

/// A tensor of the output file: quantized (held), or copied from the source when written.
enum Entry<'a> {
    Held(RawTensor),
    Copied {
        name: String,
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        weights: &'a WeightFiles,
    },
}

impl safetensors::View for &Entry<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Entry::Held(t) => t.dtype,
            Entry::Copied { dtype, .. } => *dtype,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Entry::Held(t) => &t.shape,
            Entry::Copied { shape, .. } => shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Entry::Held(t) => Cow::Borrowed(&t.data),
            Entry::Copied { name, weights, .. } => Cow::Owned(
                weights
                    .get_raw(name)
                    .map(|r| r.data)
                    .unwrap_or_else(|| vec![0u8; self.data_len()]),
            ),
        }
    }
    fn data_len(&self) -> usize {
        let n: usize = self.shape().iter().product();
        n * self.dtype().bitsize() / 8
    }
}

/// Quantizes the full-precision model folder `src` with `method` into `out` (see the module docs).
pub fn quantize_checkpoint(
    src: &Path,
    out: &Path,
    method: QuantMethod,
    opts: QuantizeOptions,
) -> Result<QuantizeSummary> {
    quantize_checkpoint_on(src, out, method, opts, &Device::Cpu)
}

/// [`quantize_checkpoint`] with each linear quantized on `device` (a GPU quantizes there; the
/// written checkpoint is the same).
pub fn quantize_checkpoint_on(
    src: &Path,
    out: &Path,
    method: QuantMethod,
    opts: QuantizeOptions,
    device: &Device,
) -> Result<QuantizeSummary> {
    let start = Instant::now();
    if !method.is_jit() {
        return Err(ModelError::Request(format!(
            "{} needs calibration data: run `lorq quantize --method {} --calibration FILE` \
             (lorq also loads checkpoints made by GPTQModel / AutoAWQ directly)",
            method.name(),
            method.name()
        )));
    }
    let weights = prepare_output(src, out, opts.force)?;
    let names: Vec<String> = weights.inventory().into_iter().map(|(n, ..)| n).collect();
    let linears: Vec<&String> = names.iter().filter(|n| is_quantized_linear(n)).collect();
    let progress = progress_bar(linears.len(), "linears", method.name(), opts.progress);
    let mut replace = HashMap::new();
    let (mut linear_params, mut linear_bytes) = (0usize, 0usize);
    for name in &linears {
        progress.set_message((*name).clone());
        let (_, shape) = weights.raw_info(name).ok_or_else(|| ModelError::Tensor {
            name: (*name).clone(),
            message: "missing".into(),
        })?;
        let w = weights.load_as_stored(name, &shape, device)?;
        let q = quantize_weight(method, name, &w)?;
        drop(w);
        let (o, i) = q.shape();
        linear_params += o * i;
        linear_bytes += q.bytes();
        let prefix = name.strip_suffix(".weight").expect("a .weight name");
        replace.insert((*name).clone(), q.state_dict(prefix)?);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let (tensors, bytes) =
        write_checkpoint(src, out, &weights, replace, method.quantization_config())?;
    Ok(QuantizeSummary {
        method: method.name().to_string(),
        out: out.to_path_buf(),
        tensors,
        quantized_linears: linears.len(),
        bytes,
        linear_params,
        linear_bytes,
        bits_per_weight: bits_per_weight(linear_bytes, linear_params),
        seconds: start.elapsed().as_secs_f64(),
    })
}

pub(crate) fn bits_per_weight(bytes: usize, params: usize) -> f64 {
    if params == 0 {
        0.0
    } else {
        8.0 * bytes as f64 / params as f64
    }
}

/// A progress bar over `len` `unit` on stderr (hidden unless `show`).
pub(crate) fn progress_bar(
    len: usize,
    unit: &str,
    prefix: &str,
    show: bool,
) -> indicatif::ProgressBar {
    let progress = indicatif::ProgressBar::new(len as u64);
    if show {
        if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
            "quantizing ({{prefix}}) [{{bar:30}}] {{pos}}/{{len}} {unit}, {{eta}} left {{wide_msg}}"
        )) {
            progress.set_style(style.progress_chars("=> "));
        }
        progress.set_prefix(prefix.to_string());
    } else {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    progress
}

/// Tensors written instead of a source tensor, keyed by the source tensor's name.
pub(crate) type Replacements = HashMap<String, Vec<(String, RawTensor)>>;

/// Opens the full-precision weights of `src` (refusing a pre-quantized folder) and creates `out`
/// (which must be empty unless `force`).
pub(crate) fn prepare_output(src: &Path, out: &Path, force: bool) -> Result<WeightFiles> {
    let config = ModelConfig::load(src)?;
    let weights = WeightFiles::open(src)?;
    if let Some(f) = CheckpointFormat::detect(&config, &weights, src)? {
        return Err(ModelError::Request(format!(
            "{} is already quantized ({}); `lorq quantize` needs a full-precision (f32/f16/bf16) model folder",
            src.display(),
            f.method_name()
        )));
    }
    create_output_dir(out, force)?;
    Ok(weights)
}

/// Creates the output folder `out`, which must be empty unless `force`.
pub(crate) fn create_output_dir(out: &Path, force: bool) -> Result<()> {
    if out.exists() {
        let non_empty = std::fs::read_dir(out)
            .map_err(io_err(out))?
            .next()
            .is_some();
        if non_empty && !force {
            return Err(ModelError::Request(format!(
                "output folder {} exists and is not empty (pass --force to write into it)",
                out.display()
            )));
        }
    }
    std::fs::create_dir_all(out).map_err(io_err(out))
}

/// Writes `out/model.safetensors` (metadata `{"format": "pt"}`, mode 0644) from `entries`, whose
/// data is read one tensor at a time while writing. Returns the file's path.
pub(crate) fn write_model_file<'a, V: safetensors::View>(
    out: &Path,
    entries: impl IntoIterator<Item = (&'a str, V)>,
) -> Result<PathBuf> {
    let file = out.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(entries, Some(metadata), &file).map_err(|e| {
        ModelError::Weights {
            dir: out.to_path_buf(),
            message: format!("writing model.safetensors: {e}"),
        }
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))
            .map_err(io_err(&file))?;
    }
    Ok(file)
}

/// Writes `out/config.json` = the source's `config.json` changed by `edit`, and copies the
/// tokenizer, chat template and generation files ([`COPIED_FILES`]) of `src`.
pub(crate) fn write_config_and_copy_files(
    src: &Path,
    out: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Result<()> {
    let cfg_path = src.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: cfg_path.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
    let obj = cfg.as_object_mut().ok_or_else(|| ModelError::Config {
        path: cfg_path.clone(),
        message: "not a JSON object".into(),
    })?;
    edit(obj);
    let out_cfg = out.join("config.json");
    let mut s = serde_json::to_string_pretty(&cfg).expect("JSON value serializes");
    s.push('\n');
    std::fs::write(&out_cfg, s).map_err(io_err(&out_cfg))?;
    for f in COPIED_FILES {
        let p = src.join(f);
        if p.exists() {
            std::fs::copy(&p, out.join(f)).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// Writes `out/model.safetensors` with every tensor of `weights` copied as stored, except those
/// named in `replace`, which are written as the tensors given there (a quantized linear's
/// `qweight`, `scales`, ..., or a changed norm weight); `out/config.json` = the source's plus
/// `quantization_config`; and the tokenizer/generation files. Returns the number of tensors
/// written and the bytes of `model.safetensors`.
pub(crate) fn write_checkpoint(
    src: &Path,
    out: &Path,
    weights: &WeightFiles,
    mut replace: Replacements,
    quantization_config: serde_json::Value,
) -> Result<(usize, u64)> {
    let mut entries: Vec<(String, Entry<'_>)> = Vec::new();
    for (name, ..) in weights.inventory() {
        if let Some(ts) = replace.remove(&name) {
            entries.extend(ts.into_iter().map(|(n, t)| (n, Entry::Held(t))));
            continue;
        }
        let (dtype, shape) = weights.raw_info(&name).ok_or_else(|| ModelError::Tensor {
            name: name.clone(),
            message: "missing".into(),
        })?;
        entries.push((
            name.clone(),
            Entry::Copied {
                name,
                dtype,
                shape,
                weights,
            },
        ));
    }
    if let Some(name) = replace.keys().next() {
        return Err(ModelError::Tensor {
            name: name.clone(),
            message: format!("not in the weights of {}", src.display()),
        });
    }

    let file = write_model_file(out, entries.iter().map(|(n, e)| (n.as_str(), e)))?;
    // config.json: the source's, plus quantization_config.
    write_config_and_copy_files(src, out, |obj| {
        obj.insert("quantization_config".into(), quantization_config);
    })?;
    let bytes = std::fs::metadata(&file).map_err(io_err(&file))?.len();
    Ok((entries.len(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_names() {
        assert!(is_quantized_linear(
            "model.layers.0.self_attn.q_proj.weight"
        ));
        assert!(is_quantized_linear("model.layers.12.mlp.down_proj.weight"));
        assert!(!is_quantized_linear("model.layers.0.self_attn.q_proj.bias"));
        assert!(!is_quantized_linear(
            "model.layers.0.input_layernorm.weight"
        ));
        assert!(!is_quantized_linear("lm_head.weight"));
        assert!(!is_quantized_linear("model.embed_tokens.weight"));
    }
}
