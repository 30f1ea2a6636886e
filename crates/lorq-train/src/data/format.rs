//! Rows to token ids and labels: rendering (Alpaca prompt, chat template), tokenizing the whole
//! rendered string once, and masking by the byte spans of the trained parts.
//!
//! Masking works on character spans of the full string rather than tokenizing the prompt and the
//! completion separately: separate tokenization changes the tokens at the boundary (a BPE merge
//! across it), so the ids would differ from what the model sees at inference.

use std::ops::Range;
use std::path::Path;

use lorq_model::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::Value;

use super::row::Row;
use super::Example;
use crate::error::{io_err, Result, TrainError};

/// Stanford Alpaca's prompt for rows with a non-empty `input` (verbatim from its `train.py`).
pub const ALPACA_PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";
/// Stanford Alpaca's prompt for rows without `input`. As in Alpaca, `output` follows `### Response:` directly.
pub const ALPACA_PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

/// The Alpaca prompt of a row (the part that is not trained unless `train_on_prompt`).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    // Single-pass substitution so a `{input}` inside the instruction is left alone.
    let template = if input.is_empty() {
        ALPACA_PROMPT_NO_INPUT
    } else {
        ALPACA_PROMPT_INPUT
    };
    let mut out = String::with_capacity(template.len() + instruction.len() + input.len());
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(t) = tail.strip_prefix("{instruction}") {
            out.push_str(instruction);
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{input}") {
            out.push_str(input);
            rest = t;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Everything needed to turn rows into examples: the tokenizer, the chat template and the EOS
/// id. Built from a model folder's tokenizer files alone (no weights).
pub struct Formatter {
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    eos_id: u32,
    bos_prefix: Vec<u32>,
}

impl Formatter {
    /// Reads `tokenizer.json`, `tokenizer_config.json`, the chat template and the EOS id from
    /// `dir`.
    ///
    /// EOS is the tokenizer's `eos_token` (what TRL appends), else the first `eos_token_id` of
    /// `generation_config.json`, else of `config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::load(dir)?;
        let chat_template = ChatTemplate::load(
            dir,
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )?;
        let from_token = tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t));
        let eos_id = match from_token {
            Some(id) => id,
            None => ["generation_config.json", "config.json"]
                .iter()
                .find_map(|f| first_eos_id(&dir.join(f)).transpose())
                .transpose()?
                .ok_or_else(|| {
                    TrainError::Config(format!(
                        "{}: no EOS token (tokenizer_config.json `eos_token`, or `eos_token_id` in generation_config.json/config.json)",
                        dir.display()
                    ))
                })?,
        };
        let bos_prefix = post_processor_prefix(&dir.join("tokenizer.json"))?;
        Ok(Self::new(tokenizer, chat_template, eos_id, bos_prefix))
    }

    /// `bos_prefix`: the ids put before `text` and Alpaca rows (what the tokenizer adds with
    /// `add_special_tokens=True`, e.g. Llama's `<s>`); chat rows get only what the template writes.
    pub fn new(
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        eos_id: u32,
        bos_prefix: Vec<u32>,
    ) -> Self {
        Self {
            tokenizer,
            chat_template,
            eos_id,
            bos_prefix,
        }
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn bos_prefix(&self) -> &[u32] {
        &self.bos_prefix
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Ids and labels of one row, untruncated. The error text names what failed (the caller
    /// adds file and line).
    pub fn encode(&self, row: &Row, train_on_prompt: bool) -> std::result::Result<Example, String> {
        let (text, spans, bos, eos) = match row {
            Row::Text(t) => (t.clone(), std::iter::once(0..t.len()).collect(), true, true),
            Row::Alpaca {
                instruction,
                input,
                output,
            } => {
                let mut text = alpaca_prompt(instruction, input);
                let start = text.len();
                text.push_str(output);
                let end = text.len();
                (text, std::iter::once(start..end).collect(), true, true)
            }
            Row::Chat(messages) => {
                let (text, spans) = self.render_chat(messages)?;
                (text, spans, false, false)
            }
        };
        let toks = self
            .tokenizer
            .encode_with_offsets(&text)
            .map_err(|e| e.to_string())?;
        let mut ex = Example::default();
        if bos {
            for &id in &self.bos_prefix {
                ex.push(id, train_on_prompt || matches!(row, Row::Text(_)));
            }
        }
        for (id, (s, e)) in toks {
            let trained = train_on_prompt || spans.iter().any(|r| overlaps(r, s, e));
            ex.push(id, trained);
        }
        if eos {
            ex.push(self.eos_id, true);
        }
        Ok(ex)
    }

    /// The whole conversation rendered (no generation prompt) and the byte span of each
    /// assistant turn: from the end of the generation prompt before it to the end of its own
    /// rendering, so its content plus whatever end-of-turn text the template writes (ChatML:
    /// `<|im_end|>\n`).
    fn render_chat(
        &self,
        messages: &[ChatMessage],
    ) -> std::result::Result<(String, Vec<Range<usize>>), String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            "field `messages`: the model has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)".to_string()
        })?;
        let render = |m: &[ChatMessage], gen: bool| {
            t.render(m, gen)
                .map_err(|e| format!("field `messages`: {e}"))
        };
        let full = render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = render(&messages[..i], true)?;
            let through = render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(format!(
                    "field `messages[{i}]`: the chat template does not render the conversation up to this assistant turn as a prefix of the whole, so the turn cannot be located for the loss mask"
                ));
            }
            spans.push(before.len()..through.len());
        }
        Ok((full, spans))
    }
}

/// A token is trained when its byte range touches a trained span (as transformers'
/// `return_assistant_tokens_mask`: every token from the one holding the span's first character
/// to the one holding its last).
fn overlaps(r: &Range<usize>, s: usize, e: usize) -> bool {
    if s == e {
        return r.contains(&s);
    }
    s < r.end && e > r.start
}

fn first_eos_id(path: &Path) -> Result<Option<u32>> {
    if !path.exists() {
        return Ok(None);
    }
    let v = read_json(path)?;
    Ok(match &v["eos_token_id"] {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
        _ => None,
    })
}

/// The special tokens the tokenizer's post-processor puts before a single sequence
/// (`TemplateProcessing`, alone or inside a `Sequence`), as HF adds them with
/// `add_special_tokens=True`.
fn post_processor_prefix(path: &Path) -> Result<Vec<u32>> {
    let v = read_json(path)?;
    let pp = &v["post_processor"];
    let template = if pp["type"] == "TemplateProcessing" {
        Some(pp)
    } else if pp["type"] == "Sequence" {
        pp["processors"]
            .as_array()
            .and_then(|l| l.iter().find(|p| p["type"] == "TemplateProcessing"))
    } else {
        None
    };
    let Some(template) = template else {
        return Ok(vec![]);
    };
    let mut ids = Vec::new();
    for piece in template["single"].as_array().into_iter().flatten() {
        let Some(name) = piece["SpecialToken"]["id"].as_str() else {
            break;
        };
        let list = template["special_tokens"][name]["ids"]
            .as_array()
            .ok_or_else(|| {
                TrainError::Config(format!(
                    "{}: post_processor names special token {name:?} without ids",
                    path.display()
                ))
            })?;
        ids.extend(list.iter().filter_map(Value::as_u64).map(|x| x as u32));
    }
    Ok(ids)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: not valid JSON: {e}", path.display())))
}
