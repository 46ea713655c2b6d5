//! [`multiversion!`]: one kernel body compiled for each vector extension, chosen at run time.

/// Defines `fn name(args) -> R` from a body generic over `L: Lanes` and a `const FMA: bool`, compiled
/// three times and chosen from [`crate::cpu::features`]:
/// - AVX-512F and VL (which imply AVX2 and FMA): `L` = [`crate::math::F32x16`], `FMA` = true;
/// - AVX2 + FMA: `L` = `f32`, `FMA` = true (plain loops over `f32` auto-vectorise to 8 lanes);
/// - otherwise: `L` = `f32`, `FMA` = false.
///
/// `FMA` says whether `f32::mul_add` is one instruction (without it, a slow libm call, so bodies
/// multiply and add instead). Everything the body calls must be `#[inline(always)]` to be compiled
/// for the chosen extension.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident<$L:ident>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::extra_unused_type_parameters)] // bodies that need no vector type
            fn generic<$L: $crate::math::Lanes, const FMA: bool>($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                let f = $crate::cpu::features();
                if f.avx512f && is_x86_feature_detected!("avx512vl") {
                    #[target_feature(enable = "avx512f,avx512vl")]
                    unsafe fn avx512($($a: $t),*) $(-> $r)? {
                        generic::<$crate::math::F32x16, true>($($a),*)
                    }
                    // SAFETY: AVX-512F and VL were detected at run time.
                    return unsafe { avx512($($a),*) };
                }
                if f.avx2_fma {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($a: $t),*) $(-> $r)? {
                        generic::<f32, true>($($a),*)
                    }
                    // SAFETY: AVX2 and FMA were detected at run time.
                    return unsafe { avx2($($a),*) };
                }
            }
            generic::<f32, false>($($a),*)
        }
    };
}
pub(crate) use multiversion;
