//! Finding checkpoints on disk: each fixture's layout is recognised and its tensors all read, and broken
//! directories fail with an error that names the directory or file at fault.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use visenc_weights::{Checkpoint, Layout, WeightsError};

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

fn open(dir: &Path) -> Result<Checkpoint, WeightsError> {
    Checkpoint::open(dir.to_str().unwrap())
}

/// Tensor names and shapes straight from a safetensors header.
fn header(path: &Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut v: Vec<_> = meta
        .tensors()
        .into_iter()
        .map(|(n, i)| (n, i.shape.clone()))
        .collect();
    v.sort();
    v
}

#[test]
fn each_fixture_layout_is_recognised_and_every_tensor_read() {
    let cases = [
        (
            "clip_hf_gelu",
            Layout::Transformers,
            "model.safetensors",
            true,
        ),
        ("siglip_hf", Layout::Transformers, "model.safetensors", true),
        (
            "vit_hf_classifier",
            Layout::Transformers,
            "model.safetensors",
            false,
        ),
        (
            "dinov2_reg_hf",
            Layout::Transformers,
            "model.safetensors",
            false,
        ),
        ("vit_timm", Layout::Timm, "model.safetensors", false),
        ("vit_timm_reg", Layout::Timm, "model.safetensors", false),
        (
            "clip_open_clip",
            Layout::OpenClip,
            "open_clip_model.safetensors",
            true,
        ),
    ];
    for (name, layout, weights, tokenizer) in cases {
        let dir = fixture_dir(name);
        let ckpt = open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ckpt.layout, layout, "{name}");
        assert_eq!(ckpt.weight_files, [dir.join(weights)], "{name}");
        assert_eq!(
            ckpt.tokenizer_file.is_some(),
            tokenizer,
            "{name}: tokenizer.json"
        );
        assert_eq!(
            ckpt.preprocessor.is_some(),
            dir.join("preprocessor_config.json").is_file(),
            "{name}"
        );
        let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
        let mut got: Vec<(String, Vec<usize>)> = w
            .names()
            .map(|n| (n.to_string(), w.shape_of(n).unwrap()))
            .collect();
        got.sort();
        assert_eq!(got, header(&dir.join(weights)), "{name}: tensors read");
    }
}

/// Pointing at a file inside the checkpoint (as users do with `.../model.safetensors`) opens its directory.
#[test]
fn a_file_inside_the_checkpoint_opens_its_directory() {
    let dir = fixture_dir("vit_timm");
    let ckpt = open(&dir.join("model.safetensors")).unwrap();
    assert_eq!(ckpt.dir, dir);
    assert_eq!(ckpt.layout, Layout::Timm);
}

#[test]
fn missing_config_json_names_the_directory() {
    let tmp = copy_fixture("clip_hf_gelu");
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let err = open(tmp.path()).unwrap_err();
    assert!(matches!(err, WeightsError::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&tmp.path().display().to_string()),
        "must name the directory: {msg}"
    );
    assert!(
        msg.contains("config.json"),
        "must say what is missing: {msg}"
    );
}

#[test]
fn invalid_config_json_names_the_file() {
    let tmp = copy_fixture("clip_hf_gelu");
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, "{\"model_type\": \"clip\",").unwrap();
    let msg = open(tmp.path()).unwrap_err().to_string();
    assert!(
        msg.contains(&cfg.display().to_string()),
        "must name {}: {msg}",
        cfg.display()
    );
}

#[test]
fn config_without_model_type_or_architecture_names_the_file() {
    let tmp = copy_fixture("vit_hf_classifier");
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, r#"{"hidden_size": 32}"#).unwrap();
    let msg = open(tmp.path()).unwrap_err().to_string();
    assert!(
        msg.contains(&cfg.display().to_string()),
        "must name {}: {msg}",
        cfg.display()
    );
    assert!(
        msg.contains("model_type") && msg.contains("architecture"),
        "must say what it looked for: {msg}"
    );
}

#[test]
fn missing_weights_name_the_directory_and_the_files_looked_for() {
    let tmp = copy_fixture("vit_hf_classifier");
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let msg = open(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn truncated_or_corrupt_weights_name_the_file() {
    let tmp = copy_fixture("vit_timm");
    let file = tmp.path().join("model.safetensors");
    let good = std::fs::read(&file).unwrap();
    let garbage = b"PK\x03\x04 this is a zip (a torch .bin renamed), not safetensors".to_vec();
    for (what, bytes) in [
        ("half", good[..good.len() / 2].to_vec()),
        ("empty", vec![]),
        ("garbage", garbage),
    ] {
        std::fs::write(&file, &bytes).unwrap();
        // Discovery only looks at names; reading the tensors must fail, naming the file.
        let ckpt = open(tmp.path()).unwrap();
        let err = ckpt
            .load_weights(DType::F32, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{what}: loaded"));
        assert!(matches!(err, WeightsError::Read { .. }), "{what}: {err:?}");
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{what}: must name the file: {err}"
        );
    }
}

#[test]
fn shard_index_without_weight_map_names_the_index() {
    let tmp = copy_fixture("vit_hf_classifier");
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let index = tmp.path().join("model.safetensors.index.json");
    std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
    let msg = open(tmp.path()).unwrap_err().to_string();
    assert!(
        msg.contains(&index.display().to_string()) && msg.contains("weight_map"),
        "{msg}"
    );
}

#[test]
fn a_path_that_is_neither_a_directory_nor_a_hub_id_is_not_found() {
    for spec in [
        "/definitely/not/here",
        "../not-here",
        "too/many/parts",
        "bad id!",
    ] {
        let err = Checkpoint::open(spec).unwrap_err();
        assert!(
            matches!(err, WeightsError::NotFound { .. }),
            "{spec}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(spec) && msg.contains("hub id"),
            "{spec}: {msg}"
        );
    }
}
