//! Two-tower directories: the layout is recognised by `model_type`, tower paths are resolved against
//! the directory (relative) or taken as they are (absolute), and bad configs name config.json.

use std::path::{Path, PathBuf};

use serde_json::json;
use visenc_weights::{Checkpoint, Layout, TwoTowerConfig, PROJECTION_FILE};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .canonicalize()
        .unwrap()
}

/// A two-tower directory inside a fresh temporary one, with `config` and an (empty) projection file.
fn two_tower(parent: &Path, config: &serde_json::Value) -> PathBuf {
    let d = parent.join("pair");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    std::fs::write(d.join(PROJECTION_FILE), b"").unwrap();
    d
}

#[test]
fn towers_resolve_relative_and_absolute_paths() {
    let tmp = tempfile::tempdir().unwrap();
    // A relative tower next to the directory, an absolute one elsewhere.
    let text = tmp.path().join("bert");
    std::fs::create_dir(&text).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("bert/tiny").join(f), text.join(f)).unwrap();
    }
    let image = fixtures().join("models/vit_timm");
    let mut cfg = TwoTowerConfig::new(image.display().to_string(), "../bert".into());
    cfg.template = Some("a photo of a {}.".into());
    let d = two_tower(tmp.path(), &serde_json::to_value(&cfg).unwrap());
    let ckpt = Checkpoint::open(d.to_str().unwrap()).unwrap();
    assert_eq!(ckpt.layout, Layout::TwoTower);
    assert_eq!(ckpt.weight_files, vec![d.join(PROJECTION_FILE)]);
    let towers = ckpt.towers().unwrap();
    assert_eq!(towers.image.layout, Layout::Timm);
    assert_eq!(towers.image.dir, image);
    assert_eq!(towers.text.layout, Layout::Transformers);
    assert_eq!(
        towers.text.dir.canonicalize().unwrap(),
        text.canonicalize().unwrap()
    );
    assert_eq!(towers.config.template.as_deref(), Some("a photo of a {}."));
    // What `TwoTowerConfig::save` writes reads back the same.
    cfg.save(&d).unwrap();
    let again = Checkpoint::open(d.to_str().unwrap())
        .unwrap()
        .towers()
        .unwrap();
    assert_eq!(again.config.text_tower, "../bert");
}

#[test]
fn bad_two_tower_configs_name_config_json_and_the_tower() {
    let tmp = tempfile::tempdir().unwrap();
    let image = fixtures().join("models/vit_timm").display().to_string();
    let cases = [
        (
            json!({"model_type": "visenc_two_tower", "image_tower": image, "text_tower": "no/such/dir/x"}),
            "text_tower \"no/such/dir/x\"",
        ),
        (
            json!({"model_type": "visenc_two_tower", "image_tower": image}),
            "missing field `text_tower`",
        ),
        (
            json!({"model_type": "visenc_two_tower", "image_tower": image, "text_tower": ".", "extra": 1}),
            "unknown field `extra`",
        ),
        // The directory itself as a tower: a two-tower model cannot nest.
        (
            json!({"model_type": "visenc_two_tower", "image_tower": ".", "text_tower": "."}),
            "cannot itself be a two-tower",
        ),
    ];
    for (cfg, want) in cases {
        let d = two_tower(tmp.path(), &cfg);
        let err = Checkpoint::open(d.to_str().unwrap())
            .unwrap()
            .towers()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains(want),
            "{cfg}: {err}"
        );
    }
    // No projection file: named.
    let ok = json!({"model_type": "visenc_two_tower", "image_tower": image, "text_tower": image});
    let d = two_tower(tmp.path(), &ok);
    std::fs::remove_file(d.join(PROJECTION_FILE)).unwrap();
    let err = Checkpoint::open(d.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(PROJECTION_FILE) && err.contains("missing"),
        "{err}"
    );
}
