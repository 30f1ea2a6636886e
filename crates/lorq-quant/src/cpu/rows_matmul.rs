use rayon::prelude::*;

/// A weight matrix that can produce the dot product of its row `j` with an f32 vector.
pub trait RowDot: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// `out[m] = x[m] · W[j]` for each of the `x.len() / cols` activation rows.
    fn dot_row(&self, j: usize, x: &[f32], out: &mut [f32]);
}

/// Output rows per parallel task: enough work per task to hide scheduling, enough tasks to balance.
const ROWS_PER_TASK: usize = 64;

/// `y = x · Wᵀ` for a few activation rows (`x`: `[m, k]` row-major): the decode-time shape, where
/// reading `W` once dominates. Each weight row is read once and applied to all `m` rows while it is
/// in cache; output rows are split across threads. Returns `[m, n]` row-major.
pub fn rows_matmul<W: RowDot>(w: &W, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), m * k, "activation shape does not match the weight");
    // Computed as [n, m] (each task writes whole rows), transposed at the end when m > 1.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let j0 = task * ROWS_PER_TASK;
            for (r, out) in chunk.chunks_mut(m).enumerate() {
                w.dot_row(j0 + r, x, out);
            }
        });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            y[i * n + j] = yt[j * m + i];
        }
    }
    y
}
