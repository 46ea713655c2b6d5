//! bf16 GEMM: `C[m, n] (f32) = bf16(A[m, k]) · bf16(W[n, k])ᵀ + bias`, accumulated in f32.
//!
//! The weights are rounded to bf16 and packed once ([`PackedBf16::pack`]); the f32 activations are
//! rounded to bf16 per call. On AVX512-BF16 the register tile runs on `vdpbf16ps`, which multiplies
//! bf16 pairs and adds both products to an f32 lane (Intel SDM, VDPBF16PS), so the packed layout keeps
//! consecutive `k` pairs of one output column together: per `k` pair, 64 columns x 2 values — one
//! 512-bit load feeds 16 columns, and one 32-bit broadcast of an activation pair feeds them all.
//! Where `vdpbf16ps` is slower than f32 FMAs ([`Features::bf16_dot`] false: Intel Xeons with two
//! FMA ports run it at half their FMA rate) or absent, AVX-512F CPUs widen the packed bf16 weights to
//! f32 in registers (a shift or a mask per 16 pairs) and multiply them with the bf16-rounded
//! activations on FMAs, at ~0.85x the f32 rate with half its weight traffic. Elsewhere a portable
//! loop computes the same products (every path multiplies the same bf16 values; only the order of the
//! f32 additions differs).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::conv::Epilogue;
use crate::cpu::Features;
use crate::panel::{
    by_row_blocks, check_shapes, convert_rows, for_each_tile, with_scratch, Store, MR, NR,
};

/// Rounds to bf16 like `vcvtneps2bf16`: round to nearest even, subnormals to signed zero, NaN stays a
/// (quiet) NaN.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0 {
        return (b >> 16) as u16 & 0x8000;
    }
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
#[inline(always)]
pub fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// A weight matrix [n, k] rounded to bf16 and packed for [`gemm_bf16`].
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// `k` rounded up to pairs.
    pairs: usize,
    /// Per panel of [`NR`] columns, per `k` pair, per column: `[w[col][2p], w[col][2p + 1]]`; columns
    /// past `n` and the odd `k` tail are zero.
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Packs `w`, row-major [n, k] (the layout of a PyTorch `nn.Linear` weight).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "bf16 pack: weight is not {n} x {k}");
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; panels * pairs * NR * 2];
        data.par_chunks_mut((pairs * NR * 2).max(1))
            .zip(w.par_chunks((k * NR).max(1)))
            .for_each(|(panel, rows)| {
                for (j, row) in rows.chunks_exact(k.max(1)).enumerate() {
                    for (p, &v) in row.iter().enumerate() {
                        panel[(p / 2) * NR * 2 + j * 2 + p % 2] = f32_to_bf16(v);
                    }
                }
            });
        Self { n, k, pairs, data }
    }

    /// Output width.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    fn panel(&self, panel: usize) -> &[u16] {
        &self.data[panel * self.pairs * NR * 2..][..self.pairs * NR * 2]
    }
}

thread_local! {
    static A_BF16: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    static A_ROUNDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `c[m, n] = act(bf16(a[m, k]) · bf16(w)ᵀ + bias + residual)` (`e`), on the fastest path `features`
/// allow. `a` is row-major [m, k], `c` and the residual row-major [m, n], the bias [n].
pub fn gemm_bf16(
    a: &[f32],
    m: usize,
    w: &PackedBf16,
    e: Epilogue,
    c: &mut [MaybeUninit<f32>],
    features: Features,
) {
    let (n, k, pairs) = (w.n, w.k, w.pairs);
    check_shapes("gemm_bf16", a, m, n, k, &e, c);
    if m == 0 || n == 0 {
        return;
    }
    if by_row_blocks(a, m, k, &e, c, |a, m, e, c| {
        gemm_bf16(a, m, w, e, c, features)
    }) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if features.avx512f && !features.bf16_dot {
        with_scratch(&A_ROUNDED, m * k, |ar| {
            // The activations rounded to bf16, kept as f32 (the broadcast unit of the FMAs).
            let rows = convert_rows(k);
            ar.par_chunks_mut(k.max(1) * rows)
                .zip(a.par_chunks(k.max(1) * rows))
                // SAFETY: AVX-512F is present.
                .for_each(|(dst, src)| unsafe { x86::round_to_bf16(src, dst) });
            let ar: &[f32] = ar;
            for_each_tile(c, m, n, k, &e, |t| {
                let a = &ar[t.row * k..(t.row + t.rows) * k];
                // SAFETY: AVX-512F is present; the tile's rows x columns of `c` (and of the
                // residual) are this task's alone.
                unsafe { x86::widened_tile(a, k, w.panel(t.panel), t.rows, t.cols, t.out) };
            });
        });
        return;
    }
    // Only x86-64 has the native kernels (and only there can detection report the feature).
    let native = features.bf16_dot;
    with_scratch(&A_BF16, m * pairs, |a16| {
        // Activations as bf16 pairs, one u32 per pair (the broadcast unit), the odd tail zero.
        let rows = convert_rows(k);
        a16.par_chunks_mut(pairs.max(1) * rows)
            .zip(a.par_chunks(k.max(1) * rows))
            .for_each(|(dst, src)| {
                dst.chunks_mut(pairs.max(1))
                    .zip(src.chunks(k.max(1)))
                    .for_each(|(dst, src)| to_pairs(src, dst, native))
            });
        let a16: &[u32] = a16;
        for_each_tile(c, m, n, k, &e, |t| {
            let b = w.panel(t.panel);
            let a = &a16[t.row * pairs..(t.row + t.rows) * pairs];
            // SAFETY: the tile's rows x columns of `c` (and of the residual) are this task's alone.
            unsafe { register_tile(native, a, pairs, b, t.rows, t.cols, t.out) };
        });
    });
}

/// `out = act(Σ_p a[r][p] · b[p][j] + bias[j] + residual)` for `mr` (<= 6) rows of bf16 pairs `a`
/// ([mr, pairs], one u32 per pair) and the first `cols` (<= 64) columns of one packed panel `b`
/// ([pairs, 64, 2]); on `vdpbf16ps` when `native` (AVX512-BF16 detected).
///
/// # Safety
/// `out` covers `mr` rows x `cols` columns (see [`Store`]) that nothing else accesses meanwhile;
/// `native` only when the CPU has AVX512-BF16.
pub(crate) unsafe fn register_tile(
    native: bool,
    a: &[u32],
    pairs: usize,
    b: &[u16],
    mr: usize,
    cols: usize,
    out: Store,
) {
    assert!(a.len() >= mr * pairs && b.len() >= pairs * NR * 2 && mr <= MR && cols <= NR);
    #[cfg(target_arch = "x86_64")]
    if native {
        // SAFETY: AVX512-BF16 (and so AVX-512F) is present; the slices cover the tile.
        unsafe { x86::tile(a, pairs, b, mr, cols, out) };
        return;
    }
    let _ = native;
    // SAFETY: forwarded from the caller.
    unsafe { portable_tile(a, pairs, b, mr, cols, out) };
}

/// Rounds one activation row to bf16 pairs (zero-padded to `dst.len()` pairs).
pub(crate) fn to_pairs(src: &[f32], dst: &mut [u32], native: bool) {
    #[cfg(target_arch = "x86_64")]
    if native {
        // SAFETY: AVX512-BF16 is present.
        unsafe { x86::to_pairs(src, dst) };
        return;
    }
    let _ = native;
    for (p, d) in dst.iter_mut().enumerate() {
        *d = pair(src, p);
    }
}

/// Values `2p` and `2p + 1` of `src` as a bf16 pair (low half first), zero past the end.
fn pair(src: &[f32], p: usize) -> u32 {
    let lo = src.get(2 * p).map_or(0, |&x| f32_to_bf16(x));
    let hi = src.get(2 * p + 1).map_or(0, |&x| f32_to_bf16(x));
    lo as u32 | (hi as u32) << 16
}

/// The register tile without SIMD intrinsics: `mr` rows x `cols` columns of one panel.
///
/// # Safety
/// As [`register_tile`].
unsafe fn portable_tile(a: &[u32], pairs: usize, b: &[u16], mr: usize, cols: usize, out: Store) {
    for r in 0..mr {
        let mut acc = [0f32; NR];
        for (p, wp) in b.chunks_exact(NR * 2).enumerate() {
            let pair = a[r * pairs + p];
            let (a0, a1) = (bf16_to_f32(pair as u16), bf16_to_f32((pair >> 16) as u16));
            for (acc, w) in acc.iter_mut().zip(wp.chunks_exact(2)) {
                *acc += a0 * bf16_to_f32(w[0]) + a1 * bf16_to_f32(w[1]);
            }
        }
        for (j, &v) in acc.iter().enumerate().take(cols) {
            // SAFETY: the caller's tile covers rows 0..mr and columns 0..cols of `out`.
            unsafe {
                let at = r * out.ldc + j;
                let mut v = v;
                if !out.bias.is_null() {
                    v += *out.bias.add(j);
                }
                if !out.residual.is_null() {
                    v += *out.residual.add(at);
                }
                *out.c.add(at) = out.act.lanes::<f32>(v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::panel::{dispatch_tile, prefetch_tile, store_tile};

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn to_pairs(src: &[f32], dst: &mut [u32]) {
        let k = src.len();
        let full = k / 16;
        let out = dst.as_mut_ptr() as *mut u16;
        for i in 0..full {
            // SAFETY: 16 floats at 16 i are in `src`; 16 bf16 (8 pairs) at 16 i are in `dst`.
            unsafe {
                let v = _mm512_loadu_ps(src.as_ptr().add(16 * i));
                let h = bf16_bits(v);
                _mm256_storeu_si256(out.add(16 * i) as *mut __m256i, h);
            }
        }
        for (p, d) in dst.iter_mut().enumerate().skip(full * 8) {
            *d = pair(src, p);
        }
    }

    /// 16 floats rounded to bf16, as 16-bit integers.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn bf16_bits(v: __m512) -> __m256i {
        // SAFETY: same size; every bit pattern is a valid integer vector.
        unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)) }
    }

    /// `dst[j]` = the bf16 pair (`a[j]`, `b[j]`) for `j < n` (a multiple of 16; `b` null: zeros),
    /// two rows of a product's right-hand side interleaved as the packed panels hold them.
    ///
    /// # Safety
    /// AVX512-BF16 is present; `a`, a non-null `b` and `dst` hold `n` values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(crate) unsafe fn interleave_rows(a: *const f32, b: *const f32, n: usize, dst: *mut u32) {
        for j in (0..n).step_by(16) {
            // SAFETY: j + 16 <= n values at each pointer (caller).
            unsafe {
                let lo = bf16_bits(_mm512_loadu_ps(a.add(j)));
                let hi = if b.is_null() {
                    _mm256_setzero_si256()
                } else {
                    bf16_bits(_mm512_loadu_ps(b.add(j)))
                };
                let v = _mm512_or_si512(
                    _mm512_cvtepu16_epi32(lo),
                    _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
                );
                _mm512_storeu_si512(dst.add(j).cast(), v);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(
        a: &[u32],
        pairs: usize,
        b: &[u16],
        mr: usize,
        cols: usize,
        out: Store,
    ) {
        let nv = cols.div_ceil(16);
        // SAFETY: forwarded from the caller.
        unsafe { dispatch_tile!(kernel, mr, nv, a.as_ptr(), pairs, b.as_ptr(), cols, out) }
    }

    /// `dst[i]` = `src[i]` rounded to bf16 as [`f32_to_bf16`] does, kept as an f32.
    ///
    /// # Safety
    /// AVX-512F is present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn round_to_bf16(src: &[f32], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        let (exp, sign, high) = (
            _mm512_set1_epi32(0x7f80_0000),
            _mm512_set1_epi32(i32::MIN),
            _mm512_set1_epi32(0xffff_0000_u32 as i32),
        );
        let mut i = 0;
        while i + 16 <= src.len() {
            // SAFETY: 16 values at i are in both slices.
            unsafe {
                let b = _mm512_loadu_si512(src.as_ptr().add(i).cast());
                // Round to nearest even: add 0x7fff + the lowest kept bit, drop the low half.
                let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
                let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd);
                let r = _mm512_and_si512(_mm512_add_epi32(b, bias), high);
                // Zeros and subnormals to signed zero; NaN stays a quiet NaN.
                let tiny = _mm512_testn_epi32_mask(b, exp);
                let r = _mm512_mask_and_epi32(r, tiny, b, sign);
                let v = _mm512_castsi512_ps(b);
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                let quiet = _mm512_or_si512(b, _mm512_set1_epi32(0x0040_0000));
                let r = _mm512_mask_and_epi32(r, nan, quiet, high);
                _mm512_storeu_si512(dst.as_mut_ptr().add(i).cast(), r);
            }
            i += 16;
        }
        for (d, &x) in dst[i..].iter_mut().zip(&src[i..]) {
            *d = bf16_to_f32(f32_to_bf16(x));
        }
    }

    /// [`tile`] on FMAs: `mr` rows of bf16-rounded f32 activations `a` ([mr, k]) times the first
    /// `cols` columns of one packed panel `b`, widened to f32 in registers.
    ///
    /// # Safety
    /// AVX-512F is present; `out` as in [`tile`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widened_tile(
        a: &[f32],
        k: usize,
        b: &[u16],
        mr: usize,
        cols: usize,
        out: Store,
    ) {
        assert!(a.len() >= mr * k && b.len() >= k.div_ceil(2) * NR * 2 && cols <= NR);
        let nv = cols.div_ceil(16);
        // SAFETY: forwarded from the caller; the slices cover the tile.
        unsafe { dispatch_tile!(widened, mr, nv, a.as_ptr(), k, b.as_ptr(), cols, out) }
    }

    /// `MR` rows x `16 NV` columns: per `k` pair, NV panel loads widened twice (the even `k`: the
    /// low halves shifted up; the odd: the high halves masked), 2 MR broadcasts, 2 MR x NV FMAs.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn widened<const MR: usize, const NV: usize>(
        a: *const f32,
        k: usize,
        b: *const u16,
        cols: usize,
        out: Store,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        /// `acc += a[r][at] · w` for the NV widened vectors `w`.
        #[inline(always)]
        unsafe fn fma_rows<const MR: usize, const NV: usize>(
            acc: &mut [[__m512; NV]; MR],
            a: *const f32,
            k: usize,
            at: usize,
            w: [__m512; NV],
        ) {
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's: `at < k`, row r of `a`.
                let av = _mm512_set1_ps(unsafe { *a.add(r * k + at) });
                for (x, &w) in row.iter_mut().zip(&w) {
                    *x = _mm512_fmadd_ps(av, w, *x);
                }
            }
        }
        let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
        // SAFETY: `a` holds MR rows of `k` values; `b` holds ⌈k / 2⌉ x NR x 2 values; pair p reads
        // `k` 2p and (when < k) 2p + 1; `out` covers the tile.
        unsafe {
            prefetch_tile::<MR, NV>(&out);
            for p in 0..k.div_ceil(2) {
                let bp = b.add(p * NR * 2);
                let load = |v: usize| _mm512_loadu_si512(bp.add(32 * v).cast());
                let even =
                    std::array::from_fn(|v| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(load(v))));
                fma_rows(&mut acc, a, k, 2 * p, even);
                if 2 * p + 1 < k {
                    let odd = std::array::from_fn(|v| {
                        _mm512_castsi512_ps(_mm512_and_si512(load(v), high))
                    });
                    fma_rows(&mut acc, a, k, 2 * p + 1, odd);
                }
            }
            store_tile(acc, cols, out);
        }
    }

    /// `MR` rows x `16 NV` columns: per `k` pair, NV panel loads, MR broadcasts, MR x NV `vdpbf16ps`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const MR: usize, const NV: usize>(
        a: *const u32,
        pairs: usize,
        b: *const u16,
        cols: usize,
        out: Store,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        // SAFETY: `a` holds MR rows of `pairs` pairs; `b` holds `pairs` x NR x 2 values; `out`
        // covers the tile.
        unsafe {
            prefetch_tile::<MR, NV>(&out);
            for p in 0..pairs {
                let bp = b.add(p * NR * 2);
                let mut wv = [_mm512_setzero_si512(); NV];
                for (v, w) in wv.iter_mut().enumerate() {
                    *w = _mm512_loadu_si512(bp.add(32 * v) as *const __m512i);
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(r * pairs + p) as i32));
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm512_dpbf16_ps(
                            *x,
                            av,
                            std::mem::transmute::<__m512i, __m512bh>(wv[v]),
                        );
                    }
                }
            }
            store_tile(acc, cols, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::panel::{as_uninit, reference, test_values, TEST_SHAPES};

    /// Relative error bound of one bf16 dot product against the exact one, as a fraction of
    /// `sum |a_i w_i|`: bf16 keeps 8 significant bits, so each operand carries a relative rounding
    /// error of at most 2^-8 and each product at most 2^-7 + 2^-16; f32 accumulation adds ~`k` 2^-24,
    /// negligible at these `k`.
    const BF16_DOT_REL: f32 = 1.0 / 128.0 + 1.0 / 65536.0 + 600.0 / 16_777_216.0;

    fn check(m: usize, n: usize, k: usize, bias: bool, features: Features) {
        let a = test_values(m * k, 1 + m as u64);
        let w = test_values(n * k, 2 + n as u64);
        let b = bias.then(|| test_values(n, 3));
        let want = reference(&a, &w, b.as_deref(), m, n, k);
        let packed = PackedBf16::pack(&w, n, k);
        let mut got = vec![f32::NAN; m * n];
        let e = Epilogue {
            bias: b.as_deref(),
            ..Default::default()
        };
        gemm_bf16(&a, m, &packed, e, as_uninit(&mut got), features);
        for i in 0..m {
            for j in 0..n {
                let scale: f32 = (0..k).map(|p| (a[i * k + p] * w[j * k + p]).abs()).sum();
                let err = (got[i * n + j] - want[i * n + j]).abs();
                assert!(
                    err <= BF16_DOT_REL * scale + 1e-6,
                    "{m}x{n}x{k} {features:?} at ({i},{j}): {} vs {} (bound {})",
                    got[i * n + j],
                    want[i * n + j],
                    BF16_DOT_REL * scale
                );
            }
        }
    }

    #[test]
    fn detected_path_matches_reference() {
        for (m, n, k) in TEST_SHAPES {
            check(m, n, k, true, crate::cpu::features());
            check(m, n, k, false, crate::cpu::features());
        }
    }

    /// The FMA path of CPUs whose `vdpbf16ps` is slow or absent, on any AVX-512F CPU.
    #[test]
    fn widened_path_matches_reference() {
        let f = Features {
            bf16_dot: false,
            ..crate::cpu::features()
        };
        for (m, n, k) in TEST_SHAPES {
            check(m, n, k, true, f);
            check(m, n, k, false, f);
        }
    }

    #[test]
    fn portable_path_matches_reference() {
        for (m, n, k) in TEST_SHAPES {
            check(m, n, k, true, Features::PORTABLE);
        }
    }

    /// Both paths round the operands identically; their sums differ only in f32 addition order.
    /// With the whole epilogue (bias, residual, activation), which each path applies in its tile.
    #[test]
    fn paths_agree() {
        let (m, n, k) = (31, 75, 301);
        let a = test_values(m * k, 5);
        let w = PackedBf16::pack(&test_values(n * k, 6), n, k);
        let (mut x, mut y) = (vec![0f32; m * n], vec![0f32; m * n]);
        let (bias, residual) = (test_values(n, 7), test_values(m * n, 8));
        let e = Epilogue {
            bias: Some(&bias),
            residual: Some(&residual),
            act: crate::conv::Act::Gelu,
        };
        gemm_bf16(&a, m, &w, e, as_uninit(&mut y), Features::PORTABLE);
        let detected = crate::cpu::features();
        for bf16_dot in [true, false] {
            let f = Features {
                bf16_dot: bf16_dot && detected.bf16_dot,
                ..detected
            };
            gemm_bf16(&a, m, &w, e, as_uninit(&mut x), f);
            for (x, y) in x.iter().zip(&y) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{f:?}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn rounding_matches_vcvtneps2bf16() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is a tie between 1 + 2^-7 and 1 + 2^-6: to even (1 + 2^-6).
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(f32_to_bf16(-2.5), 0xc020);
        assert_eq!(f32_to_bf16(f32::from_bits(1)), 0);
        assert_eq!(f32_to_bf16(-f32::from_bits(1)), 0x8000);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::INFINITY)), f32::INFINITY);
        // The native conversion agrees on a row of mixed values (incl. the odd tail).
        let src = test_values(37, 9)
            .iter()
            .map(|x| x * 1e3)
            .collect::<Vec<_>>();
        let (mut x, mut y) = (vec![0u32; 19], vec![0u32; 19]);
        to_pairs(&src, &mut x, crate::cpu::features().avx512bf16);
        to_pairs(&src, &mut y, false);
        assert_eq!(x, y);
        // So does the AVX-512F rounding of the widened path, on the edge cases too.
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::features().avx512f {
            let mut src = src;
            src.extend([
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
                -2.5,
                f32::from_bits(1),
            ]);
            src.extend([-f32::from_bits(1), f32::NAN, f32::INFINITY, -0.0, f32::MAX]);
            src.extend([f32::from_bits(0x7fff_ffff), 3.0e38, -1.0e-39]);
            let mut got = vec![0f32; src.len()];
            // SAFETY: AVX-512F is present.
            unsafe { x86::round_to_bf16(&src, &mut got) };
            for (x, g) in src.iter().zip(&got) {
                let want = bf16_to_f32(f32_to_bf16(*x));
                assert!(g.to_bits() == want.to_bits(), "{x:e}: {g:e} vs {want:e}");
            }
        }
    }
}
