//! transformers `preprocessor_config.json` (PIL backend of transformers 5).

use serde_json::Value;

use super::{as_size, bad, f32x3, field, get_bool, get_f64, get_filter, get_str, get_triple};
use super::{IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};
use crate::decode::Alpha;
use crate::error::ImageError;
use crate::preprocess::{Preprocess, ResizeMode};
use crate::resample::Filter;

/// A transformers size dict, after `get_size_dict`.
#[derive(Clone, Copy, Debug, Default)]
struct HfSize {
    shortest_edge: Option<u32>,
    longest_edge: Option<u32>,
    height: Option<u32>,
    width: Option<u32>,
    max_height: Option<u32>,
    max_width: Option<u32>,
}

impl HfSize {
    fn square(n: u32) -> Self {
        HfSize {
            height: Some(n),
            width: Some(n),
            ..HfSize::default()
        }
    }

    /// `get_size_dict`: an int is a square (`default_to_square`) or a shortest edge; a list is
    /// `(height, width)`; a dict is taken as is.
    fn parse(key: &str, x: &Value, default_to_square: bool) -> Result<Self, ImageError> {
        match x {
            Value::Number(_) => {
                let n = as_size(key, x)?;
                Ok(if default_to_square {
                    HfSize::square(n)
                } else {
                    HfSize {
                        shortest_edge: Some(n),
                        ..HfSize::default()
                    }
                })
            }
            Value::Array(items) => match &items[..] {
                [h, w] => Ok(HfSize {
                    height: Some(as_size(key, h)?),
                    width: Some(as_size(key, w)?),
                    ..HfSize::default()
                }),
                _ => Err(bad(key, "a [height, width] pair", x)),
            },
            Value::Object(map) => {
                let mut size = HfSize::default();
                for (k, n) in map {
                    let slot = match k.as_str() {
                        "shortest_edge" => &mut size.shortest_edge,
                        "longest_edge" => &mut size.longest_edge,
                        "height" => &mut size.height,
                        "width" => &mut size.width,
                        "max_height" => &mut size.max_height,
                        "max_width" => &mut size.max_width,
                        other => {
                            return Err(ImageError::config(format!(
                                "`{key}` has an unknown key `{other}`"
                            )))
                        }
                    };
                    if !n.is_null() {
                        *slot = Some(as_size(&format!("{key}.{k}"), n)?);
                    }
                }
                Ok(size)
            }
            _ => Err(bad(key, "an integer, a list or a dict", x)),
        }
    }

    /// The resize of `PilBackend.resize` (transformers 5), tried in its order.
    fn resize_mode(&self) -> Result<ResizeMode, ImageError> {
        match *self {
            HfSize {
                shortest_edge: Some(_),
                longest_edge: Some(_),
                ..
            } => Err(ImageError::config(
                "size {shortest_edge, longest_edge} (get_size_with_aspect_ratio) is not supported",
            )),
            HfSize {
                shortest_edge: Some(n),
                ..
            } => Ok(ResizeMode::ShortestEdge(n)),
            HfSize {
                max_height: Some(_),
                max_width: Some(_),
                ..
            } => Err(ImageError::config(
                "size {max_height, max_width} is not supported",
            )),
            HfSize {
                height: Some(height),
                width: Some(width),
                ..
            } => Ok(ResizeMode::Exact { height, width }),
            _ => Err(ImageError::config(format!(
                "size {self:?} has none of `shortest_edge`, `height` + `width` \
                 (transformers rejects a lone `longest_edge` too)"
            ))),
        }
    }
}

/// Class attributes of the transformers 5 image processors this crate knows, used where the
/// JSON leaves a field out (as transformers does).
struct HfDefaults {
    resample: Filter,
    size: Option<HfSize>,
    default_to_square: bool,
    crop_size: Option<HfSize>,
    do_resize: bool,
    do_center_crop: bool,
    do_rescale: bool,
    do_normalize: bool,
    do_convert_rgb: bool,
    mean_std: Option<([f64; 3], [f64; 3])>,
    /// ConvNeXT's resize: shortest edge / crop_pct, then crop (for sizes < 384).
    convnext: bool,
}

impl HfDefaults {
    fn for_type(kind: &str) -> Option<Self> {
        let clip = HfDefaults {
            resample: Filter::Bicubic,
            size: Some(HfSize {
                shortest_edge: Some(224),
                ..HfSize::default()
            }),
            default_to_square: false,
            crop_size: Some(HfSize::square(224)),
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            do_normalize: true,
            do_convert_rgb: true,
            mean_std: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
            convnext: false,
        };
        let standard = Some((IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD));
        let defaults = match kind {
            // LlavaNextImageProcessor: CLIP's defaults; its tiling is `Preprocess::anyres_tiles`.
            "CLIPImageProcessor" | "BitImageProcessor" | "LlavaNextImageProcessor" => clip,
            "SiglipImageProcessor" => HfDefaults {
                size: Some(HfSize::square(224)),
                crop_size: None,
                do_center_crop: false,
                mean_std: standard,
                ..clip
            },
            "ViTImageProcessor" => HfDefaults {
                resample: Filter::Bilinear,
                size: Some(HfSize::square(224)),
                default_to_square: true,
                crop_size: None,
                do_center_crop: false,
                do_convert_rgb: false,
                mean_std: standard,
                ..clip
            },
            "ConvNextImageProcessor" => HfDefaults {
                size: Some(HfSize {
                    shortest_edge: Some(384),
                    ..HfSize::default()
                }),
                crop_size: None,
                do_center_crop: false,
                do_convert_rgb: false,
                mean_std: standard,
                convnext: true,
                ..clip
            },
            _ => return None,
        };
        Some(defaults)
    }
}

/// `FooImageProcessorFast`, `FooImageProcessorPil` and the old `FooFeatureExtractor` all name
/// `FooImageProcessor`.
fn canonical_processor_type(name: &str) -> String {
    let name = name
        .strip_suffix("Fast")
        .or_else(|| name.strip_suffix("Pil"))
        .unwrap_or(name);
    match name.strip_suffix("FeatureExtractor") {
        Some(stem) => format!("{stem}ImageProcessor"),
        None => name.to_string(),
    }
}

impl Preprocess {
    /// From a Hugging Face `preprocessor_config.json`, following the PIL backend of
    /// transformers 5 (`PilBackend._preprocess`: resize, centre crop, rescale, normalise).
    ///
    /// Known types (`CLIPImageProcessor`, `SiglipImageProcessor`, `ViTImageProcessor`,
    /// `BitImageProcessor`, `ConvNextImageProcessor`, and their `Fast`/`Pil`/`FeatureExtractor`
    /// spellings) fill missing fields with their class defaults. For other types a missing
    /// `do_*` flag is taken as "set" exactly when its value (`size`, `crop_size`,
    /// `rescale_factor`, `image_mean`) is present.
    ///
    /// With `do_convert_rgb`, transformers composites transparent inputs over white:
    /// [`Preprocess::alpha`] is then [`Alpha::OverWhite`].
    pub fn from_hf_processor_json(v: &Value) -> Result<Self, ImageError> {
        if !v.is_object() {
            return Err(ImageError::config(
                "a preprocessor config must be a JSON object",
            ));
        }
        let kind = get_str(v, "image_processor_type")?
            .or(get_str(v, "feature_extractor_type")?)
            .map(canonical_processor_type)
            .unwrap_or_default();
        let known = HfDefaults::for_type(&kind);
        let flag = |key: &str, known_default: Option<bool>, evidence: &str| {
            get_bool(v, key).map(|b| {
                b.or(known_default)
                    .unwrap_or_else(|| field(v, evidence).is_some())
            })
        };
        let do_resize = flag("do_resize", known.as_ref().map(|d| d.do_resize), "size")?;
        let do_center_crop = flag(
            "do_center_crop",
            known.as_ref().map(|d| d.do_center_crop),
            "crop_size",
        )?;
        let do_rescale = flag(
            "do_rescale",
            known.as_ref().map(|d| d.do_rescale),
            "rescale_factor",
        )?;
        let do_normalize = flag(
            "do_normalize",
            known.as_ref().map(|d| d.do_normalize),
            "image_mean",
        )?;
        let do_convert_rgb = get_bool(v, "do_convert_rgb")?
            .or(known.as_ref().map(|d| d.do_convert_rgb))
            .unwrap_or(false);
        let default_to_square = get_bool(v, "default_to_square")?
            .or(known.as_ref().map(|d| d.default_to_square))
            .unwrap_or(true);
        let filter = get_filter(v, "resample")?
            .or(known.as_ref().map(|d| d.resample))
            // `PilBackend.resize` falls back to bilinear.
            .unwrap_or(Filter::Bilinear);
        let size = match field(v, "size") {
            Some(x) => Some(HfSize::parse("size", x, default_to_square)?),
            None => known.as_ref().and_then(|d| d.size),
        };
        let crop_size = match field(v, "crop_size") {
            Some(x) => Some(HfSize::parse("crop_size", x, true)?),
            None => known.as_ref().and_then(|d| d.crop_size),
        };
        let mut pre = Preprocess {
            filter,
            alpha: if do_convert_rgb {
                Alpha::OverWhite
            } else {
                Alpha::Drop
            },
            ..Preprocess::default()
        };

        if do_resize {
            let size =
                size.ok_or_else(|| ImageError::config("`do_resize` is set but `size` is missing"))?;
            if known.as_ref().is_some_and(|d| d.convnext) {
                // `ConvNextImageProcessorPil.resize`.
                let n = size.shortest_edge.ok_or_else(|| {
                    ImageError::config("ConvNextImageProcessor needs `size.shortest_edge`")
                })?;
                if n < 384 {
                    let crop_pct = get_f64(v, "crop_pct")?.unwrap_or(224.0 / 256.0);
                    let resize_to = (f64::from(n) / crop_pct).trunc();
                    if !(1.0..=f64::from(u32::MAX)).contains(&resize_to) {
                        return Err(bad(
                            "crop_pct",
                            "a positive fraction",
                            &Value::from(crop_pct),
                        ));
                    }
                    pre.resize = Some(ResizeMode::ShortestEdge(resize_to as u32));
                    pre.crop = Some((n, n));
                } else {
                    pre.resize = Some(ResizeMode::Exact {
                        height: n,
                        width: n,
                    });
                }
            } else {
                if field(v, "crop_pct").is_some() {
                    return Err(ImageError::config(format!(
                        "`crop_pct` is only understood for ConvNextImageProcessor, not {kind:?}"
                    )));
                }
                pre.resize = Some(size.resize_mode()?);
            }
        }
        if do_center_crop {
            let crop = crop_size.ok_or_else(|| {
                ImageError::config("`do_center_crop` is set but `crop_size` is missing")
            })?;
            let (Some(h), Some(w)) = (crop.height, crop.width) else {
                return Err(ImageError::config(format!(
                    "`crop_size` must have `height` and `width`, got {crop:?}"
                )));
            };
            if pre.crop.is_some() {
                return Err(ImageError::config(
                    "ConvNeXT's crop_pct crop followed by `do_center_crop` is not supported",
                ));
            }
            pre.crop = Some((h, w));
        }
        if do_rescale {
            pre.rescale = Some(get_f64(v, "rescale_factor")?.unwrap_or(1.0 / 255.0) as f32);
        }
        if do_normalize {
            let known_mean_std = known.as_ref().and_then(|d| d.mean_std);
            pre.mean = f32x3(
                get_triple(v, "image_mean")?
                    .or(known_mean_std.map(|m| m.0))
                    .ok_or_else(|| {
                        ImageError::config("`do_normalize` is set but `image_mean` is missing")
                    })?,
            );
            pre.std = f32x3(
                get_triple(v, "image_std")?
                    .or(known_mean_std.map(|m| m.1))
                    .ok_or_else(|| {
                        ImageError::config("`do_normalize` is set but `image_std` is missing")
                    })?,
            );
        }
        Ok(pre)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    #[test]
    fn processor_type_spellings() {
        assert_eq!(
            canonical_processor_type("CLIPImageProcessorFast"),
            "CLIPImageProcessor"
        );
        assert_eq!(
            canonical_processor_type("ViTImageProcessorPil"),
            "ViTImageProcessor"
        );
        assert_eq!(
            canonical_processor_type("ViTFeatureExtractor"),
            "ViTImageProcessor"
        );
    }

    #[test]
    fn clip_defaults_fill_missing_fields() {
        let p = Preprocess::from_hf_processor_json(
            &json!({"image_processor_type": "CLIPImageProcessor"}),
        )
        .unwrap();
        assert_eq!(p.resize, Some(ResizeMode::ShortestEdge(224)));
        assert_eq!(p.crop, Some((224, 224)));
        assert_eq!(p.filter, Filter::Bicubic);
        assert_eq!(p.mean, f32x3(OPENAI_CLIP_MEAN));
        assert_eq!(p.alpha, Alpha::OverWhite);
    }

    #[test]
    fn int_size_follows_default_to_square() {
        let vit = Preprocess::from_hf_processor_json(&json!({
            "image_processor_type": "ViTImageProcessor", "size": 384, "resample": 2
        }))
        .unwrap();
        assert_eq!(
            vit.resize,
            Some(ResizeMode::Exact {
                height: 384,
                width: 384
            })
        );
        let clip = Preprocess::from_hf_processor_json(&json!({
            "image_processor_type": "CLIPImageProcessor", "size": 336, "crop_size": 336
        }))
        .unwrap();
        assert_eq!(clip.resize, Some(ResizeMode::ShortestEdge(336)));
        assert_eq!(clip.crop, Some((336, 336)));
    }

    #[test]
    fn convnext_crop_pct() {
        let p = Preprocess::from_hf_processor_json(&json!({
            "image_processor_type": "ConvNextImageProcessor",
            "size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3
        }))
        .unwrap();
        assert_eq!(p.resize, Some(ResizeMode::ShortestEdge(256)));
        assert_eq!(p.crop, Some((224, 224)));
        let big = Preprocess::from_hf_processor_json(&json!({
            "image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 384}
        }))
        .unwrap();
        assert_eq!(
            big.resize,
            Some(ResizeMode::Exact {
                height: 384,
                width: 384
            })
        );
        assert_eq!(big.crop, None);
    }

    #[test]
    fn hf_errors_are_clear() {
        let missing_size = json!({"image_processor_type": "MyProcessor", "do_resize": true});
        let err = Preprocess::from_hf_processor_json(&missing_size).unwrap_err();
        assert!(err.to_string().contains("`size` is missing"), "{err}");
        let lone_longest = json!({"do_resize": true, "size": {"longest_edge": 512}});
        assert!(Preprocess::from_hf_processor_json(&lone_longest).is_err());
        let bad_resample = json!({"do_resize": true, "size": 224, "resample": 9});
        let err = Preprocess::from_hf_processor_json(&bad_resample).unwrap_err();
        assert!(err.to_string().contains("resample"), "{err}");
    }

    #[test]
    fn unknown_type_infers_flags_from_fields() {
        let p = Preprocess::from_hf_processor_json(&json!({
            "image_processor_type": "SomeNewImageProcessor",
            "size": {"height": 256, "width": 192}, "image_mean": [0.5], "image_std": 0.25
        }))
        .unwrap();
        assert_eq!(
            p.resize,
            Some(ResizeMode::Exact {
                height: 256,
                width: 192
            })
        );
        assert_eq!(p.filter, Filter::Bilinear);
        assert_eq!(p.crop, None);
        assert_eq!(p.rescale, None);
        assert_eq!(p.std, [0.25; 3]);
    }
}
