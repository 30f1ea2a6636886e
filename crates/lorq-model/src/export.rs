//! Merge, then quantize, in one step (`lorq export`): the QLoRA write-up's production path.
//!
//! The merged tensors come from [`MergedTensors`] (what `lorq merge` writes), rounded to the merge's
//! output dtype, so the result is byte for byte what `lorq merge` followed by `lorq quantize` on the
//! merged folder writes with the same options:
//!
//! - Methods that quantize one weight on its own ([`QuantMethod::is_jit`]: bitsandbytes, nf4/fp4,
//!   eetq, hqq, fp8) stream: each decoder linear is merged (`W + ΔW`) and quantized at once, only
//!   its quantized form kept; every other tensor is merged/copied while the file is written. No
//!   full-precision merged model is written anywhere.
//! - Calibrated methods (gptq, awq, rtn-int4) need the merged model for the calibration forward:
//!   it is written to a temporary folder next to the output (removed afterwards, also on error)
//!   and quantized there by [`quantize_calibrated`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use lorq_lora::merge::MergeSpec;
use lorq_lora::LoraAdapter;
use lorq_quant::method::QuantMethod;

use crate::calibrate::{quantize_calibrated, CalibratedMethod, CalibratedSummary, CalibrationSpec};
use crate::checkpoint_writer::{bits_per_weight, create_output_dir, QuantizeSummary};
use crate::error::{io_err, ModelError, Result};
use crate::linear::quantize_weight;
use crate::merge_checkpoint::{
    dtype_name, linear_progress, merge_checkpoint, MergeOptions, MergedTensors,
};

/// The quantization `lorq export` applies to the merged model.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportMethod {
    /// A method that quantizes each weight on its own (streamed).
    Jit(QuantMethod),
    /// gptq, awq or rtn-int4, with its calibration text (required unless RTN).
    Calibrated(CalibratedMethod, Option<CalibrationSpec>),
}

impl ExportMethod {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Jit(m) => m.name(),
            Self::Calibrated(m, _) => m.name(),
        }
    }
}

/// What the quantization step reported.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum ExportQuantization {
    Jit(QuantizeSummary),
    Calibrated(CalibratedSummary),
}

impl ExportQuantization {
    pub fn summary(&self) -> &QuantizeSummary {
        match self {
            Self::Jit(s) => s,
            Self::Calibrated(c) => &c.summary,
        }
    }
}

/// What [`export_checkpoint`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    pub strategy: String,
    pub adapters: Vec<PathBuf>,
    pub weights: Vec<f64>,
    /// The base's format as read (see [`crate::merge_checkpoint::MergeSummary::base`]).
    pub base: String,
    /// The dtype the merged weights were rounded to before quantization.
    pub merged_dtype: String,
    /// Linears that received a `ΔW`.
    pub merged_linears: usize,
    /// Whether the merged full-precision model was written (to a temporary folder, since removed).
    pub merged_on_disk: bool,
    #[serde(flatten)]
    pub quantization: ExportQuantization,
    /// Wall time of the whole export (merge and quantization).
    pub total_seconds: f64,
}

/// Removes a folder when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "could not remove the temporary merged model {}: {e}",
                    self.0.display()
                );
            }
        }
    }
}

/// Merges `adapters` into `src` (options of `merge`; `merge.force` applies to `out`) and writes
/// the merged model quantized with `method` to `out` (see the module docs).
pub fn export_checkpoint(
    src: &Path,
    adapters: &[(Arc<LoraAdapter>, f64)],
    spec: &MergeSpec,
    merge: MergeOptions,
    method: &ExportMethod,
    out: &Path,
) -> Result<ExportSummary> {
    let start = Instant::now();
    // Checks adapters, base and dtype before anything is written.
    let merged = MergedTensors::open(src, adapters, spec, merge.dtype, merge.quantize)?;
    let summary = |quantization: ExportQuantization, on_disk: bool| ExportSummary {
        strategy: spec.strategy.name().to_string(),
        adapters: adapters.iter().map(|(a, _)| a.path.clone()).collect(),
        weights: adapters.iter().map(|(_, w)| *w).collect(),
        base: merged.base().to_string(),
        merged_dtype: dtype_name(merged.dtype()).to_string(),
        merged_linears: merged.merged_linears(),
        merged_on_disk: on_disk,
        quantization,
        total_seconds: start.elapsed().as_secs_f64(),
    };
    // A folder this call creates is removed again if the export fails.
    let created = !out.exists();
    let result = export_into(src, adapters, spec, merge, method, out, &merged);
    if result.is_err() && created {
        let _ = std::fs::remove_dir_all(out);
    }
    let (quantization, on_disk) = result?;
    Ok(summary(quantization, on_disk))
}

/// The quantization step of [`export_checkpoint`], and whether the merged model went to disk.
fn export_into(
    src: &Path,
    adapters: &[(Arc<LoraAdapter>, f64)],
    spec: &MergeSpec,
    merge: MergeOptions,
    method: &ExportMethod,
    out: &Path,
    merged: &MergedTensors<'_>,
) -> Result<(ExportQuantization, bool)> {
    match method {
        ExportMethod::Jit(q) => {
            let s = export_jit(merged, *q, out, merge)?;
            Ok((ExportQuantization::Jit(s), false))
        }
        ExportMethod::Calibrated(m, calibration) => {
            if m.needs_calibration() && calibration.is_none() {
                return Err(ModelError::Request(format!(
                    "{} needs calibration text (--calibration FILE.txt or FILE.jsonl)",
                    m.name()
                )));
            }
            create_output_dir(out, merge.force)?;
            let name = out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "export".into());
            let parent = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let tmp = TempDir(parent.join(format!(".{name}.merged-{}", std::process::id())));
            if tmp.0.exists() {
                std::fs::remove_dir_all(&tmp.0).map_err(io_err(&tmp.0))?;
            }
            merge_checkpoint(
                src,
                adapters,
                spec,
                &tmp.0,
                MergeOptions {
                    force: false,
                    ..merge
                },
            )?;
            let s = quantize_calibrated(
                &tmp.0,
                out,
                *m,
                calibration.as_ref(),
                crate::checkpoint_writer::QuantizeOptions {
                    force: true,
                    progress: merge.progress,
                },
            )?;
            drop(tmp);
            Ok((ExportQuantization::Calibrated(s), true))
        }
    }
}

/// Streams merge and quantization linear by linear (JIT methods).
fn export_jit(
    merged: &MergedTensors<'_>,
    method: QuantMethod,
    out: &Path,
    opts: MergeOptions,
) -> Result<QuantizeSummary> {
    let start = Instant::now();
    if !method.is_jit() {
        return Err(ModelError::Request(format!(
            "{} is calibrated: export it as ExportMethod::Calibrated",
            method.name()
        )));
    }
    create_output_dir(out, opts.force)?;
    let progress = linear_progress(merged, "merging and quantizing", opts.progress);
    progress.set_prefix(method.name());
    let mut held = HashMap::new();
    let (mut linear_params, mut linear_bytes, mut quantized_linears) = (0usize, 0usize, 0usize);
    let result = (|| -> Result<()> {
        for t in merged.tensors().iter().filter(|t| t.is_decoder_linear()) {
            progress.set_message(t.name.clone());
            let w = merged.tensor(t)?;
            let q = quantize_weight(method, &t.name, &w)?;
            drop(w);
            let (o, i) = q.shape();
            linear_params += o * i;
            linear_bytes += q.bytes();
            quantized_linears += 1;
            let prefix = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            held.insert(t.name.clone(), q.state_dict(prefix)?);
            progress.inc(1);
        }
        Ok(())
    })();
    let written = result.and_then(|()| merged.write_model(out, held, &progress));
    progress.finish_and_clear();
    let (tensors, bytes) = written?;
    merged.write_config(out, Some(method.quantization_config()))?;
    Ok(QuantizeSummary {
        method: method.name().to_string(),
        out: out.to_path_buf(),
        tensors,
        quantized_linears,
        bytes,
        linear_params,
        linear_bytes,
        bits_per_weight: bits_per_weight(linear_bytes, linear_params),
        seconds: start.elapsed().as_secs_f64(),
    })
}
