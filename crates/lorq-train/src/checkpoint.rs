//! `checkpoint-<step>/` folders: the PEFT adapter, the optimizer state, and the trainer state
//! (step, data position, RNG seeds, log history), written to a temporary folder and renamed into
//! place so a crash never leaves a half-written checkpoint under the final name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::DataPosition;
use crate::error::{io_err, Result, TrainError};
use crate::lora_params::LoraParams;
use crate::optim::Optimizer;

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";

/// Everything besides tensors that a resumed run needs to continue as the uninterrupted one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// Where the batcher continues.
    pub data: DataPosition,
    /// The run's seed; dropout masks are drawn from generators seeded by (seed, step,
    /// micro-batch, layer, module), so the seed and the step are the whole RNG state.
    pub seed: u64,
    /// The options that must not change across a resume (r, targets, optimizer, batch shape...),
    /// as `lorq train` printed them.
    pub fingerprint: serde_json::Value,
    /// Every metrics line logged so far (also in `metrics.jsonl`).
    pub log_history: Vec<serde_json::Value>,
}

/// Writes `out/checkpoint-<step>/` atomically.
pub fn save(
    out: &Path,
    lora: &LoraParams,
    base_model: Option<&str>,
    optimizer: &dyn Optimizer,
    state: &TrainerState,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.step);
    let dir = out.join(&name);
    let tmp = out.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    lora.save_peft(&tmp, base_model)?;
    let tensors: Vec<(String, Tensor)> = optimizer
        .state_dict()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let file = tmp.join(OPTIMIZER_FILE);
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &file)
        .map_err(|e| TrainError::Checkpoint {
            path: file.clone(),
            message: format!("writing the optimizer state: {e}"),
        })?;
    let file = tmp.join(STATE_FILE);
    let text = serde_json::to_string_pretty(state).expect("the trainer state serialises");
    std::fs::write(&file, text).map_err(io_err(&file))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
    Ok(dir)
}

/// The highest-numbered complete `checkpoint-<step>` folder in `out`, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    if !out.exists() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in std::fs::read_dir(out).map_err(io_err(out))? {
        let entry = entry.map_err(io_err(out))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if !entry.path().join(STATE_FILE).exists() {
            continue;
        }
        if best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Reads a checkpoint's trainer state.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let file = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&file).map_err(|e| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        message: format!(
            "no readable {STATE_FILE} ({e}); is this a `checkpoint-<step>` folder of `lorq train`?"
        ),
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: file,
        message: format!("not a valid trainer state: {e}"),
    })
}

/// Reads a checkpoint's optimizer state tensors onto `device`.
pub fn load_optimizer_state(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = dir.join(OPTIMIZER_FILE);
    candle_core::safetensors::load(&file, device).map_err(|e| TrainError::Checkpoint {
        path: file,
        message: format!("reading the optimizer state: {e}"),
    })
}
