//! The linear probe against scikit-learn on real embeddings (`fixtures/train/probe_lite0.safetensors`, made
//! by `scripts/fixtures/train_probe.py`: EfficientNet-Lite0 features of small random crops of the six photos
//! in assets/photos, labelled by photo). Same objective as `LogisticRegression(C=1)`, so the validation
//! accuracy must be within 1 point and the probabilities must agree.

use candle_core::{DType, Device, Tensor};
use visenc_train::probe::{self, LinearHead, ProbeConfig};

/// Largest absolute difference allowed between our validation probabilities and scikit-learn's: both
/// solvers stop near the same optimum of a strictly convex objective, not exactly on it.
const PROBA_TOL: f32 = 2e-3;

struct Fixture {
    x: Tensor,
    labels: Vec<u32>,
    train: Vec<usize>,
    val: Vec<usize>,
    classes: Vec<String>,
    sklearn_proba: Tensor,
    sklearn_accuracy: f64,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/train/probe_lite0.safetensors"
    );
    let bytes = std::fs::read(path).expect("fixtures/train/probe_lite0.safetensors");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let idx = |name: &str| -> Vec<usize> {
        t[name]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as usize)
            .collect()
    };
    Fixture {
        x: t["embeddings"].to_dtype(DType::F32).unwrap(),
        labels: idx("labels").into_iter().map(|v| v as u32).collect(),
        train: idx("train"),
        val: idx("val"),
        classes: serde_json::from_str(&meta["classes"]).unwrap(),
        sklearn_proba: t["sklearn_val_proba"].clone(),
        sklearn_accuracy: meta["sklearn_val_accuracy"].parse().unwrap(),
    }
}

fn rows(x: &Tensor, idx: &[usize]) -> Tensor {
    let i = Tensor::new(
        idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        x.device(),
    )
    .unwrap();
    x.index_select(&i, 0).unwrap()
}

#[test]
fn probe_matches_scikit_learn_logistic_regression_on_real_embeddings() {
    let f = fixture();
    let ytr: Vec<u32> = f.train.iter().map(|&i| f.labels[i]).collect();
    let yva: Vec<u32> = f.val.iter().map(|&i| f.labels[i]).collect();
    let (head, min) = probe::fit(
        &rows(&f.x, &f.train),
        &ytr,
        &f.classes,
        &ProbeConfig::default(),
        |_, _, _| {},
    )
    .unwrap();
    assert!(min.converged, "{min:?}");
    let xva = rows(&f.x, &f.val);
    let acc = head.accuracy(&xva, &yva).unwrap();
    eprintln!(
        "validation accuracy {acc:.4} (scikit-learn {:.4}), {} L-BFGS iterations",
        f.sklearn_accuracy, min.iterations
    );
    assert!(
        (acc - f.sklearn_accuracy).abs() <= 0.01,
        "validation accuracy {acc} vs scikit-learn {}",
        f.sklearn_accuracy
    );
    let proba = candle_nn::ops::softmax(&head.logits(&xva).unwrap(), 1).unwrap();
    let diff = (proba - &f.sklearn_proba)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap();
    let diff = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(
        diff <= PROBA_TOL,
        "probabilities differ from scikit-learn's by {diff}"
    );
}

#[test]
fn head_file_round_trips_and_refuses_other_files() {
    let f = fixture();
    let (head, _) = probe::fit(
        &f.x,
        &f.labels,
        &f.classes,
        &ProbeConfig::default(),
        |_, _, _| {},
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("visenc-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("head.safetensors");
    head.save(&path, &[("model", "lite0".into())]).unwrap();
    let (back, meta) = LinearHead::load(&path).unwrap();
    assert_eq!(back.classes, f.classes);
    assert_eq!(meta["model"], "lite0");
    assert_eq!(back.predict(&f.x).unwrap(), head.predict(&f.x).unwrap());
    let wrong = f.x.narrow(1, 0, 100).unwrap();
    let err = back.logits(&wrong).unwrap_err().to_string();
    assert!(
        err.contains("1280-d") && err.contains("[180, 100]"),
        "{err}"
    );
    let other = dir.join("other.safetensors");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/train/losses.safetensors"
        ),
        &other,
    )
    .unwrap();
    let err = LinearHead::load(&other).unwrap_err().to_string();
    assert!(
        err.contains("other.safetensors") && err.contains("visenc-linear-head"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_class_and_mismatched_labels_are_refused() {
    let f = fixture();
    let one = vec![2u32; 180];
    let err = probe::fit(
        &f.x,
        &one,
        &f.classes,
        &ProbeConfig::default(),
        |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("at least two classes") && err.contains("coffee"),
        "{err}"
    );
    let err = probe::fit(
        &f.x,
        &f.labels[..10],
        &f.classes,
        &ProbeConfig::default(),
        |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("180 embeddings but 10 labels"), "{err}");
}
