//! Sliding-window perplexity (`lorq_model::perplexity`) against transformers' per-token log-probs
//! (one window covering the prompt) and against an independent token-by-token computation (the
//! window bookkeeping with small windows).

mod common;

use common::*;
use lorq_model::perplexity::{sliding_window_nll, windows};
use lorq_model::{BatchItem, LoadedModel, LogitsWanted};

const TEXT: &str =
    "Once upon a time there was a little girl who lived in a village near the forest. \
Whenever she went out, the little girl wore a red riding cloak, so everyone in the village called \
her Little Red Riding Hood.";

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// With a window at least as long as the prompt, the NLL is minus the sum of transformers'
/// log-probs, for the base model and for every adapter of the fixture.
#[test]
fn one_window_equals_transformers_logprobs() {
    let m = load("llama");
    let reference = reference("llama");
    let mut checked = 0;
    for run in reference["runs"].as_array().unwrap() {
        let adapter = run["adapter_dir"]
            .as_str()
            .map(|d| m.load_adapter(&fixtures().join("llama").join(d)).unwrap());
        for p in run["prompts"].as_array().unwrap() {
            let ids = ids(&p["input_ids"]);
            let want: f64 = -floats(&p["logprobs"])
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>();
            for (ctx, stride) in [(ids.len(), ids.len()), (64, 32), (256, 1)] {
                let mut calls = 0;
                let r = sliding_window_nll(
                    &m.model,
                    &ids,
                    adapter.clone(),
                    ctx,
                    stride,
                    |done, all| {
                        calls += 1;
                        assert_eq!((done, all), (ids.len() - 1, ids.len() - 1));
                    },
                )
                .unwrap();
                assert_eq!(calls, 1);
                assert_eq!(r.windows, 1);
                assert_eq!(r.tokens, ids.len() - 1);
                assert!(
                    relative(r.nll, want) < 1e-4,
                    "adapter {:?}, {:?}: nll {} vs transformers {want}",
                    run["adapter"],
                    p["prompt"],
                    r.nll
                );
                assert!(relative(r.ppl, (want / (ids.len() - 1) as f64).exp()) < 1e-4);
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} prompts checked");
}

/// log p(ids[t] | ids[begin..t]) from its own forward pass.
fn logprob(m: &LoadedModel, ids: &[u32], begin: usize, t: usize) -> f64 {
    let mut cache = m.model.new_cache();
    let logits = m
        .model
        .forward(&mut [BatchItem {
            tokens: &ids[begin..t],
            cache: &mut cache,
            adapter: None,
            logits: LogitsWanted::Last,
        }])
        .unwrap();
    let row: Vec<f32> = logits[0].squeeze(0).unwrap().to_vec1().unwrap();
    let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln() + mx;
    row[ids[t] as usize] as f64 - lse
}

/// Small windows: every token from the second on is scored exactly once, with the context of the
/// first window (windows start at 0, stride, 2·stride, …) whose end lies past it.
#[test]
fn small_windows_score_every_token_once_with_its_window_context() {
    let m = load("llama");
    let ids = m.tokenizer.encode(TEXT).unwrap();
    let n = ids.len();
    assert!(n > 60, "{n} tokens");
    for (ctx, stride) in [(16, 8), (16, 5), (10, 9), (7, 1), (12, 12)] {
        // Independent reference: token t is scored in window k = the first with
        // min(k·stride + ctx, n) > t, from the context ids[k·stride..t].
        let mut want = 0f64;
        let mut count = 0;
        for t in 1..n {
            let k = (0..).find(|k| (k * stride + ctx).min(n) > t).unwrap();
            let begin = k * stride;
            if begin == t {
                continue; // stride == ctx: a window's first token has no context
            }
            want -= logprob(&m, &ids, begin, t);
            count += 1;
        }
        let mut last = (0, 0);
        let mut steps = 0;
        let r = sliding_window_nll(&m.model, &ids, None, ctx, stride, |done, all| {
            assert!(done > last.0 && all == count);
            last = (done, all);
            steps += 1;
        })
        .unwrap();
        assert_eq!(r.tokens, count, "ctx {ctx} stride {stride}");
        assert_eq!(last, (count, count));
        assert_eq!(steps, r.windows);
        assert_eq!(r.windows, (n - ctx).div_ceil(stride) + 1);
        if stride < ctx {
            assert_eq!(r.tokens, n - 1, "ctx {ctx} stride {stride}");
        } else {
            assert_eq!(r.tokens, n - r.windows);
        }
        assert!(
            relative(r.nll, want) < 1e-5,
            "ctx {ctx} stride {stride}: {} vs {want}",
            r.nll
        );
        assert!(relative(r.ppl, (want / count as f64).exp()) < 1e-5);
        // Smaller windows see less context than one window over everything.
        let full = sliding_window_nll(&m.model, &ids, None, n, n, |_, _| {}).unwrap();
        assert_ne!(r.nll, full.nll);
    }
}

#[test]
fn window_plan_matches_the_transformers_loop() {
    // transformers: for begin in range(0, n, stride): end = min(begin + ctx, n);
    // trg_len = end - prev_end; …; break when end == n.
    let w = windows(10, 4, 3).unwrap();
    let got: Vec<_> = w.iter().map(|w| (w.begin, w.end, w.first)).collect();
    assert_eq!(got, [(0, 4, 1), (3, 7, 4), (6, 10, 7)]);
    let w = windows(11, 4, 3).unwrap();
    let got: Vec<_> = w.iter().map(|w| (w.begin, w.end, w.first)).collect();
    assert_eq!(got, [(0, 4, 1), (3, 7, 4), (6, 10, 7), (9, 11, 10)]);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let m = load("llama");
    let ids = m.tokenizer.encode(TEXT).unwrap();
    for (ids, ctx, stride, needle) in [
        (&ids[..], 16, 0, "stride"),
        (&ids[..], 16, 17, "stride"),
        (&ids[..], 1, 1, "context length"),
        (&ids[..1], 16, 8, "at least 2 tokens"),
        (&ids[..0], 16, 8, "at least 2 tokens"),
    ] {
        let e = sliding_window_nll(&m.model, ids, None, ctx, stride, |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
}
