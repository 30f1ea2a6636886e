use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{io_err, ModelError, Result};

/// The safetensors files of a model folder, memory-mapped: `model.safetensors`, or the shards
/// listed in `model.safetensors.index.json`.
pub struct WeightFiles {
    dir: PathBuf,
    files: MmapedSafetensors,
}

impl WeightFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        let weights_err = |message: String| ModelError::Weights {
            dir: dir.to_path_buf(),
            message,
        };
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Config {
                    path: index.clone(),
                    message: format!("not valid JSON: {e}"),
                })?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| ModelError::Config {
                    path: index.clone(),
                    message: "missing `weight_map` object".into(),
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            let mut paths = Vec::new();
            for s in shards {
                if s.contains('/') || s.contains("..") {
                    return Err(weights_err(format!(
                        "shard name {s:?} in the index is not a plain file name"
                    )));
                }
                let p = dir.join(&s);
                if !p.exists() {
                    return Err(weights_err(format!(
                        "shard {s} named in model.safetensors.index.json is missing"
                    )));
                }
                paths.push(p);
            }
            paths
        } else if single.exists() {
            vec![single]
        } else {
            let has_bin = dir.join("pytorch_model.bin").exists();
            return Err(weights_err(if has_bin {
                "no model.safetensors, only pytorch_model.bin: lorq reads safetensors only (convert with transformers: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)".into()
            } else {
                "no weights: expected model.safetensors or model.safetensors.index.json".into()
            }));
        };
        // SAFETY: the files are mapped read-only; lorq never writes to a model folder it serves.
        let files = unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| {
            weights_err(format!(
                "cannot read safetensors (truncated or corrupt file?): {e}"
            ))
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }

    /// Tensor `name`, checked against `shape`, converted to `dtype`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        Ok(self.load_as_stored(name, shape, device)?.to_dtype(dtype)?)
    }

    /// Tensor `name`, checked against `shape`, in the float dtype the checkpoint stores it in
    /// (what quantizers start from, as the peer libraries do).
    pub fn load_as_stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let view = self.files.get(name).map_err(|_| ModelError::Tensor {
            name: name.to_string(),
            message: format!("missing from the weights in {}", self.dir.display()),
        })?;
        if view.shape() != shape {
            return Err(ModelError::Tensor {
                name: name.to_string(),
                message: format!(
                    "shape {:?} in the checkpoint does not match {:?} from config.json",
                    view.shape(),
                    shape
                ),
            });
        }
        let t = self
            .files
            .load(name, device)
            .map_err(|e| ModelError::Tensor {
                name: name.to_string(),
                message: e.to_string(),
            })?;
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::Tensor {
                name: name.to_string(),
                message: format!("dtype {:?} is not a float type lorq can load", t.dtype()),
            });
        }
        Ok(t)
    }

    /// Tensor `name` exactly as stored (any dtype candle knows), for quantized formats.
    pub fn get_tensor(&self, name: &str, device: &Device) -> Option<Tensor> {
        self.files.load(name, device).ok()
    }

    /// Tensor `name` as raw bytes with its safetensors dtype (I8/I32 and other dtypes candle lacks).
    pub fn get_raw(&self, name: &str) -> Option<lorq_quant::RawTensor> {
        self.files
            .get(name)
            .ok()
            .map(|v| lorq_quant::RawTensor::from_view(&v))
    }

    /// The stored dtype and shape of tensor `name`, without reading its data.
    pub fn raw_info(&self, name: &str) -> Option<(safetensors::Dtype, Vec<usize>)> {
        self.files
            .get(name)
            .ok()
            .map(|v| (v.dtype(), v.shape().to_vec()))
    }

    /// All tensor names with their dtype and shape.
    pub fn inventory(&self) -> Vec<(String, String, Vec<usize>)> {
        let mut v: Vec<_> = self
            .files
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, format!("{:?}", t.dtype()), t.shape().to_vec()))
            .collect();
        v.sort();
        v
    }
}
