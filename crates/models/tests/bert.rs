//! BERT sentence encoder against transformers (`scripts/fixtures/bert.py`): a tiny random `BertModel`
//! (every hidden state of the last layer and the mean-pooled embedding) and the real all-MiniLM-L6-v2
//! from `assets/minilm` (fetched by `scripts/fetch-assets.sh`) on five sentences.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, rel_err, F32_TOL};
use visenc_models::bert::{mean_pool, Bert};
use visenc_models::TextEncoder;
use visenc_weights::{Checkpoint, LoadPolicy};

fn load(dir: &Path) -> Bert {
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    let bert = Bert::load(&ckpt.config, &w).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    w.finish(LoadPolicy::Strict).unwrap();
    bert
}

fn expected(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn bert_tiny_equals_transformers() {
    let dir = fixture_dir("bert", "tiny");
    let bert = load(&dir);
    let e = expected(&dir.join("expected.safetensors"));
    let (ids, mask) = (&e["input_ids"], &e["attention_mask"]);
    let h = bert.forward(ids, mask).unwrap();
    let err = rel_err(&h, &e["last_hidden_state"]);
    assert!(err <= F32_TOL, "last_hidden_state: {err:e}");
    let pooled = bert.encode_text(ids, mask).unwrap().pooled;
    let err = rel_err(&pooled, &e["mean_pooled"]);
    assert!(err <= F32_TOL, "mean_pooled: {err:e}");
    // Padding changes nothing: the shortest sentence alone, unpadded.
    let n = 3;
    let alone = mean_pool(
        &bert
            .forward(
                &ids.narrow(0, 2, 1).unwrap().narrow(1, 0, n).unwrap(),
                &mask.narrow(0, 2, 1).unwrap().narrow(1, 0, n).unwrap(),
            )
            .unwrap(),
        &mask.narrow(0, 2, 1).unwrap().narrow(1, 0, n).unwrap(),
    )
    .unwrap();
    let err = rel_err(&alone, &e["mean_pooled"].narrow(0, 2, 1).unwrap());
    assert!(err <= common::BATCH_TOL, "unpadded vs padded: {err:e}");
}

#[test]
fn bert_refuses_out_of_range_ids_and_mismatched_masks() {
    let bert = load(&fixture_dir("bert", "tiny"));
    let ids = Tensor::new(&[[1u32, 99]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1]], &Device::Cpu).unwrap();
    let err = bert.forward(&ids, &mask).err().unwrap().to_string();
    assert!(err.contains("token id 99"), "{err}");
    let short = Tensor::new(&[[1u32]], &Device::Cpu).unwrap();
    let err = bert
        .forward(
            &ids.narrow(1, 0, 1).unwrap().broadcast_as((1, 1)).unwrap(),
            &short.reshape((1, 1)).unwrap().repeat((1, 2)).unwrap(),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not match"), "{err}");
}

#[test]
fn all_minilm_l6_v2_real_weights_equal_sentence_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/minilm");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} missing: run scripts/fetch-assets.sh",
        dir.display()
    );
    let bert = load(&dir);
    let e = expected(&fixture_dir("bert", "minilm_expected.safetensors"));
    let got = bert
        .encode_text(&e["input_ids"], &e["attention_mask"])
        .unwrap()
        .pooled;
    let err = rel_err(&got, &e["embeddings"]);
    assert!(err <= F32_TOL, "MiniLM embeddings: {err:e}");
}

/// `load_text` on the sentence-transformers directory builds the pipeline its files prescribe: mean
/// pooling, `Normalize` (modules.json) and 256 tokens (sentence_bert_config.json); its embedding is
/// sentence-transformers' (the normalised reference), and padding columns beyond the texts change nothing.
#[test]
fn minilm_directory_loads_as_sentence_transformers_pipeline() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/minilm");
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    let (tower, report) = visenc_models::load_text(&ckpt, &w, LoadPolicy::Strict).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(tower.dim, 384);
    assert_eq!(tower.encoder.context_length(), 256);
    let e = expected(&fixture_dir("bert", "minilm_expected.safetensors"));
    let pad = |t: &Tensor| {
        let zeros = Tensor::zeros((t.dim(0).unwrap(), 20), t.dtype(), t.device()).unwrap();
        Tensor::cat(&[t, &zeros], 1).unwrap()
    };
    let got = tower
        .encoder
        .encode_text(&pad(&e["input_ids"]), &pad(&e["attention_mask"]))
        .unwrap();
    let want = visenc_models::nn::l2_normalize(&e["embeddings"]).unwrap();
    let err = rel_err(&got.projected, &want);
    assert!(err <= F32_TOL, "normalised MiniLM embeddings: {err:e}");
    let err = rel_err(&got.pooled, &e["embeddings"]);
    assert!(err <= F32_TOL, "mean-pooled MiniLM embeddings: {err:e}");
}
