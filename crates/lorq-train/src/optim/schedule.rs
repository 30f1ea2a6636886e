//! Learning-rate schedules with `transformers.get_scheduler` semantics (LambdaLR over the lambdas in
//! transformers/optimization.py), in f64 and the same order of operations.

use crate::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedulerKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl LrSchedulerKind {
    pub const ALL: [LrSchedulerKind; 4] = [
        LrSchedulerKind::Constant,
        LrSchedulerKind::ConstantWithWarmup,
        LrSchedulerKind::Linear,
        LrSchedulerKind::Cosine,
    ];

    /// HF `lr_scheduler_type` names.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" => Ok(Self::ConstantWithWarmup),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            _ => Err(TrainError::Config(format!(
                "--lr-scheduler-type: unknown schedule `{s}`; valid: {}",
                Self::ALL.map(|k| k.name()).join(", ")
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
        }
    }
}

/// Warmup ramp shared by the warmup schedules: `float(step) / float(max(1, warmup))`.
fn warmup_factor(step: i64, warmup: i64) -> f64 {
    step as f64 / (warmup.max(1)) as f64
}

/// The multiplier of `base_lr` after `step` scheduler steps.
pub fn lr_lambda(
    kind: LrSchedulerKind,
    step: usize,
    warmup_steps: usize,
    total_steps: usize,
) -> f64 {
    let (step, warmup, total) = (step as i64, warmup_steps as i64, total_steps as i64);
    match kind {
        LrSchedulerKind::Constant => 1.0,
        LrSchedulerKind::ConstantWithWarmup => {
            if step < warmup {
                // float(current_step) / float(max(1.0, num_warmup_steps))
                step as f64 / (warmup as f64).max(1.0)
            } else {
                1.0
            }
        }
        LrSchedulerKind::Linear => {
            if step < warmup {
                return warmup_factor(step, warmup);
            }
            let f = (total - step) as f64 / (total - warmup).max(1) as f64;
            f.max(0.0)
        }
        LrSchedulerKind::Cosine => {
            if step < warmup {
                return warmup_factor(step, warmup);
            }
            let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
            // num_cycles = 0.5; `math.pi * float(num_cycles) * 2.0 * progress`, left to right.
            let factor = 0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos());
            // transformers' min_lr_rate = 0.0 form: factor * (1 - 0) + 0, then max(0, factor).
            let factor = factor * (1.0 - 0.0) + 0.0;
            factor.max(0.0)
        }
    }
}

/// The LR used at optimizer step `step` (0-based: the value after `step` scheduler.step() calls).
pub fn lr_at(
    kind: LrSchedulerKind,
    base_lr: f64,
    step: usize,
    warmup_steps: usize,
    total_steps: usize,
) -> f64 {
    base_lr * lr_lambda(kind, step, warmup_steps, total_steps)
}
