//! HQQ on the GPU: [`crate::hqq::optimize::quantize_groups`] (min/max init, then hqq's proximal
//! zero-point steps with early stopping on the mean |W − W_r|) and [`crate::hqq::bitpack::pack`],
//! one thread per group in the CPU's per-group order. The stopping test needs the whole tensor's
//! error after each step: one f64 comes back to the host per step.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Storage, Tensor};

use super::{dims2, grid, kernel, push_input, sum_f64, DeviceWeight};
use crate::cuda::tensor_from_storage;
use crate::hqq::{ComputeDtype, HqqConfig, HqqTensor, PackedCodes, Packing, ProximalParams};
use crate::QuantError;

/// kernels/quantize.cu `HqqArgs`.
#[repr(C)]
#[derive(Clone, Copy)]
struct HqqArgs {
    groups: u64,
    gs: i32,
    max_v: f32,
    round_zero: i32,
    inv_beta: f32,
    p_minus_1: f32,
}

// SAFETY: plain old data with the C layout of `struct HqqArgs`.
unsafe impl DeviceRepr for HqqArgs {}

/// Shared memory a block may use without opting in.
const SMEM_LIMIT: usize = 48 * 1024;

/// Threads (= groups) per block and whether the groups are staged in shared memory.
fn block_shape(gs: usize) -> (u32, bool) {
    for threads in [128usize, 64, 32] {
        if threads * (gs + 1) * 4 <= SMEM_LIMIT {
            return (threads as u32, true);
        }
    }
    (128, false)
}

/// What [`HqqTensor::quantize_gpu_with`] ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HqqGpuStats {
    /// Optimizer steps run (0 without optimization), as [`crate::hqq::optimize::GroupQuant::iterations`].
    pub iterations: usize,
}

impl HqqTensor {
    /// [`HqqTensor::quantize`] on the weight's GPU (host weights are quantized on the host).
    pub fn quantize_gpu(weight: &Tensor, cfg: &HqqConfig) -> Result<Self, QuantError> {
        Ok(Self::quantize_gpu_with(weight, cfg, ProximalParams::default())?.0)
    }

    /// [`HqqTensor::quantize_with`] on the weight's GPU, with the optimizer steps run.
    pub fn quantize_gpu_with(
        weight: &Tensor,
        cfg: &HqqConfig,
        params: ProximalParams,
    ) -> Result<(Self, HqqGpuStats), QuantError> {
        let (out, inp) = dims2(weight, "hqq")?;
        let numel = out * inp;
        let gs = cfg.group_size;
        if cfg.axis > 1 || gs == 0 || !numel.is_multiple_of(gs) {
            return Err(QuantError::Invalid(format!(
                "hqq: group_size {gs} must divide the weight's {numel} elements (axis {}, must be 0 or 1)",
                cfg.axis
            )));
        }
        let packing = Packing::for_nbits(cfg.nbits)?;
        let (rows, cols) = if cfg.axis == 1 {
            (numel / gs, gs)
        } else {
            (gs, numel / gs)
        };
        let prow = packing.packed_rows(rows)?;
        let w = match DeviceWeight::new(weight)? {
            Some(w) if gs <= i32::MAX as usize => w,
            _ => {
                // The host reference (it reports no step count: run it through optimize:: for that).
                let t = Self::quantize_with(weight, cfg, params)?;
                return Ok((t, HqqGpuStats { iterations: 0 }));
            }
        };
        // Groups as rows of `gs` contiguous values: axis 1 is the weight itself, axis 0 its
        // grid [gs, numel/gs] transposed.
        let grouped = if cfg.axis == 1 {
            w
        } else {
            let t = w.tensor().reshape((gs, numel / gs))?.t()?.contiguous()?;
            DeviceWeight::new(&t)?.expect("a non-empty GPU tensor")
        };
        let dev = grouped.dev.clone();
        let ng = numel / gs;
        let args = HqqArgs {
            groups: ng as u64,
            gs: gs as i32,
            max_v: ((1u32 << cfg.nbits) - 1) as f32,
            round_zero: i32::from(cfg.round_zero),
            inv_beta: 1.0f32 / params.beta,
            p_minus_1: params.lp_norm - 1.0,
        };
        let (threads, staged) = block_shape(gs);
        let smem = if staged {
            threads * (gs as u32 + 1) * 4
        } else {
            0
        };
        let blocks = ng.div_ceil(threads as usize);
        let sfx = grouped.suffix();
        let stream = dev.cuda_stream();
        // SAFETY: hqq_init writes every scale and zero, hqq_step every error.
        let scale = unsafe { dev.alloc::<f32>(ng)? };
        let zero = unsafe { dev.alloc::<f32>(ng)? };
        let staged_i = i32::from(staged);
        let f = kernel(&dev, &format!("hqq_init_{sfx}"))?;
        grouped.with(|x| {
            let mut b = stream.launch_builder(&f);
            push_input(&mut b, x);
            b.arg(&args).arg(&staged_i).arg(&scale).arg(&zero);
            // SAFETY: matches `hqq_init_*`: one thread per group, `smem` bytes of staging.
            unsafe { b.launch(grid(blocks, threads, smem)) }.w()?;
            Ok(())
        })?;
        let mut iterations = 0;
        if cfg.optimize {
            let err_g = unsafe { dev.alloc::<f64>(ng)? };
            let f = kernel(&dev, &format!("hqq_step_{sfx}"))?;
            let mut best = f32::INFINITY;
            for _ in 0..params.iters {
                iterations += 1;
                grouped.with(|x| {
                    let mut b = stream.launch_builder(&f);
                    push_input(&mut b, x);
                    b.arg(&args)
                        .arg(&staged_i)
                        .arg(&scale)
                        .arg(&zero)
                        .arg(&err_g);
                    // SAFETY: matches `hqq_step_*`, as hqq_init.
                    unsafe { b.launch(grid(blocks, threads, smem)) }.w()?;
                    Ok(())
                })?;
                let total = dev.clone_dtoh(&sum_f64(&dev, &err_g, ng, true)?)?[0];
                let current = (total as f32) / numel as f32;
                if current < best {
                    best = current;
                } else {
                    break;
                }
            }
        }
        // Codes [groups, gs], then hqq's grid [rows, cols].
        let codes = unsafe { dev.alloc::<u8>(numel)? };
        let f = kernel(&dev, &format!("hqq_codes_{sfx}"))?;
        grouped.with(|x| {
            let mut b = stream.launch_builder(&f);
            push_input(&mut b, x);
            b.arg(&args).arg(&scale).arg(&zero).arg(&codes);
            // SAFETY: matches `hqq_codes_*` (grid-stride over every element).
            unsafe { b.launch(grid(numel.div_ceil(256).min(65536), 256, 0)) }.w()?;
            Ok(())
        })?;
        let codes = tensor_from_storage(CudaStorage::wrap_cuda_slice(codes, dev.clone()), (ng, gs));
        let grid_codes = if cfg.axis == 1 {
            codes
        } else {
            codes.t()?.contiguous()?
        };
        let packed = pack(&dev, &grid_codes, packing, rows, cols, prow)?;
        let scale: Vec<f32> = dev
            .clone_dtoh(&scale)?
            .into_iter()
            .map(|s| 1.0 / s)
            .collect();
        let zero = dev.clone_dtoh(&zero)?;
        let t = Self::from_parts(
            (out, inp),
            *cfg,
            packing,
            packed,
            scale,
            zero,
            ComputeDtype::F32,
        )?;
        Ok((t, HqqGpuStats { iterations }))
    }
}

/// hqq's bit packing of the code grid `[rows, cols]` (u8, contiguous on `dev`).
fn pack(
    dev: &CudaDevice,
    grid_codes: &Tensor,
    packing: Packing,
    rows: usize,
    cols: usize,
    prow: usize,
) -> Result<PackedCodes, QuantError> {
    let (storage, layout) = grid_codes.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(QuantError::Invalid("hqq: the codes left the GPU".into()));
    };
    let a = layout.start_offset();
    let codes = cs.as_cuda_slice::<u8>()?.slice(a..a + rows * cols);
    let bits = packing.bits() as i32;
    let top = if packing == Packing::Bit3I32 {
        27
    } else {
        8 - bits
    };
    let slots = packing.slots() as i32;
    let (r64, c64, p64) = (rows as u64, cols as u64, prow as u64);
    let n = prow * cols;
    let f = kernel(dev, "hqq_pack")?;
    let stream = dev.cuda_stream();
    fn launch<T>(
        stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
        f: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
        codes: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, u8>,
        dims: [&u64; 3],
        params: [&i32; 4],
        out: &CudaSlice<T>,
        n: usize,
    ) -> Result<(), QuantError> {
        let mut b = stream.launch_builder(f);
        b.arg(codes).arg(dims[0]).arg(dims[1]).arg(dims[2]);
        b.arg(params[0])
            .arg(params[1])
            .arg(params[2])
            .arg(params[3]);
        b.arg(out);
        // SAFETY: matches `hqq_pack`; `out` holds n words of the pushed width.
        unsafe { b.launch(grid(n.div_ceil(256).min(65536), 256, 0)) }.w()?;
        Ok(())
    }
    Ok(if packing == Packing::Bit3I32 {
        let out = unsafe { dev.alloc::<i32>(n)? };
        launch(
            &stream,
            &f,
            &codes,
            [&r64, &c64, &p64],
            [&slots, &bits, &top, &4],
            &out,
            n,
        )?;
        PackedCodes::I32(dev.clone_dtoh(&out)?)
    } else {
        let out = unsafe { dev.alloc::<u8>(n)? };
        launch(
            &stream,
            &f,
            &codes,
            [&r64, &c64, &p64],
            [&slots, &bits, &top, &1],
            &out,
            n,
        )?;
        PackedCodes::U8(dev.clone_dtoh(&out)?)
    })
}
