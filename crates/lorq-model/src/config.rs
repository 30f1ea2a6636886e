use std::path::Path;

use serde_json::Value;

use crate::error::{io_err, ModelError, Result};

/// The members of the Llama family lorq runs, written once with flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// RoPE frequency scaling from `rope_scaling` (old spelling) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    Linear {
        factor: f64,
    },
}

/// A Hugging Face `config.json` for the Llama family.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias` only).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per decoder layer: `Some(window)` where attention is limited to the last `window` keys.
    pub sliding_window: Vec<Option<usize>>,
    /// `torch_dtype` / `dtype` as written (informational: lorq computes in `--dtype`).
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `quantization_config` of a pre-quantized checkpoint, as written.
    pub quantization_config: Option<Value>,
}

impl ModelConfig {
    /// `(out_features, in_features)` of linear `which` of every decoder layer.
    pub fn linear_shape(&self, which: crate::llama::LayerLinear) -> (usize, usize) {
        use crate::llama::LayerLinear::*;
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match which {
            Q => (q, h),
            K | V => (kv, h),
            O => (h, q),
            Gate | Up => (i, h),
            Down => (h, i),
        }
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        Self::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let arch_name = v["architectures"]
            .get(0)
            .and_then(Value::as_str)
            .map(str::to_string);
        let model_type = v["model_type"].as_str().unwrap_or_default();
        let architecture = match (arch_name.as_deref(), model_type) {
            (Some("LlamaForCausalLM"), _) | (None, "llama") => Architecture::Llama,
            (Some("MistralForCausalLM"), _) | (None, "mistral") => Architecture::Mistral,
            (Some("Qwen2ForCausalLM"), _) | (None, "qwen2") => Architecture::Qwen2,
            (a, t) => {
                return Err(err(format!(
                    "unknown architecture {} (model_type {t:?}); lorq runs LlamaForCausalLM, \
                     MistralForCausalLM and Qwen2ForCausalLM",
                    a.map_or("(none)".to_string(), |a| format!("{a:?}"))
                )))
            }
        };
        let usize_field = |k: &str| -> Result<usize> {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| err(format!("missing or non-integer field `{k}`")))
        };
        let opt_usize = |k: &str| v[k].as_u64().map(|x| x as usize);
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = opt_usize("num_key_value_heads").unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = opt_usize("head_dim").unwrap_or(hidden_size / num_attention_heads);
        if head_dim % 2 != 0 {
            return Err(err(format!("head_dim {head_dim} must be even for RoPE")));
        }
        let num_hidden_layers = usize_field("num_hidden_layers")?;
        if let Some(act) = v["hidden_act"].as_str() {
            if act != "silu" {
                return Err(err(format!(
                    "hidden_act {act:?} is not supported (only \"silu\")"
                )));
            }
        }
        let rope_params = &v["rope_parameters"];
        let rope_theta = v["rope_theta"]
            .as_f64()
            .or_else(|| rope_params["rope_theta"].as_f64())
            .unwrap_or(10000.0);
        let scaling_obj = if v["rope_scaling"].is_object() {
            &v["rope_scaling"]
        } else {
            rope_params
        };
        let rope_scaling = parse_rope_scaling(scaling_obj).map_err(err)?;
        let attention_bias = v["attention_bias"].as_bool().unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let window = v["sliding_window"].as_u64().map(|w| w as usize);
        let sliding_window = match architecture {
            Architecture::Llama => vec![None; num_hidden_layers],
            Architecture::Mistral => vec![window; num_hidden_layers],
            Architecture::Qwen2 => {
                let use_sw = v["use_sliding_window"].as_bool().unwrap_or(false);
                let max_window_layers = opt_usize("max_window_layers").unwrap_or(num_hidden_layers);
                (0..num_hidden_layers)
                    .map(|i| match v["layer_types"].get(i).and_then(Value::as_str) {
                        Some("sliding_attention") => window,
                        Some(_) => None,
                        None if use_sw && i >= max_window_layers => window,
                        None => None,
                    })
                    .collect()
            }
        };
        Ok(Self {
            architecture,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: v["mlp_bias"].as_bool().unwrap_or(false),
            sliding_window,
            torch_dtype: v["dtype"]
                .as_str()
                .or_else(|| v["torch_dtype"].as_str())
                .map(str::to_string),
            bos_token_id: v["bos_token_id"].as_u64().map(|x| x as u32),
            eos_token_ids: token_id_list(&v["eos_token_id"]),
            quantization_config: v
                .get("quantization_config")
                .filter(|q| q.is_object())
                .cloned(),
        })
    }

    /// Parameters of the model as its tensors hold them (embedding counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_hidden_layers * layer + embed + head + h
    }
}

/// `eos_token_id` may be an integer or a list of integers.
pub(crate) fn token_id_list(v: &Value) -> Vec<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

fn parse_rope_scaling(v: &Value) -> std::result::Result<Option<RopeScaling>, String> {
    if !v.is_object() {
        return Ok(None);
    }
    let kind = v["rope_type"]
        .as_str()
        .or_else(|| v["type"].as_str())
        .unwrap_or("default");
    let num = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| format!("rope scaling of type {kind:?} needs a numeric `{k}`"))
    };
    match kind {
        "default" => Ok(None),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        other => Err(format!(
            "rope scaling type {other:?} is not supported (lorq supports default, linear and llama3)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100"#;

    fn parse(body: &str) -> Result<ModelConfig> {
        ModelConfig::parse(&format!("{{{BASE}, {body}}}"), Path::new("config.json"))
    }

    #[test]
    fn both_rope_theta_spellings() {
        let a = parse(r#""architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0"#).unwrap();
        let b = parse(r#""architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}"#).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(b.rope_theta, 500000.0);
        assert_eq!(b.rope_scaling, None);
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn llama3_scaling_in_either_place() {
        let s = r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#;
        let a = parse(&format!(r#""model_type": "llama", "rope_scaling": {s}"#)).unwrap();
        let b = parse(&format!(r#""model_type": "llama", "rope_parameters": {s}"#)).unwrap();
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert!(matches!(a.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    }

    #[test]
    fn unknown_architecture_is_named() {
        let e = parse(r#""architectures": ["GPT2LMHeadModel"]"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("config.json"),
            "{e}"
        );
    }

    #[test]
    fn unsupported_rope_type_is_named() {
        let e = parse(r#""model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 4.0}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("yarn"), "{e}");
    }

    #[test]
    fn eos_list_and_flags() {
        let c = parse(r#""architectures": ["Qwen2ForCausalLM"], "eos_token_id": [2, 5], "tie_word_embeddings": true, "sliding_window": 8, "use_sliding_window": false"#).unwrap();
        assert_eq!(c.eos_token_ids, vec![2, 5]);
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
        assert_eq!(c.sliding_window, vec![None, None]);
        let m = parse(r#""architectures": ["MistralForCausalLM"], "sliding_window": 8"#).unwrap();
        assert_eq!(m.sliding_window, vec![Some(8), Some(8)]);
    }
}
