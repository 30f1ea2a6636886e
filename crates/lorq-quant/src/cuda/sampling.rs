//! Picking the next token on the GPU (`kernels/sampling.cu`): greedy (argmax and its
//! log-softmax) or sampled (temperature, top-k, top-p, then a draw with the host's uniform
//! number), for chosen rows of a step's logits, with one copy of two words per row back; the
//! repetition penalty and the temperature before a pick, as f32 copies of those rows made by many
//! blocks at once; the alternatives a request reports. The host sampler (`lorq_model::sampling`)
//! is the reference.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Tensor};

use super::{cuda_device, device_view, function, tensor_from_storage};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sampling.fatbin"));

const THREADS: u32 = 1024;

/// A picked token: its index in the row and its log-probability under the distribution it was
/// drawn from (the softmax of the row for greedy; of the kept, temperature-scaled scores when
/// sampled).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub id: u32,
    pub logprob: f32,
}

/// How to sample one row (`lorq_model::sampling::Sampler`'s processors, in its order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling<'a> {
    /// The row of the logits.
    pub row: u32,
    /// The repetition penalty (> 0; 1 for none) at the tokens of `penalized` ([`RowScores`]).
    pub penalty: f32,
    pub penalized: &'a [u32],
    /// Scores are (penalized) logits / temperature (> 0; 1 for none).
    pub temperature: f32,
    /// Keep every score >= the k-th largest (`None`: all).
    pub top_k: Option<u32>,
    /// Keep the smallest ranked prefix whose probability reaches p (1 for none).
    pub top_p: f32,
    /// The uniform number in [0, 1) the draw inverts.
    pub u: f32,
}

/// For each row `r` of `sel`, the greedy pick of row `r` of `x` (`[rows, n]`, f32/bf16/f16): the
/// index of the largest value — the first on ties, as torch.argmax and
/// `lorq_model::sampling::argmax`; NaN never wins (a row of NaN gives 0) — and the log-softmax
/// there (f32 arithmetic on the stored values; NaN when the row holds one, as on the host).
pub fn greedy_rows(x: &Tensor, sel: &[u32]) -> Result<Vec<Pick>, QuantError> {
    check_rows(x, sel.iter().copied(), "greedy_rows")?;
    pick_rows(x, "greedy_rows", sel, sel.len())
}

/// For each entry of `rows`, a token sampled from its row of `x` (`[rows, n]`, f32/bf16/f16) as
/// the host sampler samples it with the same uniform number: the same token unless `u` or `top_p`
/// lies within a rounding of a cumulative probability (the kernel sums 32.32 fixed-point
/// weights exactly, the host f32 ones in order). Two launches: [`prepare_rows`] (penalty and
/// temperature, many blocks per row), then one block per row picks from the prepared scores.
pub fn sample_rows(x: &Tensor, rows: &[RowSampling]) -> Result<Vec<Pick>, QuantError> {
    check_rows(x, rows.iter().map(|r| r.row), "sample_rows")?;
    let mut words = Vec::with_capacity(4 * rows.len());
    for (j, r) in rows.iter().enumerate() {
        let bad = |what: &str| {
            Err(QuantError::Invalid(format!(
                "sample_rows: row {}: {what} (temperature {}, top_k {:?}, top_p {}, u {})",
                r.row, r.temperature, r.top_k, r.top_p, r.u
            )))
        };
        if !(r.top_p > 0.0 && r.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..1.0).contains(&r.u) {
            return bad("u must be in [0, 1)");
        }
        if r.top_k == Some(0) {
            return bad("top_k must be > 0");
        }
        words.extend([
            j as u32,
            r.top_k.unwrap_or(0),
            r.top_p.to_bits(),
            r.u.to_bits(),
        ]);
    }
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let scores: Vec<RowScores> = rows
        .iter()
        .map(|r| RowScores {
            row: r.row,
            penalty: r.penalty,
            temperature: r.temperature,
            penalized: r.penalized,
        })
        .collect();
    let prepared = prepare(x, &scores, "sample_rows")?;
    pick_rows(&prepared, "sample_rows", &words, rows.len())
}

/// Most alternatives [`top_rows`] reports per row (`kernels/sampling.cu` `TOP_MAX`).
pub const TOP_MAX: usize = 64;

/// For each `(row, count)` of `rows`, the `count` (1 to [`TOP_MAX`], at most the row's length)
/// most likely tokens of that row of `x` (`[rows, n]`, f32/bf16/f16) with their log-softmax
/// (f32), best first, the smaller index on ties: `lorq_model::generation::top_logprobs` on the
/// GPU, in one launch and one copy.
pub fn top_rows(x: &Tensor, rows: &[(u32, usize)]) -> Result<Vec<Vec<Pick>>, QuantError> {
    check_rows(x, rows.iter().map(|r| r.0), "top_rows")?;
    let (_, n) = x.dims2()?;
    let mut words = Vec::with_capacity(3 * rows.len());
    let mut pairs = 0usize;
    for &(row, count) in rows {
        if count == 0 || count > TOP_MAX.min(n) {
            return Err(QuantError::Invalid(format!(
                "top_rows: row {row}: {count} alternatives (1 to {} for rows of {n})",
                TOP_MAX.min(n)
            )));
        }
        words.extend([row, count as u32, pairs as u32]);
        pairs += count;
    }
    let flat = launch_rows(x, "top_rows", &words, rows.len(), pairs)?;
    let mut flat = flat.into_iter();
    Ok(rows
        .iter()
        .map(|&(_, count)| flat.by_ref().take(count).collect())
        .collect())
}

/// One row's scores before a pick: transformers' repetition penalty (the score `s` of every
/// token in `penalized` becomes `s * penalty` if `s < 0`, else `s / penalty`; a token listed
/// twice counts once, ids past the row are ignored), then divided by the temperature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScores<'a> {
    /// The row of the logits.
    pub row: u32,
    /// > 0 and finite; 1 for none.
    pub penalty: f32,
    /// > 0 and finite; 1 for none.
    pub temperature: f32,
    pub penalized: &'a [u32],
}

/// Values of a row one block of [`prepare_rows`] takes (kernels/sampling.cu `prepare_rows`).
const PREPARE_SLICE: usize = 8192;
const PREPARE_THREADS: u32 = 256;

/// The rows `rows` of `x` (`[rows, n]`, f32/bf16/f16) as f32 `[rows.len(), n]` on the GPU, each
/// with its penalty and temperature, in one launch of many blocks per row: the host sampler's
/// values bit for bit (IEEE products and quotients), for [`greedy_rows`] to pick from (and
/// [`sample_rows`], which prepares its rows itself).
pub fn prepare_rows(x: &Tensor, rows: &[RowScores]) -> Result<Tensor, QuantError> {
    prepare(x, rows, "prepare_rows")
}

/// [`prepare_rows`], its errors named after `caller`.
fn prepare(x: &Tensor, rows: &[RowScores], caller: &str) -> Result<Tensor, QuantError> {
    check_rows(x, rows.iter().map(|r| r.row), caller)?;
    let dev = cuda_device(x, caller)?;
    let (_, n) = x.dims2()?;
    let mut words = Vec::with_capacity(5 * rows.len());
    let mut tokens = Vec::with_capacity(rows.iter().map(|r| r.penalized.len()).sum());
    for r in rows {
        for (what, v) in [("penalty", r.penalty), ("temperature", r.temperature)] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(QuantError::Invalid(format!(
                    "{caller}: row {}: the {what} must be > 0 and finite, got {v}",
                    r.row
                )));
            }
        }
        let (start, count) = (
            u32::try_from(tokens.len()),
            u32::try_from(r.penalized.len()),
        );
        let (Ok(start), Ok(count)) = (start, count) else {
            return Err(QuantError::Invalid(format!(
                "{caller}: more than {} penalized tokens in one launch",
                u32::MAX
            )));
        };
        words.extend([
            r.row,
            r.penalty.to_bits(),
            r.temperature.to_bits(),
            start,
            count,
        ]);
        tokens.extend_from_slice(r.penalized);
    }
    if rows.is_empty() {
        return Ok(Tensor::zeros((0, n), DType::F32, x.device())?);
    }
    // The kernel reads no token past the lists: an empty list still needs a buffer.
    if tokens.is_empty() {
        tokens.push(0);
    }
    let name = kernel_name("prepare_rows", x.dtype())?;
    let args = Tensor::from_slice(&words, words.len(), x.device())?;
    let tokens = Tensor::from_slice(&tokens, tokens.len(), x.device())?;
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        x: &Tensor,
        args: &Tensor,
        tokens: &Tensor,
        out_rows: usize,
    ) -> Result<CudaStorage, QuantError> {
        let (rows, n) = x.dims2()?;
        let (xs, xl) = x.storage_and_layout();
        let xv = device_view::<T>(&xs, xl, rows * n, "prepare_rows: logits")?;
        let (as_, al) = args.storage_and_layout();
        let av = device_view::<u32>(&as_, al, args.elem_count(), "prepare_rows: row arguments")?;
        let (ts, tl) = tokens.storage_and_layout();
        let tv = device_view::<u32>(&ts, tl, tokens.elem_count(), "prepare_rows: tokens")?;
        // SAFETY: the kernel's blocks write every value of every output row.
        let out = unsafe { dev.alloc::<f32>(out_rows * n)? };
        let f = function(dev, "sampling", FATBIN, name)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let parts = n.div_ceil(PREPARE_SLICE).max(1);
        let (ni, pi) = (n as i32, parts as i32);
        b.arg(&xv).arg(&av).arg(&tv).arg(&out).arg(&ni).arg(&pi);
        let cfg = LaunchConfig {
            grid_dim: ((out_rows * parts) as u32, 1, 1),
            block_dim: (PREPARE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `prepare_rows_*`: x holds rows * n values, every row in
        // args is below rows (check_rows), each row's token span lies inside tokens, out holds
        // out_rows * n values, the grid is `parts` blocks per output row.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let x = x.contiguous()?;
    let s = match x.dtype() {
        DType::BF16 => go::<half::bf16>(dev, &name, &x, &args, &tokens, rows.len())?,
        DType::F16 => go::<half::f16>(dev, &name, &x, &args, &tokens, rows.len())?,
        _ => go::<f32>(dev, &name, &x, &args, &tokens, rows.len())?,
    };
    Ok(tensor_from_storage(s, (rows.len(), n)))
}

/// `{kernel}_{dtype}` for logits of `dtype`.
fn kernel_name(kernel: &str, dtype: DType) -> Result<String, QuantError> {
    match dtype {
        DType::BF16 => Ok(format!("{kernel}_bf16")),
        DType::F16 => Ok(format!("{kernel}_f16")),
        DType::F32 => Ok(format!("{kernel}_f32")),
        d => Err(QuantError::Invalid(format!(
            "{kernel}: logits of dtype {d:?} (f32, bf16 or f16)"
        ))),
    }
}

fn check_rows(
    x: &Tensor,
    mut sel: impl Iterator<Item = u32>,
    what: &str,
) -> Result<(), QuantError> {
    let (rows, n) = x.dims2()?;
    if n == 0 || n > i32::MAX as usize / 2 {
        return Err(QuantError::Invalid(format!(
            "{what}: rows of {n} values (1 to {})",
            i32::MAX / 2
        )));
    }
    match sel.find(|&r| r as usize >= rows) {
        Some(bad) => Err(QuantError::Invalid(format!(
            "{what}: row {bad} selected from {rows} rows"
        ))),
        None => Ok(()),
    }
}

/// Launches `{kernel}_{dtype}` with one block per picked row, its per-row arguments `words`, and
/// brings the picks back (one per row).
fn pick_rows(
    x: &Tensor,
    kernel: &str,
    words: &[u32],
    picks: usize,
) -> Result<Vec<Pick>, QuantError> {
    launch_rows(x, kernel, words, picks, picks)
}

/// Launches `{kernel}_{dtype}` with `blocks` blocks, per-row arguments `words`, and brings back
/// the `pairs` (token, log-probability) it writes.
fn launch_rows(
    x: &Tensor,
    kernel: &str,
    words: &[u32],
    blocks: usize,
    pairs: usize,
) -> Result<Vec<Pick>, QuantError> {
    let dev = cuda_device(x, kernel)?;
    if blocks == 0 {
        return Ok(vec![]);
    }
    let dtype = x.dtype();
    let name = kernel_name(kernel, dtype)?;
    // greedy_rows' 16-byte loads need aligned rows.
    let x = super::aligned(x, 16)?;
    let args = Tensor::from_slice(words, words.len(), x.device())?;
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        x: &Tensor,
        args: &Tensor,
        (blocks, pairs): (usize, usize),
    ) -> Result<Vec<u32>, QuantError> {
        let (rows, n) = x.dims2()?;
        let (xs, xl) = x.storage_and_layout();
        let xv = device_view::<T>(&xs, xl, rows * n, "picks: logits")?;
        let (as_, al) = args.storage_and_layout();
        let av = device_view::<u32>(&as_, al, args.elem_count(), "picks: row arguments")?;
        // SAFETY: the kernel writes both words of every pair.
        let out = unsafe { dev.alloc::<u32>(2 * pairs)? };
        let f = function(dev, "sampling", FATBIN, name)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let ni = n as i32;
        b.arg(&xv).arg(&av).arg(&out).arg(&ni);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `greedy_rows_*` / `sample_rows_*` / `top_rows_*`: x holds
        // rows * n values, every row named in args is below rows (check_rows), args holds the
        // blocks' arguments (1, 5 or 3 words each), out 2 words per pair the blocks write.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(stream.clone_dtoh(&out).w()?)
    }
    let sizes = (blocks, pairs);
    let words = match dtype {
        DType::BF16 => go::<half::bf16>(dev, &name, &x, &args, sizes)?,
        DType::F16 => go::<half::f16>(dev, &name, &x, &args, sizes)?,
        _ => go::<f32>(dev, &name, &x, &args, sizes)?,
    };
    Ok(words
        .chunks_exact(2)
        .map(|w| Pick {
            id: w[0],
            logprob: f32::from_bits(w[1]),
        })
        .collect())
}
