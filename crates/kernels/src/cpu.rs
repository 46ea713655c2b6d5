//! Run-time CPU feature detection and the thread count the kernels use.

use std::sync::OnceLock;

/// The instruction-set extensions the kernels can use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// AVX-512 Foundation (16-lane f32 FMA).
    pub avx512f: bool,
    /// AVX512-BF16 (`vdpbf16ps`: bf16 pair dot products accumulated in f32).
    pub avx512bf16: bool,
    /// AVX512-VNNI (`vpdpbusd`: u8 x i8 quadruple dot products accumulated in i32).
    pub avx512vnni: bool,
    /// AVX2 + FMA (8-lane f32).
    pub avx2_fma: bool,
}

impl Features {
    /// No extension: every kernel takes its portable path.
    pub const PORTABLE: Self = Self {
        avx512f: false,
        avx512bf16: false,
        avx512vnni: false,
        avx2_fma: false,
    };

    fn detect() -> Self {
        if std::env::var("VISENC_KERNELS").is_ok_and(|v| v == "portable") {
            return Self::PORTABLE;
        }
        #[cfg(target_arch = "x86_64")]
        {
            Self {
                avx512f: is_x86_feature_detected!("avx512f"),
                avx512bf16: is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bf16"),
                avx512vnni: is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni"),
                avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Self::PORTABLE
        }
    }
}

/// The features of this machine, detected once. `VISENC_KERNELS=portable` in the environment forces
/// the portable paths (to test them, or to compare against them).
pub fn features() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(Features::detect)
}

/// Threads the kernels split work across: rayon's pool size (`RAYON_NUM_THREADS`, else the number of
/// cores).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Runs `f` on one of rayon's workers (directly when the caller is one). A forward pass run this way
/// joins its own parallel regions: the worker runs its share of each and steals the rest back,
/// instead of the caller injecting every region into the pool and sleeping until a worker ends it
/// (at batch 1 an EfficientNet-B0 has ~80 regions of well under a millisecond each).
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_is_consistent() {
        let f = features();
        // The extensions built on AVX-512F imply it.
        assert!(!f.avx512bf16 || f.avx512f);
        assert!(!f.avx512vnni || f.avx512f);
        assert_eq!(f, features());
    }
}
