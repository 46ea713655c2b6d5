//! LLaVA / LLaVA-NeXT from a photo to the language model's visual tokens, against transformers
//! (fixtures/llava/anyres_photos, scripts/fixtures/llava_anyres.py): the anyres tiles equal
//! `LlavaNextImageProcessorPil`'s pixel_values, the tokens equal `get_image_features` after that
//! processor, the counts equal the processor's; sizes the model refuses are clear errors.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde_json::Value;
use visenc::image::{open, Limits, RgbImage};
use visenc::{Encoder, LoadOptions, TokenKind};

const F32_ABS_TOL: f32 = 1e-5;
const F32_REL_TOL: f32 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn encoder(name: &str) -> Encoder {
    let dir = root().join("fixtures/llava").join(name);
    Encoder::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

struct Cases {
    cases: Vec<Value>,
    expected: HashMap<String, Tensor>,
}

fn cases() -> Cases {
    let dir = root().join("fixtures/llava/anyres_photos");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    Cases {
        cases: m["cases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["processor"] == "saved")
            .cloned()
            .collect(),
        expected,
    }
}

/// The case's photo, cropped as PIL's `Image.crop(box)`.
fn image(case: &Value) -> RgbImage {
    let p = root()
        .join("assets/photos")
        .join(case["photo"].as_str().unwrap());
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-assets.sh first",
        p.display()
    );
    let photo = open(&p, &Limits::default()).unwrap();
    match case["crop_box"].as_array() {
        None => photo,
        Some(b) => {
            let b: Vec<u32> = b.iter().map(|v| v.as_u64().unwrap() as u32).collect();
            RgbImage::from_fn(b[2] - b[0], b[3] - b[1], |x, y| {
                *photo.get_pixel(b[0] + x, b[1] + y)
            })
        }
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let m = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    max_abs(a, b) / m.max(1e-12)
}

/// The case whose unpadded grid is empty in the reference (30x512 with 32 px tiles).
fn refused(case: &Value) -> bool {
    case["key"] == "astronaut_tall"
}

#[test]
fn llava_next_photo_to_tokens_matches_reference() {
    let enc = encoder("llava_next_hf");
    let c = cases();
    assert!(c.cases.len() >= 8);
    for case in &c.cases {
        let key = case["key"].as_str().unwrap();
        let img = image(case);
        if refused(case) {
            let err = enc.llm_tokens(&img).unwrap_err().to_string();
            assert!(
                err.contains("image_grid_pinpoints") && err.contains("30x512"),
                "{err}"
            );
            continue;
        }
        let tiles = enc.anyres_tiles(&img).unwrap();
        let d = max_abs(&tiles, &c.expected[&format!("pixel_values.{key}")]);
        assert!(d <= F32_ABS_TOL, "{key}: tiles differ by {d}");
        let t = enc.llm_tokens(&img).unwrap();
        let e = rel(&t.tokens, &c.expected[&format!("next_features.{key}")]);
        println!(
            "{key}: {} tokens, relative error {e:e}",
            t.layout.num_tokens
        );
        assert!(e <= F32_REL_TOL, "{key}: {e:e}");
        let sizes = c.expected[&format!("image_sizes.{key}")]
            .to_vec1::<i64>()
            .unwrap();
        assert_eq!(
            t.layout.image_size.map(|x| x as i64).to_vec(),
            sizes,
            "{key}"
        );
        assert_eq!(
            t.layout.num_tokens as u64,
            case["processor_num_tokens"].as_u64().unwrap(),
            "{key}"
        );
        // The layout accounts for every row: base tile, then rows of the grid each ended by a newline.
        let l = &t.layout;
        let [rows, cols] = l.unpadded_grid.unwrap();
        assert_eq!(l.base_tokens, 16);
        assert_eq!(l.num_tokens, l.base_tokens + rows * (cols + 1), "{key}");
        assert_eq!(l.newlines.len(), rows);
        let kinds = t.kinds();
        assert_eq!(
            kinds.iter().filter(|&&k| k == TokenKind::Grid).count(),
            rows * cols
        );
        assert_eq!(l.image_token_index, Some(63));
    }
}

#[test]
fn llava_photo_to_tokens_matches_reference() {
    let enc = encoder("llava_hf");
    let c = cases();
    for case in &c.cases {
        let key = case["key"].as_str().unwrap();
        let t = enc.llm_tokens(&image(case)).unwrap();
        let e = rel(&t.tokens, &c.expected[&format!("llava_features.{key}")]);
        assert!(e <= F32_REL_TOL, "{key}: {e:e}");
        assert_eq!(
            (
                t.layout.num_tokens,
                t.layout.base_tokens,
                t.layout.num_tiles
            ),
            (16, 16, 1)
        );
        assert!(t.layout.newlines.is_empty() && t.layout.tile_grid.is_none());
    }
}

/// Extreme sizes: a giant image (within the pixel limit) is tiled like any other; an image too thin
/// for the grid (1x10000) is refused naming the setting; the 1x1 image follows the reference.
#[test]
fn llava_next_extreme_sizes() {
    let enc = encoder("llava_next_hf");
    let mm = enc.multimodal().unwrap();
    let (w, h) = (6000u32, 4000u32);
    let raw = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
    let giant = RgbImage::from_raw(w, h, raw).unwrap();
    let t = enc.llm_tokens(&giant).unwrap();
    assert_eq!(t.layout.num_tokens, mm.num_tokens((4000, 6000)).unwrap());
    assert_eq!(t.layout.num_tiles, 5);
    for (w, h) in [(1, 10000), (10000, 1)] {
        let thin = RgbImage::from_raw(w, h, vec![9; (w * h * 3) as usize]).unwrap();
        let err = enc.llm_tokens(&thin).unwrap_err().to_string();
        assert!(
            err.contains("too thin") && err.contains("image_grid_pinpoints"),
            "{err}"
        );
        assert!(mm.num_tokens((h as usize, w as usize)).is_err());
    }
    // A CLIP model has no projector to a language model.
    let clip = Encoder::load(
        root()
            .join("fixtures/models/clip_hf_quickgelu")
            .to_str()
            .unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let err = clip.llm_tokens(&giant).unwrap_err().to_string();
    assert!(err.contains("not a LLaVA-style model"), "{err}");
}
