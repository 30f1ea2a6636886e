//! One decoder layer's training forward (optionally keeping its activations) and backward, over
//! a batch of unpadded sequences laid out one after the other in the rows.

use candle_core::Tensor;
use lorq_model::{LayerLinear, LlamaModel};

use crate::error::{Result, TrainError};
use crate::grad_ops::{
    attention_bwd, attention_fwd, rms_norm_bwd, rms_norm_fwd, silu_mul, silu_mul_bwd, AttnSaved,
    AttnShape, RmsNormSaved,
};
use crate::lora_linear::{linear_bwd, linear_fwd, LinearSaved, LoraSlot};
use crate::lora_params::LoraParams;

/// What a step shares across layers: the model, the trainable pairs, the sequences' row spans and
/// RoPE tables, and the dropout seed of this micro-batch.
pub struct StepCtx<'a> {
    pub model: &'a LlamaModel,
    pub lora: &'a LoraParams,
    /// `(first row, length)` per sequence.
    pub spans: &'a [(usize, usize)],
    /// RoPE `(cos, sin)` per sequence (positions from 0).
    pub ropes: &'a [(Tensor, Tensor)],
    /// Dropout on when training; off for eval.
    pub dropout_seed: Option<u64>,
}

impl<'a> StepCtx<'a> {
    pub fn new(
        model: &'a LlamaModel,
        lora: &'a LoraParams,
        batch: &'a crate::step::MicroBatch,
        ropes: &'a [(Tensor, Tensor)],
        dropout_seed: Option<u64>,
    ) -> Self {
        Self {
            model,
            lora,
            spans: &batch.spans,
            ropes,
            dropout_seed,
        }
    }

    fn slot(&self, layer: usize, which: LayerLinear) -> Option<LoraSlot<'_>> {
        let (index, module) = self.lora.get(layer, which)?;
        let dropout = if self.dropout_seed.is_some() {
            self.lora.spec.dropout
        } else {
            0.0
        };
        let seed = self.dropout_seed.unwrap_or(0) ^ mix(layer as u64 * 8 + which as u64 + 1);
        Some(LoraSlot {
            module,
            index,
            scale: self.lora.spec.scale(),
            dropout,
            seed,
        })
    }

    fn attn_shape(&self, layer: usize) -> AttnShape {
        let c = &self.model.config;
        AttnShape {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            window: self.model.layer_window(layer),
        }
    }
}

/// SplitMix64 finaliser: decorrelates the per-linear dropout seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The activations of one layer that its backward reads.
pub struct LayerSaved {
    n1: RmsNormSaved,
    q: LinearSaved,
    k: LinearSaved,
    v: LinearSaved,
    attn: Vec<AttnSaved>,
    o: LinearSaved,
    n2: RmsNormSaved,
    gate: LinearSaved,
    up: LinearSaved,
    g: Tensor,
    u: Tensor,
    down: LinearSaved,
}

/// Layer `layer` over `x [rows, hidden]`; with `keep`, also its saved activations.
pub fn layer_fwd(
    ctx: &StepCtx<'_>,
    layer: usize,
    x: &Tensor,
    keep: bool,
) -> Result<(Tensor, Option<LayerSaved>)> {
    let m = ctx.model;
    let eps = m.config.rms_norm_eps;
    let fwd = |w, x: &Tensor| linear_fwd(m.layer_linear(layer, w), ctx.slot(layer, w).as_ref(), x);
    let shape = ctx.attn_shape(layer);
    let (h1, n1) = rms_norm_fwd(x, m.layer_norm_weight(layer, false), eps)?;
    let (q, sq) = fwd(LayerLinear::Q, &h1)?;
    let (k, sk) = fwd(LayerLinear::K, &h1)?;
    let (v, sv) = fwd(LayerLinear::V, &h1)?;
    let mut outs = Vec::with_capacity(ctx.spans.len());
    let mut attn = Vec::with_capacity(ctx.spans.len());
    for (&(start, n), (cos, sin)) in ctx.spans.iter().zip(ctx.ropes) {
        let (q, k, v) = (
            q.narrow(0, start, n)?,
            k.narrow(0, start, n)?,
            v.narrow(0, start, n)?,
        );
        let (o, s) = attention_fwd(shape, &q, &k, &v, cos, sin)?;
        outs.push(o);
        if keep {
            attn.push(s);
        }
    }
    let (yo, so) = fwd(LayerLinear::O, &Tensor::cat(&outs, 0)?)?;
    let x2 = (x + yo)?;
    let (h2, n2) = rms_norm_fwd(&x2, m.layer_norm_weight(layer, true), eps)?;
    let (g, sg) = fwd(LayerLinear::Gate, &h2)?;
    let (u, su) = fwd(LayerLinear::Up, &h2)?;
    let (yd, sd) = fwd(LayerLinear::Down, &silu_mul(&g, &u)?)?;
    let out = (x2 + yd)?;
    let saved = keep.then_some(LayerSaved {
        n1,
        q: sq,
        k: sk,
        v: sv,
        attn,
        o: so,
        n2,
        gate: sg,
        up: su,
        g,
        u,
        down: sd,
    });
    Ok((out, saved))
}

/// The backward of [`layer_fwd`]: accumulates the LoRA gradients of the layer into `grads` and
/// returns the gradient of the layer input (skipped, `None`, when `need_dx` is false: layer 0,
/// whose input is the frozen embedding).
pub fn layer_bwd(
    ctx: &StepCtx<'_>,
    layer: usize,
    s: &LayerSaved,
    dout: &Tensor,
    need_dx: bool,
    grads: &mut [Option<Tensor>],
) -> Result<Option<Tensor>> {
    let m = ctx.model;
    let shape = ctx.attn_shape(layer);
    let mut bwd = |w, saved: &LinearSaved, dy: &Tensor, need_dx: bool| {
        linear_bwd(
            m.layer_linear(layer, w),
            ctx.slot(layer, w).as_ref(),
            saved,
            dy,
            need_dx,
            grads,
        )
    };
    let dx_of = |d: Option<Tensor>| d.ok_or_else(|| TrainError::Config("dx requested".into()));
    // MLP block: out = x2 + down(silu(gate(h2)) ⊙ up(h2)).
    let dact = dx_of(bwd(LayerLinear::Down, &s.down, dout, true)?)?;
    let (dg, du) = silu_mul_bwd(&s.g, &s.u, &dact)?;
    let dh2 = dx_of(bwd(LayerLinear::Gate, &s.gate, &dg, true)?)?;
    let dh2 = (dh2 + dx_of(bwd(LayerLinear::Up, &s.up, &du, true)?)?)?;
    let dx2 = (dout + rms_norm_bwd(&s.n2, m.layer_norm_weight(layer, true), &dh2)?)?;
    // Attention block: x2 = x + o(attn(q(h1), k(h1), v(h1))).
    let da = dx_of(bwd(LayerLinear::O, &s.o, &dx2, true)?)?;
    let (mut dqs, mut dks, mut dvs) = (vec![], vec![], vec![]);
    for ((&(start, n), (cos, sin)), saved) in ctx.spans.iter().zip(ctx.ropes).zip(&s.attn) {
        let (dq, dk, dv) = attention_bwd(shape, saved, &da.narrow(0, start, n)?, cos, sin)?;
        dqs.push(dq);
        dks.push(dk);
        dvs.push(dv);
    }
    let dq = bwd(LayerLinear::Q, &s.q, &Tensor::cat(&dqs, 0)?, need_dx)?;
    let dk = bwd(LayerLinear::K, &s.k, &Tensor::cat(&dks, 0)?, need_dx)?;
    let dv = bwd(LayerLinear::V, &s.v, &Tensor::cat(&dvs, 0)?, need_dx)?;
    if !need_dx {
        return Ok(None);
    }
    let dh1 = ((dx_of(dq)? + dx_of(dk)?)? + dx_of(dv)?)?;
    Ok(Some(
        (dx2 + rms_norm_bwd(&s.n1, m.layer_norm_weight(layer, false), &dh1)?)?,
    ))
}
