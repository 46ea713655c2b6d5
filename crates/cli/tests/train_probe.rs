//! `visenc train probe` end to end with the real EfficientNet-Lite0 (fetched by scripts/fetch-assets.sh):
//! a probe on two classes of generated images (warm vs cool colours, varied stripes), its head used by
//! `visenc classify --head`, and the data it must refuse.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, png, root, visenc};

fn lite0() -> String {
    let p = root().join("assets/weights/efficientnet-lite0-57934424.pth");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-assets.sh first",
        p.display()
    );
    p.display().to_string()
}

/// Stripes of period `period` in two shades of `base`.
fn stripes(base: [u8; 3], period: u32) -> Vec<u8> {
    png(48, 40, move |x, y| {
        let k = if ((x + y) / period).is_multiple_of(2) {
            0
        } else {
            60
        };
        base.map(|c| c.saturating_sub(k))
    })
}

fn dataset(dir: &Path, classes: &[(&str, [u8; 3])], per_class: u32) {
    for (name, base) in classes {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            std::fs::write(d.join(format!("{i}.png")), stripes(*base, 4 + i % 3)).unwrap();
        }
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("visenc-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn probe_trains_reports_and_its_head_classifies() {
    let dir = tmp("probe");
    let data = dir.join("data");
    dataset(
        &data,
        &[("warm", [250, 120, 30]), ("cool", [30, 110, 250])],
        8,
    );
    let head = dir.join("head.safetensors");
    let model = lite0();
    let run = visenc(&[
        "train",
        "probe",
        "--model",
        &model,
        "--data",
        data.to_str().unwrap(),
        "--val",
        "0.25",
        "--out",
        head.to_str().unwrap(),
        "--quiet",
    ]);
    run.expect_code(0);
    assert!(
        run.stdout
            .contains("16 images, 2 classes, 1280-d embeddings"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("train accuracy      1.0000 (12 images)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("validation accuracy 1.0000 (4 images)"),
        "{}",
        run.stdout
    );
    // A new image of each class, not seen in training.
    std::fs::write(dir.join("new_warm.png"), stripes([240, 140, 40], 5)).unwrap();
    std::fs::write(dir.join("new_cool.png"), stripes([40, 120, 240], 5)).unwrap();
    let run = visenc(&[
        "classify",
        "--model",
        &model,
        "--head",
        head.to_str().unwrap(),
        "--top",
        "1",
        "--json",
        dir.join("new_cool.png").to_str().unwrap(),
        dir.join("new_warm.png").to_str().unwrap(),
    ]);
    run.expect_code(0);
    let top: Vec<String> = run
        .json_lines()
        .iter()
        .map(|l| l["top"][0]["label"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(top, ["cool", "warm"]);
    // The same head on a model with other embeddings is refused before any image is read.
    let run = visenc(&[
        "classify",
        "--model",
        &fixture("vit_hf_classifier"),
        "--head",
        head.to_str().unwrap(),
        dir.join("new_cool.png").to_str().unwrap(),
    ]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("the head takes 1280-d embeddings"),
        "{}",
        run.stderr
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn probe_refuses_one_class_and_unreadable_images() {
    let dir = tmp("refuse");
    let one = dir.join("one");
    dataset(&one, &[("warm", [250, 120, 30])], 3);
    let run = visenc(&[
        "train",
        "probe",
        "--model",
        &lite0(),
        "--data",
        one.to_str().unwrap(),
    ]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("at least two classes") && run.stderr.contains("warm"),
        "{}",
        run.stderr
    );

    let bad = dir.join("bad");
    dataset(
        &bad,
        &[("warm", [250, 120, 30]), ("cool", [30, 110, 250])],
        2,
    );
    std::fs::write(bad.join("cool/broken.png"), b"not a png").unwrap();
    let csv = dir.join("set.csv");
    std::fs::write(
        &csv,
        "path,label\nbad/warm/0.png,warm\nbad/cool/broken.png,cool\nbad/cool/0.png,cool\n",
    )
    .unwrap();
    for data in [&bad, &csv] {
        let run = visenc(&[
            "train",
            "probe",
            "--model",
            &lite0(),
            "--data",
            data.to_str().unwrap(),
            "-q",
        ]);
        run.expect_code(2);
        assert!(
            run.stderr.contains("could not be used") && run.stderr.contains("broken.png"),
            "{}",
            run.stderr
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
