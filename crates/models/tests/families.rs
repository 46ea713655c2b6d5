//! Parity of the CNN, hierarchical and generative families with their references on stored tensors
//! (`fixtures/families/`, written by `scripts/fixtures/families.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use visenc_models::{load, EncodeOptions, LoadedModel};
use visenc_weights::{Checkpoint, LoadPolicy};

/// Max relative error allowed in f32: max|ours - reference| / max|reference|.
const F32_TOL: f32 = 1e-4;
/// A batch of one must give the batch's row (only summation order may differ).
const BATCH_TOL: f32 = 1e-5;

struct Fixture {
    name: &'static str,
    model: LoadedModel,
    expected: HashMap<String, Tensor>,
}

fn fixture(name: &'static str) -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/families").join(name);
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    let (model, report) = load(&ckpt, &w, LoadPolicy::Strict).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(report.is_clean());
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    Fixture { name, model, expected }
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shape");
    let diff = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-12)
}

impl Fixture {
    fn get(&self, k: &str) -> &Tensor {
        self.expected.get(k).unwrap_or_else(|| panic!("{}: fixture lacks {k}", self.name))
    }

    fn check(&self, what: &str, ours: &Tensor, key: &str) {
        let e = rel_err(ours, self.get(key));
        assert!(e <= F32_TOL, "{}: {what} vs {key}: relative error {e:e} > {F32_TOL:e}", self.name);
    }

    /// Pooled, logits and every feature map, at the trained size and at `alt_` size; batched == single.
    fn check_image(&self) {
        for prefix in ["", "alt_"] {
            let Some(px) = self.expected.get(&format!("{prefix}pixel_values")) else { continue };
            let opts = EncodeOptions { features: true, ..Default::default() };
            let f = self.model.image.encode(px, &opts).unwrap();
            self.check("pooled", &f.pooled, &format!("{prefix}pooled"));
            if let Some(l) = &f.logits {
                self.check("logits", l, &format!("{prefix}logits"));
            }
            let n = (0..).take_while(|i| self.expected.contains_key(&format!("{prefix}features.{i}"))).count();
            assert_eq!(f.feature_maps.len(), n, "{}: number of feature maps", self.name);
            for (i, m) in f.feature_maps.iter().enumerate() {
                self.check("feature map", &m.map, &format!("{prefix}features.{i}"));
            }
        }
        let px = self.get("pixel_values");
        let batch = self.model.image.encode(px, &EncodeOptions::default()).unwrap();
        for i in 0..px.dim(0).unwrap() {
            let one = self.model.image.encode(&px.narrow(0, i, 1).unwrap(), &EncodeOptions::default()).unwrap();
            let e = rel_err(&one.pooled, &batch.pooled.narrow(0, i, 1).unwrap());
            assert!(e <= BATCH_TOL, "{}: single image {i} differs from its batch row by {e:e}", self.name);
        }
    }
}

#[test]
fn resnet_transformers_bottleneck() {
    let f = fixture("resnet_hf");
    f.check_image();
    assert_eq!(f.model.info.labels.as_ref().map(Vec::len), Some(5));
}

#[test]
fn resnet_transformers_basic() {
    fixture("resnet_hf_basic").check_image();
}

#[test]
fn resnet_timm() {
    fixture("resnet_timm").check_image();
}

#[test]
fn efficientnet_timm() {
    let f = fixture("efficientnet_timm");
    f.check_image();
    assert_eq!(f.model.info.labels.as_ref().map(Vec::len), Some(5));
}

#[test]
fn efficientnet_timm_tf_same_padding() {
    fixture("efficientnet_timm_tf").check_image();
}

#[test]
fn efficientnet_transformers() {
    let f = fixture("efficientnet_hf");
    f.check_image();
    assert_eq!(f.model.info.labels.as_ref().map(Vec::len), Some(5));
}

/// The full-size timm `efficientnet_b0` state dict (key names and shapes only, as zeros) loads
/// strictly: every tensor is used and has the shape our block-string decoding predicts.
#[test]
fn efficientnet_timm_b0_full_size_keys() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/families/timm_efficientnet_b0_keys.json");
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tensors: HashMap<String, Tensor> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let shape: Vec<usize> = serde_json::from_value(k["shape"].clone()).unwrap();
            let dtype = if k["dtype"] == "int64" {
                DType::I64
            } else {
                DType::F32
            };
            (
                k["name"].as_str().unwrap().to_string(),
                Tensor::zeros(shape, dtype, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let w = visenc_weights::Weights::new(tensors, "efficientnet_b0", DType::F32, &Device::Cpu);
    let model = visenc_models::efficientnet::load_timm(
        "efficientnet_b0.ra_in1k",
        &serde_json::json!({}),
        &w,
    )
    .unwrap();
    w.finish(LoadPolicy::Strict)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((model.info.num_layers, model.info.hidden_size), (16, 1280));
}
