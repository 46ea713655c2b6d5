//! `visenc classify`, `similarity` and `info`, and the usage errors around them: zero-shot probabilities
//! as the reference computes them (softmax for CLIP, sigmoid for SigLIP), a classifier head with its
//! checkpoint's class names, cosine similarities, model descriptions, and clear errors (exit 2) for
//! requests that cannot work.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{fixture, photo, visenc};
use visenc::{EncodeOptions, Encoder, LoadOptions};

fn library(model: &str) -> Encoder {
    Encoder::load(&fixture(model), &LoadOptions::default()).unwrap()
}

/// What the library gives for one photo: (zero-shot probabilities, cosine similarities).
fn library_scores(
    model: &str,
    photo_path: &str,
    labels: &[&str],
    template: &str,
) -> (Vec<f32>, Vec<f32>) {
    let enc = library(model);
    let px = enc.load_image(photo_path.as_ref()).unwrap();
    let f = enc.encode_pixels(&[px], &EncodeOptions::default()).unwrap();
    let probs = enc.zero_shot(f.embedding(), labels, template).unwrap();
    let sims = enc.similarity(f.embedding(), labels).unwrap();
    let v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (v(probs), v(sims))
}

/// label -> probability from one `classify --json` line, checking the listing is sorted.
fn top(row: &serde_json::Value) -> HashMap<String, f32> {
    let list = row["top"].as_array().expect("top list");
    let probs: Vec<f32> = list
        .iter()
        .map(|t| t["probability"].as_f64().unwrap() as f32)
        .collect();
    assert!(
        probs.windows(2).all(|w| w[0] >= w[1]),
        "top must be sorted by probability: {probs:?}"
    );
    list.iter()
        .map(|t| {
            (
                t["label"].as_str().unwrap().to_string(),
                t["probability"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

#[test]
fn classify_clip_labels_gives_softmax_probabilities_summing_to_one() {
    let labels = ["cat", "dog", "rocket", "cup of coffee"];
    let photos = [photo("chelsea.png"), photo("rocket.jpg")];
    let model = fixture("clip_hf_gelu");
    let joined = labels.join(",");
    let run = visenc(&[
        "classify", "-q", "--json", "--top", "10", "-m", &model, "--labels", &joined, &photos[0],
        &photos[1],
    ]);
    run.expect_code(0);
    let rows = run.json_lines();
    assert_eq!(rows.len(), 2);
    for (row, p) in rows.iter().zip(&photos) {
        assert_eq!(row["path"], p.as_str());
        let got = top(row);
        assert_eq!(
            got.len(),
            labels.len(),
            "every label is listed with --top 10"
        );
        let sum: f32 = got.values().sum();
        assert!((sum - 1.0).abs() < 1e-5, "CLIP probabilities sum to {sum}");
        let (want, _) = library_scores("clip_hf_gelu", p, &labels, "a photo of a {}.");
        for (l, w) in labels.iter().zip(want) {
            assert!(
                (got[*l] - w).abs() < 1e-6,
                "{p} {l}: {} vs library {w}",
                got[*l]
            );
        }
    }
}

#[test]
fn classify_siglip_labels_gives_independent_sigmoids() {
    let labels = ["cat", "rocket", "astronaut"];
    let p = photo("astronaut.png");
    let joined = labels.join(",");
    let run = visenc(&[
        "classify",
        "-q",
        "--json",
        "-m",
        &fixture("siglip_hf"),
        "--labels",
        &joined,
        "--template",
        "{}",
        &p,
    ]);
    run.expect_code(0);
    let got = top(&run.json_lines()[0]);
    let (want, sims) = library_scores("siglip_hf", &p, &labels, "{}");
    for ((l, w), s) in labels.iter().zip(&want).zip(&sims) {
        // sigmoid(exp(logit_scale) * cos + logit_bias), logit_scale = ln 10, logit_bias = -2.5 in this fixture.
        let sigmoid = 1.0 / (1.0 + (-(10.0 * s - 2.5)).exp());
        assert!(
            (w - sigmoid).abs() < 1e-5,
            "{l}: library {w} vs sigmoid of its cosine {sigmoid}"
        );
        assert!(
            (got[*l] - w).abs() < 1e-6,
            "{l}: {} vs library {w}",
            got[*l]
        );
    }
    let sum: f32 = got.values().sum();
    assert!(
        (sum - 1.0).abs() > 1e-3,
        "SigLIP probabilities are not normalised over labels (sum {sum})"
    );
}

#[test]
fn classify_vit_head_uses_id2label_and_matches_the_reference_logits() {
    let p = photo("chelsea.png");
    let run = visenc(&[
        "classify",
        "-q",
        "--json",
        "-m",
        &fixture("vit_hf_classifier"),
        &p,
    ]);
    run.expect_code(0);
    let got = top(&run.json_lines()[0]);
    // id2label of config.json, all five listed by the default --top 5.
    let names = [
        "tabby cat",
        "golden retriever",
        "espresso",
        "space shuttle",
        "motor scooter",
    ];
    let mut listed: Vec<&str> = got.keys().map(String::as_str).collect();
    listed.sort();
    let mut want_names = names.to_vec();
    want_names.sort();
    assert_eq!(listed, want_names);
    // softmax of the reference's logits for this photo (PIL backend), within the photo tolerance.
    let path = common::root().join("fixtures/models/vit_hf_classifier/expected.safetensors");
    let e = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let logits: Vec<f32> = e["photo_pil_logits"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let m = logits.iter().fold(f32::MIN, |a, &b| a.max(b));
    let ex: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
    let z: f32 = ex.iter().sum();
    for (name, e) in names.iter().zip(ex) {
        assert!(
            (got[*name] - e / z).abs() < 1e-3,
            "{name}: {} vs reference {}",
            got[*name],
            e / z
        );
    }
    assert!((got.values().sum::<f32>() - 1.0).abs() < 1e-5);
}

#[test]
fn classify_text_output_lists_top_n_per_image() {
    let (a, b) = (photo("coffee.png"), photo("motorcycle_left.png"));
    let run = visenc(&[
        "classify",
        "-q",
        "--top",
        "2",
        "-m",
        &fixture("vit_hf_classifier"),
        &a,
        &b,
    ]);
    run.expect_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    for (line, p) in lines.iter().zip([&a, &b]) {
        let (path, rest) = line.split_once('\t').expect("path<TAB>classes");
        assert_eq!(path, p.as_str());
        assert_eq!(rest.split(", ").count(), 2, "--top 2: {rest}");
    }
}

#[test]
fn similarity_prints_one_cosine_column_per_text() {
    let texts = ["a photo of a cat", "a rocket"];
    let photos = [photo("chelsea.png"), photo("rocket.jpg")];
    let run = visenc(&[
        "similarity",
        "-q",
        "-m",
        &fixture("clip_hf_quickgelu"),
        "--text",
        texts[0],
        "--text",
        texts[1],
        &photos[0],
        &photos[1],
    ]);
    run.expect_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[0], format!("path\t{}\t{}", texts[0], texts[1]));
    assert_eq!(lines.len(), 3);
    for (line, p) in lines[1..].iter().zip(&photos) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols[0], p.as_str());
        let got: Vec<f32> = cols[1..].iter().map(|c| c.parse().unwrap()).collect();
        let (_, want) = library_scores("clip_hf_quickgelu", p, &texts, "{}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-6, "{p}: {g} vs library cosine {w}");
            assert!((-1.0..=1.0).contains(g));
        }
    }
}

#[test]
fn info_describes_the_model_in_text_and_json() {
    let run = visenc(&["info", "-m", &fixture("clip_hf_gelu")]);
    run.expect_code(0);
    for needle in [
        "CLIPModel",
        "48x48, patch 16",
        "projection     16",
        "softmax",
    ] {
        assert!(
            run.stdout.contains(needle),
            "info lacks {needle:?}:\n{}",
            run.stdout
        );
    }

    let json = |model: &str| -> serde_json::Value {
        let run = visenc(&["info", "--json", "-m", &fixture(model)]);
        run.expect_code(0);
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("info --json is not JSON ({e}):\n{}", run.stdout))
    };
    let clip = json("clip_hf_gelu");
    assert_eq!(clip["info"]["family"], "clip");
    assert_eq!(clip["info"]["image_size"], serde_json::json!([48, 48]));
    assert_eq!(clip["info"]["projection_dim"], 16);
    assert_eq!(clip["info"]["text_context_length"], 77);
    assert_eq!(clip["info"]["scoring"]["kind"], "softmax");
    assert!(clip["preprocess"].is_object());

    let siglip = json("siglip_hf");
    assert_eq!(siglip["info"]["scoring"]["kind"], "sigmoid");
    assert_eq!(siglip["info"]["scoring"]["logit_bias"], -2.5);

    let vit = json("vit_hf_classifier");
    assert_eq!(
        vit["info"]["labels"],
        serde_json::json!([
            "tabby cat",
            "golden retriever",
            "espresso",
            "space shuttle",
            "motor scooter"
        ])
    );
    assert!(vit["info"]["scoring"].is_null());

    let dino = json("dinov2_reg_hf");
    assert_eq!(dino["info"]["prefix_tokens"], 5, "CLS + 4 registers");
    assert!(dino["info"]["parameters"].as_u64().unwrap() > 0);
}

#[test]
fn empty_labels_are_a_usage_error() {
    for labels in ["", " , ,"] {
        let run = visenc(&[
            "classify",
            "-q",
            "-m",
            &fixture("clip_hf_gelu"),
            "--labels",
            labels,
            &photo("chelsea.png"),
        ]);
        run.expect_code(2);
        assert!(
            run.stderr.contains("--labels"),
            "{labels:?}: {}",
            run.stderr
        );
        assert!(run.stdout.is_empty());
    }
}

#[test]
fn labels_on_a_model_without_text_tower_are_a_clear_error() {
    for model in ["dinov2_hf", "vit_hf_classifier", "vit_timm"] {
        let m = fixture(model);
        let run = visenc(&[
            "classify",
            "-q",
            "-m",
            &m,
            "--labels",
            "cat,dog",
            &photo("chelsea.png"),
        ]);
        run.expect_code(2);
        assert!(
            run.stderr.contains(&m) && run.stderr.contains("text tower"),
            "{model}: {}",
            run.stderr
        );
        assert!(run.stdout.is_empty());
        // Only a model whose head has class names may be pointed at that head.
        let has_named_head = model != "dinov2_hf";
        assert_eq!(
            run.stderr.contains("classifier head"),
            has_named_head,
            "{model}: {}",
            run.stderr
        );
    }
    let m = fixture("dinov2_hf");
    let run = visenc(&[
        "similarity",
        "-q",
        "-m",
        &m,
        "--text",
        "a cat",
        &photo("chelsea.png"),
    ]);
    run.expect_code(2);
    assert!(run.stderr.contains("text tower"), "{}", run.stderr);
}

/// Without --labels, a model with no classifier head (DINOv2) or a zero-shot model (CLIP) must say
/// what to pass instead.
#[test]
fn classify_without_labels_or_head_says_what_to_pass() {
    let run = visenc(&[
        "classify",
        "-q",
        "-m",
        &fixture("dinov2_hf"),
        &photo("chelsea.png"),
    ]);
    run.expect_code(2);
    assert!(run.stderr.contains("--labels"), "{}", run.stderr);
    let run = visenc(&[
        "classify",
        "-q",
        "-m",
        &fixture("clip_hf_gelu"),
        &photo("chelsea.png"),
    ]);
    run.expect_code(2);
    assert!(run.stderr.contains("--labels"), "{}", run.stderr);
}

#[test]
fn a_model_that_cannot_be_found_is_a_clear_error() {
    let run = visenc(&["info", "-m", "/no/such/model/dir"]);
    run.expect_code(2);
    assert!(run.stderr.contains("/no/such/model/dir"), "{}", run.stderr);
    let run = visenc(&[
        "embed",
        "-q",
        "-m",
        "/no/such/model/dir",
        &photo("chelsea.png"),
    ]);
    run.expect_code(2);
    assert!(run.stdout.is_empty());
}

/// A checkpoint missing a tensor: strict by default (exit 2, the tensor named, the way out given);
/// `--allow-mismatch` loads it with a warning naming the tensor.
#[test]
fn mismatched_checkpoint_fails_unless_allow_mismatch_and_then_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::root().join("fixtures/models/vit_hf_classifier");
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let removed = "vit.encoder.layer.0.attention.attention.key.weight";
    assert!(tensors.remove(removed).is_some());
    candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors")).unwrap();
    let m = tmp.path().display().to_string();

    let run = visenc(&["info", "-m", &m]);
    run.expect_code(2);
    assert!(
        run.stderr.contains(removed) && run.stderr.contains("--allow-mismatch"),
        "{}",
        run.stderr
    );

    let run = visenc(&[
        "classify",
        "-q",
        "--json",
        "--allow-mismatch",
        "-m",
        &m,
        &photo("chelsea.png"),
    ]);
    run.expect_code(0);
    assert!(
        run.stderr.contains("warning") && run.stderr.contains(removed),
        "{}",
        run.stderr
    );
    assert_eq!(run.json_lines().len(), 1);
}

/// Regression: `visenc info | head` (or any command whose reader exits early) panicked with "failed
/// printing to stdout: Broken pipe". A closed stdout must end the run quietly.
#[test]
fn closed_stdout_ends_quietly_without_panic() {
    use std::process::{Command, Stdio};
    let photos = [
        photo("chelsea.png"),
        photo("coffee.png"),
        photo("rocket.jpg"),
    ];
    let cases: Vec<Vec<String>> = vec![
        vec![
            "info".into(),
            "--json".into(),
            "-m".into(),
            fixture("clip_hf_gelu"),
        ],
        vec!["info".into(), "-m".into(), fixture("clip_hf_gelu")],
        vec![
            "classify".into(),
            "-q".into(),
            "-m".into(),
            fixture("vit_hf_classifier"),
        ],
        vec![
            "similarity".into(),
            "-q".into(),
            "-m".into(),
            fixture("siglip_hf"),
            "--text".into(),
            "a cat".into(),
        ],
        vec![
            "embed".into(),
            "-q".into(),
            "--tokens".into(),
            "-m".into(),
            fixture("dinov2_reg_hf"),
        ],
    ];
    for mut args in cases {
        if args[0] != "info" {
            args.extend(photos.iter().cloned());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_visenc"))
            .args(&args)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the model has loaded: every write then fails with EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("error"),
            "{args:?}: a closed pipe is not an error to report: {stderr}"
        );
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
}
