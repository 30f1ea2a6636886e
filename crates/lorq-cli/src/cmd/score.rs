use anyhow::{bail, Result};
use clap::Args;
use lorq_model::sampling::log_softmax_at;
use lorq_model::{BatchItem, LogitsWanted};
use serde_json::json;

use crate::common::{parse_token_ids, ModelArgs};

/// Teacher-forced log-probabilities of a text under the model (and adapter).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  lorq score --text \"The capital of France is Paris.\" --json
  lorq score --model ./my-model --adapter ./my-adapter --token-ids 1,2,3 --full-logits --json")]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(
        long,
        conflicts_with = "token_ids",
        required_unless_present = "token_ids"
    )]
    pub text: Option<String>,
    #[arg(long)]
    pub token_ids: Option<String>,
    /// Also print the whole vocabulary's logits at the last position.
    #[arg(long)]
    pub full_logits: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let (m, adapter) = a.model.load()?;
    let ids = match (&a.text, &a.token_ids) {
        (Some(t), None) => m.tokenizer.encode(t)?,
        (None, Some(t)) => parse_token_ids(t)?,
        _ => bail!("give exactly one of --text or --token-ids"),
    };
    if ids.is_empty() {
        bail!("the text has no tokens");
    }
    let mut cache = m.model.new_cache();
    let logits = m.model.forward(&mut [BatchItem {
        tokens: &ids,
        cache: &mut cache,
        adapter,
        logits: LogitsWanted::All,
    }])?;
    let rows: Vec<Vec<f32>> = logits[0].to_vec2()?;
    let logprobs: Vec<f32> = ids[1..]
        .iter()
        .zip(&rows)
        .map(|(&next, row)| log_softmax_at(row, next as usize))
        .collect();
    let last = rows.last().expect("at least one token");
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&x, &y| last[y].total_cmp(&last[x]).then(x.cmp(&y)));
    let top: Vec<(usize, f32)> = order.iter().take(10).map(|&i| (i, last[i])).collect();
    if a.json {
        let mut v = json!({
            "token_ids": ids,
            "logprobs": logprobs,
            "top_logits": top.iter().map(|(i, l)| json!([i, l])).collect::<Vec<_>>(),
        });
        if a.full_logits {
            v["last_logits"] = json!(last);
        }
        println!("{v}");
    } else {
        let total: f32 = logprobs.iter().sum();
        println!("tokens: {}", ids.len());
        println!(
            "sum logprob: {total:.4}  mean: {:.4}",
            total / logprobs.len().max(1) as f32
        );
        for (i, (id, lp)) in ids[1..].iter().zip(&logprobs).enumerate() {
            let piece = m.tokenizer.decode(&[*id], false)?;
            println!("{:>5} {:>7} {:>10.4}  {piece:?}", i + 1, id, lp);
        }
        println!("top logits at the last position:");
        for (i, l) in &top {
            println!(
                "  {i:>7} {l:>10.4}  {:?}",
                m.tokenizer.decode(&[*i as u32], false)?
            );
        }
    }
    Ok(())
}
