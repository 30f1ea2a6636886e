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

/// Activation rows up to which a packed format runs its fused row kernel; past this it
/// dequantizes once per call and uses the GEMM.
pub const FUSED_MAX_ROWS: usize = 16;

/// `x · Wᵀ` (x `[.., k]`, result in x's dtype) for a packed format `what`: the fused row kernel
/// `rows` for up to [`FUSED_MAX_ROWS`] rows on the CPU, else `dequantize()` (f32) and candle's matmul.
pub(crate) fn fused_or_dequantized_matmul(
    rows: &impl RowDot,
    x: &candle_core::Tensor,
    what: &str,
    dequantize: impl FnOnce() -> Result<candle_core::Tensor, crate::QuantError>,
) -> Result<candle_core::Tensor, crate::QuantError> {
    use candle_core::{DType, Device, Tensor};
    let (n, k) = (rows.rows(), rows.cols());
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Err(crate::QuantError::Invalid(format!(
            "{what}: activation shape {dims:?} does not end in in_features {k}"
        )));
    }
    let m = x.elem_count() / k.max(1);
    if m <= FUSED_MAX_ROWS && matches!(x.device(), Device::Cpu) {
        let mut out_shape = dims.to_vec();
        *out_shape.last_mut().expect("rank >= 1") = n;
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let y = rows_matmul(rows, &xs, m);
        return Ok(Tensor::from_vec(y, out_shape, x.device())?.to_dtype(x.dtype())?);
    }
    if !x.device().is_cpu() {
        warn_no_gpu_kernel(what);
    }
    let w = dequantize()?.to_dtype(DType::F32)?.to_device(x.device())?;
    let y = x.to_dtype(DType::F32)?.broadcast_matmul(&w.t()?)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// Warns once per format that a GPU matmul goes through the CPU-dequantize fallback.
pub(crate) fn warn_no_gpu_kernel(what: &str) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().expect("poisoned");
    if !seen.iter().any(|s| s == what) {
        seen.push(what.to_string());
        tracing::warn!(
            "{what}: no fused CUDA kernel yet; every matmul dequantizes the weight on the CPU and copies it to the GPU (slow)"
        );
    }
}
