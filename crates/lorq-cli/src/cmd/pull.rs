use anyhow::Result;
use clap::Args;

/// Fetch the embedded default model (SmolLM2-135M-Instruct) into lorq's cache ($LORQ_HOME).
#[derive(Debug, Args)]
#[command(after_help = "Example:
  lorq pull            # then: lorq generate --chat --prompt \"Hi\"")]
pub struct PullArgs {
    /// Fetch and import again even when the model is cached.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: PullArgs) -> Result<()> {
    let dir = lorq_model::pull::pull_default(a.force)?;
    println!("{}", dir.display());
    Ok(())
}
