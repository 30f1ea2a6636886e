//! The per-element update rules over host f32 slices, each written in the same order of float
//! operations as its reference so that results agree to rounding.

use super::qmap;

/// Elements per absmax block of bitsandbytes' 8-bit blockwise optimizer (BLOCKSIZE_2STATE).
pub const BNB_BLOCK: usize = 256;

/// Scalars of one torch AdamW step, computed in f64 as torch's Python code does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TorchAdamWScalars {
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
    apply_decay: bool,
}

impl TorchAdamWScalars {
    pub(crate) fn new(
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        lr: f64,
        step: u64,
    ) -> Self {
        // torch keeps `step` as a float tensor and reads it back with .item(); for counts below 2^24
        // this is the exact integer.
        let step = step as f32 as f64;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let step_size = lr / bias_correction1;
        // Python's `x ** 0.5` is pow(), which may differ from sqrt() in the last bit.
        let bias_correction2_sqrt = bias_correction2.powf(0.5);
        Self {
            decay: (1.0 - lr * weight_decay) as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: bias_correction2_sqrt as f32,
            eps: eps as f32,
            neg_step_size: (-step_size) as f32,
            apply_decay: weight_decay != 0.0,
        }
    }
}

/// torch's `lerp` for a scalar weight: two formulas split at |w| < 0.5, the vectorized CPU kernel
/// evaluates both with one fused multiply-add.
#[inline]
fn torch_lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        weight.mul_add(end - start, start)
    } else {
        (weight - 1.0).mul_add(end - start, end)
    }
}

/// `torch.optim.AdamW` single-tensor path (`_single_tensor_adam`, decoupled decay, no amsgrad).
pub(crate) fn torch_adamw(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &TorchAdamWScalars,
) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        if s.apply_decay {
            *p *= s.decay; // param.mul_(1 - lr * weight_decay)
        }
        *m = torch_lerp(*m, g, s.one_minus_beta1); // exp_avg.lerp_(grad, 1 - beta1)
        *v *= s.beta2; // exp_avg_sq.mul_(beta2)
        *v += s.one_minus_beta2 * g * g; // .addcmul_(grad, grad, value=1 - beta2)
        let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps; // (sqrt / bc2_sqrt).add_(eps)
        *p += s.neg_step_size * *m / denom; // addcdiv_(exp_avg, denom, value=-step_size)
    }
}

/// Scalars of one bitsandbytes Adam step, in f32 as the CUDA kernels get them (ctypes c_float).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BnbScalars {
    beta1: f32,
    beta2: f32,
    eps: f32,
    lr: f32,
    weight_decay: f32,
    correction2: f32,
    step_size: f32,
}

impl BnbScalars {
    pub(crate) fn new(
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        lr: f64,
        step: u64,
    ) -> Self {
        let (beta1, beta2, eps, lr, weight_decay) = (
            beta1 as f32,
            beta2 as f32,
            eps as f32,
            lr as f32,
            weight_decay as f32,
        );
        // The kernels take `step` as int32 and use f32 powf (`__powf` under --use_fast_math).
        let step = (step.min(i32::MAX as u64) as i32) as f32;
        let correction1 = 1.0 - beta1.powf(step);
        let correction2 = (1.0 - beta2.powf(step)).sqrt();
        let step_size = -lr * correction2 / correction1;
        Self {
            beta1,
            beta2,
            eps,
            lr,
            weight_decay,
            correction2,
            step_size,
        }
    }

    #[inline]
    fn decay(&self, p: f32) -> f32 {
        // Applied after the Adam update, unlike torch (kernel: `if (weight_decay > 0.0f)`).
        if self.weight_decay > 0.0 {
            p * (1.0 - self.lr * self.weight_decay)
        } else {
            p
        }
    }
}

/// bitsandbytes `kOptimizer32bit2State<float, ADAM>`: what `bnb.optim.AdamW(optim_bits=8)` runs for
/// params with fewer than `min_8bit_size` elements (skip_zeros off, no update norm clipping).
pub(crate) fn bnb_adam_32bit(
    p: &mut [f32],
    g: &[f32],
    s1: &mut [f32],
    s2: &mut [f32],
    k: &BnbScalars,
) {
    for (((p, &g), s1), s2) in p.iter_mut().zip(g).zip(s1.iter_mut()).zip(s2.iter_mut()) {
        *s1 = *s1 * k.beta1 + (1.0 - k.beta1) * g;
        *s2 = *s2 * k.beta2 + (1.0 - k.beta2) * (g * g);
        *p += k.step_size * (*s1 / (s2.sqrt() + k.eps * k.correction2));
        *p = k.decay(*p);
    }
}

/// The nearest-code search of bitsandbytes' `quantize_2D<SIGNED>`: a 7-level binary search over the
/// sorted code, then the nearer of the two neighbours, a tie going to the inner (search) pivot.
/// `lower` starts at -1 (signed) or 0 (unsigned) and `upper` at 1, not at the code's ends; NaN
/// (0/0 from an all-zero block) ends at code 0 as on the GPU.
#[inline]
pub(crate) fn quantize_nearest(code: &[f32; 256], signed: bool, x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = if signed { -1.0f32 } else { 0.0 };
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    let chosen = if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot
        } else {
            pivot
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot
        } else {
            pivot
        }
    };
    chosen as u8
}

/// One 256-element block of bitsandbytes `kOptimizerStatic8bit2StateBlockwise<float, ADAM>`.
/// `p`, `g`, `c1`, `c2` hold the block's valid elements (the tail block is shorter);
/// `absmax1`/`absmax2` are the block's scales, read (old) and overwritten (new).
pub(crate) fn bnb_adam_8bit_block(
    p: &mut [f32],
    g: &[f32],
    c1: &mut [u8],
    c2: &mut [u8],
    absmax1: &mut f32,
    absmax2: &mut f32,
    k: &BnbScalars,
) {
    let q1 = qmap::signed();
    let q2 = qmap::unsigned();
    let n = p.len();
    debug_assert!(n <= BNB_BLOCK && g.len() == n && c1.len() == n && c2.len() == n);
    let mut s1 = [0f32; BNB_BLOCK];
    let mut s2 = [0f32; BNB_BLOCK];
    let mut finite = [false; BNB_BLOCK];
    let mut new_max1 = f32::MIN;
    let mut new_max2 = f32::MIN;
    // The kernel loads a short tail block padded with g = 0, code1 = 128, code2 = 0; those lanes
    // take part in the new absmax even though they are never stored.
    for j in 0..BNB_BLOCK {
        let (gj, c1j, c2j) = if j < n {
            (g[j], c1[j], c2[j])
        } else {
            (0.0, 128, 0)
        };
        if gj.is_finite() {
            let v = q2[c2j as usize] * *absmax2;
            s2[j] = v * k.beta2 + (1.0 - k.beta2) * gj * gj;
            let m = q1[c1j as usize] * *absmax1;
            s1[j] = m * k.beta1 + (1.0 - k.beta1) * gj;
            finite[j] = true;
        }
        new_max1 = new_max1.max(s1[j].abs());
        new_max2 = new_max2.max(s2[j].abs());
    }
    *absmax1 = new_max1;
    *absmax2 = new_max2;
    for j in 0..n {
        if finite[j] {
            p[j] += k.step_size * (s1[j] / (s2[j].sqrt() + k.correction2 * k.eps));
            p[j] = k.decay(p[j]);
        }
        let mut code1 = quantize_nearest(q1, true, s1[j] / new_max1);
        // Keep the first moment's sign through quantization (kernel: signbit comparison, u8 wrap).
        if q1[code1 as usize].is_sign_negative() != s1[j].is_sign_negative() {
            code1 = if s1[j] > 0.0 {
                code1.wrapping_add(1)
            } else {
                code1.wrapping_sub(1)
            };
        }
        c1[j] = code1;
        c2[j] = quantize_nearest(q2, false, s2[j] / new_max2);
    }
}
