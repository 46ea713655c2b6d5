//! LLaVA-NeXT anyres tiles of real photos (whole and cropped to odd aspect ratios) against
//! transformers' `LlavaNextImageProcessorPil` (fixtures/llava/anyres_photos, written by
//! scripts/fixtures/llava_anyres.py), with the geometry the reference chose.

mod common;

use common::{crop, fixtures_dir, photos_dir, Tensors};
use serde_json::Value;
use visenc_image::{open, AnyresLayout, Limits, Preprocess};

/// As `normalised_tensor_matches_hf_processor` (photos.rs): the same u8 pixels, then
/// `(x * 1/255 - mean) / std` in f32.
const F32_ABS_TOL: f32 = 1e-5;

fn pair(v: &Value) -> (u32, u32) {
    (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32)
}

#[test]
fn anyres_tiles_match_llava_next_image_processor() {
    let dir = fixtures_dir().join("../llava");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("anyres_photos/manifest.json")).unwrap(),
    )
    .unwrap();
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("llava_next_hf/preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    let tensors = Tensors::load("../llava/anyres_photos/expected.safetensors");
    let cases = manifest["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let key = case["key"].as_str().unwrap();
        let mut config = saved.clone();
        if let Some(over) = case["processor_config"].as_object() {
            for (k, v) in over {
                config[k] = v.clone();
            }
        }
        let pre = Preprocess::from_hf_processor_json(&config).unwrap();
        let photo = open(
            &photos_dir().join(case["photo"].as_str().unwrap()),
            &Limits::default(),
        )
        .unwrap();
        let img = match &case["crop_box"] {
            Value::Null => photo,
            b => crop(&photo, b),
        };
        assert_eq!((img.height(), img.width()), pair(&case["size"]), "{key}");
        let pad = &case["padding_left_top_right_bottom"];
        let layout = AnyresLayout {
            canvas: pair(&case["best_resolution"]),
            resized: pair(&case["resized"]),
            offset: pair(pad),
        };
        let ours = pre.anyres_tiles(&img, &layout).unwrap();
        let (shape, reference) = tensors.f32s(&format!("pixel_values.{key}"));
        let (th, tw) = ours.tile;
        assert_eq!(
            shape,
            [ours.num_tiles, 3, th as usize, tw as usize],
            "{key}: tiles"
        );
        let max = ours
            .data
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{key}: {} tiles, max |diff| {max:e}", ours.num_tiles);
        assert!(max <= F32_ABS_TOL, "{key}: max |diff| {max}");
    }
}
