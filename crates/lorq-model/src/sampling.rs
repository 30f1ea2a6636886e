use rand::{Rng, SeedableRng};

use crate::error::{ModelError, Result};

/// How the next token is chosen. Greedy unless `do_sample` is set or a warper (temperature ≠ 1,
/// top-k, top-p < 1, typical-p < 1) is given, as TGI/LoRAX decide; temperature 0 means greedy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingParams {
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Request(m));
        if let Some(t) = self.temperature {
            if !(t >= 0.0 && t.is_finite()) {
                return bad(format!("temperature must be >= 0, got {t}"));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if let Some(p) = self.typical_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("typical_p must be in (0, 1], got {p}"));
            }
        }
        if self.top_k == Some(0) {
            return bad("top_k must be > 0".into());
        }
        if let Some(r) = self.repetition_penalty {
            if !(r > 0.0 && r.is_finite()) {
                return bad(format!("repetition_penalty must be > 0, got {r}"));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        if self.temperature == Some(0.0) {
            return true;
        }
        let warpers = self.scaling_temperature().is_some()
            || self.top_k.is_some()
            || self.cutting_top_p().is_some()
            || self.cutting_typical_p().is_some();
        !(self.do_sample || warpers)
    }

    // The settings that change the scores (1 is none for each), as the processors apply them.

    /// The repetition penalty in effect (none for 1).
    pub fn penalty(&self) -> Option<f32> {
        self.repetition_penalty.filter(|&p| p != 1.0)
    }

    fn scaling_temperature(&self) -> Option<f32> {
        self.temperature.filter(|&t| t != 1.0)
    }

    fn cutting_top_p(&self) -> Option<f32> {
        self.top_p.filter(|&p| p < 1.0)
    }

    fn cutting_typical_p(&self) -> Option<f32> {
        self.typical_p.filter(|&p| p < 1.0)
    }
}

/// A sampled token with its log-probability under the final (processed) distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprob: f32,
}

/// One sampled draw as the GPU makes it: temperature (1: none), top-k, top-p (1: none) and the
/// uniform number in [0, 1) the draw inverts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceDraw {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: f32,
    pub u: f32,
}

/// Applies the logits processors (repetition penalty, then temperature, top-k, top-p, typical-p,
/// in transformers' order) and picks a token; seeded and reproducible.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self {
            params,
            seed,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the next token is the argmax of the (penalized) logits.
    pub fn is_greedy(&self) -> bool {
        self.params.is_greedy()
    }

    /// The repetition penalty in effect (none for 1), which [`apply_repetition_penalty`] applies
    /// before any pick.
    pub fn repetition_penalty(&self) -> Option<f32> {
        self.params.penalty()
    }

    /// Whether the GPU can draw this sampler's tokens ([`Sampler::device_draw`]): sampled (not
    /// greedy) with temperature, top-k and top-p, after the repetition penalty, but no typical-p.
    pub fn samples_on_device(&self) -> bool {
        let p = &self.params;
        !p.is_greedy() && p.cutting_typical_p().is_none()
    }

    /// The next draw for the GPU (see [`Sampler::samples_on_device`]): the processors' settings
    /// and the uniform number [`Sampler::sample`] would have drawn, from the same generator, so
    /// a seed gives the same stream of draws on either side.
    pub fn device_draw(&mut self) -> DeviceDraw {
        DeviceDraw {
            temperature: self.params.scaling_temperature().unwrap_or(1.0),
            top_k: self.params.top_k,
            top_p: self.params.cutting_top_p().unwrap_or(1.0),
            u: self.rng.random(),
        }
    }

    /// `context`: every token so far (prompt and generated), for the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Sampled {
        if self.params.is_greedy() {
            let scores = self.penalized(logits, context);
            let id = argmax(&scores);
            return Sampled {
                id: id as u32,
                logprob: log_softmax_at(&scores, id),
            };
        }
        let probs = self.probabilities(logits, context);
        invert(&probs, self.rng.random())
    }

    /// The logits after the repetition penalty.
    fn penalized(&self, logits: &[f32], context: &[u32]) -> Vec<f32> {
        let mut scores = logits.to_vec();
        if let Some(p) = self.params.penalty() {
            apply_repetition_penalty(&mut scores, p, context);
        }
        scores
    }

    /// The distribution a sampled token is drawn from: the softmax of the logits after the
    /// repetition penalty, temperature, top-k, top-p and typical-p.
    pub fn probabilities(&self, logits: &[f32], context: &[u32]) -> Vec<f32> {
        let mut scores = self.penalized(logits, context);
        if let Some(t) = self.params.scaling_temperature() {
            scores.iter_mut().for_each(|s| *s /= t);
        }
        if let Some(k) = self.params.top_k {
            top_k(&mut scores, k);
        }
        if let Some(p) = self.params.cutting_top_p() {
            top_p(&mut scores, p);
        }
        if let Some(p) = self.params.cutting_typical_p() {
            typical_p(&mut scores, p);
        }
        softmax(&scores)
    }
}

/// transformers' repetition penalty: the score `s` of every token in `context` becomes `s *
/// penalty` if `s < 0`, else `s / penalty`; a token seen twice counts once, ids past the scores are
/// ignored.
pub fn apply_repetition_penalty(scores: &mut [f32], penalty: f32, context: &[u32]) {
    let mut seen = vec![false; scores.len()];
    for &t in context {
        let t = t as usize;
        if t < scores.len() && !seen[t] {
            seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// The token a uniform draw `u` in [0, 1) picks from `probs`: the first, in index order, whose
/// cumulative probability exceeds `u` (the most likely if rounding leaves `u` past the end), with
/// its log-probability.
pub fn invert(probs: &[f32], u: f32) -> Sampled {
    let mut acc = 0.0;
    let mut id = argmax(probs);
    for (i, &p) in probs.iter().enumerate() {
        acc += p;
        if u < acc && p > 0.0 {
            id = i;
            break;
        }
    }
    Sampled {
        id: id as u32,
        logprob: probs[id].ln(),
    }
}

/// Index of the largest value; the first one on ties (as torch.argmax).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

pub fn softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = v.iter().map(|&x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// `log_softmax(v)[i]`, computed stably in f64.
pub fn log_softmax_at(v: &[f32], i: usize) -> f32 {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    (v[i] as f64 - lse) as f32
}

/// Larger score first, the smaller index on ties: the order top-k and top-p rank tokens in.
fn desc(v: &[f32], a: usize, b: usize) -> std::cmp::Ordering {
    v[b].total_cmp(&v[a]).then(a.cmp(&b))
}

/// The `m` highest-ranked indices of `v`, in rank order: a linear-time selection, then a sort of
/// those `m` only (a 128k vocabulary sorted whole took milliseconds per token).
fn top_ranked(v: &[f32], m: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let m = m.min(idx.len());
    if m == 0 {
        return vec![];
    }
    if m < idx.len() {
        idx.select_nth_unstable_by(m - 1, |&a, &b| desc(v, a, b));
        idx.truncate(m);
    }
    idx.sort_by(|&a, &b| desc(v, a, b));
    idx
}

fn top_k(scores: &mut [f32], k: usize) {
    if k >= scores.len() {
        return;
    }
    let kth = scores[*top_ranked(scores, k).last().expect("k > 0 (validated)")];
    // transformers keeps every token whose score ties the k-th.
    scores.iter_mut().for_each(|s| {
        if *s < kth {
            *s = f32::NEG_INFINITY
        }
    });
}

/// Keeps the smallest set of most likely tokens whose probability reaches `p` (at least one).
/// Ranks a growing head of the vocabulary (256, 1024, ... tokens) until its mass reaches `p`:
/// the same tokens, summed in the same order, as ranking them all.
fn top_p(scores: &mut [f32], p: f32) {
    let probs = softmax(scores);
    let mut head = 256;
    let keep: Vec<usize> = loop {
        let ranked = top_ranked(scores, head);
        let mut acc = 0.0;
        let reached = ranked.iter().position(|&i| {
            acc += probs[i];
            acc >= p
        });
        match reached {
            Some(n) => break ranked[..=n].to_vec(),
            None if ranked.len() == scores.len() => break ranked,
            None => head *= 4,
        }
    };
    let kept: Vec<f32> = keep.iter().map(|&i| scores[i]).collect();
    scores.fill(f32::NEG_INFINITY);
    for (&i, v) in keep.iter().zip(kept) {
        scores[i] = v;
    }
}

/// Typical decoding (Meister et al.): keep tokens whose surprisal is closest to the entropy,
/// until their mass reaches `p`, as transformers' TypicalLogitsWarper.
fn typical_p(scores: &mut [f32], p: f32) {
    let probs = softmax(scores);
    let logp: Vec<f32> = probs.iter().map(|&q| q.ln()).collect();
    let ent: f32 = -probs
        .iter()
        .zip(&logp)
        .filter(|(q, _)| **q > 0.0)
        .map(|(q, l)| q * l)
        .sum::<f32>();
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let shifted = |i: usize| (-logp[i] - ent).abs();
    idx.sort_by(|&a, &b| shifted(a).total_cmp(&shifted(b)).then(a.cmp(&b)));
    let mut acc = 0.0;
    let mut last = idx.len() - 1;
    for (n, &i) in idx.iter().enumerate() {
        acc += probs[i];
        if acc >= p {
            last = n;
            break;
        }
    }
    for &i in &idx[last + 1..] {
        scores[i] = f32::NEG_INFINITY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_by_default_and_first_max_on_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, 0.0], &[]).id, 1);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: Some(2.0),
            ..Default::default()
        });
        // token 0 (score 4 -> 2) loses to token 1 (3); token 2 negative gets more negative.
        assert_eq!(s.sample(&[4.0, 3.0, -1.0], &[0, 2]).id, 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_seed_dependent() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: Some(1.5),
                seed: Some(seed),
                ..Default::default()
            });
            (0..20)
                .map(|_| s.sample(&logits, &[]).id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = [0.0, 5.0, 4.9, -3.0, 1.0];
        for seed in 0..30 {
            let mut s = Sampler::new(SamplingParams {
                top_k: Some(2),
                seed: Some(seed),
                ..Default::default()
            });
            assert!([1, 2].contains(&s.sample(&logits, &[]).id));
            let mut s = Sampler::new(SamplingParams {
                top_p: Some(0.3),
                seed: Some(seed),
                ..Default::default()
            });
            assert_eq!(s.sample(&logits, &[]).id, 1);
        }
    }

    /// top-k and top-p as the whole vocabulary sorted (the sampler before session 38).
    fn reference_top_k(scores: &mut [f32], k: usize) {
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        idx.sort_by(|&a, &b| desc(scores, a, b));
        let kth = scores[idx[k - 1]];
        scores.iter_mut().for_each(|s| {
            if *s < kth {
                *s = f32::NEG_INFINITY
            }
        });
    }

    fn reference_top_p(scores: &mut [f32], p: f32) {
        let probs = softmax(scores);
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        idx.sort_by(|&a, &b| desc(scores, a, b));
        let mut acc = 0.0;
        let mut keep = idx.len();
        for (n, &i) in idx.iter().enumerate() {
            acc += probs[i];
            if acc >= p {
                keep = n + 1;
                break;
            }
        }
        for &i in &idx[keep..] {
            scores[i] = f32::NEG_INFINITY;
        }
    }

    #[test]
    fn linear_time_top_k_and_top_p_keep_the_sorted_ones_tokens() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for (n, spread) in [(7usize, 1.0f32), (5000, 0.3), (5000, 4.0), (40_000, 1.0)] {
            // Rounded to 1/8: many ties, which rank by index.
            let v: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() * 8.0 * spread).round() / 8.0)
                .collect();
            for k in [1, 3, 50, 255, 256, 257, 4999] {
                let (mut got, mut want) = (v.clone(), v.clone());
                if k < n {
                    top_k(&mut got, k);
                    reference_top_k(&mut want, k);
                    assert_eq!(got, want, "top_k {k} of {n}");
                }
            }
            for p in [0.01, 0.2, 0.5, 0.9, 0.99, 0.999_999, 1.0] {
                let (mut got, mut want) = (v.clone(), v.clone());
                top_p(&mut got, p);
                reference_top_p(&mut want, p);
                assert_eq!(got, want, "top_p {p} of {n} (spread {spread})");
            }
        }
    }

    #[test]
    fn typical_p_keeps_tokens_near_entropy() {
        // One dominant token: the distribution's entropy is low, so it is the typical one.
        let mut scores = vec![10.0, 0.0, 0.0, 0.0];
        typical_p(&mut scores, 0.5);
        assert_eq!(scores[0], 10.0);
        assert!(scores[1..].iter().all(|s| *s == f32::NEG_INFINITY));
    }

    #[test]
    fn validation_names_the_parameter() {
        let e = SamplingParams {
            top_p: Some(1.5),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("top_p"));
    }
}
