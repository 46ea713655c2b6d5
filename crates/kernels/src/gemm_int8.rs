//! int8 GEMM with dynamic activation quantisation: `C[m, n] (f32) ≈ A[m, k] · W[n, k]ᵀ + bias`.
//!
//! The scheme is ONNX Runtime's dynamic quantisation (`quantize_dynamic` with `per_channel=True`:
//! `DynamicQuantizeLinear` on the activations, `MatMulInteger`, then a float rescale), with activation
//! scales per row instead of per tensor:
//! - weights: symmetric int8 per output channel, `w ≈ s_w[j] · q_w`, `q_w ∈ [-127, 127]`, packed once;
//! - activations, per row `i`, asymmetric uint8 with the range widened to include 0 so that 0 is exact
//!   (<https://github.com/onnx/onnx/blob/v1.17.0/docs/Operators.md#DynamicQuantizeLinear>):
//!   `s_a = (max(0, max x) - min(0, min x)) / 255`, `z = clamp(round(-min(0, min x) / s_a), 0, 255)`,
//!   `q_a = clamp(round(x / s_a) + z, 0, 255)`, rounding half to even;
//! - `C[i, j] = s_a[i] s_w[j] (Σ_k q_a q_w − z[i] Σ_k q_w) + bias[j]`, where the column sums `Σ_k q_w`
//!   are computed at packing (the zero-point compensation of gemmlowp,
//!   <https://github.com/google/gemmlowp/blob/master/doc/low-precision.md>).
//!
//! The integer dot products are exact in i32 (|Σ| ≤ 255 · 127 · k < 2^31 for k < 66 000), so the
//! AVX512-VNNI path (`vpdpbusd`: u8 x i8 quadruples summed into an i32 lane) and the portable one give
//! bit-identical results: the packed layout keeps 4 consecutive `k` of one output column together.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::conv::{Act, Epilogue};
use crate::cpu::Features;
use crate::panel::{by_row_blocks, check_shapes, convert_rows, for_each_tile, with_scratch, NR};

/// Largest magnitude of a quantised weight (symmetric, so -128 is unused).
const QMAX_W: f32 = 127.0;

/// A weight matrix [n, k] quantised per output channel and packed for [`gemm_int8`].
#[derive(Debug, Clone)]
pub struct PackedInt8 {
    n: usize,
    k: usize,
    /// `k` rounded up to quadruples.
    quads: usize,
    /// Per panel of [`NR`] columns, per `k` quadruple, per column: `w[col][4q..4q + 4]`; columns past
    /// `n` and the `k` tail are zero.
    data: Vec<i8>,
    /// `s_w` [n].
    scales: Vec<f32>,
    /// `Σ_k q_w` [n].
    col_sums: Vec<i32>,
}

impl PackedInt8 {
    /// Quantises and packs `w`, row-major [n, k] (the layout of a PyTorch `nn.Linear` weight).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "int8 pack: weight is not {n} x {k}");
        let quads = k.div_ceil(4);
        let mut data = vec![0i8; n.div_ceil(NR) * quads * NR * 4];
        let mut scales = vec![0f32; n];
        let mut col_sums = vec![0i32; n];
        data.par_chunks_mut((quads * NR * 4).max(1))
            .zip(w.par_chunks((k * NR).max(1)))
            .zip(scales.par_chunks_mut(NR).zip(col_sums.par_chunks_mut(NR)))
            .for_each(|((panel, rows), (scales, col_sums))| {
                for (j, row) in rows.chunks_exact(k.max(1)).enumerate() {
                    let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                    // An all-zero channel keeps scale 0 and quantised zeros.
                    let inv = if amax > 0.0 { QMAX_W / amax } else { 0.0 };
                    scales[j] = amax / QMAX_W;
                    for (p, &v) in row.iter().enumerate() {
                        let q = (v * inv).round_ties_even().clamp(-QMAX_W, QMAX_W) as i8;
                        panel[(p / 4) * NR * 4 + j * 4 + p % 4] = q;
                        col_sums[j] += q as i32;
                    }
                }
            });
        Self {
            n,
            k,
            quads,
            data,
            scales,
            col_sums,
        }
    }

    /// Output width.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    fn panel(&self, panel: usize) -> &[i8] {
        &self.data[panel * self.quads * NR * 4..][..self.quads * NR * 4]
    }
}

/// One activation row's quantisation: `x ≈ scale · (q − zero)`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct RowQuant {
    scale: f32,
    zero: i32,
}

thread_local! {
    static A_U8: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static A_QUANT: std::cell::RefCell<Vec<RowQuant>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `c[m, n] ≈ act(a[m, k] · wᵀ + bias + residual)` (`e`) with `a` quantised per row to uint8 and `w`
/// per channel to int8 (module docs), on the fastest path `features` allow. Row-major `a` [m, k], `c`
/// and the residual [m, n], the bias [n].
pub fn gemm_int8(
    a: &[f32],
    m: usize,
    w: &PackedInt8,
    e: Epilogue,
    c: &mut [MaybeUninit<f32>],
    features: Features,
) {
    let (n, k, quads) = (w.n, w.k, w.quads);
    check_shapes("gemm_int8", a, m, n, k, &e, c);
    if m == 0 || n == 0 {
        return;
    }
    if by_row_blocks(a, m, k, &e, c, |a, m, e, c| {
        gemm_int8(a, m, w, e, c, features)
    }) {
        return;
    }
    // Only x86-64 has the native kernels (and only there can detection report the feature).
    let native = features.avx512vnni;
    let width = quads * 4;
    with_scratch(&A_U8, m * width, |aq| {
        with_scratch(&A_QUANT, m, |rq| {
            let rows = convert_rows(k);
            aq.par_chunks_mut(width.max(1) * rows)
                .zip(a.par_chunks(k.max(1) * rows))
                .zip(rq.par_chunks_mut(rows))
                .for_each(|((aq, a), rq)| {
                    for ((dst, src), rq) in aq
                        .chunks_mut(width.max(1))
                        .zip(a.chunks(k.max(1)))
                        .zip(rq.iter_mut())
                    {
                        *rq = quantize_row(src, dst, native);
                    }
                });
            let (aq, rq): (&[u8], &[RowQuant]) = (aq, rq);
            for_each_tile(c, m, n, k, &e, |t| {
                let cs = t.panel * NR..t.panel * NR + t.cols;
                let epi = Dequant {
                    scales: &w.scales[cs.clone()],
                    col_sums: &w.col_sums[cs.clone()],
                    bias: e.bias.map(|b| &b[cs]),
                    residual: t.out.residual,
                    act: e.act,
                };
                let b = w.panel(t.panel);
                let a = &aq[t.row * width..(t.row + t.rows) * width];
                let rq = &rq[t.row..t.row + t.rows];
                #[cfg(target_arch = "x86_64")]
                if native {
                    // SAFETY: AVX512-VNNI (and so AVX-512F/BW) is present; slices cover the tile.
                    unsafe { x86::tile(a, quads, b, t.rows, rq, &epi, t.out.c, n) };
                    return;
                }
                // SAFETY: the tile's rows x columns of `c` (and of the residual) are this task's.
                unsafe { portable_tile(a, quads, b, t.rows, rq, &epi, t.out.c, n) };
            });
        });
    });
}

/// The per-column factors of one panel's epilogue, and what follows the dequantisation: the
/// residual (the tile's first element, rows `ldc` apart like the output; null: none) and the
/// activation.
struct Dequant<'a> {
    scales: &'a [f32],
    col_sums: &'a [i32],
    bias: Option<&'a [f32]>,
    residual: *const f32,
    act: Act,
}

impl Dequant<'_> {
    /// The output value of column `j` from a row's integer dot product; the native path computes the
    /// same operations in the same order, so both paths agree bit for bit.
    #[inline(always)]
    fn apply(&self, j: usize, dot: i32, q: RowQuant) -> f32 {
        let v = dot.wrapping_sub(q.zero.wrapping_mul(self.col_sums[j])) as f32;
        v * (q.scale * self.scales[j]) + self.bias.map_or(0.0, |b| b[j])
    }
}

/// The quantisation of a row whose range (widened to include 0) is `lo..=hi`.
fn row_quant(lo: f32, hi: f32) -> (RowQuant, f32) {
    let scale = (hi - lo) / 255.0;
    if !scale.is_finite() || scale <= 0.0 {
        // All zeros (or non-finite input): every value quantises to the zero point 0.
        return (
            RowQuant {
                scale: 0.0,
                zero: 0,
            },
            0.0,
        );
    }
    let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as i32;
    (RowQuant { scale, zero }, 1.0 / scale)
}

/// Quantises one activation row into `dst` (zero-padded to `dst.len()`).
fn quantize_row(src: &[f32], dst: &mut [u8], native: bool) -> RowQuant {
    #[cfg(target_arch = "x86_64")]
    if native {
        // SAFETY: AVX-512F/BW are present (implied by VNNI detection).
        return unsafe { x86::quantize_row(src, dst) };
    }
    let _ = native;
    let (lo, hi) = src
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let (q, inv) = row_quant(lo, hi);
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = quantize(x, inv, q.zero);
    }
    dst[src.len()..].fill(0);
    q
}

#[inline(always)]
fn quantize(x: f32, inv: f32, zero: i32) -> u8 {
    ((x * inv).round_ties_even() as i32 + zero).clamp(0, 255) as u8
}

/// The register tile without SIMD intrinsics: `mr` rows x the panel's columns.
///
/// # Safety
/// `c` (and a non-null residual) cover `mr` rows x the panel's columns, `ldc` apart; nothing else
/// writes there meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn portable_tile(
    a: &[u8],
    quads: usize,
    b: &[i8],
    mr: usize,
    rq: &[RowQuant],
    epi: &Dequant,
    c: *mut f32,
    ldc: usize,
) {
    for r in 0..mr {
        let mut acc = [0i32; NR];
        let row = &a[r * quads * 4..(r + 1) * quads * 4];
        for (aq, wq) in row.chunks_exact(4).zip(b.chunks_exact(NR * 4)) {
            for (acc, w) in acc.iter_mut().zip(wq.chunks_exact(4)) {
                *acc += (0..4).map(|t| aq[t] as i32 * w[t] as i32).sum::<i32>();
            }
        }
        for (j, &dot) in acc.iter().enumerate().take(epi.scales.len()) {
            // SAFETY: the caller's tile covers rows 0..mr and the panel's columns from `c` and the
            // residual.
            unsafe {
                let at = r * ldc + j;
                let mut v = epi.apply(j, dot, rq[r]);
                if !epi.residual.is_null() {
                    v += *epi.residual.add(at);
                }
                *c.add(at) = epi.act.lanes::<f32>(v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::math::F32x16;
    use crate::panel::dispatch_tile;
    use crate::panel::lane_mask;

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn quantize_row(src: &[f32], dst: &mut [u8]) -> RowQuant {
        let full = src.len() / 16;
        // SAFETY: every load and store stays inside `src` / `dst` (full blocks of 16, then the tail).
        unsafe {
            let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for i in 0..full {
                let v = _mm512_loadu_ps(src.as_ptr().add(16 * i));
                lo = _mm512_min_ps(lo, v);
                hi = _mm512_max_ps(hi, v);
            }
            let tail = src[16 * full..].iter();
            let lo = tail
                .clone()
                .fold(_mm512_reduce_min_ps(lo), |m, &x| m.min(x));
            let hi = tail.fold(_mm512_reduce_max_ps(hi), |m, &x| m.max(x));
            let (q, inv) = row_quant(lo, hi);
            let (vinv, vzero) = (_mm512_set1_ps(inv), _mm512_set1_epi32(q.zero));
            let (vmin, vmax) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
            for i in 0..full {
                let v = _mm512_mul_ps(_mm512_loadu_ps(src.as_ptr().add(16 * i)), vinv);
                // Round half to even (the MXCSR default, which Rust never changes).
                let r = _mm512_add_epi32(_mm512_cvtps_epi32(v), vzero);
                let r = _mm512_min_epi32(_mm512_max_epi32(r, vmin), vmax);
                _mm_storeu_si128(
                    dst.as_mut_ptr().add(16 * i) as *mut __m128i,
                    _mm512_cvtepi32_epi8(r),
                );
            }
            for i in 16 * full..src.len() {
                dst[i] = quantize(src[i], inv, q.zero);
            }
            dst[src.len()..].fill(0);
            q
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile(
        a: &[u8],
        quads: usize,
        b: &[i8],
        mr: usize,
        rq: &[RowQuant],
        epi: &Dequant,
        c: *mut f32,
        ldc: usize,
    ) {
        let nv = epi.scales.len().div_ceil(16);
        // SAFETY: forwarded from the caller.
        unsafe {
            dispatch_tile!(
                kernel,
                mr,
                nv,
                a.as_ptr(),
                quads,
                b.as_ptr(),
                rq,
                epi,
                c,
                ldc
            )
        }
    }

    /// `MR` rows x `16 NV` columns: per `k` quadruple, NV panel loads, MR broadcasts, MR x NV
    /// `vpdpbusd`; then the epilogue of [`Dequant::apply`] in vector form.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn kernel<const MR: usize, const NV: usize>(
        a: *const u8,
        quads: usize,
        b: *const i8,
        rq: &[RowQuant],
        epi: &Dequant,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm512_setzero_si512(); NV]; MR];
        let cols = epi.scales.len();
        // SAFETY: `a` holds MR rows of 4 `quads` bytes; `b` holds `quads` x NR x 4 bytes; the epilogue
        // slices hold `cols` values and the masks stop at `cols`.
        unsafe {
            for q in 0..quads {
                let bp = b.add(q * NR * 4);
                let mut wv = [_mm512_setzero_si512(); NV];
                for (v, w) in wv.iter_mut().enumerate() {
                    *w = _mm512_loadu_si512(bp.add(64 * v) as *const __m512i);
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(
                        (a.add(r * quads * 4 + 4 * q) as *const i32).read_unaligned(),
                    );
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm512_dpbusd_epi32(*x, av, wv[v]);
                    }
                }
            }
            for v in 0..NV {
                let mask = lane_mask(cols - 16 * v);
                let sw = _mm512_maskz_loadu_ps(mask, epi.scales.as_ptr().add(16 * v));
                let cs = _mm512_maskz_loadu_epi32(mask, epi.col_sums.as_ptr().add(16 * v));
                let bias = match epi.bias {
                    Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(16 * v)),
                    None => _mm512_setzero_ps(),
                };
                for (r, row) in acc.iter().enumerate() {
                    let dot = _mm512_sub_epi32(
                        row[v],
                        _mm512_mullo_epi32(_mm512_set1_epi32(rq[r].zero), cs),
                    );
                    let s = _mm512_mul_ps(_mm512_set1_ps(rq[r].scale), sw);
                    let mut x = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), s), bias);
                    if !epi.residual.is_null() {
                        let at = epi.residual.add(r * ldc + 16 * v);
                        x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, at));
                    }
                    let x = epi.act.lanes::<F32x16>(F32x16::wrap(x)).raw();
                    _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), mask, x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::panel::{as_uninit, reference, test_values, TEST_SHAPES};

    /// Error bound of one output against the exact f32 product, from the quantisation steps: each
    /// activation is off by at most `s_a / 2`, each weight by `s_w / 2`, so a dot product is off by at
    /// most `k (max|a| s_w + max|w| s_a) / 2` (plus the tiny product of the two); `s_a ≤ 2 max|a| / 255`,
    /// `s_w = max|w| / 127`. Uniform errors make the typical error ~sqrt(k) times smaller; the test uses
    /// the worst case.
    fn bound(k: usize, amax: f32, wmax: f32) -> f32 {
        let (sa, sw) = (2.0 * amax / 255.0, wmax / QMAX_W);
        k as f32 * (amax * sw + wmax * sa + sa * sw / 2.0) / 2.0 + 1e-5
    }

    fn run(m: usize, n: usize, k: usize, seed: u64, features: Features) -> (Vec<f32>, Vec<f32>) {
        let a = test_values(m * k, seed);
        let w = test_values(n * k, seed + 1);
        let b = test_values(n, seed + 2);
        let want = reference(&a, &w, Some(&b), m, n, k);
        let mut got = vec![f32::NAN; m * n];
        gemm_int8(
            &a,
            m,
            &PackedInt8::pack(&w, n, k),
            Epilogue {
                bias: Some(&b),
                ..Default::default()
            },
            as_uninit(&mut got),
            features,
        );
        for i in 0..m {
            let amax = a[i * k..(i + 1) * k]
                .iter()
                .fold(0f32, |m, x| m.max(x.abs()));
            for j in 0..n {
                let wmax = w[j * k..(j + 1) * k]
                    .iter()
                    .fold(0f32, |m, x| m.max(x.abs()));
                let (g, r) = (got[i * n + j], want[i * n + j]);
                assert!(
                    (g - r).abs() <= bound(k, amax, wmax),
                    "{m}x{n}x{k} {features:?} at ({i},{j}): {g} vs {r}"
                );
            }
        }
        (got, want)
    }

    #[test]
    fn detected_path_matches_reference() {
        for (m, n, k) in TEST_SHAPES {
            run(m, n, k, 11, crate::cpu::features());
        }
    }

    #[test]
    fn portable_path_matches_reference() {
        for (m, n, k) in TEST_SHAPES {
            run(m, n, k, 21, Features::PORTABLE);
        }
    }

    /// Integer dot products are exact and the epilogue is the same operations: the paths agree bit
    /// for bit.
    #[test]
    fn paths_agree_exactly() {
        for (m, n, k) in [(31, 75, 301), (6, 64, 768), (1, 3, 5)] {
            let (x, _) = run(m, n, k, 31, crate::cpu::features());
            let (y, _) = run(m, n, k, 31, Features::PORTABLE);
            assert_eq!(x, y, "{m}x{n}x{k}");
        }
    }

    /// The residual and the activation applied in the tile equal the same operations after it.
    #[test]
    fn epilogue_in_the_tile() {
        let (m, n, k) = (13, 70, 40);
        let a = test_values(m * k, 41);
        let w = PackedInt8::pack(&test_values(n * k, 42), n, k);
        let (bias, residual) = (test_values(n, 43), test_values(m * n, 44));
        for features in [crate::cpu::features(), Features::PORTABLE] {
            let mut plain = vec![0f32; m * n];
            let e = Epilogue {
                bias: Some(&bias),
                ..Default::default()
            };
            gemm_int8(&a, m, &w, e, as_uninit(&mut plain), features);
            let mut fused = vec![0f32; m * n];
            let e = Epilogue {
                residual: Some(&residual),
                act: Act::Relu,
                ..e
            };
            gemm_int8(&a, m, &w, e, as_uninit(&mut fused), features);
            for ((f, p), r) in fused.iter().zip(&plain).zip(&residual) {
                assert_eq!(*f, (p + r).max(0.0), "{features:?}");
            }
        }
    }

    /// On a realistic row (k = 768, mixed signs) the typical relative error is far below the worst
    /// case: the error of a cosine-level check.
    #[test]
    fn typical_error_is_small() {
        let (m, n, k) = (16, 96, 768);
        let (got, want) = run(m, n, k, 41, crate::cpu::features());
        let dot: f64 = got
            .iter()
            .zip(&want)
            .map(|(&x, &y)| x as f64 * y as f64)
            .sum();
        let nx: f64 = got.iter().map(|&x| x as f64 * x as f64).sum();
        let ny: f64 = want.iter().map(|&y| y as f64 * y as f64).sum();
        let cos = dot / (nx * ny).sqrt();
        assert!(cos > 0.999, "cosine {cos}");
    }

    #[test]
    fn zero_and_constant_rows() {
        let (n, k) = (5, 9);
        let w = test_values(n * k, 3);
        let packed = PackedInt8::pack(&w, n, k);
        let mut a = vec![0f32; 3 * k];
        a[k..2 * k].fill(0.5);
        a[2 * k..].fill(-2.0);
        for features in [crate::cpu::features(), Features::PORTABLE] {
            let mut c = vec![f32::NAN; 3 * n];
            gemm_int8(
                &a,
                3,
                &packed,
                Epilogue::default(),
                as_uninit(&mut c),
                features,
            );
            let want = reference(&a, &w, None, 3, n, k);
            assert!(c[..n].iter().all(|&x| x == 0.0), "{c:?}");
            for (g, r) in c.iter().zip(&want) {
                assert!((g - r).abs() <= bound(k, 2.0, 1.0), "{g} vs {r}");
            }
        }
    }
}
