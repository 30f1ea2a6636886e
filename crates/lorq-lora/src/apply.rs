use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::LoraAdapter;

/// A run of consecutive batch rows that share one adapter (or none).
#[derive(Debug, Clone)]
pub struct AdapterSegment {
    pub rows: usize,
    pub adapter: Option<Arc<LoraAdapter>>,
}

/// Which adapter applies to each row of a flattened batch `[rows, features]`.
///
/// Rows are grouped into segments (neighbouring segments with the same adapter are coalesced) so
/// that rows sharing an adapter share its weight loads: on the GPU one shrink and one expand
/// launch cover every segment (`apply_cuda.rs`), on the CPU one pass over the rows.
#[derive(Debug, Clone, Default)]
pub struct BatchAdapters {
    segments: Vec<AdapterSegment>,
}

impl BatchAdapters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `rows` rows that use `adapter` (`None`: the base model alone).
    pub fn push(&mut self, rows: usize, adapter: Option<Arc<LoraAdapter>>) {
        if rows == 0 {
            return;
        }
        if let Some(last) = self.segments.last_mut() {
            let same = match (&last.adapter, &adapter) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            if same {
                last.rows += rows;
                return;
            }
        }
        self.segments.push(AdapterSegment { rows, adapter });
    }

    pub fn rows(&self) -> usize {
        self.segments.iter().map(|s| s.rows).sum()
    }

    pub fn segments(&self) -> &[AdapterSegment] {
        &self.segments
    }

    pub fn has_adapters(&self) -> bool {
        self.segments.iter().any(|s| s.adapter.is_some())
    }

    /// `base_out + delta` where each row's delta comes from its own adapter's module at
    /// `module_path` (zero for rows without an adapter or whose adapter leaves that module alone).
    /// `x`: `[rows, in]`, `base_out`: `[rows, out]`.
    pub fn apply(
        &self,
        module_path: &str,
        x: &Tensor,
        base_out: Tensor,
    ) -> Result<Tensor, candle_core::Error> {
        match self.begin(module_path, x)? {
            Some(pending) => pending.finish(base_out),
            None => Ok(base_out),
        }
    }

    /// [`Self::apply`] in two halves around the base matmul: call this before it, then
    /// [`PendingDelta::finish`] with its output. On the GPU the first half queues the LoRA shrink
    /// (`A·x`), which inside a CUDA graph capture runs beside the base matmul. `None`: no row's
    /// adapter touches this module (the base output stands).
    pub fn begin<'a>(
        &'a self,
        module_path: &'a str,
        x: &Tensor,
    ) -> Result<Option<PendingDelta<'a>>, candle_core::Error> {
        let mut pending = self.begin_group(&[module_path], x)?;
        Ok(pending.pop().flatten())
    }

    /// [`Self::begin`] of modules that read the same `x` (q/k/v, gate/up): on the GPU their
    /// shrinks run as one launch. One result per path, in order.
    pub fn begin_group<'a>(
        &'a self,
        module_paths: &[&'a str],
        x: &Tensor,
    ) -> Result<Vec<Option<PendingDelta<'a>>>, candle_core::Error> {
        let modules: Vec<Vec<_>> = module_paths
            .iter()
            .map(|path| {
                self.segments
                    .iter()
                    .map(|s| s.adapter.as_ref().and_then(|a| a.module(path)))
                    .collect()
            })
            .collect();
        let touched: Vec<bool> = modules
            .iter()
            .map(|m: &Vec<_>| m.iter().any(Option::is_some))
            .collect();
        #[cfg(feature = "cuda")]
        let mut gpu = if x.device().is_cuda() {
            let live: Vec<Vec<_>> = modules
                .iter()
                .zip(&touched)
                .filter(|(_, &t)| t)
                .map(|(m, _)| m.clone())
                .collect();
            crate::apply_cuda::begin_group(&self.segments, &live, x)?.into_iter()
        } else {
            Vec::new().into_iter()
        };
        Ok(modules
            .into_iter()
            .zip(touched)
            .map(|(modules, touched)| {
                touched.then(|| PendingDelta {
                    adapters: self,
                    modules,
                    x: x.clone(),
                    #[cfg(feature = "cuda")]
                    gpu: gpu.next().flatten(),
                })
            })
            .collect())
    }

    /// The generic path (dense deltas, other devices): small candle matmuls per segment. Sum in
    /// f32 then round once, as PEFT adds the float32 LoRA output to the base output.
    fn apply_generic(
        &self,
        modules: &[Option<&crate::LoraModule>],
        x: &Tensor,
        base_out: Tensor,
    ) -> Result<Tensor, candle_core::Error> {
        let out_dtype = base_out.dtype();
        let base_out = base_out.to_dtype(DType::F32)?;
        if self.segments.len() == 1 {
            let delta = modules[0]
                .expect("a module touched by some row")
                .delta(&x.to_dtype(DType::F32)?)?;
            return (base_out + delta)?.to_dtype(out_dtype);
        }
        let out_features = base_out.dim(1)?;
        let mut pieces = Vec::with_capacity(self.segments.len());
        let mut start = 0;
        for (seg, module) in self.segments.iter().zip(modules) {
            let piece = match module {
                Some(m) => m.delta(&x.narrow(0, start, seg.rows)?.to_dtype(DType::F32)?)?,
                None => Tensor::zeros((seg.rows, out_features), DType::F32, x.device())?,
            };
            pieces.push(piece);
            start += seg.rows;
        }
        (base_out + Tensor::cat(&pieces, 0)?)?.to_dtype(out_dtype)
    }

    /// The CPU path: one pass over the rows with [`crate::batched`] (f32 throughout, one
    /// rounding to the output dtype at the end, as the generic path).
    fn apply_cpu(
        &self,
        modules: &[Option<&crate::LoraModule>],
        x: &Tensor,
        base_out: Tensor,
    ) -> Result<Tensor, candle_core::Error> {
        let out_dtype = base_out.dtype();
        let (rows, n_out) = base_out.dims2()?;
        let n_in = x.dim(1)?;
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut out: Vec<f32> = base_out.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut plan = Vec::with_capacity(self.segments.len());
        let mut start = 0;
        for (seg, module) in self.segments.iter().zip(modules) {
            let w = match module {
                Some(m) => Some((m.host_weights()?, m.scale as f32)),
                None => None,
            };
            plan.push((start, seg.rows, w));
            start += seg.rows;
        }
        crate::batched::add_deltas(&xs, n_in, &mut out, n_out, &plan);
        Tensor::from_vec(out, (rows, n_out), x.device())?.to_dtype(out_dtype)
    }
}

/// One module's adapter delta between [`BatchAdapters::begin`] and [`Self::finish`].
pub struct PendingDelta<'a> {
    adapters: &'a BatchAdapters,
    modules: Vec<Option<&'a crate::LoraModule>>,
    x: Tensor,
    /// The queued GPU shrink (`None`: the batch takes the CPU or generic path).
    #[cfg(feature = "cuda")]
    gpu: Option<crate::apply_cuda::Started>,
}

impl PendingDelta<'_> {
    /// `base_out + delta`, `base_out` being the module's base output for the same rows.
    pub fn finish(self, base_out: Tensor) -> Result<Tensor, candle_core::Error> {
        #[cfg(feature = "cuda")]
        if let Some(started) = self.gpu {
            if let Some(y) = started.finish(&base_out)? {
                return Ok(y);
            }
        }
        if self.x.device().is_cpu() {
            return self.adapters.apply_cpu(&self.modules, &self.x, base_out);
        }
        self.adapters
            .apply_generic(&self.modules, &self.x, base_out)
    }

    /// [`Self::finish`] of modules that share one input (q/k/v, gate/up): `pending[i]` (`None`:
    /// no delta) with `base_outs[i]`. On the GPU the expands run as one launch.
    pub fn finish_all(
        pending: Vec<Option<Self>>,
        base_outs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, candle_core::Error> {
        let mut outs = Vec::with_capacity(base_outs.len());
        #[cfg(feature = "cuda")]
        let mut grouped = Vec::new();
        for (p, y) in pending.into_iter().zip(base_outs) {
            let Some(p) = p else {
                outs.push(y);
                continue;
            };
            #[cfg(feature = "cuda")]
            let p = {
                let mut p = p;
                if p.gpu.as_ref().is_some_and(|s| s.expands(&y)) {
                    let shrunk = p.gpu.take().and_then(|s| s.shrunk);
                    grouped.push((outs.len(), shrunk.expect("expands() checked it")));
                    outs.push(y);
                    continue;
                }
                p
            };
            outs.push(p.finish(y)?);
        }
        #[cfg(feature = "cuda")]
        while !grouped.is_empty() {
            // The kernel takes up to MAX_GROUP modules per launch.
            let rest = grouped.split_off(grouped.len().min(lorq_quant::cuda::sgmv::MAX_GROUP));
            let (at, shrunk): (Vec<usize>, Vec<_>) =
                std::mem::replace(&mut grouped, rest).into_iter().unzip();
            let bases: Vec<&Tensor> = at.iter().map(|&i| &outs[i]).collect();
            let ys = crate::apply_cuda::expand_all(shrunk, &bases)?;
            for (i, y) in at.into_iter().zip(ys) {
                outs[i] = y;
            }
        }
        Ok(outs)
    }
}
