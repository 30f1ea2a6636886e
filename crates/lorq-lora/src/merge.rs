//! Merging several LoRA adapters into one, in ΔW space.
//!
//! Per module, every adapter's `ΔW_i = scale_i · B_i · A_i` (f32, `[out, in]`) is formed and the
//! strategy combines the `ΔW_i` with the per-adapter weights `w_i`, as PEFT's
//! `peft.utils.merge_utils` defines the strategies (PEFT applies them to `ΔW` in
//! `add_weighted_adapter(..., combination_type="<strategy>_svd")`; lorq keeps the exact `ΔW`
//! instead of a truncated SVD of it):
//!
//! - `linear` (task arithmetic): `Σ w_i · ΔW_i`.
//! - `ties`: each `ΔW_i` keeps its `⌊density · n⌋` largest-magnitude entries (the rest set to 0);
//!   per entry the majority sign is elected from the trimmed `ΔW_i` (`total`: the sign of their
//!   sum, `frequency`: the sign of the sum of their signs; ties go to +); the result is the mean
//!   of the weighted entries `w_i · ΔW_i` whose sign equals the majority (disjoint merge).
//! - `dare_linear`: each entry of `ΔW_i` is kept with probability `density` and the kept ones
//!   rescaled by `1 / density`, then `Σ w_i · ΔW_i`.
//! - `dare_ties`: the DARE drop and rescale, then TIES' sign election and disjoint merge.
//!
//! With `density` = 1 nothing is trimmed or dropped (PEFT's `prune` returns the tensor
//! unchanged). A module that some adapters do not adapt counts as a zero `ΔW` there, which for
//! every strategy gives what PEFT gives by leaving that adapter out of the module's merge.
//!
//! DARE's random keep-masks come from [`MergeSpec::seed`]: one stream per (module, adapter
//! index), so the result does not depend on the order modules are visited in and is the same on
//! every run and machine (they are not torch's random numbers: compare with PEFT through
//! [`DareMasks::Given`]).
//!
//! The weights are given with the adapters, `(adapter, weight)` pairs ([`with_weights`] pairs
//! them and checks the count); PEFT multiplies in float32, so each weight is rounded to f32.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::{LoraAdapter, LoraConfig, LoraError, LoraModule, TargetModules};

/// How the adapters' `ΔW` are combined (PEFT's `combination_type` names, without `_svd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeStrategy {
    Linear,
    Ties,
    DareLinear,
    DareTies,
}

impl MergeStrategy {
    pub const NAMES: [&'static str; 4] = ["linear", "ties", "dare_linear", "dare_ties"];

    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Ties => "ties",
            Self::DareLinear => "dare_linear",
            Self::DareTies => "dare_ties",
        }
    }

    fn elects_sign(self) -> bool {
        matches!(self, Self::Ties | Self::DareTies)
    }
}

impl FromStr for MergeStrategy {
    type Err = LoraError;
    fn from_str(s: &str) -> Result<Self, LoraError> {
        Ok(match s {
            "linear" => Self::Linear,
            "ties" => Self::Ties,
            "dare_linear" => Self::DareLinear,
            "dare_ties" => Self::DareTies,
            other => {
                return Err(LoraError::Merge(format!(
                    "unknown merge strategy {other:?}; choose one of {}",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }
}

impl fmt::Display for MergeStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How TIES elects the sign of each entry (PEFT's `majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MajoritySignMethod {
    /// The sign of the sum of the trimmed values.
    Total,
    /// The sign of the sum of their signs (the more frequent sign).
    Frequency,
}

impl MajoritySignMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::Frequency => "frequency",
        }
    }
}

impl FromStr for MajoritySignMethod {
    type Err = LoraError;
    fn from_str(s: &str) -> Result<Self, LoraError> {
        match s {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            other => Err(LoraError::Merge(format!(
                "unknown majority sign method {other:?}; choose total or frequency"
            ))),
        }
    }
}

impl fmt::Display for MajoritySignMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to merge; the per-adapter weights travel with the adapters (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSpec {
    pub strategy: MergeStrategy,
    /// Fraction of entries kept by TIES' trim and DARE's drop, in (0, 1]; unused by `linear`
    /// (still checked).
    pub density: f64,
    pub majority_sign_method: MajoritySignMethod,
    /// Seeds DARE's random drop.
    pub seed: u64,
}

impl Default for MergeSpec {
    fn default() -> Self {
        Self {
            strategy: MergeStrategy::Linear,
            density: 1.0,
            majority_sign_method: MajoritySignMethod::Total,
            seed: 0,
        }
    }
}

/// Where DARE's keep-masks come from.
pub enum DareMasks<'a> {
    /// Drawn from [`MergeSpec::seed`] (the normal case).
    Seeded,
    /// Given by the caller for (module path, adapter index): `[out, in]` values, 1 keeps and 0
    /// drops. Lets a test replay the masks PEFT drew with torch. Called only for adapters that
    /// adapt the module.
    Given(&'a dyn Fn(&str, usize) -> Option<Vec<f32>>),
}

/// Pairs adapters with their weights: `weights` must have one entry per adapter; `None` gives
/// every adapter weight 1.
pub fn with_weights(
    adapters: Vec<Arc<LoraAdapter>>,
    weights: Option<&[f64]>,
) -> Result<Vec<(Arc<LoraAdapter>, f64)>, LoraError> {
    match weights {
        None => Ok(adapters.into_iter().map(|a| (a, 1.0)).collect()),
        Some(w) if w.len() != adapters.len() => Err(LoraError::Merge(format!(
            "{} weights given for {} adapters; give one weight per adapter",
            w.len(),
            adapters.len()
        ))),
        Some(w) => Ok(adapters.into_iter().zip(w.iter().copied()).collect()),
    }
}

/// Checks the spec and the adapters (at least one, finite weights, one `[out, in]` shape per
/// module across adapters) and returns every module path some adapter adapts, with its shape.
pub fn merged_modules(
    adapters: &[(Arc<LoraAdapter>, f64)],
    spec: &MergeSpec,
) -> Result<BTreeMap<String, (usize, usize)>, LoraError> {
    if adapters.is_empty() {
        return Err(LoraError::Merge("no adapters to merge".into()));
    }
    if !(spec.density > 0.0 && spec.density <= 1.0) {
        return Err(LoraError::Merge(format!(
            "density {} is outside (0, 1]: it is the fraction of each ΔW's entries kept",
            spec.density
        )));
    }
    for (a, w) in adapters {
        if !w.is_finite() {
            return Err(LoraError::Merge(format!(
                "weight {w} of adapter {} is not a finite number",
                a.path.display()
            )));
        }
    }
    let mut shapes: BTreeMap<String, ((usize, usize), &PathBuf)> = BTreeMap::new();
    for (a, _) in adapters {
        for (path, m) in a.modules() {
            let shape = (m.out_features(), m.in_features());
            match shapes.get(path) {
                Some((s, first)) if *s != shape => {
                    return Err(LoraError::Merge(format!(
                        "module {path}: adapter {} has ΔW [out {}, in {}] but adapter {} has [out {}, in {}]; \
                         adapters of different base models cannot be merged",
                        first.display(),
                        s.0,
                        s.1,
                        a.path.display(),
                        shape.0,
                        shape.1
                    )))
                }
                Some(_) => {}
                None => {
                    shapes.insert(path.clone(), (shape, &a.path));
                }
            }
        }
    }
    Ok(shapes.into_iter().map(|(p, (s, _))| (p, s)).collect())
}

/// Merges `adapters` (each with its weight) per `spec` into one adapter whose modules are dense
/// f32 `ΔW` (see the module docs). A dense module costs `out · in · 4` bytes.
pub fn merge_adapters(
    adapters: &[(Arc<LoraAdapter>, f64)],
    spec: &MergeSpec,
) -> Result<LoraAdapter, LoraError> {
    merge_adapters_with(adapters, spec, &DareMasks::Seeded)
}

/// [`merge_adapters`] with DARE's masks from `masks`.
pub fn merge_adapters_with(
    adapters: &[(Arc<LoraAdapter>, f64)],
    spec: &MergeSpec,
    masks: &DareMasks<'_>,
) -> Result<LoraAdapter, LoraError> {
    let shapes = merged_modules(adapters, spec)?;
    let mut modules = HashMap::with_capacity(shapes.len());
    let mut rank = 0;
    for path in shapes.keys() {
        let delta = merged_module_delta(adapters, spec, path, masks)?
            .expect("the module is adapted by some adapter");
        let m = LoraModule::dense(delta)?;
        rank = rank.max(m.rank());
        modules.insert(path.clone(), m);
    }
    let names: Vec<String> = shapes.into_keys().collect();
    let described: Vec<String> = adapters
        .iter()
        .map(|(a, w)| format!("{}×{w}", a.path.display()))
        .collect();
    let path = PathBuf::from(format!(
        "merged {} of [{}]",
        spec.strategy,
        described.join(", ")
    ));
    let first = &adapters[0].0.config;
    let config = LoraConfig {
        r: rank,
        lora_alpha: rank as f64,
        use_rslora: false,
        target_modules: TargetModules::Names(names),
        exclude_modules: None,
        rank_pattern: vec![],
        alpha_pattern: vec![],
        layers_to_transform: None,
        layers_pattern: None,
        base_model_name_or_path: first.base_model_name_or_path.clone(),
    };
    LoraAdapter::from_modules(path, config, modules)
}

/// The merged `ΔW` `[out, in]` (f32) of one module, or `None` when no adapter adapts it. This is
/// the one computation behind both [`merge_adapters`] and merging into a base checkpoint.
pub fn merged_module_delta(
    adapters: &[(Arc<LoraAdapter>, f64)],
    spec: &MergeSpec,
    module: &str,
    masks: &DareMasks<'_>,
) -> Result<Option<Tensor>, LoraError> {
    let mut deltas = Vec::with_capacity(adapters.len());
    let mut shape: Option<(usize, usize)> = None;
    for (a, _) in adapters {
        let d = match a.module(module) {
            Some(m) => {
                let s = (m.out_features(), m.in_features());
                if let Some(prev) = shape {
                    if prev != s {
                        return Err(LoraError::Merge(format!(
                            "module {module}: adapters disagree on ΔW's shape ([out {}, in {}] vs [out {}, in {}] in {})",
                            prev.0, prev.1, s.0, s.1, a.path.display()
                        )));
                    }
                }
                shape = Some(s);
                Some(m.delta_weight()?)
            }
            None => None,
        };
        deltas.push(d);
    }
    if shape.is_none() {
        return Ok(None);
    }
    let weights: Vec<f64> = adapters.iter().map(|(_, w)| *w).collect();
    combine_deltas(module, &deltas, &weights, spec, masks).map(Some)
}

/// Combines one module's `ΔW_i` (`None`: the adapter leaves the module alone, a zero `ΔW`) with
/// `weights` per `spec`. At least one `ΔW` must be given; all given ones share one 2-D shape.
pub fn combine_deltas(
    module: &str,
    deltas: &[Option<Tensor>],
    weights: &[f64],
    spec: &MergeSpec,
    masks: &DareMasks<'_>,
) -> Result<Tensor, LoraError> {
    if deltas.len() != weights.len() {
        return Err(LoraError::Merge(format!(
            "module {module}: {} ΔW for {} weights",
            deltas.len(),
            weights.len()
        )));
    }
    if !(spec.density > 0.0 && spec.density <= 1.0) {
        return Err(LoraError::Merge(format!(
            "density {} is outside (0, 1]",
            spec.density
        )));
    }
    let first = deltas
        .iter()
        .flatten()
        .next()
        .ok_or_else(|| LoraError::Merge(format!("module {module}: no adapter adapts it")))?;
    let dims = first.dims().to_vec();
    if dims.len() != 2 {
        return Err(LoraError::Merge(format!(
            "module {module}: ΔW has shape {dims:?}, expected [out, in]"
        )));
    }
    let device: Device = first.device().clone();
    let n = dims[0] * dims[1];
    let mut task: Vec<Vec<f32>> = Vec::with_capacity(deltas.len());
    for (i, d) in deltas.iter().enumerate() {
        let v = match d {
            Some(t) => {
                if t.dims() != dims.as_slice() {
                    return Err(LoraError::Merge(format!(
                        "module {module}: ΔW of adapter {i} has shape {:?}, another has {dims:?}",
                        t.dims()
                    )));
                }
                let mut v = t
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if spec.density < 1.0 {
                    match spec.strategy {
                        MergeStrategy::Linear => {}
                        MergeStrategy::Ties => magnitude_prune(&mut v, spec.density),
                        MergeStrategy::DareLinear | MergeStrategy::DareTies => {
                            let mask = match masks {
                                DareMasks::Seeded => seeded_mask(spec, module, i, n),
                                DareMasks::Given(f) => f(module, i).ok_or_else(|| {
                                    LoraError::Merge(format!(
                                        "module {module}: no DARE mask given for adapter {i}"
                                    ))
                                })?,
                            };
                            if mask.len() != n {
                                return Err(LoraError::Merge(format!(
                                    "module {module}: DARE mask of adapter {i} has {} values, ΔW has {n}",
                                    mask.len()
                                )));
                            }
                            random_prune(&mut v, &mask, spec.density);
                        }
                    }
                }
                v
            }
            None => vec![0.0; n],
        };
        task.push(v);
    }
    // PEFT builds its weight tensor with torch.tensor(list of floats): float32.
    let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let mut out = vec![0f32; n];
    if spec.strategy.elects_sign() {
        for (j, o) in out.iter_mut().enumerate() {
            let elected = task.iter().fold(0f32, |acc, t| {
                acc + match spec.majority_sign_method {
                    MajoritySignMethod::Total => t[j],
                    MajoritySignMethod::Frequency => sign(t[j]),
                }
            });
            let majority = if elected >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0f32, 0f32);
            for (t, &wi) in task.iter().zip(&w) {
                if sign(t[j]) == majority {
                    sum += t[j] * wi;
                    count += 1.0;
                }
            }
            *o = sum / count.max(1.0);
        }
    } else {
        for (t, &wi) in task.iter().zip(&w) {
            for (o, &x) in out.iter_mut().zip(t) {
                *o += x * wi;
            }
        }
    }
    Ok(Tensor::from_vec(out, (dims[0], dims[1]), &device)?)
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Keeps the `⌊density · n⌋` entries of largest magnitude, zeroes the rest (PEFT's
/// `magnitude_based_pruning`).
fn magnitude_prune(v: &mut [f32], density: f64) {
    let k = (density * v.len() as f64) as usize;
    if k >= v.len() {
        return;
    }
    let mut order: Vec<usize> = (0..v.len()).collect();
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| v[b].abs().total_cmp(&v[a].abs()));
    }
    for &i in &order[k..] {
        v[i] = 0.0;
    }
}

/// DARE: `v · mask / density` (PEFT's `random_pruning` with `rescale=True`).
fn random_prune(v: &mut [f32], mask: &[f32], density: f64) {
    let d = density as f32;
    for (x, &m) in v.iter_mut().zip(mask) {
        *x = *x * m / d;
    }
}

/// A keep-mask (1 with probability `density`) from a SplitMix64 stream seeded by the spec's seed,
/// the module path and the adapter index.
fn seeded_mask(spec: &MergeSpec, module: &str, adapter: usize, n: usize) -> Vec<f32> {
    // FNV-1a of the module path, so each module has its own stream whatever the visiting order.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in module.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut state = splitmix(spec.seed ^ splitmix(h ^ splitmix(adapter as u64)));
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let u = (splitmix(state) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            if u < spec.density {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// SplitMix64's output function.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
