//! Optimizers (AdamW 32-bit, 8-bit blockwise, paged) and learning-rate schedules.
//!
//! - `adamw` follows `torch.optim.AdamW` (single-tensor path) operation by operation.
//! - `adamw_8bit` follows bitsandbytes' `AdamW(optim_bits=8)`: blockwise (256) dynamic 8-bit moments,
//!   and bnb's 32-bit kernel for params with fewer than [`MIN_8BIT_SIZE`] elements.
//! - the paged kinds do the same math with the state in host pages, staged per step.
//!
//! The update runs on the host over f32 slices (rayon across blocks/chunks): a param on another
//! device is copied to the host, updated and copied back. A device kernel can replace that later
//! without changing the state layout.

mod adam;
mod clip;
pub mod kernels;
pub mod qmap;
mod schedule;

pub use adam::AdamW;
pub use clip::clip_grad_norm;
pub use schedule::{lr_at, lr_lambda, LrSchedulerKind};

use crate::{Result, TrainError};
use candle_core::Tensor;
use std::collections::HashMap;

/// bitsandbytes' `min_8bit_size`: smaller params keep 32-bit state.
pub const MIN_8BIT_SIZE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    AdamW,
    AdamW8bit,
    PagedAdamW32bit,
    PagedAdamW8bit,
}

impl OptimizerKind {
    pub const ALL: [OptimizerKind; 4] = [
        OptimizerKind::AdamW,
        OptimizerKind::AdamW8bit,
        OptimizerKind::PagedAdamW32bit,
        OptimizerKind::PagedAdamW8bit,
    ];

    /// The names of `--optim`, plus HF TrainingArguments' aliases (`adamw_torch`, `adamw_bnb_8bit`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "adamw" | "adamw_torch" => Ok(Self::AdamW),
            "adamw_8bit" | "adamw_bnb_8bit" => Ok(Self::AdamW8bit),
            "paged_adamw_32bit" => Ok(Self::PagedAdamW32bit),
            "paged_adamw_8bit" => Ok(Self::PagedAdamW8bit),
            _ => Err(TrainError::Config(format!(
                "--optim: unknown optimizer `{s}`; valid: {} (aliases: adamw_torch, adamw_bnb_8bit)",
                Self::ALL.map(|k| k.name()).join(", ")
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::AdamW => "adamw",
            Self::AdamW8bit => "adamw_8bit",
            Self::PagedAdamW32bit => "paged_adamw_32bit",
            Self::PagedAdamW8bit => "paged_adamw_8bit",
        }
    }

    pub fn is_8bit(self) -> bool {
        matches!(self, Self::AdamW8bit | Self::PagedAdamW8bit)
    }

    pub fn is_paged(self) -> bool {
        matches!(self, Self::PagedAdamW32bit | Self::PagedAdamW8bit)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let bad =
            |what: &str, v: f64| Err(TrainError::Config(format!("optimizer: invalid {what} {v}")));
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("adam_beta1", self.beta1);
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("adam_beta2", self.beta2);
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return bad("adam_epsilon", self.eps);
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", self.weight_decay);
        }
        Ok(())
    }
}

pub trait Optimizer: Send {
    /// One update of every parameter with its gradient at learning rate `lr` (params are f32 candle
    /// tensors, any device; params[i] is replaced by the updated tensor). Errors name the parameter
    /// index/shape on mismatch; on error nothing is changed.
    fn step(&mut self, params: &mut [Tensor], grads: &[Tensor], lr: f64) -> Result<()>;
    /// Every state tensor under a stable name (`state.{i}.exp_avg`/`exp_avg_sq` for 32-bit state,
    /// `state.{i}.state1`/`state2` (u8 codes) and `state.{i}.absmax1`/`absmax2` for 8-bit state)
    /// plus `step` (i64 scalar), for checkpoints. Host (CPU) tensors.
    fn state_dict(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores what `state_dict` gave; a missing, extra or mis-shaped tensor is an error and
    /// leaves the optimizer unchanged.
    fn load_state_dict(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()>;
    /// Bytes of optimizer state (for memory reports).
    fn state_bytes(&self) -> usize;
    /// Whether the state lives in host pages and is staged per step (the paged kinds).
    fn is_paged(&self) -> bool;
    fn kind(&self) -> OptimizerKind;
    /// Optimizer steps taken so far.
    fn steps(&self) -> u64;
}

pub fn build_optimizer(
    kind: OptimizerKind,
    cfg: AdamWConfig,
    params: &[Tensor],
) -> Result<Box<dyn Optimizer>> {
    Ok(Box::new(AdamW::new(kind, cfg, params)?))
}
