//! The CPU kernel that adds every row's own adapter delta to a batch's base output in one pass
//! (the role Punica's SGMV/BGMV kernels play on GPUs): per row, `h = A·x` (r dot products over
//! `in`) then `y += scale · B·h` (`out` dot products over r), or `y += ΔW·x` for a dense delta.
//! Working row by row makes each row's result independent of what else is in the batch, and
//! avoids the dozen small tensor ops per segment and module that the generic path costs.

use rayon::prelude::*;

/// A module's weights as row-major f32 host vectors.
#[derive(Debug, Clone)]
pub enum HostWeights {
    /// `a`: `[r, in]`; `b_t`: B transposed, `[r, out]`, so `B·h` is r contiguous axpys.
    LowRank {
        a: Vec<f32>,
        b_t: Vec<f32>,
        r: usize,
    },
    /// `[out, in]`, scale folded in.
    Dense { delta: Vec<f32> },
}

/// Dot product with 8 independent accumulators, so the compiler vectorizes it.
#[inline(always)]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, xr) = x.split_at(x.len() / 8 * 8);
    let (yc, yr) = y.split_at(xc.len());
    for (a, b) in xc.chunks_exact(8).zip(yc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (a, b) in xr.iter().zip(yr) {
        s += a * b;
    }
    s
}

/// Adds `w`'s delta of input row `x` (`in` values) to output row `y` (`out` values).
pub(crate) fn add_row_delta(
    w: &HostWeights,
    scale: f32,
    x: &[f32],
    y: &mut [f32],
    h: &mut Vec<f32>,
) {
    let n_in = x.len();
    match w {
        HostWeights::LowRank { a, b_t, r } => {
            let n_out = y.len();
            // h = A·x, then t = B·h accumulated column by column, then y += scale·t (the
            // order PEFT computes in: the product, then the scaling).
            h.clear();
            h.extend(a.chunks_exact(n_in).map(|row| dot(row, x)));
            h.resize(r + n_out, 0.0);
            let (hv, t) = h.split_at_mut(*r);
            for (hj, col) in hv.iter().zip(b_t.chunks_exact(n_out)) {
                for (ti, bi) in t.iter_mut().zip(col) {
                    *ti += bi * *hj;
                }
            }
            for (yo, ti) in y.iter_mut().zip(t.iter()) {
                *yo += scale * *ti;
            }
        }
        HostWeights::Dense { delta } => {
            for (yo, d) in y.iter_mut().zip(delta.chunks_exact(n_in)) {
                *yo += dot(d, x);
            }
        }
    }
}

/// A run of rows sharing one module: first row, row count, and the weights with their scale
/// (`None`: no delta for these rows).
pub(crate) type RowRun<'a> = (usize, usize, Option<(&'a HostWeights, f32)>);

/// Work (multiply-adds) above which rows are spread over threads.
const PARALLEL_WORK: usize = 1 << 18;

/// `out[rows, n_out] += delta of each row`, where `plan[i] = (first row, rows, weights, scale)`.
pub(crate) fn add_deltas(
    x: &[f32],
    n_in: usize,
    out: &mut [f32],
    n_out: usize,
    plan: &[RowRun<'_>],
) {
    let rows = out.len() / n_out;
    // Which weights each row uses.
    let mut per_row: Vec<Option<(&HostWeights, f32)>> = vec![None; rows];
    for &(start, n, w) in plan {
        per_row[start..start + n].iter_mut().for_each(|r| *r = w);
    }
    let work: usize = per_row
        .iter()
        .flatten()
        .map(|(w, _)| match w {
            HostWeights::LowRank { r, .. } => r * (n_in + n_out),
            HostWeights::Dense { .. } => n_in * n_out,
        })
        .sum();
    let row_op = |(i, y): (usize, &mut [f32]), h: &mut Vec<f32>| {
        if let Some((w, scale)) = per_row[i] {
            add_row_delta(w, scale, &x[i * n_in..(i + 1) * n_in], y, h);
        }
    };
    if work >= PARALLEL_WORK && rows > 1 {
        out.par_chunks_mut(n_out)
            .enumerate()
            .for_each_init(Vec::new, |h, item| row_op(item, h));
    } else {
        let mut h = Vec::new();
        out.chunks_mut(n_out)
            .enumerate()
            .for_each(|item| row_op(item, &mut h));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_delta_matches_naive_low_rank_and_dense() {
        let (n_in, n_out, r) = (19, 7, 3);
        let a: Vec<f32> = (0..r * n_in)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let b: Vec<f32> = (0..n_out * r)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let x: Vec<f32> = (0..n_in).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = vec![1.0f32; n_out];
        let mut b_t = vec![0.0f32; r * n_out];
        for o in 0..n_out {
            for j in 0..r {
                b_t[j * n_out + o] = b[o * r + j];
            }
        }
        add_row_delta(
            &HostWeights::LowRank {
                a: a.clone(),
                b_t,
                r,
            },
            0.5,
            &x,
            &mut y,
            &mut Vec::new(),
        );
        let mut dense = vec![0.0f32; n_out * n_in];
        for o in 0..n_out {
            let mut want = 0.0f64;
            for j in 0..r {
                let h: f64 = (0..n_in)
                    .map(|i| a[j * n_in + i] as f64 * x[i] as f64)
                    .sum();
                want += b[o * r + j] as f64 * h;
            }
            assert!(
                (y[o] as f64 - (1.0 + 0.5 * want)).abs() < 1e-5,
                "{o}: {} vs {}",
                y[o],
                1.0 + 0.5 * want
            );
            for i in 0..n_in {
                dense[o * n_in + i] =
                    0.5 * (0..r).map(|j| b[o * r + j] * a[j * n_in + i]).sum::<f32>();
            }
        }
        let mut y2 = vec![1.0f32; n_out];
        add_row_delta(
            &HostWeights::Dense { delta: dense },
            1.0,
            &x,
            &mut y2,
            &mut Vec::new(),
        );
        for o in 0..n_out {
            assert!((y[o] - y2[o]).abs() < 1e-5);
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    #[test]
    #[ignore = "timing, run by hand"]
    fn time_rows() {
        let (n_in, n_out, r, rows) = (576, 1536, 16, 16);
        let w = HostWeights::LowRank {
            a: vec![0.01; r * n_in],
            b_t: vec![0.01; r * n_out],
            r,
        };
        let x = vec![0.5f32; rows * n_in];
        let mut out = vec![0.0f32; rows * n_out];
        let plan = [(0, rows, Some((&w, 2.0f32)))];
        let t = std::time::Instant::now();
        for _ in 0..1000 {
            add_deltas(&x, n_in, &mut out, n_out, &plan);
        }
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "{:.1} us per call, {:.2} GFLOP/s",
            s * 1e3,
            2.0 * 1000.0 * (rows * r * (n_in + n_out)) as f64 / s / 1e9
        );
    }
}
