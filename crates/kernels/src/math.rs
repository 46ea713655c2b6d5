//! Vectorised `exp`, `erf`, `tanh` and `sigmoid`, written once over [`Lanes`] (one `f32`, or sixteen in
//! an AVX-512 register) so the portable and the AVX-512 paths run the same polynomial.
//!
//! Accuracy (checked in the tests against `f64` references): `exp` within 2 ulp-ish relative
//! ([`EXP_RTOL`]) on [-87, 88], exactly 0 below about -87.7 (denormals are flushed) and at -inf;
//! `erf`, `tanh` and `sigmoid` within [`ERF_ATOL`] / [`TANH_ATOL`] / [`SIGMOID_ATOL`] absolute.

/// Relative error bound of [`Lanes::exp`] on [-87, 88].
pub const EXP_RTOL: f32 = 4e-7;
/// Absolute error bound of [`Lanes::erf`].
pub const ERF_ATOL: f32 = 1e-6;
/// Absolute error bound of [`Lanes::tanh`].
pub const TANH_ATOL: f32 = 6e-7;
/// Absolute error bound of [`Lanes::sigmoid`].
pub const SIGMOID_ATOL: f32 = 3e-7;

/// A vector of `f32` lanes with the handful of operations the kernels need. Implemented for `f32`
/// (portable, and the tail of every slice) and, on x86-64, for an AVX-512 register ([`F32x16`]).
///
/// Implementations are `#[inline(always)]` so that a generic kernel instantiated inside a
/// `#[target_feature(enable = "avx512f")]` function compiles to straight AVX-512 code.
pub trait Lanes: Copy {
    /// Number of `f32` lanes.
    const N: usize;
    /// Loads `N` values.
    ///
    /// # Safety
    /// `p` must be valid for reading `N` values.
    unsafe fn load(p: *const f32) -> Self;
    /// Stores `N` values.
    ///
    /// # Safety
    /// `p` must be valid for writing `N` values.
    unsafe fn store(self, p: *mut f32);
    fn splat(v: f32) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// `self * a + b` (fused where the hardware has it).
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    /// Round to the nearest integer (ties to even); `|self| < 2^22`.
    fn round(self) -> Self;
    /// `self * 2^n` for integer-valued `n` in [-127, 127] (0 at -127).
    fn scale_pow2(self, n: Self) -> Self;
    /// `self * 2^n` like [`Lanes::scale_pow2`], for callers that do not need the flush at -127
    /// (there the result may be 0 or subnormal): the AVX-512 path saves the flush's two instructions.
    #[inline(always)]
    fn scale_pow2_wide(self, n: Self) -> Self {
        self.scale_pow2(n)
    }
    /// Sum of the lanes.
    fn reduce_sum(self) -> f32;
    /// Largest lane.
    fn reduce_max(self) -> f32;
    /// `1 / self` (to within an ulp or two where the hardware has a fast reciprocal).
    #[inline(always)]
    fn recip(self) -> Self {
        Self::splat(1.0).div(self)
    }

    /// `e^x`: [`Lanes::exp_parts`] scaled by `2^n`.
    #[inline(always)]
    fn exp(self) -> Self {
        let (p, n) = self.exp_parts::<false>();
        p.scale_pow2(n)
    }

    /// `e^x` (`e^-x` when `NEG`) as `p · 2^n`, `p` in [0.7, 1.42], for `x` clamped to [-88, 88]:
    /// `±x = n ln2 + r` with `|r| <= ln2/2` (Cephes `expf`'s two-part ln 2, so the reduction is exact
    /// enough), and `e^r` a degree-5 polynomial with a fixed constant term 1, fitted for relative
    /// error on [-ln2/2, ln2/2] (iteratively reweighted least squares, i.e. near-minimax: 9e-8 in
    /// exact arithmetic, 1.5e-7 in f32 Horner steps; Cephes uses degree 7 in a form that costs
    /// three more instructions). For `NEG` the reduction works on `-r` and the polynomial in it has
    /// its odd coefficients negated, so no negation of `x` is needed.
    // Reference: https://github.com/jeremybarnes/cephes/blob/60f27df395b8322c2da22c83751a2366b82d50d1/single/expf.c
    #[inline(always)]
    fn exp_parts<const NEG: bool>(self) -> (Self, Self) {
        const C: [f32; 5] = [
            0.999_999_7,
            0.499_991_5,
            0.166_676_36,
            0.041_897_93,
            0.008_290_315,
        ];
        let s = if NEG { -1.0 } else { 1.0 };
        let x = self.max(Self::splat(-88.0)).min(Self::splat(88.0));
        let n = x.mul(Self::splat(s * std::f32::consts::LOG2_E)).round();
        // u = s r = x - s n ln2, ln 2 in two parts (Cephes C1, C2).
        let u = n.mul_add(Self::splat(-s * 0.693_359_4), x);
        let u = n.mul_add(Self::splat(s * 2.121_944_4e-4), u);
        let c = |i: usize| {
            Self::splat(if NEG && i % 2 == 1 {
                -C[i - 1]
            } else {
                C[i - 1]
            })
        };
        let p = c(5)
            .mul_add(u, c(4))
            .mul_add(u, c(3))
            .mul_add(u, c(2))
            .mul_add(u, c(1))
            .mul_add(u, Self::splat(1.0));
        (p, n)
    }

    /// `erf(x)`: the rational approximation of Eigen / XLA (odd degree-13 numerator over even degree-8
    /// denominator on [-4, 4], +-1 outside).
    // Reference: https://gitlab.com/libeigen/eigen/-/blob/3.4.0/Eigen/src/Core/MathFunctionsImpl.h#L70
    #[inline(always)]
    fn erf(self) -> Self {
        let x = self.max(Self::splat(-4.0)).min(Self::splat(4.0));
        let x2 = x.mul(x);
        let p = Self::splat(-2.726_142_3e-10)
            .mul_add(x2, Self::splat(2.770_681_4e-8))
            .mul_add(x2, Self::splat(-2.101_024e-6))
            .mul_add(x2, Self::splat(-5.692_506_4e-5))
            .mul_add(x2, Self::splat(-7.349_906_3e-4))
            .mul_add(x2, Self::splat(-2.954_6e-3))
            .mul_add(x2, Self::splat(-1.609_603_3e-2))
            .mul(x);
        let q = Self::splat(-1.456_607_2e-5)
            .mul_add(x2, Self::splat(-2.133_740_6e-4))
            .mul_add(x2, Self::splat(-1.682_827e-3))
            .mul_add(x2, Self::splat(-7.373_329_2e-3))
            .mul_add(x2, Self::splat(-1.426_474e-2));
        p.mul(q.recip())
    }

    /// `tanh(x) = 1 - 2 / (e^{2x} + 1)` (absolute error ~1 ulp of 1, which is what GELU needs).
    #[inline(always)]
    fn tanh(self) -> Self {
        let e = self.add(self).exp();
        Self::splat(1.0).sub(Self::splat(2.0).mul(e.add(Self::splat(1.0)).recip()))
    }

    /// `1 / (1 + e^{-x})`.
    #[inline(always)]
    fn sigmoid(self) -> Self {
        let (p, n) = self.exp_parts::<true>();
        p.scale_pow2_wide(n).add(Self::splat(1.0)).recip()
    }
}

impl Lanes for f32 {
    const N: usize = 1;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        *p
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        *p = self
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        self / o
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        // Not `f32::mul_add`: without hardware FMA that is a slow library call.
        self * a + b
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        f32::max(self, o)
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        f32::min(self, o)
    }
    #[inline(always)]
    fn round(self) -> Self {
        // 1.5 * 2^23: adding it pushes the fraction bits out (round to nearest even).
        const MAGIC: f32 = 12_582_912.0;
        (self + MAGIC) - MAGIC
    }
    #[inline(always)]
    fn scale_pow2(self, n: Self) -> Self {
        // 2^n through the exponent bits: adding 1.5 * 2^23 puts the integer n in the low mantissa
        // bits (no float-to-int conversion, which does not vectorise with Rust's saturating `as`).
        // n = -127 gives the bit pattern 0, i.e. 2^n is flushed to 0.
        const MAGIC: f32 = 12_582_912.0;
        let bits = (n + MAGIC).to_bits().wrapping_sub(0x4B40_0000 - 127) << 23;
        self * f32::from_bits(bits)
    }
    #[inline(always)]
    fn reduce_sum(self) -> f32 {
        self
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        self
    }
}

#[cfg(target_arch = "x86_64")]
pub use avx512::F32x16;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Lanes;
    use std::arch::x86_64::*;

    /// Sixteen `f32` in an AVX-512 register. Only use it inside functions compiled with
    /// `#[target_feature(enable = "avx512f")]` and called after [`crate::cpu::features`] said so.
    #[derive(Clone, Copy)]
    pub struct F32x16(__m512);

    impl F32x16 {
        /// The register as lanes.
        #[inline(always)]
        pub(crate) fn wrap(x: __m512) -> Self {
            Self(x)
        }

        /// The lanes as a register.
        #[inline(always)]
        pub(crate) fn raw(self) -> __m512 {
            self.0
        }
    }

    // SAFETY (all methods): the type is only instantiated in AVX-512F code paths (see above).
    impl Lanes for F32x16 {
        const N: usize = 16;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            unsafe { Self(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Self(_mm512_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { Self(_mm512_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { Self(_mm512_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { Self(_mm512_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { Self(_mm512_fmadd_ps(self.0, a.0, b.0)) }
        }
        /// `vrcp14ps` (relative error < 2^-14) and one Newton step `r (2 - x r)` (error ~2^-28 before
        /// rounding): a few times the throughput of `vdivps`.
        #[inline(always)]
        fn recip(self) -> Self {
            unsafe {
                let r = _mm512_rcp14_ps(self.0);
                let e = _mm512_fnmadd_ps(self.0, r, _mm512_set1_ps(2.0));
                Self(_mm512_mul_ps(r, e))
            }
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            unsafe { Self(_mm512_max_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn min(self, o: Self) -> Self {
            unsafe { Self(_mm512_min_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn round(self) -> Self {
            unsafe {
                Self(_mm512_roundscale_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(self.0))
            }
        }
        #[inline(always)]
        fn scale_pow2(self, n: Self) -> Self {
            // Same flush-to-zero at n = -127 as the portable path.
            unsafe {
                let s = _mm512_scalef_ps(self.0, n.0);
                let tiny = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n.0, _mm512_set1_ps(-127.0));
                Self(_mm512_maskz_mov_ps(!tiny, s))
            }
        }
        #[inline(always)]
        fn scale_pow2_wide(self, n: Self) -> Self {
            unsafe { Self(_mm512_scalef_ps(self.0, n.0)) }
        }
        #[inline(always)]
        fn reduce_sum(self) -> f32 {
            unsafe { _mm512_reduce_add_ps(self.0) }
        }
        #[inline(always)]
        fn reduce_max(self) -> f32 {
            unsafe { _mm512_reduce_max_ps(self.0) }
        }
    }
}

/// Applies `f` to every element of `xs` in place, `L::N` lanes at a time, the tail one by one.
///
/// `f` is a closure here; for functions, [`map_fn!`] calls them directly instead: a function item
/// passed as a closure goes through its `Fn::call` shim, which is compiled without the caller's
/// target features, so the intrinsics inside it are not inlined (each becomes a call).
#[inline(always)]
pub(crate) fn map_inplace<L: Lanes>(xs: &mut [f32], f: impl Fn(L) -> L, tail: impl Fn(f32) -> f32) {
    let mut chunks = xs.chunks_exact_mut(L::N);
    for c in &mut chunks {
        // SAFETY: the chunk holds exactly N values.
        unsafe { f(L::load(c.as_ptr())).store(c.as_mut_ptr()) }
    }
    for x in chunks.into_remainder() {
        *x = tail(*x);
    }
}

/// `map_fn!(L, xs, f)`: applies the `#[inline(always)]` function `f::<L>` to every element of the
/// slice `xs` in place, `L::N` lanes at a time, and `f::<f32>` to the tail, by direct calls that
/// inline into the calling kernel's target features.
macro_rules! map_fn {
    ($L:ty, $xs:expr, $f:path) => {{
        let xs: &mut [f32] = $xs;
        let mut chunks = xs.chunks_exact_mut(<$L as $crate::math::Lanes>::N);
        for c in &mut chunks {
            // SAFETY: the chunk holds exactly N values.
            unsafe {
                $crate::math::Lanes::store(
                    $f(<$L as $crate::math::Lanes>::load(c.as_ptr())),
                    c.as_mut_ptr(),
                )
            }
        }
        for x in chunks.into_remainder() {
            *x = $f(*x);
        }
    }};
}
pub(crate) use map_fn;

use crate::dispatch::multiversion;

multiversion! {
    /// `e^x` in place.
    pub fn exp_inplace<L>(xs: &mut [f32]) { map_fn!(L, xs, Lanes::exp) }
}

multiversion! {
    /// `erf(x)` in place.
    pub fn erf_inplace<L>(xs: &mut [f32]) { map_fn!(L, xs, Lanes::erf) }
}

multiversion! {
    /// `tanh(x)` in place.
    pub fn tanh_inplace<L>(xs: &mut [f32]) { map_fn!(L, xs, Lanes::tanh) }
}

multiversion! {
    /// `1 / (1 + e^{-x})` in place.
    pub fn sigmoid_inplace<L>(xs: &mut [f32]) { map_fn!(L, xs, Lanes::sigmoid) }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic uniform values in [lo, hi) (xorshift), for every kernel test.
    pub(crate) fn uniform(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    /// erf in f64 by its Taylor series (exact enough for |x| <= 4.5; 1 beyond in f32).
    pub(crate) fn erf64(x: f64) -> f64 {
        if x.abs() > 4.5 {
            return x.signum();
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// Checks the dispatched path (AVX-512 where the CPU has it) on a slice whose length is not a
    /// multiple of 16, and the portable polynomial on every value.
    fn both_paths(
        xs: &[f32],
        best: fn(&mut [f32]),
        portable: fn(f32) -> f32,
        check: impl Fn(f32, f32),
    ) {
        let mut v = xs.to_vec();
        best(&mut v);
        for (&x, &y) in xs.iter().zip(&v) {
            check(x, y);
            check(x, portable(x));
        }
    }

    #[test]
    fn exp_matches_f64() {
        let xs = uniform(1, 10_007, -87.0, 88.0);
        both_paths(&xs, exp_inplace, Lanes::exp, |x, y| {
            let r = (x as f64).exp();
            let rel = ((y as f64 - r) / r).abs();
            assert!(
                rel <= EXP_RTOL as f64,
                "exp({x}) = {y}, want {r} (rel {rel})"
            );
        });
        let mut edge = [f32::NEG_INFINITY, -1000.0, -88.5, 0.0, 1e-30];
        exp_inplace(&mut edge);
        assert_eq!(&edge[..3], &[0.0, 0.0, 0.0]);
        assert_eq!(edge[3], 1.0);
        assert!((edge[4] - 1.0).abs() <= f32::EPSILON);
    }

    #[test]
    fn erf_matches_f64() {
        let mut xs = uniform(2, 10_009, -6.0, 6.0);
        xs.extend([0.0, -0.0, 1e-20, 4.0, -4.0, 100.0, f32::NEG_INFINITY]);
        both_paths(&xs, erf_inplace, Lanes::erf, |x, y| {
            let r = erf64(x as f64);
            assert!(
                (y as f64 - r).abs() <= ERF_ATOL as f64,
                "erf({x}) = {y}, want {r}"
            );
        });
    }

    #[test]
    fn tanh_and_sigmoid_match_f64() {
        let mut xs = uniform(3, 4_099, -30.0, 30.0);
        xs.extend(uniform(4, 1_001, -1.0, 1.0));
        xs.extend([0.0, 1e-8, -1e-8, 200.0, -200.0]);
        both_paths(&xs, tanh_inplace, Lanes::tanh, |x, y| {
            let r = (x as f64).tanh();
            assert!(
                (y as f64 - r).abs() <= TANH_ATOL as f64,
                "tanh({x}) = {y}, want {r}"
            );
        });
        both_paths(&xs, sigmoid_inplace, Lanes::sigmoid, |x, y| {
            let r = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!(
                (y as f64 - r).abs() <= SIGMOID_ATOL as f64,
                "sigmoid({x}) = {y}, want {r}"
            );
        });
    }
}
