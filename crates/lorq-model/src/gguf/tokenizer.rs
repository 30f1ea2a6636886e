//! The GGUF vocabulary (`tokenizer.ggml.*`) rebuilt as a Hugging Face byte-level BPE `tokenizer.json`,
//! plus `tokenizer_config.json`. Only gpt2-style BPE vocabularies are handled.

use super::metadata::Metadata;
use super::GgufImportError;
use serde::ser::SerializeMap;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// `tokenizer.ggml.model` value of byte-level BPE vocabularies.
pub const SUPPORTED_TOKENIZER_MODEL: &str = "gpt2";
/// `tokenizer.ggml.token_type` of control tokens, which become special added tokens.
pub const TOKEN_TYPE_CONTROL: i64 = 3;

/// Tokenizer metadata of one GGUF file.
#[derive(Debug, Clone)]
pub(crate) struct GgufVocab {
    pub(crate) tokens: Vec<String>,
    pub(crate) token_types: Vec<i64>,
    pub(crate) merges: Vec<(String, String)>,
    pub(crate) bos: Option<i64>,
    pub(crate) eos: Option<i64>,
    pub(crate) unk: Option<i64>,
    pub(crate) pad: Option<i64>,
    pub(crate) chat_template: Option<String>,
}

impl GgufVocab {
    pub(crate) fn from_metadata(meta: &Metadata<'_>) -> Result<Self, GgufImportError> {
        let model = meta.str("tokenizer.ggml.model")?;
        if model != SUPPORTED_TOKENIZER_MODEL {
            return Err(GgufImportError::UnsupportedTokenizer {
                path: meta.path_buf(),
                model: model.to_string(),
            });
        }
        let tokens: Vec<String> = meta
            .str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let token_types = meta.int_array("tokenizer.ggml.token_type")?;
        if token_types.len() != tokens.len() {
            let found = candle_core::quantized::gguf_file::Value::U64(token_types.len() as u64);
            let expected = format!("{} entries (one per token)", tokens.len());
            return Err(meta.bad("tokenizer.ggml.token_type", &expected, &found));
        }
        let merges = meta
            .str_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => {
                    let found = candle_core::quantized::gguf_file::Value::String(m.to_string());
                    Err(meta.bad(
                        "tokenizer.ggml.merges",
                        "entries of the form \"left right\"",
                        &found,
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let special = |key: &str| -> Result<Option<i64>, GgufImportError> {
            match meta.opt_int(key)? {
                Some(id) if id < 0 || id as usize >= tokens.len() => {
                    let expected = format!("a token id below {}", tokens.len());
                    Err(meta.bad(
                        key,
                        &expected,
                        &candle_core::quantized::gguf_file::Value::I64(id),
                    ))
                }
                other => Ok(other),
            }
        };
        Ok(Self {
            bos: special("tokenizer.ggml.bos_token_id")?,
            eos: special("tokenizer.ggml.eos_token_id")?,
            unk: special("tokenizer.ggml.unknown_token_id")?,
            pad: special("tokenizer.ggml.padding_token_id")?,
            chat_template: meta.opt_str("tokenizer.chat_template")?.map(str::to_string),
            tokens,
            token_types,
            merges,
        })
    }

    /// Number of control tokens (written as special added tokens).
    pub(crate) fn special_count(&self) -> usize {
        self.token_types
            .iter()
            .filter(|t| **t == TOKEN_TYPE_CONTROL)
            .count()
    }

    fn token(&self, id: Option<i64>) -> Option<&str> {
        id.map(|i| self.tokens[i as usize].as_str())
    }

    /// `tokenizer.json`: ByteLevel pre-tokenizer/decoder, BPE model, control tokens as added tokens.
    pub(crate) fn tokenizer_json(&self) -> TokenizerJson<'_> {
        let added_tokens = (self.tokens.iter().zip(&self.token_types).enumerate())
            .filter(|(_, (_, ty))| **ty == TOKEN_TYPE_CONTROL)
            .map(|(id, (content, _))| AddedToken {
                id,
                content,
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: false,
                special: true,
            })
            .collect();
        let byte_level = |add_prefix_space| ByteLevel {
            kind: "ByteLevel",
            add_prefix_space,
            trim_offsets: true,
            use_regex: true,
        };
        let seq = |id, type_id| Piece {
            sequence: Sequence { id, type_id },
        };
        TokenizerJson {
            version: "1.0",
            truncation: None,
            padding: None,
            added_tokens,
            normalizer: None,
            pre_tokenizer: byte_level(false),
            post_processor: PostProcessor {
                kind: "TemplateProcessing",
                single: vec![seq("A", 0)],
                pair: vec![seq("A", 0), seq("B", 1)],
                special_tokens: Empty {},
            },
            decoder: byte_level(true),
            model: BpeModel {
                kind: "BPE",
                dropout: None,
                unk_token: None,
                continuing_subword_prefix: "",
                end_of_word_suffix: "",
                fuse_unk: false,
                byte_fallback: false,
                ignore_merges: false,
                vocab: Vocab(&self.tokens),
                merges: self
                    .merges
                    .iter()
                    .map(|(a, b)| [a.as_str(), b.as_str()])
                    .collect(),
            },
        }
    }

    /// `tokenizer_config.json` (PreTrainedTokenizerFast over `tokenizer.json`).
    pub(crate) fn tokenizer_config_json(&self, model_max_length: usize) -> TokenizerConfigJson<'_> {
        TokenizerConfigJson {
            backend: "tokenizers",
            bos_token: self.token(self.bos),
            eos_token: self.token(self.eos),
            pad_token: self.token(self.pad),
            unk_token: self.token(self.unk),
            tokenizer_class: "PreTrainedTokenizerFast",
            model_max_length,
        }
    }
}

// The JSON documents, fields in the reference converter's order (`None` is written as null).

#[derive(Serialize)]
pub(crate) struct TokenizerJson<'a> {
    version: &'a str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<AddedToken<'a>>,
    normalizer: Option<()>,
    pre_tokenizer: ByteLevel,
    post_processor: PostProcessor,
    decoder: ByteLevel,
    model: BpeModel<'a>,
}

#[derive(Serialize)]
struct AddedToken<'a> {
    id: usize,
    content: &'a str,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

#[derive(Serialize)]
struct ByteLevel {
    #[serde(rename = "type")]
    kind: &'static str,
    add_prefix_space: bool,
    trim_offsets: bool,
    use_regex: bool,
}

#[derive(Serialize)]
struct PostProcessor {
    #[serde(rename = "type")]
    kind: &'static str,
    single: Vec<Piece>,
    pair: Vec<Piece>,
    special_tokens: Empty,
}

#[derive(Serialize)]
struct Piece {
    #[serde(rename = "Sequence")]
    sequence: Sequence,
}

#[derive(Serialize)]
struct Sequence {
    id: &'static str,
    type_id: u32,
}

/// `{}`
#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct BpeModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f64>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: &'a str,
    end_of_word_suffix: &'a str,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: Vocab<'a>,
    merges: Vec<[&'a str; 2]>,
}

/// `{token: id}` in token order, with Python dict semantics for a repeated token: it keeps the
/// position of its first occurrence and the id of its last.
struct Vocab<'a>(&'a [String]);

impl Serialize for Vocab<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let last: HashMap<&str, usize> = self
            .0
            .iter()
            .enumerate()
            .map(|(id, t)| (t.as_str(), id))
            .collect();
        let mut written = HashSet::with_capacity(last.len());
        let mut map = serializer.serialize_map(Some(last.len()))?;
        for token in self.0 {
            if written.insert(token.as_str()) {
                map.serialize_entry(token, &last[token.as_str()])?;
            }
        }
        map.end()
    }
}

#[derive(Serialize)]
pub(crate) struct TokenizerConfigJson<'a> {
    backend: &'a str,
    bos_token: Option<&'a str>,
    eos_token: Option<&'a str>,
    pad_token: Option<&'a str>,
    unk_token: Option<&'a str>,
    tokenizer_class: &'a str,
    model_max_length: usize,
}
