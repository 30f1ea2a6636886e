//! Attention over a paged KV cache on the GPU (`kernels/paged_attention.cu`): RoPE + append of
//! every new token's key and value into its page, and causal (optionally sliding-window) GQA
//! attention of every new token over its sequence, each in one launch for the whole batch. The
//! pages and block tables are owned by the model crate (`lorq-model`'s paged KV cache); the CPU
//! `attend` there is the reference.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Storage, Tensor};

use super::{cuda_device, function, tensor_from_storage};
use crate::QuantError;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/paged_attention.fatbin"));

/// Head dimensions the attention kernel is built for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// Most keys one attention block scores (kernels/paged_attention.cu `PMAX`).
const PMAX: usize = 256;
/// Query heads per attention block (`GMAX`).
const GMAX: usize = 8;
/// Warps per attention block (`NW`).
const NW: usize = 4;
/// (head, partition) weights one merge holds in shared memory (`MERGE_MAX`).
const MERGE_MAX: usize = GMAX * PMAX;
/// Query heads per block of the `_g4` kernels, taken by GQA groups of up to 4 heads (Llama 3,
/// Mistral): fewer registers, twice the blocks per SM (kernels/paged_attention.cu `G4_BLOCKS`).
const G4: usize = 4;

static FOUR_HEAD_BLOCKS: AtomicBool = AtomicBool::new(true);

/// Turns the 4-head blocks on or off for the whole process (on by default), e.g. to measure what
/// they bring (`lorq bench decode --compare-attention-blocks`); off, every group takes the
/// [`GMAX`]-head blocks.
pub fn set_4_head_blocks(on: bool) {
    FOUR_HEAD_BLOCKS.store(on, Ordering::Relaxed);
}

static TENSOR_CORES: AtomicBool = AtomicBool::new(true);

/// Turns the tensor-core attention kernels (`_mma`: keys and values through a shared-memory ring
/// of asynchronous copies, scores and outputs as mma tiles) on or off for the whole process (on by
/// default; bf16/f16 caches only), e.g. to measure them (`lorq bench decode
/// --compare-attention-mma`); off, 16-bit caches take the FMA kernels, as f32 caches always do.
pub fn set_tensor_core_attention(on: bool) {
    TENSOR_CORES.store(on, Ordering::Relaxed);
}

/// Query heads one attention block holds for GQA groups of `group` heads: the `_g4` kernels
/// for groups of up to [`G4`], else [`GMAX`] (groups past it take several blocks).
fn block_heads(group: usize) -> usize {
    if group <= G4 && FOUR_HEAD_BLOCKS.load(Ordering::Relaxed) {
        G4
    } else {
        GMAX
    }
}

/// Where every new token (row) of a batch sits: `row_pos[r]` its position in its sequence,
/// `row_seq[r]` its sequence (row of `block_tables`), `row_slot[r]` the page slot (block · block
/// size + offset) its key and value go to. All `u32` tensors on the GPU, uploaded once per step
/// and shared by every layer.
#[derive(Clone, Copy)]
pub struct PagedBatch<'a> {
    pub row_pos: &'a Tensor,
    pub row_seq: &'a Tensor,
    pub row_slot: &'a Tensor,
    /// `[seqs, max_blocks]` block ids (unused entries are never read).
    pub block_tables: &'a Tensor,
    /// The longest key range one row attends to (after the sliding window), for the split.
    pub max_keys: usize,
    /// Streaming multiprocessors of the GPU (how many blocks fill it).
    pub sms: usize,
    /// Zeroed `u32` tickets, at least [`tickets_needed`] of them for this batch's rows: with them
    /// the attention merges a split context in the same launch (the last block of each row and
    /// KV head merges; every launch leaves them zeroed again, so one set serves all the layers of
    /// a step). Without them, or where a context is split into more partitions than one block
    /// merges, a second launch merges.
    pub tickets: Option<&'a Tensor>,
}

/// Tickets ([`PagedBatch::tickets`]) a batch of `rows` new tokens needs for the one-launch merge.
pub fn tickets_needed(rows: usize, heads: usize, kv_heads: usize) -> usize {
    rows * kv_heads * (heads / kv_heads.max(1)).div_ceil(GMAX)
}

/// The shape of one layer's pages: `[num_blocks, kv_heads, block_size, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct PageShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// `RopeNew<T>` of kernels/paged_attention.cu: device addresses of a decode step's un-rotated k
/// and v, the RoPE tables and the row slots (all zero: the queries come rotated, the keys appended).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RopeNew {
    k: u64,
    v: u64,
    cos: u64,
    sin: u64,
    row_slot: u64,
}
// SAFETY: plain device addresses, laid out as the kernel's struct.
unsafe impl DeviceRepr for RopeNew {}

fn dtype_name(dtype: DType) -> Result<&'static str, QuantError> {
    Ok(match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        d => {
            return Err(QuantError::Invalid(format!(
                "paged attention: unsupported dtype {d:?} (f32, bf16 or f16)"
            )))
        }
    })
}

/// The device slice behind `t` from its start offset (any contiguous tensor).
fn view<'a, T: CudaDType + DeviceRepr>(
    cs: &'a CudaStorage,
    t: &Tensor,
    what: &str,
) -> Result<CudaView<'a, T>, QuantError> {
    let layout = t.layout();
    if !layout.is_contiguous() {
        return Err(QuantError::Invalid(format!(
            "paged attention: {what} must be contiguous"
        )));
    }
    let start = layout.start_offset();
    Ok(cs
        .as_cuda_slice::<T>()?
        .slice(start..start + t.elem_count()))
}

fn check(t: &Tensor, dtype: DType, what: &str) -> Result<(), QuantError> {
    if t.dtype() != dtype {
        return Err(QuantError::Invalid(format!(
            "paged attention: {what} is {:?}, expected {dtype:?}",
            t.dtype()
        )));
    }
    cuda_device(t, what)?;
    Ok(())
}

/// Storage guard of a CUDA tensor (its `CudaStorage` borrowed for the launch; candle's lock guard).
fn guard<'a>(t: &'a Tensor, what: &str) -> Result<impl Deref<Target = Storage> + 'a, QuantError> {
    let (s, _) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(_) => Ok(s),
        _ => Err(QuantError::Invalid(format!(
            "paged attention: {what} is not on a GPU"
        ))),
    }
}

/// [`guard`] of each tensor of a launch, `what` naming them.
fn guards<'a, const N: usize>(
    t: [&'a Tensor; N],
    what: [&str; N],
) -> Result<Vec<impl Deref<Target = Storage> + 'a>, QuantError> {
    t.iter().zip(what).map(|(t, w)| guard(t, w)).collect()
}

fn cs(s: &Storage) -> &CudaStorage {
    match s {
        Storage::Cuda(c) => c,
        _ => unreachable!("checked by guard"),
    }
}

/// A step's new tokens for the paged cache: un-rotated queries `[rows, heads·hd]`, keys and
/// values `[rows, kv_heads·hd]`, and the RoPE tables `cos`/`sin` `[positions, hd/2]` from
/// position 0, all in the compute dtype.
#[derive(Clone, Copy)]
pub struct NewTokens<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
}

/// Checks the new tokens of a step against each other, the RoPE tables, the pages and the batch
/// layout (every tensor on the GPU in q's dtype); returns the row count.
fn check_new_tokens(
    new: NewTokens<'_>,
    batch: &PagedBatch<'_>,
    k_cache: &Tensor,
    v_cache: &Tensor,
    shape: PageShape,
) -> Result<usize, QuantError> {
    let NewTokens { q, k, v, cos, sin } = new;
    let dtype = q.dtype();
    let rows = q.dim(0)?;
    let PageShape {
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = shape;
    for (t, w, what) in [(q, heads, "q"), (k, kv_heads, "k"), (v, kv_heads, "v")] {
        check(t, dtype, what)?;
        if t.dims() != [rows, w * hd] {
            return Err(QuantError::Invalid(format!(
                "paged attention: {what} has shape {:?}, expected [{rows}, {}]",
                t.dims(),
                w * hd
            )));
        }
    }
    for (t, what) in [
        (cos, "cos"),
        (sin, "sin"),
        (k_cache, "k_cache"),
        (v_cache, "v_cache"),
    ] {
        check(t, dtype, what)?;
    }
    if !hd.is_multiple_of(2) || cos.dim(1)? != hd / 2 {
        return Err(QuantError::Invalid(format!(
            "paged attention: RoPE tables {:?} do not fit head_dim {hd}",
            cos.dims()
        )));
    }
    if batch.row_pos.elem_count() != rows || batch.row_slot.elem_count() != rows {
        return Err(QuantError::Invalid(format!(
            "paged attention: {rows} rows but {} positions / {} slots",
            batch.row_pos.elem_count(),
            batch.row_slot.elem_count()
        )));
    }
    Ok(rows)
}

/// RoPE on the new tokens' `q` and `k` at each row's position, and the append of `k`, `v` into
/// the pages `k_cache`/`v_cache` at each row's slot (written in place). Returns the rotated
/// queries `[rows, heads·hd]`.
pub fn rope_append(
    new: NewTokens<'_>,
    batch: &PagedBatch<'_>,
    k_cache: &Tensor,
    v_cache: &Tensor,
    shape: PageShape,
) -> Result<Tensor, QuantError> {
    let NewTokens { q, k, v, cos, sin } = new;
    let dev = cuda_device(q, "q")?;
    let dtype = q.dtype();
    let name = format!("rope_append_{}", dtype_name(dtype)?);
    let rows = check_new_tokens(new, batch, k_cache, v_cache, shape)?;
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        t: [&Tensor; 9],
        rows: usize,
        shape: PageShape,
    ) -> Result<CudaStorage, QuantError> {
        let n = [
            "q", "k", "v", "cos", "sin", "row_pos", "row_slot", "k_cache", "v_cache",
        ];
        let g = guards(t, n)?;
        let q = view::<T>(cs(&g[0]), t[0], n[0])?;
        let k = view::<T>(cs(&g[1]), t[1], n[1])?;
        let v = view::<T>(cs(&g[2]), t[2], n[2])?;
        let cos = view::<T>(cs(&g[3]), t[3], n[3])?;
        let sin = view::<T>(cs(&g[4]), t[4], n[4])?;
        let pos = view::<u32>(cs(&g[5]), t[5], n[5])?;
        let slot = view::<u32>(cs(&g[6]), t[6], n[6])?;
        let kc = view::<T>(cs(&g[7]), t[7], n[7])?;
        let vc = view::<T>(cs(&g[8]), t[8], n[8])?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(rows * shape.heads * shape.head_dim)? };
        let f = function(dev, "paged_attention", FATBIN, name)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (h, kvh, hd, bs) = (
            shape.heads as i32,
            shape.kv_heads as i32,
            shape.head_dim as i32,
            shape.block_size as i32,
        );
        b.arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&cos)
            .arg(&sin)
            .arg(&pos)
            .arg(&slot);
        b.arg(&out).arg(&kc).arg(&vc);
        b.arg(&h).arg(&kvh).arg(&hd).arg(&bs);
        // Enough blocks per row that each thread rotates about one pair.
        let pairs = (shape.heads + 2 * shape.kv_heads) * shape.head_dim / 2;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, pairs.div_ceil(256).clamp(1, 64) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `rope_append_*`; slots and positions were checked against
        // the pool and the RoPE tables by the caller.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let t = [
        q,
        k,
        v,
        cos,
        sin,
        batch.row_pos,
        batch.row_slot,
        k_cache,
        v_cache,
    ];
    let s = match dtype {
        DType::BF16 => go::<half::bf16>(dev, &name, t, rows, shape)?,
        DType::F16 => go::<half::f16>(dev, &name, t, rows, shape)?,
        _ => go::<f32>(dev, &name, t, rows, shape)?,
    };
    Ok(tensor_from_storage(s, (rows, shape.heads * shape.head_dim)))
}

static PARTITION_KEYS: AtomicUsize = AtomicUsize::new(0);

/// Forces the keys per attention partition for the whole process (`None`: the automatic choice
/// of [`part_len`]), e.g. to measure the choice (`lorq bench decode
/// --compare-attention-partitions`). Values past [`PMAX`] are clamped to it.
pub fn set_partition_keys(keys: Option<usize>) {
    PARTITION_KEYS.store(keys.map_or(0, |k| k.clamp(1, PMAX)), Ordering::Relaxed);
}

/// Keys per partition: the largest of 256/128/64 that still gives the GPU two blocks per SM, else 32.
fn part_len(blocks_per_part: usize, max_keys: usize, sms: usize) -> usize {
    let forced = PARTITION_KEYS.load(Ordering::Relaxed);
    if forced > 0 {
        return forced;
    }
    for p in [PMAX, 128, 64] {
        if blocks_per_part * max_keys.div_ceil(p) >= 2 * sms {
            return p;
        }
    }
    // Few blocks (decode at small batch): short partitions, more of them in flight; each
    // block's key loop is a chain of dependent loads (ncu on an H100, batch 1, 8 KV heads: 19 us
    // with 64 keys per partition).
    32
}

/// Checks rotated queries `[rows, heads·hd]` and the pages against each other (one dtype, on the
/// GPU); returns the row count.
fn check_queries(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    shape: PageShape,
) -> Result<usize, QuantError> {
    let dtype = q.dtype();
    let rows = q.dim(0)?;
    check(q, dtype, "q")?;
    check(k_cache, dtype, "k_cache")?;
    check(v_cache, dtype, "v_cache")?;
    let width = shape.heads * shape.head_dim;
    if q.dims() != [rows, width] {
        return Err(QuantError::Invalid(format!(
            "paged attention: q has shape {:?}, expected [{rows}, {width}]",
            q.dims()
        )));
    }
    Ok(rows)
}

/// Causal attention of every row's query heads (`q`: `[rows, heads·hd]`, already rotated) over
/// its sequence's keys `0..=pos` in the pages (only the last `window` with a sliding window).
/// Returns `[rows, heads·hd]`.
pub fn attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &PagedBatch<'_>,
    shape: PageShape,
    window: Option<usize>,
) -> Result<Tensor, QuantError> {
    attention_launch(q, None, k_cache, v_cache, batch, shape, window)
}

/// A decode step's [`rope_append`] and [`attention`] in one launch: every row the only new token
/// of its sequence (the caller's contract: no row reads a key another row of the launch
/// appends), which lets the attention rotate the queries and append the new key and value itself
/// (the same rounding as `rope_append`). Returns `[rows, heads·hd]`.
pub fn decode_attention(
    new: NewTokens<'_>,
    batch: &PagedBatch<'_>,
    k_cache: &Tensor,
    v_cache: &Tensor,
    shape: PageShape,
    window: Option<usize>,
) -> Result<Tensor, QuantError> {
    let NewTokens { q, k, v, cos, sin } = new;
    let rows = check_new_tokens(new, batch, k_cache, v_cache, shape)?;
    let seqs = batch.block_tables.dim(0)?;
    if rows > seqs || batch.row_seq.elem_count() != rows {
        return Err(QuantError::Invalid(format!(
            "paged attention: a decode step has at most one new token per sequence, got {rows} rows for {seqs} sequences"
        )));
    }
    let rope = [k, v, cos, sin, batch.row_slot];
    attention_launch(q, Some(rope), k_cache, v_cache, batch, shape, window)
}

/// The attention launch; `rope`: k, v, cos, sin and the row slots of a decode step whose RoPE and
/// append the kernel does.
fn attention_launch(
    q: &Tensor,
    rope: Option<[&Tensor; 5]>,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &PagedBatch<'_>,
    shape: PageShape,
    window: Option<usize>,
) -> Result<Tensor, QuantError> {
    let dev = cuda_device(q, "q")?;
    let dtype = q.dtype();
    let tn = dtype_name(dtype)?;
    let PageShape {
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = shape;
    if !HEAD_DIMS.contains(&hd) {
        return Err(QuantError::Invalid(format!(
            "paged attention: head_dim {hd} has no kernel (built for {HEAD_DIMS:?})"
        )));
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(QuantError::Invalid(format!(
            "paged attention: {heads} query heads are not a multiple of {kv_heads} KV heads"
        )));
    }
    let rows = check_queries(q, k_cache, v_cache, shape)?;
    let max_blocks = batch.block_tables.dim(1)?;
    let chunks = (heads / kv_heads).div_ceil(GMAX);
    let max_keys = batch.max_keys.max(1);
    let pl = part_len(kv_heads * chunks * rows, max_keys, batch.sms.max(1));
    let num_parts = max_keys.div_ceil(pl);
    let window = window.unwrap_or(0) as i32;
    let scale_log2 = (1.0 / (hd as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
    if num_parts > MERGE_MAX {
        return Err(QuantError::Invalid(format!(
            "paged attention: {max_keys} keys in {num_parts} partitions of {pl}, more than the \
             {MERGE_MAX} partitions one merge takes"
        )));
    }
    // The merge in the same launch holds the weights of a block's heads in its score buffer
    // (block_heads × PMAX floats).
    // The tensor-core kernels hold up to GMAX heads a block, like the 8-head FMA kernels.
    let mma = dtype != DType::F32 && TENSOR_CORES.load(Ordering::Relaxed);
    let gm = if mma {
        GMAX
    } else {
        block_heads(heads / kv_heads)
    };
    let one_launch_merge = num_parts > 1 && (heads / kv_heads).min(gm) * num_parts <= gm * PMAX;
    // The kernel's name suffix: `_mma`, or the FMA kernel's block size (`_g4`: G4 heads).
    let variant = if mma {
        "_mma"
    } else if gm == G4 {
        "_g4"
    } else {
        ""
    };
    let tickets = match batch.tickets {
        Some(t) if one_launch_merge => {
            check(t, DType::U32, "tickets")?;
            let need = tickets_needed(rows, heads, kv_heads);
            if t.elem_count() < need {
                return Err(QuantError::Invalid(format!(
                    "paged attention: {} tickets for {rows} rows, {need} needed",
                    t.elem_count()
                )));
            }
            Some(t)
        }
        _ => None,
    };

    #[allow(clippy::too_many_arguments)]
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        tn: &str,
        variant: &str,
        t: [&Tensor; 6],
        tickets: Option<&Tensor>,
        rope: Option<[&Tensor; 5]>,
        rows: usize,
        shape: PageShape,
        max_blocks: usize,
        chunks: usize,
        pl: usize,
        num_parts: usize,
        window: i32,
        scale_log2: f32,
    ) -> Result<CudaStorage, QuantError> {
        let n = [
            "q",
            "k_cache",
            "v_cache",
            "row_pos",
            "row_seq",
            "block_tables",
        ];
        let g = guards(t, n)?;
        let q = view::<T>(cs(&g[0]), t[0], n[0])?;
        let kc = view::<T>(cs(&g[1]), t[1], n[1])?;
        let vc = view::<T>(cs(&g[2]), t[2], n[2])?;
        let pos = view::<u32>(cs(&g[3]), t[3], n[3])?;
        let seq = view::<u32>(cs(&g[4]), t[4], n[4])?;
        let tables = view::<u32>(cs(&g[5]), t[5], n[5])?;
        let PageShape {
            heads,
            kv_heads,
            head_dim: hd,
            block_size: bs,
        } = shape;
        // SAFETY: every element is written by the kernels.
        let out = unsafe { dev.alloc::<T>(rows * heads * hd)? };
        let parts = if num_parts > 1 { num_parts } else { 0 };
        // SAFETY: the partials are written by the attention kernel before the combine reads them.
        let part_ml = unsafe { dev.alloc::<f32>((rows * heads * parts * 2).max(1))? };
        let part_acc = unsafe { dev.alloc::<f32>((rows * heads * parts * hd).max(1))? };
        let ticket_guard = match tickets {
            Some(t) => Some((t, guard(t, "tickets")?)),
            None => None,
        };
        let tickets = match &ticket_guard {
            Some((t, s)) => Some(view::<u32>(cs(s), t, "tickets")?),
            None => None,
        };
        let stream = dev.cuda_stream();
        let rope_guards = match rope {
            Some(r) => {
                let n = ["k", "v", "cos", "sin", "row_slot"];
                Some([
                    (r[0], guard(r[0], n[0])?),
                    (r[1], guard(r[1], n[1])?),
                    (r[2], guard(r[2], n[2])?),
                    (r[3], guard(r[3], n[3])?),
                    (r[4], guard(r[4], n[4])?),
                ])
            }
            None => None,
        };
        let mut rope_arg = RopeNew::default();
        if let Some(g) = &rope_guards {
            // The buffers stay borrowed (the guards) until the launch; lorq runs one stream per
            // GPU, so their events order nothing (sgmv's device_address does the same).
            let addr = |i: usize, what: &str| -> Result<u64, QuantError> {
                Ok(if i < 4 {
                    view::<T>(cs(&g[i].1), g[i].0, what)?.device_ptr(&stream).0
                } else {
                    view::<u32>(cs(&g[i].1), g[i].0, what)?
                        .device_ptr(&stream)
                        .0
                })
            };
            rope_arg = RopeNew {
                k: addr(0, "k")?,
                v: addr(1, "v")?,
                cos: addr(2, "cos")?,
                sin: addr(3, "sin")?,
                row_slot: addr(4, "row_slot")?,
            };
        }
        let kernel = if rope.is_some() {
            "paged_attn_rope"
        } else {
            "paged_attn"
        };
        let f = function(
            dev,
            "paged_attention",
            FATBIN,
            &format!("{kernel}_{tn}_hd{hd}{variant}"),
        )?;
        let mut b = stream.launch_builder(&f);
        let ints = [
            max_blocks as i32,
            heads as i32,
            kv_heads as i32,
            bs as i32,
            window,
            pl as i32,
            num_parts as i32,
        ];
        b.arg(&q)
            .arg(&kc)
            .arg(&vc)
            .arg(&out)
            .arg(&part_ml)
            .arg(&part_acc);
        let no_tickets = 0u64; // a null pointer: the combine runs as a second launch
        match &tickets {
            Some(t) => b.arg(t),
            None => b.arg(&no_tickets),
        };
        b.arg(&pos).arg(&seq).arg(&tables);
        for i in &ints {
            b.arg(i);
        }
        b.arg(&scale_log2);
        b.arg(&rope_arg);
        let cfg = LaunchConfig {
            grid_dim: ((kv_heads * chunks) as u32, rows as u32, num_parts as u32),
            block_dim: ((NW * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `paged_attn_*`; block tables hold valid block ids for
        // every position up to each row's.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        if num_parts > 1 && tickets.is_none() {
            let f = function(
                dev,
                "paged_attention",
                FATBIN,
                &format!("paged_attn_combine_{tn}"),
            )?;
            let mut b = stream.launch_builder(&f);
            let (h, np, hdi) = (heads as i32, num_parts as i32, hd as i32);
            b.arg(&part_ml)
                .arg(&part_acc)
                .arg(&out)
                .arg(&h)
                .arg(&np)
                .arg(&hdi);
            let cfg = LaunchConfig {
                grid_dim: (heads as u32, rows as u32, 1),
                block_dim: (hd as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `paged_attn_combine_*`.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let t = [
        q,
        k_cache,
        v_cache,
        batch.row_pos,
        batch.row_seq,
        batch.block_tables,
    ];
    let args = (
        rows, shape, max_blocks, chunks, pl, num_parts, window, scale_log2,
    );
    let s = match dtype {
        DType::BF16 => go::<half::bf16>(
            dev, tn, variant, t, tickets, rope, args.0, args.1, args.2, args.3, args.4, args.5,
            args.6, args.7,
        )?,
        DType::F16 => go::<half::f16>(
            dev, tn, variant, t, tickets, rope, args.0, args.1, args.2, args.3, args.4, args.5,
            args.6, args.7,
        )?,
        _ => go::<f32>(
            dev, tn, variant, t, tickets, rope, args.0, args.1, args.2, args.3, args.4, args.5,
            args.6, args.7,
        )?,
    };
    Ok(tensor_from_storage(s, (rows, heads * hd)))
}

/// Query rows (token, head) of one prefill attention block (kernels/paged_attention.cu `PF_ROWS`).
const PREFILL_ROWS: usize = 64;
/// Head dimensions the tiled prefill kernels are built for (256 would not fit its queries and
/// outputs in registers).
const PREFILL_HEAD_DIMS: [usize; 2] = [64, 128];
/// Elements of one K (or V) tile of the prefill kernels: keys per tile x head dim (`8192 / HD`
/// keys in kernels/paged_attention.cu).
const PREFILL_TILE_ELEMS: usize = 8192;

static PREFILL_TILES: AtomicBool = AtomicBool::new(true);

/// Turns the tiled prefill attention ([`prefill_attention`]) on or off for the whole process (on
/// by default), e.g. to measure it (`lorq bench decode --compare-prefill-tiles`); off, prefill
/// rows take [`attention`], one block per row.
pub fn set_prefill_tiles(on: bool) {
    PREFILL_TILES.store(on, Ordering::Relaxed);
}

/// Tokens per query tile of [`prefill_attention`] for a cache of `dtype` and `shape` (all the
/// query heads of a KV head share a block: 64 / group tokens), or `None` where the tiled kernels
/// do not apply: f32 caches, head dims other than 64 and 128, GQA groups past 64 heads, or the
/// tensor-core kernels or the tiles switched off.
pub fn prefill_tile_tokens(dtype: DType, shape: PageShape) -> Option<usize> {
    let group = shape.heads / shape.kv_heads.max(1);
    (matches!(dtype, DType::BF16 | DType::F16)
        && PREFILL_HEAD_DIMS.contains(&shape.head_dim)
        && shape.kv_heads > 0
        && shape.heads.is_multiple_of(shape.kv_heads)
        && (1..=PREFILL_ROWS).contains(&group)
        && TENSOR_CORES.load(Ordering::Relaxed)
        && PREFILL_TILES.load(Ordering::Relaxed))
    .then_some(PREFILL_ROWS / group)
}

/// The query tiles of a step for [`prefill_attention`]: for each sequence's run of new rows
/// `(first row, rows)` (consecutive rows, ascending positions), tiles of at most `tokens` rows, as
/// `(first row, rows)` pairs flattened. Every row lands in exactly one tile.
pub fn prefill_tiles(runs: impl IntoIterator<Item = (usize, usize)>, tokens: usize) -> Vec<u32> {
    let tokens = tokens.max(1);
    let mut tiles = Vec::new();
    for (first, rows) in runs {
        for start in (0..rows).step_by(tokens) {
            tiles.push((first + start) as u32);
            tiles.push(tokens.min(rows - start) as u32);
        }
    }
    tiles
}

/// Causal (optionally sliding-window) attention of a step's rows (`q`: `[rows, heads·hd]`, already
/// rotated, the keys appended) on query tiles: `tiles` (`u32` on the GPU, from [`prefill_tiles`]
/// with [`prefill_tile_tokens`] tokens) must cover every row once, each tile rows of one sequence
/// at ascending positions. One block per (tile, KV head) reads the keys once for all its rows,
/// where [`attention`] reads them once per row. Returns `[rows, heads·hd]`.
pub fn prefill_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &PagedBatch<'_>,
    tiles: &Tensor,
    shape: PageShape,
    window: Option<usize>,
) -> Result<Tensor, QuantError> {
    let dev = cuda_device(q, "q")?;
    let dtype = q.dtype();
    let tn = dtype_name(dtype)?;
    let PageShape {
        heads,
        kv_heads,
        head_dim: hd,
        block_size: bs,
    } = shape;
    let Some(tokens) = prefill_tile_tokens(dtype, shape) else {
        return Err(QuantError::Invalid(format!(
            "paged prefill attention: no tiled kernel for {dtype:?} caches, head_dim {hd}, \
             {heads} query heads over {kv_heads} KV heads (bf16/f16, head_dim {PREFILL_HEAD_DIMS:?}, \
             groups up to {PREFILL_ROWS} heads, tensor cores on)"
        )));
    };
    let rows = check_queries(q, k_cache, v_cache, shape)?;
    check(tiles, DType::U32, "tiles")?;
    let num_tiles = tiles.elem_count() / 2;
    if !tiles.elem_count().is_multiple_of(2) || num_tiles == 0 || num_tiles > rows {
        return Err(QuantError::Invalid(format!(
            "paged prefill attention: {} tile entries for {rows} rows (pairs of first row and \
             rows, at most one tile a row, tiles of up to {tokens} rows)",
            tiles.elem_count()
        )));
    }
    let max_blocks = batch.block_tables.dim(1)?;
    let scale_log2 = (1.0 / (hd as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
    let window = window.unwrap_or(0) as i32;
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        t: [&Tensor; 7],
        rows: usize,
        num_tiles: usize,
        ints: [i32; 6],
        scale_log2: f32,
    ) -> Result<CudaStorage, QuantError> {
        let n = [
            "q",
            "k_cache",
            "v_cache",
            "tiles",
            "row_pos",
            "row_seq",
            "block_tables",
        ];
        let g = guards(t, n)?;
        let q = view::<T>(cs(&g[0]), t[0], n[0])?;
        let kc = view::<T>(cs(&g[1]), t[1], n[1])?;
        let vc = view::<T>(cs(&g[2]), t[2], n[2])?;
        let tiles = view::<u32>(cs(&g[3]), t[3], n[3])?;
        let pos = view::<u32>(cs(&g[4]), t[4], n[4])?;
        let seq = view::<u32>(cs(&g[5]), t[5], n[5])?;
        let tables = view::<u32>(cs(&g[6]), t[6], n[6])?;
        let [max_blocks, heads, kv_heads, hd, bs, window] = ints;
        // SAFETY: the tiles cover every row (the caller's contract); each writes its rows.
        let out = unsafe { dev.alloc::<T>(rows * (heads * hd) as usize)? };
        // Two stages of a K and a V tile.
        let smem = 2 * 2 * PREFILL_TILE_ELEMS * std::mem::size_of::<T>();
        let f = super::function_with_shared(dev, "paged_attention", FATBIN, name, smem)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let nt = num_tiles as i32;
        b.arg(&q).arg(&kc).arg(&vc).arg(&out).arg(&tiles).arg(&nt);
        b.arg(&pos).arg(&seq).arg(&tables);
        for i in [&max_blocks, &heads, &kv_heads, &bs, &window] {
            b.arg(i);
        }
        b.arg(&scale_log2);
        let cfg = LaunchConfig {
            grid_dim: (num_tiles as u32, kv_heads as u32, 1),
            block_dim: ((NW * 32) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the arguments match `paged_prefill_*`; tiles name rows of this step, block
        // tables hold valid block ids for every position up to each row's.
        unsafe { b.launch(cfg) }.w()?;
        drop(b);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let name = format!("paged_prefill_{tn}_hd{hd}");
    let t = [
        q,
        k_cache,
        v_cache,
        tiles,
        batch.row_pos,
        batch.row_seq,
        batch.block_tables,
    ];
    let ints = [
        max_blocks as i32,
        heads as i32,
        kv_heads as i32,
        hd as i32,
        bs as i32,
        window,
    ];
    let s = match dtype {
        DType::BF16 => go::<half::bf16>(dev, &name, t, rows, num_tiles, ints, scale_log2)?,
        _ => go::<half::f16>(dev, &name, t, rows, num_tiles, ints, scale_log2)?,
    };
    Ok(tensor_from_storage(s, (rows, heads * hd)))
}

/// Streaming multiprocessors of `dev` (sizes the attention split).
pub fn multiprocessors(dev: &CudaDevice) -> Result<usize, QuantError> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let n = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(n.max(1) as usize)
}
