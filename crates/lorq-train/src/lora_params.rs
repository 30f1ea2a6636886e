//! The trainable LoRA pairs of a run: which linears they adapt, their initialisation (PEFT's), and
//! their PEFT adapter folder (read for resume, written for every save).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lorq_lora::{LoraAdapter, LoraConfig, TargetModules};
use lorq_model::{LayerLinear, LlamaModel};
use rand::{Rng, SeedableRng};

use crate::error::{io_err, Result, TrainError};

/// The LoRA hyper-parameters of a run (PEFT's `LoraConfig` fields that training uses).
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub targets: TargetModules,
}

impl LoraSpec {
    /// `alpha / r`, or `alpha / √r` with rsLoRA (PEFT's scaling).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Parses `--target-modules`: `all-linear` or a comma-separated list of module names.
    pub fn parse_targets(s: &str) -> Result<TargetModules> {
        let s = s.trim();
        if s == "all-linear" {
            return Ok(TargetModules::AllLinear);
        }
        let names: Vec<String> = s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
        if names.is_empty() {
            return Err(TrainError::Config(format!(
                "--target-modules {s:?} names no module (use all-linear or e.g. q_proj,v_proj)"
            )));
        }
        TargetModules::from_json(&serde_json::json!(names))
            .map_err(|e| TrainError::Config(format!("--target-modules {s:?}: {e}")))
    }
}

/// One adapted linear: `ΔW = scale · B · A`, both kept in f32 (the master weights).
#[derive(Debug, Clone)]
pub struct TrainModule {
    pub layer: usize,
    pub which: LayerLinear,
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
}

/// Every trainable pair of a run, in model order.
#[derive(Debug, Clone)]
pub struct LoraParams {
    pub spec: LoraSpec,
    pub modules: Vec<TrainModule>,
    index: HashMap<(usize, LayerLinear), usize>,
}

impl LoraParams {
    /// New pairs on every decoder linear `spec.targets` matches, initialised as PEFT does by
    /// default: `A ~ U(-1/√in, 1/√in)` (kaiming-uniform with a = √5), `B = 0`.
    pub fn init(model: &LlamaModel, spec: LoraSpec, seed: u64) -> Result<Self> {
        if spec.r == 0 {
            return Err(TrainError::Config("--r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&spec.dropout) {
            return Err(TrainError::Config(format!(
                "--lora-dropout {} must be in [0, 1)",
                spec.dropout
            )));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = model.device().clone();
        let mut modules = Vec::new();
        for (layer, which, lin) in targeted(model, &spec) {
            let (inp, out) = (lin.in_features(), lin.out_features());
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..spec.r * inp)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            modules.push(TrainModule {
                layer,
                which,
                path: lin.path.clone(),
                a: Tensor::from_vec(a, (spec.r, inp), &device)?,
                b: Tensor::zeros((out, spec.r), DType::F32, &device)?,
            });
        }
        Self::from_modules(model, spec, modules)
    }

    fn from_modules(model: &LlamaModel, spec: LoraSpec, modules: Vec<TrainModule>) -> Result<Self> {
        if modules.is_empty() {
            let names: BTreeSet<&str> = LayerLinear::ALL
                .iter()
                .map(|w| w.module().rsplit('.').next().unwrap_or_default())
                .collect();
            return Err(TrainError::Config(format!(
                "--target-modules {} matches no linear of this {} model (its linears: {})",
                spec.targets.describe(),
                model.config.architecture.name(),
                names.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        let index = modules
            .iter()
            .enumerate()
            .map(|(i, m)| ((m.layer, m.which), i))
            .collect();
        Ok(Self {
            spec,
            modules,
            index,
        })
    }

    /// The pair adapting linear `which` of decoder layer `layer`, if any.
    pub fn get(&self, layer: usize, which: LayerLinear) -> Option<(usize, &TrainModule)> {
        self.index
            .get(&(layer, which))
            .map(|&i| (i, &self.modules[i]))
    }

    /// Trainable parameter count.
    pub fn num_params(&self) -> usize {
        self.modules
            .iter()
            .map(|m| m.a.elem_count() + m.b.elem_count())
            .sum()
    }

    /// The parameters as the optimizer sees them: `[A₀, B₀, A₁, B₁, ...]`.
    pub fn tensors(&self) -> Vec<Tensor> {
        self.modules
            .iter()
            .flat_map(|m| [m.a.clone(), m.b.clone()])
            .collect()
    }

    /// Replaces the parameters with `t` (the order of [`Self::tensors`]).
    pub fn set_tensors(&mut self, t: Vec<Tensor>) -> Result<()> {
        if t.len() != 2 * self.modules.len() {
            return Err(TrainError::Config(format!(
                "{} parameter tensors for {} LoRA pairs",
                t.len(),
                self.modules.len()
            )));
        }
        let mut it = t.into_iter();
        for m in &mut self.modules {
            m.a = it.next().expect("counted");
            m.b = it.next().expect("counted");
        }
        Ok(())
    }

    /// PEFT's tensor names, in the order of [`Self::tensors`].
    pub fn names(&self) -> Vec<String> {
        self.modules
            .iter()
            .flat_map(|m| {
                [
                    format!("base_model.model.{}.lora_A.weight", m.path),
                    format!("base_model.model.{}.lora_B.weight", m.path),
                ]
            })
            .collect()
    }

    /// The short module names adapted (`q_proj`, ...), sorted: PEFT's `target_modules` list.
    fn target_names(&self) -> Vec<String> {
        let set: BTreeSet<String> = self
            .modules
            .iter()
            .map(|m| m.path.rsplit('.').next().unwrap_or_default().to_string())
            .collect();
        set.into_iter().collect()
    }

    /// `adapter_config.json` with the keys and values PEFT 0.21 writes for this LoRA.
    pub fn peft_config(&self, base_model: Option<&str>) -> serde_json::Value {
        let s = &self.spec;
        serde_json::json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "bias": "none",
            "corda_config": null,
            "eva_config": null,
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": json_number(s.alpha),
            "lora_bias": false,
            "lora_dropout": s.dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": s.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.target_names(),
            "task_type": "CAUSAL_LM",
            "trainable_token_indices": null,
            "use_dora": false,
            "use_rslora": s.use_rslora,
        })
    }

    /// Writes a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, f32).
    pub fn save_peft(&self, dir: &Path, base_model: Option<&str>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let config = serde_json::to_string_pretty(&self.peft_config(base_model))
            .expect("a JSON value serialises");
        let cfg_file = dir.join("adapter_config.json");
        std::fs::write(&cfg_file, config).map_err(io_err(&cfg_file))?;
        let host: Vec<(String, Tensor)> = self
            .names()
            .into_iter()
            .zip(self.tensors())
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let file = dir.join("adapter_model.safetensors");
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            host.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata),
            &file,
        )
        .map_err(|e| TrainError::Checkpoint {
            path: file.clone(),
            message: format!("writing the adapter: {e}"),
        })
    }

    /// Reads the pairs back from a PEFT folder written by [`Self::save_peft`] (or by PEFT with the
    /// same targets), as f32 on the model's device.
    pub fn load_peft(model: &LlamaModel, spec: LoraSpec, dir: &Path) -> Result<Self> {
        let adapter = LoraAdapter::load(dir, model.device())?;
        let mut modules = Vec::new();
        for (layer, which, lin) in targeted(model, &spec) {
            let m = adapter
                .module(&lin.path)
                .ok_or_else(|| TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: format!("the adapter has no pair for {}", lin.path),
                })?;
            let lorq_lora::LoraWeights::LowRank { a, b } = &m.weights else {
                return Err(TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: format!("{} is not a low-rank pair", lin.path),
                });
            };
            if a.dims() != [spec.r, lin.in_features()] || b.dims() != [lin.out_features(), spec.r] {
                return Err(TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: format!(
                        "{}: A {:?} / B {:?} do not fit r = {} on [{}, {}]",
                        lin.path,
                        a.dims(),
                        b.dims(),
                        spec.r,
                        lin.out_features(),
                        lin.in_features()
                    ),
                });
            }
            modules.push(TrainModule {
                layer,
                which,
                path: lin.path.clone(),
                a: a.to_dtype(DType::F32)?,
                b: b.to_dtype(DType::F32)?,
            });
        }
        Self::from_modules(model, spec, modules)
    }

    /// The current weights as a servable adapter (for eval during training), cast to `dtype`.
    pub fn to_adapter(&self, dtype: DType) -> Result<LoraAdapter> {
        let config_text = self.peft_config(None).to_string();
        let path = Path::new("<training>");
        let config = LoraConfig::parse(&config_text, path)?;
        let mut tensors = HashMap::new();
        for (n, t) in self.names().into_iter().zip(self.tensors()) {
            tensors.insert(n, t.to_dtype(dtype)?);
        }
        Ok(LoraAdapter::from_tensors(path, config, tensors)?)
    }
}

/// Every decoder linear `spec.targets` matches, in model order.
fn targeted<'m>(
    model: &'m LlamaModel,
    spec: &LoraSpec,
) -> Vec<(usize, LayerLinear, &'m lorq_model::Linear)> {
    (0..model.num_layers())
        .flat_map(|layer| LayerLinear::ALL.map(|w| (layer, w, model.layer_linear(layer, w))))
        .filter(|(_, _, lin)| spec.targets.matches(&lin.path, false))
        .collect()
}

/// Integers stay integers in JSON (PEFT writes `"lora_alpha": 16`).
fn json_number(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        serde_json::json!(x as i64)
    } else {
        serde_json::json!(x)
    }
}
