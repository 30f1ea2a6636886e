use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use lorq_lora::LoraAdapter;
use lorq_quant::method::QuantMethod;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::config::{token_id_list, ModelConfig};
use crate::error::{io_err, ModelError, Result};
use crate::llama::LlamaModel;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightFiles;

/// A model folder loaded whole: weights, tokenizer, chat template and the EOS ids generation stops at.
pub struct LoadedModel {
    pub dir: PathBuf,
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// From `generation_config.json` (an id or a list), else `config.json`.
    pub eos_token_ids: Vec<u32>,
}

impl LoadedModel {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(dir, dtype, device, None)
    }

    /// Loads with every decoder linear quantized just in time by `quantize`.
    pub fn load_quantized(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quantize: Option<QuantMethod>,
    ) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        let weights = WeightFiles::open(dir)?;
        let tokenizer = Tokenizer::load(dir)?;
        let eos_token_ids = match generation_eos(dir)? {
            ids if !ids.is_empty() => ids,
            _ => config.eos_token_ids.clone(),
        };
        let chat_template = ChatTemplate::load(
            dir,
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )?;
        tracing::info!(
            "loading {} ({} layers, hidden {}) from {} as {:?}",
            config.architecture.name(),
            config.num_hidden_layers,
            config.hidden_size,
            dir.display(),
            dtype
        );
        if let Some(q) = quantize {
            if q == QuantMethod::Bitsandbytes {
                tracing::warn!("bitsandbytes (LLM.int8) is slow at inference; eetq is the recommended 8-bit method (--quantize eetq)");
            }
            if q == QuantMethod::Fp8 && device.is_cpu() {
                eprintln!("lorq: fp8 runs emulated on the CPU (e4m3 weights dequantized in the matmul kernel)");
            }
        }
        let model = LlamaModel::load(config, &weights, dtype, device, quantize)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
            chat_template,
            eos_token_ids,
        })
    }

    /// Loads a PEFT adapter folder and checks it fits this model.
    pub fn load_adapter(&self, dir: &Path) -> Result<Arc<LoraAdapter>> {
        let adapter = LoraAdapter::load(dir, self.model.device())?;
        self.model.check_adapter(&adapter)?;
        Ok(Arc::new(adapter))
    }

    /// The prompt's token ids: rendered through the chat template as one user turn with
    /// `chat`, otherwise the text as is.
    pub fn prompt_ids(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        if !chat {
            return self.tokenizer.encode(prompt);
        }
        let messages = [ChatMessage {
            role: "user".into(),
            content: prompt.into(),
        }];
        self.tokenizer.encode(&self.render_chat(&messages)?)
    }

    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::ChatTemplate(format!("{} has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)", self.dir.display()))
        })?;
        t.render(messages, true)
    }
}

fn generation_eos(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.clone(),
        message: format!("not valid JSON: {e}"),
    })?;
    Ok(token_id_list(&v["eos_token_id"]))
}
