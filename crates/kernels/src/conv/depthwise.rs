//! Depthwise convolution (one kh x kw filter per channel) on NCHW planes: each plane is copied once
//! into a zero-padded, stride-deinterleaved scratch buffer, so that every filter tap reads whole
//! vectors of consecutive inputs for consecutive outputs (no bounds checks, no gathers). Outputs are
//! computed in blocks of up to 8 vectors (rows x column vectors) kept in registers over all taps, so
//! the FMAs of one tap are independent (a single accumulator would wait on the FMA latency), with
//! the bias, the residual and the activation applied before the single store.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{ConvShape, Epilogue};
use crate::dispatch::multiversion;
use crate::math::Lanes;

/// Columns of padding after every output row of the scratch buffer: a multiple of every lane count,
/// so the last (partial) vector of a row reads inside the buffer.
const ROW_PAD: usize = 16;

/// Per-thread scratch, reused across calls.
#[derive(Default)]
struct Scratch {
    /// The padded, deinterleaved input plane.
    plane: Vec<f32>,
    /// Offset of tap column kx inside a buffer row.
    kx_off: Vec<usize>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
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
            SCRATCH.with_borrow_mut(|buf| plane(xin, w, s, e, buf, o));
        });
}

/// Where one block of outputs reads and writes.
struct Block<'a> {
    /// The scratch buffer at the block's first row and column.
    src: *const f32,
    row_len: usize,
    stride: usize,
    kh: usize,
    kx_off: &'a [usize],
    w: &'a [f32],
    bias: f32,
}

/// Accumulates `R` output rows x `V` vectors of `L::N` columns over every tap: each tap loads its
/// weight once and issues `R * V` independent FMAs.
///
/// # Safety
/// Every row `r * stride + ky` and column `kx_off[kx] + V * L::N` read is inside the buffer.
#[inline(always)]
unsafe fn accumulate<L: Lanes, const R: usize, const V: usize>(b: &Block) -> [[L; V]; R] {
    let mut acc = [[L::splat(b.bias); V]; R];
    let kw = b.kx_off.len();
    for ky in 0..b.kh {
        let base = b.src.add(ky * b.row_len);
        for (kx, &off) in b.kx_off.iter().enumerate() {
            let wv = L::splat(*b.w.get_unchecked(ky * kw + kx));
            let p = base.add(off);
            for (r, acc) in acc.iter_mut().enumerate() {
                let pr = p.add(r * b.stride * b.row_len);
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = wv.mul_add(L::load(pr.add(v * L::N)), *a);
                }
            }
        }
    }
    acc
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
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let (oh, ow) = s.out_hw();
    let (h, wd, st) = (s.h, s.w, s.stride);
    let (kh, kw) = (s.kh, s.kw);
    let hp = h + s.pad.top + s.pad.bottom;
    let wq = ow + ROW_PAD + (kw - 1) / st;
    let row_len = st * wq;
    let buf = &mut scratch.plane;
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
    scratch.kx_off.clear();
    scratch.kx_off.extend((0..kw).map(|kx| (kx % st) * wq + kx / st));
    let bias = e.bias.map_or(0.0, |b| b[0]);
    let nv = ow.div_ceil(L::N);
    // Row bands sized for the widest block of the band (at most 8 accumulators); the narrower tail
    // blocks of a band use the same rows.
    let widest = nv.min(4);
    let mut oy = 0;
    while oy < oh {
        let r = [8, 4, 2, 1]
            .into_iter()
            .find(|&r| r <= oh - oy && r * widest <= 8)
            .unwrap_or(1);
        let mut v0 = 0;
        while v0 < nv {
            let v = (nv - v0).min(4);
            let c0 = v0 * L::N;
            let b = Block {
                src: buf[oy * st * row_len + c0..].as_ptr(),
                row_len,
                stride: st,
                kh,
                kx_off: &scratch.kx_off,
                w,
                bias,
            };
            // SAFETY: rows oy..oy + r of the output read padded rows up to (oh - 1) * st + kh - 1
            // < hp, and columns up to c0 + v * N - 1 + (kw - 1) / st < ow + ROW_PAD + (kw - 1) / st
            // inside each phase of wq values.
            macro_rules! run {
                ($($r:literal, $v:literal);*) => {
                    match (r, v) {
                        $(($r, $v) => store::<L, $r, $v>(
                            unsafe { accumulate::<L, $r, $v>(&b) }, e, out, oy, c0, ow,
                        ),)*
                        _ => unreachable!("block {r}x{v}"),
                    }
                };
            }
            run!(8, 1; 4, 1; 2, 1; 1, 1; 4, 2; 2, 2; 1, 2; 2, 3; 1, 3; 2, 4; 1, 4);
            v0 += v;
        }
        oy += r;
    }
}
}

/// Adds the residual, applies the activation and stores the valid columns of a block whose top-left
/// output is (oy, c0).
#[inline(always)]
fn store<L: Lanes, const R: usize, const V: usize>(
    acc: [[L; V]; R],
    e: Epilogue,
    out: &mut [f32],
    oy: usize,
    c0: usize,
    ow: usize,
) {
    let mut tmp = [0f32; 16];
    for (r, acc) in acc.iter().enumerate() {
        for (v, &a) in acc.iter().enumerate() {
            let col = c0 + v * L::N;
            if col >= ow {
                break;
            }
            let n = (ow - col).min(L::N);
            let at = (oy + r) * ow + col;
            let mut a = a;
            if let Some(res) = e.residual {
                tmp[..n].copy_from_slice(&res[at..at + n]);
                // SAFETY: tmp holds 16 >= N values.
                a = a.add(unsafe { L::load(tmp.as_ptr()) });
            }
            let a = e.act.lanes::<L>(a);
            if n == L::N {
                // SAFETY: n == N values from `at` are inside this output plane.
                unsafe { a.store(out[at..at + n].as_mut_ptr()) };
            } else {
                // SAFETY: tmp holds 16 >= N values.
                unsafe { a.store(tmp.as_mut_ptr()) };
                out[at..at + n].copy_from_slice(&tmp[..n]);
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
            // Wide maps: blocks of 4 vectors with 1-3 vector tails, bands of 8/4/2/1 rows.
            (1, 2, 19, 70, 5, 1, Pad::same(2)),
            (2, 3, 23, 50, 3, 1, Pad::same(1)),
            (1, 2, 30, 101, 3, 2, Pad::same(1)),
            (1, 2, 13, 36, 7, 1, Pad::same(3)),
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
