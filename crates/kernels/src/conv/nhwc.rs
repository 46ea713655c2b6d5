//! Channels-last (NHWC) building blocks, for trunks that keep one row of C values per pixel
//! (ConvNeXt, ResNet): the depthwise convolution vectorised across channels, and every other dense
//! convolution (patchify stems, 3x3 and 7x7 windows, strided 1x1) as one GEMM over all pixels
//! ([`crate::gemm`], which also runs the 1x1 convolutions / linear layers with the epilogue fused):
//! in f32 with AVX-512 reading each pixel's window in place (implicit GEMM,
//! [`crate::gemm_f32::gemm_f32_windows`]), otherwise on rows gathered by [`im2col`].

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::{ConvShape, Epilogue, Pad};
use crate::dispatch::multiversion;
use crate::gemm::{gemm, PackedWeight};
use crate::gemm_f32::{gemm_f32_windows, PackedF32, Windows};
use crate::math::Lanes;
use crate::panel::{as_uninit, with_scratch};
use crate::OutPtr;

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

/// im2col values gathered per GEMM call in [`dense`] (2 MiB of f32, near L2): a 3x3 convolution
/// over 64 channels then runs ~900 output pixels per call.
const COLS_BUDGET: usize = 512 << 10;

thread_local! {
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A dense convolution on NHWC maps: `x` [batch, h, w, cin], `w` packed from the weight permuted to
/// [cout, kh, kw, cin] ([`crate::gemm::PackedWeight`], any precision), `out` [batch, oh, ow, cout] =
/// `act(conv + bias + residual)` (the residual NHWC too). A 1x1 stride-1 unpadded convolution is one
/// GEMM over the pixels; any other, in f32 where AVX-512 runs, one GEMM over the pixels' windows
/// read in place (from a zero-padded copy of `x` when `s` pads), else it gathers [`im2col`] rows
/// in blocks of ~2 MiB, each one GEMM. On the Xeon of BENCHMARKS.md's session 13 reading in place
/// made ResNet-50's 7x7 stem twice as fast and its stride-2 and 512-channel 3x3 convolutions
/// 10-25 % faster than im2col's copies (the stem's 147 values per pixel: 59 MB at batch 8).
///
/// # Panics
/// When `s` is depthwise or the slices do not match it (as [`im2col`] and [`crate::gemm::gemm`]).
pub fn dense(x: &[f32], s: &ConvShape, w: &PackedWeight, e: Epilogue, out: &mut [f32]) {
    let (oh, ow) = s.out_hw();
    let (m, n) = (s.batch * oh * ow, s.cout);
    assert_eq!(out.len(), m * n, "dense NHWC: output length");
    if s.kh == 1 && s.kw == 1 && s.stride == 1 && s.pad == Pad::default() {
        return gemm(x, m, w, e, out);
    }
    if let PackedWeight::F32(w) = w {
        if in_place(x, s, w, e, out) {
            return;
        }
    }
    let row = s.kh * s.kw * s.cin;
    let block = (COLS_BUDGET / row.max(1)).max(1);
    with_scratch(&COLS, block.min(m) * row, |cols| {
        for r0 in (0..m).step_by(block) {
            let rows = r0..(r0 + block).min(m);
            let cols = &mut cols[..rows.len() * row];
            im2col(x, s, rows.clone(), cols);
            let e = Epilogue {
                residual: e.residual.map(|r| &r[rows.start * n..rows.end * n]),
                ..e
            };
            gemm(
                cols,
                rows.len(),
                w,
                e,
                &mut out[rows.start * n..rows.end * n],
            );
        }
    });
}

thread_local! {
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`dense`] in f32 as one GEMM whose rows of A are the output pixels' windows read in place
/// ([`gemm_f32_windows`]: `kh` runs of `kw * cin` values, one per filter row), on a zero-padded copy
/// of `x` when `s` pads (one pass over the input instead of im2col's `kh * kw / stride²` copies
/// and its blocks). False, having done nothing, where that kernel does not run (no AVX-512F).
fn in_place(x: &[f32], s: &ConvShape, w: &PackedF32, e: Epilogue, out: &mut [f32]) -> bool {
    let features = crate::cpu::features();
    if !features.avx512f {
        return false;
    }
    let (oh, ow) = s.out_hw();
    let (hp, wp) = (
        s.h + s.pad.top + s.pad.bottom,
        s.w + s.pad.left + s.pad.right,
    );
    let c = s.cin;
    let mut run = |x: &[f32]| {
        let a = Windows {
            x,
            runs: s.kh,
            len: s.kw * c,
            stride: wp * c,
            start: |i: usize| {
                let (b, oy, ox) = (i / (oh * ow), i / ow % oh, i % ow);
                ((b * hp + oy * s.stride) * wp + ox * s.stride) * c
            },
        };
        let m = s.batch * oh * ow;
        gemm_f32_windows(&a, m, w, e, as_uninit(out), features)
    };
    if s.pad == Pad::default() {
        return run(x);
    }
    with_scratch(&PADDED, s.batch * hp * wp * c, |padded| {
        pad(x, s, padded);
        run(padded)
    })
}

/// `out` [batch, h + top + bottom, w + left + right, c] = the NHWC map `x` ([batch, h, w, c] of
/// `s`) inside a border of zeros `s.pad` wide.
fn pad(x: &[f32], s: &ConvShape, out: &mut [f32]) {
    let (c, p) = (s.cin, s.pad);
    let (hp, wp) = (s.h + p.top + p.bottom, s.w + p.left + p.right);
    out.par_chunks_mut((wp * c).max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let (b, y) = (r / hp, r % hp);
            if y < p.top || y >= p.top + s.h {
                return row.fill(0.0);
            }
            let src = &x[(b * s.h + y - p.top) * s.w * c..][..s.w * c];
            let (left, rest) = row.split_at_mut(p.left * c);
            let (mid, right) = rest.split_at_mut(s.w * c);
            left.fill(0.0);
            mid.copy_from_slice(src);
            right.fill(0.0);
        });
}

/// Pixels per task of [`nchw_to_nhwc`].
const TRANSPOSE_PIXELS: usize = 256;

/// `dst` [batch, hw, c] = `src` [batch, c, hw] transposed, in parallel blocks of pixels (each
/// block reads one contiguous run per channel and image it covers).
///
/// # Panics
/// When `src` or `dst` is not `batch * c * hw` values.
pub fn nchw_to_nhwc(src: &[f32], batch: usize, c: usize, hw: usize, dst: &mut [f32]) {
    assert_eq!(src.len(), batch * c * hw, "nchw_to_nhwc: input length");
    assert_eq!(dst.len(), src.len(), "nchw_to_nhwc: output length");
    if c == 0 || hw == 0 {
        return;
    }
    dst.par_chunks_mut(TRANSPOSE_PIXELS * c)
        .enumerate()
        .for_each(|(i, mut block)| {
            // The block's pixels, split where an image ends: channel `ch` of pixels `at..at + n`
            // of image `b` is one run of `src`, stored every `c` values of the block.
            let mut p = i * TRANSPOSE_PIXELS;
            while !block.is_empty() {
                let (b, at) = (p / hw, p % hw);
                let n = (hw - at).min(block.len() / c);
                let (run, rest) = block.split_at_mut(n * c);
                let from = |ch: usize| &src[(b * c + ch) * hw + at..][..n];
                if c == 3 {
                    // RGB (every image model's input): whole pixels at a time, which vectorises.
                    let (r, g, bl) = (from(0), from(1), from(2));
                    for (j, px) in run.chunks_exact_mut(3).enumerate() {
                        px.copy_from_slice(&[r[j], g[j], bl[j]]);
                    }
                } else {
                    for ch in 0..c {
                        for (o, &v) in run[ch..].iter_mut().step_by(c).zip(from(ch)) {
                            *o = v;
                        }
                    }
                }
                block = rest;
                p += n;
            }
        });
}

/// Channels of one depthwise vector block: 16 lanes (one AVX-512 register, or 16 values the portable
/// paths auto-vectorise); the channels past the last full block run one at a time.
const CB: usize = 16;
/// Output pixels accumulated together along a row (their filter taps share each weight load).
const PX: usize = 8;
/// Parallel tasks per thread (bands of output rows), for load balance.
const TASKS_PER_THREAD: usize = 8;

/// A depthwise convolution's weight, tap-major ([kh * kw, c]: one load reads a tap of consecutive
/// channels), rearranged once from PyTorch's [c, 1, kh, kw].
#[derive(Debug, Clone)]
pub struct DepthwiseWeight {
    c: usize,
    taps: usize,
    data: Vec<f32>,
}

impl DepthwiseWeight {
    /// `weight` [c, 1, kh, kw] for `c` channels of `taps = kh * kw` taps.
    pub fn pack(weight: &[f32], c: usize, taps: usize) -> Self {
        assert_eq!(weight.len(), c * taps, "depthwise weight: not {c} x {taps}");
        let mut data = vec![0f32; taps * c];
        for (ch, w) in weight.chunks_exact(taps.max(1)).enumerate() {
            for (t, &v) in w.iter().enumerate() {
                data[t * c + ch] = v;
            }
        }
        Self { c, taps, data }
    }
}

/// A depthwise convolution on NHWC maps: `x` [batch, h, w, c], `weight` packed at load
/// ([`DepthwiseWeight`]), `out` [batch, oh, ow, c]; `out = act(conv + bias + residual)` with the residual NHWC
/// too. `s` describes the shape as for [`super::conv2d`] (`depthwise: true`, `cin == cout == c`).
///
/// Tasks are bands of output rows. Along a row, 16 channels x 8 output pixels accumulate in
/// registers straight from the input: for 3-, 5- and 7-wide filters at stride 1 and 3- and 5-wide
/// ones at stride 2 each input pixel of the block's windows is loaded once and the filter row's
/// weights stay in registers; other shapes load each tap (one weight load feeds 8 pixels). Blocks
/// at the borders skip the padding. The bias, residual and activation are applied before the
/// single store.
///
/// # Panics
/// On a shape that is not depthwise or slices whose lengths do not match it.
pub fn depthwise(x: &[f32], weight: &DepthwiseWeight, s: &ConvShape, e: Epilogue, out: &mut [f32]) {
    let d = Depthwise::new(x, weight, s, e, out);
    bands(s.batch * s.out_hw().0).for_each(|rows| {
        for r in rows {
            depthwise_row(&d, r, None);
        }
    });
}

/// [`depthwise`], and `means` [batch, c] = the mean over the pixels of each image of `out`, summed
/// as each output row is stored (squeeze-excitation's pooling without another pass over the map).
///
/// # Panics
/// As [`depthwise`]; when `means` is not `batch * c` long.
pub fn depthwise_and_mean(
    x: &[f32],
    weight: &DepthwiseWeight,
    s: &ConvShape,
    e: Epilogue,
    out: &mut [f32],
    means: &mut [f32],
) {
    let d = Depthwise::new(x, weight, s, e, out);
    let (c, (oh, ow)) = (s.cin, s.out_hw());
    assert_eq!(means.len(), s.batch * c, "depthwise NHWC: means length");
    // Per task: the sums of its rows, per image its band touches (from the first).
    let partial: Vec<(usize, Vec<f32>)> = bands(s.batch * oh)
        .map(|rows| {
            let first = rows.start / oh;
            let mut sums = vec![0f32; ((rows.end - 1) / oh + 1 - first) * c];
            for r in rows {
                depthwise_row(&d, r, Some(&mut sums[(r / oh - first) * c..][..c]));
            }
            (first, sums)
        })
        .collect();
    means.fill(0.0);
    for (first, sums) in partial {
        for (m, s) in means[first * c..].iter_mut().zip(sums) {
            *m += s;
        }
    }
    let inv = 1.0 / (oh * ow) as f32;
    means.iter_mut().for_each(|m| *m *= inv);
}

/// The parallel tasks of a depthwise convolution with `rows` output rows (of all images): bands of
/// consecutive rows, [`TASKS_PER_THREAD`] per thread.
fn bands(rows: usize) -> impl IndexedParallelIterator<Item = Range<usize>> {
    let band = rows
        .div_ceil(crate::cpu::threads() * TASKS_PER_THREAD)
        .max(1);
    crate::cpu::tasks(rows.div_ceil(band)).map(move |t| t * band..rows.min((t + 1) * band))
}

/// The operands of one [`depthwise`] call.
struct Depthwise<'a> {
    x: &'a [f32],
    /// Tap-major weights [kh * kw, c].
    wt: &'a [f32],
    s: &'a ConvShape,
    e: Epilogue<'a>,
    dst: OutPtr,
}

impl<'a> Depthwise<'a> {
    /// Checks the operands.
    fn new(
        x: &'a [f32],
        weight: &'a DepthwiseWeight,
        s: &'a ConvShape,
        e: Epilogue<'a>,
        out: &'a mut [f32],
    ) -> Self {
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
        assert!(
            weight.c == c && weight.taps == s.kh * s.kw,
            "depthwise NHWC: weight of {} x {} taps",
            weight.c,
            weight.taps
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
        Self {
            x,
            wt: &weight.data,
            s,
            e,
            dst: OutPtr(out.as_mut_ptr()),
        }
    }
}

multiversion! {
/// Output row `row` of all images' rows (image `row / oh`, row `row % oh` in it), every channel;
/// adds the row's outputs to `sums` (c values) when given.
fn depthwise_row<L>(d: &Depthwise, row: usize, sums: Option<&mut [f32]>) {
    let c = d.s.cin;
    let oh = d.s.out_hw().0;
    let (b, oy) = (row / oh, row % oh);
    let full = c / CB * CB;
    let sums = sums.map_or(std::ptr::null_mut(), |s| {
        assert_eq!(s.len(), c, "depthwise NHWC: sums length");
        s.as_mut_ptr()
    });
    // Lane groups per 16-channel block: 1 with AVX-512, 16 single lanes on the portable paths.
    if L::N == CB {
        row_channels::<L, 1>(d, b, oy, 0..full, sums);
    } else {
        row_channels::<L, CB>(d, b, oy, 0..full, sums);
    }
    row_channels::<f32, 1>(d, b, oy, full..c, sums);
}
}

/// Row `oy` of image `b` for `channels`, in blocks of [`PX`] output pixels x `G` vectors of `L::N`
/// lanes: a block's input window (a few pixels x every channel) stays in L1 while its channels
/// run, and its outputs are one contiguous run. Each output is added to `sums` (`c` values, the
/// channel's sum) unless it is null.
#[inline(always)]
fn row_channels<L: Lanes, const G: usize>(
    d: &Depthwise,
    b: usize,
    oy: usize,
    channels: Range<usize>,
    sums: *mut f32,
) {
    let s = d.s;
    let (oh, ow) = s.out_hw();
    let (c, st, pad) = (s.cin, s.stride, s.pad);
    // Filter rows inside the map for this output row.
    let y0 = oy * st;
    let ky = pad.top.saturating_sub(y0)..(s.h + pad.top).saturating_sub(y0).min(s.kh);
    let (x, wt) = (d.x.as_ptr(), d.wt.as_ptr());
    // (The one-lane tail after the 16-lane blocks is usually empty: skip its blocks' setup.)
    if channels.is_empty() {
        return;
    }
    for ox in (0..ow).step_by(PX) {
        let npx = PX.min(ow - ox);
        // The windows' first columns, in padded coordinates; the block is inside when all its
        // pixels' windows are.
        let x0 = |p: usize| (ox + p) * st;
        let inside = npx == PX && x0(0) >= pad.left && x0(PX - 1) + s.kw <= s.w + pad.left;
        let mut win = Window {
            start: [0; PX],
            lo: [0; PX],
            hi: [0; PX],
            kw: s.kw,
            c,
        };
        for (p, start) in win.start.iter_mut().enumerate() {
            *start = (x0(p) as isize - pad.left as isize) * c as isize;
        }
        if !inside {
            // Each pixel's taps inside the map (none past the row's end).
            for p in 0..npx {
                win.lo[p] = pad.left.saturating_sub(x0(p));
                win.hi[p] = (s.w + pad.left).saturating_sub(x0(p)).min(s.kw);
            }
        }
        // The block's windows span input columns x0(0) - pad.left + i for i in 0..span; those
        // inside the map are `cols`.
        let span = (PX - 1) * st + s.kw;
        let col0 = x0(0) as isize - pad.left as isize;
        let cols = (-col0).max(0) as usize..(s.w as isize - col0).clamp(0, span as isize) as usize;
        if channels.start == 0 {
            prefetch_next_rows(d, b, y0, ox, npx);
        }
        for c0 in channels.clone().step_by(G * L::N) {
            let mut acc = [[L::splat(0.0); G]; PX];
            for a in acc.iter_mut() {
                for (g, v) in a.iter_mut().enumerate() {
                    *v = match d.e.bias {
                        // SAFETY: c0 + (g + 1) L::N <= c values of the bias (checked length).
                        Some(b) => unsafe { L::load(b.as_ptr().add(c0 + g * L::N)) },
                        None => L::splat(0.0),
                    };
                }
            }
            for ky in ky.clone() {
                let iy = y0 + ky - pad.top;
                // SAFETY: iy < h, so the row's pixels are inside `x`.
                let row = unsafe { x.add((b * s.h + iy) * s.w * c + c0) };
                // SAFETY: the weight holds kh * kw taps x c channels.
                let wv = unsafe { wt.add(ky * s.kw * c + c0) };
                // SAFETY: as `accumulate` requires (the window bounds come from the block).
                unsafe {
                    let first = row.wrapping_offset(win.start[0]);
                    let ins = (cols.start, cols.end, c);
                    match (s.kw, st) {
                        (3, 1) => accumulate_fixed::<L, G, 3, 1>(&mut acc, first, wv, ins),
                        (5, 1) => accumulate_fixed::<L, G, 5, 1>(&mut acc, first, wv, ins),
                        (7, 1) => accumulate_fixed::<L, G, 7, 1>(&mut acc, first, wv, ins),
                        (3, 2) => accumulate_fixed::<L, G, 3, 2>(&mut acc, first, wv, ins),
                        (5, 2) => accumulate_fixed::<L, G, 5, 2>(&mut acc, first, wv, ins),
                        _ if inside => accumulate::<L, G, false>(&mut acc, row, wv, &win),
                        _ => accumulate::<L, G, true>(&mut acc, row, wv, &win),
                    }
                }
            }
            let at = ((b * oh + oy) * ow + ox) * c + c0;
            for (p, a) in acc.iter().enumerate().take(npx) {
                for (g, &v) in a.iter().enumerate() {
                    let i = at + p * c + g * L::N;
                    let v = match d.e.residual {
                        // SAFETY: pixel ox + p < ow; its channels lie inside the residual (checked
                        // length).
                        Some(r) => v.add(unsafe { L::load(r.as_ptr().add(i)) }),
                        None => v,
                    };
                    let v = d.e.act.lanes::<L>(v);
                    // SAFETY: the pixel's channels belong to this task's row alone; a non-null
                    // `sums` holds every channel and is this task's.
                    unsafe {
                        v.store(d.dst.at(i));
                        if !sums.is_null() {
                            let sum = sums.add(c0 + g * L::N);
                            L::load(sum).add(v).store(sum);
                        }
                    }
                }
            }
        }
    }
}

/// Asks the cache for the input the next output row's window adds (the `stride` rows below this
/// row's window) under the block of `npx` pixels from `ox`: the block loop otherwise touches each
/// new input row's lines first at ~64-byte strides spread across its channels, which the hardware
/// prefetchers do not follow, and waits for memory at each.
#[inline(always)]
fn prefetch_next_rows(d: &Depthwise, b: usize, y0: usize, ox: usize, npx: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let s = d.s;
        let c = s.cin;
        let x_lo = (ox * s.stride).saturating_sub(s.pad.left);
        let x_hi = ((ox + npx - 1) * s.stride + s.kw)
            .saturating_sub(s.pad.left)
            .min(s.w);
        for iy in y0 + s.kh..y0 + s.kh + s.stride {
            let Some(iy) = iy.checked_sub(s.pad.top).filter(|&iy| iy < s.h) else {
                continue;
            };
            if x_lo >= x_hi {
                continue;
            }
            let run = &d.x[((b * s.h + iy) * s.w + x_lo) * c..((b * s.h + iy) * s.w + x_hi) * c];
            for line in run.chunks(16) {
                // SAFETY: a prefetch of memory inside `x`; it never faults.
                unsafe {
                    std::arch::x86_64::_mm_prefetch(
                        line.as_ptr() as *const i8,
                        std::arch::x86_64::_MM_HINT_T0,
                    )
                };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (d, b, y0, ox, npx);
}

/// The input windows of a block of [`PX`] output pixels along one row.
struct Window {
    /// Per pixel, the element offset of its window's first column from the row's start (negative
    /// where the window starts in the padding).
    start: [isize; PX],
    /// Per pixel, the filter columns `lo..hi` inside the map (empty for pixels past the row's
    /// end); only set for blocks at a border.
    lo: [usize; PX],
    hi: [usize; PX],
    kw: usize,
    /// Values per pixel.
    c: usize,
}

/// Most input pixels the windows of a block of [`PX`] output pixels span in [`accumulate_fixed`].
const MAX_SPAN: usize = 24;

/// [`accumulate`] for a `KW`-wide filter at stride `S`: the block's windows cover the
/// `(PX - 1) S + KW` input pixels from `first` (pixel `p` tap `kx` reads pixel `p S + kx`), so each
/// is loaded once and feeds every accumulator whose window holds it, with the `KW` weights in
/// registers: about one load per `KW / S` multiply-adds instead of one per multiply-add. Input
/// pixels outside `lo..hi` (the padding, at a border) are zeros, not loaded; the windows of pixels
/// past the row's end reach past it too, and their accumulators are not stored.
///
/// # Safety
/// Input pixels `lo..hi` from `first` (`c` apart) are inside the row; `wv` holds `KW` taps `c`
/// apart of `G * L::N` channels.
#[inline(always)]
unsafe fn accumulate_fixed<L: Lanes, const G: usize, const KW: usize, const S: usize>(
    acc: &mut [[L; G]; PX],
    first: *const f32,
    wv: *const f32,
    (lo, hi, c): (usize, usize, usize),
) {
    let span = (PX - 1) * S + KW;
    const { assert!((PX - 1) * S + KW <= MAX_SPAN) };
    for g in 0..G {
        // The accumulators in a local array (kept in registers once the loops are unrolled).
        let mut a: [L; PX] = acc.map(|v| v[g]);
        // SAFETY: forwarded from the caller.
        unsafe {
            let w: [L; KW] = std::array::from_fn(|kx| L::load(wv.add(kx * c + g * L::N)));
            let v: [L; MAX_SPAN] = std::array::from_fn(|i| {
                if i < span && (lo..hi).contains(&i) {
                    L::load(first.wrapping_add(i * c + g * L::N))
                } else {
                    L::splat(0.0)
                }
            });
            for (p, a) in a.iter_mut().enumerate() {
                for (kx, &w) in w.iter().enumerate() {
                    *a = w.mul_add(v[p * S + kx], *a);
                }
            }
        }
        for (v, a) in acc.iter_mut().zip(a) {
            v[g] = a;
        }
    }
}

/// `acc[p] += Σ_kx w[kx] · x[p's column kx]` over one filter row, for `G` vectors of `L::N`
/// channels; `CLIP`: skip the taps outside each pixel's window range (else all `kw` are inside).
///
/// # Safety
/// `row` points at the block's channels in an input row and every tap in `win.lo..win.hi` lies inside
/// that row; `wv` holds `kw` taps `win.c` apart of `G * L::N` channels.
#[inline(always)]
unsafe fn accumulate<L: Lanes, const G: usize, const CLIP: bool>(
    acc: &mut [[L; G]; PX],
    row: *const f32,
    wv: *const f32,
    win: &Window,
) {
    let c = win.c;
    for kx in 0..win.kw {
        for g in 0..G {
            // SAFETY: forwarded from the caller.
            unsafe {
                let w = L::load(wv.add(kx * c + g * L::N));
                for (p, a) in acc.iter_mut().enumerate() {
                    if CLIP && !(win.lo[p]..win.hi[p]).contains(&kx) {
                        continue;
                    }
                    let src = row.offset(win.start[p] + (kx * c + g * L::N) as isize);
                    a[g] = w.mul_add(L::load(src), a[g]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{
        assert_close, naive_conv, rand_vec, taps_last, to_nhwc, CONV_REL_TOL,
    };
    use super::super::{Act, ConvShape, Epilogue, Pad};
    use super::*;
    use crate::gemm::{gemm, PackedWeight};

    #[test]
    fn transpose_matches_naive() {
        // Blocks ending inside an image and images ending inside a block; RGB's own path.
        for (b, c, hw) in [
            (3, 5, 200),
            (2, 32, 300),
            (1, 1, 7),
            (3, 3, 300),
            (4, 3, 100),
        ] {
            let x = rand_vec(b * c * hw, 7);
            let mut got = vec![f32::NAN; x.len()];
            nchw_to_nhwc(&x, b, c, hw, &mut got);
            assert_eq!(got, to_nhwc(&x, b, c, hw), "{b}x{c}x{hw}");
        }
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
            // Rows long enough for blocks of 8 pixels between the borders: EfficientNet's 5x5
            // stride 2 with TF-SAME's asymmetric padding, and a 3x3 over 48 channels.
            (
                2,
                35,
                10,
                37,
                5,
                2,
                Pad {
                    top: 1,
                    bottom: 2,
                    left: 1,
                    right: 2,
                },
            ),
            (1, 48, 6, 30, 3, 1, Pad::same(1)),
            // The register-window paths (3, 5 and 7 wide at stride 1) on rows with inside blocks,
            // also with uneven left and right padding.
            (1, 32, 6, 29, 5, 1, Pad::same(2)),
            (2, 16, 9, 31, 7, 1, Pad::same(3)),
            (
                1,
                20,
                5,
                27,
                5,
                1,
                Pad {
                    top: 2,
                    bottom: 2,
                    left: 1,
                    right: 3,
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
            let (oh, ow) = s.out_hw();
            let x = rand_vec(b * c * h * w, 50 + i as u64);
            let wt = rand_vec(c * k * k, 60 + i as u64);
            let bias = rand_vec(c, 70 + i as u64);
            let residual = rand_vec(b * c * oh * ow, 80 + i as u64);
            let e = Epilogue {
                bias: (i % 3 != 2).then_some(&bias[..]),
                residual: (i % 2 == 0).then_some(&residual[..]),
                act: [Act::None, Act::Gelu, Act::Relu, Act::Silu][i % 4],
            };
            let reference = to_nhwc(&naive_conv(&x, &wt, &s, e), b, c, oh * ow);
            let res = to_nhwc(&residual, b, c, oh * ow);
            let e_nhwc = Epilogue {
                residual: e.residual.map(|_| &res[..]),
                ..e
            };
            let mut out = vec![f32::NAN; b * oh * ow * c];
            let packed = DepthwiseWeight::pack(&wt, c, k * k);
            depthwise(&to_nhwc(&x, b, c, h * w), &packed, &s, e_nhwc, &mut out);
            assert_close(&out, &reference, CONV_REL_TOL, &format!("case {i}: {s:?}"));
            // With the per-image means (bands of rows that span two images in cases 0 and 2).
            let mut again = vec![f32::NAN; out.len()];
            let mut means = vec![f32::NAN; b * c];
            let x_nhwc = to_nhwc(&x, b, c, h * w);
            depthwise_and_mean(&x_nhwc, &packed, &s, e_nhwc, &mut again, &mut means);
            assert_eq!(again, out, "case {i}: the output next to the means");
            let expected: Vec<f32> = (0..b * c)
                .map(|j| {
                    let (image, ch) = (j / c, j % c);
                    let px = (0..oh * ow).map(|p| reference[(image * oh * ow + p) * c + ch] as f64);
                    (px.sum::<f64>() / (oh * ow) as f64) as f32
                })
                .collect();
            assert_close(&means, &expected, CONV_REL_TOL, &format!("case {i}: means"));
        }
    }

    #[test]
    fn im2col_gemm_and_dense_match_naive_conv() {
        // Dense convolutions NHWC through im2col + the packed GEMM, and through `dense` (with
        // AVX-512: the windows read in place), against the NCHW reference: patchify
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
            let wp = taps_last(&wt, cout, cin, k);
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
            // The whole convolution in one call (blocks of rows inside).
            let mut out = vec![f32::NAN; m * cout];
            let e_nhwc = Epilogue {
                residual: e.residual.map(|_| &res[..]),
                ..e
            };
            dense(&xn, &s, &packed, e_nhwc, &mut out);
            assert_close(
                &out,
                &reference,
                CONV_REL_TOL,
                &format!("dense, case {i}: {s:?}"),
            );
        }
    }
}
