//! f32 GEMM on weights packed once: `C[m, n] = act(A[m, k] · W[n, k]ᵀ + bias + residual)`.
//!
//! The weights are packed at load into panels of [`NR`] output columns, `k`-major: per `k`, the panel's
//! 64 column values side by side, so one 512-bit load feeds 16 columns and one broadcast of `A[r][p]`
//! feeds them all (BLIS' micro-kernel with `kc = k`, see [`crate::panel`]). Packing once is what the
//! `gemm` crate cannot do: it re-packs the right-hand side on every call, which costs the most where
//! `m` is small (a ViT at batch 1: 197 rows).
//!
//! Without AVX-512F the `gemm` crate (which picks AVX2 + FMA or NEON itself) multiplies each packed
//! panel, read in place as a `k x 64` strided matrix, so no second copy of the weights is kept.

use std::mem::MaybeUninit;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::conv::Epilogue;
use crate::cpu::Features;
use crate::panel::{check_output, check_shapes, NR};

/// A weight matrix [n, k] packed for [`gemm_f32`].
#[derive(Debug, Clone)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    /// Per panel of [`NR`] columns, per `k`, per column: `w[col][k]`; columns past `n` are zero.
    data: Vec<f32>,
}

impl PackedF32 {
    /// Packs `w`, row-major [n, k] (the layout of a PyTorch `nn.Linear` weight).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "f32 pack: weight is not {n} x {k}");
        let mut data = vec![0f32; n.div_ceil(NR) * k * NR];
        // Panels in parallel (loading a ViT-B packs 86 M weights).
        data.par_chunks_mut((k * NR).max(1))
            .zip(w.par_chunks((k * NR).max(1)))
            .for_each(|(panel, rows)| {
                for (j, row) in rows.chunks_exact(k.max(1)).enumerate() {
                    for (p, &v) in row.iter().enumerate() {
                        panel[p * NR + j] = v;
                    }
                }
            });
        Self { n, k, data }
    }

    /// Output width.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The weight back in its row-major [n, k] layout.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for (j, row) in w.chunks_exact_mut(self.k.max(1)).take(self.n).enumerate() {
            let panel = self.panel(j / NR);
            for (p, v) in row.iter_mut().enumerate() {
                *v = panel[p * NR + j % NR];
            }
        }
        w
    }

    fn panel(&self, panel: usize) -> &[f32] {
        &self.data[panel * self.k * NR..][..self.k * NR]
    }
}

/// `c[m, n] = act(a[m, k] · wᵀ + bias + residual)` (`e`), on the fastest path `features` allow.
/// `a` is row-major [m, k], `c` and the residual row-major [m, n], the bias [n].
pub fn gemm_f32(
    a: &[f32],
    m: usize,
    w: &PackedF32,
    e: Epilogue,
    c: &mut [MaybeUninit<f32>],
    features: Features,
) {
    let (n, k) = (w.n, w.k);
    check_shapes("gemm_f32", a, m, n, k, &e, c);
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if features.avx512f {
        crate::panel::for_each_tile(c, m, n, k, &e, |t| {
            let a = &a[t.row * k..(t.row + t.rows) * k];
            // SAFETY: AVX-512F is present; the tile's rows x columns of `c` (and of the residual)
            // are this task's alone.
            unsafe { x86::tile(a, k, w.panel(t.panel), t.rows, t.cols, t.out, t.first) };
        });
        return;
    }
    let _ = features;
    by_gemm_crate(a, m, w, e, c);
}

/// The rows of A a convolution reads in place, for [`gemm_f32_windows`]: row `i` is `runs` runs of
/// `len` values, `stride` apart, the first at `x[start(i)]` (an output pixel's window on a padded
/// NHWC map: one run of `kw * cin` values per filter row).
pub struct Windows<'a, F> {
    pub x: &'a [f32],
    pub runs: usize,
    pub len: usize,
    pub stride: usize,
    pub start: F,
}

/// [`gemm_f32`] with row `i` of A read from `a`'s windows (an implicit-GEMM convolution: no im2col
/// copy), `runs * len = k`. Needs AVX-512F: returns false, having done nothing, without it.
///
/// # Panics
/// When a window reaches past `a.x`, `runs * len` is not `w.k()`, or `c`, the bias or the residual
/// does not match (as [`gemm_f32`]).
pub fn gemm_f32_windows<F: Fn(usize) -> usize + Sync>(
    a: &Windows<'_, F>,
    m: usize,
    w: &PackedF32,
    e: Epilogue,
    c: &mut [MaybeUninit<f32>],
    features: Features,
) -> bool {
    let (n, k) = (w.n, w.k);
    assert_eq!(
        a.runs * a.len,
        k,
        "gemm_f32_windows: windows are not {k} long"
    );
    check_output("gemm_f32_windows", m, n, &e, c);
    #[cfg(target_arch = "x86_64")]
    if features.avx512f {
        crate::panel::for_each_tile(c, m, n, k, &e, |t| {
            let mut first = [a.x.as_ptr(); crate::panel::MR];
            for (r, p) in first.iter_mut().take(t.rows).enumerate() {
                let at = (a.start)(t.row + r);
                let end = at + a.runs.saturating_sub(1) * a.stride + a.len;
                assert!(
                    end <= a.x.len(),
                    "gemm_f32_windows: window {} out of bounds",
                    t.row + r
                );
                *p = a.x[at..].as_ptr();
            }
            let rows = x86::Runs {
                first,
                runs: a.runs,
                len: a.len,
                stride: a.stride,
                cold_panel: t.first,
            };
            // SAFETY: AVX-512F is present; the tile's windows are inside `a.x` (checked above);
            // its rows x columns of `c` (and of the residual) are this task's alone.
            unsafe { x86::runs(&rows, w.panel(t.panel).as_ptr(), NR, t.rows, t.cols, t.out) };
        });
        return true;
    }
    let _ = (a, features);
    false
}

/// The product through the `gemm` crate, one packed panel at a time: `c` starts as bias + residual
/// and accumulates, then the activation runs over it.
fn by_gemm_crate(a: &[f32], m: usize, w: &PackedF32, e: Epilogue, c: &mut [MaybeUninit<f32>]) {
    let (n, k) = (w.n, w.k);
    for (i, row) in c.chunks_exact_mut(n).enumerate() {
        let res = e.residual.map(|r| &r[i * n..(i + 1) * n]);
        for (j, o) in row.iter_mut().enumerate() {
            o.write(e.bias.map_or(0.0, |b| b[j]) + res.map_or(0.0, |r| r[j]));
        }
    }
    // SAFETY: every element was written above.
    let c = unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr().cast::<f32>(), c.len()) };
    let threads = crate::cpu::threads();
    for panel in 0..n.div_ceil(NR) {
        let cols = NR.min(n - panel * NR);
        let par = if threads > 1 && m * cols * k >= 1 << 20 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // SAFETY: dst: rows of `c` (stride n) at the panel's columns, m x cols; lhs: `a`, m x k
        // (row stride k); rhs: the panel, k x cols (row stride NR); all in bounds.
        unsafe {
            gemm::gemm(
                m,
                cols,
                k,
                c.as_mut_ptr().add(panel * NR),
                1,
                n as isize,
                true,
                a.as_ptr(),
                1,
                k as isize,
                w.panel(panel).as_ptr(),
                1,
                NR as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }
    if e.act != crate::conv::Act::None {
        use rayon::prelude::*;
        c.par_chunks_mut(n.max(16 * 1024))
            .for_each(|v| e.act.apply_to(v));
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::panel::{dispatch_tile, prefetch_tile, store_tile, Store, MR};

    /// `out = act(Σ_p a[r][p] · b[p][j] + bias[j] + residual)` for `mr` (<= 6) rows of `a` ([mr, k])
    /// and the first `cols` (<= 64) columns of one packed panel `b` ([k, 64]).
    ///
    /// # Safety
    /// AVX-512F is present; `out` covers `mr` rows x `cols` columns (see [`store_tile`]) that nothing
    /// else accesses meanwhile.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        a: &[f32],
        k: usize,
        b: &[f32],
        mr: usize,
        cols: usize,
        out: Store,
        cold_panel: bool,
    ) {
        assert!(a.len() >= mr * k && b.len() >= k * NR && mr <= MR && cols <= NR);
        let rows = Runs::rows(a.as_ptr(), k, k, cold_panel);
        // SAFETY: forwarded from the caller; the slices cover the tile.
        unsafe { runs(&rows, b.as_ptr(), NR, mr, cols, out) }
    }

    /// [`tile`] on operands read in place: `mr` rows of `k` values `lda` apart at `a`, and `k` rows
    /// `ldb` apart at `b`, each with its first `16 ⌈cols / 16⌉` values read.
    ///
    /// # Safety
    /// AVX-512F is present; `mr <= MR`, `cols <= NR`; the operands hold what is read; `out` as in
    /// [`tile`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn strided(
        a: *const f32,
        lda: usize,
        k: usize,
        b: *const f32,
        ldb: usize,
        mr: usize,
        cols: usize,
        out: Store,
    ) {
        let rows = Runs::rows(a, lda, k, false);
        // SAFETY: forwarded from the caller.
        unsafe { runs(&rows, b, ldb, mr, cols, out) }
    }

    /// Where a register tile's rows of A are: row `r` is `runs` runs of `len` values, run `j` at
    /// `first[r] + j * stride` (one run per filter row of a convolution window, or one run of `k`).
    pub(crate) struct Runs {
        pub first: [*const f32; MR],
        pub runs: usize,
        pub len: usize,
        pub stride: usize,
        /// The panel is not in L2 yet (the first tile of a task): the kernel prefetches it
        /// [`PANEL_AHEAD`] steps ahead.
        pub cold_panel: bool,
    }

    impl Runs {
        /// Rows of `k` values, `lda` apart from `a` (a stored matrix: one run per row).
        fn rows(a: *const f32, lda: usize, k: usize, cold_panel: bool) -> Self {
            Self {
                first: std::array::from_fn(|r| a.wrapping_add(r * lda)),
                runs: 1,
                len: k,
                stride: 0,
                cold_panel,
            }
        }
    }

    /// The register tile of `mr` rows read as `rows` says times `runs * len` rows of the panel `b`
    /// (`ldb` apart, each with its first `16 ⌈cols / 16⌉` values read).
    ///
    /// # Safety
    /// AVX-512F is present; `mr <= MR`, `cols <= NR`; the first `mr` rows' runs and the panel hold
    /// what is read; `out` as in [`tile`].
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn runs(
        rows: &Runs,
        b: *const f32,
        ldb: usize,
        mr: usize,
        cols: usize,
        out: Store,
    ) {
        let nv = cols.div_ceil(16);
        // SAFETY: forwarded from the caller.
        unsafe { dispatch_tile!(kernel, mr, nv, rows, b, ldb, cols, out) }
    }

    /// Steps of `k` per loop iteration, each row's pointer moved once per iteration: on the Xeon of
    /// BENCHMARKS.md's session 12 (two FMA ports) the ViT GEMMs ran 10 % faster than with one step
    /// per iteration (2 as fast as 4, 8 as slow as 1; a software prefetch of the panel made every
    /// variant 25 % slower), in interleaved runs of the same products in one process.
    const UNROLL: usize = 4;

    /// Steps of `k` ahead the first tile of a task prefetches its panel (16 x 256 bytes): ResNet-50
    /// at batch 1 3-4 % faster, ViT-B/16 at batch 1 ~2 %, batch 8 ~1 % (session 13, alternating
    /// passes), where the panel streams from L3 once per task while the other tiles find it in L2.
    /// (Prefetching in every tile cost 25 %, session 12.)
    const PANEL_AHEAD: usize = 16;

    /// `MR` rows x `16 NV` columns: per `k`, NV panel loads, MR broadcasts, MR x NV FMAs.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const MR: usize, const NV: usize>(
        a: &Runs,
        b: *const f32,
        ldb: usize,
        cols: usize,
        out: Store,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        // One step of `k`: row `u` of the panel at `bp` times column `u` of the rows at `rows`.
        #[inline(always)]
        unsafe fn step<const MR: usize, const NV: usize>(
            acc: &mut [[__m512; NV]; MR],
            rows: &[*const f32; MR],
            bp: *const f32,
            u: usize,
        ) {
            // SAFETY: the caller's (`kernel`'s loops keep `u` and `bp` inside the operands).
            unsafe {
                let mut wv = [_mm512_setzero_ps(); NV];
                for (v, w) in wv.iter_mut().enumerate() {
                    *w = _mm512_loadu_ps(bp.add(16 * v));
                }
                for (row, &r) in acc.iter_mut().zip(rows) {
                    let av = _mm512_set1_ps(*r.add(u));
                    for (x, &w) in row.iter_mut().zip(&wv) {
                        *x = _mm512_fmadd_ps(av, w, *x);
                    }
                }
            }
        }
        // One run: `len` steps from `rows` and `bp`, `UNROLL` per iteration, then the rest one by
        // one; with `PREFETCH`, each iteration first asks for the panel rows `PANEL_AHEAD` steps
        // ahead. Returns the panel row after the run.
        #[inline(always)]
        unsafe fn run<const MR: usize, const NV: usize, const PREFETCH: bool>(
            acc: &mut [[__m512; NV]; MR],
            mut rows: [*const f32; MR],
            len: usize,
            mut bp: *const f32,
            ldb: usize,
        ) -> *const f32 {
            // SAFETY: the caller's (`kernel`'s): `len` values from each row, `len` panel rows
            // from `bp` (prefetches do not fault, so they may reach past the panel).
            unsafe {
                let mut p = 0;
                while p + UNROLL <= len {
                    for u in 0..UNROLL {
                        if PREFETCH {
                            for v in 0..NV {
                                let at = bp.wrapping_add((PANEL_AHEAD + u) * ldb + 16 * v);
                                _mm_prefetch::<_MM_HINT_T0>(at.cast());
                            }
                        }
                        step(acc, &rows, bp.add(u * ldb), u);
                    }
                    rows = rows.map(|r| r.add(UNROLL));
                    bp = bp.add(UNROLL * ldb);
                    p += UNROLL;
                }
                while p < len {
                    step(acc, &rows, bp, 0);
                    rows = rows.map(|r| r.add(1));
                    bp = bp.add(ldb);
                    p += 1;
                }
                bp
            }
        }
        // SAFETY: each of the MR rows holds `a.runs` runs of `a.len` values, `a.stride` apart; `b`
        // holds `a.runs * a.len` rows of 16 NV values, `ldb` apart; the loops read values
        // `p..p + UNROLL` of a run (then `p`) with `p + UNROLL <= len` (`p < len`), and the panel
        // row of each.
        unsafe {
            prefetch_tile::<MR, NV>(&out);
            let mut bp = b;
            for j in 0..a.runs {
                let rows = std::array::from_fn(|r| a.first[r].add(j * a.stride));
                bp = if a.cold_panel {
                    run::<MR, NV, true>(&mut acc, rows, a.len, bp, ldb)
                } else {
                    run::<MR, NV, false>(&mut acc, rows, a.len, bp, ldb)
                };
            }
            store_tile(acc, cols, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::Act;
    use crate::panel::{as_uninit, reference, test_values, TEST_SHAPES};

    /// f32 sums of `k` products against the exact (f64) sum: each addition rounds by at most 2^-24
    /// of the running sum, so the error stays below `k · 2^-24 · Σ|a w|`; tested with a margin of 4.
    fn check(m: usize, n: usize, k: usize, residual: bool, act: Act, features: Features) {
        let a = test_values(m * k, 1 + m as u64);
        let w = test_values(n * k, 2 + n as u64);
        let bias = test_values(n, 3);
        let res = residual.then(|| test_values(m * n, 4));
        let mut want = reference(&a, &w, Some(&bias), m, n, k);
        for (i, v) in want.iter_mut().enumerate() {
            let x = *v as f64 + res.as_ref().map_or(0.0, |r| r[i] as f64);
            *v = crate::conv::epilogue::tests::reference(act, x) as f32;
        }
        let packed = PackedF32::pack(&w, n, k);
        assert_eq!(packed.unpack(), w);
        let mut got = vec![f32::NAN; m * n];
        let e = Epilogue {
            bias: Some(&bias),
            residual: res.as_deref(),
            act,
        };
        gemm_f32(&a, m, &packed, e, as_uninit(&mut got), features);
        for i in 0..m {
            for j in 0..n {
                let scale: f32 = (0..k).map(|p| (a[i * k + p] * w[j * k + p]).abs()).sum();
                let bound = 4.0 * k as f32 * scale / 16_777_216.0 + 1e-5;
                let err = (got[i * n + j] - want[i * n + j]).abs();
                assert!(
                    err <= bound,
                    "{m}x{n}x{k} {act:?} {features:?} at ({i},{j}): {} vs {} (bound {bound})",
                    got[i * n + j],
                    want[i * n + j],
                );
            }
        }
    }

    #[test]
    fn detected_path_matches_reference() {
        for (m, n, k) in TEST_SHAPES {
            check(m, n, k, false, Act::None, crate::cpu::features());
            check(m, n, k, true, Act::Gelu, crate::cpu::features());
        }
    }

    #[test]
    fn gemm_crate_path_matches_reference() {
        for (m, n, k) in TEST_SHAPES {
            check(m, n, k, false, Act::None, Features::PORTABLE);
            check(m, n, k, true, Act::Relu, Features::PORTABLE);
        }
    }

    /// Rows read as windows in place give the bits of the same rows gathered first (the same
    /// kernel, the same order of sums): 3 runs of 5 values 11 apart, windows 7 apart (overlapping),
    /// 13 rows (a partial register tile) x 70 columns (a partial panel), with the full epilogue.
    #[test]
    fn windows_match_gathered_rows() {
        let (runs, len, stride, step, m, n) = (3, 5, 11, 7, 13, 70);
        let k = runs * len;
        let x = test_values((m - 1) * step + (runs - 1) * stride + len, 5);
        let gathered: Vec<f32> = (0..m)
            .flat_map(|i| {
                (0..runs).flat_map(move |j| i * step + j * stride..i * step + j * stride + len)
            })
            .map(|at| x[at])
            .collect();
        let w = PackedF32::pack(&test_values(n * k, 6), n, k);
        let (bias, res) = (test_values(n, 7), test_values(m * n, 8));
        let e = Epilogue {
            bias: Some(&bias),
            residual: Some(&res),
            act: Act::Gelu,
        };
        let features = crate::cpu::features();
        let mut want = vec![f32::NAN; m * n];
        gemm_f32(&gathered, m, &w, e, as_uninit(&mut want), features);
        let a = Windows {
            x: &x,
            runs,
            len,
            stride,
            start: |i: usize| i * step,
        };
        let mut got = vec![f32::NAN; m * n];
        if gemm_f32_windows(&a, m, &w, e, as_uninit(&mut got), features) {
            assert_eq!(got, want);
        } else {
            assert!(!features.avx512f, "AVX-512F present but windows refused");
        }
    }

    /// A window reaching past the input is a caller's bug, caught before any read (where the
    /// kernel runs).
    #[test]
    fn windows_past_the_input_panic() {
        let w = PackedF32::pack(&[1.0; 8], 2, 4);
        let features = crate::cpu::features();
        for (len, fits) in [(9, true), (8, false)] {
            let x = vec![0.0; len];
            let a = Windows {
                x: &x,
                runs: 2,
                len: 2,
                stride: 3,
                start: |i: usize| 4 * i,
            };
            let mut c = vec![0.0; 4];
            let run = std::panic::AssertUnwindSafe(|| {
                gemm_f32_windows(&a, 2, &w, Epilogue::default(), as_uninit(&mut c), features)
            });
            let r = std::panic::catch_unwind(run);
            assert_eq!(r.is_ok(), fits || !features.avx512f, "input of {len}");
        }
    }

    /// No bias, no residual, and an empty `k`: the output is the epilogue alone.
    #[test]
    fn degenerate_shapes() {
        let w = PackedF32::pack(&[], 3, 0);
        for features in [crate::cpu::features(), Features::PORTABLE] {
            let mut c = vec![f32::NAN; 6];
            let e = Epilogue {
                bias: Some(&[1.0, -2.0, 3.0]),
                ..Default::default()
            };
            gemm_f32(&[], 2, &w, e, as_uninit(&mut c), features);
            assert_eq!(c, [1.0, -2.0, 3.0, 1.0, -2.0, 3.0]);
            let mut c = vec![f32::NAN; 6];
            gemm_f32(&[], 2, &w, Epilogue::default(), as_uninit(&mut c), features);
            assert_eq!(c, [0.0; 6]);
        }
    }
}
