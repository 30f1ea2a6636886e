//! Streaming `model.safetensors` writer: the safetensors crate asks each tensor for its bytes in
//! turn, and only then is that tensor read from the GGUF file and dequantized, so at most one tensor's
//! f32 values are in memory at a time.

use super::tensors::{load_f32, TensorPlan};
use super::GgufImportError;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// Shared state of the streaming writer: safetensors asks each tensor for its bytes in turn.
struct Source<'p, R> {
    path: &'p Path,
    reader: RefCell<R>,
    tensor_data_offset: u64,
    error: RefCell<Option<GgufImportError>>,
    progress: indicatif::ProgressBar,
}

/// A tensor whose f32 bytes are produced only when the writer asks for them.
struct LazyTensor<'a, 'b, R> {
    plan: &'b TensorPlan<'a>,
    source: &'b Source<'b, R>,
}

impl<R: Read + Seek> View for LazyTensor<'_, '_, R> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.plan.info.shape.dims()
    }
    fn data_len(&self) -> usize {
        self.plan.info.shape.elem_count() * 4
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let src = self.source;
        src.progress.set_message(self.plan.hf_name.clone());
        if src.error.borrow().is_none() {
            let loaded = load_f32(
                src.path,
                &mut *src.reader.borrow_mut(),
                src.tensor_data_offset,
                self.plan,
            );
            src.progress.inc(1);
            match loaded {
                Ok(values) => return Cow::Owned(f32_le_bytes(&values)),
                Err(e) => *src.error.borrow_mut() = Some(e),
            }
        }
        // After a failure the file is discarded; fill the space so the writer can finish.
        Cow::Owned(vec![0u8; self.data_len()])
    }
}

/// Writes all planned tensors as F32 to `out_file` with metadata `{"format": "pt"}`, reading and
/// dequantizing one tensor at a time. On failure no `out_file` is left behind.
pub(crate) fn write_safetensors<R: Read + Seek>(
    path: &Path,
    reader: R,
    tensor_data_offset: u64,
    plans: &[TensorPlan<'_>],
    out_file: &Path,
) -> Result<(), GgufImportError> {
    let progress = indicatif::ProgressBar::new(plans.len() as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} converting tensors [{bar:30}] {pos}/{len} {elapsed} {wide_msg}",
    ) {
        progress.set_style(style.progress_chars("=> "));
    }
    let source = Source {
        path,
        reader: RefCell::new(reader),
        tensor_data_offset,
        error: RefCell::new(None),
        progress,
    };
    let views = plans.iter().map(|plan| {
        (
            plan.hf_name.as_str(),
            LazyTensor {
                plan,
                source: &source,
            },
        )
    });
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let written = safetensors::serialize_to_file(views, Some(metadata), out_file);
    source.progress.finish_and_clear();
    if let Some(e) = source.error.into_inner() {
        let _ = std::fs::remove_file(out_file);
        return Err(e);
    }
    written.map_err(|e| GgufImportError::Safetensors {
        path: out_file.to_path_buf(),
        message: e.to_string(),
    })?;
    // The writer goes through a private temp file (mode 0600); give the model file ordinary permissions.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(out_file, std::fs::Permissions::from_mode(0o644)).map_err(
            |source| GgufImportError::Io {
                path: out_file.to_path_buf(),
                source,
            },
        )?;
    }
    Ok(())
}
