//! Depthwise convolution (one kh x kw filter per channel) on NCHW planes: each plane is copied once
//! into a zero-padded, stride-deinterleaved scratch buffer, so that every filter tap reads 16
//! consecutive inputs for 16 consecutive outputs (no bounds checks, no gathers), and each block of
//! 16 outputs stays in registers over all taps, with the bias and the activation applied before the
//! single store.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{ConvShape, Epilogue};
use crate::dispatch::multiversion;

const LANES: usize = 16;

thread_local! {
    /// The padded plane of the current thread, reused across calls.
    static PLANE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

pub(super) fn depthwise(x: &[f32], weight: &[f32], s: &ConvShape, e: Epilogue, out: &mut [f32]) {
    let (oh, ow) = s.out_hw();
    let (c, plane_in, plane_out) = (s.cin, s.h * s.w, oh * ow);
    let taps = s.kh * s.kw;
    // Small planes (late stages: 7x7 with a thousand channels) go several to a task.
    let min_len = (4096 / plane_out.max(1)).max(1);
    out.par_chunks_mut(plane_out)
        .with_min_len(min_len)
        .enumerate()
        .for_each(|(i, o)| {
            let ch = i % c;
            let xin = &x[i * plane_in..(i + 1) * plane_in];
            let w = &weight[ch * taps..(ch + 1) * taps];
            let e = Epilogue {
                bias: e.bias.map(|b| &b[ch..ch + 1]),
                residual: e.residual.map(|r| &r[i * plane_out..(i + 1) * plane_out]),
                act: e.act,
            };
            PLANE.with_borrow_mut(|buf| plane(xin, w, s, e, buf, o));
        });
}

multiversion! {
/// One output plane (`e` holds this channel's bias and this plane's residual). The scratch
/// buffer holds, for every padded input row, `stride` phases of `wq` values: phase `q` holds
/// padded columns `q, q + stride, q + 2 stride, ...`, so the tap at column offset `kx` of output
/// column `ox` is element `ox + kx / stride` of phase `kx % stride`.
fn plane<L>(
    x: &[f32],
    w: &[f32],
    s: &ConvShape,
    e: Epilogue,
    buf: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (oh, ow) = s.out_hw();
    let (h, wd, st) = (s.h, s.w, s.stride);
    let (kh, kw) = (s.kh, s.kw);
    let hp = h + s.pad.top + s.pad.bottom;
    let ow_pad = ow.next_multiple_of(LANES);
    let wq = ow_pad + (kw - 1) / st + 1;
    let row_len = st * wq;
    buf.clear();
    buf.resize(hp * row_len, 0.0);
    for iy in 0..h {
        let src = &x[iy * wd..(iy + 1) * wd];
        let dst = &mut buf[(iy + s.pad.top) * row_len..(iy + s.pad.top + 1) * row_len];
        // Padded columns beyond the phase width are never read by any output.
        if st == 1 {
            let n = wd.min(wq.saturating_sub(s.pad.left));
            dst[s.pad.left..s.pad.left + n].copy_from_slice(&src[..n]);
        } else {
            // Phase q holds the inputs ix with (ix + pad) % stride == q, from column
            // (ix + pad) / stride on.
            for q in 0..st {
                let ix0 = (q + st - s.pad.left % st) % st;
                let j0 = (ix0 + s.pad.left) / st;
                let phase = &mut dst[q * wq..(q + 1) * wq];
                for (d, &v) in phase[j0.min(wq)..]
                    .iter_mut()
                    .zip(src[ix0.min(wd)..].iter().step_by(st))
                {
                    *d = v;
                }
            }
        }
    }
    let mut tail = [0f32; LANES];
    for oy in 0..oh {
        let orow = &mut out[oy * ow..(oy + 1) * ow];
        for c0 in (0..ow).step_by(LANES) {
            let mut acc = [e.bias.map_or(0.0, |b| b[0]); LANES];
            for ky in 0..kh {
                let row = &buf[(oy * st + ky) * row_len..(oy * st + ky + 1) * row_len];
                for kx in 0..kw {
                    let wv = w[ky * kw + kx];
                    let start = (kx % st) * wq + c0 + kx / st;
                    let src: &[f32; LANES] = row[start..start + LANES].try_into().unwrap();
                    for l in 0..LANES {
                        acc[l] = if FMA {
                            wv.mul_add(src[l], acc[l])
                        } else {
                            wv * src[l] + acc[l]
                        };
                    }
                }
            }
            let n = (ow - c0).min(LANES);
            if let Some(r) = e.residual {
                let r = &r[oy * ow + c0..oy * ow + c0 + n];
                acc.iter_mut().zip(r).for_each(|(a, &r)| *a += r);
            }
            e.act.apply::<L>(&mut acc);
            if n == LANES {
                orow[c0..c0 + LANES].copy_from_slice(&acc);
            } else {
                tail[..n].copy_from_slice(&acc[..n]);
                orow[c0..c0 + n].copy_from_slice(&tail[..n]);
            }
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_close, naive_conv, rand_vec, CONV_REL_TOL};
    use super::super::{conv2d, Act, ConvShape, Epilogue, Pad};

    #[test]
    fn depthwise_matches_naive_reference() {
        // (batch, channels, h, w, kernel, stride, padding)
        let cases = [
            (2, 6, 9, 7, 3, 1, Pad::same(1)),
            (1, 17, 8, 11, 5, 2, Pad::same(2)),
            (2, 3, 5, 6, 3, 2, Pad::same(0)),
            (1, 2, 4, 4, 5, 1, Pad::same(2)),
            (1, 3, 1, 2, 5, 1, Pad::same(2)),
            (1, 2, 2, 3, 5, 2, Pad::same(2)),
            (2, 19, 14, 14, 7, 1, Pad::same(3)),
            (1, 5, 23, 37, 7, 2, Pad::same(3)),
            // TF "SAME" with the extra pixel at the bottom/right: 3x3 s2 on 12x13 -> 6x7.
            (
                2,
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
            (
                1,
                4,
                15,
                16,
                5,
                2,
                Pad {
                    top: 1,
                    bottom: 2,
                    left: 1,
                    right: 2,
                },
            ),
            (
                1,
                3,
                40,
                33,
                3,
                1,
                Pad {
                    top: 1,
                    bottom: 1,
                    left: 1,
                    right: 1,
                },
            ),
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
            let x = rand_vec(b * c * h * w, 10 + i as u64);
            let wt = rand_vec(c * k * k, 20 + i as u64);
            let bias = rand_vec(c, 30 + i as u64);
            let (oh, ow) = s.out_hw();
            let residual = rand_vec(b * c * oh * ow, 40 + i as u64);
            let e = Epilogue {
                bias: (i % 4 != 3).then_some(&bias[..]),
                residual: (i % 2 == 1).then_some(&residual[..]),
                act: [Act::None, Act::Relu6, Act::Silu][i % 3],
            };
            let mut out = vec![f32::NAN; b * c * oh * ow];
            conv2d(&x, &wt, &s, e, &mut out);
            let reference = naive_conv(&x, &wt, &s, e);
            assert_close(&out, &reference, CONV_REL_TOL, &format!("case {i}: {s:?}"));
        }
    }
}
