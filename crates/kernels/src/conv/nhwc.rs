//! Channels-last (NHWC) building blocks, for trunks that keep one row of C values per pixel
//! (ConvNeXt): the depthwise convolution vectorised across channels, and the patch gather that turns
//! a `k x k` stride-`k` convolution (patchify stems, 2x2 downsampling) into one GEMM over all pixels
//! ([`crate::gemm`], which also runs the 1x1 convolutions / linear layers with the epilogue fused).

use std::cell::RefCell;

use rayon::prelude::*;

use super::{ConvShape, Epilogue, OutPtr};
use crate::dispatch::multiversion;
use crate::math::Lanes;

/// Gathers the non-overlapping `k x k` patches of an NHWC map [batch, h, w, c] into rows
/// [batch * (h / k) * (w / k), k * k * c], each ordered (ky, kx, c): a stride-`k` `k x k`
/// convolution is then a GEMM ([`crate::gemm::gemm`]) with its weight permuted to [cout, ky, kx, cin]. Like the
/// convolution, the last rows/columns that do not fill a patch are dropped (floor).
///
/// # Panics
/// When `x` is not `batch * h * w * c` values, the map is smaller than one patch, or `out` is not
/// the patches' size.
pub fn patches(x: &[f32], batch: usize, h: usize, w: usize, c: usize, k: usize, out: &mut [f32]) {
    let (oh, ow) = (h / k.max(1), w / k.max(1));
    assert!(
        k > 0 && oh > 0 && ow > 0,
        "patches: {h}x{w} map, {k}x{k} patches"
    );
    assert_eq!(x.len(), batch * h * w * c, "patches: input length");
    let row = k * k * c;
    assert_eq!(out.len(), batch * oh * ow * row, "patches: output length");
    out.par_chunks_mut(ow * row)
        .enumerate()
        .for_each(|(i, orow)| {
            let (b, oy) = (i / oh, i % oh);
            for ox in 0..ow {
                for ky in 0..k {
                    let src = ((b * h + oy * k + ky) * w + ox * k) * c;
                    let dst = ox * row + ky * k * c;
                    orow[dst..dst + k * c].copy_from_slice(&x[src..src + k * c]);
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
    fn patches_and_gemm_match_naive_conv() {
        // A 2x2 stride-2 convolution (ConvNeXt downsampling) and a 1x1 one, NHWC through
        // patches + the packed GEMM, against the NCHW reference; m from 1 row to several tasks.
        // (batch, cin, h, w, cout, k): odd sizes drop their last row/column like the convolution.
        let cases = [
            (2, 12, 9, 11, 9, 2),
            (1, 3, 12, 16, 24, 4),
            (3, 37, 30, 28, 19, 1),
            (1, 5, 1, 1, 7, 1),
        ];
        for (i, (b, cin, h, w, cout, k)) in cases.into_iter().enumerate() {
            let s = ConvShape {
                batch: b,
                cin,
                h,
                w,
                cout,
                kh: k,
                kw: k,
                stride: k,
                pad: Pad::default(),
                depthwise: false,
            };
            let (oh, ow) = s.out_hw();
            let x = rand_vec(b * cin * h * w, 90 + i as u64);
            let wt = rand_vec(cout * cin * k * k, 91 + i as u64);
            let bias = rand_vec(cout, 92 + i as u64);
            let residual = rand_vec(b * cout * oh * ow, 93 + i as u64);
            let e = Epilogue {
                bias: (i != 1).then_some(&bias[..]),
                residual: (i % 2 == 0).then_some(&residual[..]),
                act: [Act::Gelu, Act::None, Act::Silu, Act::Relu6][i],
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
            let mut cols = vec![0f32; b * oh * ow * k * k * cin];
            patches(&to_nhwc(&x, b, cin, h * w), b, h, w, cin, k, &mut cols);
            let res = to_nhwc(&residual, b, cout, oh * ow);
            let e_nhwc = Epilogue {
                residual: e.residual.map(|_| &res[..]),
                ..e
            };
            let mut out = vec![f32::NAN; b * oh * ow * cout];
            let wp = PackedWeight::pack(&wp, cout, cin * k * k, crate::Precision::F32);
            gemm(&cols, b * oh * ow, &wp, e_nhwc, &mut out);
            assert_close(&out, &reference, CONV_REL_TOL, &format!("case {i}: {s:?}"));
        }
    }
}
