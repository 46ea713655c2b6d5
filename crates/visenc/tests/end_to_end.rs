//! End to end through the facade, as a user calls it: `Encoder::load(dir)`, then a real photo file
//! through `load_image` (decode + the checkpoint's own preprocessing) and the model, compared with what
//! the reference library produced from the same file (`photo_*` tensors of `expected.safetensors`);
//! texts through `encode_texts` (tokenizer + text tower) compared with the reference's text embeddings;
//! zero-shot probabilities against the reference's logits; and batched == single.
//!
//! Tolerances: pixels 1e-5 absolute for >= 99.9% of values (the PIL-exact resampler may differ from
//! Pillow's fixed-point rounding by one 8-bit level on a few pixels); photo outputs cosine >= 0.9999
//! (they inherit that pixel slack); text and zero-shot f32 relative 1e-4; batched == single 1e-5.

mod common;

use candle_core::{Tensor, D};
use common::{cosine, f32s, fixture_dir, load, photo, rel_err, Expected, FIXTURES};
use visenc::EncodeOptions;

const PIXEL_ABS_TOL: f32 = 1e-5;
const PIXEL_MIN_EXACT_FRACTION: f64 = 0.999;
const PHOTO_MIN_COSINE: f32 = 0.9999;
const F32_TOL: f32 = 1e-4;
const BATCH_TOL: f32 = 1e-5;

/// The reference keys for the photo: transformers fixtures store the default (torchvision) backend as
/// `photo_*` and the PIL backend as `photo_pil_*`; visenc follows PIL. timm and open_clip use PIL for
/// `photo_*` already.
fn photo_key(e: &Expected, what: &str) -> Option<String> {
    let pil = format!("photo_pil_{what}");
    let plain = format!("photo_{what}");
    if e.has("photo_pil_pixel_values") {
        e.has(&pil).then_some(pil)
    } else {
        e.has(&plain).then_some(plain)
    }
}

fn check_photo(name: &str) {
    let e = Expected::load(name);
    let enc = load(&fixture_dir(name));
    let px_key =
        photo_key(&e, "pixel_values").unwrap_or_else(|| panic!("{name}: no photo pixel values"));
    let reference = e.get(&px_key);

    let px = enc.load_image(&photo("chelsea.png")).unwrap();
    let dims = reference.dims();
    assert_eq!(
        (1, 3, px.height, px.width),
        (dims[0], dims[1], dims[2], dims[3]),
        "{name}: preprocessed size vs {px_key}"
    );
    let want = f32s(reference);
    assert_eq!(px.data.len(), want.len());
    let close = px
        .data
        .iter()
        .zip(&want)
        .filter(|(a, b)| (*a - *b).abs() <= PIXEL_ABS_TOL)
        .count();
    let fraction = close as f64 / want.len() as f64;
    let worst = px
        .data
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        fraction >= PIXEL_MIN_EXACT_FRACTION,
        "{name}: only {close}/{} pixel values within {PIXEL_ABS_TOL:e} of {px_key} (worst {worst:e})",
        want.len()
    );

    let f = enc.encode_pixels(&[px], &EncodeOptions::default()).unwrap();
    let mut checked = vec![];
    for (what, ours) in [
        ("pooled", Some(&f.pooled)),
        ("image_embeds", f.projected.as_ref()),
        ("logits", f.logits.as_ref()),
    ] {
        let Some(key) = photo_key(&e, what) else {
            continue;
        };
        let ours = ours.unwrap_or_else(|| {
            panic!("{name}: the reference has {key} but visenc returned no {what}")
        });
        let c = cosine(ours, e.get(&key));
        assert!(
            c >= PHOTO_MIN_COSINE,
            "{name}: {what} of chelsea.png has cosine {c} to {key} (< {PHOTO_MIN_COSINE})"
        );
        checked.push(key);
    }
    assert!(
        checked.iter().any(|k| k.ends_with("pooled")),
        "{name}: no pooled reference checked ({checked:?})"
    );
}

macro_rules! photo_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            check_photo(stringify!($name).trim_start_matches("photo_pixels_and_embedding_match_reference_"));
        }
    )*};
}

photo_tests!(
    photo_pixels_and_embedding_match_reference_clip_hf_gelu,
    photo_pixels_and_embedding_match_reference_clip_hf_quickgelu,
    photo_pixels_and_embedding_match_reference_clip_open_clip,
    photo_pixels_and_embedding_match_reference_dinov2_hf,
    photo_pixels_and_embedding_match_reference_dinov2_reg_hf,
    photo_pixels_and_embedding_match_reference_siglip_hf,
    photo_pixels_and_embedding_match_reference_vit_hf_classifier,
    photo_pixels_and_embedding_match_reference_vit_timm,
    photo_pixels_and_embedding_match_reference_vit_timm_reg,
);

/// Guards the list above: a new fixture with a photo reference must get a photo test.
#[test]
fn every_fixture_with_a_photo_reference_has_a_photo_test() {
    let mut with_photo = vec![];
    for entry in std::fs::read_dir(common::root().join("fixtures/models")).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("expected.safetensors").is_file() {
            continue;
        }
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let e = Expected::load(&name);
        if e.tensors.keys().any(|k| k.starts_with("photo_")) {
            assert!(
                FIXTURES.contains(&name.as_str()),
                "fixture {name} has photo_* tensors but no photo test"
            );
            with_photo.push(name);
        }
    }
    assert_eq!(
        with_photo.len(),
        FIXTURES.len(),
        "fixtures with photo references: {with_photo:?}"
    );
}

/// `encode_texts` on the fixture's own texts (metadata `texts`, including an empty string, unicode and
/// a caption longer than the context) reproduces the reference text embeddings: tokenizer, padding,
/// truncation, pooling position and projection all have to agree.
fn check_texts(name: &str, key: &str) {
    let e = Expected::load(name);
    let enc = load(&fixture_dir(name));
    let texts = e.texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let t = enc.encode_texts(&refs).unwrap();
    let want = e.get(key);
    for (i, text) in refs.iter().enumerate() {
        let err = rel_err(
            &t.projected.narrow(0, i, 1).unwrap(),
            &want.narrow(0, i, 1).unwrap(),
        );
        assert!(
            err <= F32_TOL,
            "{name}: text {i} {text:?}: relative error {err:e} vs {key}"
        );
    }
}

#[test]
fn texts_match_reference_clip_hf_gelu() {
    check_texts("clip_hf_gelu", "text_embeds");
}

#[test]
fn texts_match_reference_clip_hf_quickgelu() {
    check_texts("clip_hf_quickgelu", "text_embeds");
}

#[test]
fn texts_match_reference_open_clip() {
    check_texts("clip_open_clip", "text_embeds");
}

/// SigLIP was trained attending to the padding (big_vision); visenc follows that, so the reference is
/// the `_no_mask` call.
#[test]
fn texts_match_reference_siglip_unmasked() {
    check_texts("siglip_hf", "text_embeds_no_mask");
}

/// Zero-shot with template "{}" and the fixture's own texts as labels, for the fixture's own image
/// embeddings, must equal the reference's activation of its logits: softmax over labels for CLIP,
/// an independent sigmoid per label for SigLIP.
fn check_zero_shot(name: &str, logits_key: &str, sigmoid: bool) {
    let e = Expected::load(name);
    let enc = load(&fixture_dir(name));
    let texts = e.texts();
    let labels: Vec<&str> = texts.iter().map(String::as_str).collect();
    let image = enc.encode_pixels_tensor(e.get("pixel_values"));
    let probs = enc.zero_shot(image.embedding(), &labels, "{}").unwrap();
    let logits = e.get(logits_key);
    let want = if sigmoid {
        candle_nn_sigmoid(logits)
    } else {
        let max = logits.max_keepdim(D::Minus1).unwrap();
        let ex = logits.broadcast_sub(&max).unwrap().exp().unwrap();
        ex.broadcast_div(&ex.sum_keepdim(D::Minus1).unwrap())
            .unwrap()
    };
    let err = rel_err(&probs, &want);
    assert!(
        err <= F32_TOL,
        "{name}: zero-shot probabilities differ from the reference by {err:e}"
    );
    let sums = f32s(&probs.sum(D::Minus1).unwrap());
    if sigmoid {
        // Independent sigmoids: nothing ties the row to 1 (here every row sums far from it).
        assert!(
            sums.iter().all(|s| (s - 1.0).abs() > 1e-3),
            "{name}: SigLIP rows look softmaxed: {sums:?}"
        );
    } else {
        assert!(
            sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
            "{name}: CLIP rows must sum to 1: {sums:?}"
        );
    }
}

fn candle_nn_sigmoid(t: &Tensor) -> Tensor {
    (t.neg().unwrap().exp().unwrap() + 1.0)
        .unwrap()
        .recip()
        .unwrap()
}

trait EncodeTensor {
    fn encode_pixels_tensor(&self, px: &Tensor) -> visenc::ImageFeatures;
}

impl EncodeTensor for visenc::Encoder {
    /// The fixture's stored pixel batch through the public `encode_pixels`.
    fn encode_pixels_tensor(&self, px: &Tensor) -> visenc::ImageFeatures {
        let (b, _, h, w) = px.dims4().unwrap();
        let batch: Vec<visenc::Pixels> = (0..b)
            .map(|i| visenc::Pixels {
                data: f32s(&px.narrow(0, i, 1).unwrap()),
                height: h,
                width: w,
            })
            .collect();
        self.encode_pixels(&batch, &EncodeOptions::default())
            .unwrap()
    }
}

#[test]
fn zero_shot_is_softmax_over_labels_clip_hf() {
    check_zero_shot("clip_hf_gelu", "logits_per_image", false);
}

#[test]
fn zero_shot_is_softmax_over_labels_open_clip() {
    check_zero_shot("clip_open_clip", "logits_per_image", false);
}

#[test]
fn zero_shot_is_independent_sigmoid_siglip() {
    check_zero_shot("siglip_hf", "logits_per_image_no_mask", true);
}

/// `similarity` is the plain cosine between image and text embeddings: the reference's logits divided
/// by its scale (CLIP has no bias).
#[test]
fn similarity_is_cosine_clip_hf() {
    let e = Expected::load("clip_hf_quickgelu");
    let enc = load(&fixture_dir("clip_hf_quickgelu"));
    let texts = e.texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let image = enc.encode_pixels_tensor(e.get("pixel_values"));
    let sims = enc.similarity(image.embedding(), &refs).unwrap();
    let scale = (2.6592600345611572f64).exp();
    let want = (e.get("logits_per_image") / scale).unwrap();
    let err = rel_err(&sims, &want);
    assert!(
        err <= F32_TOL,
        "similarity differs from logits_per_image / exp(logit_scale) by {err:e}"
    );
}

/// Three photos encoded as one batch give, row by row, what each gives alone.
fn check_batched_equals_single(name: &str) {
    let enc = load(&fixture_dir(name));
    let px: Vec<visenc::Pixels> = ["chelsea.png", "coffee.png", "rocket.jpg"]
        .iter()
        .map(|p| enc.load_image(&photo(p)).unwrap())
        .collect();
    let opts = EncodeOptions {
        layers: vec![-1],
        tokens: true,
        ..Default::default()
    };
    let all = enc.encode_pixels(&px, &opts).unwrap();
    assert_eq!(all.pooled.dim(0).unwrap(), 3);
    for (i, p) in px.iter().enumerate() {
        let one = enc.encode_pixels(std::slice::from_ref(p), &opts).unwrap();
        let row = |t: &Tensor| t.narrow(0, i, 1).unwrap();
        let mut pairs = vec![("pooled", &one.pooled, row(&all.pooled))];
        for (what, a, b) in [
            ("projected", &one.projected, &all.projected),
            ("logits", &one.logits, &all.logits),
            ("patch_tokens", &one.patch_tokens, &all.patch_tokens),
        ] {
            if let (Some(a), Some(b)) = (a, b) {
                pairs.push((what, a, row(b)));
            }
        }
        pairs.push((
            "layer -1",
            &one.hidden_states[0].1,
            row(&all.hidden_states[0].1),
        ));
        for (what, single, batched) in pairs {
            let err = rel_err(single, &batched);
            assert!(
                err <= BATCH_TOL,
                "{name}: image {i} {what}: single vs batch row differ by {err:e}"
            );
        }
    }
    // The rows are different images: a batch that repeated its first row would pass the loop above
    // only if every photo gave the same output.
    let p = f32s(&all.pooled);
    let d = p.len() / 3;
    assert!(
        p[..d] != p[d..2 * d],
        "{name}: two different photos gave the same embedding"
    );
}

macro_rules! batch_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            check_batched_equals_single(stringify!($name).trim_start_matches("batched_equals_single_"));
        }
    )*};
}

batch_tests!(
    batched_equals_single_clip_hf_gelu,
    batched_equals_single_clip_open_clip,
    batched_equals_single_dinov2_reg_hf,
    batched_equals_single_siglip_hf,
    batched_equals_single_vit_hf_classifier,
    batched_equals_single_vit_timm_reg,
);

/// The byte-buffer entry point gives exactly what the file entry point gives.
#[test]
fn decode_image_equals_load_image() {
    let enc = load(&fixture_dir("clip_hf_gelu"));
    let path = photo("rocket.jpg");
    let a = enc.load_image(&path).unwrap();
    let b = enc
        .decode_image(&std::fs::read(&path).unwrap(), "rocket.jpg")
        .unwrap();
    assert_eq!((a.height, a.width), (b.height, b.width));
    assert!(a.data == b.data, "decode_image differs from load_image");
}

/// Text on an image-only model and empty label lists are typed errors, not panics.
#[test]
fn text_on_image_only_model_and_empty_labels_are_errors() {
    let enc = load(&fixture_dir("dinov2_hf"));
    assert!(!enc.has_text());
    let err = enc
        .encode_texts(&["a cat"])
        .expect_err("dinov2 has no text tower");
    assert!(matches!(err, visenc::Error::NoTextTower { .. }), "{err}");
    assert!(
        err.to_string().contains("dinov2_hf"),
        "error should name the model: {err}"
    );

    let clip = load(&fixture_dir("clip_hf_gelu"));
    let px = clip.load_image(&photo("chelsea.png")).unwrap();
    let f = clip
        .encode_pixels(&[px], &EncodeOptions::default())
        .unwrap();
    for labels in [&[][..], &["", "  "][..]] {
        let err = clip
            .zero_shot(f.embedding(), labels, "{}")
            .expect_err("empty labels");
        assert!(
            matches!(err, visenc::Error::EmptyLabels),
            "{labels:?}: {err}"
        );
    }
    assert!(
        clip.encode_pixels(&[], &EncodeOptions::default()).is_err(),
        "empty batch"
    );
}

/// A timm classifier's class names: timm writes `label_names` at the top level of the hub
/// `config.json` (timm/models/_hub.py `save_config_for_hf`) and moves it into `pretrained_cfg` only when
/// loading (`load_model_config_from_hf`), so the file on disk has it at the top level.
#[test]
fn timm_classifier_names_come_from_top_level_label_names() {
    let dir = fixture_dir("vit_timm");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let want: Vec<String> =
        serde_json::from_value(cfg["label_names"].clone()).expect("top-level label_names");
    assert_eq!(load(&dir).info().labels.as_ref(), Some(&want));
}
