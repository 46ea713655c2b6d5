//! Channels-last (NHWC) building blocks, for trunks that keep one row of C values per pixel
//! (ConvNeXt, ResNet): the depthwise convolution vectorised across channels, and the im2col gather
//! that turns any other dense convolution (patchify stems, 3x3 and 7x7 windows, strided 1x1) into
//! one GEMM over all pixels ([`crate::gemm`], which also runs the 1x1 convolutions / linear layers
//! with the epilogue fused).

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::{ConvShape, Epilogue, OutPtr};
use crate::dispatch::multiversion;
use crate::math::Lanes;

/// Output rows of [`im2col`] per task.
const IM2COL_ROWS: usize = 32;

/// The im2col rows of an NHWC map [batch, h, w, c] for the output pixels `rows` (indices into the
/// output's [batch, oh, ow] pixels), each row `kh * kw * c` values ordered (ky, kx, c), zero where
/// the window reaches into the padding: a dense convolution over `s` (`cin` = c, any stride and
/// padding) is then one GEMM ([`crate::gemm`]) over these rows with its weight permuted to [cout, ky, kx, cin].
/// A `k x k` stride-`k` unpadded shape gathers non-overlapping patches (patchify stems), a 1x1
/// stride-2 one the pixels a strided 1x1 convolution reads.
///
/// # Panics
/// When `s` is depthwise or has an empty output, `rows` reaches past the output, `x` is not
/// `batch * h * w * c` values or `out` is not `rows.len() * kh * kw * c`.
pub fn im2col(x: &[f32], s: &ConvShape, rows: Range<usize>, out: &mut [f32]) {
    let (oh, ow) = s.out_hw();
    let c = s.cin;
    assert!(!s.depthwise && oh > 0 && ow > 0, "im2col: {s:?}");
    assert!(
        rows.start <= rows.end && rows.end <= s.batch * oh * ow,
        "im2col: rows {rows:?} of {s:?}"
    );
    assert_eq!(x.len(), s.batch * s.h * s.w * c, "im2col: input length");
    let row = s.kh * s.kw * c;
    assert_eq!(out.len(), rows.len() * row, "im2col: output length");
    // The taps [lo, hi) of a window starting at padded position `at` that land inside `size`.
    let taps = |at: usize, pad: usize, k: usize, size: usize| {
        (
            pad.saturating_sub(at),
            (size + pad).saturating_sub(at).min(k),
        )
    };
    out.par_chunks_mut(IM2COL_ROWS * row)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (i, orow) in chunk.chunks_exact_mut(row).enumerate() {
                let p = rows.start + t * IM2COL_ROWS + i;
                let (b, oy, ox) = (p / (oh * ow), p / ow % oh, p % ow);
                let (y0, x0) = (oy * s.stride, ox * s.stride);
                let (ky_lo, ky_hi) = taps(y0, s.pad.top, s.kh, s.h);
                let (kx_lo, kx_hi) = taps(x0, s.pad.left, s.kw, s.w);
                for (ky, seg) in orow.chunks_exact_mut(s.kw * c).enumerate() {
                    if ky < ky_lo || ky >= ky_hi || kx_lo >= kx_hi {
                        seg.fill(0.0);
                        continue;
                    }
                    let iy = y0 + ky - s.pad.top;
                    let src = ((b * s.h + iy) * s.w + x0 + kx_lo - s.pad.left) * c;
                    seg[..kx_lo * c].fill(0.0);
                    seg[kx_lo * c..kx_hi * c].copy_from_slice(&x[src..src + (kx_hi - kx_lo) * c]);
                    seg[kx_hi * c..].fill(0.0);
                }
            }
        });
}

/// Channels per depthwise task: one vector of 16 lanes (AVX-512), the tail zero-padded.
const CB: usize = 16;

/// Per-thread scratch of [`depthwise`]: one zero-padded channel block of an image, (hp, wp, 16).
#[derive(Default)]
struct Scratch {
    block: Vec<f32>,
    weight: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A depthwise convolution on NHWC maps: `x` [batch, h, w, c], `weight` [c, 1, kh, kw] (PyTorch's
/// layout), `out` [batch, oh, ow, c]; `out = act(conv + bias + residual)` with the residual NHWC
/// too. `s` describes the shape as for [`super::conv2d`] (`depthwise: true`, `cin == cout == c`).
///
/// Each task takes one image and 16 channels: it copies them zero-padded into a small
/// (hp, wp, 16) block (so no tap needs a bounds check), then accumulates 8 output pixels at a
/// time in registers, one 16-channel vector each.
///
/// # Panics
/// On a shape that is not depthwise or slices whose lengths do not match it.
pub fn depthwise(x: &[f32], weight: &[f32], s: &ConvShape, e: Epilogue, out: &mut [f32]) {
    let (oh, ow) = s.out_hw();
    let c = s.cin;
    assert!(
        s.depthwise && s.cout == c && oh > 0 && ow > 0,
        "depthwise NHWC: {s:?}"
    );
    assert_eq!(
        x.len(),
        s.batch * s.h * s.w * c,
        "depthwise NHWC: input length"
    );
    assert_eq!(
        weight.len(),
        c * s.kh * s.kw,
        "depthwise NHWC: weight length"
    );
    assert_eq!(
        out.len(),
        s.batch * oh * ow * c,
        "depthwise NHWC: output length"
    );
    assert!(
        e.bias.is_none_or(|b| b.len() == c),
        "depthwise NHWC: bias length"
    );
    assert!(
        e.residual.is_none_or(|r| r.len() == out.len()),
        "depthwise NHWC: residual length"
    );
    let blocks = c.div_ceil(CB);
    let dst = OutPtr(out.as_mut_ptr());
    (0..s.batch * blocks).into_par_iter().for_each(|t| {
        let (b, c0) = (t / blocks, (t % blocks) * CB);
        SCRATCH.with_borrow_mut(|sc| channel_block(x, weight, s, e, b, c0, sc, dst));
    });
}

multiversion! {
/// Channels c0..c0 + 16 of image b (see [`depthwise`]).
#[allow(clippy::too_many_arguments)]
fn channel_block<L>(
    x: &[f32],
    weight: &[f32],
    s: &ConvShape,
    e: Epilogue,
    b: usize,
    c0: usize,
    sc: &mut Scratch,
    dst: OutPtr,
) {
    let (oh, ow) = s.out_hw();
    let (c, h, w) = (s.cin, s.h, s.w);
    let nc = CB.min(c - c0);
    let (hp, wp) = (h + s.pad.top + s.pad.bottom, w + s.pad.left + s.pad.right);
    let taps = s.kh * s.kw;
    sc.block.clear();
    sc.block.resize(hp * wp * CB, 0.0);
    for iy in 0..h {
        for ix in 0..w {
            let src = ((b * h + iy) * w + ix) * c + c0;
            let d = ((iy + s.pad.top) * wp + ix + s.pad.left) * CB;
            // SAFETY: nc values at src in x and at d in the block (checked by the slicing).
            unsafe {
                copy_channels(
                    x[src..src + nc].as_ptr(),
                    sc.block[d..d + nc].as_mut_ptr(),
                    nc,
                )
            };
        }
    }
    // The weights as [tap][16 channels], the tail zero.
    sc.weight.clear();
    sc.weight.resize(taps * CB, 0.0);
    for j in 0..nc {
        for t in 0..taps {
            sc.weight[t * CB + j] = weight[(c0 + j) * taps + t];
        }
    }
    let mut bias = [0f32; CB];
    if let Some(bv) = e.bias {
        bias[..nc].copy_from_slice(&bv[c0..c0 + nc]);
    }
    // Lane groups per 16-channel vector: 1 with AVX-512, 16 on the portable path.
    if L::N == CB {
        rows::<L, 1>(sc, s, e, b, c0, nc, &bias, dst, oh, ow, wp);
    } else {
        rows::<L, CB>(sc, s, e, b, c0, nc, &bias, dst, oh, ow, wp);
    }
}
}

/// Copies `n` (<= 16) channel values: a full block of 16 as one fixed-size copy (a vector move;
/// a length only known at run time would make it a `memcpy` call per pixel).
///
/// # Safety
/// `src` and `dst` are valid for `n` values and do not overlap.
#[inline(always)]
unsafe fn copy_channels(src: *const f32, dst: *mut f32, n: usize) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if n == CB {
            std::ptr::copy_nonoverlapping(src, dst, CB);
        } else {
            std::ptr::copy_nonoverlapping(src, dst, n);
        }
    }
}

/// Pixels accumulated together along an output row.
const PX: usize = 8;

/// The output rows of one channel block: `G` vectors of `L::N` lanes make the 16 channels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows<L: Lanes, const G: usize>(
    sc: &Scratch,
    s: &ConvShape,
    e: Epilogue,
    b: usize,
    c0: usize,
    nc: usize,
    bias: &[f32; CB],
    dst: OutPtr,
    oh: usize,
    ow: usize,
    wp: usize,
) {
    let (c, st, kh, kw) = (s.cin, s.stride, s.kh, s.kw);
    let blk = sc.block.as_ptr();
    let wt = sc.weight.as_ptr();
    let mut tmp = [0f32; CB];
    for oy in 0..oh {
        let mut ox0 = 0;
        while ox0 < ow {
            let npx = PX.min(ow - ox0);
            // SAFETY: bias holds 16 values.
            let mut acc = [[L::splat(0.0); G]; PX];
            for a in acc.iter_mut() {
                for (g, v) in a.iter_mut().enumerate() {
                    *v = unsafe { L::load(bias.as_ptr().add(g * L::N)) };
                }
            }
            for ky in 0..kh {
                for kx in 0..kw {
                    // SAFETY: the padded block holds (hp, wp, 16) values and every output pixel's
                    // window lies inside it; the weight holds taps x 16.
                    unsafe {
                        let row = blk.add(((oy * st + ky) * wp + kx) * CB);
                        let wv = wt.add((ky * kw + kx) * CB);
                        for g in 0..G {
                            let w = L::load(wv.add(g * L::N));
                            for (p, a) in acc.iter_mut().enumerate().take(npx) {
                                let v = L::load(row.add((ox0 + p) * st * CB + g * L::N));
                                a[g] = w.mul_add(v, a[g]);
                            }
                        }
                    }
                }
            }
            for (p, a) in acc.iter().enumerate().take(npx) {
                let at = ((b * oh + oy) * ow + ox0 + p) * c + c0;
                for (g, &v) in a.iter().enumerate() {
                    // SAFETY: tmp holds 16 values.
                    unsafe { v.store(tmp.as_mut_ptr().add(g * L::N)) };
                }
                if let Some(r) = e.residual {
                    tmp.iter_mut()
                        .zip(&r[at..at + nc])
                        .for_each(|(t, &r)| *t += r);
                }
                e.act.apply::<L>(&mut tmp[..nc]);
                // SAFETY: pixel (b, oy, ox0 + p), channels c0..c0 + nc belong to this task alone.
                unsafe { copy_channels(tmp.as_ptr(), dst.at(at), nc) };
            }
            ox0 += npx;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_close, naive_conv, rand_vec, CONV_REL_TOL};
    use super::super::{Act, ConvShape, Epilogue, Pad};
    use super::*;
    use crate::gemm::{gemm, PackedWeight};

    /// [b, c, h, w] -> [b, h, w, c].
    fn to_nhwc(x: &[f32], b: usize, c: usize, hw: usize) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        for i in 0..b {
            for ch in 0..c {
                for p in 0..hw {
                    y[(i * hw + p) * c + ch] = x[(i * c + ch) * hw + p];
                }
            }
        }
        y
    }

    #[test]
    fn depthwise_nhwc_matches_naive_reference() {
        // (batch, channels, h, w, kernel, stride, padding): channels below, at and above 16 with
        // tails; rows narrower and wider than the 8-pixel block; stride 2 and asymmetric padding.
        let cases = [
            (2, 16, 9, 11, 7, 1, Pad::same(3)),
            (1, 40, 7, 7, 7, 1, Pad::same(3)),
            (2, 5, 13, 20, 3, 1, Pad::same(1)),
            (
                1,
                33,
                12,
                13,
                3,
                2,
                Pad {
                    top: 0,
                    bottom: 1,
                    left: 1,
                    right: 1,
                },
            ),
            (1, 17, 3, 4, 5, 1, Pad::same(2)),
        ];
        for (i, (b, c, h, w, k, stride, pad)) in cases.into_iter().enumerate() {
            let s = ConvShape {
                batch: b,
                cin: c,
                h,
                w,
                cout: c,
                kh: k,
                kw: k,
                stride,
                pad,
                depthwise: true,
            };
            let (oh, ow) = s.out_hw();
            let x = rand_vec(b * c * h * w, 50 + i as u64);
            let wt = rand_vec(c * k * k, 60 + i as u64);
            let bias = rand_vec(c, 70 + i as u64);
            let residual = rand_vec(b * c * oh * ow, 80 + i as u64);
            let e = Epilogue {
                bias: (i % 3 != 2).then_some(&bias[..]),
                residual: (i % 2 == 0).then_some(&residual[..]),
                act: [Act::None, Act::Gelu, Act::Relu][i % 3],
            };
            let reference = to_nhwc(&naive_conv(&x, &wt, &s, e), b, c, oh * ow);
            let res = to_nhwc(&residual, b, c, oh * ow);
            let e_nhwc = Epilogue {
                residual: e.residual.map(|_| &res[..]),
                ..e
            };
            let mut out = vec![f32::NAN; b * oh * ow * c];
            depthwise(&to_nhwc(&x, b, c, h * w), &wt, &s, e_nhwc, &mut out);
            assert_close(&out, &reference, CONV_REL_TOL, &format!("case {i}: {s:?}"));
        }
    }

    #[test]
    fn im2col_and_gemm_match_naive_conv() {
        // Dense convolutions NHWC through im2col + the packed GEMM against the NCHW reference: patchify
        // (2x2 and 4x4 stride = kernel, odd sizes floor like the convolution), 1x1 at stride 1
        // and 2, ResNet's padded 3x3 (stride 1 and 2) and 7x7 stride-2 stem on odd sizes, a
        // window wider than the map, asymmetric padding; m from 1 row to several tasks.
        // (batch, cin, h, w, cout, k, stride, padding).
        let cases = [
            (2, 12, 9, 11, 9, 2, 2, Pad::default()),
            (1, 3, 12, 16, 24, 4, 4, Pad::default()),
            (3, 37, 30, 28, 19, 1, 1, Pad::default()),
            (1, 5, 1, 1, 7, 1, 1, Pad::default()),
            (2, 6, 13, 9, 5, 1, 2, Pad::default()),
            (2, 7, 11, 14, 10, 3, 1, Pad::same(1)),
            (1, 9, 15, 10, 4, 3, 2, Pad::same(1)),
            (2, 3, 97, 75, 8, 7, 2, Pad::same(3)),
            (1, 4, 2, 3, 6, 5, 1, Pad::same(2)),
            (
                1,
                5,
                8,
                7,
                3,
                3,
                2,
                Pad {
                    top: 0,
                    bottom: 1,
                    left: 1,
                    right: 0,
                },
            ),
        ];
        for (i, (b, cin, h, w, cout, k, stride, pad)) in cases.into_iter().enumerate() {
            let s = ConvShape {
                batch: b,
                cin,
                h,
                w,
                cout,
                kh: k,
                kw: k,
                stride,
                pad,
                depthwise: false,
            };
            let (oh, ow) = s.out_hw();
            let x = rand_vec(b * cin * h * w, 90 + i as u64);
            let wt = rand_vec(cout * cin * k * k, 91 + i as u64);
            let bias = rand_vec(cout, 92 + i as u64);
            let residual = rand_vec(b * cout * oh * ow, 93 + i as u64);
            let e = Epilogue {
                bias: (i % 4 != 1).then_some(&bias[..]),
                residual: (i % 2 == 0).then_some(&residual[..]),
                act: [Act::Gelu, Act::None, Act::Silu, Act::Relu6, Act::Relu][i % 5],
            };
            let reference = to_nhwc(&naive_conv(&x, &wt, &s, e), b, cout, oh * ow);
            // Weight [cout, cin, k, k] -> [cout, ky, kx, cin].
            let mut wp = vec![0f32; wt.len()];
            for o in 0..cout {
                for ci in 0..cin {
                    for t in 0..k * k {
                        wp[(o * k * k + t) * cin + ci] = wt[(o * cin + ci) * k * k + t];
                    }
                }
            }
            let packed = PackedWeight::pack(&wp, cout, cin * k * k, crate::Precision::F32);
            let (m, row) = (b * oh * ow, k * k * cin);
            let xn = to_nhwc(&x, b, cin, h * w);
            let res = to_nhwc(&residual, b, cout, oh * ow);
            // In two row ranges (split at an odd pixel), as callers gather in blocks.
            let mut out = vec![f32::NAN; m * cout];
            let split = m / 3;
            for rows in [0..split, split..m] {
                let mut cols = vec![f32::NAN; rows.len() * row];
                im2col(&xn, &s, rows.clone(), &mut cols);
                let e_nhwc = Epilogue {
                    residual: e.residual.map(|_| &res[rows.start * cout..rows.end * cout]),
                    ..e
                };
                let o = &mut out[rows.start * cout..rows.end * cout];
                gemm(&cols, rows.len(), &packed, e_nhwc, o);
            }
            assert_close(&out, &reference, CONV_REL_TOL, &format!("case {i}: {s:?}"));
        }
    }
}
