use std::io::Write;

use anyhow::{bail, Result};
use clap::Args;
use lorq_model::{run_to_completion, GenerationRequest, Sequence};
use serde_json::json;
use std::sync::Arc;

use lorq_model::json_constraint::{JsonConstraint, JsonSchema, TokenPieces};

use crate::common::{parse_token_ids, ModelArgs, SamplingFlags};

/// Generate text from a prompt (greedy by default).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq generate --chat --prompt \"What is the capital of France?\"
  lorq generate --model ./my-model --adapter ./my-adapter --prompt \"Once upon a time\" --max-new-tokens 32
  lorq generate --token-ids 6403,1980,253,655 --temperature 0.8 --top-p 0.9 --seed 1 --json")]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(
        long,
        conflicts_with = "token_ids",
        required_unless_present = "token_ids"
    )]
    pub prompt: Option<String>,
    /// Render the prompt as one user turn through the model's chat template.
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// The prompt as token ids, e.g. `1,2,3`.
    #[arg(long)]
    pub token_ids: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the generated text contains this (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past EOS tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Constrain the output to JSON matching this JSON schema (a file, or the schema inline);
    /// `{}` allows any JSON object. The same decoding as the server's `response_format`.
    #[arg(long, value_name = "FILE|JSON")]
    pub response_schema: Option<String>,
}

/// The schema `--response-schema` names: inline JSON, or a file holding it.
fn read_schema(arg: &str) -> Result<serde_json::Value> {
    let text = if arg.trim_start().starts_with('{') {
        arg.to_string()
    } else {
        std::fs::read_to_string(arg)
            .map_err(|e| anyhow::anyhow!("--response-schema {arg}: cannot read the file: {e}"))?
    };
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--response-schema: not valid JSON: {e}"))
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let (m, adapter) = a.model.load()?;
    let prompt_ids = match (&a.prompt, &a.token_ids) {
        (Some(p), None) => m.prompt_ids(p, a.chat)?,
        (None, Some(t)) => parse_token_ids(t)?,
        _ => bail!("give exactly one of --prompt or --token-ids"),
    };
    let request = GenerationRequest {
        prompt_ids: prompt_ids.clone(),
        params: a.sampling.params(a.seed),
        max_new_tokens: a.max_new_tokens,
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        adapter,
    };
    let mut seq = Sequence::new(&m.model, request)?;
    if let Some(arg) = &a.response_schema {
        let schema = read_schema(arg)?;
        let compiled = JsonSchema::compile((schema != json!({})).then_some(&schema))?;
        let pieces = TokenPieces::new(&m.tokenizer)?;
        seq.set_constraint(Box::new(JsonConstraint::new(
            Arc::new(compiled),
            Arc::new(pieces),
        )));
    }
    let mut seqs = vec![seq];
    let stream = !a.json;
    let mut out = std::io::stdout().lock();
    run_to_completion(
        &m.model,
        &m.tokenizer,
        &m.eos_token_ids,
        &mut seqs,
        |_, _, piece| {
            if stream {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        },
    )?;
    let seq = &seqs[0];
    if a.json {
        let v = json!({
            "prompt_ids": prompt_ids,
            "token_ids": seq.token_ids(),
            "text": seq.text,
            "finish_reason": seq.finish,
            "seed": seq.seed(),
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}
