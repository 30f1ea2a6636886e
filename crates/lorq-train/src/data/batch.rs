//! Seeded per-epoch shuffling and a batch cursor whose position can be saved and restored.
//!
//! The generator is a fixed SplitMix64 written here rather than a `rand` RNG, whose streams
//! may change between `rand` versions: a saved position must replay the same order after an
//! upgrade.

use serde::{Deserialize, Serialize};

use super::dataset::Dataset;
use super::Example;
use crate::error::{Result, TrainError};

/// Where a [`Batcher`] stands; saved with a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// 0-based epoch.
    pub epoch: u64,
    /// Examples of this epoch's order already handed out.
    pub index: usize,
    /// The shuffle seed (must match on restore).
    pub seed: u64,
    /// Sequences in the dataset (must match on restore: another dataset, another order).
    pub num_examples: usize,
}

/// Hands out batches of `batch_size` examples in a seeded order that changes every epoch. The
/// last batch of an epoch may be shorter; batches never span two epochs.
pub struct Batcher<'a> {
    ds: &'a Dataset,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    index: usize,
    order: Vec<usize>,
}

impl<'a> Batcher<'a> {
    pub fn new(ds: &'a Dataset, batch_size: usize, seed: u64) -> Result<Self> {
        if batch_size == 0 {
            return Err(TrainError::Config("--batch-size must be at least 1".into()));
        }
        if ds.is_empty() {
            return Err(TrainError::Config("the dataset has no examples".into()));
        }
        Ok(Self {
            ds,
            batch_size,
            seed,
            epoch: 0,
            index: 0,
            order: shuffled_indices(ds.len(), seed, 0),
        })
    }

    pub fn position(&self) -> DataPosition {
        DataPosition {
            epoch: self.epoch,
            index: self.index,
            seed: self.seed,
            num_examples: self.ds.len(),
        }
    }

    /// Continues exactly where `pos` was taken (the batch size may differ).
    pub fn restore(&mut self, pos: DataPosition) -> Result<()> {
        if pos.seed != self.seed || pos.num_examples != self.ds.len() {
            return Err(TrainError::Config(format!(
                "the saved data position (seed {}, {} examples) does not fit this run (seed {}, {} examples): resume with the same data, options and seed",
                pos.seed,
                pos.num_examples,
                self.seed,
                self.ds.len()
            )));
        }
        if pos.index > self.ds.len() {
            return Err(TrainError::Config(format!(
                "the saved data position {} is past the {} examples",
                pos.index,
                self.ds.len()
            )));
        }
        self.epoch = pos.epoch;
        self.index = pos.index;
        self.order = shuffled_indices(self.ds.len(), self.seed, self.epoch);
        Ok(())
    }

    /// 0-based epoch of the next batch.
    pub fn epoch(&self) -> u64 {
        if self.index >= self.order.len() {
            self.epoch + 1
        } else {
            self.epoch
        }
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.ds.steps_per_epoch(self.batch_size)
    }

    /// The next batch (never empty; epochs follow one another without end).
    pub fn next_batch(&mut self) -> Vec<Example> {
        if self.index >= self.order.len() {
            self.epoch += 1;
            self.index = 0;
            self.order = shuffled_indices(self.ds.len(), self.seed, self.epoch);
        }
        let end = (self.index + self.batch_size).min(self.order.len());
        let examples = self.ds.examples();
        let batch = self.order[self.index..end]
            .iter()
            .map(|&i| examples[i].clone())
            .collect();
        self.index = end;
        batch
    }
}

/// `0..n` in the Fisher–Yates order drawn from (`seed`, `stream`).
pub(crate) fn shuffled_indices(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut state = splitmix(seed ^ splitmix(stream.wrapping_add(0x5851_f42d_4c95_7f2d)));
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let r = splitmix(state);
        // Multiply-shift bounded draw (bias below 2^-32 for any realistic n).
        let j = ((u128::from(r) * (i as u128 + 1)) >> 64) as usize;
        v.swap(i, j);
    }
    v
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
