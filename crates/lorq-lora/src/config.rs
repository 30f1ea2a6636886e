use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::target::{pattern_matches, TargetModules};
use crate::LoraError;

/// The parts of PEFT's `adapter_config.json` that decide how a LoRA adapter is applied.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    pub exclude_modules: Option<TargetModules>,
    /// Per-module rank overrides: PEFT regex key -> rank (first match in file order wins).
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    pub base_model_name_or_path: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Value>,
    #[serde(default)]
    target_modules: Option<Value>,
    #[serde(default)]
    exclude_modules: Option<Value>,
    #[serde(default)]
    rank_pattern: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    layers_to_transform: Option<Value>,
    #[serde(default)]
    layers_pattern: Option<Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    use_qalora: bool,
    #[serde(default)]
    layer_replication: Option<Value>,
    #[serde(default)]
    trainable_token_indices: Option<Value>,
    #[serde(default)]
    target_parameters: Option<Value>,
}

fn is_set(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

impl LoraConfig {
    /// Reads and validates `dir/adapter_config.json`.
    pub fn load(dir: &Path) -> Result<Self, LoraError> {
        let file = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| LoraError::Io {
            path: file.clone(),
            source: e,
        })?;
        Self::parse(&text, dir)
    }

    pub fn parse(text: &str, dir: &Path) -> Result<Self, LoraError> {
        let invalid = |message: String| LoraError::Invalid {
            path: dir.join("adapter_config.json"),
            message,
        };
        let unsupported = |key: &str, value: String, hint: &str| LoraError::Unsupported {
            path: dir.join("adapter_config.json"),
            key: key.to_string(),
            value,
            hint: hint.to_string(),
        };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        if let Some(t) = &raw.peft_type {
            if t != "LORA" {
                return Err(unsupported(
                    "peft_type",
                    format!("{t:?}"),
                    "only LoRA adapters (peft_type \"LORA\") can be served",
                ));
            }
        }
        if raw.use_dora {
            return Err(unsupported(
                "use_dora",
                "true".into(),
                "DoRA adapters need a per-column magnitude vector that lorq does not apply; merge the adapter with PEFT (`merge_and_unload`) or retrain without DoRA",
            ));
        }
        if is_set(&raw.modules_to_save) {
            return Err(unsupported(
                "modules_to_save",
                raw.modules_to_save.as_ref().unwrap().to_string(),
                "full copies of base modules are not served; retrain without modules_to_save or merge the adapter first",
            ));
        }
        if let Some(bias) = &raw.bias {
            if bias != "none" {
                return Err(unsupported(
                    "bias",
                    format!("{bias:?}"),
                    "only bias = \"none\" is supported (trained biases change the base weights)",
                ));
            }
        }
        if raw.lora_bias {
            return Err(unsupported(
                "lora_bias",
                "true".into(),
                "a bias on lora_B is not supported",
            ));
        }
        if raw.use_qalora {
            return Err(unsupported(
                "use_qalora",
                "true".into(),
                "QA-LoRA adapters are not supported",
            ));
        }
        if is_set(&raw.layer_replication) {
            return Err(unsupported(
                "layer_replication",
                raw.layer_replication.as_ref().unwrap().to_string(),
                "replicated layers are not supported",
            ));
        }
        if is_set(&raw.trainable_token_indices) {
            return Err(unsupported(
                "trainable_token_indices",
                raw.trainable_token_indices.as_ref().unwrap().to_string(),
                "trainable token embeddings are not supported",
            ));
        }
        if is_set(&raw.target_parameters) {
            return Err(unsupported(
                "target_parameters",
                raw.target_parameters.as_ref().unwrap().to_string(),
                "LoRA on raw parameters is not supported",
            ));
        }
        if raw.fan_in_fan_out {
            // PEFT itself resets this to false for nn.Linear targets (all of lorq's models).
            tracing::warn!(
                "adapter {}: fan_in_fan_out = true is ignored for Linear layers, as PEFT does",
                dir.display()
            );
        }
        let r = raw.r.ok_or_else(|| invalid("missing field `r`".into()))?;
        if r == 0 {
            return Err(invalid("`r` must be at least 1".into()));
        }
        let lora_alpha = raw.lora_alpha.unwrap_or(8.0);
        let target_modules = match &raw.target_modules {
            Some(v) if !v.is_null() => TargetModules::from_json(v)
                .map_err(|m| invalid(format!("field `target_modules`: {m}")))?,
            _ => return Err(invalid("missing field `target_modules`".into())),
        };
        let exclude_modules = match &raw.exclude_modules {
            Some(v) if !v.is_null() => Some(
                TargetModules::from_json(v)
                    .map_err(|m| invalid(format!("field `exclude_modules`: {m}")))?,
            ),
            _ => None,
        };
        let rank_pattern = pattern_map(&raw.rank_pattern, |v| {
            v.as_u64().filter(|&r| r > 0).map(|r| r as usize)
        })
        .map_err(|k| {
            invalid(format!(
                "`rank_pattern` entry {k:?} is not a positive integer"
            ))
        })?;
        let alpha_pattern = pattern_map(&raw.alpha_pattern, |v| v.as_f64())
            .map_err(|k| invalid(format!("`alpha_pattern` entry {k:?} is not a number")))?;
        for (key, _) in rank_pattern.iter().map(|(k, v)| (k, v)) {
            regex::Regex::new(key)
                .map_err(|e| invalid(format!("`rank_pattern` key {key:?}: {e}")))?;
        }
        for (key, _) in &alpha_pattern {
            regex::Regex::new(key)
                .map_err(|e| invalid(format!("`alpha_pattern` key {key:?}: {e}")))?;
        }
        let layers_to_transform = match &raw.layers_to_transform {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| invalid(format!("`layers_to_transform` = {n}")))?
                as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        invalid("`layers_to_transform` must hold layer indices".into())
                    })?,
            ),
            Some(v) => return Err(invalid(format!("`layers_to_transform` = {v}"))),
        };
        let layers_pattern = match &raw.layers_pattern {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(vec![s.clone()]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid("`layers_pattern` must hold strings".into()))?,
            ),
            Some(v) => return Err(invalid(format!("`layers_pattern` = {v}"))),
        };
        Ok(Self {
            r,
            lora_alpha,
            use_rslora: raw.use_rslora,
            target_modules,
            exclude_modules,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
            layers_pattern,
            base_model_name_or_path: raw.base_model_name_or_path,
        })
    }

    /// Rank and alpha PEFT gives the module at `module_path` (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn rank_and_alpha(&self, module_path: &str) -> (usize, f64) {
        let r = self
            .rank_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module_path))
            .map_or(self.r, |(_, v)| *v);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module_path))
            .map_or(self.lora_alpha, |(_, v)| *v);
        (r, alpha)
    }

    /// The factor `s` in `y = W·x + s·B·A·x`: `alpha/r`, or `alpha/sqrt(r)` for rsLoRA.
    pub fn scaling(&self, module_path: &str) -> f64 {
        let (r, alpha) = self.rank_and_alpha(module_path);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Whether PEFT would wrap `module_path` with LoRA under this config.
    pub fn targets(&self, module_path: &str, is_output_layer: bool) -> bool {
        if !self.target_modules.matches(module_path, is_output_layer) {
            return false;
        }
        if let Some(ex) = &self.exclude_modules {
            if ex.matches(module_path, false) {
                return false;
            }
        }
        if let Some(layers) = &self.layers_to_transform {
            match layer_index(module_path, self.layers_pattern.as_deref()) {
                Some(i) => return layers.contains(&i),
                None => return false,
            }
        }
        true
    }
}

fn pattern_map<T>(
    m: &Option<serde_json::Map<String, Value>>,
    conv: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<(String, T)>, String> {
    let Some(m) = m else { return Ok(vec![]) };
    m.iter()
        .map(|(k, v)| conv(v).map(|t| (k.clone(), t)).ok_or_else(|| k.clone()))
        .collect()
}

/// The decoder-layer index in a module path, found after one of `layers_pattern` (or any
/// `<name>.<index>.` segment when no pattern is given), as PEFT does.
pub(crate) fn layer_index(module_path: &str, layers_pattern: Option<&[String]>) -> Option<usize> {
    let parts: Vec<&str> = module_path.split('.').collect();
    for w in parts.windows(2) {
        let name_ok = match layers_pattern {
            Some(pats) => pats.iter().any(|p| p == w[0]),
            None => true,
        };
        if name_ok {
            if let Ok(i) = w[1].parse::<usize>() {
                return Some(i);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<LoraConfig, LoraError> {
        LoraConfig::parse(json, Path::new("/a"))
    }

    #[test]
    fn scaling_plain_rslora_and_patterns() {
        let c = parse(
            r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"layers.1.self_attn.q_proj": 32}}"#,
        )
        .unwrap();
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(c.scaling("model.layers.0.self_attn.v_proj"), 4.0);
        assert_eq!(c.scaling("model.layers.1.self_attn.q_proj"), 4.0);
        let c = parse(
            r#"{"r": 16, "lora_alpha": 8, "use_rslora": true, "target_modules": "all-linear"}"#,
        )
        .unwrap();
        assert_eq!(c.scaling("model.layers.0.mlp.up_proj"), 2.0);
    }

    #[test]
    fn refuses_unsupported_features_by_key() {
        let e = parse(r#"{"r": 8, "target_modules": ["q_proj"], "use_dora": true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("use_dora"), "{e}");
        let e = parse(r#"{"r": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("modules_to_save"), "{e}");
        let e = parse(r#"{"r": 8, "target_modules": ["q_proj"], "bias": "all"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`bias`"), "{e}");
        let e = parse(r#"{"r": 8, "target_modules": ["q_proj"], "peft_type": "IA3"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("peft_type"), "{e}");
    }

    #[test]
    fn layers_to_transform_limits_targets() {
        let c =
            parse(r#"{"r": 8, "target_modules": ["q_proj"], "layers_to_transform": [1]}"#).unwrap();
        assert!(!c.targets("model.layers.0.self_attn.q_proj", false));
        assert!(c.targets("model.layers.1.self_attn.q_proj", false));
        assert!(!c.targets("model.layers.1.self_attn.k_proj", false));
    }
}
