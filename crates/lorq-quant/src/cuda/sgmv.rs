//! Many LoRA adapters over one batch in two launches (`kernels/sgmv.cu`, the role of Punica's
//! SGMV/BGMV kernels): every row of `x [rows, in]` adds its own adapter's `scale · B·(A·x)` to the
//! base output, one shrink launch (`h = A·x`, f32) and one expand launch (`out = base + scale·B·h`)
//! whatever the number of adapters, ranks or weight dtypes in the batch.
//!
//! The A/B weights are read in place, in their stored dtype (f32/bf16/f16, widened to f32 in
//! registers, as PEFT upcasts them to float32): no per-call copy. The kernels read a small table —
//! per tile of at most [`ROWS_PER_TILE`] rows its segment's A/B addresses, rank, dtype and scale —
//! uploaded once per distinct content and kept. Modules sharing the batch's input (q/k/v,
//! gate/up) shrink in one launch ([`shrink_group`]) and expand in one ([`expand_group`]). The CPU
//! reference is `lorq_lora::BatchAdapters::apply` on CPU tensors
//! (`crates/lorq-lora/tests/cuda_sgmv.rs`).

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Storage, Tensor};

use super::{cuda_device, function, tensor_from_storage};
use crate::recent_cache::RecentCache;
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sgmv.fatbin"));

/// Rows of one adapter that share a load of its weights (kernels/sgmv.cu `MT`).
pub const ROWS_PER_TILE: usize = 8;
/// The largest rank the kernels take: the expand kernel keeps a tile's `h` (8 rows × rank f32)
/// in the 48 KiB of shared memory a block gets without opting in.
pub const MAX_RANK: usize = 1536;
/// Shrink: warps per block and rank indices per block (kernels/sgmv.cu `WARPS`, `J_PER_BLOCK`).
const SHRINK_WARPS: usize = 8;
const SHRINK_J_PER_BLOCK: usize = 2;
/// Expand: output features per block (kernels/sgmv.cu `EXPAND_THREADS`).
const EXPAND_THREADS: usize = 256;
/// Flags of a tile (kernels/sgmv.cu): weight dtype in the low byte, then the vector paths.
const SHRINK_VEC: u32 = 0x100;
const EXPAND_VEC: u32 = 0x200;
/// Bytes of one tile of the table (kernels/sgmv.cu `Tile`).
const TILE_BYTES: usize = 40;
/// Modules one shrink or expand launch takes (kernels/sgmv.cu `ShrinkGroup`, `ExpandGroup`).
pub const MAX_GROUP: usize = 3;

/// One LoRA pair on the GPU: `A [rank, in]`, `B [out, rank]`, contiguous, f32/bf16/f16 (both the
/// same dtype), on the activations' GPU.
#[derive(Debug, Clone, Copy)]
pub struct LoraPair<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f32,
}

/// A run of consecutive batch rows using one pair (`None`: no delta, the base output is kept).
#[derive(Debug, Clone, Copy)]
pub struct LoraSegment<'a> {
    pub rows: usize,
    pub lora: Option<LoraPair<'a>>,
}

fn dtype_code(dtype: DType) -> Option<u32> {
    match dtype {
        DType::F32 => Some(0),
        DType::BF16 => Some(1),
        DType::F16 => Some(2),
        _ => None,
    }
}

/// The device address of a contiguous CUDA tensor's first element.
fn device_address(t: &Tensor, stream: &Arc<CudaStream>, what: &str) -> Result<u64, QuantError> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(QuantError::Invalid(format!("sgmv: {what} is not on a GPU")));
    };
    let start = layout.start_offset();
    fn addr<T: CudaDType>(
        cs: &CudaStorage,
        start: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<u64, QuantError> {
        let view = cs.as_cuda_slice::<T>()?.slice(start..);
        let (p, _record) = view.device_ptr(stream);
        Ok(p)
    }
    match t.dtype() {
        DType::F32 => addr::<f32>(cs, start, stream),
        DType::BF16 => addr::<half::bf16>(cs, start, stream),
        DType::F16 => addr::<half::f16>(cs, start, stream),
        d => Err(QuantError::Invalid(format!(
            "sgmv: {what} has dtype {d:?}; LoRA weights must be f32, bf16 or f16"
        ))),
    }
}

/// The launch table: one 40-byte tile per run of at most [`ROWS_PER_TILE`] rows of a segment.
struct Plan {
    bytes: Vec<u8>,
    /// Segments with a pair (none: no delta at all).
    pairs: usize,
    tiles: usize,
    max_rank: usize,
    /// The most rows a tile with a pair has: 1 picks the kernels for one-row tiles.
    tile_rows: usize,
}

/// A segment's pair as the kernels see it: A/B addresses, rank, flags, scale.
#[derive(Clone, Copy)]
struct PairRecord {
    a: u64,
    b: u64,
    rank: usize,
    flags: u32,
    scale: f32,
}

fn pair_record(
    i: usize,
    p: &LoraPair<'_>,
    x: &Tensor,
    n: usize,
    k: usize,
    stream: &Arc<CudaStream>,
) -> Result<PairRecord, QuantError> {
    let bad = |m: String| QuantError::Invalid(format!("sgmv: segment {i}: {m}"));
    let (r, ka) = p.a.dims2().map_err(|_| {
        bad(format!(
            "A has shape {:?}, expected [rank, {k}]",
            p.a.dims()
        ))
    })?;
    let (nb, rb) = p.b.dims2().map_err(|_| {
        bad(format!(
            "B has shape {:?}, expected [{n}, rank]",
            p.b.dims()
        ))
    })?;
    if ka != k || nb != n || rb != r {
        return Err(bad(format!(
            "A {:?} and B {:?} do not fit x [rows, {k}] -> out [rows, {n}] (A must be [rank, {k}], B [{n}, rank])",
            p.a.dims(),
            p.b.dims()
        )));
    }
    if r == 0 || r > MAX_RANK {
        return Err(bad(format!("rank {r} is outside 1..={MAX_RANK}")));
    }
    if p.a.dtype() != p.b.dtype() {
        return Err(bad(format!(
            "A is {:?} but B is {:?}",
            p.a.dtype(),
            p.b.dtype()
        )));
    }
    let code = dtype_code(p.a.dtype()).ok_or_else(|| {
        bad(format!(
            "weights are {:?}; LoRA weights must be f32, bf16 or f16",
            p.a.dtype()
        ))
    })?;
    for (t, name) in [(p.a, "A"), (p.b, "B")] {
        if !t.device().same_device(x.device()) {
            return Err(bad(format!(
                "{name} is on {:?}, the activations on {:?}",
                t.device(),
                x.device()
            )));
        }
        if !t.is_contiguous() {
            return Err(bad(format!("{name} is not contiguous")));
        }
    }
    let a = device_address(p.a, stream, "A")?;
    let b = device_address(p.b, stream, "B")?;
    let mut flags = code;
    if k.is_multiple_of(8) && a.is_multiple_of(16) {
        flags |= SHRINK_VEC;
    }
    if r.is_multiple_of(8) && b.is_multiple_of(16) {
        flags |= EXPAND_VEC;
    }
    Ok(PairRecord {
        a,
        b,
        rank: r,
        flags,
        scale: p.scale,
    })
}

/// Appends one tile (kernels/sgmv.cu `Tile`); `None`: rows without adapter (null pointers).
fn push_tile(bytes: &mut Vec<u8>, pair: Option<&PairRecord>, row0: usize, nrows: usize) {
    let (a, b, rank, flags, scale) = pair.map_or((0, 0, 0, 0, 0.0), |p| {
        (p.a, p.b, p.rank as i32, p.flags, p.scale)
    });
    bytes.extend_from_slice(&a.to_le_bytes());
    bytes.extend_from_slice(&b.to_le_bytes());
    bytes.extend_from_slice(&(row0 as i32).to_le_bytes());
    bytes.extend_from_slice(&(nrows as i32).to_le_bytes());
    bytes.extend_from_slice(&rank.to_le_bytes());
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes.extend_from_slice(&scale.to_le_bytes());
    bytes.extend_from_slice(&0i32.to_le_bytes());
}

fn plan(
    segments: &[LoraSegment<'_>],
    x: &Tensor,
    n: usize,
    k: usize,
    stream: &Arc<CudaStream>,
) -> Result<Plan, QuantError> {
    let mut records = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        records.push(match &s.lora {
            Some(p) => Some(pair_record(i, p, x, n, k, stream)?),
            None => None,
        });
    }
    let tiles: usize = segments
        .iter()
        .map(|s| s.rows.div_ceil(ROWS_PER_TILE))
        .sum();
    let mut bytes = Vec::with_capacity(tiles * TILE_BYTES);
    let mut row = 0usize;
    let mut tile_rows = 0usize;
    for (s, rec) in segments.iter().zip(&records) {
        let mut done = 0;
        while done < s.rows {
            let nr = (s.rows - done).min(ROWS_PER_TILE);
            if rec.is_some() {
                tile_rows = tile_rows.max(nr);
            }
            push_tile(&mut bytes, rec.as_ref(), row + done, nr);
            done += nr;
        }
        row += s.rows;
    }
    Ok(Plan {
        bytes,
        pairs: records.iter().flatten().count(),
        tiles,
        max_rank: records.iter().flatten().map(|r| r.rank).max().unwrap_or(0),
        tile_rows,
    })
}

/// `base_out + delta` where each row's delta is `scale · B·(A·x_row)` of its segment's pair (none
/// for segments without one), accumulated in f32 and rounded once to `base_out`'s dtype.
/// `x`: `[rows, in]`, `base_out`: `[rows, out]`, same GPU and dtype (f32/bf16/f16); the segments'
/// rows add up to `rows`. Two kernel launches (and a small table upload the first time a batch layout is seen),
/// whatever the segments.
pub fn add_lora(
    x: &Tensor,
    base_out: &Tensor,
    segments: &[LoraSegment<'_>],
) -> Result<Tensor, QuantError> {
    let (_, n) = base_out.dims2().map_err(|_| {
        QuantError::Invalid(format!(
            "sgmv: the base output has shape {:?}, expected [rows, out]",
            base_out.dims()
        ))
    })?;
    check_base(x, base_out)?;
    match shrink(x, n, segments)? {
        Some(h) => h.expand(base_out),
        None => Ok(base_out.clone()),
    }
}

/// The base output must be on the activations' GPU, in their dtype.
fn check_base(x: &Tensor, base_out: &Tensor) -> Result<(), QuantError> {
    if !base_out.device().same_device(x.device()) || base_out.dtype() != x.dtype() {
        return Err(QuantError::Invalid(format!(
            "sgmv: the base output ({:?} on {:?}) must share the activations' dtype and GPU ({:?} on {:?})",
            base_out.dtype(),
            base_out.device(),
            x.dtype(),
            x.device()
        )));
    }
    Ok(())
}

/// The first half of [`add_lora`]: `h = A·x` of every row's pair, queued before the base matmul
/// of the module so that, inside a CUDA graph capture, it runs on a side stream beside that
/// matmul ([`super::side_stream`]; eagerly it stays on the main stream: a fork costs host time a
/// replayed graph does not pay). `n`: the module's output features. `None`: no segment has a pair.
pub fn shrink(
    x: &Tensor,
    n: usize,
    segments: &[LoraSegment<'_>],
) -> Result<Option<Shrunk>, QuantError> {
    let mut out = shrink_group(x, &[(n, segments)])?;
    Ok(out.pop().flatten())
}

/// [`shrink`] of up to [`MAX_GROUP`] modules that read the same `x` (q/k/v, gate/up), in one
/// launch: `modules[i]` is a module's output features and its segments (the same rows for
/// every module). One result per module, `None` where no segment of that module has a pair.
pub fn shrink_group(
    x: &Tensor,
    modules: &[(usize, &[LoraSegment<'_>])],
) -> Result<Vec<Option<Shrunk>>, QuantError> {
    if modules.is_empty() || modules.len() > MAX_GROUP {
        return Err(QuantError::Invalid(format!(
            "sgmv: {} modules in one shrink (1 to {MAX_GROUP})",
            modules.len()
        )));
    }
    let dev = cuda_device(x, "sgmv")?;
    let dtype = x.dtype();
    if dtype_code(dtype).is_none() {
        return Err(QuantError::Invalid(format!(
            "sgmv: activations are {dtype:?}; they must be f32, bf16 or f16"
        )));
    }
    let (rows, k) = x.dims2().map_err(|_| {
        QuantError::Invalid(format!(
            "sgmv: x has shape {:?}, expected [rows, in]",
            x.dims()
        ))
    })?;
    let stream = dev.cuda_stream();
    let mut plans = Vec::with_capacity(modules.len());
    for (n, segments) in modules {
        let seg_rows: usize = segments.iter().map(|s| s.rows).sum();
        if seg_rows != rows {
            return Err(QuantError::Invalid(format!(
                "sgmv: x has {rows} rows, the segments {seg_rows}"
            )));
        }
        let p = plan(segments, x, *n, k, &stream)?;
        plans.push((p.pairs > 0 && rows > 0).then_some(p));
    }
    let live: Vec<&Plan> = plans.iter().flatten().collect();
    if live.is_empty() {
        return Ok(plans.iter().map(|_| None).collect());
    }
    if live.iter().any(|p| p.tiles != live[0].tiles) {
        return Err(QuantError::Invalid(
            "sgmv: the modules of one shrink must cut the batch into the same tiles".into(),
        ));
    }
    let x = x.contiguous()?;
    let mut staged = Vec::with_capacity(live.len());
    for p in &live {
        let table = uploaded_table(dev, &p.bytes)?;
        // SAFETY: the shrink kernel writes h[row, j] for every adapter row and j below its
        // rank, the only elements the expand kernel reads.
        let h = unsafe { dev.alloc::<f32>(rows * p.max_rank)? };
        staged.push((table, h));
    }
    // After the allocations of h (ordered on the main stream) and with x kept until the expands;
    // the first expand of the group joins it (later ones find it joined).
    let fork = if super::side_stream::wanted(dev) {
        Some(super::side_stream::Fork::new(dev)?)
    } else {
        None
    };
    let on = fork.as_ref().map_or(&stream, |f| f.stream()).clone();
    let fork: Option<SharedFork> = fork.map(|f| Arc::new(Mutex::new(Some(f))));
    let launch = ShrinkLaunch {
        x: &x,
        rows,
        k,
        plans: &live,
        staged: &staged,
    };
    match dtype {
        DType::BF16 => launch.run::<half::bf16>(dev, &on)?,
        DType::F16 => launch.run::<half::f16>(dev, &on)?,
        _ => launch.run::<f32>(dev, &on)?,
    }
    let mut staged = staged.into_iter();
    Ok(plans
        .iter()
        .zip(modules)
        .map(|(p, (n, _))| {
            p.as_ref().map(|p| {
                let (table, h) = staged.next().expect("one staging per live plan");
                Shrunk {
                    x: x.clone(),
                    h,
                    table,
                    tiles: p.tiles,
                    tile_rows: p.tile_rows,
                    max_rank: p.max_rank,
                    rows,
                    n: *n,
                    fork: fork.clone(),
                }
            })
        })
        .collect())
}

/// A fork shared by the modules of one group shrink: joined by the first expand among them (or
/// when the last of them is dropped).
type SharedFork = Arc<Mutex<Option<super::side_stream::Fork>>>;

/// A queued shrink ([`shrink`]): its `h`, launch table and the activations it reads (kept alive
/// until the side stream is joined).
pub struct Shrunk {
    x: Tensor,
    h: CudaSlice<f32>,
    table: Arc<CudaSlice<u8>>,
    tiles: usize,
    tile_rows: usize,
    max_rank: usize,
    rows: usize,
    n: usize,
    fork: Option<SharedFork>,
}

impl Shrunk {
    /// The second half of [`add_lora`]: `base_out + scale · B·h` per row, one launch (after the
    /// main stream waits for the shrink when it ran on the side stream).
    pub fn expand(self, base_out: &Tensor) -> Result<Tensor, QuantError> {
        let mut out = expand_group(vec![self], &[base_out])?;
        Ok(out.pop().expect("one output per module"))
    }

    /// Makes the main stream wait for the side stream's shrink (once per group).
    fn join(&mut self) -> Result<(), QuantError> {
        if let Some(f) = self.fork.take() {
            let fork = f.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(fork) = fork {
                fork.join()?;
            }
        }
        Ok(())
    }
}

/// Kernel argument `ShrinkGroup` (kernels/sgmv.cu): per module its table of tiles, h, h's row
/// stride and first block row.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ShrinkGroup {
    tiles: [u64; MAX_GROUP],
    h: [u64; MAX_GROUP],
    r: [i32; MAX_GROUP],
    yb: [i32; MAX_GROUP],
    count: i32,
}

// SAFETY: plain old data laid out as the kernel's `ShrinkGroup` (repr(C), 8-byte pointers, ints).
unsafe impl DeviceRepr for ShrinkGroup {}

/// One group shrink's launch: the modules' plans with their tables and h.
struct ShrinkLaunch<'a> {
    x: &'a Tensor,
    rows: usize,
    k: usize,
    plans: &'a [&'a Plan],
    staged: &'a [(Arc<CudaSlice<u8>>, CudaSlice<f32>)],
}

impl ShrinkLaunch<'_> {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        stream: &Arc<CudaStream>,
    ) -> Result<(), QuantError> {
        let (xs, xl) = self.x.storage_and_layout();
        let Storage::Cuda(xs) = &*xs else {
            return Err(QuantError::Invalid("sgmv: tensors are not on a GPU".into()));
        };
        let xv = xs
            .as_cuda_slice::<T>()?
            .slice(xl.start_offset()..xl.start_offset() + self.rows * self.k);
        let x_vec = i32::from(
            self.k.is_multiple_of(8)
                && (xl.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16),
        );
        let mut g = ShrinkGroup {
            count: self.plans.len() as i32,
            ..Default::default()
        };
        let mut blocks = 0usize;
        for (i, (p, (table, h))) in self.plans.iter().zip(self.staged).enumerate() {
            // As in the expand: the addresses go into one struct argument; every buffer lives on
            // the main stream and is kept until the join.
            g.tiles[i] = table.device_ptr(stream).0;
            g.h[i] = h.device_ptr(stream).0;
            g.r[i] = p.max_rank as i32;
            g.yb[i] = blocks as i32;
            blocks += p.max_rank.div_ceil(SHRINK_J_PER_BLOCK);
        }
        // Decode batches whose adapter rows each form their own tile take the one-row kernel
        // (the same sums, more blocks per SM).
        let kernel = if self.plans.iter().all(|p| p.tile_rows == 1) {
            "sgmv_shrink1"
        } else {
            "sgmv_shrink"
        };
        let ki = self.k as i32;
        let shrink = function(
            dev,
            "sgmv",
            FATBIN,
            &format!("{kernel}_{}", super::dtype_name(self.x.dtype())),
        )?;
        let mut b = stream.launch_builder(&shrink);
        b.arg(&g).arg(&xv).arg(&ki).arg(&x_vec);
        let cfg = LaunchConfig {
            grid_dim: (self.plans[0].tiles as u32, blocks as u32, 1),
            block_dim: ((SHRINK_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `g` matches `ShrinkGroup` of kernels/sgmv.cu and the arguments
        // `sgmv_shrink_*` / `sgmv_shrink1_*`; every module's tiles cover rows < `rows` of x
        // ([rows, k]) and of its h ([rows, max_rank]), their pointers are live A tensors; the
        // block rows cover each module's ceil(max_rank / J_PER_BLOCK); the one-row kernel runs
        // only where every tile with a pair has one row.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

/// Kernel argument `ExpandGroup` (kernels/sgmv.cu): per module its table of tiles, h, base and
/// output, N, h's row stride and first block row.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ExpandGroup {
    tiles: [u64; MAX_GROUP],
    h: [u64; MAX_GROUP],
    base: [u64; MAX_GROUP],
    out: [u64; MAX_GROUP],
    n: [i32; MAX_GROUP],
    r: [i32; MAX_GROUP],
    yb: [i32; MAX_GROUP],
    count: i32,
}

// SAFETY: plain old data laid out as the kernel's `ExpandGroup` (repr(C), 8-byte pointers, ints).
unsafe impl DeviceRepr for ExpandGroup {}

/// [`Shrunk::expand`] of up to [`MAX_GROUP`] modules of one batch (q/k/v, gate/up) in one
/// launch: `bases[i] + delta_i` for each. The modules share the batch's rows (and so its tiles),
/// the activations' dtype and GPU.
pub fn expand_group(shrunk: Vec<Shrunk>, bases: &[&Tensor]) -> Result<Vec<Tensor>, QuantError> {
    if shrunk.is_empty() || shrunk.len() > MAX_GROUP || shrunk.len() != bases.len() {
        return Err(QuantError::Invalid(format!(
            "sgmv: {} modules and {} base outputs in one expand (1 to {MAX_GROUP} of each)",
            shrunk.len(),
            bases.len()
        )));
    }
    let mut shrunk = shrunk;
    for s in &mut shrunk {
        s.join()?;
    }
    let first = &shrunk[0];
    let dev = cuda_device(&first.x, "sgmv")?;
    let mut based = Vec::with_capacity(bases.len());
    for (s, base_out) in shrunk.iter().zip(bases) {
        check_base(&s.x, base_out)?;
        if s.x.dtype() != first.x.dtype()
            || !s.x.device().same_device(first.x.device())
            || s.tiles != first.tiles
            || s.rows != first.rows
        {
            return Err(QuantError::Invalid(
                "sgmv: the modules of one expand must share the batch (rows, tiles, dtype, GPU)"
                    .into(),
            ));
        }
        if base_out.dims() != [s.rows, s.n] {
            return Err(QuantError::Invalid(format!(
                "sgmv: the base output has shape {:?}, expected [{}, {}]",
                base_out.dims(),
                s.rows,
                s.n
            )));
        }
        based.push(base_out.contiguous()?);
    }
    let outs = match first.x.dtype() {
        DType::BF16 => launch_expand::<half::bf16>(dev, &shrunk, &based)?,
        DType::F16 => launch_expand::<half::f16>(dev, &shrunk, &based)?,
        _ => launch_expand::<f32>(dev, &shrunk, &based)?,
    };
    Ok(outs
        .into_iter()
        .zip(&shrunk)
        .map(|(o, s)| tensor_from_storage(o, (s.rows, s.n)))
        .collect())
}

fn launch_expand<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    shrunk: &[Shrunk],
    bases: &[Tensor],
) -> Result<Vec<CudaStorage>, QuantError> {
    let stream = dev.cuda_stream();
    let mut g = ExpandGroup {
        count: shrunk.len() as i32,
        ..Default::default()
    };
    let r_max = shrunk.iter().map(|s| s.max_rank).max().unwrap_or(0);
    let mut outs = Vec::with_capacity(shrunk.len());
    let mut blocks = 0usize;
    for (i, (s, base)) in shrunk.iter().zip(bases).enumerate() {
        // SAFETY: every element is written by the expand kernel (rows without adapter get the base).
        let out = unsafe { dev.alloc::<T>(s.rows * s.n)? };
        // The addresses go into one struct argument: the pointer guards (cudarc's event
        // bookkeeping, off on lorq's one stream per GPU) are let go at once, and every buffer
        // here lives on the stream the kernel runs on.
        g.tiles[i] = s.table.device_ptr(&stream).0;
        g.h[i] = s.h.device_ptr(&stream).0;
        g.base[i] = device_address(base, &stream, "the base output")?;
        g.out[i] = out.device_ptr(&stream).0;
        g.n[i] = s.n as i32;
        g.r[i] = s.max_rank as i32;
        g.yb[i] = blocks as i32;
        blocks += s.n.div_ceil(EXPAND_THREADS);
        outs.push(out);
    }
    // One-row tiles (decode) take the kernel with one row's registers (more blocks per SM).
    let kernel = if shrunk.iter().all(|s| s.tile_rows == 1) {
        "sgmv_expand1"
    } else {
        "sgmv_expand"
    };
    let expand = function(
        dev,
        "sgmv",
        FATBIN,
        &format!("{kernel}_{}", super::dtype_name(shrunk[0].x.dtype())),
    )?;
    let mut b = stream.launch_builder(&expand);
    b.arg(&g);
    let cfg = LaunchConfig {
        grid_dim: (shrunk[0].tiles as u32, blocks as u32, 1),
        block_dim: (EXPAND_THREADS as u32, 1, 1),
        shared_mem_bytes: (ROWS_PER_TILE * r_max * 4) as u32,
    };
    // SAFETY: `g` matches `ExpandGroup` of kernels/sgmv.cu; module i's base and output hold
    // rows × n_i elements, its h rows × max_rank_i, written by the shrink this waited for; its
    // blocks rows cover ceil(n_i / EXPAND_THREADS); the shared memory holds 8 × the largest rank
    // floats (<= MAX_RANK: within 48 KiB); the one-row kernel runs only where every tile with a
    // pair has one row.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(outs
        .into_iter()
        .map(|o| CudaStorage::wrap_cuda_slice(o, dev.clone()))
        .collect())
}

/// Launch tables kept on the GPU by content: a decode step with the same adapters makes the same
/// tables, so steady decoding uploads none, and a CUDA graph capture (which cannot upload) finds
/// them here. The content holds the A/B addresses, so equal bytes are an equal table.
type TableCache = RecentCache<(usize, Vec<u8>), Arc<CudaSlice<u8>>>;

/// Tables kept; past it the least recently used half goes (graphs keep their own tables alive).
const MAX_TABLES: usize = 4096;

fn uploaded_table(dev: &CudaDevice, bytes: &[u8]) -> Result<Arc<CudaSlice<u8>>, QuantError> {
    static TABLES: OnceLock<Mutex<TableCache>> = OnceLock::new();
    let key = (dev.cuda_stream().context().ordinal(), bytes.to_vec());
    let mut tables = TABLES
        .get_or_init(|| Mutex::new(RecentCache::new(MAX_TABLES)))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(t) = tables.get(&key) {
        super::graph::keep_alive(t.clone());
        return Ok(t);
    }
    if super::graph::capturing() {
        return Err(QuantError::Invalid(
            "sgmv: a new adapter table during a CUDA graph capture (run the batch once first)"
                .into(),
        ));
    }
    let t = Arc::new(dev.clone_htod(bytes)?);
    tables.insert(key, t.clone());
    Ok(t)
}
