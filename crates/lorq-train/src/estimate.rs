//! `lorq estimate`: the memory of a QLoRA run from the model's real shapes (every targeted linear's
//! own dims, GQA, the MLP, the vocabulary, tied embeddings), without loading weights.
//!
//! Quantized weight bytes come from `lorq_quant::select::linear_bytes` (the same sums as each
//! format's `QuantTensor::bytes()`). Activations follow lorq's trainer; what it keeps is listed in
//! [`model`] so it can be adjusted after measuring.

mod presets;

pub use presets::{preset_config, preset_names};

use lorq_lora::TargetModules;
use lorq_model::{LayerLinear, ModelConfig};
use lorq_quant::select::{self, ModelShapes};
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::optim::kernels::BNB_BLOCK;
use crate::optim::{OptimizerKind, MIN_8BIT_SIZE};

/// What lorq's trainer keeps, in one place.
pub mod model {
    /// Rows of the LM head / loss computed at once, and how many f32 `[chunk, vocab]` tensors
    /// are alive at once (the loss code's own constants).
    pub const LOSS_CHUNK_ROWS: u64 = crate::loss::LOSS_CHUNK_ROWS as u64;
    pub const LOSS_CHUNK_TENSORS: u64 = crate::loss::LOSS_CHUNK_TENSORS as u64;
    /// Bytes per logit and per logit gradient (the loss runs in f32).
    pub const LOGITS_BYTES: u64 = 4;
    /// Bytes per attention probability (softmax kept in f32 for the backward).
    pub const ATTN_PROBS_BYTES: u64 = 4;
    /// LoRA A/B master weights and their gradients are f32.
    pub const LORA_MASTER_BYTES: u64 = 4;
    /// With dropout on, each targeted linear keeps its dropped input and its scaled keep-mask,
    /// both `[rows, in]` in the compute dtype (2 tensors); without, the input is shared.
    pub const DROPOUT_TENSORS_PER_LINEAR: u64 = 2;
    /// The optimizers update on the host: while they run, the params, their gradients and the
    /// updated params exist there as f32 copies.
    pub const OPTIMIZER_STEP_COPIES: u64 = 3;
    /// Gradient buffers alive during one layer's backward, relative to that layer's saved
    /// activations.
    pub const LAYER_GRAD_FACTOR: f64 = 1.0;
}

/// Where a component lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    Device,
    /// Host memory (the paged optimizers' state).
    Host,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Component {
    pub name: &'static str,
    pub bytes: u64,
    pub place: Place,
    /// Only while one layer runs its backward (or the loss phase): counted once at the peak.
    pub transient: bool,
    pub note: String,
}

/// The inputs of an estimate (defaults: `lorq train`'s, with bf16 compute as on a GPU).
#[derive(Debug, Clone)]
pub struct EstimateOptions {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub targets: TargetModules,
    pub batch_size: usize,
    pub seq_len: usize,
    /// A `--quantize` name (`none`, `bf16`, `bitsandbytes-nf4`, ...).
    pub quantize: String,
    pub optim: OptimizerKind,
    pub gradient_checkpointing: bool,
    /// Bytes per compute-dtype value (2 for bf16, 4 for f32).
    pub compute_bytes: u64,
}

impl Default for EstimateOptions {
    fn default() -> Self {
        Self {
            r: 64,
            lora_alpha: 16.0,
            lora_dropout: 0.1,
            targets: TargetModules::AllLinear,
            batch_size: 4,
            seq_len: 2048,
            quantize: "bitsandbytes-nf4".into(),
            optim: OptimizerKind::PagedAdamW8bit,
            gradient_checkpointing: true,
            compute_bytes: 2,
        }
    }
}

/// One decoder linear of a layer, PEFT module name and `[out, in]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinearShape {
    pub path: &'static str,
    pub out_features: usize,
    pub in_features: usize,
}

/// The seven linears of a Llama-family decoder layer with this config's dims.
pub fn layer_linears(c: &ModelConfig) -> [LinearShape; 7] {
    LayerLinear::ALL.map(|w| {
        let (out_features, in_features) = c.linear_shape(w);
        LinearShape {
            path: w.module(),
            out_features,
            in_features,
        }
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub model: String,
    pub quantize: String,
    pub optim: &'static str,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: String,
    pub batch_size: usize,
    pub seq_len: usize,
    pub gradient_checkpointing: bool,
    pub compute_bytes: u64,
    /// Targeted linears over all layers.
    pub lora_modules: usize,
    pub lora_params: u64,
    /// LoRA tensors (A and B) whose optimizer state stays 32-bit under the 8-bit optimizers.
    pub small_tensors_32bit: usize,
    pub components: Vec<Component>,
    /// Resident device bytes plus the larger of the transient phases.
    pub device_peak: u64,
    pub host: u64,
}

/// Computes the estimate for `config` (named `model` in the output).
pub fn estimate(model: &str, config: &ModelConfig, o: &EstimateOptions) -> Result<Estimate> {
    let names = select::row_names();
    if !names.contains(&o.quantize.as_str()) {
        return Err(TrainError::Config(format!(
            "--quantize {:?}: not a method to estimate; choose one of {}",
            o.quantize,
            names.join(", ")
        )));
    }
    if o.r == 0 || o.batch_size == 0 || o.seq_len == 0 {
        return Err(TrainError::Config(
            "--r, --batch-size and --seq-len must be at least 1".into(),
        ));
    }
    if !(0.0..1.0).contains(&o.lora_dropout) {
        return Err(TrainError::Config(format!(
            "--lora-dropout must be in [0, 1), got {}",
            o.lora_dropout
        )));
    }
    let c = config;
    let cb = o.compute_bytes;
    let layers = c.num_hidden_layers as u64;
    let linears = layer_linears(c);
    let targeted: Vec<LinearShape> = linears
        .iter()
        .copied()
        .filter(|l| {
            o.targets
                .matches(&format!("model.layers.0.{}", l.path), false)
        })
        .collect();
    if targeted.is_empty() {
        return Err(TrainError::Config(format!(
            "--target-modules {}: matches none of this model's linears ({})",
            o.targets.describe(),
            linears
                .map(|l| l.path.rsplit('.').next().unwrap_or(l.path))
                .join(", ")
        )));
    }

    // Base weights, through the quantization formats' own byte counts.
    let shapes = ModelShapes {
        linears: linears
            .iter()
            .map(|l| (l.out_features, l.in_features))
            .collect(),
        other_params: 0,
        compute_bytes: cb as usize,
        hqq_meta_bytes: 4,
        stored_bytes: match c.torch_dtype.as_deref() {
            Some("float32") => 4,
            _ => 2,
        },
        reserve: 0,
        calib_group: 128,
    };
    let (mut linear_total, mut linear_codes) = (0u64, 0u64);
    for l in &linears {
        let numel = (l.out_features * l.in_features) as u64;
        linear_total += select::linear_bytes(&o.quantize, l.out_features, l.in_features, &shapes);
        linear_codes += code_bytes(&o.quantize, numel, cb);
    }
    let (linear_total, linear_codes) = (linear_total * layers, linear_codes * layers);
    let linear_params: usize = linears.iter().map(|l| l.out_features * l.in_features).sum();
    let other_params = (c.parameter_count() - linear_params * c.num_hidden_layers) as u64;

    // LoRA: A [r, in] and B [out, r] per targeted linear, f32 masters and gradients.
    let r = o.r as u64;
    let tensors: Vec<u64> = targeted
        .iter()
        .flat_map(|l| [r * l.in_features as u64, l.out_features as u64 * r])
        .collect();
    let per_layer_params: u64 = tensors.iter().sum();
    let lora_params = per_layer_params * layers;
    let (mut opt_bytes, mut small) = (0u64, 0usize);
    for &n in &tensors {
        if o.optim.is_8bit() && n as usize >= MIN_8BIT_SIZE {
            opt_bytes += 2 * n + 2 * 4 * n.div_ceil(BNB_BLOCK as u64);
        } else {
            opt_bytes += 2 * 4 * n;
            small += usize::from(o.optim.is_8bit());
        }
    }
    let opt_bytes = opt_bytes * layers;
    let small = small * c.num_hidden_layers;

    // Activations (see `model`): rows = batch × seq tokens, unpadded.
    let rows = (o.batch_size * o.seq_len) as u64;
    let (h, q, kv, i) = (
        c.hidden_size as u64,
        (c.num_attention_heads * c.head_dim) as u64,
        (c.num_key_value_heads * c.head_dim) as u64,
        c.intermediate_size as u64,
    );
    let heads = c.num_attention_heads as u64;
    let l = o.seq_len as u64;
    let probs = o.batch_size as u64 * heads * l * l * model::ATTN_PROBS_BYTES;
    // input, h1, q, attention output, residual x2, h2, gate, up, silu(gate)·up
    let dense = rows * (4 * h + 2 * q + 3 * i) * cb;
    let lora_saved: u64 = targeted
        .iter()
        .map(|t| {
            let u = rows * r * cb;
            let drop = if o.lora_dropout > 0.0 {
                model::DROPOUT_TENSORS_PER_LINEAR * rows * t.in_features as u64 * cb
            } else {
                0
            };
            u + drop
        })
        .sum();
    let layer_saved = dense + probs + lora_saved;
    let layer_kv = 2 * rows * kv * cb;
    let layer_input = rows * h * cb;
    let layer_grads = ((layer_saved + layer_kv) as f64 * model::LAYER_GRAD_FACTOR) as u64;
    let chunk = rows.min(model::LOSS_CHUNK_ROWS);
    let logits = model::LOSS_CHUNK_TENSORS * chunk * c.vocab_size as u64 * model::LOGITS_BYTES;
    // The final norm's output, kept for the LM head backward, and the gradient flowing back.
    let final_hidden = rows * h * cb;
    let residual_grad = rows * h * cb;

    let opt_place = if o.optim.is_paged() {
        Place::Host
    } else {
        Place::Device
    };
    let comp = |name, bytes, place, transient, note: String| Component {
        name,
        bytes,
        place,
        transient,
        note,
    };
    let ck = o.gradient_checkpointing;
    let mut components = vec![
        comp(
            "base linears",
            linear_codes,
            Place::Device,
            false,
            format!(
                "{} decoder linears as {} (codes only)",
                linears.len() * c.num_hidden_layers,
                o.quantize
            ),
        ),
        comp(
            "quant constants",
            linear_total - linear_codes,
            Place::Device,
            false,
            "absmax/scales/zeros, double-quant, code tables".into(),
        ),
        comp(
            "base other",
            other_params * cb,
            Place::Device,
            false,
            format!(
                "embeddings{}, norms in the compute dtype",
                if c.tie_word_embeddings {
                    " (tied)"
                } else {
                    ", lm_head"
                }
            ),
        ),
        comp(
            "lora params",
            lora_params * model::LORA_MASTER_BYTES,
            Place::Device,
            false,
            format!("{lora_params} params, f32"),
        ),
        comp(
            "lora grads",
            lora_params * model::LORA_MASTER_BYTES,
            Place::Device,
            false,
            "f32".into(),
        ),
        comp(
            "optimizer state",
            opt_bytes,
            opt_place,
            false,
            format!(
                "{}{}",
                o.optim.name(),
                if o.optim.is_8bit() {
                    format!(": 8-bit + f32 absmax per {BNB_BLOCK}; {small} tensors < {MIN_8BIT_SIZE} elements stay 32-bit")
                } else {
                    ": 2 × f32 per param".into()
                }
            ),
        ),
        comp(
            "optimizer step",
            model::OPTIMIZER_STEP_COPIES * lora_params * model::LORA_MASTER_BYTES,
            Place::Host,
            true,
            "f32 host copies of the params, their gradients and the updated params while the optimizer runs".into(),
        ),
        comp(
            "activations",
            if ck {
                layers * layer_input + final_hidden
            } else {
                layers * layer_saved + final_hidden
            },
            Place::Device,
            false,
            if ck {
                "each layer's input (checkpointed) + final norm output".into()
            } else {
                "per layer: input, norms, q, attention probs (f32), attention output, residual, MLP, LoRA x·Aᵀ (+ dropout)".into()
            },
        ),
        comp(
            "kv",
            if ck { 0 } else { layers * layer_kv },
            Place::Device,
            false,
            "K/V after RoPE saved for the attention backward".into(),
        ),
    ];
    let backward = if ck {
        layer_saved + layer_kv + layer_grads + residual_grad
    } else {
        layer_grads + residual_grad
    };
    components.push(comp(
        "layer backward",
        backward,
        Place::Device,
        true,
        if ck {
            "one layer recomputed (activations + K/V) + its gradients".into()
        } else {
            "one layer's gradients".into()
        },
    ));
    components.push(comp(
        "logits/loss",
        logits,
        Place::Device,
        true,
        format!(
            "{} f32 [{chunk} rows × vocab {}] tensors at once (chunked loss)",
            model::LOSS_CHUNK_TENSORS,
            c.vocab_size
        ),
    ));
    let resident: u64 = components
        .iter()
        .filter(|x| x.place == Place::Device && !x.transient)
        .map(|x| x.bytes)
        .sum();
    let phase = |place: Place| {
        components
            .iter()
            .filter(|x| x.transient && x.place == place)
            .map(|x| x.bytes)
            .max()
            .unwrap_or(0)
    };
    let host = components
        .iter()
        .filter(|x| x.place == Place::Host && !x.transient)
        .map(|x| x.bytes)
        .sum::<u64>()
        + phase(Place::Host);
    let phase = phase(Place::Device);
    Ok(Estimate {
        model: model.to_string(),
        quantize: o.quantize.clone(),
        optim: o.optim.name(),
        r: o.r,
        lora_alpha: o.lora_alpha,
        lora_dropout: o.lora_dropout,
        target_modules: o.targets.describe(),
        batch_size: o.batch_size,
        seq_len: o.seq_len,
        gradient_checkpointing: ck,
        compute_bytes: cb,
        lora_modules: targeted.len() * c.num_hidden_layers,
        lora_params,
        small_tensors_32bit: small,
        components,
        device_peak: resident + phase,
        host,
    })
}

/// Bytes of a linear's codes alone (the rest of `linear_bytes` is constants and packing).
fn code_bytes(method: &str, numel: u64, cb: u64) -> u64 {
    match method {
        "none" => numel * cb,
        "bf16" => numel * 2,
        "bitsandbytes" | "eetq" | "fp8" => numel,
        "hqq-3bit" => (numel * 3).div_ceil(8),
        "hqq-2bit" => numel.div_ceil(4),
        // The 4-bit formats: nf4, fp4, hqq-4bit, awq, gptq, compressed-tensors.
        _ => numel.div_ceil(2),
    }
}

impl Estimate {
    /// The table `lorq estimate` prints.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: r={} ({} modules, {} LoRA params), {} target, batch {} × seq {}, {}, {}, checkpointing {}, {}-byte compute",
            self.model,
            self.r,
            self.lora_modules,
            self.lora_params,
            self.target_modules,
            self.batch_size,
            self.seq_len,
            self.quantize,
            self.optim,
            if self.gradient_checkpointing { "on" } else { "off" },
            self.compute_bytes
        );
        let _ = writeln!(
            s,
            "{:<16} {:>16} {:>11}  {:<7} note",
            "component", "bytes", "size", "where"
        );
        for c in &self.components {
            let place = match c.place {
                Place::Device => "device",
                Place::Host => "host",
            };
            let _ = writeln!(
                s,
                "{:<16} {:>16} {:>11}  {:<7} {}{}",
                c.name,
                c.bytes,
                select::format_size(c.bytes),
                place,
                if c.transient { "(transient) " } else { "" },
                c.note
            );
        }
        let _ = writeln!(
            s,
            "{:<16} {:>16} {:>11}  device  resident + the larger transient",
            "device peak",
            self.device_peak,
            select::format_size(self.device_peak)
        );
        let _ = writeln!(
            s,
            "{:<16} {:>16} {:>11}  host",
            "host",
            self.host,
            select::format_size(self.host)
        );
        s
    }
}
