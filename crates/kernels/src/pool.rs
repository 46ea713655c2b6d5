//! Pooling and per-channel gating on f32 maps: max pooling of NCHW planes and of NHWC rows, global
//! average pooling of NCHW planes, global average pooling of NHWC rows, and the squeeze-excitation gate
//! `x * sigmoid(s)` with one `s` per plane.

use rayon::prelude::*;

use crate::dispatch::multiversion;

/// A max pooling window over NCHW planes: `k x k`, moving by `stride`, with `pad` on every side
/// padded with -inf (PyTorch `nn.MaxPool2d(k, stride, pad)`, floor mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl MaxPool {
    /// The output size of an `h x w` plane; (0, 0) when the padded plane is smaller than the window.
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let (hp, wp) = (h + 2 * self.pad, w + 2 * self.pad);
        if hp < self.k || wp < self.k || self.stride == 0 {
            return (0, 0);
        }
        (
            (hp - self.k) / self.stride + 1,
            (wp - self.k) / self.stride + 1,
        )
    }
}

/// Max pooling of `planes` NCHW planes of `h x w` into `out` (planes of [`MaxPool::out_hw`]):
/// first the maximum over each window's columns for every input row, then over its rows.
///
/// # Panics
/// When the lengths do not match, the output is empty, or `pad >= k` (a window of padding only).
pub fn max_pool2d(x: &[f32], planes: usize, h: usize, w: usize, p: MaxPool, out: &mut [f32]) {
    let (oh, ow) = p.out_hw(h, w);
    assert!(
        oh > 0 && ow > 0 && p.pad < p.k,
        "max_pool2d: {h}x{w} with {p:?}"
    );
    assert_eq!(x.len(), planes * h * w, "max_pool2d: input length");
    assert_eq!(out.len(), planes * oh * ow, "max_pool2d: output length");
    let span = |o: usize, size: usize| span(p, o, size);
    out.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each(|(o, plane)| {
            let mut rows = vec![f32::NEG_INFINITY; h * ow];
            for (iy, r) in rows.chunks_exact_mut(ow).enumerate() {
                let src = &plane[iy * w..(iy + 1) * w];
                for (ox, v) in r.iter_mut().enumerate() {
                    let (lo, hi) = span(ox, w);
                    *v = src[lo..hi].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                }
            }
            for (oy, orow) in o.chunks_exact_mut(ow).enumerate() {
                let (lo, hi) = span(oy, h);
                orow.copy_from_slice(&rows[lo * ow..(lo + 1) * ow]);
                for r in rows[(lo + 1) * ow..hi * ow].chunks_exact(ow) {
                    orow.iter_mut().zip(r).for_each(|(o, &v)| *o = o.max(v));
                }
            }
        });
}

/// Max pooling of an NHWC map [batch, h, w, c] into `out` [batch, oh, ow, c] ([`MaxPool::out_hw`]):
/// each output pixel is the element-wise maximum of the rows of C values its window covers
/// (padding skipped), so the work runs along the channels.
///
/// # Panics
/// When the lengths do not match, the output is empty, or `pad >= k` (a window of padding only).
pub fn max_pool_nhwc(
    x: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
    p: MaxPool,
    out: &mut [f32],
) {
    let (oh, ow) = p.out_hw(h, w);
    assert!(
        c > 0 && oh > 0 && ow > 0 && p.pad < p.k,
        "max_pool_nhwc: {h}x{w}x{c} with {p:?}"
    );
    assert_eq!(x.len(), batch * h * w * c, "max_pool_nhwc: input length");
    assert_eq!(
        out.len(),
        batch * oh * ow * c,
        "max_pool_nhwc: output length"
    );
    out.par_chunks_mut(ow * c)
        .enumerate()
        .for_each(|(i, orow)| {
            let img = &x[i / oh * h * w * c..(i / oh + 1) * h * w * c];
            max_row(img, i % oh, h, w, c, p, orow)
        });
}

/// The input rows/columns [lo, hi) that output row/column `o` of `p` covers in `size`: never empty
/// when `pad < k`.
fn span(p: MaxPool, o: usize, size: usize) -> (usize, usize) {
    let lo = (o * p.stride).saturating_sub(p.pad);
    (lo, (o * p.stride + p.k - p.pad).min(size))
}

multiversion! {
    /// Output row `oy` of one image `img` [h, w, c] of [`max_pool_nhwc`].
    fn max_row<L>(img: &[f32], oy: usize, h: usize, w: usize, c: usize, p: MaxPool, orow: &mut [f32]) {
        let (y0, y1) = span(p, oy, h);
        for (ox, o) in orow.chunks_exact_mut(c).enumerate() {
            let (x0, x1) = span(p, ox, w);
            let first = (y0 * w + x0) * c;
            o.copy_from_slice(&img[first..first + c]);
            for iy in y0..y1 {
                for ix in x0..x1 {
                    let at = (iy * w + ix) * c;
                    max_into::<L>(o, &img[at..at + c]);
                }
            }
        }
    }
}

/// `o = max(o, v)` element-wise, `L::N` lanes at a time.
#[inline(always)]
fn max_into<L: crate::math::Lanes>(o: &mut [f32], v: &[f32]) {
    let mut i = 0;
    while i + L::N <= o.len() {
        // SAFETY: i + N <= o.len() == v.len().
        unsafe {
            let m = L::load(o.as_ptr().add(i)).max(L::load(v.as_ptr().add(i)));
            m.store(o.as_mut_ptr().add(i));
        }
        i += L::N;
    }
    o[i..]
        .iter_mut()
        .zip(&v[i..])
        .for_each(|(o, &v)| *o = o.max(v));
}

multiversion! {
    fn mean_serial<L>(x: &[f32], plane: usize, out: &mut [f32]) {
        for (o, p) in out.iter_mut().zip(x.chunks_exact(plane)) {
            let mut acc = L::splat(0.0);
            let mut c = p.chunks_exact(L::N);
            for v in &mut c {
                // SAFETY: the chunk holds N values.
                acc = acc.add(unsafe { L::load(v.as_ptr()) });
            }
            *o = (acc.reduce_sum() + c.remainder().iter().sum::<f32>()) / plane as f32;
        }
    }
}

/// The mean of each plane of `plane` values: global average pooling of an NCHW map, `out` one
/// value per (image, channel).
///
/// # Panics
/// When `x` is not `out.len()` planes of `plane > 0` values.
pub fn mean_planes(x: &[f32], plane: usize, out: &mut [f32]) {
    assert!(
        plane > 0 && x.len() == out.len() * plane,
        "mean_planes: lengths"
    );
    let per_task = (16 * 1024 / plane).max(1);
    out.par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task * plane))
        .for_each(|(o, x)| mean_serial(x, plane, o));
}

/// The mean of each channel over the pixels of each image: `x` [batch, pixels, c] -> `out`
/// [batch, c] (global average pooling of an NHWC map).
///
/// # Panics
/// When `x` is not `out.len() / c` images of `pixels * c` values.
pub fn mean_pixels(x: &[f32], pixels: usize, c: usize, out: &mut [f32]) {
    assert!(
        c > 0 && pixels > 0 && out.len().is_multiple_of(c),
        "mean_pixels: {c} channels"
    );
    assert_eq!(
        x.len(),
        out.len() / c * pixels * c,
        "mean_pixels: input length"
    );
    out.par_chunks_mut(c)
        .enumerate()
        .for_each(|(b, o)| mean_image(&x[b * pixels * c..(b + 1) * pixels * c], o));
}

multiversion! {
    /// `o` = the mean of the rows of `x` (`o.len()` values each).
    fn mean_image<L>(x: &[f32], o: &mut [f32]) {
        o.fill(0.0);
        for row in x.chunks_exact(o.len()) {
            o.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
        }
        let inv = 1.0 / (x.len() / o.len()) as f32;
        o.iter_mut().for_each(|v| *v *= inv);
    }
}

multiversion! {
    fn gate_serial<L>(x: &[f32], plane: usize, s: &[f32], out: &mut [f32]) {
        for ((p, o), &g) in x.chunks_exact(plane).zip(out.chunks_exact_mut(plane)).zip(s) {
            let g = 1.0 / (1.0 + (-g).exp());
            let gl = L::splat(g);
            let mut i = 0;
            while i + L::N <= plane {
                // SAFETY: i + N <= plane, the length of p and o.
                unsafe { L::load(p.as_ptr().add(i)).mul(gl).store(o.as_mut_ptr().add(i)) };
                i += L::N;
            }
            for j in i..plane {
                o[j] = p[j] * g;
            }
        }
    }
}

/// The squeeze-excitation gate: `out` = every value of plane `i` of `x` times `sigmoid(s[i])`.
///
/// # Panics
/// When `x` and `out` are not `s.len()` planes of `plane > 0` values.
pub fn sigmoid_gate(x: &[f32], plane: usize, s: &[f32], out: &mut [f32]) {
    assert!(
        plane > 0 && x.len() == s.len() * plane && out.len() == x.len(),
        "sigmoid_gate: lengths"
    );
    let per_task = (16 * 1024 / plane).max(1);
    out.par_chunks_mut(per_task * plane)
        .zip(x.par_chunks(per_task * plane))
        .zip(s.par_chunks(per_task))
        .for_each(|((o, x), s)| gate_serial(x, plane, s, o));
}

/// The squeeze-excitation gate on an NHWC map, in place: every pixel row of image `b` of `x`
/// [batch, pixels, c] times `sigmoid(s[b])` channel by channel (`s` [batch, c]).
///
/// # Panics
/// When `x` is not `s.len() / c` images of `pixels * c` values.
pub fn sigmoid_gate_rows(x: &mut [f32], pixels: usize, c: usize, s: &[f32]) {
    assert!(
        c > 0 && s.len().is_multiple_of(c) && x.len() == s.len() / c * pixels * c,
        "sigmoid_gate_rows: lengths"
    );
    let gates: Vec<f32> = s.iter().map(|&g| 1.0 / (1.0 + (-g).exp())).collect();
    let rows_per_task = (16 * 1024 / c).max(1);
    x.par_chunks_mut(rows_per_task * c)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (r, row) in chunk.chunks_exact_mut(c).enumerate() {
                let b = (t * rows_per_task + r) / pixels.max(1);
                scale_row(row, &gates[b * c..(b + 1) * c]);
            }
        });
}

multiversion! {
    fn scale_row<L>(x: &mut [f32], g: &[f32]) {
        let full = x.len() / L::N * L::N;
        for i in (0..full).step_by(L::N) {
            // SAFETY: i + N <= len of both slices (equal lengths, checked by the caller's chunking).
            unsafe {
                L::load(x.as_ptr().add(i))
                    .mul(L::load(g.as_ptr().add(i)))
                    .store(x.as_mut_ptr().add(i))
            };
        }
        for i in full..x.len() {
            x[i] *= g[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::tests::uniform;

    #[test]
    fn max_pool_matches_definition() {
        // (planes, h, w, k, stride, pad): the ResNet stem pool on odd and even sizes, and others.
        let cases = [
            (
                3,
                9,
                7,
                MaxPool {
                    k: 3,
                    stride: 2,
                    pad: 1,
                },
            ),
            (
                2,
                8,
                8,
                MaxPool {
                    k: 3,
                    stride: 2,
                    pad: 1,
                },
            ),
            (
                1,
                5,
                6,
                MaxPool {
                    k: 2,
                    stride: 2,
                    pad: 0,
                },
            ),
            (
                2,
                7,
                4,
                MaxPool {
                    k: 3,
                    stride: 1,
                    pad: 1,
                },
            ),
            (
                1,
                1,
                1,
                MaxPool {
                    k: 3,
                    stride: 2,
                    pad: 1,
                },
            ),
        ];
        // The definition: the maximum over the window's pixels inside the plane.
        let naive = |x: &[f32], planes: usize, h: usize, w: usize, p: MaxPool| {
            let (oh, ow) = p.out_hw(h, w);
            let mut out = vec![f32::NEG_INFINITY; planes * oh * ow];
            for c in 0..planes {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let m = &mut out[(c * oh + oy) * ow + ox];
                        for ky in 0..p.k {
                            for kx in 0..p.k {
                                let iy = (oy * p.stride + ky) as isize - p.pad as isize;
                                let ix = (ox * p.stride + kx) as isize - p.pad as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    *m = m.max(x[(c * h + iy as usize) * w + ix as usize]);
                                }
                            }
                        }
                    }
                }
            }
            out
        };
        for (i, (planes, h, w, p)) in cases.into_iter().enumerate() {
            let x = uniform(i as u64 + 5, planes * h * w, -3.0, 1.0);
            let (oh, ow) = p.out_hw(h, w);
            let mut out = vec![f32::NAN; planes * oh * ow];
            max_pool2d(&x, planes, h, w, p, &mut out);
            assert_eq!(out, naive(&x, planes, h, w, p), "case {i}");
            // NHWC: 2 images of 19 channels (a vector of 16 and a tail), and of 1 channel.
            for c in [19, 1] {
                let batch = 2;
                let x = uniform(i as u64 + 50, batch * c * h * w, -3.0, 1.0);
                let want = naive(&x, batch * c, h, w, p);
                let mut xn = vec![0f32; x.len()];
                for (j, &v) in x.iter().enumerate() {
                    let (bc, px) = (j / (h * w), j % (h * w));
                    xn[((bc / c) * h * w + px) * c + bc % c] = v;
                }
                let mut out = vec![f32::NAN; batch * oh * ow * c];
                max_pool_nhwc(&xn, batch, h, w, c, p, &mut out);
                for (j, &v) in want.iter().enumerate() {
                    let (bc, px) = (j / (oh * ow), j % (oh * ow));
                    let got = out[((bc / c) * oh * ow + px) * c + bc % c];
                    assert_eq!(got, v, "NHWC case {i}, {c} channels, value {j}");
                }
            }
        }
    }

    #[test]
    fn means_and_gate_match_definitions() {
        // 37 values per plane: two full vectors of 16 and a tail.
        let (planes, plane) = (5, 37);
        let x = uniform(11, planes * plane, -2.0, 2.0);
        let mut m = vec![0f32; planes];
        mean_planes(&x, plane, &mut m);
        let s = uniform(12, planes, -4.0, 4.0);
        let mut g = vec![f32::NAN; x.len()];
        sigmoid_gate(&x, plane, &s, &mut g);
        for i in 0..planes {
            let p = &x[i * plane..(i + 1) * plane];
            let want = p.iter().map(|&v| v as f64).sum::<f64>() / plane as f64;
            assert!((m[i] as f64 - want).abs() < 1e-6, "mean of plane {i}");
            let sig = 1.0 / (1.0 + (-(s[i] as f64)).exp());
            for (j, &v) in p.iter().enumerate() {
                let want = v as f64 * sig;
                assert!(
                    (g[i * plane + j] as f64 - want).abs() < 1e-6,
                    "gate {i},{j}"
                );
            }
        }
        // NHWC: [2 images, 5 pixels, 3 channels].
        let y = uniform(13, 2 * 5 * 3, -1.0, 1.0);
        let mut out = [0f32; 6];
        mean_pixels(&y, 5, 3, &mut out);
        for b in 0..2 {
            for ch in 0..3 {
                let want: f64 = (0..5).map(|p| y[(b * 5 + p) * 3 + ch] as f64).sum::<f64>() / 5.0;
                assert!(
                    (out[b * 3 + ch] as f64 - want).abs() < 1e-6,
                    "mean_pixels {b},{ch}"
                );
            }
        }
    }

    #[test]
    fn gate_rows_matches_definition() {
        // 3 images of 200 pixels x 37 channels: tasks of 442 rows cross image boundaries, and 37
        // channels leave a tail after the vectors.
        let (batch, pixels, c) = (3, 200, 37);
        let x = uniform(14, batch * pixels * c, -2.0, 2.0);
        let s = uniform(15, batch * c, -4.0, 4.0);
        let mut y = x.clone();
        sigmoid_gate_rows(&mut y, pixels, c, &s);
        for (i, (&got, &v)) in y.iter().zip(&x).enumerate() {
            let (b, ch) = (i / (pixels * c), i % c);
            let want = v as f64 / (1.0 + (-(s[b * c + ch] as f64)).exp());
            assert!((got as f64 - want).abs() < 1e-6, "gate at {i}");
        }
    }
}
