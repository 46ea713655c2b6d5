//! Checkpoints broken the ways real downloads and conversions break them, loaded through
//! `Encoder::load` as a user would: each must fail with an error that says what is wrong and where, or
//! (sharded) load and give exactly what the single file gives.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{f32s, fixture_dir, photo};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use visenc::weights::LoadPolicy;
use visenc::{EncodeOptions, Encoder, LoadOptions};

/// A writable copy of a fixture directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

/// A tensor held by value, for rewriting safetensors files.
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_tensors(path: &Path) -> Vec<(String, Owned)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Owned)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                Owned {
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                    data: t.data().to_vec(),
                },
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_tensors(path: &Path, tensors: &[(String, Owned)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Encoder::load(dir.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

const REMOVED: &str = "vit.encoder.layer.1.intermediate.dense.weight";
const RESHAPED: &str = "vit.encoder.layer.0.output.dense.weight"; // [32, 64] -> [64, 32]
const EXTRA: &str = "vit.encoder.layer.0.attention.attention.extra_buffer";

/// vit_hf_classifier with one tensor removed, one reshaped and one added.
fn mismatched_checkpoint() -> tempfile::TempDir {
    let tmp = copy_fixture("vit_hf_classifier");
    let file = tmp.path().join("model.safetensors");
    let mut t = read_tensors(&file);
    assert!(
        t.iter().any(|(n, _)| n == REMOVED),
        "fixture changed: no {REMOVED}"
    );
    t.retain(|(n, _)| n != REMOVED);
    let r = t
        .iter_mut()
        .find(|(n, _)| n == RESHAPED)
        .expect("tensor to reshape");
    assert_eq!(r.1.shape, [32, 64], "fixture changed: {RESHAPED}");
    r.1.shape = vec![64, 32];
    t.push((
        EXTRA.into(),
        Owned {
            dtype: Dtype::F32,
            shape: vec![4],
            data: vec![0; 16],
        },
    ));
    write_tensors(&file, &t);
    tmp
}

#[test]
fn strict_load_names_missing_mis_shaped_and_unexpected_tensors() {
    let tmp = mismatched_checkpoint();
    let err = load_err(tmp.path());
    for name in [REMOVED, RESHAPED, EXTRA] {
        assert!(
            err.contains(name),
            "the strict error must name {name}:\n{err}"
        );
    }
    assert!(
        err.contains("[32, 64]") && err.contains("[64, 32]"),
        "both shapes of {RESHAPED}:\n{err}"
    );
    assert!(
        err.contains("missing") && err.contains("unexpected"),
        "{err}"
    );
    assert!(
        err.contains("AllowMismatch") || err.contains("allow-mismatch"),
        "how to load anyway:\n{err}"
    );
}

#[test]
fn allow_mismatch_loads_and_reports_every_tensor() {
    let tmp = mismatched_checkpoint();
    let opts = LoadOptions {
        policy: LoadPolicy::AllowMismatch,
        ..LoadOptions::default()
    };
    let enc = Encoder::load(tmp.path().to_str().unwrap(), &opts).unwrap();
    let r = enc.load_report();
    assert_eq!(r.missing, [REMOVED]);
    assert_eq!(r.unexpected, [EXTRA]);
    assert_eq!(
        r.mismatched,
        [(RESHAPED.to_string(), vec![32, 64], vec![64, 32])]
    );
    // It runs.
    let px = enc.load_image(&photo("chelsea.png")).unwrap();
    let f = enc.encode_pixels(&[px], &EncodeOptions::default()).unwrap();
    assert!(f32s(f.logits.as_ref().unwrap())
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn clean_checkpoint_has_empty_load_report() {
    let enc = common::load(&fixture_dir("vit_hf_classifier"));
    assert!(enc.load_report().is_clean(), "{}", enc.load_report());
}

#[test]
fn missing_config_json_names_the_directory() {
    let tmp = copy_fixture("vit_hf_classifier");
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains(&tmp.path().display().to_string()),
        "error must name the directory: {err}"
    );
    assert!(
        err.contains("config.json"),
        "error must say which file is missing: {err}"
    );
}

#[test]
fn unknown_model_type_lists_supported_ones() {
    let tmp = copy_fixture("vit_hf_classifier");
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["model_type"] = "gpt2".into();
    cfg["architectures"] = serde_json::json!(["GPT2Model"]);
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("gpt2"),
        "error must name the unsupported type: {err}"
    );
    for supported in ["clip", "siglip", "vit", "dinov2"] {
        assert!(
            err.contains(supported),
            "error must list {supported}: {err}"
        );
    }
}

#[test]
fn truncated_weights_name_the_file() {
    let tmp = copy_fixture("vit_hf_classifier");
    let file = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    // Cut inside the data, inside the header, and an empty file (an interrupted download).
    for len in [bytes.len() / 2, 40, 0] {
        std::fs::write(&file, &bytes[..len]).unwrap();
        let err = load_err(tmp.path());
        assert!(
            err.contains(&file.display().to_string()),
            "{len} bytes: error must name {}: {err}",
            file.display()
        );
    }
}

#[test]
fn corrupt_weights_name_the_file() {
    let tmp = copy_fixture("vit_hf_classifier");
    let file = tmp.path().join("model.safetensors");
    // A plausible header length followed by bytes that are not a JSON header (e.g. an HTML error page
    // saved under the weights' name).
    let mut bytes = 64u64.to_le_bytes().to_vec();
    bytes.extend(b"<!DOCTYPE html><html><body>404 Not Found</body></html>          ");
    std::fs::write(&file, &bytes).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains(&file.display().to_string()),
        "error must name {}: {err}",
        file.display()
    );
}

/// `model.safetensors` split the way `save_pretrained(max_shard_size=..)` does it.
fn shard(dir: &Path) -> Vec<PathBuf> {
    let file = dir.join("model.safetensors");
    let tensors = read_tensors(&file);
    std::fs::remove_file(&file).unwrap();
    let half = tensors.len() / 2;
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    let mut it = tensors.into_iter();
    let parts: [Vec<(String, Owned)>; 2] = [it.by_ref().take(half).collect(), it.collect()];
    for (name, part) in names.iter().zip(&parts) {
        write_tensors(&dir.join(name), part);
        for (t, _) in part {
            weight_map.insert(t.clone(), (*name).into());
        }
    }
    let total: usize = parts.iter().flatten().map(|(_, t)| t.data.len()).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    names.iter().map(|n| dir.join(n)).collect()
}

#[test]
fn sharded_checkpoint_gives_the_same_outputs() {
    for name in ["clip_hf_gelu", "vit_hf_classifier"] {
        let tmp = copy_fixture(name);
        shard(tmp.path());
        let sharded = common::load(tmp.path());
        let single = common::load(&fixture_dir(name));
        let px = single.load_image(&photo("coffee.png")).unwrap();
        let a = single
            .encode_pixels(std::slice::from_ref(&px), &EncodeOptions::default())
            .unwrap();
        let b = sharded
            .encode_pixels(&[px], &EncodeOptions::default())
            .unwrap();
        assert_eq!(f32s(&a.pooled), f32s(&b.pooled), "{name}: pooled");
        assert_eq!(
            a.logits.map(|t| f32s(&t)),
            b.logits.map(|t| f32s(&t)),
            "{name}: logits"
        );
        assert_eq!(
            a.projected.map(|t| f32s(&t)),
            b.projected.map(|t| f32s(&t)),
            "{name}: projected"
        );
        if single.has_text() {
            let ta = single.encode_texts(&["a photo of a cat"]).unwrap();
            let tb = sharded.encode_texts(&["a photo of a cat"]).unwrap();
            assert_eq!(f32s(&ta.projected), f32s(&tb.projected), "{name}: text");
        }
    }
}

#[test]
fn sharded_checkpoint_with_a_missing_shard_names_it() {
    let tmp = copy_fixture("vit_hf_classifier");
    let shards = shard(tmp.path());
    std::fs::remove_file(&shards[1]).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model-00002-of-00002.safetensors"),
        "error must name the missing shard: {err}"
    );
}

#[test]
fn path_that_is_neither_a_directory_nor_a_hub_id_is_rejected() {
    for spec in [
        "/nonexistent/visenc/checkpoint",
        "./no-such-dir",
        "a/b/c/d",
        "owner/name with spaces",
    ] {
        let err = match Encoder::load(spec, &LoadOptions::default()) {
            Ok(_) => panic!("{spec} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(spec),
            "error must repeat what was asked for ({spec}): {err}"
        );
        assert!(
            err.contains("hub id"),
            "error must say it is not a hub id either: {err}"
        );
    }
}
