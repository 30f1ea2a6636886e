//! The logits of one batched step, kept where the LM head wrote them: one `[rows, vocab]` tensor
//! in the model's dtype, each sequence's rows in batch order. A greedy sequence needs only the
//! argmax and its log-probability, which the GPU computes for the whole batch in one pass and one
//! small copy; only sequences that sample, constrain or report alternatives bring rows to the
//! host, all in one copy (at batch 64 with a 128k vocabulary the per-sequence copies were 64
//! synchronous 513 KB transfers a step).

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::generation::top_logprobs;
use crate::sampling::{apply_repetition_penalty, argmax, log_softmax_at, DeviceDraw, Sampled};

pub struct StepLogits {
    /// `[rows, vocab]`, the LM head's output dtype.
    all: Tensor,
    /// Per item: its first row and row count.
    spans: Vec<(usize, usize)>,
}

impl StepLogits {
    /// `all` holds `counts[0]` rows of the first item, then `counts[1]` of the next, ...
    pub(crate) fn new(all: Tensor, counts: &[usize]) -> Result<Self> {
        let rows = all.dim(0)?;
        let mut spans = Vec::with_capacity(counts.len());
        let mut at = 0;
        for &n in counts {
            spans.push((at, n));
            at += n;
        }
        if at != rows {
            return Err(ModelError::Request(format!(
                "step logits: the items want {at} rows, the LM head gave {rows}"
            )));
        }
        Ok(Self { all, spans })
    }

    /// How many sequences the step had.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Item `i`'s rows (1 for `LogitsWanted::Last`).
    pub fn rows(&self, i: usize) -> Result<usize> {
        Ok(self.span(i)?.1)
    }

    fn span(&self, i: usize) -> Result<(usize, usize)> {
        self.spans.get(i).copied().ok_or_else(|| {
            ModelError::Request(format!(
                "step logits: item {i} of a step over {} sequences",
                self.spans.len()
            ))
        })
    }

    /// Item `i`'s logits as f32 `[n, vocab]`.
    pub fn item(&self, i: usize) -> Result<Tensor> {
        let (start, n) = self.span(i)?;
        Ok(self.all.narrow(0, start, n)?.to_dtype(DType::F32)?)
    }

    /// Every item's f32 logits, as [`crate::LlamaModel::forward`] returns them.
    pub fn into_items(self) -> Result<Vec<Tensor>> {
        let all = self.all.to_dtype(DType::F32)?;
        self.spans
            .iter()
            .map(|&(start, n)| Ok(all.narrow(0, start, n)?))
            .collect()
    }

    /// The row of each of `items` that picks its next token (its last).
    fn last_rows(&self, items: &[usize]) -> Result<Vec<u32>> {
        items
            .iter()
            .map(|&i| self.span(i).map(|(start, n)| (start + n - 1) as u32))
            .collect()
    }

    /// The greedy token of each of `items` (the argmax of its last row, the first on ties) with
    /// its log-probability. On a GPU one launch and one copy of two words per item; on the CPU
    /// [`argmax`] and [`log_softmax_at`], as the sampler computes them.
    pub fn greedy_last(&self, items: &[usize]) -> Result<Vec<Sampled>> {
        let rows = self.last_rows(items)?;
        #[cfg(feature = "cuda")]
        if self.on_gpu() {
            return Ok(sampled(lorq_quant::cuda::sampling::greedy_rows(
                &self.all, &rows,
            )?));
        }
        Ok(self
            .host_rows(&rows)?
            .par_iter()
            .map(|row| {
                let id = argmax(row);
                Sampled {
                    id: id as u32,
                    logprob: log_softmax_at(row, id),
                }
            })
            .collect())
    }

    /// Whether the logits are on a GPU, where [`StepLogits::sample_last`] draws tokens.
    pub fn on_gpu(&self) -> bool {
        self.all.device().is_cuda()
    }

    /// A token drawn from the last row of each of `items` on the GPU, with `draws[i]` (the host
    /// sampler's processors and uniform number, [`crate::Sampler::device_draw`]) after the
    /// repetition penalty `penalties[i]` (the penalty, 1 for none, and the tokens it applies to):
    /// two launches and one copy of two words per item. Only on a GPU ([`StepLogits::on_gpu`]).
    pub fn sample_last(
        &self,
        items: &[usize],
        draws: &[DeviceDraw],
        penalties: &[(f32, &[u32])],
    ) -> Result<Vec<Sampled>> {
        let rows = self.last_rows(items)?;
        if rows.is_empty() {
            return Ok(vec![]);
        }
        one_per_item("sample_last", rows.len(), "draws", draws.len())?;
        one_per_item("sample_last", rows.len(), "penalties", penalties.len())?;
        #[cfg(feature = "cuda")]
        if self.on_gpu() {
            use lorq_quant::cuda::sampling::{sample_rows, RowSampling};
            let args: Vec<RowSampling> = rows
                .iter()
                .zip(draws)
                .zip(penalties)
                .map(|((&row, d), &(penalty, penalized))| RowSampling {
                    row,
                    penalty,
                    penalized,
                    temperature: d.temperature,
                    top_k: d.top_k.map(|k| k.min(u32::MAX as usize) as u32),
                    top_p: d.top_p,
                    u: d.u,
                })
                .collect();
            return Ok(sampled(sample_rows(&self.all, &args)?));
        }
        Err(ModelError::Request(
            "sample_last draws on a GPU; the CPU's logits are sampled by the host sampler".into(),
        ))
    }

    /// The last row of each of `items` after its repetition penalty (`penalties[i]`: the penalty
    /// and the tokens it applies to, as [`apply_repetition_penalty`] takes them), as a step of one
    /// f32 row per item to pick from: on a GPU one launch, and the rows stay there.
    pub fn penalized(&self, items: &[usize], penalties: &[(f32, &[u32])]) -> Result<StepLogits> {
        let rows = self.last_rows(items)?;
        one_per_item("penalized", rows.len(), "penalties", penalties.len())?;
        let ones = vec![1; rows.len()];
        #[cfg(feature = "cuda")]
        if self.on_gpu() {
            use lorq_quant::cuda::sampling::{prepare_rows, RowScores};
            let args: Vec<RowScores> = rows
                .iter()
                .zip(penalties)
                .map(|(&row, &(penalty, penalized))| RowScores {
                    row,
                    penalty,
                    temperature: 1.0,
                    penalized,
                })
                .collect();
            return StepLogits::new(prepare_rows(&self.all, &args)?, &ones);
        }
        let mut host = self.host_rows(&rows)?;
        host.par_iter_mut()
            .zip(penalties)
            .for_each(|(row, &(penalty, context))| apply_repetition_penalty(row, penalty, context));
        let shape = (rows.len(), self.all.dim(1)?);
        StepLogits::new(
            Tensor::from_vec(host.concat(), shape, self.all.device())?,
            &ones,
        )
    }

    /// The `counts[i]` most likely tokens of the last row of each of `items` (none for 0) with
    /// their log-probabilities under the raw distribution, best first: [`top_logprobs`]. On a GPU
    /// one launch and one copy for the rows that want up to 64; rows that want more (and every
    /// row on the CPU) come to the host.
    pub fn top_last(&self, items: &[usize], counts: &[usize]) -> Result<Vec<Vec<Sampled>>> {
        let rows = self.last_rows(items)?;
        one_per_item("top_last", rows.len(), "counts", counts.len())?;
        let mut out: Vec<Vec<Sampled>> = vec![vec![]; rows.len()];
        let wanted: Vec<usize> = (0..rows.len()).filter(|&j| counts[j] > 0).collect();
        #[cfg(feature = "cuda")]
        let host = if self.on_gpu() {
            use lorq_quant::cuda::sampling::{top_rows, TOP_MAX};
            let vocab = self.all.dim(1)?;
            let (device, rest): (Vec<usize>, Vec<usize>) = wanted
                .into_iter()
                .partition(|&j| counts[j] <= TOP_MAX.min(vocab));
            let args: Vec<(u32, usize)> = device.iter().map(|&j| (rows[j], counts[j])).collect();
            for (&j, picks) in device.iter().zip(top_rows(&self.all, &args)?) {
                out[j] = sampled(picks);
            }
            rest
        } else {
            wanted
        };
        #[cfg(not(feature = "cuda"))]
        let host = wanted;
        let host_rows: Vec<u32> = host.iter().map(|&j| rows[j]).collect();
        let tops: Vec<Vec<Sampled>> = self
            .host_rows(&host_rows)?
            .par_iter()
            .zip(&host)
            .map(|(row, &j)| top_logprobs(row, counts[j]))
            .collect();
        for (&j, top) in host.iter().zip(tops) {
            out[j] = top;
        }
        Ok(out)
    }

    /// [`StepLogits::greedy_last`] of every item.
    pub fn greedy_each(&self) -> Result<Vec<Sampled>> {
        self.greedy_last(&(0..self.len()).collect::<Vec<_>>())
    }

    /// The last row of each of `items` as f32 on the host, in one copy.
    pub fn last_rows_host(&self, items: &[usize]) -> Result<Vec<Vec<f32>>> {
        let rows = self.last_rows(items)?;
        self.host_rows(&rows)
    }

    fn host_rows(&self, rows: &[u32]) -> Result<Vec<Vec<f32>>> {
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let picked = if rows.len() == self.all.dim(0)?
            && rows.iter().enumerate().all(|(i, &r)| r as usize == i)
        {
            self.all.clone()
        } else {
            let idx = Tensor::from_slice(rows, rows.len(), self.all.device())?;
            self.all.index_select(&idx, 0)?
        };
        Ok(picked.to_dtype(DType::F32)?.to_vec2()?)
    }
}

/// `what`'s per-item arguments (`name`, `given` of them) must be one per item.
fn one_per_item(what: &str, items: usize, name: &str, given: usize) -> Result<()> {
    if given == items {
        return Ok(());
    }
    Err(ModelError::Request(format!(
        "{what}: {items} items, {given} {name}"
    )))
}

/// The GPU's picks as the sampler's tokens.
#[cfg(feature = "cuda")]
fn sampled(picks: Vec<lorq_quant::cuda::sampling::Pick>) -> Vec<Sampled> {
    picks
        .into_iter()
        .map(|p| Sampled {
            id: p.id,
            logprob: p.logprob,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Three items of 2, 1 and 3 rows over a vocabulary of 5, in f32 and bf16.
    fn step(dtype: DType) -> (StepLogits, Vec<Vec<f32>>) {
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|r| {
                (0..5)
                    .map(|v| ((r * 7 + v * 3) % 5) as f32 - 0.5 * r as f32)
                    .collect()
            })
            .collect();
        let flat: Vec<f32> = rows.concat();
        let all = Tensor::from_vec(flat, (6, 5), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        (StepLogits::new(all, &[2, 1, 3]).unwrap(), rows)
    }

    #[test]
    fn greedy_picks_are_the_samplers_on_each_last_row() {
        for dtype in [DType::F32, DType::BF16] {
            let (s, rows) = step(dtype);
            assert_eq!((s.len(), s.rows(0).unwrap(), s.rows(2).unwrap()), (3, 2, 3));
            let picks = s.greedy_each().unwrap();
            for (p, last) in picks.iter().zip([1, 2, 5]) {
                let id = argmax(&rows[last]);
                assert_eq!(p.id as usize, id, "{dtype:?} row {last}");
                assert_eq!(p.logprob, log_softmax_at(&rows[last], id));
            }
            // A subset, out of order.
            let some = s.greedy_last(&[2, 0]).unwrap();
            assert_eq!(some, vec![picks[2], picks[0]]);
            assert_eq!(s.last_rows_host(&[1]).unwrap(), vec![rows[2].clone()]);
            assert_eq!(s.item(2).unwrap().dims(), &[3, 5]);
            let items = s.into_items().unwrap();
            assert_eq!(items[0].to_vec2::<f32>().unwrap(), rows[..2].to_vec());
        }
    }

    #[test]
    fn a_bad_item_or_row_count_is_named() {
        let (s, _) = step(DType::F32);
        let e = s.greedy_last(&[3]).unwrap_err().to_string();
        assert!(e.contains("item 3 of a step over 3 sequences"), "{e}");
        let all = Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap();
        let e = StepLogits::new(all, &[2, 1, 3]).err().unwrap().to_string();
        assert!(e.contains("want 6 rows, the LM head gave 4"), "{e}");
    }
}
