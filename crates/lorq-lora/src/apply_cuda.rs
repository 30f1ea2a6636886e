//! The GPU path of [`crate::BatchAdapters::apply`]: every row's own adapter delta in one shrink
//! and one expand launch per module call (`lorq_quant::cuda::sgmv`), whatever the number of
//! adapters and ranks in the batch; the shrink is queued before the module's base matmul
//! ([`crate::BatchAdapters::begin`]) so a CUDA graph runs the two side by side.
//!
//! Weights stay in the adapter's own dtype on the GPU (f32, bf16 or f16) and are widened to f32
//! in registers: that is exactly PEFT's float32 LoRA compute on the same values (upcasting is
//! lossless) while reading half the bytes of an f32 copy for bf16/f16 adapters, and decode with
//! many adapters is bound by those bytes. A pair that `LoraAdapter::load` already put on the
//! model's GPU is read in place; any other (host tier, another GPU, a view) gets one contiguous
//! copy per GPU, kept with the module.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lorq_quant::cuda::sgmv::{shrink_group, LoraPair, LoraSegment, Shrunk, MAX_GROUP, MAX_RANK};

use crate::{AdapterSegment, LoraModule, LoraWeights};

/// A pair on the activations' GPU: the stored tensors, or the module's resident copy.
enum Resident<'a> {
    Stored(&'a Tensor, &'a Tensor),
    Copied(Arc<(Tensor, Tensor)>),
}

impl Resident<'_> {
    fn pair(&self) -> (&Tensor, &Tensor) {
        match self {
            Resident::Stored(a, b) => (a, b),
            Resident::Copied(p) => (&p.0, &p.1),
        }
    }
}

/// The pair of `m` on `x`'s GPU, contiguous: the stored tensors when they already are, else the
/// module's cached copy (made on first use).
fn resident<'a>(
    m: &'a LoraModule,
    a: &'a Tensor,
    b: &'a Tensor,
    dev: &Device,
) -> Result<Resident<'a>, candle_core::Error> {
    if a.device().same_device(dev)
        && b.device().same_device(dev)
        && a.is_contiguous()
        && b.is_contiguous()
    {
        return Ok(Resident::Stored(a, b));
    }
    let Device::Cuda(cuda) = dev else {
        return Err(candle_core::Error::Msg(format!(
            "LoRA on the GPU: activations are on {dev:?}, not a GPU"
        )));
    };
    m.gpu
        .get_or_upload(cuda, |_| {
            tracing::debug!(
                "LoRA pair [{:?}, {:?}] copied to the GPU once (stored on {:?})",
                a.dims(),
                b.dims(),
                a.device()
            );
            Ok((
                a.to_device(dev)?.contiguous()?,
                b.to_device(dev)?.contiguous()?,
            ))
        })
        .map(Resident::Copied)
        .map_err(to_candle)
}

/// A module's pairs on `x`'s GPU (one per segment, `None` where that segment's adapter leaves the
/// module alone) and its output features; `None` when the module needs the generic path: a dense
/// delta among them, or a rank past the kernels' [`MAX_RANK`].
type ModulePairs<'a> = (usize, Vec<Option<(Resident<'a>, f32)>>);

fn module_pairs<'a>(
    modules: &[Option<&'a LoraModule>],
    x: &Tensor,
) -> Result<Option<ModulePairs<'a>>, candle_core::Error> {
    let mut pairs = Vec::with_capacity(modules.len());
    let mut out_features = 0;
    for m in modules {
        let Some(m) = m else {
            pairs.push(None);
            continue;
        };
        let LoraWeights::LowRank { a, b } = &m.weights else {
            return Ok(None);
        };
        if m.rank() > MAX_RANK {
            return Ok(None);
        }
        out_features = b.dim(0)?;
        let pair = resident(m, a, b, x.device())?;
        if lorq_quant::cuda::graph::capturing() {
            // A captured graph reads these weights at every replay: they live as long as it.
            let (a, b) = pair.pair();
            lorq_quant::cuda::graph::keep_alive(Arc::new((a.clone(), b.clone())));
        }
        pairs.push(Some((pair, m.scale as f32)));
    }
    Ok(Some((out_features, pairs)))
}

/// Queues the shrinks of `x`'s rows for modules that share `x` (q/k/v, gate/up: one launch per
/// [`MAX_GROUP`] of them), one result per module: `None` where that module needs the generic
/// path (a dense delta among its adapters, a rank past the kernels' [`MAX_RANK`]), or for every
/// module when the activations are in none of the kernels' dtypes (f32/bf16/f16).
pub(crate) fn begin_group(
    segments: &[AdapterSegment],
    modules: &[Vec<Option<&LoraModule>>],
    x: &Tensor,
) -> Result<Vec<Option<Started>>, candle_core::Error> {
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) || x.rank() != 2 {
        return Ok(modules.iter().map(|_| None).collect());
    }
    let resolved = modules
        .iter()
        .map(|m| module_pairs(m, x))
        .collect::<Result<Vec<_>, _>>()?;
    let segs: Vec<Option<(usize, Vec<LoraSegment<'_>>)>> = resolved
        .iter()
        .map(|r| {
            r.as_ref().map(|(n, pairs)| {
                let segs = segments
                    .iter()
                    .zip(pairs)
                    .map(|(s, p)| LoraSegment {
                        rows: s.rows,
                        lora: p.as_ref().map(|(w, scale)| {
                            let (a, b) = w.pair();
                            LoraPair {
                                a,
                                b,
                                scale: *scale,
                            }
                        }),
                    })
                    .collect();
                (*n, segs)
            })
        })
        .collect();
    let kernel_modules: Vec<(usize, &[LoraSegment<'_>])> = segs
        .iter()
        .flatten()
        .map(|(n, s)| (*n, s.as_slice()))
        .collect();
    let mut shrunk = Vec::with_capacity(kernel_modules.len());
    for chunk in kernel_modules.chunks(MAX_GROUP) {
        shrunk.extend(shrink_group(x, chunk).map_err(to_candle)?);
    }
    let mut shrunk = shrunk.into_iter();
    Ok(segs
        .iter()
        .map(|s| {
            s.as_ref().map(|_| Started {
                shrunk: shrunk.next().expect("one shrink per kernel module"),
                dtype: x.dtype(),
            })
        })
        .collect())
}

/// A shrink queued by [`begin_group`] (`None` inside: no segment had a pair, the delta is zero).
pub(crate) struct Started {
    pub(crate) shrunk: Option<Shrunk>,
    dtype: DType,
}

impl Started {
    /// `base_out + delta`, or `None` when `base_out` is not in the activations' dtype (the
    /// generic path then computes the delta).
    pub(crate) fn finish(self, base_out: &Tensor) -> Result<Option<Tensor>, candle_core::Error> {
        if base_out.dtype() != self.dtype {
            return Ok(None);
        }
        match self.shrunk {
            Some(s) => s.expand(base_out).map(Some).map_err(to_candle),
            None => Ok(Some(base_out.clone())),
        }
    }

    /// Whether [`Self::finish`] would run the expand kernel for `base_out`.
    pub(crate) fn expands(&self, base_out: &Tensor) -> bool {
        self.shrunk.is_some() && base_out.dtype() == self.dtype
    }
}

/// The expands of several modules sharing one batch, `bases[i] + delta_i`, in one launch.
pub(crate) fn expand_all(
    shrunk: Vec<Shrunk>,
    bases: &[&Tensor],
) -> Result<Vec<Tensor>, candle_core::Error> {
    lorq_quant::cuda::sgmv::expand_group(shrunk, bases).map_err(to_candle)
}

fn to_candle(e: lorq_quant::QuantError) -> candle_core::Error {
    match e {
        lorq_quant::QuantError::Candle(e) => e,
        e => candle_core::Error::Msg(e.to_string()),
    }
}
