//! 2-D convolutions on NCHW f32 slices with the bias and an activation fused into the output.
//!
//! - Dense convolutions (groups = 1) are GEMMs `out[b] (cout x oh*ow) = W (cout x cin*kh*kw) *
//!   cols`, over tiles of output pixels: a stride-1 unpadded 1x1 convolution reads its input
//!   directly as the right-hand matrix (no copy); every other shape first gathers the tile's
//!   im2col columns into a per-thread buffer sized to stay in L2 and reused across calls. The
//!   output rows are initialised with the bias and accumulated into by the GEMM; the activation
//!   runs on the tile while it is still in cache.
//! - Depthwise convolutions (one filter per channel) have their own kernel ([`depthwise`]).
//!
//! NCHW is kept (no layout conversion): it is the models' layout, a 1x1 convolution is then a
//! plain GEMM on the input, and the depthwise kernel vectorises along output columns.

mod depthwise;
pub(crate) mod epilogue;
pub mod lowp;
pub mod nhwc;
pub mod winograd;

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::dispatch::multiversion;
use crate::OutPtr;
pub use epilogue::Act;

/// Zero padding on each side of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pad {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Pad {
    /// The same padding `p` on every side.
    pub const fn same(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    /// TensorFlow "SAME" padding of an `h x w` input for a `kh x kw` window: the output is
    /// `ceil(size / stride)` and the odd pixel of padding goes at the bottom/right.
    // Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.11/timm/layers/padding.py#L17
    pub fn tf_same(h: usize, w: usize, kh: usize, kw: usize, stride: usize) -> Self {
        let total =
            |size: usize, k: usize| ((size.div_ceil(stride) - 1) * stride + k).saturating_sub(size);
        let (ph, pw) = (total(h, kh), total(w, kw));
        Self {
            top: ph / 2,
            bottom: ph - ph / 2,
            left: pw / 2,
            right: pw - pw / 2,
        }
    }
}

/// The shape of one convolution call: the NCHW input, the filter and how it moves. A depthwise
/// convolution has `cout == cin` and one `kh x kw` filter per channel (`weight` [C, 1, kh, kw]);
/// otherwise the weight is [cout, cin, kh, kw] (groups = 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: Pad,
    pub depthwise: bool,
}

impl ConvShape {
    /// Output height and width; (0, 0) when the padded input is smaller than the filter.
    pub fn out_hw(&self) -> (usize, usize) {
        let (hp, wp) = (
            self.h + self.pad.top + self.pad.bottom,
            self.w + self.pad.left + self.pad.right,
        );
        if hp < self.kh || wp < self.kw || self.stride == 0 {
            return (0, 0);
        }
        (
            (hp - self.kh) / self.stride + 1,
            (wp - self.kw) / self.stride + 1,
        )
    }

    fn weight_len(&self) -> usize {
        let per_out = if self.depthwise { 1 } else { self.cin };
        self.cout * per_out * self.kh * self.kw
    }
}

/// What a convolution or a GEMM on packed weights ([`crate::gemm`]) adds to its output and the
/// activation it then applies: `out = act(conv + bias + residual)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// One value per output channel.
    pub bias: Option<&'a [f32]>,
    /// A tensor of the output's shape (a residual branch).
    pub residual: Option<&'a [f32]>,
    pub act: Act,
}

/// `out = act(conv(x, weight) + bias + residual)`, all NCHW f32, split across rayon's threads.
///
/// # Panics
/// When a slice length does not match `s` (x: batch*cin*h*w, weight, bias: cout, residual and
/// out: batch*cout*oh*ow), a depthwise shape has `cout != cin`, the stride is 0 or the padded
/// input is smaller than the filter: callers validate user input before calling.
pub fn conv2d(x: &[f32], weight: &[f32], s: &ConvShape, e: Epilogue, out: &mut [f32]) {
    let (oh, ow) = s.out_hw();
    assert!(oh > 0 && ow > 0, "convolution output is empty: {s:?}");
    assert!(
        !s.depthwise || s.cin == s.cout,
        "depthwise needs cout == cin: {s:?}"
    );
    assert_eq!(
        x.len(),
        s.batch * s.cin * s.h * s.w,
        "input length for {s:?}"
    );
    assert_eq!(weight.len(), s.weight_len(), "weight length for {s:?}");
    assert!(
        e.bias.is_none_or(|b| b.len() == s.cout),
        "bias length for {s:?}"
    );
    assert_eq!(
        out.len(),
        s.batch * s.cout * oh * ow,
        "output length for {s:?}"
    );
    assert!(
        e.residual.is_none_or(|r| r.len() == out.len()),
        "residual length for {s:?}"
    );
    if s.depthwise {
        depthwise::depthwise(x, weight, s, e, out);
    } else {
        dense(x, weight, s, e, out);
    }
}

/// Bytes of im2col columns per tile: inside a core's L2 next to the GEMM's packed operands.
const COL_BYTES: usize = 512 * 1024;

/// Fewest output pixels per GEMM: every GEMM packs the whole weight again, so narrow tiles (deep
/// layers, where K is large) would spend their time packing.
const MIN_TILE: usize = 64;

thread_local! {
    /// The im2col tile of the current thread, reused across calls.
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn dense(x: &[f32], weight: &[f32], s: &ConvShape, e: Epilogue, out: &mut [f32]) {
    let (oh, ow) = s.out_hw();
    let n = oh * ow;
    let k = s.cin * s.kh * s.kw;
    let direct = s.kh == 1 && s.kw == 1 && s.stride == 1 && s.pad == Pad::default();
    let threads = crate::cpu::threads();
    let tile = if direct {
        // No copy: the GEMM reads the input in place, so an image is split only for parallelism.
        n.div_ceil((2 * threads).div_ceil(s.batch))
    } else {
        COL_BYTES / (4 * k)
    };
    // Equal tiles (no sliver at the end).
    let tiles = n.div_ceil(tile.max(MIN_TILE).min(n));
    let tile = n.div_ceil(tiles);
    let jobs = s.batch * tiles;
    // Enough tiles: one GEMM per tile per thread; otherwise (batch 1, late stages) one tile at a
    // time with the GEMM itself split across the threads.
    let outer = jobs >= 2 * threads;
    let par = if outer || threads == 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    };
    let dst = OutPtr(out.as_mut_ptr());
    let job = |j: usize| {
        let (b, p0) = (j / tiles, (j % tiles) * tile);
        let t = tile.min(n - p0);
        let xb = &x[b * s.cin * s.h * s.w..(b + 1) * s.cin * s.h * s.w];
        // SAFETY: rows co of image b, columns p0..p0 + t: inside `out`, and this job's alone.
        let o = unsafe { dst.at(b * s.cout * n + p0) };
        let row = |co: usize| unsafe { std::slice::from_raw_parts_mut(o.add(co * n), t) };
        // The output starts as bias + residual and the GEMM accumulates into it.
        let init = e.bias.is_some() || e.residual.is_some();
        for co in (0..s.cout).filter(|_| init) {
            let bv = e.bias.map_or(0.0, |b| b[co]);
            match e.residual {
                Some(r) => {
                    let r = &r[b * s.cout * n + co * n + p0..][..t];
                    row(co).iter_mut().zip(r).for_each(|(o, &r)| *o = r + bv);
                }
                None => row(co).fill(bv),
            }
        }
        let gemm = |rhs: *const f32, rhs_rs: usize| unsafe {
            gemm::gemm(
                s.cout,
                t,
                k,
                o,
                1,
                n as isize,
                init,
                weight.as_ptr(),
                1,
                k as isize,
                rhs,
                1,
                rhs_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        };
        if direct {
            gemm(xb[p0..].as_ptr(), n);
        } else {
            COLS.with_borrow_mut(|cols| {
                cols.resize(k * t, 0.0);
                im2col(xb, s, ow, p0, t, cols);
                gemm(cols.as_ptr(), t);
            });
        }
        if e.act != Act::None {
            act_rows(e.act, OutPtr(o), s.cout, n, t);
        }
    };
    if outer {
        crate::cpu::tasks(jobs).for_each(job);
    } else {
        (0..jobs).for_each(job);
    }
}

/// Gathers the im2col columns of output pixels `p0..p0 + t` of one image: row `(ci, ky, kx)`
/// (`cols[row * t + j]`) holds the input under tap (ky, kx) of channel ci for pixel `p0 + j`,
/// zero in the padding.
fn im2col(xb: &[f32], s: &ConvShape, ow: usize, p0: usize, t: usize, cols: &mut [f32]) {
    let st = s.stride;
    // The output columns [lo, hi) whose input column `ox * stride + kx - pad` is inside the image.
    let valid = |kx: usize| {
        let lo = s.pad.left.saturating_sub(kx).div_ceil(st);
        let hi = (s.w + s.pad.left)
            .checked_sub(kx + 1)
            .map_or(0, |v| (v / st + 1).min(ow));
        (lo.min(ow), hi.max(lo.min(ow)))
    };
    let mut row = 0;
    for ci in 0..s.cin {
        let plane = &xb[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let (lo, hi) = valid(kx);
                let dst = &mut cols[row * t..(row + 1) * t];
                row += 1;
                let mut j = 0;
                while j < t {
                    let (oy, ox0) = ((p0 + j) / ow, (p0 + j) % ow);
                    let run = (ow - ox0).min(t - j);
                    let seg = &mut dst[j..j + run];
                    j += run;
                    let iy = (oy * st + ky).checked_sub(s.pad.top).filter(|&iy| iy < s.h);
                    let Some(iy) = iy else {
                        seg.fill(0.0);
                        continue;
                    };
                    let src = &plane[iy * s.w..(iy + 1) * s.w];
                    let (a, b) = (lo.clamp(ox0, ox0 + run), hi.clamp(ox0, ox0 + run));
                    seg[..a - ox0].fill(0.0);
                    seg[b - ox0..].fill(0.0);
                    let inside = &mut seg[a - ox0..b - ox0];
                    if inside.is_empty() {
                        continue;
                    }
                    let ix0 = a * st + kx - s.pad.left;
                    if st == 1 {
                        inside.copy_from_slice(&src[ix0..ix0 + inside.len()]);
                    } else {
                        for (d, &v) in inside.iter_mut().zip(src[ix0..].iter().step_by(st)) {
                            *d = v;
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// Applies `act` to `rows` rows of `len` values, `stride` apart, starting at `base`.
    ///
    /// The rows must be inside one live, exclusively borrowed allocation.
    fn act_rows<L>(act: Act, base: OutPtr, rows: usize, stride: usize, len: usize) {
        for r in 0..rows {
            // SAFETY: the caller's contract.
            act.apply::<L>(unsafe { std::slice::from_raw_parts_mut(base.at(r * stride), len) });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The reference tests [`portable_paths_match_naive_reference`] repeats on the portable paths.
    pub const PORTABLE_CHECKED: &[&str] = &[
        "conv::tests::dense_matches_naive_reference",
        "conv::depthwise::tests::depthwise_matches_naive_reference",
        "conv::epilogue::tests::activations_match_definitions",
        "conv::nhwc::tests::depthwise_nhwc_matches_naive_reference",
        "conv::nhwc::tests::im2col_gemm_and_dense_match_naive_conv",
        "conv::winograd::tests::winograd_matches_naive_conv",
        "pool::tests::max_pool_matches_definition",
        "pool::tests::means_and_gate_match_definitions",
    ];

    /// Max error relative to the largest reference magnitude: f32 sums of up to ~1000 products in
    /// a different order (GEMM blocking, FMA) than the naive loop.
    pub const CONV_REL_TOL: f32 = 2e-5;

    /// [b, c, h, w] -> [b, h, w, c].
    pub fn to_nhwc(x: &[f32], b: usize, c: usize, hw: usize) -> Vec<f32> {
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

    /// A dense weight [cout, cin, k, k] -> [cout, ky, kx, cin], the order of the NHWC kernels.
    pub fn taps_last(wt: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
        let mut wp = vec![0f32; wt.len()];
        for o in 0..cout {
            for ci in 0..cin {
                for t in 0..k * k {
                    wp[(o * k * k + t) * cin + ci] = wt[(o * cin + ci) * k * k + t];
                }
            }
        }
        wp
    }

    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The convolution by its definition, in f64.
    pub fn naive_conv(x: &[f32], w: &[f32], s: &ConvShape, e: Epilogue) -> Vec<f32> {
        let (oh, ow) = s.out_hw();
        let cin_per = if s.depthwise { 1 } else { s.cin };
        let mut out = vec![0f32; s.batch * s.cout * oh * ow];
        for b in 0..s.batch {
            for co in 0..s.cout {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let o = ((b * s.cout + co) * oh + oy) * ow + ox;
                        let mut acc = e.bias.map_or(0.0, |b| b[co] as f64)
                            + e.residual.map_or(0.0, |r| r[o] as f64);
                        for ci in 0..cin_per {
                            let cx = if s.depthwise { co } else { ci };
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let iy = (oy * s.stride + ky) as isize - s.pad.top as isize;
                                    let ix = (ox * s.stride + kx) as isize - s.pad.left as isize;
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((b * s.cin + cx) * s.h + iy as usize) * s.w
                                        + ix as usize];
                                    let wv = w[((co * cin_per + ci) * s.kh + ky) * s.kw + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[o] = epilogue::tests::reference(e.act, acc) as f32;
                    }
                }
            }
        }
        out
    }

    pub fn assert_close(ours: &[f32], reference: &[f32], tol: f32, what: &str) {
        assert_eq!(ours.len(), reference.len(), "{what}: length");
        let scale = reference.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
            assert!(
                (a - b).abs() <= tol * scale,
                "{what}: element {i}: {a} vs {b} (scale {scale})"
            );
        }
    }

    #[test]
    fn dense_matches_naive_reference() {
        // (batch, cin, h, w, cout, k, stride, padding)
        let cases = [
            // 1x1 stride 1: the direct GEMM, odd sizes, channels not multiples of 16.
            (2, 5, 7, 9, 3, 1, 1, Pad::same(0)),
            (1, 37, 13, 11, 21, 1, 1, Pad::same(0)),
            (3, 64, 56, 56, 17, 1, 1, Pad::same(0)),
            // Strided 1x1 (ResNet downsample).
            (2, 19, 15, 14, 23, 1, 2, Pad::same(0)),
            // 3x3 with padding 1, stride 1 and 2, odd maps.
            (2, 7, 11, 13, 9, 3, 1, Pad::same(1)),
            (1, 33, 17, 15, 18, 3, 2, Pad::same(1)),
            (2, 64, 29, 29, 64, 3, 1, Pad::same(1)),
            // 7x7 stride 2 pad 3 (ResNet stem), TF "SAME" asymmetric 3x3 s2 (EfficientNet stem).
            (1, 3, 37, 41, 8, 7, 2, Pad::same(3)),
            (
                2,
                3,
                20,
                23,
                32,
                3,
                2,
                Pad {
                    top: 0,
                    bottom: 1,
                    left: 1,
                    right: 1,
                },
            ),
            // Patchify 4x4 s4 and 2x2 s2 (ConvNeXt stem and downsampling), no padding.
            (2, 3, 16, 20, 24, 4, 4, Pad::same(0)),
            (1, 24, 10, 9, 48, 2, 2, Pad::same(0)),
            // A filter larger than the image along one side, covered by padding.
            (1, 4, 2, 6, 5, 5, 1, Pad::same(2)),
            // Big K (tile narrower than a row of pixels).
            (1, 300, 9, 9, 40, 3, 1, Pad::same(1)),
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
            let x = rand_vec(b * cin * h * w, 1 + i as u64);
            let wt = rand_vec(cout * cin * k * k, 100 + i as u64);
            let bias = rand_vec(cout, 200 + i as u64);
            let (oh, ow) = s.out_hw();
            let residual = rand_vec(b * cout * oh * ow, 300 + i as u64);
            let e = Epilogue {
                bias: (i % 5 != 1).then_some(&bias[..]),
                residual: (i % 3 == 0).then_some(&residual[..]),
                act: [Act::None, Act::Relu, Act::Silu, Act::Relu6][i % 4],
            };
            let mut out = vec![f32::NAN; b * cout * oh * ow];
            conv2d(&x, &wt, &s, e, &mut out);
            let reference = naive_conv(&x, &wt, &s, e);
            assert_close(&out, &reference, CONV_REL_TOL, &format!("case {i}: {s:?}"));
        }
    }

    /// Runs this module's reference tests again in a child process with `VISENC_KERNELS=portable`,
    /// so the portable paths (chosen once per process) are checked on the same cases.
    #[test]
    fn portable_paths_match_naive_reference() {
        if std::env::var("VISENC_KERNELS").is_ok_and(|v| v == "portable") {
            assert_eq!(crate::cpu::features(), crate::cpu::Features::PORTABLE);
            return;
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let out = std::process::Command::new(exe)
            .args(["--exact", "--test-threads", "1"])
            .args(PORTABLE_CHECKED)
            .arg("conv::tests::portable_paths_match_naive_reference")
            .env("VISENC_KERNELS", "portable")
            .output()
            .expect("the test binary runs");
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "portable run failed:\n{log}");
        // Every named test ran (a renamed test would otherwise be silently skipped).
        let ran = PORTABLE_CHECKED.len() + 1;
        assert!(
            log.contains(&format!("{ran} passed")),
            "expected {ran} tests:\n{log}"
        );
    }

    #[test]
    fn tf_same_padding_matches_timm() {
        // timm get_same_padding: 7 with k3 s2 -> total 2 (1, 1); 8 -> total 1 (0, 1).
        assert_eq!(
            Pad::tf_same(7, 8, 3, 3, 2),
            Pad {
                top: 1,
                bottom: 1,
                left: 0,
                right: 1
            }
        );
        // Stride 1, k5: total 4 on any size.
        assert_eq!(Pad::tf_same(9, 4, 5, 5, 1), Pad::same(2));
        // A 1x1 input with a 5x5 stride-2 window: out 1, total 4.
        assert_eq!(Pad::tf_same(1, 1, 5, 5, 2), Pad::same(2));
    }
}
