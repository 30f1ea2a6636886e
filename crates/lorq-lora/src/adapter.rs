use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{LoraConfig, LoraError};

/// The weights of one adapted linear.
#[derive(Debug, Clone)]
pub enum LoraWeights {
    /// A PEFT LoRA pair, in the adapter's own dtype: `ΔW = scale · B · A`.
    LowRank {
        /// `[r, in_features]`
        a: Tensor,
        /// `[out_features, r]`
        b: Tensor,
    },
    /// A dense `ΔW` `[out_features, in_features]` in f32 with the scale already folded in (what
    /// merging several adapters in ΔW space produces, see [`crate::merge`]).
    Dense { delta: Tensor },
}

/// One adapted linear: `delta(x) = x · ΔWᵀ` with `ΔW = scale · B · A` (low rank) or a dense `ΔW`.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub weights: LoraWeights,
    /// `alpha / r` (`alpha / √r` with rsLoRA) for a low-rank pair; 1.0 for a dense delta,
    /// whose scale is folded into the matrix.
    pub scale: f64,
    /// The weights as row-major f32 on the host, made on first use by the CPU kernel.
    host_f32: std::sync::OnceLock<crate::batched::HostWeights>,
    /// Per-GPU contiguous copies of A and B, made once for a pair stored elsewhere (another
    /// device, or a non-contiguous view); a pair already on the GPU is used in place.
    #[cfg(feature = "cuda")]
    pub(crate) gpu: lorq_quant::cuda::GpuCache<(Tensor, Tensor)>,
}

impl LoraModule {
    /// A PEFT pair `A [r, in]`, `B [out, r]` with its scaling.
    pub fn low_rank(a: Tensor, b: Tensor, scale: f64) -> Self {
        Self {
            weights: LoraWeights::LowRank { a, b },
            scale,
            host_f32: Default::default(),
            #[cfg(feature = "cuda")]
            gpu: Default::default(),
        }
    }

    /// A dense delta `[out, in]`, stored in f32, scale folded in (`scale` = 1).
    pub fn dense(delta: Tensor) -> Result<Self, candle_core::Error> {
        if delta.rank() != 2 {
            return Err(candle_core::Error::Msg(format!(
                "a dense LoRA delta must be a 2-D [out, in] matrix, got shape {:?}",
                delta.dims()
            )));
        }
        Ok(Self {
            weights: LoraWeights::Dense {
                delta: delta.to_dtype(DType::F32)?,
            },
            scale: 1.0,
            host_f32: Default::default(),
            #[cfg(feature = "cuda")]
            gpu: Default::default(),
        })
    }

    /// The rank `r` of a low-rank pair; for a dense delta `min(out, in)`, the most a dense matrix
    /// can hold (its true rank is not computed).
    pub fn rank(&self) -> usize {
        match &self.weights {
            LoraWeights::LowRank { a, .. } => a.dims()[0],
            LoraWeights::Dense { delta } => delta.dims()[0].min(delta.dims()[1]),
        }
    }
    pub fn in_features(&self) -> usize {
        match &self.weights {
            LoraWeights::LowRank { a, .. } => a.dims()[1],
            LoraWeights::Dense { delta } => delta.dims()[1],
        }
    }
    pub fn out_features(&self) -> usize {
        match &self.weights {
            LoraWeights::LowRank { b, .. } => b.dims()[0],
            LoraWeights::Dense { delta } => delta.dims()[0],
        }
    }
    /// The stored dtype (always f32 for a dense delta).
    pub fn dtype(&self) -> DType {
        match &self.weights {
            LoraWeights::LowRank { a, .. } => a.dtype(),
            LoraWeights::Dense { delta } => delta.dtype(),
        }
    }
    /// Bytes of the stored weights.
    pub fn bytes(&self) -> usize {
        let n = match &self.weights {
            LoraWeights::LowRank { a, b } => a.elem_count() + b.elem_count(),
            LoraWeights::Dense { delta } => delta.elem_count(),
        };
        n * self.dtype().size_in_bytes()
    }

    /// `x · ΔWᵀ`, returned in `x`'s dtype: `scale · B(A(x))` for a pair, `x · ΔWᵀ` for a dense delta.
    ///
    /// Computed in f32 whatever the stored dtype: PEFT loads fp16/bf16 adapters with
    /// `autocast_adapter_dtype=True` (its default), i.e. it applies them in float32, and this is
    /// the behaviour users compare against. Storage stays in the adapter's own dtype.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor, candle_core::Error> {
        let xd = x.to_dtype(DType::F32)?;
        match &self.weights {
            LoraWeights::LowRank { a, b } => {
                let h = xd.broadcast_matmul(&a.to_dtype(DType::F32)?.t()?)?;
                let y = h.broadcast_matmul(&b.to_dtype(DType::F32)?.t()?)?;
                (y * self.scale)?.to_dtype(x.dtype())
            }
            LoraWeights::Dense { delta } => xd.broadcast_matmul(&delta.t()?)?.to_dtype(x.dtype()),
        }
    }

    /// The weights as row-major f32 host vectors (converted once, then shared).
    pub(crate) fn host_weights(&self) -> Result<&crate::batched::HostWeights, candle_core::Error> {
        if let Some(w) = self.host_f32.get() {
            return Ok(w);
        }
        let flat = |t: &Tensor| -> Result<Vec<f32>, candle_core::Error> {
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
        };
        let w = match &self.weights {
            LoraWeights::LowRank { a, b } => crate::batched::HostWeights::LowRank {
                a: flat(a)?,
                b_t: flat(&b.t()?.contiguous()?)?,
                r: a.dims()[0],
            },
            LoraWeights::Dense { delta } => crate::batched::HostWeights::Dense {
                delta: flat(delta)?,
            },
        };
        Ok(self.host_f32.get_or_init(|| w))
    }

    /// The full `ΔW` `[out, in]` in f32: `(B · A) · scale` as PEFT's `get_delta_weight` computes it
    /// (A and B in f32), or the dense delta itself.
    pub fn delta_weight(&self) -> Result<Tensor, candle_core::Error> {
        match &self.weights {
            LoraWeights::LowRank { a, b } => {
                let ba = b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)?;
                ba * self.scale
            }
            LoraWeights::Dense { delta } => Ok(delta.clone()),
        }
    }
}

/// A PEFT LoRA adapter folder, loaded.
#[derive(Debug)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub config: LoraConfig,
    /// Keyed by module path as the base model names it, e.g. `model.layers.0.self_attn.q_proj`.
    modules: HashMap<String, LoraModule>,
}

const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const LEGACY_FILE: &str = "adapter_model.bin";

impl LoraAdapter {
    /// Loads `dir/adapter_config.json` and `dir/adapter_model.safetensors` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, LoraError> {
        let config = LoraConfig::load(dir)?;
        let file = dir.join(WEIGHTS_FILE);
        if !file.exists() {
            if dir.join(LEGACY_FILE).exists() {
                return Err(LoraError::Invalid {
                    path: dir.to_path_buf(),
                    message: format!(
                        "only {LEGACY_FILE} (a pickled PyTorch file) was found; lorq reads safetensors only, \
                         because unpickling can run arbitrary code. Convert it once with: python -c \
                         \"import torch, safetensors.torch as st; st.save_file(torch.load('{LEGACY_FILE}', \
                         map_location='cpu', weights_only=True), '{WEIGHTS_FILE}', metadata={{'format': 'pt'}})\" \
                         (run inside the adapter folder)"
                    ),
                });
            }
            return Err(LoraError::Invalid {
                path: dir.to_path_buf(),
                message: format!("no {WEIGHTS_FILE} in the folder"),
            });
        }
        let tensors =
            candle_core::safetensors::load(&file, device).map_err(|e| LoraError::File {
                path: dir.to_path_buf(),
                file: WEIGHTS_FILE.into(),
                message: e.to_string(),
            })?;
        Self::from_tensors(dir, config, tensors)
    }

    /// Builds an adapter from PEFT-named tensors (`base_model.model.<module>.lora_A[.default].weight`).
    pub fn from_tensors(
        dir: &Path,
        config: LoraConfig,
        tensors: HashMap<String, Tensor>,
    ) -> Result<Self, LoraError> {
        let invalid = |message: String| LoraError::Invalid {
            path: dir.to_path_buf(),
            message,
        };
        let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (name, t) in tensors {
            let stripped = name.strip_prefix("base_model.model.").unwrap_or(&name);
            let (module, which) = if let Some(m) = lora_module_of(stripped, "lora_A") {
                (m, 0)
            } else if let Some(m) = lora_module_of(stripped, "lora_B") {
                (m, 1)
            } else if stripped.contains("lora_embedding_") {
                return Err(LoraError::Unsupported {
                    path: dir.to_path_buf(),
                    key: name.clone(),
                    value: "embedding LoRA".into(),
                    hint: "LoRA on embedding layers is not supported".into(),
                });
            } else if stripped.contains("lora_magnitude_vector") {
                return Err(LoraError::Unsupported {
                    path: dir.to_path_buf(),
                    key: name.clone(),
                    value: "DoRA magnitude".into(),
                    hint: "DoRA adapters are not supported".into(),
                });
            } else {
                return Err(invalid(format!(
                    "unexpected tensor {name:?} (expected `...lora_A.weight` / `...lora_B.weight`)"
                )));
            };
            if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
                return Err(invalid(format!(
                    "tensor {name:?} has dtype {:?}; LoRA weights must be f32, f16 or bf16",
                    t.dtype()
                )));
            }
            if t.rank() != 2 {
                return Err(invalid(format!(
                    "tensor {name:?} has shape {:?}; expected a 2-D matrix",
                    t.dims()
                )));
            }
            let slot = pairs.entry(module).or_default();
            if which == 0 {
                slot.0 = Some(t);
            } else {
                slot.1 = Some(t);
            }
        }
        let mut modules = HashMap::new();
        for (module, (a, b)) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(invalid(format!(
                    "module {module:?} has only one of lora_A / lora_B"
                )));
            };
            let is_output = module == "lm_head";
            if !config.targets(&module, is_output) {
                tracing::debug!(
                    "adapter {}: {module} is not matched by target_modules ({}); PEFT would not load it, skipping",
                    dir.display(),
                    config.target_modules.describe()
                );
                continue;
            }
            let (r, _) = config.rank_and_alpha(&module);
            if a.dims()[0] != r || b.dims()[1] != r {
                return Err(invalid(format!(
                    "module {module:?}: lora_A {:?} and lora_B {:?} do not have the rank r = {r} the config gives",
                    a.dims(),
                    b.dims()
                )));
            }
            if a.dtype() != b.dtype() {
                return Err(invalid(format!(
                    "module {module:?}: lora_A is {:?} but lora_B is {:?}",
                    a.dtype(),
                    b.dtype()
                )));
            }
            let scale = config.scaling(&module);
            modules.insert(module, LoraModule::low_rank(a, b, scale));
        }
        if modules.is_empty() {
            return Err(invalid(
                "no LoRA weights match target_modules; the adapter would change nothing".into(),
            ));
        }
        Ok(Self {
            path: dir.to_path_buf(),
            config,
            modules,
        })
    }

    /// An adapter made of the given modules (e.g. dense deltas from [`crate::merge`]); `path`
    /// names it in messages.
    pub fn from_modules(
        path: PathBuf,
        config: LoraConfig,
        modules: HashMap<String, LoraModule>,
    ) -> Result<Self, LoraError> {
        if modules.is_empty() {
            return Err(LoraError::Invalid {
                path,
                message: "an adapter needs at least one module".into(),
            });
        }
        Ok(Self {
            path,
            config,
            modules,
        })
    }

    pub fn module(&self, module_path: &str) -> Option<&LoraModule> {
        self.modules.get(module_path)
    }

    pub fn modules(&self) -> impl Iterator<Item = (&String, &LoraModule)> {
        self.modules.iter()
    }

    pub fn bytes(&self) -> usize {
        self.modules.values().map(LoraModule::bytes).sum()
    }

    pub fn dtype(&self) -> Option<DType> {
        self.modules.values().next().map(|m| m.dtype())
    }
}

/// `model.layers.0.self_attn.q_proj.lora_A.weight` (or `.lora_A.default.weight`) -> the module path.
fn lora_module_of(name: &str, which: &str) -> Option<String> {
    let rest = name
        .strip_suffix(&format!(".{which}.weight"))
        .or_else(|| name.strip_suffix(&format!(".{which}.default.weight")))?;
    Some(rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_adapter(dir: &Path, config: &str, tensors: &[(&str, Tensor)]) {
        std::fs::write(dir.join("adapter_config.json"), config).unwrap();
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, dir.join(WEIGHTS_FILE)).unwrap();
    }

    #[test]
    fn loads_names_with_and_without_default() {
        let d = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let a = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
        let b = Tensor::ones((3, 2), DType::F32, &dev).unwrap();
        write_adapter(
            d.path(),
            r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"#,
            &[
                (
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                    a.clone(),
                ),
                (
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                    b.clone(),
                ),
                (
                    "base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight",
                    a,
                ),
                (
                    "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight",
                    b,
                ),
            ],
        );
        let ad = LoraAdapter::load(d.path(), &dev).unwrap();
        let m = ad.module("model.layers.0.self_attn.v_proj").unwrap();
        assert_eq!((m.rank(), m.in_features(), m.out_features()), (2, 4, 3));
        assert_eq!(m.scale, 2.0);
        // delta of ones: each output = 2 * (sum over r of (sum over in of 1)) = 2 * 2 * 4
        let x = Tensor::ones((1, 4), DType::F32, &dev).unwrap();
        let y: Vec<Vec<f32>> = m.delta(&x).unwrap().to_vec2().unwrap();
        assert_eq!(y, vec![vec![16.0; 3]]);
    }

    #[test]
    fn legacy_bin_is_refused_with_conversion_hint() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("adapter_config.json"),
            r#"{"r": 2, "target_modules": ["q_proj"]}"#,
        )
        .unwrap();
        std::fs::write(d.path().join(LEGACY_FILE), b"PK").unwrap();
        let e = LoraAdapter::load(d.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("adapter_model.bin") && e.contains("save_file"),
            "{e}"
        );
    }

    #[test]
    fn rank_mismatch_names_module() {
        let d = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        write_adapter(
            d.path(),
            r#"{"r": 4, "target_modules": ["q_proj"]}"#,
            &[
                (
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                    Tensor::ones((2, 4), DType::F32, &dev).unwrap(),
                ),
                (
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                    Tensor::ones((3, 2), DType::F32, &dev).unwrap(),
                ),
            ],
        );
        let e = LoraAdapter::load(d.path(), &dev).unwrap_err().to_string();
        assert!(e.contains("q_proj") && e.contains("r = 4"), "{e}");
    }

    #[test]
    fn truncated_weights_file_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("adapter_config.json"),
            r#"{"r": 2, "target_modules": ["q_proj"]}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join(WEIGHTS_FILE),
            [8u8, 0, 0, 0, 0, 0, 0, 0, b'{'],
        )
        .unwrap();
        let e = LoraAdapter::load(d.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains(WEIGHTS_FILE), "{e}");
    }
}
