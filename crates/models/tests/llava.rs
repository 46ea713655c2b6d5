//! LLaVA / LLaVA-NeXT parity: tiny random-initialised transformers checkpoints (CLIP tower, 1-layer
//! Llama) under `fixtures/llava/`, written by `scripts/fixtures/llava.py`; projected image features and
//! the packed LLaVA-NeXT sequences compared with `get_image_features`; anyres geometry and token counts
//! compared with the reference on a table of image sizes.

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::Value;
use visenc_models::llava::{load_mm_projector, Anyres, ProjectorType};
use visenc_models::{EncodeOptions, MultimodalEncoder};
use visenc_weights::{Checkpoint, LoadPolicy};

mod common;

use common::{fixture_dir, load_fixture, rel_err, Fixture, BATCH_TOL};

fn fixture(name: &'static str) -> Fixture {
    load_fixture("llava", name)
}

fn mm(f: &Fixture) -> &dyn MultimodalEncoder {
    f.model.image.multimodal().expect("a multimodal encoder")
}

impl Fixture {
    fn image_features(&self, i: usize) -> Tensor {
        self.get("image_features").i(i).unwrap()
    }
}

#[test]
fn llava_hf_default_strategy_layer_minus_2() {
    // Keys named image_features.{i} are not in the file: compare rows of the stacked tensor.
    let f = fixture("llava_hf");
    let m = mm(&f);
    let px = f.get("pixel_values");
    for i in 0..2 {
        let v = m.encode_image(&px.narrow(0, i, 1).unwrap(), None).unwrap();
        let e = rel_err(&v.tokens, &f.image_features(i));
        assert!(e <= common::F32_TOL, "image {i}: {e:e}");
    }
    assert_eq!(m.num_tokens((32, 32)).unwrap(), 16);
    assert!(m.anyres_plan((32, 32)).unwrap().is_none());
}

#[test]
fn llava_hf_layer_list_full_strategy_no_bias() {
    let f = fixture("llava_hf_layers");
    let m = mm(&f);
    let px = f.get("pixel_values");
    for i in 0..2 {
        let v = m.encode_image(&px.narrow(0, i, 1).unwrap(), None).unwrap();
        assert_eq!(v.tokens.dims(), &[17, 48]);
        let e = rel_err(&v.tokens, &f.image_features(i));
        assert!(e <= common::F32_TOL, "image {i}: {e:e}");
    }
    assert_eq!(m.num_tokens((32, 32)).unwrap(), 17);
}

#[test]
fn llava_hf_tower_and_batch() {
    let f = fixture("llava_hf");
    assert_eq!(f.model.info.family, "llava");
    assert_eq!(f.model.info.architecture, "LlavaForConditionalGeneration");
    let px = f.get("pixel_values");
    let feats = f
        .model
        .image
        .encode(
            px,
            &EncodeOptions {
                layers: vec![0, 1, 2, 3],
                ..Default::default()
            },
        )
        .unwrap();
    for (i, h) in &feats.hidden_states {
        f.check("hidden state", h, &format!("hidden_states.{i}"));
    }
    // A batch through the multimodal API (one image per call) equals the reference's stacked batch.
    let m = mm(&f);
    let rows: Vec<Tensor> = (0..2)
        .map(|i| {
            m.encode_image(&px.narrow(0, i, 1).unwrap(), None)
                .unwrap()
                .tokens
        })
        .collect();
    f.check(
        "stacked features",
        &Tensor::stack(&rows, 0).unwrap(),
        "image_features",
    );
}

#[test]
fn llava_next_packed_sequences_with_newlines() {
    let f = fixture("llava_next_hf");
    assert_eq!(f.model.info.family, "llava_next");
    let m = mm(&f);
    let sizes = f.get("image_sizes").to_vec2::<i64>().unwrap();
    let lens = f.get("feature_lens").to_vec1::<i64>().unwrap();
    let newline = f.get("image_newline");
    for (k, hw) in sizes.iter().enumerate() {
        let size = (hw[0] as usize, hw[1] as usize);
        let tiles = f.get(&format!("pixel_values.{k}"));
        let v = m.encode_image(tiles, Some(size)).unwrap();
        assert_eq!(v.tokens.dim(0).unwrap() as i64, lens[k], "image {k} length");
        assert_eq!(
            m.num_tokens(size).unwrap() as i64,
            lens[k],
            "image {k} token count"
        );
        let plan = m.anyres_plan(size).unwrap().unwrap();
        assert_eq!(plan.num_tiles, tiles.dim(0).unwrap(), "image {k} tiles");
        f.check("packed sequence", &v.tokens, &format!("image_features.{k}"));
        // Each newline position holds image_newline, and they end the rows of the grid.
        assert!(!v.newlines.is_empty());
        assert_eq!(*v.newlines.last().unwrap() as i64, lens[k] - 1);
        for &p in &v.newlines {
            assert!(rel_err(&v.tokens.i(p).unwrap(), newline) < BATCH_TOL);
        }
    }
}

#[test]
fn llava_next_wrong_tile_count_is_refused() {
    let f = fixture("llava_next_hf");
    let tiles = f.get("pixel_values.0"); // 1 + 1x3 tiles for a 40x90 image
    let err = mm(&f)
        .encode_image(&tiles.narrow(0, 0, 3).unwrap(), Some((40, 90)))
        .unwrap_err();
    assert!(err.to_string().contains("tiles"), "{err}");
}

/// select_best_resolution, the resize and pad of the image processor, the tile count and the
/// processor's token count, for ~20 sizes, with llava-v1.6's configuration.
#[test]
fn anyres_geometry_and_token_counts_match_reference() {
    let path = fixture_dir("llava", "anyres_token_counts.json");
    let table: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let pair = |v: &Value| {
        (
            v[0].as_u64().unwrap() as usize,
            v[1].as_u64().unwrap() as usize,
        )
    };
    let tile = table["tile"].as_u64().unwrap() as usize;
    let a = Anyres {
        pinpoints: table["image_grid_pinpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(pair)
            .collect(),
        tile,
        side: tile / table["patch_size"].as_u64().unwrap() as usize,
    };
    let rows = table["sizes"].as_array().unwrap();
    assert!(rows.len() >= 20);
    for r in rows {
        let size = (
            r["height"].as_u64().unwrap() as usize,
            r["width"].as_u64().unwrap() as usize,
        );
        let p = a.plan(size);
        assert_eq!(p.best_resolution, pair(&r["best_resolution"]), "{size:?}");
        assert_eq!(p.resized, pair(&r["resized"]), "{size:?}");
        let pad: Vec<usize> = r["padding_left_top_right_bottom"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(p.padding.to_vec(), pad, "{size:?}");
        assert_eq!(
            p.num_tiles as u64,
            r["num_patches"].as_u64().unwrap(),
            "{size:?}"
        );
        assert_eq!(
            p.num_tokens as u64,
            r["num_image_tokens"].as_u64().unwrap(),
            "{size:?}"
        );
    }
}

/// A bare original-LLaVA `mm_projector.bin` (mlp2x_gelu), with the type given and read from the keys.
#[test]
fn original_llava_mm_projector_bin() {
    let dir = fixture_dir("llava", "mm_projector");
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    for kind in [Some(ProjectorType::MlpGelu(2)), None] {
        let ckpt = Checkpoint::open(dir.join("mm_projector.bin").to_str().unwrap()).unwrap();
        let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
        let p = load_mm_projector(&w, kind).unwrap();
        assert!(w.finish(LoadPolicy::Strict).unwrap().is_clean());
        assert_eq!(p.out_dim(), Some(48));
        let y = p.forward(&expected["input"]).unwrap();
        let e = rel_err(&y, &expected["output"]);
        assert!(e <= common::F32_TOL, "{kind:?}: {e:e}");
    }
    assert_eq!(
        "mlp2x_gelu".parse::<ProjectorType>().unwrap(),
        ProjectorType::MlpGelu(2)
    );
    assert_eq!(
        "linear".parse::<ProjectorType>().unwrap(),
        ProjectorType::Linear
    );
    assert_eq!(
        "identity".parse::<ProjectorType>().unwrap(),
        ProjectorType::Identity
    );
    assert!("mlp2x_relu".parse::<ProjectorType>().is_err());
}

/// The language model's tensors are ignored on purpose; any other stray tensor still fails the
/// strict load.
#[test]
fn llava_strict_load_still_reports_stray_tensors() {
    let dir = fixture_dir("llava", "llava_hf");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    t.insert(
        "multi_modal_projector.extra.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, tmp.path().join("model.safetensors")).unwrap();
    let ckpt = Checkpoint::open(tmp.path().to_str().unwrap()).unwrap();
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    let err = visenc_models::load(&ckpt, &w, LoadPolicy::Strict)
        .err()
        .expect("strict load must fail");
    assert!(
        err.to_string()
            .contains("multi_modal_projector.extra.weight"),
        "{err}"
    );
}

/// The hub's llava-hf checkpoints (saved by transformers 4.x) nest the tower as
/// `vision_tower.vision_model.*`; transformers 5 saves `vision_tower.*`. Both load to the same model.
#[test]
fn llava_next_hub_key_layout() {
    let f = fixture("llava_next_hf");
    let dir = fixture_dir("llava", "llava_next_hf");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    let t = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| match k.strip_prefix("vision_tower.") {
            Some(rest) => (format!("vision_tower.vision_model.{rest}"), v),
            None => (k, v),
        })
        .collect();
    candle_core::safetensors::save(&renamed, tmp.path().join("model.safetensors")).unwrap();
    let ckpt = Checkpoint::open(tmp.path().to_str().unwrap()).unwrap();
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    let (model, report) = visenc_models::load(&ckpt, &w, LoadPolicy::Strict).unwrap();
    assert!(report.is_clean());
    let m = model.image.multimodal().unwrap();
    let v = m
        .encode_image(f.get("pixel_values.1"), Some((70, 50)))
        .unwrap();
    f.check("packed sequence (hub keys)", &v.tokens, "image_features.1");
}

/// A copy of a fixture with its config and tensors edited, loaded strictly.
fn load_edited(
    name: &str,
    edit_cfg: impl Fn(&mut Value),
    edit_tensors: impl Fn(&mut std::collections::HashMap<String, Tensor>),
) -> Result<(), String> {
    let dir = fixture_dir("llava", name);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit_cfg(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let mut t =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    edit_tensors(&mut t);
    candle_core::safetensors::save(&t, tmp.path().join("model.safetensors")).unwrap();
    let ckpt = Checkpoint::open(tmp.path().to_str().unwrap()).unwrap();
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    visenc_models::load(&ckpt, &w, LoadPolicy::Strict)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn zeros(shape: (usize, usize)) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

/// Projector / vision-tower / language-model width mismatches and unknown projector settings are
/// refused at load time, naming the setting (not a shape error deep inside a matmul).
#[test]
fn llava_dimension_mismatches_name_the_setting() {
    let err = load_edited(
        "llava_hf",
        |_| {},
        |t| {
            t.insert(
                "multi_modal_projector.linear_1.weight".into(),
                zeros((48, 40)),
            );
        },
    )
    .unwrap_err();
    assert!(
        err.contains("multi_modal_projector.linear_1")
            && err.contains("takes 40 features but the vision tower gives 32"),
        "{err}"
    );
    // Two layers concatenated (llava_hf_layers) give 64 features.
    let err = load_edited(
        "llava_hf_layers",
        |c| c["vision_feature_layer"] = serde_json::json!([1, 2, -1]),
        |_| {},
    )
    .unwrap_err();
    assert!(
        err.contains("gives 96") && err.contains("3 vision_feature_layer"),
        "{err}"
    );
    let err = load_edited(
        "llava_hf",
        |_| {},
        |t| {
            t.insert(
                "multi_modal_projector.linear_2.weight".into(),
                zeros((48, 40)),
            );
        },
    )
    .unwrap_err();
    assert!(
        err.contains("multi_modal_projector.linear_2") && err.contains("layer before"),
        "{err}"
    );
    let err = load_edited(
        "llava_hf",
        |c| c["text_config"]["hidden_size"] = 64.into(),
        |_| {},
    )
    .unwrap_err();
    assert!(err.contains("text_config.hidden_size"), "{err}");
    let err = load_edited(
        "llava_next_hf",
        |_| {},
        |t| {
            t.insert(
                "image_newline".into(),
                Tensor::zeros(40, DType::F32, &Device::Cpu).unwrap(),
            );
        },
    )
    .unwrap_err();
    assert!(err.contains("image_newline"), "{err}");
    let err = load_edited(
        "llava_hf",
        |c| c["projector_hidden_act"] = "swish_glu".into(),
        |_| {},
    )
    .unwrap_err();
    assert!(
        err.contains("projector_hidden_act") && err.contains("swish_glu"),
        "{err}"
    );
    let err = load_edited(
        "llava_next_hf",
        |c| c["image_grid_pinpoints"] = serde_json::json!([[32, 48]]),
        |_| {},
    )
    .unwrap_err();
    assert!(err.contains("image_grid_pinpoints"), "{err}");
}

/// The original-LLaVA projector: an unknown type and a broken layer chain are named.
#[test]
fn mm_projector_bad_types_and_shapes() {
    let err = "mlp2x_relu"
        .parse::<ProjectorType>()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mm_projector_type") && err.contains("mlp2x_relu"),
        "{err}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut t = std::collections::HashMap::new();
    t.insert("model.mm_projector.0.weight".to_string(), zeros((48, 32)));
    t.insert(
        "model.mm_projector.0.bias".to_string(),
        Tensor::zeros(48, DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert("model.mm_projector.2.weight".to_string(), zeros((48, 40)));
    t.insert(
        "model.mm_projector.2.bias".to_string(),
        Tensor::zeros(48, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = tmp.path().join("mm_projector.safetensors");
    candle_core::safetensors::save(&t, &path).unwrap();
    let ckpt = Checkpoint::open(path.to_str().unwrap()).unwrap();
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    let err = load_mm_projector(&w, None).err().unwrap().to_string();
    assert!(
        err.contains("model.mm_projector.2") && err.contains("gives 48"),
        "{err}"
    );
    // A good projector against a tower of another width.
    let dir = fixture_dir("llava", "mm_projector");
    let ckpt = Checkpoint::open(dir.join("mm_projector.bin").to_str().unwrap()).unwrap();
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    let p = load_mm_projector(&w, None).unwrap();
    assert_eq!(p.in_dim(), Some(32));
    let err = p
        .check_input("mm_projector", 1024, "CLIP ViT-L/14 hidden_size")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("takes 32 features but the vision tower gives 1024"),
        "{err}"
    );
}

/// Sizes the anyres grid cannot use: refused by name, where the reference would keep no tile.
#[test]
fn anyres_refuses_images_too_thin_for_the_grid() {
    let f = fixture("llava_next_hf");
    let m = mm(&f);
    for size in [(10000, 1), (1, 10000), (512, 30), (0, 5)] {
        let err = m.num_tokens(size).unwrap_err().to_string();
        assert!(err.contains("LLaVA-NeXT"), "{size:?}: {err}");
        assert!(m.anyres_plan(size).is_err());
    }
    // 1x1 and 5x3 pixels still have a grid, as in the reference (fixtures/llava/anyres_photos).
    assert_eq!(m.num_tokens((1, 1)).unwrap(), 36);
    assert_eq!(m.num_tokens((5, 3)).unwrap(), 28);
}
