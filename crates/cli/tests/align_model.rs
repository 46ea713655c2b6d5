//! The real offline alignment as a text-image model: `visenc train align` trains a projection from
//! all-MiniLM-L6-v2 sentence embeddings of ImageNet class prompts to EfficientNet-Lite0's classifier
//! vectors and writes a two-tower model directory; that directory then works wherever CLIP does
//! (`classify --labels`, `index` + `search`, `serve`). The towers' outputs are checked against the
//! reference computations stored by scripts/fixtures (PyTorch Lite0 pooled features,
//! sentence-transformers MiniLM embeddings); the outcomes against the photos' true contents. Needs the
//! real assets (`scripts/fetch-assets.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine;
use candle_core::{Device, Tensor};
use common::*;
use serde_json::json;

fn asset(rel: &str) -> String {
    let p = root().join("assets").join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-assets.sh from the repository root first",
        p.display()
    );
    p.display().to_string()
}

fn lite0() -> String {
    asset("weights/efficientnet-lite0-57934424.pth")
}

fn minilm() -> String {
    asset("minilm")
}

/// A fresh directory under the target's scratch space (kept after the run for inspection).
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("align_model")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What the one training run of this test binary printed, and the model directory it wrote.
struct Trained {
    dir: String,
    stdout: String,
}

/// Trains the alignment once for all tests: the README recipe with fewer steps (the full 300 give
/// the README's numbers; 150 already separate the photos' classes).
fn trained() -> &'static Trained {
    static T: OnceLock<Trained> = OnceLock::new();
    T.get_or_init(|| {
        let dir = scratch("model").join("lite0-minilm");
        let run = align(&dir, &[]);
        run.expect_code(0);
        Trained {
            dir: dir.display().to_string(),
            stdout: run.stdout.clone(),
        }
    })
}

/// `visenc train align` with the README recipe at 150 steps into `out`, plus `extra` arguments.
fn align(out: &Path, extra: &[&str]) -> Run {
    let (text, image, names) = (minilm(), lite0(), asset("weights/imagenet_classes.txt"));
    let mut args = vec![
        "train",
        "align",
        "-q",
        "--text-model",
        &text,
        "--image-model",
        &image,
        "--class-names",
        &names,
        "--steps",
        "150",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    visenc(&args)
}

/// The number after `label` in `text` (e.g. "top-5 0.650").
fn number_after(text: &str, label: &str) -> f64 {
    let rest = &text[text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {text}"))
        + label.len()..];
    rest.trim_start()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {text}"))
}

#[test]
fn train_align_writes_a_two_tower_directory_that_generalises_to_held_out_classes() {
    let t = trained();
    let held = t
        .stdout
        .lines()
        .find(|l| l.starts_with("held-out"))
        .unwrap_or_else(|| panic!("no held-out line:\n{}", t.stdout));
    // Chance among the 100 held-out classes is 0.01 / 0.05.
    let (top1, top5) = (number_after(held, "top-1"), number_after(held, "top-5"));
    assert!(top1 >= 0.15 && top5 >= 0.35, "{held}");
    let dir = Path::new(&t.dir);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "visenc_two_tower");
    for (key, want) in [("image_tower", lite0()), ("text_tower", minilm())] {
        let got = Path::new(cfg[key].as_str().unwrap());
        assert!(got.is_absolute(), "{key}: {got:?}");
        assert_eq!(got, std::fs::canonicalize(want).unwrap(), "{key}");
    }
    assert!(dir.join("projection.safetensors").is_file());
    // It loads through the normal path, with both towers and the learnt scale.
    let enc = visenc::Encoder::load(&t.dir, &Default::default()).unwrap();
    assert!(enc.has_text());
    assert_eq!(enc.info().projection_dim, Some(1280));
    assert!(matches!(
        enc.info().scoring,
        Some(visenc::Scoring::Softmax { .. })
    ));
}

#[test]
fn zero_shot_classify_picks_the_cat_and_the_coffee() {
    let t = trained();
    let labels = "dog,cat,cup of coffee,rocket,motorcycle,astronaut";
    let run = visenc(&[
        "classify",
        "-q",
        "--json",
        "--top",
        "6",
        "--model",
        &t.dir,
        "--labels",
        labels,
        &photo("chelsea.png"),
        &photo("coffee.png"),
    ]);
    run.expect_code(0);
    let rows = run.json_lines();
    let top = |r: &serde_json::Value| r["top"][0]["label"].as_str().unwrap().to_string();
    assert_eq!(top(&rows[0]), "cat", "chelsea.png: {}", rows[0]);
    assert_eq!(top(&rows[1]), "cup of coffee", "coffee.png: {}", rows[1]);
    let sum: f64 = rows[0]["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["probability"].as_f64().unwrap())
        .sum();
    assert!(
        (sum - 1.0).abs() < 1e-4,
        "a softmax over the 6 labels: {sum}"
    );
}

/// An index of the real photos (scikit-image's and matplotlib's) built with the aligned model.
fn photo_index(name: &str) -> String {
    let db = scratch(name).join("photos.db").display().to_string();
    visenc(&[
        "index",
        "-q",
        &root().join("assets/photos").display().to_string(),
        "--model",
        &trained().dir,
        "--db",
        &db,
    ])
    .expect_code(0);
    db
}

#[test]
fn search_a_cup_of_coffee_finds_coffee_png_first() {
    let db = photo_index("search");
    let run = visenc(&["search", "--db", &db, "--json", "a cup of coffee"]);
    run.expect_code(0);
    let hits = run.json_lines();
    assert_eq!(hits.len(), 6, "every photo is indexed: {}", run.stdout);
    let first = hits[0]["path"].as_str().unwrap();
    assert!(first.ends_with("coffee.png"), "{}", run.stdout);
}

/// The reference computations: PyTorch Lite0 pooled features, sentence-transformers MiniLM inputs.
fn reference(file: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(root().join(file), &Device::Cpu).unwrap()
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = norm(v);
    v.iter().map(|x| x / n).collect()
}

fn data_url(path: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap());
    format!("data:image/png;base64,{b64}")
}

#[test]
fn serve_answers_embeddings_classify_and_search_with_the_aligned_pair() {
    let t = trained();
    let db = photo_index("serve");
    let s = Serve::start(&["--model", &t.dir, "--db", &db]);
    let mut c = s.client();

    // Image embeddings are Lite0's pooled features (what its classifier scores).
    let r = c
        .post_json(
            "/v1/embeddings",
            &json!({"input": [data_url(&photo("chelsea.png"))], "modality": "image"}),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let image = f32_vec(&r.json().unwrap()["data"][0]["embedding"]);
    let lite0_ref = reference("fixtures/families/efficientnet_lite0_real.safetensors");
    let pooled: Vec<f32> = lite0_ref["chelsea_pooled"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(image.len(), 1280);
    let d = max_abs_diff(&unit(&image), &unit(&pooled));
    assert!(d <= 1e-4, "image embedding vs PyTorch pooled: {d:e}");

    // Text embeddings are the projection of MiniLM's normalised sentence embedding.
    let bert_ref = reference("fixtures/bert/minilm_expected.safetensors");
    let sentence = bert_ref["embeddings"].narrow(0, 0, 1).unwrap(); // "a cup of coffee"
    let sentence = (&sentence
        / sentence
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64)
        .unwrap();
    let proj = candle_core::safetensors::load(
        Path::new(&t.dir).join("projection.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let want: Vec<f32> = sentence
        .matmul(&proj["text_projection"].t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let r = c
        .post_json(
            "/v1/embeddings",
            &json!({"input": ["a cup of coffee", "a rocket"]}),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let data = r.json().unwrap()["data"].clone();
    let coffee_text = f32_vec(&data[0]["embedding"]);
    let d = max_abs_diff(&unit(&coffee_text), &unit(&want));
    assert!(d <= 1e-4, "text embedding vs projected reference: {d:e}");
    // And they meet in one space: the cat photo is nearer a cat prompt than a rocket prompt.
    let rocket_text = f32_vec(&data[1]["embedding"]);
    let r = c
        .post_json("/v1/embeddings", &json!({"input": ["a photo of a cat."]}))
        .unwrap();
    let cat_text = f32_vec(&r.json().unwrap()["data"][0]["embedding"]);
    assert!(
        cosine(&image, &cat_text) > cosine(&image, &rocket_text),
        "cat photo: cat {} vs rocket {}",
        cosine(&image, &cat_text),
        cosine(&image, &rocket_text)
    );

    let r = c
        .post_json(
            "/classify",
            &json!({"input": data_url(&photo("chelsea.png")), "labels": ["dog", "cat", "cup of coffee", "rocket"]}),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json().unwrap()["data"][0]["labels"][0]["label"],
        "cat",
        "{}",
        r.text()
    );

    let r = c
        .post_json("/search", &json!({"text": "a cup of coffee", "k": 3}))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let first = r.json().unwrap()["results"][0]["path"].clone();
    assert!(
        first.as_str().unwrap().ends_with("coffee.png"),
        "{}",
        r.text()
    );
}

/// A hand-made two-tower directory: `config` as config.json, and a projection with the given shape.
fn two_tower_dir(
    name: &str,
    config: serde_json::Value,
    projection: Option<(usize, usize)>,
) -> String {
    let d = scratch(name);
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    if let Some(shape) = projection {
        let dev = Device::Cpu;
        let tensors = [
            (
                "text_projection",
                Tensor::zeros(shape, candle_core::DType::F32, &dev).unwrap(),
            ),
            ("logit_scale", Tensor::new(2.0f32, &dev).unwrap()),
        ];
        candle_core::safetensors::save(
            &tensors
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            d.join("projection.safetensors"),
        )
        .unwrap();
    }
    d.display().to_string()
}

/// `visenc classify --labels` with `model`: refused (exit 2) naming every part of `expect`.
fn refused(model: &str, expect: &[&str]) {
    let run = visenc(&[
        "classify",
        "--model",
        model,
        "--labels",
        "cat,dog",
        &photo("chelsea.png"),
    ]);
    run.expect_code(2);
    for e in expect {
        assert!(run.stderr.contains(e), "{e:?} not in:\n{}", run.stderr);
    }
}

#[test]
fn bad_two_tower_directories_are_refused_naming_the_file() {
    let cfg = |image: &str, text: &str| json!({"model_type": "visenc_two_tower", "image_tower": image, "text_tower": text});
    // A tower that is not there: config.json, the key and the path are named.
    let d = two_tower_dir(
        "missing_tower",
        cfg("/nonexistent/lite0.pth", &minilm()),
        Some((1280, 384)),
    );
    refused(
        &d,
        &["config.json", "image_tower", "/nonexistent/lite0.pth"],
    );
    // A projection that fits neither the image tower's width nor the text tower's.
    let d = two_tower_dir("wrong_shape", cfg(&lite0(), &minilm()), Some((1000, 384)));
    refused(
        &d,
        &["projection.safetensors", "[1000, 384]", "[1280, 384]"],
    );
    let d = two_tower_dir(
        "wrong_text_dim",
        cfg(&lite0(), &minilm()),
        Some((1280, 512)),
    );
    refused(&d, &["projection.safetensors", "[1280, 384]"]);
    // No projection file at all.
    let d = two_tower_dir("no_projection", cfg(&lite0(), &minilm()), None);
    refused(&d, &["projection.safetensors", "missing"]);
    // An image model as the text tower.
    let d = two_tower_dir("image_as_text", cfg(&lite0(), &lite0()), Some((1280, 384)));
    refused(&d, &["text tower", "efficientnet-lite0-57934424.pth"]);
    // A misspelt key.
    let mut c = cfg(&lite0(), &minilm());
    c["text_towr"] = json!("x");
    let d = two_tower_dir("typo", c, Some((1280, 384)));
    refused(&d, &["config.json", "text_towr"]);
    // A sentence encoder alone has no image tower.
    refused(&minilm(), &["no image tower", "two-tower"]);
}

#[test]
fn train_align_never_overwrites_another_models_directory() {
    let d = scratch("occupied");
    let cfg = r#"{"model_type": "bert"}"#;
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let run = visenc(&[
        "train",
        "align",
        "--text-model",
        &minilm(),
        "--image-model",
        &lite0(),
        "--class-names",
        &asset("weights/imagenet_classes.txt"),
        "--out",
        d.to_str().unwrap(),
    ]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("another model's config.json"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read_to_string(d.join("config.json")).unwrap(), cfg);
    assert!(!d.join("projection.safetensors").exists());
}

/// Stopped at step 100 and resumed, the alignment ends with the uninterrupted run's projection and
/// numbers; a resume with other settings is refused naming them.
#[test]
fn train_align_stops_and_resumes_to_the_uninterrupted_result() {
    let t = trained();
    let dir = scratch("resume").join("model");
    let stop = align(&dir, &["--stop-at", "100", "--save-every", "40"]);
    stop.expect_code(0);
    assert!(
        stop.stdout.contains("stopped after step 100"),
        "{}",
        stop.stdout
    );
    assert!(dir.join("align_state.safetensors").is_file());
    assert!(
        !dir.join("config.json").exists(),
        "no model before the run ends"
    );
    let other = align(&dir, &["--resume", "--lr", "0.01"]);
    other.expect_code(2);
    assert!(other.stderr.contains("lr"), "{}", other.stderr);
    let resumed = align(&dir, &["--resume"]);
    resumed.expect_code(0);
    let held = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("held-out"))
            .map(str::to_string)
    };
    assert_eq!(held(&resumed.stdout), held(&t.stdout));
    let projection = |d: &Path| {
        candle_core::safetensors::load(d.join("projection.safetensors"), &Device::Cpu).unwrap()
            ["text_projection"]
            .clone()
    };
    let diff = (projection(&dir) - projection(Path::new(&t.dir)))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff <= 1e-6, "max |resumed - straight| = {diff}");
}
