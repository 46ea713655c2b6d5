//! Resize, centre crop (or pad) and normalise, as the checkpoint's own processor does.
//!
//! The constructors for the three config dialects (Hugging Face, timm, open_clip) live in
//! `config.rs`; this file holds the pipeline they produce.

use std::ops::Range;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::decode::Alpha;
use crate::error::ImageError;
use crate::resample::{resize_window, Filter};

/// Largest image [`Preprocess::resized`] will produce, in pixels (Pillow's decompression-bomb
/// threshold). A resize without a crop can ask for far more: shortest edge 224 on a 1x5000
/// strip is 224x1_120_000.
pub const MAX_OUTPUT_PIXELS: u64 = 178_956_970;

/// How the image is resized before the crop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Scale so the shorter side becomes this; the longer side is `int(n * long / short)`
    /// (truncated), as torchvision `Resize(int)` and transformers `get_resize_output_image_size`.
    ShortestEdge(u32),
    /// Scale so the longer side becomes this; each side is `round(side / (long / n))` with
    /// Python's round-half-to-even, as `ResizeKeepRatio(n, longest=1)` in open_clip and timm.
    LongestEdge(u32),
    /// Scale to exactly this size, ignoring the aspect ratio ("squash").
    Exact { height: u32, width: u32 },
}

/// Where a centre crop starts when the margin is odd, and where the image sits when the crop is
/// larger than the image and the rest is padded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropRounding {
    /// transformers `center_crop`: offset `(size - crop) // 2`; padding puts the extra pixel of
    /// an odd margin before the image (`ceil`).
    #[default]
    Floor,
    /// torchvision `CenterCrop`: offset `int(round((size - crop) / 2.0))`, half to even;
    /// padding puts the extra pixel after the image (`floor` before).
    RoundHalfEven,
}

/// A complete eval-time image pipeline: resize, centre crop, rescale, normalise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Before resizing, cut a centred square of this fraction of the shorter side, as TensorFlow's
    /// EfficientNet eval does (`_decode_and_center_crop`: side `int(f * short)`, offsets
    /// `((size - side) + 1) // 2`). `None` in every PyTorch pipeline.
    #[serde(default)]
    pub pre_crop: Option<f64>,
    /// `None`: no resize.
    pub resize: Option<ResizeMode>,
    pub filter: Filter,
    /// Centre crop `(height, width)`; sides larger than the resized image are padded.
    pub crop: Option<(u32, u32)>,
    pub crop_rounding: CropRounding,
    /// Colour of the padding where the crop is larger than the image: black for transformers
    /// and torchvision, `fill_color` for open_clip, the mean colour for timm `crop_mode="border"`.
    pub pad_fill: [u8; 3],
    /// Multiply pixel values by this before normalising (`1/255` in all references).
    pub rescale: Option<f32>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// How the reference flattens transparency when it converts an input to RGB; pass it to
    /// [`crate::decode_with`]. This step is not applied by `resized` or `apply`, which take RGB.
    pub alpha: Alpha,
}

impl Default for Preprocess {
    /// The identity pipeline: no resize, no crop, no rescale, mean 0, std 1.
    fn default() -> Self {
        Preprocess {
            pre_crop: None,
            resize: None,
            filter: Filter::Bicubic,
            crop: None,
            crop_rounding: CropRounding::Floor,
            pad_fill: [0; 3],
            rescale: None,
            mean: [0.0; 3],
            std: [1.0; 3],
            alpha: Alpha::Drop,
        }
    }
}

/// Where one axis of the crop comes from: `src` in the resized image goes to `dst_start..` of
/// the output; the rest of the output is padding.
struct AxisPlacement {
    src: Range<u32>,
    dst_start: u32,
}

fn place_axis(size: u32, crop: u32, rounding: CropRounding) -> AxisPlacement {
    if crop <= size {
        let margin = size - crop;
        let start = match rounding {
            CropRounding::Floor => margin / 2,
            // `round(margin / 2.0)`: only odd margins are ties (`k + 0.5`), which go to even.
            CropRounding::RoundHalfEven => {
                let k = margin / 2;
                if margin % 2 == 1 && k % 2 == 1 {
                    k + 1
                } else {
                    k
                }
            }
        };
        AxisPlacement {
            src: start..start + crop,
            dst_start: 0,
        }
    } else {
        let pad = crop - size;
        let before = match rounding {
            CropRounding::Floor => pad.div_ceil(2),
            CropRounding::RoundHalfEven => pad / 2,
        };
        AxisPlacement {
            src: 0..size,
            dst_start: before,
        }
    }
}

impl Preprocess {
    /// The size `(height, width)` the resize step produces for an `input_h` x `input_w` image.
    ///
    /// Fails when a side would be 0 or does not fit in `u32`.
    pub fn resize_size(&self, input_h: u32, input_w: u32) -> Result<(u32, u32), ImageError> {
        let geometry = |reason: String| ImageError::Geometry {
            width: input_w,
            height: input_h,
            reason,
        };
        let (h, w) = match self.resize {
            None => return Ok((input_h, input_w)),
            Some(ResizeMode::Exact { height, width }) => (f64::from(height), f64::from(width)),
            Some(ResizeMode::ShortestEdge(n)) => {
                let (short, long) = (input_h.min(input_w), input_h.max(input_w));
                // Python: `int(n * long / short)`; the product is exact in f64, the division
                // rounds once, as CPython's int / int does.
                let new_long = (f64::from(n) * f64::from(long) / f64::from(short)).trunc();
                if input_w <= input_h {
                    (new_long, f64::from(n))
                } else {
                    (f64::from(n), new_long)
                }
            }
            Some(ResizeMode::LongestEdge(n)) => {
                let ratio =
                    (f64::from(input_h) / f64::from(n)).max(f64::from(input_w) / f64::from(n));
                (
                    (f64::from(input_h) / ratio).round_ties_even(),
                    (f64::from(input_w) / ratio).round_ties_even(),
                )
            }
        };
        if !(h >= 1.0 && w >= 1.0) {
            return Err(geometry(format!("the resize target would be {w}x{h}")));
        }
        if h > f64::from(u32::MAX) || w > f64::from(u32::MAX) {
            return Err(geometry(format!("the resize target {w}x{h} is too large")));
        }
        Ok((h as u32, w as u32))
    }

    /// The `(height, width)` of the output for an `input_h` x `input_w` image: the crop size
    /// when there is a crop, else the resize size (`(0, 0)` where [`Self::resized`] would fail).
    pub fn output_size(&self, input_h: u32, input_w: u32) -> (u32, u32) {
        let (h, w) = match self.pre_crop {
            Some(f) => {
                let side = tf_crop_side(f, input_h, input_w);
                (side, side)
            }
            None => (input_h, input_w),
        };
        match self.crop {
            Some(crop) => crop,
            None => self.resize_size(h, w).unwrap_or((0, 0)),
        }
    }

    /// Resize then centre crop (padding with [`Self::pad_fill`] where the crop is larger): the
    /// 8-bit image the reference hands to its tensor conversion.
    ///
    /// Only the cropped window of the resize is computed (see `resample.rs`), so the result is
    /// bit-identical to a full resize followed by the crop.
    pub fn resized(&self, img: &RgbImage) -> Result<RgbImage, ImageError> {
        let (in_w, in_h) = img.dimensions();
        if in_w == 0 || in_h == 0 {
            return Err(ImageError::Geometry {
                width: in_w,
                height: in_h,
                reason: "the image is empty".to_string(),
            });
        }
        if let Some(f) = self.pre_crop {
            let side = tf_crop_side(f, in_h, in_w);
            if side == 0 {
                return Err(ImageError::Geometry {
                    width: in_w,
                    height: in_h,
                    reason: format!("a central crop of {f} of the shorter side is empty"),
                });
            }
            let (x, y) = ((in_w - side).div_ceil(2), (in_h - side).div_ceil(2));
            let square = image::imageops::crop_imm(img, x, y, side, side).to_image();
            return Preprocess {
                pre_crop: None,
                ..self.clone()
            }
            .resized(&square);
        }
        let (rh, rw) = self.resize_size(in_h, in_w)?;
        let (ch, cw) = self.crop.unwrap_or((rh, rw));
        if ch == 0 || cw == 0 || u64::from(ch) * u64::from(cw) > MAX_OUTPUT_PIXELS {
            return Err(ImageError::Geometry {
                width: in_w,
                height: in_h,
                reason: format!(
                    "the output would be {cw}x{ch} (at most {MAX_OUTPUT_PIXELS} pixels, none empty)"
                ),
            });
        }
        let ys = place_axis(rh, ch, self.crop_rounding);
        let xs = place_axis(rw, cw, self.crop_rounding);
        let window = resize_window(img, rw, rh, xs.src.clone(), ys.src.clone(), self.filter);
        if window.dimensions() == (cw, ch) {
            return Ok(window);
        }
        let mut out = RgbImage::from_pixel(cw, ch, image::Rgb(self.pad_fill));
        let (x0, y0) = (xs.dst_start as usize, ys.dst_start as usize);
        let row_len = window.width() as usize * 3;
        let out_stride = cw as usize * 3;
        if row_len > 0 {
            let out_raw: &mut [u8] = &mut out;
            for (y, row) in window.as_raw().chunks_exact(row_len).enumerate() {
                let start = (y0 + y) * out_stride + x0 * 3;
                out_raw[start..start + row_len].copy_from_slice(row);
            }
        }
        Ok(out)
    }

    /// The model input: [`Self::resized`], then `(x * rescale - mean) / std` per channel, in
    /// `f32` as numpy and torch compute it, laid out CHW (`3 * height * width` values).
    ///
    /// The rescale product is formed in `f64` and rounded once to `f32`, as transformers'
    /// `rescale` does (torchvision's `ToTensor` divides by 255 in `f32` instead: the two can
    /// differ in the last bit).
    pub fn apply(&self, img: &RgbImage) -> Result<Vec<f32>, ImageError> {
        let img = self.resized(img)?;
        let plane = img.width() as usize * img.height() as usize;
        let mut out = vec![0f32; 3 * plane];
        let (head, blue) = out.split_at_mut(2 * plane);
        let (red, green) = head.split_at_mut(plane);
        let planes = [red, green, blue];
        for (c, plane_out) in planes.into_iter().enumerate() {
            let (mean, std) = (self.mean[c], self.std[c]);
            for (o, px) in plane_out.iter_mut().zip(img.as_raw().chunks_exact(3)) {
                let x = match self.rescale {
                    Some(s) => (f64::from(px[c]) * f64::from(s)) as f32,
                    None => f32::from(px[c]),
                };
                *o = (x - mean) / std;
            }
        }
        Ok(out)
    }
}

/// The side of TensorFlow's central crop: `int(fraction * min(height, width))`.
fn tf_crop_side(fraction: f64, h: u32, w: u32) -> u32 {
    ((fraction * f64::from(h.min(w))) as u32).min(h.min(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_offsets_follow_each_reference() {
        // Odd margins 1, 3, 5, 7: transformers floors, torchvision rounds half to even.
        let floor: Vec<u32> = [1, 3, 5, 7]
            .iter()
            .map(|m| place_axis(10 + m, 10, CropRounding::Floor).src.start)
            .collect();
        let even: Vec<u32> = [1, 3, 5, 7]
            .iter()
            .map(|m| {
                place_axis(10 + m, 10, CropRounding::RoundHalfEven)
                    .src
                    .start
            })
            .collect();
        assert_eq!(floor, [0, 1, 2, 3]);
        assert_eq!(even, [0, 2, 2, 4]);
    }

    #[test]
    fn padding_side_follows_each_reference() {
        assert_eq!(place_axis(5, 8, CropRounding::Floor).dst_start, 2);
        assert_eq!(place_axis(5, 8, CropRounding::RoundHalfEven).dst_start, 1);
        assert_eq!(place_axis(5, 9, CropRounding::Floor).dst_start, 2);
        assert_eq!(place_axis(5, 9, CropRounding::RoundHalfEven).dst_start, 2);
    }

    #[test]
    fn shortest_edge_truncates_like_python() {
        let p = Preprocess {
            resize: Some(ResizeMode::ShortestEdge(224)),
            ..Preprocess::default()
        };
        // int(224 * 451 / 300) = int(336.74...) = 336
        assert_eq!(p.resize_size(300, 451).unwrap(), (224, 336));
        assert_eq!(p.resize_size(451, 300).unwrap(), (336, 224));
        assert_eq!(p.resize_size(5000, 1).unwrap(), (1_120_000, 224));
    }

    #[test]
    fn extreme_aspect_ratio_is_an_error_or_cheap() {
        let strip = RgbImage::from_pixel(1, 5000, image::Rgb([9, 8, 7]));
        let longest = Preprocess {
            resize: Some(ResizeMode::LongestEdge(224)),
            ..Preprocess::default()
        };
        // round(1 / (5000 / 224)) = 0: a clear error, not a panic.
        assert!(matches!(
            longest.resized(&strip),
            Err(ImageError::Geometry { .. })
        ));
        let shortest_uncropped = Preprocess {
            resize: Some(ResizeMode::ShortestEdge(224)),
            ..Preprocess::default()
        };
        assert!(matches!(
            shortest_uncropped.resized(&strip),
            Err(ImageError::Geometry { .. })
        ));
        // With a crop only the 224x224 window of the 224x1_120_000 resize is computed.
        let clip = Preprocess {
            crop: Some((224, 224)),
            ..shortest_uncropped
        };
        let out = clip.resized(&strip).unwrap();
        assert_eq!(out.dimensions(), (224, 224));
        assert!(out.pixels().all(|p| p.0 == [9, 8, 7]));
    }
}
