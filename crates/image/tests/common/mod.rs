//! Shared helpers of the integration tests: fixture and photo loading, pixel comparison.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use visenc_image::RgbImage;

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/preprocess")
}

/// The directory of real photos; fails with instructions when it has not been fetched.
pub fn photos_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/photos");
    assert!(
        dir.join("chelsea.png").exists(),
        "{} is missing: run scripts/fetch-assets.sh from the repository root first",
        dir.display()
    );
    dir
}

pub fn manifest() -> Value {
    let path = fixtures_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with scripts/fixtures/preprocess.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("manifest.json is JSON")
}

/// A safetensors file of reference arrays, read once per call.
pub struct Tensors(Vec<u8>);

impl Tensors {
    pub fn load(name: &str) -> Self {
        let path = fixtures_dir().join(name);
        Tensors(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn view(&self, key: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.0).expect("valid safetensors");
        let t = st
            .tensor(key)
            .unwrap_or_else(|e| panic!("tensor {key}: {e}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    /// An HxWx3 u8 array as an image.
    pub fn image(&self, key: &str) -> RgbImage {
        let (dtype, shape, data) = self.view(key);
        assert_eq!(dtype, Dtype::U8, "{key}");
        assert_eq!(shape.len(), 3, "{key}: shape {shape:?}");
        assert_eq!(shape[2], 3, "{key}: shape {shape:?}");
        RgbImage::from_raw(shape[1] as u32, shape[0] as u32, data).expect("HxWx3 bytes")
    }

    pub fn f32s(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let (dtype, shape, data) = self.view(key);
        assert_eq!(dtype, Dtype::F32, "{key}");
        let values = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (shape, values)
    }
}

/// How far an image is from the reference.
#[derive(Debug, Clone, Copy)]
pub struct Diff {
    pub values: usize,
    pub exact: usize,
    pub within_one: usize,
    pub max: u8,
}

impl Diff {
    pub fn of(ours: &RgbImage, reference: &RgbImage, what: &str) -> Diff {
        assert_eq!(ours.dimensions(), reference.dimensions(), "{what}: size");
        let mut d = Diff {
            values: 0,
            exact: 0,
            within_one: 0,
            max: 0,
        };
        for (a, b) in ours.as_raw().iter().zip(reference.as_raw()) {
            let diff = a.abs_diff(*b);
            d.values += 1;
            d.exact += usize::from(diff == 0);
            d.within_one += usize::from(diff <= 1);
            d.max = d.max.max(diff);
        }
        d
    }

    pub fn exact_fraction(&self) -> f64 {
        self.exact as f64 / self.values as f64
    }

    pub fn within_one_fraction(&self) -> f64 {
        self.within_one as f64 / self.values as f64
    }
}

pub fn crop(img: &RgbImage, box_: &Value) -> RgbImage {
    let b: Vec<u32> = box_
        .as_array()
        .expect("crop_box is [left, top, right, bottom]")
        .iter()
        .map(|v| v.as_u64().expect("integer") as u32)
        .collect();
    image::imageops::crop_imm(img, b[0], b[1], b[2] - b[0], b[3] - b[1]).to_image()
}
