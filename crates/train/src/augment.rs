//! Training augmentation with torchvision's semantics: `RandomResizedCrop(size, scale=(0.08, 1),
//! ratio=(3/4, 4/3))` (bilinear, as torchvision resizes PIL images) then `RandomHorizontalFlip(0.5)`,
//! then the checkpoint's own rescale and normalisation. Seeded by our own generator: the draws are not
//! torch's, the distributions are.

use visenc::image::{Filter, Preprocess, ResizeMode, RgbImage};

use crate::data::SplitMix64;
use crate::error::{Result, TrainError};

/// A crop box in pixels: rows `top..top + height`, columns `left..left + width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// A uniform draw in `[lo, hi)`.
fn uniform(rng: &mut SplitMix64, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
}

/// A uniform integer in `0..n` (`n` > 0).
fn below(rng: &mut SplitMix64, n: u32) -> u32 {
    (rng.next_u64() % n as u64) as u32
}

/// `RandomResizedCrop.get_params`: 10 attempts at a box of `scale` times the area with a log-uniform
/// aspect ratio in `ratio`, then the centre crop clamped to `ratio` (Python's `round` rounds half to
/// even, so does this).
// Reference: https://github.com/pytorch/vision/blob/v0.29.2/torchvision/transforms/transforms.py#L929-L969
pub fn random_resized_crop(
    height: u32,
    width: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut SplitMix64,
) -> CropBox {
    let area = height as f64 * width as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, lr0, lr1).exp();
        let w = (target_area * aspect).sqrt().round_ties_even() as i64;
        let h = (target_area / aspect).sqrt().round_ties_even() as i64;
        if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
            let (w, h) = (w as u32, h as u32);
            let top = below(rng, height - h + 1);
            let left = below(rng, width - w + 1);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (width, (width as f64 / ratio.0).round_ties_even() as u32)
    } else if in_ratio > ratio.1 {
        ((height as f64 * ratio.1).round_ties_even() as u32, height)
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// The training view of one image: a random resized crop to `size` (height, width), flipped left-right
/// with probability 1/2, rescaled and normalised like `eval` (the checkpoint's preprocessing). CHW `f32`.
pub fn train_view(
    img: &RgbImage,
    eval: &Preprocess,
    size: (u32, u32),
    rng: &mut SplitMix64,
) -> Result<Vec<f32>> {
    let b = random_resized_crop(
        img.height(),
        img.width(),
        (0.08, 1.0),
        (0.75, 4.0 / 3.0),
        rng,
    );
    let flip = rng.next_u64() & 1 == 1;
    let crop = RgbImage::from_fn(b.width, b.height, |x, y| {
        *img.get_pixel(b.left + x, b.top + y)
    });
    let pre = Preprocess {
        pre_crop: None,
        resize: Some(ResizeMode::Exact {
            height: size.0,
            width: size.1,
        }),
        filter: Filter::Bilinear,
        crop: None,
        ..eval.clone()
    };
    let mut px = pre
        .apply(&crop)
        .map_err(|e| TrainError::Data(e.to_string()))?;
    if flip {
        let w = size.1 as usize;
        for row in px.chunks_mut(w) {
            row.reverse();
        }
    }
    Ok(px)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Boxes stay inside the image with the scale and ratio bounds; a very wide image (where no
    /// attempt can fit 4/3) falls back to the centred crop of ratio 4/3, as torchvision's.
    #[test]
    fn crops_respect_bounds_and_fall_back_to_the_centre() {
        let mut rng = SplitMix64(5);
        for _ in 0..500 {
            let b = random_resized_crop(300, 451, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(b.top + b.height <= 300 && b.left + b.width <= 451, "{b:?}");
            let area = (b.height * b.width) as f64 / (300.0 * 451.0);
            assert!((0.07..=1.0).contains(&area), "{b:?}");
            let r = b.width as f64 / b.height as f64;
            assert!((0.7..1.4).contains(&r), "{b:?}");
        }
        // 1 x 100: every attempt needs h >= 1 and w <= 4/3 h, so it falls back to h = 1, w = round(4/3) = 1.
        let b = random_resized_crop(1, 100, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: 49,
                height: 1,
                width: 1
            }
        );
    }
}
