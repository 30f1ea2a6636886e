use std::sync::RwLock;

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;

/// cos/sin tables for rotary position embeddings (the rotate-half form of transformers' Llama),
/// grown on demand so long contexts cost memory only when used.
pub struct Rope {
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
    tables: RwLock<(Tensor, Tensor)>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv_freq = inverse_frequencies(cfg);
        let initial = cfg.max_position_embeddings.clamp(1, 4096);
        let tables = build_tables(&inv_freq, initial, dtype, device)?;
        Ok(Self {
            inv_freq,
            dtype,
            device: device.clone(),
            tables: RwLock::new(tables),
        })
    }

    /// `(cos, sin)` of shape `[len, head_dim/2]` for positions `start..start+len`.
    pub fn tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        {
            let t = self.tables.read().expect("rope lock poisoned");
            if t.0.dim(0)? >= start + len {
                return Ok((t.0.narrow(0, start, len)?, t.1.narrow(0, start, len)?));
            }
        }
        let mut t = self.tables.write().expect("rope lock poisoned");
        let have = t.0.dim(0)?;
        if have < start + len {
            *t = build_tables(
                &self.inv_freq,
                (start + len).next_power_of_two(),
                self.dtype,
                &self.device,
            )?;
        }
        Ok((t.0.narrow(0, start, len)?, t.1.narrow(0, start, len)?))
    }
}

fn build_tables(
    inv_freq: &[f32],
    positions: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for &f in inv_freq {
            // f32 product, as transformers computes `inv_freq @ position_ids` in float32.
            let angle = f * p as f32;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (positions, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (positions, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// `1 / theta^(2i/d)` in float32 as transformers computes it, then the configured scaling.
pub(crate) fn inverse_frequencies(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let inv: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / d as f32))
        .collect();
    match &cfg.rope_scaling {
        None => inv,
        Some(RopeScaling::Linear { factor }) => inv.iter().map(|f| f / *factor as f32).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, lo, hi, old) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / lo;
            let high_freq_wavelen = old / hi;
            inv.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                    if medium {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}
