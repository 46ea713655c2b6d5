//! Shared helpers of the facade's integration tests: fixture and photo paths, the reference tensors
//! and metadata of `expected.safetensors`, and the error measures the tests state their tolerances in.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use visenc::{Encoder, LoadOptions};

/// Every fixture under `fixtures/models/`, in the order the tests report them.
pub const FIXTURES: &[&str] = &[
    "clip_hf_gelu",
    "clip_hf_quickgelu",
    "clip_open_clip",
    "dinov2_hf",
    "dinov2_reg_hf",
    "siglip_hf",
    "vit_hf_classifier",
    "vit_timm",
    "vit_timm_reg",
];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture_dir(name: &str) -> PathBuf {
    root().join("fixtures/models").join(name)
}

/// A real photo; fails with instructions when the assets have not been fetched.
pub fn photo(name: &str) -> PathBuf {
    let p = root().join("assets/photos").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-assets.sh from the repository root first",
        p.display()
    );
    p
}

pub fn load(dir: &Path) -> Encoder {
    Encoder::load(dir.to_str().unwrap(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// `expected.safetensors` of a fixture: the reference tensors and the metadata that describes them.
pub struct Expected {
    pub name: String,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl Expected {
    pub fn load(name: &str) -> Self {
        let path = fixture_dir(name).join("expected.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors =
            candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("expected tensors");
        Self {
            name: name.to_string(),
            tensors,
            metadata,
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: fixture lacks {key}", self.name))
    }

    /// The first of `keys` the fixture holds.
    pub fn first_of<'a>(&self, keys: &[&'a str]) -> Option<&'a str> {
        keys.iter().copied().find(|k| self.has(k))
    }

    /// The texts the reference tokenized (metadata key `texts`, a JSON list).
    pub fn texts(&self) -> Vec<String> {
        let raw = self
            .metadata
            .get("texts")
            .unwrap_or_else(|| panic!("{}: no `texts` metadata", self.name));
        serde_json::from_str(raw).expect("texts metadata is a JSON list of strings")
    }
}

pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max|ours - reference| / max|reference|.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shape");
    let (a, b) = (f32s(ours), f32s(reference));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    diff / scale.max(1e-12)
}

/// Cosine similarity of two tensors taken as flat vectors.
pub fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let (a, b) = (f32s(a), f32s(b));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb).max(1e-30)) as f32
}
