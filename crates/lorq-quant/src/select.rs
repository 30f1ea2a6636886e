//! Which quantization method to use: the decision behind `lorq plan` and `--quantize auto`.
//!
//! LoRAX's heuristics, in order: a pre-quantized checkpoint's own format first (AWQ, GPTQ,
//! bitsandbytes, hqq, fp8, compressed-tensors); FP8 on compute capability ≥ 8.9 (native e4m3
//! tensor cores; on the CPU and on older GPUs it is emulated: available, not preferred); EETQ for
//! 8 bits at runtime (LoRAX needs CUDA for it, lorq runs it on the CPU too); HQQ for 2–3 bits;
//! bitsandbytes last.
//!
//! `--quantize auto`: the checkpoint's own format if it is pre-quantized; otherwise `none` unless a
//! memory budget is given, then the highest-quality method whose weights plus the reserve fit.
//!
//! Quality ranks come from measured WikiText-2 test perplexity of SmolLM2-135M (lorq, ctx 512,
//! stride 256; see `docs/benchmarks.md`):
//!
//! | method | ppl |
//! | --- | --- |
//! | none | 23.37 |
//! | eetq | 23.40 |
//! | bitsandbytes | 23.835 |
//! | fp8 | 23.836 |
//! | bitsandbytes-nf4 | 27.79 |
//! | hqq-4bit | 27.99 |
//! | bitsandbytes-fp4 | 31.06 |
//! | hqq-3bit | 196.0 |
//! | hqq-2bit | 30279 |
//!
//! `bf16` (dense bf16 weights) and `awq`/`gptq` (calibrated, pre-quantized only) were not measured.
//!
//! Weight bytes are computed per format from its stored layout, the same sums as each
//! `QuantTensor::bytes()`; this module is pure (no model loading) so `lorq-quant` stays below
//! `lorq-model`.

use crate::method::QuantMethod;

/// The shapes that decide a model's footprint.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShapes {
    /// Every decoder linear `[out, in]` (the weights a method quantizes).
    pub linears: Vec<(usize, usize)>,
    /// Parameters kept in the compute dtype whatever the method (embeddings, norms, `lm_head`, biases).
    pub other_params: usize,
    /// Bytes per value of the compute dtype (4 for f32, 2 for bf16/f16).
    pub compute_bytes: usize,
    /// Bytes per hqq scale/zero value: hqq keeps them in its compute dtype; lorq's just-in-time
    /// quantization keeps them in f32 (4).
    pub hqq_meta_bytes: usize,
    /// Bytes per value of the checkpoint's stored weight dtype (FP8 scales are kept in it, as
    /// compressed-tensors does).
    pub stored_bytes: usize,
    /// Bytes of the KV-cache and activation reserve added to every footprint.
    pub reserve: u64,
    /// Group size of the calibrated 4-bit formats (awq, gptq, compressed-tensors): 128 unless a
    /// pre-quantized checkpoint says otherwise; 0 = one group per row (GPTQ's `group_size: -1`).
    pub calib_group: usize,
}

impl ModelShapes {
    /// Parameters of the decoder linears.
    pub fn linear_params(&self) -> usize {
        self.linears.iter().map(|&(n, k)| n * k).sum()
    }
}

/// The KV-cache and activation reserve lorq assumes: the KV cache of one sequence of
/// `min(max_positions, 4096)` tokens in the compute dtype, plus a prefill chunk of 512 tokens'
/// activations in f32 (`4·hidden + 2·intermediate + vocab` values per token: residual, attention,
/// MLP and logits).
#[allow(clippy::too_many_arguments)]
pub fn default_reserve(
    layers: usize,
    kv_dim: usize,
    hidden: usize,
    intermediate: usize,
    vocab: usize,
    max_positions: usize,
    compute_bytes: usize,
) -> u64 {
    let tokens = max_positions.clamp(1, 4096) as u64;
    let kv = 2 * layers as u64 * kv_dim as u64 * tokens * compute_bytes as u64;
    let act = 512 * (4 * hidden + 2 * intermediate + vocab) as u64 * 4;
    kv + act
}

/// What `lorq plan` knows of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCaps {
    Cpu,
    /// A CUDA GPU with compute capability `major*10 + minor` (e.g. 90 for 9.0).
    Cuda {
        cc: u32,
    },
}

impl DeviceCaps {
    /// Parses `cpu` or `sm_XY` (`sm_90`, `sm_89`, `sm_120`); `cuda:N` needs the GPU's compute
    /// capability, which the caller reads.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "cpu" {
            return Ok(Self::Cpu);
        }
        if let Some(cc) = s.strip_prefix("sm_") {
            if let Ok(cc) = cc.parse::<u32>() {
                if cc >= 10 {
                    return Ok(Self::Cuda { cc });
                }
            }
        }
        Err(format!(
            "--device {s:?}: expected cpu, cuda:N or sm_XY (e.g. sm_90 for compute capability 9.0)"
        ))
    }

    /// FP8 on tensor cores: compute capability 8.9 (Ada) and later.
    pub fn native_fp8(self) -> bool {
        matches!(self, Self::Cuda { cc } if cc >= 89)
    }

    pub fn describe(self) -> String {
        match self {
            Self::Cpu => "cpu".into(),
            Self::Cuda { cc } => format!("cuda, compute capability {}.{}", cc / 10, cc % 10),
        }
    }
}

/// One row of the plan table: `none`, `bf16` or a `--quantize` method.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRow {
    pub method: &'static str,
    /// Bytes of the decoder linears in this method.
    pub linear_bytes: u64,
    /// Whole-model weight bytes (linears + embeddings/norms/`lm_head` in the compute dtype).
    pub weight_bytes: u64,
    /// Bits per decoder-linear weight, constants included.
    pub bits_per_weight: f64,
    /// Measured SmolLM2-135M WikiText-2 perplexity, where measured.
    pub measured_ppl: Option<f64>,
    /// 1 = best; `None` where not measured.
    pub quality_rank: Option<usize>,
    pub available: bool,
    /// How it runs on this device (native, emulated, CPU kernels, pre-quantized only, ...).
    pub availability: String,
    /// Weights plus reserve fit the budget (`None` without a budget).
    pub fits: Option<bool>,
    pub chosen: bool,
    pub reason: String,
}

/// The decision: every row, and what `--quantize auto` picks (`None` = no quantization).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub rows: Vec<PlanRow>,
    pub choice: Option<QuantMethod>,
    /// `none`, or the method's name.
    pub choice_name: &'static str,
    pub summary: String,
}

/// Measured perplexities (SmolLM2-135M, WikiText-2 test), best first.
pub const MEASURED_PPL: [(&str, f64); 9] = [
    ("none", 23.37),
    ("eetq", 23.40),
    ("bitsandbytes", 23.835),
    ("fp8", 23.836),
    ("bitsandbytes-nf4", 27.79),
    ("hqq-4bit", 27.99),
    ("bitsandbytes-fp4", 31.06),
    ("hqq-3bit", 196.0),
    ("hqq-2bit", 30279.0),
];

/// Bytes of one `[n, k]` linear in `method` (`none` = compute dtype, `bf16` = 2 bytes).
///
/// | method | layout |
/// | --- | --- |
/// | bitsandbytes-nf4 (double quant) | ⌈nk/2⌉ packed + 1 byte absmax code per 64 + f32 nested absmax per 256·64 + 256 f32 map + f32 offset + 16 f32 code table |
/// | bitsandbytes-fp4 | ⌈nk/2⌉ + f32 absmax per 64 + 16 f32 code table |
/// | bitsandbytes, eetq | nk + f32 scale per row |
/// | fp8 | nk + one scale per row in the stored weight dtype |
/// | hqq-4bit / hqq-3bit (g64), hqq-2bit (g16) | packed codes (3-bit: 10 per int32 along the group grid) + scale and zero per group |
/// | awq, gptq (4-bit, group `calib_group`, no act-order) | nk/2 + per group: n/2 bytes of packed zeros + n f16 scales |
pub fn linear_bytes(method: &str, n: usize, k: usize, s: &ModelShapes) -> u64 {
    let numel = (n * k) as u64;
    let (n64, k64) = (n as u64, k as u64);
    let calib_group = match s.calib_group {
        0 => k64.max(1),
        g => g as u64,
    };
    let hqq = |gs: u64, slots: u64, word: u64| {
        let groups = numel.div_ceil(gs);
        groups.div_ceil(slots) * word * gs + 2 * groups * s.hqq_meta_bytes as u64
    };
    match method {
        "none" => numel * s.compute_bytes as u64,
        "bf16" => numel * 2,
        "bitsandbytes-nf4" => {
            let blocks = numel.div_ceil(64);
            numel.div_ceil(2) + blocks + 4 * blocks.div_ceil(256) + 4 * 256 + 4 + 4 * 16
        }
        "bitsandbytes-fp4" => numel.div_ceil(2) + 4 * numel.div_ceil(64) + 4 * 16,
        "bitsandbytes" | "eetq" => numel + 4 * n64,
        "fp8" => numel + s.stored_bytes as u64 * n64,
        "hqq-4bit" => hqq(64, 2, 1),
        "hqq-3bit" => hqq(64, 10, 4),
        "hqq-2bit" => hqq(16, 4, 1),
        "awq" | "gptq" => {
            let groups = k64.div_ceil(calib_group);
            numel.div_ceil(2) + groups * (n64.div_ceil(8) * 4 + 2 * n64)
        }
        // Estimated as W4A16, group 128, symmetric: packed int32 codes + f16 scales per group
        // (+ the 16 bytes of shape bookkeeping its `bytes()` counts).
        "compressed-tensors" => numel.div_ceil(2) + k64.div_ceil(calib_group) * 2 * n64 + 16,
        other => panic!("linear_bytes: unknown method {other}"),
    }
}

/// Every row name: `none`, `bf16`, then [`QuantMethod::NAMES`].
pub fn row_names() -> Vec<&'static str> {
    let mut v = vec!["none", "bf16"];
    v.extend(QuantMethod::NAMES);
    v
}

/// The order `--quantize auto` tries methods in under a budget: measured quality, except that
/// fp8 moves to the head of the 8-bit methods where it is native (cc ≥ 8.9: faster, 0.4 ppl off eetq).
fn preference(dev: DeviceCaps) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = MEASURED_PPL.iter().map(|&(m, _)| m).collect();
    if dev.native_fp8() {
        v.retain(|&m| m != "fp8");
        let at = v.iter().position(|&m| m == "eetq").unwrap_or(1);
        v.insert(at, "fp8");
    }
    v
}

fn gib(b: u64) -> String {
    format_size(b)
}

/// `1.50 GiB`, `512.0 MiB`, `900 B`.
pub fn format_size(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f >= K * K * K {
        format!("{:.2} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.1} MiB", f / (K * K))
    } else if f >= K {
        format!("{:.1} KiB", f / K)
    } else {
        format!("{b} B")
    }
}

/// Parses `24GiB`, `512MiB`, `8GB`, `1.5GiB`, `1000` (bytes): binary units KiB/MiB/GiB/TiB,
/// decimal KB/MB/GB/TB, `B` or none for bytes (case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let bad = || {
        format!(
            "invalid size {s:?}: expected a number and a unit such as 24GiB, 512MiB, 8GB or 1.5GiB \
             (KiB/MiB/GiB/TiB = 1024^n, KB/MB/GB/TB = 1000^n, B = bytes)"
        )
    };
    let x: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return Err(bad()),
    };
    let v = x * mult;
    if !v.is_finite() || v < 1.0 {
        return Err(format!("invalid size {s:?}: must be at least 1 byte"));
    }
    Ok(v.round() as u64)
}

/// Builds the table and the decision. `prequantized`: the checkpoint's own `--quantize` name
/// (e.g. `awq`, `bitsandbytes-nf4`, `compressed-tensors`) when the folder is pre-quantized.
pub fn plan(
    s: &ModelShapes,
    dev: DeviceCaps,
    budget: Option<u64>,
    prequantized: Option<&str>,
) -> Result<Plan, String> {
    let numel = s.linear_params().max(1) as f64;
    let other = (s.other_params * s.compute_bytes) as u64;
    let pref = preference(dev);
    let mut names = row_names();
    if let Some(pq) = prequantized {
        if !names.contains(&pq) {
            match pq {
                // compressed-tensors `pack-quantized` has no `--quantize` name of its own.
                "compressed-tensors" => names.push("compressed-tensors"),
                other => return Err(format!("unknown pre-quantized format {other:?}")),
            }
        }
    }
    let mut rows: Vec<PlanRow> = names
        .iter()
        .copied()
        .map(|m| {
            let lb: u64 = s
                .linears
                .iter()
                .map(|&(n, k)| linear_bytes(m, n, k, s))
                .sum();
            let measured_ppl = MEASURED_PPL.iter().find(|p| p.0 == m).map(|p| p.1);
            let quality_rank = MEASURED_PPL.iter().position(|p| p.0 == m).map(|i| i + 1);
            let (available, availability) = availability(m, dev, prequantized);
            let weight_bytes = lb + other;
            PlanRow {
                method: m,
                linear_bytes: lb,
                weight_bytes,
                bits_per_weight: lb as f64 * 8.0 / numel,
                measured_ppl,
                quality_rank,
                available,
                availability,
                fits: budget.map(|b| weight_bytes + s.reserve <= b),
                chosen: false,
                reason: String::new(),
            }
        })
        .collect();

    // The decision.
    let choice_name: &'static str = if let Some(pq) = prequantized {
        names.iter().copied().find(|&m| m == pq).unwrap_or("none")
    } else if let Some(b) = budget {
        match pref.iter().find(|&&m| {
            rows.iter()
                .any(|r| r.method == m && r.available && r.fits == Some(true))
        }) {
            Some(&m) => m,
            None => {
                let smallest = rows
                    .iter()
                    .filter(|r| r.available)
                    .min_by_key(|r| r.weight_bytes)
                    .expect("none is always available");
                return Err(format!(
                    "no quantization method fits --memory-budget {}: the smallest footprint is {} at {} \
                     of weights + {} KV-cache/activation reserve = {}",
                    gib(b),
                    smallest.method,
                    gib(smallest.weight_bytes),
                    gib(s.reserve),
                    gib(smallest.weight_bytes + s.reserve)
                ));
            }
        }
    } else {
        "none"
    };

    let chosen_rank = pref.iter().position(|&m| m == choice_name);
    for r in &mut rows {
        r.chosen = r.method == choice_name;
        r.reason = reason(
            r,
            s,
            dev,
            budget,
            prequantized,
            choice_name,
            &pref,
            chosen_rank,
        );
    }
    let choice = match choice_name {
        "none" => None,
        m => QuantMethod::parse(m).ok().flatten(),
    };
    let summary = match (prequantized, budget) {
        (Some(pq), _) => format!(
            "--quantize auto would pick {pq}: the checkpoint is pre-quantized in that format"
        ),
        (None, None) => "--quantize auto would pick none: a full-precision checkpoint without \
                         --memory-budget is not quantized"
            .into(),
        (None, Some(b)) => {
            let r = rows.iter().find(|r| r.chosen).expect("a chosen row");
            format!(
                "--quantize auto would pick {}: the highest-quality method whose {} of weights + {} reserve fit {}",
                r.method,
                gib(r.weight_bytes),
                gib(s.reserve),
                gib(b)
            )
        }
    };
    Ok(Plan {
        rows,
        choice,
        choice_name,
        summary,
    })
}

fn availability(m: &str, dev: DeviceCaps, prequantized: Option<&str>) -> (bool, String) {
    if let Some(pq) = prequantized {
        return if m == pq {
            (true, "the checkpoint's own format".into())
        } else {
            (
                false,
                format!("checkpoint is pre-quantized as {pq}; other methods contradict it"),
            )
        };
    }
    match m {
        "awq" | "gptq" => (
            false,
            "pre-quantized checkpoints only (calibration-based)".into(),
        ),
        "fp8" if dev.native_fp8() => (true, "native (e4m3 tensor cores)".into()),
        "fp8" => (
            true,
            match dev {
                DeviceCaps::Cpu => "emulated on the CPU (dequantized in the kernel)".into(),
                DeviceCaps::Cuda { .. } => "emulated: compute capability < 8.9".into(),
            },
        ),
        "eetq" => (
            true,
            match dev {
                DeviceCaps::Cpu => "yes: lorq runs it on the CPU (LoRAX needs CUDA)".into(),
                DeviceCaps::Cuda { .. } => "yes".into(),
            },
        ),
        _ => (true, "yes".into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn reason(
    r: &PlanRow,
    s: &ModelShapes,
    dev: DeviceCaps,
    budget: Option<u64>,
    prequantized: Option<&str>,
    choice: &str,
    pref: &[&str],
    chosen_rank: Option<usize>,
) -> String {
    if let Some(pq) = prequantized {
        return if r.chosen {
            match budget {
                Some(_) if r.fits == Some(false) => format!(
                    "chosen: the checkpoint is pre-quantized as {pq} (over the budget, but its format is not re-quantized)"
                ),
                _ => format!("chosen: the checkpoint is pre-quantized as {pq}"),
            }
        } else {
            r.availability.clone()
        };
    }
    if r.method == "bf16" {
        return if s.compute_bytes == 2 {
            "same as none at this compute dtype; not a --quantize method".into()
        } else {
            "not a --quantize method: use --dtype bf16".into()
        };
    }
    if !r.available {
        return r.availability.clone();
    }
    if r.chosen {
        return match budget {
            None => "chosen: no --memory-budget, so no quantization".into(),
            Some(_) => {
                let mut why = "chosen: highest quality that fits".to_string();
                if r.method == "fp8" && dev.native_fp8() {
                    why.push_str(" (fp8 preferred for 8 bits: native on cc >= 8.9)");
                }
                why
            }
        };
    }
    if budget.is_none() {
        return "not chosen: without --memory-budget auto does not quantize".into();
    }
    if r.fits == Some(false) {
        return "does not fit the budget".into();
    }
    let rank = pref.iter().position(|&m| m == r.method);
    match (rank, chosen_rank) {
        (Some(a), Some(b)) if a > b => {
            let mut why = format!("fits; {choice} is preferred");
            if r.method == "bitsandbytes" {
                why.push_str(" (LLM.int8 is slow; eetq is the recommended 8-bit method)");
            } else if r.method == "fp8" && !dev.native_fp8() {
                why.push_str(" (fp8 is emulated here)");
            } else if r.method == "eetq" && dev.native_fp8() {
                why.push_str(" (fp8 is native on this GPU)");
            }
            why
        }
        _ => format!("fits; {choice} is preferred"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-like shapes (30 layers, hidden 576, 9/3 heads of 64, MLP 1536, vocab 49152, tied).
    fn smol(compute_bytes: usize, hqq_meta_bytes: usize) -> ModelShapes {
        let (h, q, kv, i) = (576, 576, 192, 1536);
        let mut linears = Vec::new();
        for _ in 0..30 {
            linears.extend([(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]);
        }
        ModelShapes {
            linears,
            other_params: 49152 * h + 61 * h,
            compute_bytes,
            hqq_meta_bytes,
            stored_bytes: 2,
            reserve: 64 << 20,
            calib_group: 128,
        }
    }

    fn row<'a>(p: &'a Plan, m: &str) -> &'a PlanRow {
        p.rows.iter().find(|r| r.method == m).unwrap()
    }

    /// A budget that fits `m`'s footprint exactly.
    fn budget_for(s: &ModelShapes, m: &str) -> u64 {
        let p = plan(s, DeviceCaps::Cpu, None, None).unwrap();
        row(&p, m).weight_bytes + s.reserve
    }

    #[test]
    fn every_method_has_a_row() {
        let p = plan(&smol(4, 4), DeviceCaps::Cpu, None, None).unwrap();
        let names: Vec<_> = p.rows.iter().map(|r| r.method).collect();
        assert_eq!(names, row_names());
        assert_eq!(names.len(), 12);
        assert_eq!(p.choice, None);
        assert_eq!(p.choice_name, "none");
        assert!(p.summary.contains("none"), "{}", p.summary);
    }

    #[test]
    fn prequantized_wins_whatever_the_budget() {
        let s = smol(2, 2);
        for budget in [None, Some(1u64 << 20), Some(1u64 << 40)] {
            let p = plan(&s, DeviceCaps::Cuda { cc: 90 }, budget, Some("awq")).unwrap();
            assert_eq!(p.choice_name, "awq");
            assert_eq!(p.choice, Some(QuantMethod::Awq));
            assert!(row(&p, "awq").chosen && row(&p, "awq").available);
            assert!(!row(&p, "eetq").available);
        }
    }

    #[test]
    fn compressed_tensors_checkpoint_gets_its_own_row() {
        let p = plan(
            &smol(2, 2),
            DeviceCaps::Cpu,
            Some(1 << 20),
            Some("compressed-tensors"),
        )
        .unwrap();
        assert_eq!(p.choice_name, "compressed-tensors");
        assert_eq!(p.choice, None);
        assert!(row(&p, "compressed-tensors").chosen);
        assert!(plan(&smol(2, 2), DeviceCaps::Cpu, None, Some("int5")).is_err());
    }

    #[test]
    fn eight_bit_budget_picks_fp8_on_hopper_and_eetq_on_cpu() {
        let s = smol(2, 2);
        let b = budget_for(&s, "eetq");
        let p = plan(&s, DeviceCaps::Cuda { cc: 90 }, Some(b), None).unwrap();
        assert_eq!(p.choice, Some(QuantMethod::Fp8), "{}", p.summary);
        assert!(row(&p, "eetq").fits == Some(true));
        let p = plan(&s, DeviceCaps::Cpu, Some(b), None).unwrap();
        assert_eq!(p.choice, Some(QuantMethod::Eetq), "{}", p.summary);
        assert!(row(&p, "fp8").reason.contains("emulated"));
        assert!(row(&p, "eetq").availability.contains("CPU"));
        let p = plan(&s, DeviceCaps::Cuda { cc: 86 }, Some(b), None).unwrap();
        assert_eq!(p.choice, Some(QuantMethod::Eetq));
    }

    #[test]
    fn three_bit_budget_picks_hqq_3bit() {
        // hqq's scale/zero in bf16: hqq-3bit is 3.2 + 0.5 bits, under nf4's ~4.13 and hqq-2bit's 4.
        let s = smol(2, 2);
        let b = budget_for(&s, "hqq-3bit");
        let p = plan(&s, DeviceCaps::Cpu, Some(b), None).unwrap();
        assert_eq!(p.choice_name, "hqq-3bit", "{}", p.summary);
        assert_eq!(row(&p, "bitsandbytes-nf4").fits, Some(false));
        assert!((row(&p, "hqq-3bit").bits_per_weight - 3.7).abs() < 0.01);
    }

    #[test]
    fn nothing_fits_names_the_smallest() {
        let s = smol(2, 2);
        let e = plan(&s, DeviceCaps::Cpu, Some(10 << 20), None).unwrap_err();
        assert!(
            e.contains("smallest footprint is hqq-3bit") && e.contains("10.0 MiB"),
            "{e}"
        );
    }

    #[test]
    fn no_budget_means_none_and_huge_budget_means_none() {
        let s = smol(4, 4);
        let p = plan(&s, DeviceCaps::Cpu, Some(1 << 40), None).unwrap();
        assert_eq!(p.choice, None);
        assert!(row(&p, "none").chosen);
    }

    #[test]
    fn bytes_follow_the_layouts() {
        let s = smol(4, 4);
        let (n, k) = (128usize, 64usize);
        let numel = (n * k) as u64;
        assert_eq!(linear_bytes("bitsandbytes", n, k, &s), numel + 4 * 128);
        assert_eq!(linear_bytes("eetq", n, k, &s), numel + 4 * 128);
        assert_eq!(linear_bytes("fp8", n, k, &s), numel + 2 * 128);
        // 128 blocks of 64 → 128 codes, 1 nested absmax, 256-entry map, offset, 16-entry table.
        assert_eq!(
            linear_bytes("bitsandbytes-nf4", n, k, &s),
            numel / 2 + 128 + 4 + 1024 + 4 + 64
        );
        assert_eq!(
            linear_bytes("bitsandbytes-fp4", n, k, &s),
            numel / 2 + 4 * 128 + 64
        );
        assert_eq!(linear_bytes("hqq-4bit", n, k, &s), numel / 2 + 2 * 128 * 4);
        assert_eq!(
            linear_bytes("hqq-3bit", n, k, &s),
            13 * 4 * 64 + 2 * 128 * 4
        );
        assert_eq!(linear_bytes("hqq-2bit", n, k, &s), numel / 4 + 2 * 512 * 4);
        assert_eq!(linear_bytes("gptq", n, k, &s), numel / 2 + (64 + 256));
        assert_eq!(linear_bytes("none", n, k, &s), numel * 4);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("8GB").unwrap(), 8_000_000_000);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("2 gib").unwrap(), 2 << 30);
        for bad in ["", "GiB", "12 parsecs", "1.2.3GiB", "-4GiB", "0GiB"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("size"), "{bad}: {e}");
        }
    }

    #[test]
    fn devices_parse() {
        assert_eq!(DeviceCaps::parse("cpu").unwrap(), DeviceCaps::Cpu);
        assert_eq!(
            DeviceCaps::parse("sm_89").unwrap(),
            DeviceCaps::Cuda { cc: 89 }
        );
        assert!(DeviceCaps::parse("sm_89").unwrap().native_fp8());
        assert!(!DeviceCaps::parse("sm_86").unwrap().native_fp8());
        assert!(DeviceCaps::parse("tpu").is_err());
    }
}
