//! `visenc train finetune` end to end on the tiny ViT fixture and the real photos: progress, checkpoints,
//! stop and resume, the trained model in `visenc classify`, and the data it refuses.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, photo, visenc};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("visenc-finetune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Two classes of real photos, three each.
fn photos(dir: &Path) {
    for (class, files) in [
        (
            "animal",
            ["chelsea.png", "astronaut.png", "grace_hopper.jpg"],
        ),
        (
            "object",
            ["coffee.png", "rocket.jpg", "motorcycle_left.png"],
        ),
    ] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for f in files {
            std::fs::copy(photo(f), dir.join(class).join(f)).unwrap();
        }
    }
}

fn finetune(data: &Path, out: &Path, extra: &[&str]) -> common::Run {
    finetune_model("vit_hf_classifier", data, out, extra)
}

fn finetune_model(model: &str, data: &Path, out: &Path, extra: &[&str]) -> common::Run {
    let model = fixture(model);
    let mut args = vec![
        "train",
        "finetune",
        "--model",
        &model,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "2",
        "--batch",
        "2",
        "--lr",
        "1e-3",
        "--val",
        "0.34",
    ];
    args.extend_from_slice(extra);
    visenc(&args)
}

#[test]
fn finetune_reports_progress_resumes_and_its_model_classifies() {
    let dir = tmp("run");
    let data = dir.join("data");
    photos(&data);
    let out = dir.join("out");
    let run = finetune(
        &data,
        &out,
        &["--lora", "2", "--save-every", "1", "--stop-at", "3"],
    );
    run.expect_code(0);
    // Per step: step, loss and learning rate; per epoch: validation accuracy; a checkpoint per step.
    assert!(
        run.stderr.contains("step 1/4  epoch 1/2  loss "),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("lr 1.000e-3"), "{}", run.stderr);
    assert!(
        run.stderr.contains("epoch 1/2: validation accuracy "),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("step 3: saved "), "{}", run.stderr);
    assert!(run.stdout.contains("stopped at step 3/4"), "{}", run.stdout);
    assert!(!out.join("model.safetensors").exists());

    let run = finetune(&data, &out, &["--lora", "2", "--resume"]);
    run.expect_code(0);
    assert!(run.stderr.contains("resumed at step 3"), "{}", run.stderr);
    assert!(run.stderr.contains("step 4/4  epoch 2/2"), "{}", run.stderr);
    assert!(!run.stderr.contains("step 1/4"), "{}", run.stderr);
    assert!(
        run.stdout.contains("trained model written to"),
        "{}",
        run.stdout
    );

    // The merged model is an ordinary checkpoint with the new classes.
    let cls = visenc(&[
        "classify",
        "-m",
        out.to_str().unwrap(),
        "--top",
        "2",
        &photo("coffee.png"),
    ]);
    cls.expect_code(0);
    assert!(
        cls.stdout.contains("animal (") && cls.stdout.contains("object ("),
        "{}",
        cls.stdout
    );

    // Another model's state is refused by name.
    let run = finetune_model("vit_timm", &data, &out, &["--lora", "2", "--resume"]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("train_state.safetensors"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("blocks.0.attn"), "{}", run.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn finetune_refuses_data_it_cannot_use() {
    let dir = tmp("bad");
    // One class.
    let one = dir.join("one");
    std::fs::create_dir_all(one.join("cat")).unwrap();
    std::fs::copy(photo("chelsea.png"), one.join("cat/a.png")).unwrap();
    std::fs::copy(photo("coffee.png"), one.join("cat/b.png")).unwrap();
    let run = finetune(&one, &dir.join("o1"), &["--last-n", "1"]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("at least two classes"),
        "{}",
        run.stderr
    );

    // Unreadable images: every one is named, and nothing is trained.
    let bad = dir.join("bad");
    photos(&bad);
    std::fs::write(bad.join("animal/broken.png"), b"not a png").unwrap();
    std::fs::write(bad.join("object/empty.jpg"), b"").unwrap();
    let out = dir.join("o2");
    let run = finetune(&bad, &out, &["--last-n", "1"]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("2 of 8 images cannot be read"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("broken.png") && run.stderr.contains("empty.jpg"),
        "{}",
        run.stderr
    );
    assert!(!out.join("train_state.safetensors").exists());

    // More blocks than the model has; a model that is not a ViT.
    photos(&one);
    let run = finetune(&one, &dir.join("o3"), &["--last-n", "5"]);
    run.expect_code(2);
    assert!(
        run.stderr
            .contains("--last-n 5: the model has only 2 blocks"),
        "{}",
        run.stderr
    );
    let run = finetune_model(
        "clip_hf_quickgelu",
        &one,
        &dir.join("o4"),
        &["--last-n", "1"],
    );
    run.expect_code(2);
    assert!(
        run.stderr.contains("fine-tuning supports transformers ViT"),
        "{}",
        run.stderr
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
