//! Hub ids resolved from the standard Hugging Face cache without any network: a fake cache in a
//! temporary `HF_HOME` laid out as huggingface_hub and hf-hub 0.4 write it
//! (`$HF_HOME/hub/models--{org}--{name}/refs/main` holding the commit hash, the files under
//! `snapshots/{hash}/`), with `HF_HUB_OFFLINE=1`.
//!
//! `HF_HOME` and `HF_HUB_OFFLINE` are process-global, so this binary holds one test that sets them once
//! and runs every case in turn.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use visenc_weights::{Checkpoint, Layout, WeightsError};

const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

/// Puts a fixture's files into the cache as the snapshot `HASH` of `repo` and points `refs/main` at it.
/// Returns the snapshot directory.
fn cache_repo(hf_home: &Path, repo: &str, fixture: &str, skip: &[&str]) -> PathBuf {
    let repo_dir = hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(HASH);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    // huggingface_hub writes the hash without a trailing newline; hf-hub 0.4 reads it verbatim.
    std::fs::write(repo_dir.join("refs/main"), HASH).unwrap();
    for entry in std::fs::read_dir(fixture_dir(fixture)).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap();
        if name != "expected.safetensors" && !skip.contains(&name) {
            std::fs::copy(&p, snapshot.join(name)).unwrap();
        }
    }
    snapshot
}

fn tensor_count(ckpt: &Checkpoint) -> usize {
    ckpt.load_weights(DType::F32, &Device::Cpu)
        .unwrap()
        .names()
        .count()
}

#[test]
fn hub_ids_resolve_from_the_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    // A transformers checkpoint: opened from its snapshot, with every file it has.
    let snap = cache_repo(home.path(), "org/vit-tiny", "vit_hf_classifier", &[]);
    let ckpt = Checkpoint::open("org/vit-tiny").unwrap_or_else(|e| panic!("cached hub id: {e}"));
    assert_eq!(ckpt.dir, snap);
    assert_eq!(ckpt.spec, "org/vit-tiny");
    assert_eq!(ckpt.layout, Layout::Transformers);
    assert_eq!(ckpt.weight_files, [snap.join("model.safetensors")]);
    assert!(
        ckpt.preprocessor.is_some(),
        "preprocessor_config.json from the snapshot"
    );
    let local = Checkpoint::open(fixture_dir("vit_hf_classifier").to_str().unwrap()).unwrap();
    assert_eq!(tensor_count(&ckpt), tensor_count(&local));

    // With a tokenizer (CLIP).
    let snap = cache_repo(home.path(), "org/clip-tiny", "clip_hf_gelu", &[]);
    let ckpt = Checkpoint::open("org/clip-tiny").unwrap();
    assert_eq!(ckpt.tokenizer_file, Some(snap.join("tokenizer.json")));
    assert!(ckpt.tokenizer_config.is_some());

    // An open_clip repository (no config.json): its own config and weights names.
    let snap = cache_repo(home.path(), "org/open-clip-tiny", "clip_open_clip", &[]);
    let ckpt = Checkpoint::open("org/open-clip-tiny").unwrap();
    assert_eq!(ckpt.layout, Layout::OpenClip);
    assert_eq!(
        ckpt.weight_files,
        [snap.join("open_clip_model.safetensors")]
    );

    // A timm repository.
    let ckpt = {
        cache_repo(home.path(), "timm/vit-tiny", "vit_timm", &[]);
        Checkpoint::open("timm/vit-tiny").unwrap()
    };
    assert_eq!(ckpt.layout, Layout::Timm);

    // An id that is not in the cache: the error names the id, the cache and HF_HUB_OFFLINE.
    let err = Checkpoint::open("org/not-cached").unwrap_err();
    assert!(matches!(err, WeightsError::Hub { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("org/not-cached"),
        "must name the repository: {msg}"
    );
    assert!(
        msg.contains("HF_HUB_OFFLINE"),
        "must say the hub was not asked: {msg}"
    );
    assert!(
        msg.contains(&home.path().join("hub").display().to_string()),
        "must name the cache: {msg}"
    );

    // A cached config without cached weights fails naming the weights and the repository.
    cache_repo(
        home.path(),
        "org/no-weights",
        "vit_hf_classifier",
        &["model.safetensors"],
    );
    let msg = Checkpoint::open("org/no-weights").unwrap_err().to_string();
    assert!(
        msg.contains("org/no-weights") && msg.contains("model.safetensors"),
        "{msg}"
    );

    // A cache whose refs/main points at a snapshot that is not there is a miss, not a crash.
    let repo_dir = home.path().join("hub/models--org--dangling");
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), HASH).unwrap();
    let msg = Checkpoint::open("org/dangling").unwrap_err().to_string();
    assert!(
        msg.contains("org/dangling") && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );

    // A local directory that happens to look like a hub id wins over the hub.
    let cwd = tempfile::tempdir().unwrap();
    let local_dir = cwd.path().join("org").join("vit-tiny");
    std::fs::create_dir_all(&local_dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(fixture_dir("vit_hf_classifier").join(f), local_dir.join(f)).unwrap();
    }
    let prev = std::env::current_dir().unwrap();
    std::env::set_current_dir(cwd.path()).unwrap();
    let ckpt = Checkpoint::open("org/vit-tiny");
    std::env::set_current_dir(prev).unwrap();
    assert_eq!(ckpt.unwrap().dir, Path::new("org/vit-tiny"));
}
