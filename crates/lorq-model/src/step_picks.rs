//! Where each sequence's next token is picked from a step's logits. On a GPU, greedy sequences
//! take the argmax in one launch and sampled ones (temperature, top-k, top-p) draw in another,
//! so only token ids and log-probabilities come back; a repetition penalty adds one launch that
//! penalizes those sequences' rows in a copy they pick from, and the alternatives a sequence
//! reports (its most likely tokens) one more. The rest (typical-p, everything on the CPU but the
//! argmax, and what the caller must see a row for: a constraint's mask) get their rows back in one
//! copy, to sample on the host.

use crate::error::{ModelError, Result};
use crate::sampling::{DeviceDraw, Sampled, Sampler};
use crate::step_logits::StepLogits;

/// One sequence's part of [`pick_step`].
pub struct PickRequest<'a> {
    pub sampler: &'a mut Sampler,
    /// Every token so far (prompt and generated): the repetition penalty's context.
    pub context: &'a [u32],
    /// How many of the most likely tokens to report beside the pick (raw distribution).
    pub alternatives: usize,
    /// The caller needs the row itself (a constraint's mask); it then takes the alternatives
    /// from the row too.
    pub needs_row: bool,
}

/// A sequence's share of a step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepPick {
    /// Its token, picked where the logits are, and its alternatives.
    Token(Sampled, Vec<Sampled>),
    /// Its last row, f32 on the host, for its sampler ([`Sampler::sample`]).
    Row(Vec<f32>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The argmax of the (penalized) row, on the logits' device.
    Greedy,
    /// A draw on the GPU ([`Sampler::device_draw`]).
    Draw,
    /// The row on the host.
    Host,
}

/// Picks the next token of every sequence of a step (item `i` of `logits` is `requests[i]`'s)
/// where it can be picked, in a few launches and one copy for the batch (see the module). The
/// samplers draw their numbers as [`Sampler::sample`] would, so a seed gives the same stream of
/// tokens whichever way a sequence goes.
pub fn pick_step(logits: &StepLogits, requests: &mut [PickRequest]) -> Result<Vec<StepPick>> {
    if logits.len() != requests.len() {
        return Err(ModelError::Request(format!(
            "pick_step: {} sequences, {} items of logits",
            requests.len(),
            logits.len()
        )));
    }
    let on_gpu = logits.on_gpu();
    let routes: Vec<Route> = requests
        .iter()
        .map(|r| {
            if r.needs_row {
                Route::Host
            } else if r.sampler.is_greedy() {
                Route::Greedy
            } else if on_gpu && r.sampler.samples_on_device() {
                Route::Draw
            } else {
                Route::Host
            }
        })
        .collect();
    let mut picks: Vec<Option<StepPick>> = vec![None; requests.len()];
    let (plain, penalized): (Vec<usize>, Vec<usize>) = (0..requests.len())
        .filter(|&i| routes[i] != Route::Host)
        .partition(|&i| requests[i].sampler.repetition_penalty().is_none());
    pick_from(logits, &plain, &plain, &routes, requests, &mut picks)?;
    if !penalized.is_empty() {
        let penalties: Vec<(f32, &[u32])> = penalized
            .iter()
            .map(|&i| {
                let r = &requests[i];
                (r.sampler.repetition_penalty().unwrap_or(1.0), r.context)
            })
            .collect();
        let rows = logits.penalized(&penalized, &penalties)?;
        let items: Vec<usize> = (0..penalized.len()).collect();
        pick_from(&rows, &penalized, &items, &routes, requests, &mut picks)?;
    }
    let reporting: Vec<usize> = (0..requests.len())
        .filter(|&i| routes[i] != Route::Host && requests[i].alternatives > 0)
        .collect();
    let counts: Vec<usize> = reporting
        .iter()
        .map(|&i| requests[i].alternatives)
        .collect();
    for (&i, top) in reporting.iter().zip(logits.top_last(&reporting, &counts)?) {
        if let Some(StepPick::Token(_, alternatives)) = &mut picks[i] {
            *alternatives = top;
        }
    }
    let host: Vec<usize> = (0..requests.len())
        .filter(|&i| routes[i] == Route::Host)
        .collect();
    for (&i, row) in host.iter().zip(logits.last_rows_host(&host)?) {
        picks[i] = Some(StepPick::Row(row));
    }
    picks
        .into_iter()
        .map(|p| p.ok_or_else(|| ModelError::Request("pick_step: a sequence got no pick".into())))
        .collect()
}

/// The greedy and drawn tokens of the sequences `seqs` from `src`, whose item `items[j]` is
/// sequence `seqs[j]`'s: one launch for each kind.
fn pick_from(
    src: &StepLogits,
    seqs: &[usize],
    items: &[usize],
    routes: &[Route],
    requests: &mut [PickRequest],
    picks: &mut [Option<StepPick>],
) -> Result<()> {
    // Positions in `seqs` / `items` of each kind.
    let (greedy, drawn): (Vec<usize>, Vec<usize>) =
        (0..seqs.len()).partition(|&j| routes[seqs[j]] == Route::Greedy);
    let items_at = |at: &[usize]| at.iter().map(|&j| items[j]).collect::<Vec<_>>();
    let tokens = src.greedy_last(&items_at(&greedy))?;
    for (&j, t) in greedy.iter().zip(tokens) {
        picks[seqs[j]] = Some(StepPick::Token(t, vec![]));
    }
    let draws: Vec<DeviceDraw> = drawn
        .iter()
        .map(|&j| requests[seqs[j]].sampler.device_draw())
        .collect();
    let tokens = src.sample_last(&items_at(&drawn), &draws)?;
    for (&j, t) in drawn.iter().zip(tokens) {
        picks[seqs[j]] = Some(StepPick::Token(t, vec![]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::top_logprobs;
    use crate::sampling::SamplingParams;
    use candle_core::{DType, Device, Tensor};

    /// On the CPU every greedy sequence, penalized or not, gets the host sampler's token from
    /// the step, with the alternatives it asked for (many ties: the smaller index first); the
    /// sampled ones and those that need their row get the row.
    #[test]
    fn picks_match_the_host_sampler() {
        let vocab = 50;
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|r| {
                (0..vocab)
                    .map(|v| (((r * 13 + v * 7) % 17) as f32 - 8.0) * 0.37)
                    .collect()
            })
            .collect();
        let logits = StepLogits::new(
            Tensor::from_vec(rows.concat(), (5, vocab), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
            &[1; 5],
        )
        .unwrap();
        let host = logits.last_rows_host(&[0, 1, 2, 3, 4]).unwrap();
        let greedy = SamplingParams::default();
        let penalty = SamplingParams {
            repetition_penalty: Some(1.7),
            ..Default::default()
        };
        let sampled = SamplingParams {
            temperature: Some(0.8),
            repetition_penalty: Some(1.3),
            seed: Some(7),
            ..Default::default()
        };
        let params = [&greedy, &penalty, &sampled, &penalty, &greedy];
        // Each row's best tokens as the penalty's context (ties and repeats included).
        let contexts: Vec<Vec<u32>> = host
            .iter()
            .map(|row| {
                let best = crate::sampling::argmax(row) as u32;
                vec![best, 3, best, 49, 1000]
            })
            .collect();
        let mut samplers: Vec<Sampler> = params.iter().map(|&p| Sampler::new(p.clone())).collect();
        let mut reference: Vec<Sampler> = params.iter().map(|&p| Sampler::new(p.clone())).collect();
        let mut requests: Vec<PickRequest> = samplers
            .iter_mut()
            .zip(&contexts)
            .enumerate()
            .map(|(i, (sampler, context))| PickRequest {
                sampler,
                context,
                alternatives: [3, 0, 2, 4, 2][i],
                needs_row: i == 4,
            })
            .collect();
        let picks = pick_step(&logits, &mut requests).unwrap();
        for (i, pick) in picks.iter().enumerate() {
            match (i, pick) {
                (0 | 1 | 3, StepPick::Token(t, alternatives)) => {
                    let want = reference[i].sample(&host[i], &contexts[i]);
                    assert_eq!(*t, want, "sequence {i}");
                    let n = [3, 0, 2, 4, 2][i];
                    assert_eq!(alternatives, &top_logprobs(&host[i], n), "sequence {i}");
                    assert_eq!(alternatives.len(), n);
                }
                (2 | 4, StepPick::Row(row)) => assert_eq!(row, &host[i], "sequence {i}"),
                _ => panic!("sequence {i}: {pick:?}"),
            }
        }
        // The penalty moved sequence 1's pick off its argmax.
        assert_ne!(
            picks[1],
            StepPick::Token(
                Sampled {
                    id: contexts[1][0],
                    logprob: crate::sampling::log_softmax_at(&host[1], contexts[1][0] as usize),
                },
                vec![]
            )
        );
        // Row 3's best value is at 3 tokens; its alternatives take them by index.
        let StepPick::Token(_, ref top) = picks[3] else {
            unreachable!()
        };
        let ids: Vec<u32> = top.iter().map(|s| s.id).collect();
        let best = crate::sampling::argmax(&host[3]) as u32;
        assert_eq!(&ids[..3], &[best, best + 17, best + 34]);
        let mut short = requests;
        short.pop();
        let e = pick_step(&logits, &mut short).unwrap_err().to_string();
        assert!(e.contains("4 sequences, 5 items"), "{e}");
    }
}
