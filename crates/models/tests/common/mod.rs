//! The harness shared by the parity tests: a fixture is a checkpoint directory saved by the
//! reference library plus `expected.safetensors`, loaded exactly as a user's would be
//! (`Checkpoint::open`, strict load report), and compared with named tolerances.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use visenc_models::{load, EncodeOptions, LoadedModel, Precision};
use visenc_weights::{Checkpoint, LoadPolicy};

/// Max relative error allowed in f32: max|ours - reference| / max|reference|.
pub const F32_TOL: f32 = 1e-4;
/// A batch of one must give the batch's row (only summation order may differ).
pub const BATCH_TOL: f32 = 1e-5;

pub struct Fixture {
    pub name: &'static str,
    pub model: LoadedModel,
    pub expected: HashMap<String, Tensor>,
}

/// `fixtures/<group>/<name>` (group: `models`, `families`).
pub fn fixture_dir(group: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(group)
        .join(name)
}

pub fn load_fixture(group: &str, name: &'static str) -> Fixture {
    load_fixture_in(group, name, Precision::F32)
}

/// A fixture whose linear layers run in `precision`.
pub fn load_fixture_in(group: &str, name: &'static str, precision: Precision) -> Fixture {
    let dir = fixture_dir(group, name);
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let w = ckpt
        .load_weights(DType::F32, &Device::Cpu)
        .unwrap()
        .with_precision(precision);
    let (model, report) =
        load(&ckpt, &w, LoadPolicy::Strict).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(report.is_clean());
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    Fixture {
        name,
        model,
        expected,
    }
}

pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shape");
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max((ours - reference).unwrap()) / max(reference.clone()).max(1e-12)
}

impl Fixture {
    pub fn get(&self, k: &str) -> &Tensor {
        self.expected
            .get(k)
            .unwrap_or_else(|| panic!("{}: fixture lacks {k}", self.name))
    }

    /// Each image of `px` encoded alone gives its row of the batch's `pooled` (within BATCH_TOL).
    pub fn check_single_equals_batch(&self, px: &Tensor, batch_pooled: &Tensor) {
        for i in 0..px.dim(0).unwrap() {
            let one = self
                .model
                .image
                .encode(&px.narrow(0, i, 1).unwrap(), &EncodeOptions::default())
                .unwrap();
            let e = rel_err(&one.pooled, &batch_pooled.narrow(0, i, 1).unwrap());
            assert!(
                e <= BATCH_TOL,
                "{}: single image {i} differs from its batch row by {e:e}",
                self.name
            );
        }
    }

    pub fn check(&self, what: &str, ours: &Tensor, key: &str) {
        let e = rel_err(ours, self.get(key));
        assert!(
            e <= F32_TOL,
            "{}: {what} vs {key}: relative error {e:e} > {F32_TOL:e}",
            self.name
        );
    }
}
