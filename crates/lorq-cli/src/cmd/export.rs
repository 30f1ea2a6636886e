use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lorq_model::export::export_checkpoint;
use lorq_model::merge_checkpoint::MergeOptions;

use super::merge::MergeFlags;
use super::quantize::{print_quantization, QuantizeFlags};

/// Merge LoRA adapters into the base and quantize the merged model, in one command (the QLoRA
/// production path): the same checkpoint as `lorq merge` followed by `lorq quantize` on the
/// merged folder, with the same flags. Methods that quantize each weight on its own (nf4, fp4,
/// int8, eetq, hqq, fp8) stream: each linear is merged (W + ΔW) and quantized at once, and no
/// full-precision merged model is written. gptq, awq and rtn-int4 calibrate on the merged model:
/// it is written to a temporary folder next to --out and removed afterwards.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq export --model ./base --adapter ./my-adapter --method bitsandbytes-nf4 --out ./merged-nf4
  lorq export --model ./base --adapter ./qlora-adapter --quantize bitsandbytes-nf4 --method gptq \\
      --calibration wikitext-2/valid.txt --calibration-samples 64 --calibration-seq-len 512 \\
      --act-order --out ./merged-gptq4
  lorq export --adapter ./a --adapter ./b --weights 0.7,0.3 --merge-strategy ties --density 0.5 \\
      --method awq --calibration data.jsonl --out ./merged-awq4 --json
  lorq export --model ./base --adapter ./my-adapter --method hqq-4bit --dtype bf16 --out ./merged-hqq4")]
pub struct ExportArgs {
    /// The base model: a Hugging Face folder (full precision or pre-quantized), or `default`.
    #[arg(long, default_value = "default", env = "LORQ_MODEL")]
    pub model: String,
    #[command(flatten)]
    pub merge: MergeFlags,
    #[command(flatten)]
    pub quant: QuantizeFlags,
    /// Seed of DARE's random drop and of the calibration window offsets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The output folder (created; must be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Write into an existing, non-empty output folder.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary (the merge, then the quantization as `lorq quantize --json` prints it).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ExportArgs) -> Result<()> {
    // Every flag is checked before anything is read or written.
    let method = a.quant.resolve(a.seed)?;
    let m = a.merge.resolve(a.seed)?;
    let dir = lorq_model::pull::resolve_model(&a.model)?;
    let s = export_checkpoint(
        &dir,
        &m.adapters,
        &m.spec,
        MergeOptions {
            force: a.force,
            ..m.options
        },
        &method,
        &a.out,
    )
    .with_context(|| {
        format!(
            "exporting {} merged with {} adapter(s) as {}",
            dir.display(),
            m.adapters.len(),
            method.name()
        )
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "merged {} adapter(s) with {} into {} linears of a {} base ({}{})",
            s.adapters.len(),
            s.strategy,
            s.merged_linears,
            s.base,
            s.merged_dtype,
            if s.merged_on_disk {
                ", through a temporary folder"
            } else {
                ", streamed"
            }
        );
        print_quantization(&s.quantization);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }
    #[derive(clap::Subcommand)]
    enum Cmd {
        Export(super::ExportArgs),
    }

    /// The flattened merge and quantize flags do not collide.
    #[test]
    fn flags_parse() {
        let c = Cli::try_parse_from([
            "lorq",
            "export",
            "--adapter",
            "a",
            "--adapter",
            "b",
            "--weights",
            "1,0.5",
            "--method",
            "gptq",
            "--calibration",
            "c.txt",
            "--seed",
            "3",
            "--out",
            "o",
        ])
        .unwrap();
        let Cmd::Export(a) = c.cmd;
        assert_eq!(a.merge.adapters.len(), 2);
        assert_eq!(a.quant.method, "gptq");
        assert_eq!(a.seed, 3);
    }
}
