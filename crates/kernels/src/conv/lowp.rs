//! bf16 dense convolutions (groups = 1) on NCHW f32 maps: `out = act(bf16(W) * bf16(cols) + bias +
//! residual)`, accumulated in f32 on the register tile of [`crate::gemm_bf16`] (`vdpbf16ps`).
//!
//! Per image and tile of output pixels the product is `out (cout x pixels) = W (cout x k) · cols
//! (k x pixels)`, `k = cin * kh * kw`, exactly as the f32 path ([`super::conv2d`]): the weight is the
//! left operand, rounded to bf16 pairs along `k` once ([`PackedConvBf16::pack`]), and each tile's
//! im2col columns (the input itself for a stride-1 unpadded 1x1 convolution) are rounded and packed
//! into the GEMM's right-hand panel layout — per 64 pixels, per `k` pair, per pixel the two values —
//! in a per-thread buffer sized to stay in L2. The output rows are NCHW rows, so the bias (one value
//! per output row), the residual and the activation run on the tile while it is in cache.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{im2col, Act, ConvShape, Epilogue, Pad};
use crate::cpu::Features;
use crate::dispatch::multiversion;
use crate::gemm_bf16::{f32_to_bf16, register_tile, to_pairs};
use crate::panel::{with_scratch, Store, MR, NR};
use crate::OutPtr;

/// A dense convolution's weight [cout, cin, kh, kw] as bf16 pairs along `k = cin * kh * kw`.
#[derive(Debug, Clone)]
pub struct PackedConvBf16 {
    cout: usize,
    k: usize,
    pairs: usize,
    /// [cout, pairs], one u32 per pair (low half: the even `k`), the odd tail zero.
    a: Vec<u32>,
}

impl PackedConvBf16 {
    /// Rounds `weight` (row-major [cout, k]) to bf16 pairs.
    pub fn pack(weight: &[f32], cout: usize, k: usize) -> Self {
        assert_eq!(
            weight.len(),
            cout * k,
            "bf16 conv pack: weight is not {cout} x {k}"
        );
        let pairs = k.div_ceil(2);
        let mut a = vec![0u32; cout * pairs];
        let native = crate::cpu::features().avx512bf16;
        for (dst, src) in a.chunks_mut(pairs.max(1)).zip(weight.chunks(k.max(1))) {
            to_pairs(src, dst, native);
        }
        Self { cout, k, pairs, a }
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }

    /// `cin * kh * kw`.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// Bytes of packed bf16 columns per tile (the GEMM's right operand, kept in L2 while every block
/// of output channels passes over it).
const TILE_BYTES: usize = 384 * 1024;
/// The most pixels per tile (small `k`: the output tile, too, should stay in cache).
const MAX_TILE: usize = 1024;

thread_local! {
    static COLS_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static COLS_BF16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// `out = act(conv(x, w) + bias + residual)` in bf16 products with f32 accumulation; NCHW f32
/// in and out, split across rayon's threads. Only dense convolutions (`s.depthwise` false).
///
/// # Panics
/// As [`super::conv2d`], on slices that do not match `s` or a weight packed for another shape.
pub fn conv2d_bf16(
    x: &[f32],
    w: &PackedConvBf16,
    s: &ConvShape,
    e: Epilogue,
    out: &mut [f32],
    features: Features,
) {
    let (oh, ow) = s.out_hw();
    let n = oh * ow;
    let k = s.cin * s.kh * s.kw;
    assert!(oh > 0 && ow > 0, "convolution output is empty: {s:?}");
    assert!(!s.depthwise, "the bf16 convolution is dense only: {s:?}");
    assert!(
        w.cout == s.cout && w.k == k,
        "bf16 conv: weight packed as {} x {}, shape {s:?}",
        w.cout,
        w.k
    );
    assert_eq!(
        x.len(),
        s.batch * s.cin * s.h * s.w,
        "input length for {s:?}"
    );
    assert!(
        e.bias.is_none_or(|b| b.len() == s.cout),
        "bias length for {s:?}"
    );
    assert_eq!(out.len(), s.batch * s.cout * n, "output length for {s:?}");
    assert!(
        e.residual.is_none_or(|r| r.len() == out.len()),
        "residual length for {s:?}"
    );
    let native = features.avx512bf16;
    let pairs = w.pairs;
    let direct = s.kh == 1 && s.kw == 1 && s.stride == 1 && s.pad == Pad::default();
    let tile = (TILE_BYTES / (4 * pairs))
        .clamp(NR, MAX_TILE)
        .next_multiple_of(NR)
        .min(n);
    let tiles = n.div_ceil(tile);
    // Split the output channels too when images x tiles leave threads idle (batch 1, late stages).
    let threads = crate::cpu::threads();
    let row_blocks = s.cout.div_ceil(MR);
    let splits = (4 * threads).div_ceil(s.batch * tiles).clamp(1, row_blocks);
    let rows_per_split = row_blocks.div_ceil(splits) * MR;
    let jobs = s.batch * tiles * splits;
    let dst = OutPtr(out.as_mut_ptr());
    let job = |j: usize| {
        let (b, rest) = (j / (tiles * splits), j % (tiles * splits));
        let (p0, r0) = ((rest / splits) * tile, (rest % splits) * rows_per_split);
        let (t, r1) = (tile.min(n - p0), s.cout.min(r0 + rows_per_split));
        if r0 >= r1 {
            return;
        }
        let xb = &x[b * s.cin * s.h * s.w..(b + 1) * s.cin * s.h * s.w];
        let panels = t.div_ceil(NR);
        with_scratch(&COLS_BF16, panels * pairs * NR * 2, |packed| {
            if direct {
                pack_columns(xb, n, p0, t, k, packed, native);
            } else {
                with_scratch(&COLS_F32, k * t, |cols| {
                    im2col(xb, s, ow, p0, t, cols);
                    pack_columns(cols, t, 0, t, k, packed, native);
                });
            }
            let packed: &[u16] = packed;
            // SAFETY: rows r0..r1 of image b, columns p0..p0 + t: inside `out`, this job's alone.
            let o = unsafe { dst.at(b * s.cout * n + p0) };
            for r in (r0..r1).step_by(MR) {
                let mr = MR.min(r1 - r);
                let a = &w.a[r * pairs..(r + mr) * pairs];
                for q in 0..panels {
                    let b = &packed[q * pairs * NR * 2..(q + 1) * pairs * NR * 2];
                    let cols = NR.min(t - q * NR);
                    // SAFETY: rows r..r+mr, columns q*NR..+cols of this job's tile.
                    unsafe {
                        register_tile(
                            native,
                            a,
                            pairs,
                            b,
                            mr,
                            cols,
                            Store {
                                c: o.add(r * n + q * NR),
                                ldc: n,
                                bias: std::ptr::null(),
                                residual: std::ptr::null(),
                                act: Act::None,
                                cold: false,
                            },
                        )
                    };
                }
            }
            let residual = e.residual.map(|res| &res[b * s.cout * n + p0..]);
            for co in r0..r1 {
                // SAFETY: row co of this job's tile.
                let row = unsafe { std::slice::from_raw_parts_mut(o.add(co * n), t) };
                let res = residual.map(|res| &res[co * n..co * n + t]);
                finish(row, e.bias.map_or(0.0, |bias| bias[co]), res, e.act);
            }
        });
    };
    if jobs >= 2 && threads > 1 {
        crate::cpu::tasks(jobs).for_each(job);
    } else {
        (0..jobs).for_each(job);
    }
}

/// Packs columns `p0..p0 + t` of the `k` rows of `src` (rows `ld` apart) into bf16 panels: per panel
/// of [`NR`] pixels, per `k` pair, per pixel `[row 2p, row 2p + 1]` (the odd `k` tail and the pixels
/// past `t` in the last panel are zero).
fn pack_columns(
    src: &[f32],
    ld: usize,
    p0: usize,
    t: usize,
    k: usize,
    dst: &mut [u16],
    native: bool,
) {
    let pairs = k.div_ceil(2);
    let row = |r: usize| (r < k).then(|| &src[r * ld + p0..r * ld + p0 + t]);
    for (q, panel) in dst.chunks_exact_mut(pairs * NR * 2).enumerate() {
        let (j0, cols) = (q * NR, NR.min(t - q * NR));
        for (p, out) in panel.chunks_exact_mut(NR * 2).enumerate() {
            let (lo, hi) = (row(2 * p), row(2 * p + 1));
            let lo = lo.map(|r| &r[j0..j0 + cols]);
            let hi = hi.map(|r| &r[j0..j0 + cols]);
            #[cfg(target_arch = "x86_64")]
            if native && cols == NR {
                if let (Some(lo), Some(hi)) = (lo, hi) {
                    // SAFETY: AVX512-BF16 is present; both rows and `out` hold NR pixels.
                    unsafe { x86::interleave(lo, hi, out) };
                    continue;
                }
            }
            let _ = native;
            for j in 0..NR {
                let v = |r: Option<&[f32]>| r.and_then(|r| r.get(j)).map_or(0, |&x| f32_to_bf16(x));
                out[2 * j] = v(lo);
                out[2 * j + 1] = v(hi);
            }
        }
    }
}

multiversion! {
    /// `row = act(row + bias + residual)`.
    fn finish<L>(row: &mut [f32], bias: f32, residual: Option<&[f32]>, act: Act) {
        match residual {
            Some(r) => row.iter_mut().zip(r).for_each(|(o, &r)| *o += bias + r),
            None if bias != 0.0 => row.iter_mut().for_each(|o| *o += bias),
            None => {}
        }
        act.apply::<L>(row);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::NR;

    /// `out[2j] = bf16(lo[j])`, `out[2j + 1] = bf16(hi[j])` for the NR pixels of one panel row pair.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn interleave(lo: &[f32], hi: &[f32], out: &mut [u16]) {
        assert!(lo.len() >= NR && hi.len() >= NR && out.len() >= 2 * NR);
        for v in 0..NR / 16 {
            // SAFETY: 16 floats at 16 v are in `lo` and `hi`; 32 u16 at 32 v are in `out`.
            unsafe {
                let l: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(
                    lo.as_ptr().add(16 * v),
                )));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(
                    hi.as_ptr().add(16 * v),
                )));
                let pair = _mm512_or_si512(
                    _mm512_cvtepu16_epi32(l),
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16),
                );
                _mm512_storeu_si512(out.as_mut_ptr().add(32 * v) as *mut __m512i, pair);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{naive_conv, rand_vec};
    use super::*;

    /// One bf16 dot product against the exact one, relative to `Σ |x w|` (as the bf16 GEMM's test):
    /// each operand rounds by at most 2^-8, each product by 2^-7 + 2^-16, f32 accumulation adds ~k 2^-24.
    const BF16_DOT_REL: f64 = 1.0 / 128.0 + 1.0 / 65536.0 + 5000.0 / 16_777_216.0;

    fn check(s: ConvShape, bias: bool, residual: bool, act: Act, features: Features) {
        let (oh, ow) = s.out_hw();
        let k = s.cin * s.kh * s.kw;
        let x = rand_vec(s.batch * s.cin * s.h * s.w, 1 + s.cin as u64);
        let w = rand_vec(s.cout * k, 2 + s.cout as u64);
        let b = bias.then(|| rand_vec(s.cout, 3));
        let r = residual.then(|| rand_vec(s.batch * s.cout * oh * ow, 4));
        let e = Epilogue {
            bias: b.as_deref(),
            residual: r.as_deref(),
            act,
        };
        let want = naive_conv(&x, &w, &s, e);
        // Σ |x w| per output: the same convolution of the magnitudes, with nothing added.
        let (xa, wa): (Vec<f32>, Vec<f32>) = (
            x.iter().map(|v| v.abs()).collect(),
            w.iter().map(|v| v.abs()).collect(),
        );
        let scale = naive_conv(&xa, &wa, &s, Epilogue::default());
        let packed = PackedConvBf16::pack(&w, s.cout, k);
        let mut got = vec![f32::NAN; want.len()];
        conv2d_bf16(&x, &packed, &s, e, &mut got, features);
        for (i, ((&g, &want), &sc)) in got.iter().zip(&want).zip(&scale).enumerate() {
            // Activations are 1-Lipschitz (SiLU: at most 1.1), so the bound carries through them.
            let bound = 1.1 * BF16_DOT_REL * sc as f64 + 1e-5;
            assert!(
                ((g - want) as f64).abs() <= bound,
                "{s:?} {act:?} {features:?} at {i}: {g} vs {want} (bound {bound})"
            );
        }
    }

    fn shape(
        batch: usize,
        cin: usize,
        hw: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> ConvShape {
        ConvShape {
            batch,
            cin,
            h: hw,
            w: hw + 3,
            cout,
            kh: k,
            kw: k,
            stride,
            pad: Pad::same(pad),
            depthwise: false,
        }
    }

    /// 1x1 direct, 1x1 strided, 3x3 padded, 7x7 stride-2 stem-like, odd channel counts (odd k, rows
    /// past a register tile, a last panel of a few pixels, several tiles and channel splits).
    fn shapes() -> Vec<ConvShape> {
        vec![
            shape(2, 16, 9, 24, 1, 1, 0),
            shape(1, 7, 8, 13, 1, 2, 0),
            shape(2, 5, 11, 7, 3, 1, 1),
            shape(1, 3, 17, 9, 7, 2, 3),
            shape(3, 33, 6, 70, 3, 2, 1),
            shape(1, 64, 40, 8, 1, 1, 0),
        ]
    }

    #[test]
    fn detected_path_matches_reference() {
        for s in shapes() {
            check(s, true, false, Act::Relu, crate::cpu::features());
            check(s, false, true, Act::None, crate::cpu::features());
            check(s, true, true, Act::Silu, crate::cpu::features());
        }
    }

    #[test]
    fn portable_path_matches_reference() {
        for s in shapes() {
            check(s, true, true, Act::Relu6, Features::PORTABLE);
        }
    }

    /// Both paths round the same operands; only the order of the f32 additions differs.
    #[test]
    fn paths_agree() {
        let s = shape(2, 19, 10, 21, 3, 1, 1);
        let k = s.cin * 9;
        let x = rand_vec(s.batch * s.cin * s.h * s.w, 7);
        let w = PackedConvBf16::pack(&rand_vec(s.cout * k, 8), s.cout, k);
        let (oh, ow) = s.out_hw();
        let (mut p, mut q) = (vec![0f32; 2 * 21 * oh * ow], vec![0f32; 2 * 21 * oh * ow]);
        conv2d_bf16(
            &x,
            &w,
            &s,
            Epilogue::default(),
            &mut p,
            crate::cpu::features(),
        );
        conv2d_bf16(&x, &w, &s, Epilogue::default(), &mut q, Features::PORTABLE);
        for (p, q) in p.iter().zip(&q) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{p} vs {q}");
        }
    }
}
