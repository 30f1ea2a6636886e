//! The AdamW family behind [`super::OptimizerKind`]: one struct, the state layout and the update rule
//! chosen per param at construction.

use super::kernels::{self, BnbScalars, TorchAdamWScalars, BNB_BLOCK};
use super::{AdamWConfig, Optimizer, OptimizerKind, MIN_8BIT_SIZE};
use crate::{Result, TrainError};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;

/// Elements per rayon task for the elementwise 32-bit rules (results do not depend on it).
const CHUNK: usize = 1 << 14;

/// Which reference a param's update follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// torch.optim.AdamW.
    Torch,
    /// bitsandbytes' 32-bit kernel (small params of the 8-bit optimizers).
    Bnb32,
    /// bitsandbytes' 8-bit blockwise kernel.
    Bnb8,
}

#[derive(Debug, Clone)]
enum Moments {
    F32 {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    Q8 {
        c1: Vec<u8>,
        c2: Vec<u8>,
        absmax1: Vec<f32>,
        absmax2: Vec<f32>,
    },
}

impl Moments {
    fn zeros(rule: Rule, n: usize) -> Self {
        match rule {
            Rule::Torch | Rule::Bnb32 => Moments::F32 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            Rule::Bnb8 => {
                let blocks = n.div_ceil(BNB_BLOCK);
                Moments::Q8 {
                    c1: vec![0; n],
                    c2: vec![0; n],
                    absmax1: vec![0.0; blocks],
                    absmax2: vec![0.0; blocks],
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Moments::F32 { m, v } => 4 * (m.len() + v.len()),
            Moments::Q8 {
                c1,
                c2,
                absmax1,
                absmax2,
            } => c1.len() + c2.len() + 4 * (absmax1.len() + absmax2.len()),
        }
    }

    /// Copy `src` into `self` (same layout), reusing the buffers.
    fn copy_from(&mut self, src: &Moments) {
        match (self, src) {
            (Moments::F32 { m, v }, Moments::F32 { m: sm, v: sv }) => {
                m.copy_from_slice(sm);
                v.copy_from_slice(sv);
            }
            (
                Moments::Q8 {
                    c1,
                    c2,
                    absmax1,
                    absmax2,
                },
                Moments::Q8 {
                    c1: s1,
                    c2: s2,
                    absmax1: a1,
                    absmax2: a2,
                },
            ) => {
                c1.copy_from_slice(s1);
                c2.copy_from_slice(s2);
                absmax1.copy_from_slice(a1);
                absmax2.copy_from_slice(a2);
            }
            _ => unreachable!("state layout is fixed per param at construction"),
        }
    }
}

#[derive(Debug, Clone)]
struct ParamState {
    dims: Vec<usize>,
    rule: Rule,
    moments: Moments,
}

/// AdamW with torch (32-bit) or bitsandbytes (8-bit blockwise) semantics, optionally paged.
pub struct AdamW {
    kind: OptimizerKind,
    cfg: AdamWConfig,
    step: u64,
    states: Vec<ParamState>,
}

impl AdamW {
    pub fn new(kind: OptimizerKind, cfg: AdamWConfig, params: &[Tensor]) -> Result<Self> {
        cfg.validate()?;
        let mut states = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            if p.dtype() != DType::F32 {
                return Err(TrainError::Config(format!(
                    "optimizer {}: param {i} {:?} is {:?}; trainable params must be f32",
                    kind.name(),
                    p.dims(),
                    p.dtype()
                )));
            }
            let n = p.elem_count();
            let rule = match kind {
                OptimizerKind::AdamW => Rule::Torch,
                // HF's `paged_adamw_32bit` is bitsandbytes' PagedAdamW32bit: bnb's 32-bit kernel.
                OptimizerKind::PagedAdamW32bit => Rule::Bnb32,
                OptimizerKind::AdamW8bit | OptimizerKind::PagedAdamW8bit if n < MIN_8BIT_SIZE => {
                    Rule::Bnb32
                }
                OptimizerKind::AdamW8bit | OptimizerKind::PagedAdamW8bit => Rule::Bnb8,
            };
            states.push(ParamState {
                dims: p.dims().to_vec(),
                rule,
                moments: Moments::zeros(rule, n),
            });
        }
        Ok(Self {
            kind,
            cfg,
            step: 0,
            states,
        })
    }

    fn check_step_inputs(&self, params: &[Tensor], grads: &[Tensor], lr: f64) -> Result<()> {
        let name = self.kind.name();
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(TrainError::Config(format!(
                "optimizer {name}: invalid learning rate {lr}"
            )));
        }
        if params.len() != self.states.len() || grads.len() != self.states.len() {
            return Err(TrainError::Config(format!(
                "optimizer {name}: built for {} params, step got {} params and {} grads",
                self.states.len(),
                params.len(),
                grads.len()
            )));
        }
        for (i, ((p, g), st)) in params.iter().zip(grads).zip(&self.states).enumerate() {
            if p.dims() != st.dims.as_slice() {
                return Err(TrainError::Config(format!(
                    "optimizer {name}: param {i} has shape {:?}, its state has {:?}",
                    p.dims(),
                    st.dims
                )));
            }
            if p.dtype() != DType::F32 {
                return Err(TrainError::Config(format!(
                    "optimizer {name}: param {i} {:?} is {:?}, expected f32",
                    p.dims(),
                    p.dtype()
                )));
            }
            if g.dims() != p.dims() {
                return Err(TrainError::Config(format!(
                    "optimizer {name}: grad {i} has shape {:?}, param {i} has {:?}",
                    g.dims(),
                    p.dims()
                )));
            }
        }
        Ok(())
    }

    fn update(
        rule: Rule,
        p: &mut [f32],
        g: &[f32],
        mo: &mut Moments,
        t: &TorchAdamWScalars,
        b: &BnbScalars,
    ) {
        match (rule, mo) {
            (Rule::Torch, Moments::F32 { m, v }) => p
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| kernels::torch_adamw(p, g, m, v, t)),
            (Rule::Bnb32, Moments::F32 { m, v }) => p
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| kernels::bnb_adam_32bit(p, g, m, v, b)),
            (
                Rule::Bnb8,
                Moments::Q8 {
                    c1,
                    c2,
                    absmax1,
                    absmax2,
                },
            ) => (
                p.par_chunks_mut(BNB_BLOCK),
                g.par_chunks(BNB_BLOCK),
                c1.par_chunks_mut(BNB_BLOCK),
                c2.par_chunks_mut(BNB_BLOCK),
                absmax1.par_iter_mut(),
                absmax2.par_iter_mut(),
            )
                .into_par_iter()
                .for_each(|(p, g, c1, c2, a1, a2)| {
                    kernels::bnb_adam_8bit_block(p, g, c1, c2, a1, a2, b)
                }),
            _ => unreachable!("state layout is fixed per param at construction"),
        }
    }

    fn expected_tensors(&self) -> Vec<(String, Vec<usize>, DType)> {
        let mut out = vec![("step".to_string(), vec![], DType::I64)];
        for (i, st) in self.states.iter().enumerate() {
            match &st.moments {
                Moments::F32 { .. } => {
                    out.push((format!("state.{i}.exp_avg"), st.dims.clone(), DType::F32));
                    out.push((format!("state.{i}.exp_avg_sq"), st.dims.clone(), DType::F32));
                }
                Moments::Q8 { absmax1, .. } => {
                    out.push((format!("state.{i}.state1"), st.dims.clone(), DType::U8));
                    out.push((format!("state.{i}.state2"), st.dims.clone(), DType::U8));
                    out.push((
                        format!("state.{i}.absmax1"),
                        vec![absmax1.len()],
                        DType::F32,
                    ));
                    out.push((
                        format!("state.{i}.absmax2"),
                        vec![absmax1.len()],
                        DType::F32,
                    ));
                }
            }
        }
        out
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut [Tensor], grads: &[Tensor], lr: f64) -> Result<()> {
        self.check_step_inputs(params, grads, lr)?;
        // Copy everything to the host before touching any state, so a failed copy changes nothing.
        let mut host: Vec<(Vec<f32>, Vec<f32>)> = Vec::with_capacity(params.len());
        for (p, g) in params.iter().zip(grads) {
            host.push((host_f32(p)?, host_f32(g)?));
        }
        let step = self.step + 1;
        let c = self.cfg;
        let t = TorchAdamWScalars::new(c.beta1, c.beta2, c.eps, c.weight_decay, lr, step);
        let b = BnbScalars::new(c.beta1, c.beta2, c.eps, c.weight_decay, lr, step);
        let paged = self.kind.is_paged();
        let mut updated = Vec::with_capacity(params.len());
        for ((p, g), st) in host.iter_mut().zip(self.states.iter_mut()) {
            if paged {
                // Stage the page into a working copy (the device side once kernels run there),
                // update it, write it back: only one param's state is out of its page at a time.
                let mut work = st.moments.clone();
                Self::update(st.rule, p, g, &mut work, &t, &b);
                st.moments.copy_from(&work);
            } else {
                Self::update(st.rule, p, g, &mut st.moments, &t, &b);
            }
        }
        for ((p, _), old) in host.into_iter().zip(params.iter()) {
            updated.push(Tensor::from_vec(p, old.dims(), old.device())?);
        }
        for (slot, new) in params.iter_mut().zip(updated) {
            *slot = new;
        }
        self.step = step;
        Ok(())
    }

    fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let cpu = Device::Cpu;
        let mut out = vec![("step".to_string(), Tensor::new(self.step as i64, &cpu)?)];
        for (i, st) in self.states.iter().enumerate() {
            let dims = st.dims.as_slice();
            match &st.moments {
                Moments::F32 { m, v } => {
                    out.push((
                        format!("state.{i}.exp_avg"),
                        Tensor::from_slice(m, dims, &cpu)?,
                    ));
                    out.push((
                        format!("state.{i}.exp_avg_sq"),
                        Tensor::from_slice(v, dims, &cpu)?,
                    ));
                }
                Moments::Q8 {
                    c1,
                    c2,
                    absmax1,
                    absmax2,
                } => {
                    out.push((
                        format!("state.{i}.state1"),
                        Tensor::from_slice(c1, dims, &cpu)?,
                    ));
                    out.push((
                        format!("state.{i}.state2"),
                        Tensor::from_slice(c2, dims, &cpu)?,
                    ));
                    out.push((
                        format!("state.{i}.absmax1"),
                        Tensor::from_slice(absmax1, absmax1.len(), &cpu)?,
                    ));
                    out.push((
                        format!("state.{i}.absmax2"),
                        Tensor::from_slice(absmax2, absmax2.len(), &cpu)?,
                    ));
                }
            }
        }
        Ok(out)
    }

    fn load_state_dict(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let name = self.kind.name();
        let expected = self.expected_tensors();
        let err = |msg: String| TrainError::Config(format!("optimizer {name} state: {msg}"));
        for (key, dims, dtype) in &expected {
            let t = tensors.get(key).ok_or_else(|| {
                err(format!(
                    "missing tensor `{key}` ({dtype:?} {dims:?}); was the checkpoint written by another optimizer or model?"
                ))
            })?;
            if t.dims() != dims.as_slice() || t.dtype() != *dtype {
                return Err(err(format!(
                    "tensor `{key}` is {:?} {:?}, expected {dtype:?} {dims:?}",
                    t.dtype(),
                    t.dims()
                )));
            }
        }
        if let Some(extra) = tensors
            .keys()
            .find(|k| !expected.iter().any(|(e, _, _)| e == *k))
        {
            return Err(err(format!(
                "unexpected tensor `{extra}` (optimizer has {} params)",
                self.states.len()
            )));
        }
        let step = tensors["step"].to_scalar::<i64>()?;
        if step < 0 {
            return Err(err(format!("negative step {step}")));
        }
        let get_f32 = |k: String| -> Result<Vec<f32>> { host_f32(&tensors[&k]) };
        let get_u8 =
            |k: String| -> Result<Vec<u8>> { Ok(tensors[&k].flatten_all()?.to_vec1::<u8>()?) };
        let mut new_moments = Vec::with_capacity(self.states.len());
        for (i, st) in self.states.iter().enumerate() {
            new_moments.push(match &st.moments {
                Moments::F32 { .. } => Moments::F32 {
                    m: get_f32(format!("state.{i}.exp_avg"))?,
                    v: get_f32(format!("state.{i}.exp_avg_sq"))?,
                },
                Moments::Q8 { .. } => Moments::Q8 {
                    c1: get_u8(format!("state.{i}.state1"))?,
                    c2: get_u8(format!("state.{i}.state2"))?,
                    absmax1: get_f32(format!("state.{i}.absmax1"))?,
                    absmax2: get_f32(format!("state.{i}.absmax2"))?,
                },
            });
        }
        for (st, mo) in self.states.iter_mut().zip(new_moments) {
            st.moments = mo;
        }
        self.step = step as u64;
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.states.iter().map(|s| s.moments.bytes()).sum()
    }

    fn is_paged(&self) -> bool {
        self.kind.is_paged()
    }

    fn kind(&self) -> OptimizerKind {
        self.kind
    }

    fn steps(&self) -> u64 {
        self.step
    }
}
