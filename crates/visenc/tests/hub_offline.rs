//! `Encoder::load` with a hub id, served from a fake Hugging Face cache in a temporary `HF_HOME` with
//! `HF_HUB_OFFLINE=1` (no network): the facade must hand hub ids to the hub resolver and give exactly
//! what the same files give from a local directory. The environment is process-global, so this binary
//! holds a single test.

mod common;

use common::{f32s, fixture_dir, photo};
use visenc::{EncodeOptions, Encoder, LoadOptions};

#[test]
fn hub_id_from_offline_cache_encodes_like_the_local_directory() {
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let hash = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = home.path().join("hub/models--tiny--clip");
    let snapshot = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    for entry in std::fs::read_dir(fixture_dir("clip_hf_gelu")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, snapshot.join(p.file_name().unwrap())).unwrap();
    }

    let hub = Encoder::load("tiny/clip", &LoadOptions::default())
        .unwrap_or_else(|e| panic!("tiny/clip: {e}"));
    let local = common::load(&fixture_dir("clip_hf_gelu"));
    let px = local.load_image(&photo("astronaut.png")).unwrap();
    let a = hub
        .encode_pixels(std::slice::from_ref(&px), &EncodeOptions::default())
        .unwrap();
    let b = local
        .encode_pixels(&[px], &EncodeOptions::default())
        .unwrap();
    assert_eq!(f32s(a.embedding()), f32s(b.embedding()));
    let ta = hub.encode_texts(&["a photo of an astronaut"]).unwrap();
    let tb = local.encode_texts(&["a photo of an astronaut"]).unwrap();
    assert_eq!(
        f32s(&ta.projected),
        f32s(&tb.projected),
        "tokenizer.json must come from the snapshot"
    );

    let err = match Encoder::load("tiny/not-cached", &LoadOptions::default()) {
        Ok(_) => panic!("an uncached id loaded offline"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("tiny/not-cached") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
