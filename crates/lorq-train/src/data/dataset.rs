//! A JSONL file loaded into examples, with the counts of what was skipped and why.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::batch::shuffled_indices;
use super::format::Formatter;
use super::row::parse_row;
use super::{DataOptions, Example};
use crate::error::{io_err, Result, TrainError};

/// How many bad-row reasons a report keeps (the count covers them all).
pub const REPORTED_BAD_ROWS: usize = 5;

/// What loading found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadReport {
    pub path: PathBuf,
    /// Non-blank lines.
    pub rows: usize,
    /// Rows that became examples.
    pub used_rows: usize,
    /// Rows skipped as bad (`skip_bad_rows`).
    pub bad_rows: usize,
    /// The first [`REPORTED_BAD_ROWS`] reasons, `path:line: message`.
    pub bad_row_reasons: Vec<String>,
    /// Rows cut to `max_seq_len` (without packing).
    pub truncated_rows: usize,
    /// Rows skipped because no trained label was left (after truncation).
    pub fully_masked_rows: usize,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} rows, {} used, {} truncated, {} skipped with no trained token, {} bad",
            self.path.display(),
            self.rows,
            self.used_rows,
            self.truncated_rows,
            self.fully_masked_rows,
            self.bad_rows
        )?;
        for r in &self.bad_row_reasons {
            write!(f, "\n  skipped {r}")?;
        }
        if self.bad_rows > self.bad_row_reasons.len() {
            write!(
                f,
                "\n  ... and {} more",
                self.bad_rows - self.bad_row_reasons.len()
            )?;
        }
        Ok(())
    }
}

/// Tokenized rows and the sequences batches draw from (the rows themselves, or packed chunks).
#[derive(Debug, Clone)]
pub struct Dataset {
    rows: Vec<Example>,
    packed: Option<Vec<Example>>,
    opts: DataOptions,
}

impl Dataset {
    /// Loads and tokenizes a JSONL file. Errors on the first bad row unless `skip_bad_rows`,
    /// and when no row is usable.
    pub fn load(path: &Path, fmt: &Formatter, opts: &DataOptions) -> Result<(Self, LoadReport)> {
        if opts.max_seq_len == 0 {
            return Err(TrainError::Config(
                "--max-seq-len must be at least 1".into(),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let mut report = LoadReport {
            path: path.to_path_buf(),
            ..Default::default()
        };
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = if i == 0 {
                line.trim_start_matches('\u{feff}')
            } else {
                line
            };
            if line.trim().is_empty() {
                continue;
            }
            report.rows += 1;
            let encoded = parse_row(line).and_then(|row| fmt.encode(&row, opts.train_on_prompt));
            let mut ex = match encoded {
                Ok(ex) => ex,
                Err(message) => {
                    let err = TrainError::Data {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message,
                    };
                    if !opts.skip_bad_rows {
                        return Err(err);
                    }
                    report.bad_rows += 1;
                    if report.bad_row_reasons.len() < REPORTED_BAD_ROWS {
                        report.bad_row_reasons.push(err.to_string());
                    }
                    continue;
                }
            };
            if !opts.packing && ex.len() > opts.max_seq_len {
                ex.truncate(opts.max_seq_len);
                report.truncated_rows += 1;
            }
            if ex.num_labels() == 0 {
                report.fully_masked_rows += 1;
                continue;
            }
            rows.push(ex);
        }
        report.used_rows = rows.len();
        if rows.is_empty() {
            return Err(TrainError::Config(format!(
                "{}: no usable rows ({} non-blank rows, {} bad, {} with no trained token left after truncation to {} tokens){}",
                path.display(),
                report.rows,
                report.bad_rows,
                report.fully_masked_rows,
                opts.max_seq_len,
                report
                    .bad_row_reasons
                    .first()
                    .map(|r| format!("; first bad row: {r}"))
                    .unwrap_or_default()
            )));
        }
        Ok((Self::from_rows(rows, opts.clone()), report))
    }

    fn from_rows(rows: Vec<Example>, opts: DataOptions) -> Self {
        let packed = opts.packing.then(|| pack(&rows, opts.max_seq_len));
        Self { rows, packed, opts }
    }

    /// Splits off `eval_fraction` of the rows (at least one) by a seeded shuffle; both parts
    /// keep file order, and each is packed on its own so no row straddles the two.
    pub fn split(&self, eval_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
            return Err(TrainError::Config(format!(
                "--eval-split must be between 0 and 1 (exclusive), got {eval_fraction}"
            )));
        }
        let n = self.rows.len();
        let n_eval = ((n as f64 * eval_fraction).round() as usize).max(1);
        if n_eval >= n {
            return Err(TrainError::Config(format!(
                "--eval-split {eval_fraction} of {n} rows leaves no training rows"
            )));
        }
        let order = shuffled_indices(n, seed, 0);
        let mut is_eval = vec![false; n];
        for &i in &order[..n_eval] {
            is_eval[i] = true;
        }
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        for (row, e) in self.rows.iter().zip(is_eval) {
            if e { &mut eval } else { &mut train }.push(row.clone());
        }
        Ok((
            Self::from_rows(train, self.opts.clone()),
            Self::from_rows(eval, self.opts.clone()),
        ))
    }

    /// The sequences batches are made of.
    pub fn examples(&self) -> &[Example] {
        self.packed.as_deref().unwrap_or(&self.rows)
    }

    /// The tokenized rows before packing.
    pub fn rows(&self) -> &[Example] {
        &self.rows
    }

    pub fn len(&self) -> usize {
        self.examples().len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples().is_empty()
    }

    pub fn options(&self) -> &DataOptions {
        &self.opts
    }

    /// Optimizer steps in one epoch (the last batch may be short).
    pub fn steps_per_epoch(&self, batch_size: usize) -> usize {
        self.len().div_ceil(batch_size.max(1))
    }

    /// Tokens over all sequences.
    pub fn num_tokens(&self) -> usize {
        self.examples().iter().map(Example::len).sum()
    }

    /// Positions that count in the loss over all sequences.
    pub fn num_label_tokens(&self) -> usize {
        self.examples().iter().map(Example::num_labels).sum()
    }
}

/// Rows concatenated and cut into chunks of `len`; the last chunk keeps the remainder.
fn pack(rows: &[Example], len: usize) -> Vec<Example> {
    let ids: Vec<u32> = rows
        .iter()
        .flat_map(|r| r.input_ids.iter().copied())
        .collect();
    let labels: Vec<i64> = rows.iter().flat_map(|r| r.labels.iter().copied()).collect();
    ids.chunks(len)
        .zip(labels.chunks(len))
        .map(|(i, l)| Example {
            input_ids: i.to_vec(),
            labels: l.to_vec(),
        })
        .collect()
}

/// Where eval examples come from.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalData {
    None,
    /// A separate JSONL file, loaded with the same options.
    File(PathBuf),
    /// A seeded fraction of the training rows.
    Split(f64),
}

/// Training data and its optional eval part, with a report for each file read.
#[derive(Debug, Clone)]
pub struct LoadedData {
    pub train: Dataset,
    pub eval: Option<Dataset>,
    pub train_report: LoadReport,
    pub eval_report: Option<LoadReport>,
}

/// Loads `train` and the eval data `eval` says (a split uses `opts.seed`).
pub fn load_train_eval(
    train: &Path,
    eval: &EvalData,
    fmt: &Formatter,
    opts: &DataOptions,
) -> Result<LoadedData> {
    let (ds, train_report) = Dataset::load(train, fmt, opts)?;
    let (train, eval, eval_report) = match eval {
        EvalData::None => (ds, None, None),
        EvalData::File(p) => {
            let (e, r) = Dataset::load(p, fmt, opts)?;
            (ds, Some(e), Some(r))
        }
        EvalData::Split(f) => {
            let (t, e) = ds.split(*f, opts.seed)?;
            (t, Some(e), None)
        }
    };
    Ok(LoadedData {
        train,
        eval,
        train_report,
        eval_report,
    })
}
