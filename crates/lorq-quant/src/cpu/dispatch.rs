//! Runtime selection of target features: a kernel is written once as plain Rust and compiled
//! for AVX-512F, AVX2+FMA and the baseline; the best one this CPU supports is chosen on first use.

/// `simd_dispatch!(pub fn name(a: A, b: B) -> R => generic);` defines `name`, which calls
/// `generic` compiled with the best available target features (`generic` should be
/// `#[inline(always)]` so each copy is vectorised for its features). Exported for the other
/// crates' CPU kernels (`lorq_quant::simd_dispatch!`).
#[macro_export]
macro_rules! simd_dispatch {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $generic:path) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            type Kernel = fn($($ty),*) $(-> $ret)?;
            static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
            let kernel = KERNEL.get_or_init(|| {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                        $generic($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                        $generic($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the feature was detected on this CPU.
                        return |$($arg),*| unsafe { avx512($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the features were detected on this CPU.
                        return |$($arg),*| unsafe { avx2($($arg),*) };
                    }
                }
                |$($arg),*| $generic($($arg),*)
            });
            kernel($($arg),*)
        }
    };
}

pub(crate) use crate::simd_dispatch;
