use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Convert a llama-architecture GGUF file into a Hugging Face model folder.
#[derive(Debug, Args)]
#[command(after_help = "Example:
  lorq import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out ./smollm2")]
pub struct ImportGgufArgs {
    /// The .gguf file.
    pub file: PathBuf,
    /// Output folder (config.json, model.safetensors, tokenizer.json, ...).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: ImportGgufArgs) -> Result<()> {
    let s = lorq_model::gguf::import_gguf(&a.file, &a.out)?;
    eprintln!(
        "imported {} tensors ({}; vocab {}, {} merges, {} special tokens, tied embeddings: {}) into {}",
        s.tensors,
        s.architecture,
        s.vocab_size,
        s.merges,
        s.special_tokens,
        s.tied_embeddings,
        a.out.display()
    );
    Ok(())
}
