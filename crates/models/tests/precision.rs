//! bf16 and int8 linear layers (and, under bf16, the CNNs' dense convolutions) against the
//! reference's f32 outputs on the tiny fixtures (random weights, random pixels and one real photo),
//! with tolerances from the error analysis below rather than from our own output.
//!
//! Error model: a linear layer's output error relative to its typical magnitude is about the
//! relative RMS error of the rounded operands (products of independent rounding errors add like a
//! random walk, as the products themselves do). bf16 keeps 8 significant bits: RMS rounding error
//! 2^-8/sqrt(3) ≈ 0.23 % per operand, ≈ 0.3 % per product. int8 per-channel weights and per-row uint8
//! activations: step = range/254 (or /255); a row of Gaussian-like values spans ~5-6 standard
//! deviations, so the RMS error is ~ 6/255/sqrt(12) ≈ 0.7 % per operand, ≈ 1 % per product. The
//! fixtures chain up to ~14 linears (2 layers x 6, pooling head, projection); with residual
//! connections the errors add roughly in quadrature: ~1.2 % (bf16) and ~4 % (int8) relative RMS at
//! the output, i.e. cosine ≳ 1 - 0.012²/2 ≈ 0.9999 and 1 - 0.04²/2 ≈ 0.999. The bounds leave a
//! factor of ~10 in 1 - cosine (int8: the 0.995), and 2.5x on the worst element.

use candle_core::{DType, Tensor, D};
use visenc_models::{EncodeOptions, Precision};

mod common;

use common::{load_fixture_in, Fixture};

/// Smallest cosine of any output row to the reference's, bf16.
const BF16_MIN_COSINE: f64 = 0.999;
/// Largest max|ours - reference| / max|reference| of an output, bf16.
const BF16_MAX_REL: f32 = 0.03;
/// Smallest cosine of any output row to the reference's, int8 (the criterion).
const INT8_MIN_COSINE: f64 = 0.995;
/// Largest max|ours - reference| / max|reference| of an output, int8.
const INT8_MAX_REL: f32 = 0.1;

fn bounds(p: Precision) -> (f64, f32) {
    match p {
        Precision::Bf16 => (BF16_MIN_COSINE, BF16_MAX_REL),
        Precision::Int8 => (INT8_MIN_COSINE, INT8_MAX_REL),
        Precision::F32 => unreachable!("f32 is checked by parity.rs"),
    }
}

fn min_row_cosine(x: &Tensor, y: &Tensor) -> f64 {
    let (x, y) = (
        x.flatten_from(1).unwrap().to_dtype(DType::F64).unwrap(),
        y.flatten_from(1).unwrap().to_dtype(DType::F64).unwrap(),
    );
    let dot = (&x * &y).unwrap().sum(D::Minus1).unwrap();
    let nx = x.sqr().unwrap().sum(D::Minus1).unwrap().sqrt().unwrap();
    let ny = y.sqr().unwrap().sum(D::Minus1).unwrap().sqrt().unwrap();
    let cos: Vec<f64> = (dot / (nx * ny).unwrap()).unwrap().to_vec1().unwrap();
    cos.into_iter().fold(f64::INFINITY, f64::min)
}

fn check(f: &Fixture, p: Precision, what: &str, ours: &Tensor, key: &str) {
    let (min_cos, max_rel) = bounds(p);
    let reference = f.get(key);
    let cos = min_row_cosine(ours, reference);
    let rel = common::rel_err(ours, reference);
    assert!(
        cos >= min_cos && rel <= max_rel,
        "{} {p}: {what} vs {key}: cosine {cos:.6} (bound {min_cos}), relative error {rel:.4} (bound {max_rel})",
        f.name
    );
}

/// Pooled / projected / logits at the trained size, the other size and on the real photo; text
/// embeddings where the model has a text tower.
fn check_fixture(name: &'static str) {
    check_fixture_in("models", name);
}

fn check_fixture_in(group: &str, name: &'static str) {
    for p in [Precision::Bf16, Precision::Int8] {
        let f = load_fixture_in(group, name, p);
        for prefix in ["", "alt_", "photo_"] {
            let Some(px) = f.expected.get(&format!("{prefix}pixel_values")) else {
                continue;
            };
            let out = f.model.image.encode(px, &EncodeOptions::default()).unwrap();
            check(&f, p, "pooled", &out.pooled, &format!("{prefix}pooled"));
            let key = format!("{prefix}image_embeds");
            if let (Some(e), true) = (&out.projected, f.expected.contains_key(&key)) {
                check(&f, p, "projected", e, &key);
            }
            let key = format!("{prefix}logits");
            if let (Some(l), true) = (&out.logits, f.expected.contains_key(&key)) {
                check(&f, p, "logits", l, &key);
            }
        }
        if let (Some(text), Some(ids)) = (&f.model.text, f.expected.get("input_ids")) {
            let ids = ids.to_dtype(DType::U32).unwrap();
            let mask = Tensor::ones_like(&ids).unwrap();
            let t = text.encode_text(&ids, &mask).unwrap();
            // SigLIP attends to its padding (see parity.rs): its reference is the unmasked run.
            let key = ["text_embeds_no_mask", "text_embeds"]
                .into_iter()
                .find(|k| f.expected.contains_key(*k))
                .unwrap();
            check(&f, p, "text embeds", &t.projected, key);
        }
    }
}

#[test]
fn clip_transformers() {
    check_fixture("clip_hf_quickgelu");
    check_fixture("clip_hf_gelu");
}

#[test]
fn clip_open_clip() {
    check_fixture("clip_open_clip");
}

#[test]
fn siglip_transformers() {
    check_fixture("siglip_hf");
}

#[test]
fn vit_transformers_and_timm() {
    check_fixture("vit_hf_classifier");
    check_fixture("vit_timm");
    check_fixture("vit_timm_reg");
}

#[test]
fn dinov2_transformers() {
    check_fixture("dinov2_hf");
    check_fixture("dinov2_reg_hf");
}

/// CNNs: under bf16 and int8 the dense convolutions run in that precision as well (depthwise ones stay
/// f32; ConvNeXt's are its Linear layers), within the same bounds. The pooled feature comes before
/// any classifier, so it differing from the f32 run shows the convolutions did run in low precision.
#[test]
fn cnn_families() {
    for name in [
        "resnet_timm",
        "resnet_hf",
        "efficientnet_timm",
        "convnext_timm",
    ] {
        check_fixture_in("families", name);
        let px = load_fixture_in("families", name, Precision::F32).expected["pixel_values"].clone();
        let run = |p| {
            let f = load_fixture_in("families", name, p);
            f.model
                .image
                .encode(&px, &EncodeOptions::default())
                .unwrap()
                .pooled
        };
        for p in [Precision::Bf16, Precision::Int8] {
            let diff = common::rel_err(&run(p), &run(Precision::F32));
            assert!(diff > 1e-6, "{name}: {p} pooled equals f32 (rel {diff})");
        }
    }
}
