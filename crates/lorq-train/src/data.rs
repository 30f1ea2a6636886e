//! Training data: JSONL rows (`text`, Alpaca `instruction`/`input`/`output`, chat `messages`) to
//! token ids and loss masks, packing, eval splits and a resumable, seeded batcher.
//!
//! Semantics, chosen to match TRL's `SFTTrainer`:
//! - `text` rows train on every token; Alpaca rows on `output` + EOS; chat rows on each
//!   assistant turn's content and the end-of-turn text the template writes after it.
//!   `train_on_prompt` trains on everything.
//! - EOS (the tokenizer's `eos_token`) is appended to `text` and Alpaca rows; chat rows end with
//!   what the template writes. `text`/Alpaca rows also get the ids the tokenizer's post-processor
//!   puts in front (Llama's `<s>`), as `add_special_tokens=True` does; chat templates write their own.
//! - Labels follow the HF convention: `labels[i] == input_ids[i]` where trained, `-100` elsewhere;
//!   the trainer shifts.
//! - Without packing, rows are truncated to `max_seq_len` (from the right); a row left with no
//!   trained label is skipped and counted. With packing, rows are concatenated whole and cut into
//!   chunks of exactly `max_seq_len`; the last, shorter chunk is kept (TRL's `wrapped` packing).

mod batch;
mod dataset;
mod format;
mod row;

pub use batch::{Batcher, DataPosition};
pub use dataset::{load_train_eval, Dataset, EvalData, LoadReport, LoadedData};
pub use format::{alpaca_prompt, Formatter, ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT};
pub use row::{parse_row, Row, CHAT_ROLES};

use serde::{Deserialize, Serialize};

/// The label of a position that does not count in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One training sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// `input_ids[i]` where trained, [`IGNORE_INDEX`] elsewhere; the trainer shifts.
    pub labels: Vec<i64>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Positions that count in the loss.
    pub fn num_labels(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    fn push(&mut self, id: u32, trained: bool) {
        self.input_ids.push(id);
        self.labels
            .push(if trained { i64::from(id) } else { IGNORE_INDEX });
    }

    fn truncate(&mut self, len: usize) {
        self.input_ids.truncate(len);
        self.labels.truncate(len);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataOptions {
    /// Longest sequence in tokens (truncation, or the packed chunk length).
    pub max_seq_len: usize,
    /// Train on the prompt tokens too (Alpaca prompt, non-assistant chat turns).
    pub train_on_prompt: bool,
    /// Concatenate rows into chunks of exactly `max_seq_len` tokens.
    pub packing: bool,
    /// Skip (and count) bad rows instead of failing at the first.
    pub skip_bad_rows: bool,
    /// Seeds the eval split (the batcher takes its own seed).
    pub seed: u64,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            max_seq_len: 2048,
            train_on_prompt: false,
            packing: false,
            skip_bad_rows: false,
            seed: 42,
        }
    }
}
