//! Pillow's resampling for 8-bit RGB, ported operation by operation so results are identical.
//!
//! Upstream: `src/libImaging/Resample.c` (convolution filters) and `src/libImaging/Geometry.c`
//! (`ImagingScaleAffine`, used for `NEAREST`):
//! <https://github.com/python-pillow/Pillow/blob/11.0.0/src/libImaging/Resample.c>,
//! <https://github.com/python-pillow/Pillow/blob/11.0.0/src/libImaging/Geometry.c>.
//! The arithmetic is unchanged from Pillow 7 to 13; the order of the two passes is Pillow 13's
//! (see `vertical_first`), the reference version of this project.
//!
//! Besides the whole-image [`resize`], this module can compute a *window* of a resize (the
//! pixels `resize(..)` followed by a crop would keep) without producing the rest. Each output
//! pixel of Pillow's separable resampler depends only on its own coefficients, so the window is
//! bit-identical to resize-then-crop; it keeps a CLIP-style "shortest edge 224, crop 224" on a
//! 1x5000 strip from allocating a 224x1_120_000 intermediate.

use std::ops::Range;
use std::str::FromStr;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::ImageError;

/// A resampling filter, as in Pillow's `Image.Resampling`.
///
/// Deserializes from Pillow's integer codes (`0` nearest, `1` lanczos, `2` bilinear,
/// `3` bicubic, `4` box, `5` hamming: what Hugging Face configs store as `resample`) and from
/// names (`"bicubic"`: what timm and open_clip store as `interpolation`); serializes as the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "FilterRepr", into = "&'static str")]
pub enum Filter {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos,
    Box,
    Hamming,
}

impl Filter {
    /// Every filter, in Pillow code order.
    pub const ALL: [Filter; 6] = [
        Filter::Nearest,
        Filter::Lanczos,
        Filter::Bilinear,
        Filter::Bicubic,
        Filter::Box,
        Filter::Hamming,
    ];

    /// The filter with Pillow's integer code (`PIL.Image.Resampling`), if there is one.
    pub fn from_pil_code(code: i64) -> Option<Filter> {
        Filter::ALL
            .into_iter()
            .find(|f| i64::from(f.pil_code()) == code)
    }

    /// Pillow's integer code for this filter.
    pub fn pil_code(self) -> u8 {
        match self {
            Filter::Nearest => 0,
            Filter::Lanczos => 1,
            Filter::Bilinear => 2,
            Filter::Bicubic => 3,
            Filter::Box => 4,
            Filter::Hamming => 5,
        }
    }

    /// The lowercase name used by timm, torchvision and open_clip.
    pub fn name(self) -> &'static str {
        match self {
            Filter::Nearest => "nearest",
            Filter::Lanczos => "lanczos",
            Filter::Bilinear => "bilinear",
            Filter::Bicubic => "bicubic",
            Filter::Box => "box",
            Filter::Hamming => "hamming",
        }
    }

    /// The convolution kernel and its support; `None` for `Nearest`, which Pillow does not
    /// resample by convolution.
    fn kernel(self) -> Option<(Kernel, f64)> {
        match self {
            Filter::Nearest => None,
            Filter::Box => Some((box_filter, 0.5)),
            Filter::Bilinear => Some((bilinear_filter, 1.0)),
            Filter::Hamming => Some((hamming_filter, 1.0)),
            Filter::Bicubic => Some((bicubic_filter, 2.0)),
            Filter::Lanczos => Some((lanczos_filter, 3.0)),
        }
    }
}

impl FromStr for Filter {
    type Err = ImageError;

    /// Parses a filter name, case-insensitively. Besides the six names this accepts Pillow's old
    /// aliases (`linear`, `cubic`, `antialias`) and torchvision's `nearest-exact`, which
    /// torchvision maps to Pillow's `NEAREST` for PIL images.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let filter = match s.to_ascii_lowercase().as_str() {
            "nearest" | "nearest-exact" | "nearest_exact" => Filter::Nearest,
            "bilinear" | "linear" => Filter::Bilinear,
            "bicubic" | "cubic" => Filter::Bicubic,
            "lanczos" | "antialias" => Filter::Lanczos,
            "box" => Filter::Box,
            "hamming" => Filter::Hamming,
            _ => {
                return Err(ImageError::config(format!(
                    "unknown interpolation {s:?} (expected nearest, bilinear, bicubic, lanczos, box or hamming)"
                )))
            }
        };
        Ok(filter)
    }
}

impl From<Filter> for &'static str {
    fn from(f: Filter) -> Self {
        f.name()
    }
}

/// A convolution kernel of Resample.c: weight as a function of distance, in source pixels.
type Kernel = fn(f64) -> f64;

/// What a filter looks like in a config file: a Pillow code or a name.
#[derive(Deserialize)]
#[serde(untagged)]
enum FilterRepr {
    Code(i64),
    Name(String),
}

impl TryFrom<FilterRepr> for Filter {
    type Error = ImageError;

    fn try_from(repr: FilterRepr) -> Result<Self, Self::Error> {
        match repr {
            FilterRepr::Code(code) => Filter::from_pil_code(code).ok_or_else(|| {
                ImageError::config(format!(
                    "unknown Pillow resample code {code} (expected 0..=5)"
                ))
            }),
            FilterRepr::Name(name) => name.parse(),
        }
    }
}

// Kernels: `box_filter` .. `lanczos_filter` in Resample.c. The expressions keep Pillow's operation
// order, and `hamming` keeps its single-precision constants (`0.54f`, `0.46f`).

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_filter(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc_filter(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos_filter(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc_filter(x) * sinc_filter(x / 3.0)
    } else {
        0.0
    }
}

/// Fixed-point fraction bits of the 8-bit path: 8 bits of result, 2 of headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// The rounding term every accumulator starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// `clip8` in Resample.c (a lookup table there, a clamp here: same values).
#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Fixed-point coefficients for a window of output indices along one axis.
struct AxisCoeffs {
    /// First input index read by each output index of the window.
    starts: Vec<usize>,
    /// `weights[offsets[i]..offsets[i + 1]]` are the taps of output index `i` of the window.
    offsets: Vec<usize>,
    weights: Vec<i32>,
}

impl AxisCoeffs {
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        (
            self.starts[i],
            &self.weights[self.offsets[i]..self.offsets[i + 1]],
        )
    }

    /// Re-bases the input indices on a block that starts at input index `by`.
    fn shift(&mut self, by: usize) {
        self.starts.iter_mut().for_each(|s| *s -= by);
    }

    /// The input indices the window reads: `start..end`.
    fn input_span(&self) -> Range<usize> {
        let start = self.starts.iter().copied().min().unwrap_or(0);
        let end = (0..self.starts.len())
            .map(|i| self.starts[i] + self.offsets[i + 1] - self.offsets[i])
            .max()
            .unwrap_or(start);
        start..end
    }
}

/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for output indices in `window`.
///
/// Port of <https://github.com/python-pillow/Pillow/blob/11.0.0/src/libImaging/Resample.c>
/// (`precompute_coeffs`, `normalize_coeffs_8bpc`): the filter support grows with the downscale
/// factor (antialiasing), weights are computed in `f64`, normalised to sum 1, then rounded half
/// away from zero to `PRECISION_BITS` fixed point. Unlike Pillow, taps are stored compactly
/// (not `ksize` per output), which changes nothing numerically.
fn axis_coeffs(
    in_size: u32,
    out_size: u32,
    window: Range<u32>,
    kernel: Kernel,
    support: f64,
) -> AxisCoeffs {
    // Pillow receives the source box as `float` and computes `(double)(in1 - in0) / outSize`.
    let scale = f64::from(in_size as f32) / f64::from(out_size);
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = support * filterscale;
    let ss = 1.0 / filterscale;
    let in_size = i64::from(in_size);

    let n = window.len();
    let mut starts = Vec::with_capacity(n);
    let mut offsets = Vec::with_capacity(n + 1);
    let mut weights = Vec::new();
    let mut prekk: Vec<f64> = Vec::new();
    offsets.push(0);
    for xx in window {
        let center = (f64::from(xx) + 0.5) * scale;
        // `(int)` in C truncates toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size);
        prekk.clear();
        let mut ww = 0.0;
        for x in xmin..xmax {
            let w = kernel((x as f64 - center + 0.5) * ss);
            prekk.push(w);
            ww += w;
        }
        let scale_fixed = f64::from(1u32 << PRECISION_BITS);
        for &k in &prekk {
            let k = if ww != 0.0 { k / ww } else { k };
            let fixed = if k < 0.0 {
                (-0.5 + k * scale_fixed) as i32
            } else {
                (0.5 + k * scale_fixed) as i32
            };
            weights.push(fixed);
        }
        starts.push(xmin as usize);
        offsets.push(weights.len());
    }
    AxisCoeffs {
        starts,
        offsets,
        weights,
    }
}

/// `ImagingResampleHorizontal_8bpc` (3-band case) over source rows `rows`; `c.starts` index
/// the columns of `src`.
fn horizontal_pass(src: &Rows<'_>, rows: Range<usize>, c: &AxisCoeffs) -> Vec<u8> {
    let out_width = c.starts.len();
    let mut out = vec![0u8; rows.len() * out_width * 3];
    if out_width == 0 {
        return out;
    }
    for (out_row, y) in out.chunks_exact_mut(out_width * 3).zip(rows) {
        let row = src.row(y);
        for (i, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (start, k) = c.taps(i);
            let taps = &row[start * 3..(start + k.len()) * 3];
            let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
            for (p, &kv) in taps.chunks_exact(3).zip(k) {
                s0 += i32::from(p[0]) * kv;
                s1 += i32::from(p[1]) * kv;
                s2 += i32::from(p[2]) * kv;
            }
            px[0] = clip8(s0);
            px[1] = clip8(s1);
            px[2] = clip8(s2);
        }
    }
    out
}

/// A borrowed block of RGB rows: `width` pixels from pixel column `x0` of rows `stride` pixels
/// long.
struct Rows<'a> {
    data: &'a [u8],
    stride: usize,
    x0: usize,
    width: usize,
}

impl Rows<'_> {
    fn row(&self, y: usize) -> &[u8] {
        let start = (y * self.stride + self.x0) * 3;
        &self.data[start..start + self.width * 3]
    }
}

/// `ImagingResampleVertical_8bpc` (3-band case).
///
/// The loops run row-wise (all columns of one tap at a time) rather than per pixel as in
/// Pillow; integer sums do not depend on order, so the result is the same.
fn vertical_pass(src: &Rows<'_>, c: &AxisCoeffs) -> Vec<u8> {
    let row_len = src.width * 3;
    let mut out = vec![0u8; c.starts.len() * row_len];
    if row_len == 0 {
        return out;
    }
    let mut acc = vec![HALF; row_len];
    for (i, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let (start, k) = c.taps(i);
        acc.fill(HALF);
        for (j, &kv) in k.iter().enumerate() {
            for (a, &p) in acc.iter_mut().zip(src.row(start + j)) {
                *a += i32::from(p) * kv;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Resizes `img` to `width` x `height` exactly as Pillow's `Image.resize((width, height),
/// filter)` does for an `RGB` image (no `box`, no `reducing_gap`).
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    resize_window(img, width, height, 0..width, 0..height, filter)
}

/// The pixels `xs` x `ys` of `resize(img, out_w, out_h, filter)`, computed without the rest.
///
/// The ranges must lie within `0..out_w` and `0..out_h`.
///
/// Port of `ImagingResampleInner` in
/// <https://github.com/python-pillow/Pillow/blob/11.0.0/src/libImaging/Resample.c>: a pass is
/// skipped when its axis keeps its size; the first pass only covers the source rows (or columns)
/// the second reads. The pass order follows Pillow 13 (see [`vertical_first`]), whose source was
/// not available here: the rule was read from its compiled `ImagingResampleInner` and checked
/// against Pillow 13.0.0 on random sizes with every filter.
pub(crate) fn resize_window(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    xs: Range<u32>,
    ys: Range<u32>,
    filter: Filter,
) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    let (window_w, window_h) = (xs.len(), ys.len());
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;
    let whole = |x0: usize, width: usize| Rows {
        data: img.as_raw(),
        stride: in_w as usize,
        x0,
        width,
    };
    let data = match (filter.kernel(), need_horizontal, need_vertical) {
        // Same size: Pillow copies (`ImagingCrop` of the whole image).
        (_, false, false) => return copy_window(img, &xs, &ys),
        (None, _, _) => return nearest_window(img, out_w, out_h, xs, ys),
        (Some((kernel, support)), true, false) => {
            let horiz = axis_coeffs(in_w, out_w, xs, kernel, support);
            let rows = ys.start as usize..ys.end as usize;
            horizontal_pass(&whole(0, in_w as usize), rows, &horiz)
        }
        (Some((kernel, support)), false, true) => {
            let vert = axis_coeffs(in_h, out_h, ys, kernel, support);
            vertical_pass(&whole(xs.start as usize, window_w), &vert)
        }
        (Some((kernel, support)), true, true) => {
            let mut horiz = axis_coeffs(in_w, out_w, xs, kernel, support);
            let mut vert = axis_coeffs(in_h, out_h, ys, kernel, support);
            if vertical_first(in_w, in_h, out_w, out_h) {
                // Only the source columns the horizontal pass reads.
                let cols = horiz.input_span();
                let tmp = vertical_pass(&whole(cols.start, cols.len()), &vert);
                horiz.shift(cols.start);
                let block = Rows {
                    data: &tmp,
                    stride: cols.len(),
                    x0: 0,
                    width: cols.len(),
                };
                horizontal_pass(&block, 0..window_h, &horiz)
            } else {
                // `ybox_first..ybox_last`: only the source rows the vertical pass reads.
                let rows = vert.input_span();
                let tmp = horizontal_pass(&whole(0, in_w as usize), rows.clone(), &horiz);
                vert.shift(rows.start);
                let block = Rows {
                    data: &tmp,
                    stride: window_w,
                    x0: 0,
                    width: window_w,
                };
                vertical_pass(&block, &vert)
            }
        }
    };
    RgbImage::from_raw(window_w as u32, window_h as u32, data)
        .expect("a resampling pass returns window_w * window_h * 3 bytes")
}

/// Whether Pillow runs the vertical pass first: since Pillow 13, when the image loses more than
/// twice as many rows as columns (`ImagingResampleInner`). Pillow 12 and older always ran the
/// horizontal pass first; the two orders round the intermediate image differently, so results
/// differ by a level or a few there (tall images downscaled to a shortest edge, for one).
fn vertical_first(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
    let lost_rows = i64::from(in_h) - i64::from(out_h);
    let lost_cols = i64::from(in_w) - i64::from(out_w);
    lost_rows > 0 && lost_rows > 2 * lost_cols
}

/// The window `xs` x `ys` of `img` itself.
fn copy_window(img: &RgbImage, xs: &Range<u32>, ys: &Range<u32>) -> RgbImage {
    let width = xs.len();
    let mut data = Vec::with_capacity(width * ys.len() * 3);
    let stride = img.width() as usize * 3;
    for y in ys.clone() {
        let start = y as usize * stride + xs.start as usize * 3;
        data.extend_from_slice(&img.as_raw()[start..start + width * 3]);
    }
    RgbImage::from_raw(width as u32, ys.len() as u32, data)
        .expect("the window buffer has width * height * 3 bytes")
}

/// `COORD` in Geometry.c: negative coordinates map to -1, others truncate.
fn coord(v: f64) -> i64 {
    if v < 0.0 {
        -1
    } else {
        v as i64
    }
}

/// Nearest-neighbour resize as Pillow does it: an affine scale with `fill=1`.
///
/// Port of `ImagingScaleAffine` in
/// <https://github.com/python-pillow/Pillow/blob/11.0.0/src/libImaging/Geometry.c>, reached from
/// `_resize` in `_imaging.c` with `a[0] = in_w / out_w`, `a[4] = in_h / out_h`. Source positions
/// are accumulated by repeated addition, as upstream, so rounding drifts the same way.
fn nearest_window(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    xs: Range<u32>,
    ys: Range<u32>,
) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    let a0 = f64::from(in_w as f32) / f64::from(out_w);
    let a4 = f64::from(in_h as f32) / f64::from(out_h);
    let mut xintab = Vec::with_capacity(xs.len());
    let mut xo = a0 * 0.5;
    for x in 0..xs.end {
        if x >= xs.start {
            let xin = coord(xo);
            xintab.push((0..i64::from(in_w)).contains(&xin).then_some(xin as usize));
        }
        xo += a0;
    }
    let width = xs.len();
    let mut data = vec![0u8; width * ys.len() * 3];
    let raw = img.as_raw();
    let stride = in_w as usize * 3;
    let mut yo = a4 * 0.5;
    let mut out_rows = data.chunks_exact_mut((width * 3).max(1));
    for y in 0..ys.end {
        if y >= ys.start {
            let yi = coord(yo);
            let Some(out) = out_rows.next() else { break };
            if (0..i64::from(in_h)).contains(&yi) {
                let row = &raw[yi as usize * stride..(yi as usize + 1) * stride];
                for (px, xin) in out.chunks_exact_mut(3).zip(&xintab) {
                    if let Some(xin) = *xin {
                        px.copy_from_slice(&row[xin * 3..xin * 3 + 3]);
                    }
                }
            }
        }
        yo += a4;
    }
    RgbImage::from_raw(width as u32, ys.len() as u32, data)
        .expect("the window buffer has width * height * 3 bytes")
}
