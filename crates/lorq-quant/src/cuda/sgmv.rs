//! Many LoRA adapters over one batch in two launches (`kernels/sgmv.cu`, the role of Punica's
//! SGMV/BGMV kernels): every row of `x [rows, in]` adds its own adapter's `scale · B·(A·x)` to the
//! base output, one shrink launch (`h = A·x`, f32) and one expand launch (`out = base + scale·B·h`)
//! whatever the number of adapters, ranks or weight dtypes in the batch.
//!
//! The A/B weights are read in place, in their stored dtype (f32/bf16/f16, widened to f32 in
//! registers, as PEFT upcasts them to float32): no per-call copy. The kernels read a small table —
//! per segment the A/B addresses, rank, dtype and scale, per tile of at most [`ROWS_PER_TILE`]
//! rows its segment — uploaded once per distinct content and kept. The CPU reference is
//! `lorq_lora::BatchAdapters::apply` on CPU tensors (`crates/lorq-lora/tests/cuda_sgmv.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, DType, Storage, Tensor};

use super::{cuda_device, function, tensor_from_storage};
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
/// Flags of a segment (kernels/sgmv.cu): weight dtype in the low byte, then the vector paths.
const SHRINK_VEC: u32 = 0x100;
const EXPAND_VEC: u32 = 0x200;
const SEG_BYTES: usize = 32;

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

/// The launch table: segments (32 bytes each) then tiles (16 bytes each), and the tile count.
struct Plan {
    bytes: Vec<u8>,
    segments: usize,
    tiles: usize,
    max_rank: usize,
}

fn plan(
    segments: &[LoraSegment<'_>],
    x: &Tensor,
    n: usize,
    k: usize,
    stream: &Arc<CudaStream>,
) -> Result<Plan, QuantError> {
    let mut bytes = Vec::with_capacity(segments.len() * (SEG_BYTES + 16));
    let mut seg_index = Vec::with_capacity(segments.len());
    let mut max_rank = 0usize;
    let mut n_segs = 0usize;
    for (i, s) in segments.iter().enumerate() {
        let Some(p) = s.lora else {
            seg_index.push(-1i32);
            continue;
        };
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
        bytes.extend_from_slice(&a.to_le_bytes());
        bytes.extend_from_slice(&b.to_le_bytes());
        bytes.extend_from_slice(&(r as i32).to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&p.scale.to_le_bytes());
        bytes.extend_from_slice(&0i32.to_le_bytes());
        seg_index.push(n_segs as i32);
        n_segs += 1;
        max_rank = max_rank.max(r);
    }
    let mut tiles = 0usize;
    let mut row = 0usize;
    for (s, &si) in segments.iter().zip(&seg_index) {
        let mut done = 0;
        while done < s.rows {
            let nr = (s.rows - done).min(ROWS_PER_TILE);
            for v in [si, (row + done) as i32, nr as i32, 0] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            tiles += 1;
            done += nr;
        }
        row += s.rows;
    }
    Ok(Plan {
        bytes,
        segments: n_segs,
        tiles,
        max_rank,
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
    let dev = cuda_device(x, "sgmv")?;
    if !base_out.device().same_device(x.device()) {
        return Err(QuantError::Invalid(format!(
            "sgmv: the base output is on {:?}, the activations on {:?}",
            base_out.device(),
            x.device()
        )));
    }
    let dtype = x.dtype();
    if dtype != base_out.dtype() || dtype_code(dtype).is_none() {
        return Err(QuantError::Invalid(format!(
            "sgmv: activations {:?} and base output {:?} must share one dtype of f32, bf16, f16",
            dtype,
            base_out.dtype()
        )));
    }
    let (rows, k) = x.dims2().map_err(|_| {
        QuantError::Invalid(format!(
            "sgmv: x has shape {:?}, expected [rows, in]",
            x.dims()
        ))
    })?;
    let (rows_out, n) = base_out.dims2().map_err(|_| {
        QuantError::Invalid(format!(
            "sgmv: the base output has shape {:?}, expected [rows, out]",
            base_out.dims()
        ))
    })?;
    let seg_rows: usize = segments.iter().map(|s| s.rows).sum();
    if rows_out != rows || seg_rows != rows {
        return Err(QuantError::Invalid(format!(
            "sgmv: x has {rows} rows, the base output {rows_out}, the segments {seg_rows}"
        )));
    }
    let stream = dev.cuda_stream();
    let p = plan(segments, x, n, k, &stream)?;
    if p.segments == 0 || rows == 0 {
        return Ok(base_out.clone());
    }
    let x = x.contiguous()?;
    let base = base_out.contiguous()?;
    let s = match dtype {
        DType::BF16 => launch::<half::bf16>(dev, &x, &base, &p, rows, n, k, "bf16")?,
        DType::F16 => launch::<half::f16>(dev, &x, &base, &p, rows, n, k, "f16")?,
        _ => launch::<f32>(dev, &x, &base, &p, rows, n, k, "f32")?,
    };
    Ok(tensor_from_storage(s, (rows, n)))
}

/// Launch tables kept on the GPU by content: a decode step with the same adapters makes the same
/// tables, so steady decoding uploads none, and a CUDA graph capture (which cannot upload) finds
/// them here. The content holds the A/B addresses, so equal bytes are an equal table.
type TableCache = HashMap<(usize, Vec<u8>), Arc<CudaSlice<u8>>>;

/// Tables kept before the cache starts over (graphs keep their own tables alive).
const MAX_TABLES: usize = 4096;

fn uploaded_table(dev: &CudaDevice, bytes: &[u8]) -> Result<Arc<CudaSlice<u8>>, QuantError> {
    static TABLES: OnceLock<Mutex<TableCache>> = OnceLock::new();
    let key = (dev.cuda_stream().context().ordinal(), bytes.to_vec());
    let mut tables = TABLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(t) = tables.get(&key) {
        super::graph::keep_alive(t.clone());
        return Ok(t.clone());
    }
    if super::graph::capturing() {
        return Err(QuantError::Invalid(
            "sgmv: a new adapter table during a CUDA graph capture (run the batch once first)"
                .into(),
        ));
    }
    if tables.len() >= MAX_TABLES {
        tables.clear();
    }
    let t = Arc::new(dev.clone_htod(bytes)?);
    tables.insert(key, t.clone());
    Ok(t)
}

#[allow(clippy::too_many_arguments)]
fn launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x: &Tensor,
    base: &Tensor,
    p: &Plan,
    rows: usize,
    n: usize,
    k: usize,
    dname: &str,
) -> Result<CudaStorage, QuantError> {
    let (xs, xl) = x.storage_and_layout();
    let (bs, bl) = base.storage_and_layout();
    let (Storage::Cuda(xs), Storage::Cuda(bs)) = (&*xs, &*bs) else {
        return Err(QuantError::Invalid("sgmv: tensors are not on a GPU".into()));
    };
    let xv = xs
        .as_cuda_slice::<T>()?
        .slice(xl.start_offset()..xl.start_offset() + rows * k);
    let bv = bs
        .as_cuda_slice::<T>()?
        .slice(bl.start_offset()..bl.start_offset() + rows * n);
    let x_vec = i32::from(
        k.is_multiple_of(8) && (xl.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16),
    );
    let table = uploaded_table(dev, &p.bytes)?;
    let segs = table.slice(0..p.segments * SEG_BYTES);
    let tiles = table.slice(p.segments * SEG_BYTES..);
    let r_max = p.max_rank;
    // SAFETY: the shrink kernel writes h[row, j] for every adapter row and j below its rank,
    // the only elements the expand kernel reads.
    let h = unsafe { dev.alloc::<f32>(rows * r_max)? };
    // SAFETY: every element is written by the expand kernel (rows without adapter get the base).
    let out = unsafe { dev.alloc::<T>(rows * n)? };
    let stream = dev.cuda_stream();
    let (ki, ni, ri) = (k as i32, n as i32, r_max as i32);
    let shrink = function(dev, "sgmv", FATBIN, &format!("sgmv_shrink_{dname}"))?;
    let mut b = stream.launch_builder(&shrink);
    b.arg(&segs)
        .arg(&tiles)
        .arg(&xv)
        .arg(&h)
        .arg(&ki)
        .arg(&ri)
        .arg(&x_vec);
    let cfg = LaunchConfig {
        grid_dim: (p.tiles as u32, r_max.div_ceil(SHRINK_J_PER_BLOCK) as u32, 1),
        block_dim: ((SHRINK_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `sgmv_shrink_*` in kernels/sgmv.cu; the table's tiles cover
    // rows < `rows` of x ([rows, k]) and h ([rows, r_max]), its pointers are live A tensors.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    let expand = function(dev, "sgmv", FATBIN, &format!("sgmv_expand_{dname}"))?;
    let mut b = stream.launch_builder(&expand);
    b.arg(&segs)
        .arg(&tiles)
        .arg(&h)
        .arg(&bv)
        .arg(&out)
        .arg(&ni)
        .arg(&ri);
    let cfg = LaunchConfig {
        grid_dim: (p.tiles as u32, n.div_ceil(EXPAND_THREADS) as u32, 1),
        block_dim: (EXPAND_THREADS as u32, 1, 1),
        shared_mem_bytes: (ROWS_PER_TILE * r_max * 4) as u32,
    };
    // SAFETY: the arguments match `sgmv_expand_*`; base and out hold rows × n elements, the
    // shared memory 8 × r_max floats (r_max <= MAX_RANK keeps it within 48 KiB).
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
