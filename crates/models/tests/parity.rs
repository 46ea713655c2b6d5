//! Parity with the reference implementations on stored tensors.
//!
//! Each fixture under `fixtures/models/` holds a tiny random-initialised model saved by its own
//! library (transformers, open_clip, timm) and `expected.safetensors` with inputs and the reference's
//! outputs (`scripts/fixtures/models.py` writes them). The checkpoint is loaded exactly as a user's
//! would be: `Checkpoint::open` on the directory, strict load report.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use visenc_models::{load, EncodeOptions};
use visenc_weights::{Checkpoint, LoadPolicy};

mod common;

use common::{load_fixture, rel_err, Fixture, BATCH_TOL, F32_TOL};

fn fixture(name: &'static str) -> Fixture {
    load_fixture("models", name)
}

impl Fixture {
    /// Pooled, projected, tokens, every hidden state, logits at the trained size (pooled, projected
    /// and logits again without tokens); pooled, tokens and logits at the alternative size; and
    /// batched == single.
    fn check_vision(&self) {
        let layers: Vec<i64> = (0..)
            .take_while(|i| self.expected.contains_key(&format!("hidden_states.{i}")))
            .collect();
        assert!(layers.len() >= 3, "{}: hidden states", self.name);
        let opts = EncodeOptions {
            layers: layers.clone(),
            tokens: true,
            ..Default::default()
        };
        let px = self.get("pixel_values");
        let f = self.model.image.encode(px, &opts).unwrap();
        self.check("pooled", &f.pooled, "pooled");
        if let Some(p) = &f.projected {
            self.check("projected", p, "image_embeds");
        }
        if let Some(l) = &f.logits {
            self.check("logits", l, "logits");
        }
        let tokens = match &f.prefix_tokens {
            Some(p) => Tensor::cat(&[p, f.patch_tokens.as_ref().unwrap()], 1).unwrap(),
            None => f.patch_tokens.clone().unwrap(),
        };
        self.check("tokens", &tokens, "last_hidden_state");
        for (i, h) in &f.hidden_states {
            self.check("hidden state", h, &format!("hidden_states.{i}"));
        }
        // Negative indices count from the end, as in HF's hidden_states tuple.
        let last = f.hidden_states.last().unwrap().1.clone();
        let neg = self
            .model
            .image
            .encode(
                px,
                &EncodeOptions {
                    layers: vec![-1],
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(rel_err(&neg.hidden_states[0].1, &last) < BATCH_TOL);
        // Without tokens or layers a class-token pooling runs the last block for that token alone.
        let pooled_only = self
            .model
            .image
            .encode(px, &EncodeOptions::default())
            .unwrap();
        self.check("pooled (no tokens)", &pooled_only.pooled, "pooled");
        if let Some(p) = &pooled_only.projected {
            self.check("projected (no tokens)", p, "image_embeds");
        }
        if let Some(l) = &pooled_only.logits {
            self.check("logits (no tokens)", l, "logits");
        }

        if let Some(alt) = self.expected.get("alt_pixel_values") {
            let g = self
                .model
                .image
                .encode(
                    alt,
                    &EncodeOptions {
                        tokens: true,
                        ..Default::default()
                    },
                )
                .unwrap();
            self.check("alt pooled", &g.pooled, "alt_pooled");
            let tokens = match &g.prefix_tokens {
                Some(p) => Tensor::cat(&[p, g.patch_tokens.as_ref().unwrap()], 1).unwrap(),
                None => g.patch_tokens.clone().unwrap(),
            };
            self.check("alt tokens", &tokens, "alt_last_hidden_state");
            if let (Some(l), true) = (&g.logits, self.expected.contains_key("alt_logits")) {
                self.check("alt logits", l, "alt_logits");
            }
            if let (Some(p), true) = (&g.projected, self.expected.contains_key("alt_image_embeds"))
            {
                self.check("alt projected", p, "alt_image_embeds");
            }
        }

        self.check_single_equals_batch(px, &f.pooled);
    }

    /// Text embeddings and image-text logits from the fixture's token ids.
    fn check_text(&self, ids_key: &str, text_key: &str, logits_key: &str) {
        let text = self.model.text.as_ref().expect("text tower");
        let ids = self.get(ids_key).to_dtype(DType::U32).unwrap();
        let mask = Tensor::ones_like(&ids).unwrap();
        let t = text.encode_text(&ids, &mask).unwrap();
        self.check("text embeds", &t.projected, text_key);
        if let Some(p) = self.expected.get("text_pooled") {
            let e = rel_err(&t.pooled, p);
            assert!(e <= F32_TOL, "{}: text pooled {e:e}", self.name);
        }
        let img = self
            .model
            .image
            .encode(self.get("pixel_values"), &EncodeOptions::default())
            .unwrap();
        let scoring = self.model.info.scoring.expect("scoring");
        let norm = visenc_models::nn::l2_normalize;
        let logits = scoring
            .logits(
                &norm(img.embedding()).unwrap(),
                &norm(&t.projected).unwrap(),
            )
            .unwrap();
        self.check("logits_per_image", &logits, logits_key);
    }
}

#[test]
fn clip_transformers_quick_gelu() {
    let f = fixture("clip_hf_quickgelu");
    f.check_vision();
    f.check_text("input_ids", "text_embeds", "logits_per_image");
}

#[test]
fn clip_transformers_gelu() {
    let f = fixture("clip_hf_gelu");
    f.check_vision();
    f.check_text("input_ids", "text_embeds", "logits_per_image");
}

#[test]
fn clip_open_clip_layout() {
    let f = fixture("clip_open_clip");
    f.check_vision();
    f.check_text("input_ids", "text_embeds", "logits_per_image");
    // The transformers-style padding (end-of-text instead of 0) gives the same embeddings.
    f.check_text("hf_input_ids", "text_embeds", "logits_per_image");
}

#[test]
fn siglip_transformers() {
    let f = fixture("siglip_hf");
    f.check_vision();
    // SigLIP was trained attending to its padding (big_vision); visenc follows that convention.
    f.check_text(
        "input_ids",
        "text_embeds_no_mask",
        "logits_per_image_no_mask",
    );
}

#[test]
fn vit_transformers_classifier() {
    let f = fixture("vit_hf_classifier");
    f.check_vision();
    let labels = f.model.info.labels.clone().unwrap();
    assert_eq!(labels[2], "espresso");
}

#[test]
fn vit_timm() {
    let f = fixture("vit_timm");
    f.check_vision();
}

#[test]
fn vit_timm_registers_avg_pool_layer_scale() {
    let f = fixture("vit_timm_reg");
    f.check_vision();
    assert_eq!(f.model.info.prefix_tokens, 2);
}

#[test]
fn dinov2_transformers() {
    fixture("dinov2_hf").check_vision();
}

#[test]
fn dinov2_with_registers_transformers() {
    let f = fixture("dinov2_reg_hf");
    f.check_vision();
    assert_eq!(f.model.info.prefix_tokens, 5);
}

/// Checkpoints stored in f16 or bf16 load into an f32 model; the outputs differ from the f32
/// reference only by the rounding of the stored weights.
#[test]
fn half_precision_checkpoints_load() {
    let src =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/vit_hf_classifier");
    let f32_model = fixture("vit_hf_classifier");
    let px = f32_model.get("pixel_values");
    let want = f32_model
        .model
        .image
        .encode(px, &EncodeOptions::default())
        .unwrap()
        .pooled;
    for (dtype, tol) in [(DType::F16, 2e-2), (DType::BF16, 1e-1)] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "preprocessor_config.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let tensors =
            candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
        let cast: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| (k, t.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&cast, dir.path().join("model.safetensors")).unwrap();
        let ckpt = Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
        let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
        let (model, _) = load(&ckpt, &w, LoadPolicy::Strict).unwrap();
        let got = model
            .image
            .encode(px, &EncodeOptions::default())
            .unwrap()
            .pooled;
        assert_eq!(got.dtype(), DType::F32);
        let e = rel_err(&got, &want);
        assert!(e > 0.0 && e < tol, "{dtype:?}: relative error {e:e}");
    }
}

/// The published sizes (CLIP B/32, B/16, L/14, L/14-336; SigLIP base; ViT base; DINOv2 base with
/// and without registers) map onto visenc's layers: zero tensors with the names and shapes the
/// reference builds from each published configuration (`fixtures/configs/`, written by
/// `scripts/fixtures/configs.py`) load strictly, and the parameter count equals the reference's.
#[test]
fn published_configurations_load_strictly() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/configs");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    assert!(names.len() >= 8);
    for path in names {
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        // Broadcast views of one zero: full-size shapes without allocating them.
        let zero = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let tensors: HashMap<String, Tensor> = spec["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                let shape: Vec<usize> = serde_json::from_value(k["shape"].clone()).unwrap();
                let t = match shape.len() {
                    0 => zero.reshape(()).unwrap(),
                    n => zero
                        .reshape(vec![1; n])
                        .unwrap()
                        .broadcast_as(shape)
                        .unwrap(),
                };
                (k["name"].as_str().unwrap().to_string(), t)
            })
            .collect();
        let ckpt = Checkpoint {
            spec: path.display().to_string(),
            dir: dir.clone(),
            layout: visenc_weights::Layout::Transformers,
            config: spec["config"].clone(),
            config_path: path.clone(),
            preprocessor: None,
            tokenizer_file: None,
            tokenizer_config: None,
            weight_files: vec![],
        };
        let w = visenc_weights::Weights::new(tensors, &path, DType::F32, &Device::Cpu);
        let (model, _) = load(&ckpt, &w, LoadPolicy::Strict)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // visenc counts what inference uses; DINOv2's `mask_token` (masked-image modelling only) is
        // read and deliberately ignored.
        let unused: u64 = spec["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["name"].as_str().unwrap().ends_with("mask_token"))
            .map(|k| {
                k["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .product::<u64>()
            })
            .sum();
        assert_eq!(
            model.info.parameters as u64 + unused,
            spec["parameters"].as_u64().unwrap(),
            "{}",
            path.display()
        );
    }
}
