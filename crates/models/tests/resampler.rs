//! The IDEFICS perceiver resampler against transformers' `IdeficsPerceiverResampler`: tiny random
//! checkpoints under `fixtures/resampler/` (scripts/fixtures/resampler.py), odd token counts, one
//! token, a batch; then after a real encoder's patch tokens.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use visenc_models::resampler::PerceiverResampler;
use visenc_models::EncodeOptions;
use visenc_weights::{Checkpoint, LoadPolicy, Weights};

mod common;

use common::{fixture_dir, load_fixture, rel_err, BATCH_TOL, F32_TOL};

fn open(name: &str) -> (Value, Weights, HashMap<String, Tensor>) {
    let dir = fixture_dir("resampler", name);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let ckpt = Checkpoint::open(dir.join("model.safetensors").to_str().unwrap()).unwrap();
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    (cfg, w, expected)
}

#[test]
fn perceiver_resampler_matches_idefics() {
    for name in ["idefics_qk_norm", "idefics_plain"] {
        let (cfg, w, expected) = open(name);
        let r = PerceiverResampler::from_idefics(&cfg, &w).unwrap();
        assert!(w.finish(LoadPolicy::Strict).unwrap().is_clean(), "{name}");
        let n_latents = r.config().n_latents;
        for k in 0..4 {
            let x = &expected[&format!("context.{k}")];
            let y = r.forward(x).unwrap();
            assert_eq!(y.dims(), [x.dim(0).unwrap(), n_latents, 32], "{name} {k}");
            let e = rel_err(&y, &expected[&format!("output.{k}")]);
            println!("{name} context {:?}: relative error {e:e}", x.dims());
            assert!(e <= F32_TOL, "{name} context.{k}: {e:e}");
        }
        // Each row of the batch alone gives its row of the batch's output.
        let batch = &expected["context.3"];
        let out = r.forward(batch).unwrap();
        for i in 0..batch.dim(0).unwrap() {
            let one = r.forward(&batch.narrow(0, i, 1).unwrap()).unwrap();
            let e = rel_err(&one, &out.narrow(0, i, 1).unwrap());
            assert!(e <= BATCH_TOL, "{name} row {i}: {e:e}");
        }
    }
}

/// After any encoder of the same width: the tiny CLIP's patch tokens (32 wide) resample to the
/// latents; tokens of another width are refused by name.
#[test]
fn resampler_after_an_encoders_patch_tokens() {
    let (cfg, w, _) = open("idefics_qk_norm");
    let r = PerceiverResampler::from_idefics(&cfg, &w).unwrap();
    let clip = load_fixture("models", "clip_hf_quickgelu");
    let px = clip.get("pixel_values");
    let opts = EncodeOptions {
        tokens: true,
        ..Default::default()
    };
    let f = clip.model.image.encode(px, &opts).unwrap();
    let patches = f.patch_tokens.unwrap();
    let y = r.forward(&patches).unwrap();
    assert_eq!(y.dims(), [px.dim(0).unwrap(), 5, 32]);
    let wide = Tensor::zeros((1, 4, 48), DType::F32, &Device::Cpu).unwrap();
    let err = r.forward(&wide).unwrap_err().to_string();
    assert!(err.contains("vision_config.embed_dim"), "{err}");
    let empty = Tensor::zeros((1, 0, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(r.forward(&empty).is_err());
}

/// Missing or inconsistent settings are errors that name them.
#[test]
fn resampler_config_errors_name_the_setting() {
    let (cfg, w, _) = open("idefics_plain");
    let mut no_dim = cfg.clone();
    no_dim["vision_config"]
        .as_object_mut()
        .unwrap()
        .remove("embed_dim");
    let err = PerceiverResampler::from_idefics(&no_dim, &w)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vision_config.embed_dim"), "{err}");
    // Sizes that do not match the tensors: the strict load report names them.
    let (cfg, w, _) = open("idefics_plain");
    let mut more_heads = cfg.clone();
    more_heads["perceiver_config"]["resampler_n_heads"] = 4.into();
    let err = match PerceiverResampler::from_idefics(&more_heads, &w) {
        Err(e) => e.to_string(),
        Ok(_) => w.finish(LoadPolicy::Strict).unwrap_err().to_string(),
    };
    assert!(err.contains("q_proj"), "{err}");
}
