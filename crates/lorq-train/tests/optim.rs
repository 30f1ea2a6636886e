//! Optimizers, LR schedules and grad clipping against the reference libraries' own outputs
//! (fixtures/train/optim, made by fixtures/train/make_optim_fixtures.py: torch AdamW, transformers
//! schedules and clip_grad_norm_ on CPU; bitsandbytes AdamW(optim_bits=8) on a CUDA GPU).

use candle_core::{DType, Device, Tensor};
use lorq_train::optim::{
    build_optimizer, clip_grad_norm, lr_at, qmap, AdamWConfig, LrSchedulerKind, Optimizer,
    OptimizerKind,
};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/train/optim")
}

fn load_st(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join(name), &Device::Cpu).unwrap()
}

fn load_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join(name)).unwrap()).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest |a - b| / max(|b|, floor) over the elements.
fn max_rel(a: &[f32], b: &[f32], floor: f32) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / (y.abs().max(floor) as f64))
        .fold(0.0, f64::max)
}

/// Largest |a - b| relative to max(|b|, a tenth of the tensor's largest |b|): the CUDA kernel's
/// fused multiply-adds round differently where `m*beta + (1-beta)*g` cancels.
fn max_rel_scaled(a: &[f32], b: &[f32]) -> f64 {
    let top = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    max_rel(a, b, 0.1 * top)
}

fn cfg_from(v: &serde_json::Value) -> AdamWConfig {
    AdamWConfig {
        beta1: v["beta1"].as_f64().unwrap(),
        beta2: v["beta2"].as_f64().unwrap(),
        eps: v["eps"].as_f64().unwrap(),
        weight_decay: v["weight_decay"].as_f64().unwrap(),
    }
}

fn lrs(meta: &serde_json::Value) -> Vec<f64> {
    meta["lrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn inputs(
    t: &HashMap<String, Tensor>,
    nparams: usize,
    nsteps: usize,
) -> (Vec<Tensor>, Vec<Vec<Tensor>>) {
    let params = (0..nparams)
        .map(|i| t[&format!("init.p{i}")].clone())
        .collect();
    let grads = (0..nsteps)
        .map(|s| {
            (0..nparams)
                .map(|i| t[&format!("grad.s{s}.p{i}")].clone())
                .collect()
        })
        .collect();
    (params, grads)
}

fn state_map(opt: &dyn Optimizer) -> HashMap<String, Tensor> {
    opt.state_dict().unwrap().into_iter().collect()
}

#[test]
fn adamw_matches_torch() {
    let t = load_st("adamw.safetensors");
    let meta = load_json("adamw.json");
    let lrs = lrs(&meta);
    let nparams = meta["shapes"].as_array().unwrap().len();
    for (name, cfg) in meta["configs"].as_object().unwrap() {
        let cfg = cfg_from(cfg);
        assert!(cfg.weight_decay > 0.0);
        let (mut params, grads) = inputs(&t, nparams, lrs.len());
        let mut opt = build_optimizer(OptimizerKind::AdamW, cfg, &params).unwrap();
        let (mut worst_p, mut worst_s) = (0f64, 0f64);
        for (s, &lr) in lrs.iter().enumerate() {
            opt.step(&mut params, &grads[s], lr).unwrap();
            let st = state_map(opt.as_ref());
            for (i, p) in params.iter().enumerate() {
                let want = f32s(&t[&format!("{name}.s{s}.p{i}")]);
                worst_p = worst_p.max(max_rel(&f32s(p), &want, 1e-3));
                for key in ["exp_avg", "exp_avg_sq"] {
                    let want = f32s(&t[&format!("{name}.s{s}.{key}{i}")]);
                    let got = f32s(&st[&format!("state.{i}.{key}")]);
                    worst_s = worst_s.max(max_rel(&got, &want, 1e-30));
                }
            }
        }
        eprintln!("adamw config {name}: max rel err params {worst_p:.2e}, states {worst_s:.2e}");
        assert!(
            worst_p <= 1e-6,
            "config {name}: params off by {worst_p:e} relative"
        );
        assert!(
            worst_s <= 1e-6,
            "config {name}: states off by {worst_s:e} relative"
        );
    }
}

#[test]
fn dynamic_maps_are_bitsandbytes() {
    let t = load_st("bnb8.safetensors");
    assert_eq!(f32s(&t["qmap.signed"]), qmap::signed().to_vec());
    assert_eq!(f32s(&t["qmap.unsigned"]), qmap::unsigned().to_vec());
}

/// bitsandbytes AdamW(optim_bits=8) as run on an H100. The GPU kernel is built with --use_fast_math
/// (approximate division, sqrt and powf, fused multiply-adds), so the CPU port agrees to a few f32
/// ulps in each moment; a quantized moment right at a midpoint between two codes can then round to
/// the neighbouring code. Codes must be equal or one apart, and rarely apart. An off-by-one code
/// moves that moment by one code spacing (at most ~1/(2*64) of the block's absmax in the top
/// decade of the map), which changes that element's later updates by a bounded fraction of lr.
/// Relative rounding allowed on a param itself (a few f32 ulps).
const PARAM_REL: f64 = 3e-7;
/// Relative error of the GPU's bias corrections: `__powf` (ex2/lg2.approx) then `1 - beta2^t`
/// cancels ~3 digits, so bnb's step_size is off by up to ~1e-4 relative (measured: 3e-5). Each
/// element's update (which 8-bit moments can make large where the second moment's code is 0)
/// is therefore off by that fraction of itself; errors carry to the next step.
const POWF_REL: f64 = 2e-4;

/// bitsandbytes AdamW(optim_bits=8) as run on an H100. The GPU kernel is built with --use_fast_math
/// (approximate division, sqrt and powf, fused multiply-adds), so the CPU port agrees to a few f32
/// ulps in each moment; a quantized moment right at a midpoint between two codes may then round to
/// the neighbouring code. Codes must be equal or one apart, and rarely apart (the GPU run gave none
/// apart); absmax to a few ulps; each param within its accumulated budget of rounding plus
/// POWF_REL of each update it took.
#[test]
fn adamw_8bit_matches_bitsandbytes() {
    let t = load_st("bnb8.safetensors");
    let meta = load_json("bnb8.json");
    let cfg = cfg_from(&meta);
    let lrs = lrs(&meta);
    let shapes = meta["shapes"].as_array().unwrap();
    let (mut params, grads) = inputs(&t, shapes.len(), lrs.len());
    assert!(params
        .iter()
        .any(|p| p.elem_count() >= 4096 && p.elem_count() % 256 != 0));
    assert!(params.iter().any(|p| p.elem_count() < 4096));
    let mut opt = build_optimizer(OptimizerKind::AdamW8bit, cfg, &params).unwrap();
    let mut prev_ref: Vec<Vec<f32>> = params.iter().map(f32s).collect();
    let mut budget: Vec<Vec<f64>> = params.iter().map(|p| vec![0.0; p.elem_count()]).collect();
    // Elements whose codes ever differed from bnb's: their later moments legitimately differ.
    let mut flipped: Vec<Vec<bool>> = params.iter().map(|p| vec![false; p.elem_count()]).collect();
    for (s, &lr) in lrs.iter().enumerate() {
        opt.step(&mut params, &grads[s], lr).unwrap();
        let st = state_map(opt.as_ref());
        for (i, p) in params.iter().enumerate() {
            let got_p = f32s(p);
            let want_p = f32s(&t[&format!("s{s}.p{i}")]);
            let n = p.elem_count();
            if n < 4096 {
                // bnb's 32-bit kernel: the moments only rounding apart.
                let e1 = max_rel_scaled(
                    &f32s(&st[&format!("state.{i}.exp_avg")]),
                    &f32s(&t[&format!("s{s}.state1.p{i}")]),
                );
                let e2 = max_rel_scaled(
                    &f32s(&st[&format!("state.{i}.exp_avg_sq")]),
                    &f32s(&t[&format!("s{s}.state2.p{i}")]),
                );
                eprintln!(
                    "step {s} p{i} (32-bit state): rel err exp_avg {e1:.2e}, exp_avg_sq {e2:.2e}"
                );
                assert!(e1 <= 1e-6 && e2 <= 1e-6, "step {s} param {i}");
            } else {
                let mut off_codes = 0usize;
                for key in ["state1", "state2"] {
                    let got = u8s(&st[&format!("state.{i}.{key}")]);
                    let want = u8s(&t[&format!("s{s}.{key}.p{i}")]);
                    for (j, (&a, &b)) in got.iter().zip(&want).enumerate() {
                        let d = (a as i32 - b as i32).abs();
                        assert!(d <= 1, "step {s} param {i} {key}[{j}]: code {a} vs bnb {b}");
                        if d != 0 {
                            off_codes += 1;
                            flipped[i][j] = true;
                        }
                    }
                }
                for key in ["absmax1", "absmax2"] {
                    let e = max_rel(
                        &f32s(&st[&format!("state.{i}.{key}")]),
                        &f32s(&t[&format!("s{s}.{key}.p{i}")]),
                        1e-30,
                    );
                    eprintln!("step {s} p{i}: {key} rel err {e:.2e}");
                    assert!(e <= 1e-6, "step {s} param {i} {key} off by {e:e}");
                }
                eprintln!("step {s} p{i}: {off_codes}/{} codes one apart", 2 * n);
                assert!(
                    off_codes * 1000 <= 2 * n,
                    "step {s} param {i}: {off_codes} codes differ"
                );
            }
            let (mut worst, mut worst_frac) = (0f64, 0f64);
            for j in 0..n {
                let (g, w, w0) = (got_p[j] as f64, want_p[j] as f64, prev_ref[i][j] as f64);
                budget[i][j] += PARAM_REL * w.abs() + POWF_REL * (w - w0).abs();
                if flipped[i][j] {
                    continue;
                }
                let e = (g - w).abs();
                worst = worst.max(e);
                worst_frac = worst_frac.max(e / budget[i][j].max(f64::MIN_POSITIVE));
                assert!(
                    e <= budget[i][j],
                    "step {s} param {i}[{j}]: {g} vs bnb {w} (budget {:e})",
                    budget[i][j]
                );
            }
            eprintln!("step {s} p{i}: params max abs err {worst:.2e}, at most {worst_frac:.2} of the budget");
            prev_ref[i] = want_p;
        }
    }
}

fn run_steps(
    kind: OptimizerKind,
    cfg: AdamWConfig,
    params: &[Tensor],
    grads: &[Vec<Tensor>],
    lrs: &[f64],
) -> (Vec<Tensor>, HashMap<String, Tensor>, usize) {
    let mut params = params.to_vec();
    let mut opt = build_optimizer(kind, cfg, &params).unwrap();
    for (g, &lr) in grads.iter().zip(lrs) {
        opt.step(&mut params, g, lr).unwrap();
    }
    (params, state_map(opt.as_ref()), opt.state_bytes())
}

fn assert_bitwise(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dtype(), b.dtype(), "{what}");
    assert_eq!(a.dims(), b.dims(), "{what}");
    let (x, y) = if a.dtype() == DType::U8 {
        (
            u8s(a).iter().map(|&v| v as u32).collect::<Vec<_>>(),
            u8s(b).iter().map(|&v| v as u32).collect(),
        )
    } else if a.dtype() == DType::I64 {
        (
            vec![a.to_scalar::<i64>().unwrap() as u32],
            vec![b.to_scalar::<i64>().unwrap() as u32],
        )
    } else {
        (
            f32s(a).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            f32s(b).iter().map(|v| v.to_bits()).collect(),
        )
    };
    assert!(x == y, "{what} differs");
}

#[test]
fn paged_equals_unpaged_bitwise() {
    let t = load_st("bnb8.safetensors");
    let meta = load_json("bnb8.json");
    let cfg = cfg_from(&meta);
    let lrs = lrs(&meta);
    let (params, grads) = inputs(&t, 3, lrs.len());
    for (plain, paged) in [(OptimizerKind::AdamW8bit, OptimizerKind::PagedAdamW8bit)] {
        let (pa, sa, ba) = run_steps(plain, cfg, &params, &grads, &lrs);
        let (pb, sb, bb) = run_steps(paged, cfg, &params, &grads, &lrs);
        for (i, (a, b)) in pa.iter().zip(&pb).enumerate() {
            assert_bitwise(
                a,
                b,
                &format!("{} vs {} param {i}", plain.name(), paged.name()),
            );
        }
        assert_eq!(sa.len(), sb.len());
        for (k, a) in &sa {
            assert_bitwise(
                a,
                &sb[k],
                &format!("{} vs {} {k}", plain.name(), paged.name()),
            );
        }
        assert_eq!(ba, bb);
    }
    // paged_adamw_32bit is bitsandbytes' 32-bit kernel (HF's PagedAdamW32bit): on the param under
    // 4096 elements, where bnb's 8-bit optimizer runs that same kernel, the two agree bitwise.
    let (p32, _, _) = run_steps(OptimizerKind::PagedAdamW32bit, cfg, &params, &grads, &lrs);
    let (p8, _, _) = run_steps(OptimizerKind::AdamW8bit, cfg, &params, &grads, &lrs);
    assert_eq!(params[1].elem_count(), 1024);
    assert_bitwise(
        &p32[1],
        &p8[1],
        "paged_adamw_32bit vs bnb's 32-bit path of adamw_8bit",
    );
    // 8-bit state: 2 bytes per element of big params + 2 f32 absmax per 256-block; 8 bytes per
    // element of the small param.
    let (_, _, b8) = run_steps(
        OptimizerKind::PagedAdamW8bit,
        cfg,
        &params,
        &grads,
        &lrs[..1],
    );
    assert_eq!(b8, 2 * 6600 + 8 * 26 + 8 * 1024 + 2 * 4096 + 8 * 16);
    let (_, _, b32) = run_steps(
        OptimizerKind::PagedAdamW32bit,
        cfg,
        &params,
        &grads,
        &lrs[..1],
    );
    assert_eq!(b32, 8 * (6600 + 1024 + 4096));
}

#[test]
fn state_dict_round_trip_continues_identically() {
    let t = load_st("bnb8.safetensors");
    let meta = load_json("bnb8.json");
    let cfg = cfg_from(&meta);
    let lrs = lrs(&meta);
    let (params0, grads) = inputs(&t, 3, lrs.len());
    let dir = tempfile::tempdir().unwrap();
    for kind in OptimizerKind::ALL {
        let mut params = params0.clone();
        let mut opt = build_optimizer(kind, cfg, &params).unwrap();
        for s in 0..2 {
            opt.step(&mut params, &grads[s], lrs[s]).unwrap();
        }
        // Through a safetensors file, as a checkpoint would go.
        let path = dir.path().join(format!("{}.safetensors", kind.name()));
        let sd: HashMap<String, Tensor> = state_map(opt.as_ref());
        candle_core::safetensors::save(&sd, &path).unwrap();
        let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let mut resumed = build_optimizer(kind, cfg, &params0).unwrap();
        resumed.load_state_dict(&loaded).unwrap();
        assert_eq!(resumed.steps(), 2);
        let mut params2 = params.clone();
        opt.step(&mut params, &grads[2], lrs[2]).unwrap();
        resumed.step(&mut params2, &grads[2], lrs[2]).unwrap();
        for (i, (a, b)) in params.iter().zip(&params2).enumerate() {
            assert_bitwise(a, b, &format!("{} resumed param {i}", kind.name()));
        }
        let (sa, sb) = (state_map(opt.as_ref()), state_map(resumed.as_ref()));
        for (k, a) in &sa {
            assert_bitwise(a, &sb[k], &format!("{} resumed {k}", kind.name()));
        }
    }
}

#[test]
fn load_state_dict_rejects_bad_state() {
    let p = vec![Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap()];
    let mut opt = build_optimizer(OptimizerKind::AdamW, AdamWConfig::default(), &p).unwrap();
    let good = state_map(opt.as_ref());

    let mut missing = good.clone();
    missing.remove("state.0.exp_avg_sq");
    let e = opt.load_state_dict(&missing).unwrap_err().to_string();
    assert!(e.contains("missing tensor `state.0.exp_avg_sq`"), "{e}");

    let mut bad_shape = good.clone();
    bad_shape.insert(
        "state.0.exp_avg".into(),
        Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = opt.load_state_dict(&bad_shape).unwrap_err().to_string();
    assert!(
        e.contains("state.0.exp_avg") && e.contains("[3, 4]") && e.contains("[4, 3]"),
        "{e}"
    );

    let mut extra = good.clone();
    extra.insert(
        "state.1.exp_avg".into(),
        Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = opt.load_state_dict(&extra).unwrap_err().to_string();
    assert!(e.contains("unexpected tensor `state.1.exp_avg`"), "{e}");

    // A 32-bit checkpoint does not load into the 8-bit optimizer of a big param.
    let big = vec![Tensor::zeros(5000, DType::F32, &Device::Cpu).unwrap()];
    let sd32 = state_map(
        build_optimizer(OptimizerKind::AdamW, AdamWConfig::default(), &big)
            .unwrap()
            .as_ref(),
    );
    let mut o8 = build_optimizer(OptimizerKind::AdamW8bit, AdamWConfig::default(), &big).unwrap();
    let e = o8.load_state_dict(&sd32).unwrap_err().to_string();
    assert!(e.contains("missing tensor `state.0.state1`"), "{e}");

    opt.load_state_dict(&good).unwrap();
}

#[test]
fn step_rejects_mismatched_inputs() {
    let dev = Device::Cpu;
    let mut params = vec![
        Tensor::zeros((4, 3), DType::F32, &dev).unwrap(),
        Tensor::zeros(7, DType::F32, &dev).unwrap(),
    ];
    let before = f32s(&params[1]);
    let mut opt =
        build_optimizer(OptimizerKind::AdamW8bit, AdamWConfig::default(), &params).unwrap();
    let grads = vec![
        Tensor::ones((4, 3), DType::F32, &dev).unwrap(),
        Tensor::ones(8, DType::F32, &dev).unwrap(),
    ];
    let e = opt.step(&mut params, &grads, 1e-3).unwrap_err().to_string();
    assert!(
        e.contains("grad 1") && e.contains("[8]") && e.contains("[7]"),
        "{e}"
    );
    assert_eq!(opt.steps(), 0);
    assert_eq!(f32s(&params[1]), before);

    let e = opt
        .step(&mut params, &grads[..1], 1e-3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 params") && e.contains("1 grads"), "{e}");

    let bf16 = vec![Tensor::zeros(3, DType::BF16, &dev).unwrap()];
    assert!(build_optimizer(OptimizerKind::AdamW, AdamWConfig::default(), &bf16).is_err());

    let bad = AdamWConfig {
        beta2: 1.0,
        ..AdamWConfig::default()
    };
    let e = build_optimizer(OptimizerKind::AdamW, bad, &params)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("adam_beta2"), "{e}");
}

#[test]
fn optimizer_names() {
    for (s, k) in [
        ("adamw", OptimizerKind::AdamW),
        ("adamw_torch", OptimizerKind::AdamW),
        ("adamw_8bit", OptimizerKind::AdamW8bit),
        ("adamw_bnb_8bit", OptimizerKind::AdamW8bit),
        ("paged_adamw_32bit", OptimizerKind::PagedAdamW32bit),
        ("paged_adamw_8bit", OptimizerKind::PagedAdamW8bit),
    ] {
        assert_eq!(OptimizerKind::parse(s).unwrap(), k);
    }
    for k in OptimizerKind::ALL {
        assert_eq!(OptimizerKind::parse(k.name()).unwrap(), k);
    }
    let e = OptimizerKind::parse("sgd").unwrap_err().to_string();
    assert!(
        e.contains("`sgd`") && e.contains("adamw, adamw_8bit, paged_adamw_32bit, paged_adamw_8bit"),
        "{e}"
    );
    for k in LrSchedulerKind::ALL {
        assert_eq!(LrSchedulerKind::parse(k.name()).unwrap(), k);
    }
    let e = LrSchedulerKind::parse("polynomial")
        .unwrap_err()
        .to_string();
    assert!(e.contains("constant_with_warmup"), "{e}");
}

#[test]
fn schedules_match_transformers() {
    let meta = load_json("schedules.json");
    let base = meta["base_lr"].as_f64().unwrap();
    let mut checked = 0;
    for case in meta["cases"].as_array().unwrap() {
        let kind = LrSchedulerKind::parse(case["name"].as_str().unwrap()).unwrap();
        let warmup = case["warmup"].as_u64().unwrap() as usize;
        let total = case["total"].as_u64().unwrap() as usize;
        for (step, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = lr_at(kind, base, step, warmup, total);
            assert!(
                (got - want).abs() <= 1e-12 * base,
                "{} warmup {warmup} total {total} step {step}: {got} vs {want}",
                kind.name()
            );
            checked += 1;
        }
    }
    assert!(checked > 100);
}

#[test]
fn clip_matches_torch() {
    let t = load_st("clip.safetensors");
    let meta = load_json("clip.json");
    let norms = meta["total_norms"].as_array().unwrap();
    for (c, mx) in meta["max_norms"].as_array().unwrap().iter().enumerate() {
        let mut grads: Vec<Tensor> = (0..3).map(|i| t[&format!("in.g{i}")].clone()).collect();
        let total = clip_grad_norm(&mut grads, mx.as_f64().unwrap()).unwrap();
        let want = norms[c].as_f64().unwrap();
        assert!(
            (total - want).abs() <= 1e-6 * want,
            "case {c}: norm {total} vs {want}"
        );
        for (i, g) in grads.iter().enumerate() {
            let e = max_rel(&f32s(g), &f32s(&t[&format!("c{c}.g{i}")]), 1e-6);
            assert!(e <= 1e-6, "case {c} grad {i}: off by {e:e}");
        }
    }
    // The big max_norm leaves the grads untouched.
    let mut grads: Vec<Tensor> = (0..3).map(|i| t[&format!("in.g{i}")].clone()).collect();
    clip_grad_norm(&mut grads, 1000.0).unwrap();
    for (i, g) in grads.iter().enumerate() {
        assert_bitwise(g, &t[&format!("in.g{i}")], "unclipped grad");
    }
}
