//! `visenc llm-tokens` on the tiny LLaVA / LLaVA-NeXT fixtures and real photos (whole and cropped
//! to odd aspect ratios): the written matrices equal transformers' `get_image_features` after its
//! processor (fixtures/llava/anyres_photos), the layouts' counts equal the processor's, and bad
//! inputs fail by name.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{png, read_npy, root, visenc};
use serde_json::Value;

const F32_REL_TOL: f32 = 1e-4;

fn llava(name: &str) -> String {
    root()
        .join("fixtures/llava")
        .join(name)
        .display()
        .to_string()
}

struct Reference {
    cases: Vec<Value>,
    expected: HashMap<String, Tensor>,
}

fn reference() -> Reference {
    let dir = root().join("fixtures/llava/anyres_photos");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    Reference {
        cases: m["cases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["processor"] == "saved")
            .cloned()
            .collect(),
        expected: candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
            .unwrap(),
    }
}

/// The case's image as a file: the photo itself, or its crop written as a PNG into `dir`.
fn image_file(case: &Value, dir: &Path) -> PathBuf {
    let photo = PathBuf::from(common::photo(case["photo"].as_str().unwrap()));
    let Some(b) = case["crop_box"].as_array() else {
        return photo;
    };
    let b: Vec<u32> = b.iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let img = visenc::image::open(&photo, &visenc::image::Limits::default()).unwrap();
    let bytes = png(b[2] - b[0], b[3] - b[1], |x, y| {
        img.get_pixel(b[0] + x, b[1] + y).0
    });
    let p = dir.join(format!("{}.png", case["key"].as_str().unwrap()));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn rel(ours: &[f32], shape: &[usize], reference: &Tensor) -> f32 {
    assert_eq!(shape, reference.dims(), "shape");
    let r = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let max_ref = r.iter().fold(0f32, |m, x| m.max(x.abs()));
    common::max_abs_diff(ours, &r) / max_ref
}

#[test]
fn llava_next_tokens_to_npy_and_safetensors_match_reference() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let good: Vec<&Value> = r
        .cases
        .iter()
        .filter(|c| c["key"] != "astronaut_tall")
        .collect();
    let files: Vec<String> = good
        .iter()
        .map(|c| image_file(c, tmp.path()).display().to_string())
        .collect();
    let out = tmp.path().join("tokens");
    let mut args = vec![
        "llm-tokens".to_string(),
        "-m".into(),
        llava("llava_next_hf"),
    ];
    args.extend(files.iter().cloned());
    args.extend(["--out".into(), out.display().to_string()]);
    visenc(&args).expect_code(0);
    let layouts: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("layout.json")).unwrap()).unwrap();
    assert_eq!(layouts.len(), good.len());
    for (i, (case, l)) in good.iter().zip(&layouts).enumerate() {
        let key = case["key"].as_str().unwrap();
        assert_eq!(l["path"], files[i].as_str());
        let n = l["num_tokens"].as_u64().unwrap();
        assert_eq!(n, case["processor_num_tokens"].as_u64().unwrap(), "{key}");
        let rows = l["unpadded_grid"][0].as_u64().unwrap();
        assert_eq!(l["newlines"].as_array().unwrap().len() as u64, rows);
        assert_eq!(l["image_token_index"], 63);
        let t = read_npy(&out.join(l["tokens_file"].as_str().unwrap()));
        let e = rel(
            &t.data,
            &t.shape,
            &r.expected[&format!("next_features.{key}")],
        );
        assert!(e <= F32_REL_TOL, "{key}: {e:e}");
    }
    // The same as one .safetensors file.
    let st = tmp.path().join("tokens.safetensors");
    let mut args = vec![
        "llm-tokens".to_string(),
        "-m".into(),
        llava("llava_next_hf"),
    ];
    args.extend(files.iter().cloned());
    args.extend(["--out".into(), st.display().to_string()]);
    visenc(&args).expect_code(0);
    let bytes = std::fs::read(&st).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().as_ref().unwrap();
    let layouts: Vec<Value> = serde_json::from_str(&meta["layouts"]).unwrap();
    let t = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    for (i, case) in good.iter().enumerate() {
        let key = case["key"].as_str().unwrap();
        let tokens = &t[&format!("tokens.{i}")];
        let v = tokens.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let e = rel(
            &v,
            tokens.dims(),
            &r.expected[&format!("next_features.{key}")],
        );
        assert!(e <= F32_REL_TOL, "{key}: {e:e}");
        let kinds = t[&format!("kinds.{i}")].to_vec1::<u32>().unwrap();
        let newlines: Vec<u64> = layouts[i]["newlines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        for (p, k) in kinds.iter().enumerate() {
            let want = if p < 16 {
                0
            } else if newlines.contains(&(p as u64)) {
                2
            } else {
                1
            };
            assert_eq!(*k, want, "{key} row {p}");
        }
    }
}

#[test]
fn llava_tokens_plain_path_and_layouts_on_stdout() {
    let r = reference();
    let case = r.cases.iter().find(|c| c["key"] == "chelsea").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let photo = common::photo("chelsea.png");
    visenc(&[
        "llm-tokens",
        "-m",
        &llava("llava_hf"),
        &photo,
        "--out",
        tmp.path().to_str().unwrap(),
    ])
    .expect_code(0);
    let t = read_npy(&tmp.path().join("0.tokens.npy"));
    let e = rel(&t.data, &t.shape, &r.expected["llava_features.chelsea"]);
    assert!(e <= F32_REL_TOL, "{e:e}");
    // Without --out: the layouts alone, one JSON line per image.
    let run = visenc(&["llm-tokens", "-m", &llava("llava_next_hf"), &photo]);
    let lines = run.expect_code(0).json_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["num_tokens"], case["processor_num_tokens"]);
    assert_eq!(lines[0]["family"], "llava_next");
    assert_eq!(lines[0]["image_size"], serde_json::json!([300, 451]));
}

/// Images the grid cannot use fail alone, naming the file and the setting; the rest is written.
#[test]
fn llm_tokens_bad_images_fail_alone() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let tall = r
        .cases
        .iter()
        .find(|c| c["key"] == "astronaut_tall")
        .unwrap();
    let tall = image_file(tall, tmp.path());
    let strip = tmp.path().join("strip.png");
    std::fs::write(&strip, png(10000, 1, |x, _| [(x % 256) as u8, 0, 0])).unwrap();
    let empty = tmp.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let out = tmp.path().join("out");
    let run = visenc(&[
        "llm-tokens",
        "-m",
        &llava("llava_next_hf"),
        tall.to_str().unwrap(),
        &common::photo("coffee.png"),
        strip.to_str().unwrap(),
        empty.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    run.expect_code(1);
    for (file, why) in [(&tall, "too thin"), (&strip, "too thin"), (&empty, "empty")] {
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains(file.to_str().unwrap()))
            .unwrap_or_else(|| panic!("no error for {}: {}", file.display(), run.stderr));
        assert!(line.contains(why), "{line}");
    }
    assert!(
        run.stderr.contains("image_grid_pinpoints"),
        "{}",
        run.stderr
    );
    let layouts: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("layout.json")).unwrap()).unwrap();
    assert_eq!(layouts.len(), 1);
    assert!(layouts[0]["path"].as_str().unwrap().ends_with("coffee.png"));
    // Over the pixel limit: refused before decoding, naming the limit.
    let run = visenc(&[
        "llm-tokens",
        "-m",
        &llava("llava_next_hf"),
        &common::photo("coffee.png"),
        "--max-pixels",
        "1000",
    ]);
    run.expect_code(1);
    assert!(run.stderr.contains("limit of 1000"), "{}", run.stderr);
}

#[test]
fn llm_tokens_model_errors_name_the_setting() {
    // Not a LLaVA-style model.
    let photo = common::photo("coffee.png");
    let run = visenc(&[
        "llm-tokens",
        "-m",
        &common::fixture("clip_hf_quickgelu"),
        &photo,
    ]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("not a LLaVA-style model"),
        "{}",
        run.stderr
    );
    // A projector that does not take the vision tower's width.
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("fixtures/llava/llava_hf");
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    t.insert(
        "multi_modal_projector.linear_1.weight".into(),
        Tensor::zeros((48, 40), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, tmp.path().join("model.safetensors")).unwrap();
    let run = visenc(&["llm-tokens", "-m", tmp.path().to_str().unwrap(), &photo]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("multi_modal_projector.linear_1")
            && run.stderr.contains("vision_config.hidden_size"),
        "{}",
        run.stderr
    );
    // An unknown projector activation.
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["projector_hidden_act"] = "swish_glu".into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let run = visenc(&["llm-tokens", "-m", tmp.path().to_str().unwrap(), &photo]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("projector_hidden_act"),
        "{}",
        run.stderr
    );
}
