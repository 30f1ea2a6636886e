//! Where each sequence's next token is picked from a step's logits. On a GPU, greedy sequences
//! take the argmax in one launch and sampled ones (repetition penalty, temperature, top-k, top-p)
//! draw after one more that prepares their scores, so only token ids and log-probabilities come
//! back; greedy sequences with a repetition penalty take the argmax of their penalized rows, and
//! the alternatives a sequence reports (its most likely tokens) take one more launch. The rest (typical-p, everything on the CPU but the
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
    let which = |route: Route, penalized: bool| -> Vec<usize> {
        (0..requests.len())
            .filter(|&i| {
                routes[i] == route
                    && requests[i].sampler.repetition_penalty().is_some() == penalized
            })
            .collect()
    };
    let penalty_of = |i: usize| -> (f32, &[u32]) {
        let r = &requests[i];
        match r.sampler.repetition_penalty() {
            Some(p) => (p, r.context),
            None => (1.0, &[]),
        }
    };
    // Greedy: the argmax of the logits, or of the penalized rows.
    let plain = which(Route::Greedy, false);
    for (&i, t) in plain.iter().zip(logits.greedy_last(&plain)?) {
        picks[i] = Some(StepPick::Token(t, vec![]));
    }
    let penalized = which(Route::Greedy, true);
    if !penalized.is_empty() {
        let penalties: Vec<(f32, &[u32])> = penalized.iter().map(|&i| penalty_of(i)).collect();
        let rows = logits.penalized(&penalized, &penalties)?;
        let items: Vec<usize> = (0..penalized.len()).collect();
        for (&i, t) in penalized.iter().zip(rows.greedy_last(&items)?) {
            picks[i] = Some(StepPick::Token(t, vec![]));
        }
    }
    // Drawn, penalized or not: one preparation launch and one draw.
    let drawn: Vec<usize> = (0..requests.len())
        .filter(|&i| routes[i] == Route::Draw)
        .collect();
    let penalties: Vec<(f32, &[u32])> = drawn.iter().map(|&i| penalty_of(i)).collect();
    let draws: Vec<DeviceDraw> = drawn
        .iter()
        .map(|&i| requests[i].sampler.device_draw())
        .collect();
    for (&i, t) in drawn
        .iter()
        .zip(logits.sample_last(&drawn, &draws, &penalties)?)
    {
        picks[i] = Some(StepPick::Token(t, vec![]));
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
