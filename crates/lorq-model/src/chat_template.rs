use std::path::Path;

use serde::Serialize;

use crate::error::{io_err, ModelError, Result};
use crate::tokenizer::read_tokenizer_config;

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A model's chat template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`),
/// rendered with minijinja the way transformers renders it (trim_blocks, lstrip_blocks, Python
/// string methods).
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// `None` when the model has no template.
    pub fn load(
        dir: &Path,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Option<Self>> {
        let file = dir.join("chat_template.jinja");
        let source = if file.exists() {
            Some(std::fs::read_to_string(&file).map_err(io_err(&file))?)
        } else {
            match &read_tokenizer_config(dir)?["chat_template"] {
                serde_json::Value::String(s) => Some(s.clone()),
                // A list of named templates: use "default".
                serde_json::Value::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let t = Self {
            source,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        };
        // Fail at load, not at the first request, when the template does not parse.
        t.environment()?;
        Ok(Some(t))
    }

    fn environment(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| ModelError::ChatTemplate(format!("does not parse: {e}")))?;
        Ok(env)
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment()?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ModelError::ChatTemplate(format!("rendering failed: {e}")))
    }
}
