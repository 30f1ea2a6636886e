//! One micro-batch through the whole model: forward, loss, and the LoRA-only backward, with or
//! without gradient checkpointing (which keeps only each layer's input and recomputes the layer
//! in the backward pass).

use candle_core::Tensor;
use lorq_model::LlamaModel;

use crate::data::IGNORE_INDEX as IGNORE;
use crate::decoder_grad::{layer_bwd, layer_fwd, StepCtx};
use crate::error::{Result, TrainError};
use crate::lora_params::LoraParams;
use crate::loss::head_loss;

/// Unpadded sequences laid out one after the other, with the `(row, next token)` pairs the loss
/// is taken on.
#[derive(Debug, Clone, Default)]
pub struct MicroBatch {
    pub tokens: Vec<u32>,
    /// `(first row, length)` per sequence.
    pub spans: Vec<(usize, usize)>,
    /// `(row, target)`: the hidden state at `row` predicts `target`.
    pub targets: Vec<(u32, u32)>,
}

impl MicroBatch {
    /// From `(input_ids, labels)` pairs in transformers' convention: `labels[i] == input_ids[i]`
    /// where the token is trained, [`IGNORE`] elsewhere; position `i` predicts `labels[i + 1]`.
    pub fn new<'a>(seqs: impl IntoIterator<Item = (&'a [u32], &'a [i64])>) -> Result<Self> {
        let mut b = MicroBatch::default();
        for (ids, labels) in seqs {
            if ids.len() != labels.len() {
                return Err(TrainError::Config(format!(
                    "a sequence has {} tokens but {} labels",
                    ids.len(),
                    labels.len()
                )));
            }
            if ids.is_empty() {
                continue;
            }
            let start = b.tokens.len();
            for i in 0..ids.len() - 1 {
                let l = labels[i + 1];
                if l != IGNORE {
                    let t = u32::try_from(l).map_err(|_| {
                        TrainError::Config(format!("label {l} is neither a token id nor {IGNORE}"))
                    })?;
                    b.targets.push(((start + i) as u32, t));
                }
            }
            b.spans.push((start, ids.len()));
            b.tokens.extend_from_slice(ids);
        }
        Ok(b)
    }

    /// From the data pipeline's examples.
    pub fn from_examples(examples: &[crate::data::Example]) -> Result<Self> {
        Self::new(
            examples
                .iter()
                .map(|e| (e.input_ids.as_slice(), e.labels.as_slice())),
        )
    }

    /// Tokens the loss is taken on.
    pub fn num_targets(&self) -> usize {
        self.targets.len()
    }
}

fn ropes(model: &LlamaModel, spans: &[(usize, usize)]) -> Result<Vec<(Tensor, Tensor)>> {
    spans
        .iter()
        .map(|&(_, n)| Ok(model.rope_tables(0, n)?))
        .collect()
}

/// Forward and backward of one micro-batch: returns `Σ nll` over its targets and adds
/// `grad_scale · ∂(Σ nll)/∂θ` into `grads` (one slot per LoRA tensor, order of
/// [`LoraParams::tensors`]). `dropout_seed` seeds this micro-batch's dropout masks.
pub fn forward_backward(
    model: &LlamaModel,
    lora: &LoraParams,
    batch: &MicroBatch,
    grad_scale: f64,
    checkpointing: bool,
    dropout_seed: u64,
    grads: &mut [Option<Tensor>],
) -> Result<f64> {
    if batch.targets.is_empty() {
        return Ok(0.0);
    }
    let ropes = ropes(model, &batch.spans)?;
    let ctx = StepCtx::new(model, lora, batch, &ropes, Some(dropout_seed));
    let layers = model.num_layers();
    let mut x = model.embed(&batch.tokens)?;
    let mut inputs = Vec::with_capacity(layers);
    let mut saved = Vec::with_capacity(layers);
    for l in 0..layers {
        if checkpointing {
            inputs.push(x.clone());
        }
        let (out, s) = layer_fwd(&ctx, l, &x, !checkpointing)?;
        saved.push(s);
        x = out;
    }
    let (nll, dx) = head_loss(model, &x, &batch.targets, Some(grad_scale))?;
    drop(x);
    let mut dx = dx.expect("gradient requested");
    for l in (0..layers).rev() {
        let s = match saved.pop().flatten() {
            Some(s) => s,
            None => {
                let input = inputs.pop().expect("one input per layer");
                layer_fwd(&ctx, l, &input, true)?.1.expect("kept")
            }
        };
        match layer_bwd(&ctx, l, &s, &dx, l > 0, grads)? {
            Some(d) => dx = d,
            None => break,
        }
    }
    Ok(nll)
}

/// `Σ nll` of one micro-batch without gradients (dropout off).
pub fn eval_nll(model: &LlamaModel, lora: &LoraParams, batch: &MicroBatch) -> Result<f64> {
    if batch.targets.is_empty() {
        return Ok(0.0);
    }
    let ropes = ropes(model, &batch.spans)?;
    let ctx = StepCtx::new(model, lora, batch, &ropes, None);
    let mut x = model.embed(&batch.tokens)?;
    for l in 0..model.num_layers() {
        x = layer_fwd(&ctx, l, &x, false)?.0;
    }
    Ok(head_loss(model, &x, &batch.targets, None)?.0)
}
