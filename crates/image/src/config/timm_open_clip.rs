//! timm `pretrained_cfg` and open_clip `preprocess_cfg`.

use serde_json::Value;

use super::{as_size, bad, f32x3, field, get_f64, get_str, get_triple};
use super::{IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};
use crate::decode::Alpha;
use crate::error::ImageError;
use crate::preprocess::{CropRounding, Preprocess, ResizeMode};
use crate::resample::Filter;

impl Preprocess {
    /// From a timm `pretrained_cfg` (or a resolved data config), following
    /// `resolve_data_config` and `transforms_imagenet_eval` of timm 1.0:
    /// `scale = floor(size / crop_pct)`, then
    /// * `crop_mode="center"` (default): torchvision `Resize(scale)` (shortest edge) and
    ///   `CenterCrop(size)`;
    /// * `"squash"`: `Resize((scale_h, scale_w))` and `CenterCrop(size)`;
    /// * `"border"`: `ResizeKeepRatio(scale, longest=1)` and `CenterCropOrPad(size)` with the
    ///   mean colour as fill;
    /// * `"tf_center"` (a visenc extension for TensorFlow-trained weights such as EfficientNet-Lite):
    ///   a centred square of `crop_pct` of the shorter side, then a resize to `input_size`, as
    ///   TF EfficientNet's `_decode_and_center_crop`.
    ///
    /// Defaults as timm: input 224x224, bicubic, crop_pct 0.875, ImageNet mean/std. Non-square
    /// `input_size` is supported for `squash` only (timm's `ResizeKeepRatio` is not ported).
    pub fn from_timm_pretrained_cfg(v: &Value) -> Result<Self, ImageError> {
        if !v.is_object() {
            return Err(ImageError::config(
                "a timm pretrained_cfg must be a JSON object",
            ));
        }
        let (height, width) = match field(v, "input_size") {
            None => (224, 224),
            Some(x) => match x.as_array().map(Vec::as_slice) {
                Some([c, h, w]) => {
                    if c.as_u64() != Some(3) {
                        return Err(bad("input_size", "[3, height, width] (RGB input)", x));
                    }
                    (as_size("input_size", h)?, as_size("input_size", w)?)
                }
                _ => return Err(bad("input_size", "[channels, height, width]", x)),
            },
        };
        // timm treats falsy values (0, "", []) as absent.
        let filter = match get_str(v, "interpolation")? {
            Some(name) if !name.is_empty() => name.parse()?,
            _ => Filter::Bicubic,
        };
        let crop_pct = get_f64(v, "crop_pct")?
            .filter(|&p| p != 0.0)
            .unwrap_or(0.875);
        if crop_pct.is_nan() || crop_pct <= 0.0 {
            return Err(bad("crop_pct", "a positive number", &Value::from(crop_pct)));
        }
        let scale = |n: u32| -> Result<u32, ImageError> {
            let s = (f64::from(n) / crop_pct).floor();
            if (1.0..=f64::from(u32::MAX)).contains(&s) {
                Ok(s as u32)
            } else {
                Err(ImageError::config(format!(
                    "crop_pct {crop_pct} scales {n} to {s}"
                )))
            }
        };
        let (scale_h, scale_w) = (scale(height)?, scale(width)?);
        let mean = get_triple(v, "mean")?.unwrap_or(IMAGENET_DEFAULT_MEAN);
        let std = get_triple(v, "std")?.unwrap_or(IMAGENET_DEFAULT_STD);
        let mut pre = Preprocess {
            filter,
            crop: Some((height, width)),
            crop_rounding: CropRounding::RoundHalfEven,
            rescale: Some(1.0 / 255.0),
            mean: f32x3(mean),
            std: f32x3(std),
            ..Preprocess::default()
        };
        let crop_mode = get_str(v, "crop_mode")?
            .filter(|m| !m.is_empty())
            .unwrap_or("center");
        pre.resize = Some(match crop_mode {
            "tf_center" => {
                pre.pre_crop = Some(crop_pct);
                pre.crop = None;
                ResizeMode::Exact { height, width }
            }
            "squash" => ResizeMode::Exact {
                height: scale_h,
                width: scale_w,
            },
            "center" | "border" if scale_h != scale_w => {
                return Err(ImageError::config(format!(
                    "crop_mode {crop_mode:?} with a non-square input_size {height}x{width} \
                     (timm ResizeKeepRatio) is not supported"
                )))
            }
            "center" => ResizeMode::ShortestEdge(scale_h),
            "border" => {
                // `fill = [round(255 * v) for v in mean]`, Python rounding.
                pre.pad_fill = mean.map(|m| (255.0 * m).round_ties_even().clamp(0.0, 255.0) as u8);
                ResizeMode::LongestEdge(scale_h)
            }
            other => {
                return Err(ImageError::config(format!(
                "unknown timm crop_mode {other:?} (expected center, squash, border or tf_center)"
            )))
            }
        });
        Ok(pre)
    }

    /// From an open_clip `preprocess_cfg` (`mean`, `std`, `interpolation`, `resize_mode`,
    /// `fill_color`; `null` for all defaults) and the model's `image_size`, following
    /// `open_clip.transform.image_transform` (eval) of open_clip 3:
    /// * `resize_mode="shortest"` (default): `Resize(size)` and `CenterCrop(size)`;
    /// * `"longest"`: `ResizeKeepRatio(size, longest=1)` and `CenterCropOrPad(size, fill_color)`;
    /// * `"squash"`: `Resize((size, size))`.
    ///
    /// open_clip converts to RGB *after* resizing; for transparent or palette inputs that
    /// differs from decoding to RGB first as this crate does (Pillow resizes RGBA premultiplied).
    pub fn from_open_clip(preprocess_cfg: &Value, image_size: u32) -> Result<Self, ImageError> {
        let empty = Value::Object(serde_json::Map::new());
        let v = if preprocess_cfg.is_null() {
            &empty
        } else if preprocess_cfg.is_object() {
            preprocess_cfg
        } else {
            return Err(ImageError::config(
                "an open_clip preprocess_cfg must be a JSON object",
            ));
        };
        if image_size == 0 {
            return Err(ImageError::config("open_clip image_size must be positive"));
        }
        if let Some(mode) = get_str(v, "mode")? {
            if mode != "RGB" {
                return Err(ImageError::config(format!(
                    "open_clip mode {mode:?} (only RGB)"
                )));
            }
        }
        let filter = match get_str(v, "interpolation")?.unwrap_or("bicubic") {
            "bicubic" | "random" => Filter::Bicubic, // "random" means bicubic at eval
            "bilinear" => Filter::Bilinear,
            other => {
                return Err(ImageError::config(format!(
                    "open_clip interpolation {other:?} (expected bicubic, bilinear or random)"
                )))
            }
        };
        let pad_fill = match field(v, "fill_color") {
            None => [0; 3],
            Some(x) => match x.as_u64().and_then(|n| u8::try_from(n).ok()) {
                Some(n) => [n; 3],
                None => {
                    let t = get_triple(v, "fill_color")?.unwrap_or([0.0; 3]);
                    if t.iter()
                        .any(|c| !(0.0..=255.0).contains(c) || c.fract() != 0.0)
                    {
                        return Err(bad("fill_color", "an integer 0..=255 or three of them", x));
                    }
                    t.map(|c| c as u8)
                }
            },
        };
        let n = image_size;
        let (resize, crop) = match get_str(v, "resize_mode")?.unwrap_or("shortest") {
            "shortest" => (ResizeMode::ShortestEdge(n), Some((n, n))),
            "longest" => (ResizeMode::LongestEdge(n), Some((n, n))),
            "squash" => (
                ResizeMode::Exact {
                    height: n,
                    width: n,
                },
                None,
            ),
            other => {
                return Err(ImageError::config(format!(
                    "open_clip resize_mode {other:?} (expected shortest, longest or squash)"
                )))
            }
        };
        Ok(Preprocess {
            pre_crop: None,
            resize: Some(resize),
            filter,
            crop,
            crop_rounding: CropRounding::RoundHalfEven,
            pad_fill,
            rescale: Some(1.0 / 255.0),
            mean: f32x3(get_triple(v, "mean")?.unwrap_or(OPENAI_CLIP_MEAN)),
            std: f32x3(get_triple(v, "std")?.unwrap_or(OPENAI_CLIP_STD)),
            alpha: Alpha::Drop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    #[test]
    fn timm_modes() {
        let center = Preprocess::from_timm_pretrained_cfg(&json!({
            "input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.9
        }))
        .unwrap();
        assert_eq!(center.resize, Some(ResizeMode::ShortestEdge(248)));
        assert_eq!(center.crop_rounding, CropRounding::RoundHalfEven);
        let squash = Preprocess::from_timm_pretrained_cfg(&json!({
            "input_size": [3, 224, 320], "crop_pct": 1.0, "crop_mode": "squash"
        }))
        .unwrap();
        assert_eq!(
            squash.resize,
            Some(ResizeMode::Exact {
                height: 224,
                width: 320
            })
        );
        let border = Preprocess::from_timm_pretrained_cfg(&json!({"crop_mode": "border"})).unwrap();
        assert_eq!(border.resize, Some(ResizeMode::LongestEdge(256)));
        assert_eq!(border.pad_fill, [124, 116, 104]);
        assert!(Preprocess::from_timm_pretrained_cfg(&json!({"crop_mode": "random"})).is_err());
    }

    #[test]
    fn open_clip_defaults_and_modes() {
        let p = Preprocess::from_open_clip(&Value::Null, 224).unwrap();
        assert_eq!(p.resize, Some(ResizeMode::ShortestEdge(224)));
        assert_eq!(p.mean, f32x3(OPENAI_CLIP_MEAN));
        let longest = Preprocess::from_open_clip(
            &json!({"resize_mode": "longest", "fill_color": 128, "interpolation": "bilinear"}),
            256,
        )
        .unwrap();
        assert_eq!(longest.resize, Some(ResizeMode::LongestEdge(256)));
        assert_eq!(longest.pad_fill, [128; 3]);
        assert_eq!(longest.filter, Filter::Bilinear);
        assert!(Preprocess::from_open_clip(&json!({"interpolation": "lanczos"}), 224).is_err());
    }
}
