//! `visenc embed` run as a user runs it: every output format (JSON lines, `.npy` with its row index
//! and per-layer arrays, Parquet), hidden layers and tokens, normalisation and batching, checked
//! against the reference tensors of the fixtures and against the library.

mod common;

use std::path::Path;

use candle_core::Device;
use common::{cosine, f32_vec, fixture, max_abs_diff, norm, photo, read_npy, visenc};

const PHOTO_MIN_COSINE: f32 = 0.9999;

fn expected(name: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    let path = common::root()
        .join("fixtures/models")
        .join(name)
        .join("expected.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

fn flat(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn embed_jsonl_rows_follow_input_order_and_match_the_reference_photo() {
    let photos = [
        photo("chelsea.png"),
        photo("rocket.jpg"),
        photo("coffee.png"),
    ];
    let mut args = vec![
        "embed".to_string(),
        "-q".into(),
        "-m".into(),
        fixture("clip_hf_gelu"),
    ];
    args.extend(photos.iter().cloned());
    let run = visenc(&args);
    run.expect_code(0);
    let rows = run.json_lines();
    assert_eq!(rows.len(), 3);
    for (row, p) in rows.iter().zip(&photos) {
        assert_eq!(row["path"], p.as_str());
        assert_eq!(
            row["embedding"].as_array().unwrap().len(),
            16,
            "CLIP: the projected embedding"
        );
        assert_eq!(
            row["pooled"].as_array().unwrap().len(),
            48,
            "CLIP: the pooled feature alongside"
        );
    }
    // The first row is chelsea.png through the checkpoint's own (PIL-backend) preprocessing.
    let e = expected("clip_hf_gelu");
    let c = cosine(
        &f32_vec(&rows[0]["embedding"]),
        &flat(&e["photo_pil_image_embeds"]),
    );
    assert!(
        c >= PHOTO_MIN_COSINE,
        "embedding vs photo_pil_image_embeds: cosine {c}"
    );
    let c = cosine(&f32_vec(&rows[0]["pooled"]), &flat(&e["photo_pil_pooled"]));
    assert!(
        c >= PHOTO_MIN_COSINE,
        "pooled vs photo_pil_pooled: cosine {c}"
    );
    // Different photos, different rows.
    assert!(
        cosine(
            &f32_vec(&rows[0]["embedding"]),
            &f32_vec(&rows[1]["embedding"])
        ) < 0.999
    );

    // `-o x.jsonl` writes the same lines to the file and nothing to stdout.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.jsonl");
    args.extend(["-o".into(), out.display().to_string()]);
    let to_file = visenc(&args);
    to_file.expect_code(0);
    assert!(to_file.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), run.stdout);
}

#[test]
fn embed_gives_the_same_rows_whatever_the_batch_size() {
    let photos = [
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "astronaut.png",
        "grace_hopper.jpg",
    ]
    .map(photo);
    let run_with = |batch: &str| {
        let mut args = vec!["embed", "-q", "--batch", batch, "-m"];
        let model = fixture("vit_timm_reg");
        args.push(&model);
        args.extend(photos.iter().map(String::as_str));
        let run = visenc(&args);
        run.expect_code(0);
        run.json_lines()
    };
    let (one, two, all) = (run_with("1"), run_with("2"), run_with("8"));
    assert_eq!(all.len(), 5);
    for i in 0..5 {
        assert_eq!(one[i]["path"], photos[i].as_str());
        assert_eq!(two[i]["path"], photos[i].as_str());
        let a = f32_vec(&all[i]["embedding"]);
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        for other in [&one[i], &two[i]] {
            let d = max_abs_diff(&a, &f32_vec(&other["embedding"]));
            assert!(d <= 1e-5 * scale, "row {i}: batch sizes differ by {d}");
        }
    }
}

#[test]
fn embed_timm_photo_matches_the_reference() {
    let run = visenc(&[
        "embed",
        "-q",
        "-m",
        &fixture("vit_timm_reg"),
        &photo("chelsea.png"),
    ]);
    run.expect_code(0);
    let row = &run.json_lines()[0];
    assert!(
        row.get("pooled").is_none(),
        "no projection: the embedding is the pooled feature"
    );
    let c = cosine(
        &f32_vec(&row["embedding"]),
        &flat(&expected("vit_timm_reg")["photo_pooled"]),
    );
    assert!(
        c >= PHOTO_MIN_COSINE,
        "timm pre-logits vs photo_pooled: cosine {c}"
    );
}

/// `.npy` output: the embedding matrix, its row index, and one array per layer and token set, all with
/// the shapes the model implies; and the same numbers the JSON lines output carries.
#[test]
fn embed_npy_writes_embeddings_paths_layers_and_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("emb.npy");
    let photos = [
        photo("chelsea.png"),
        photo("rocket.jpg"),
        photo("coffee.png"),
    ];
    let model = fixture("dinov2_reg_hf"); // 32x32, patch 8: 16 patches; CLS + 4 registers; width 48
    let mut args: Vec<&str> = vec!["embed", "-q", "-m", &model, "--layers", "-2,-1", "--tokens"];
    args.extend(photos.iter().map(String::as_str));
    let mut npy_args = args.clone();
    let out_s = out.display().to_string();
    npy_args.extend(["-o", &out_s]);
    visenc(&npy_args).expect_code(0);

    let emb = read_npy(&out);
    assert_eq!(emb.shape, [3, 48]);
    let paths = std::fs::read_to_string(tmp.path().join("emb.paths.txt")).unwrap();
    assert_eq!(
        paths.lines().collect::<Vec<_>>(),
        photos.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let l1 = read_npy(&tmp.path().join("emb.layer-1.npy"));
    let l2 = read_npy(&tmp.path().join("emb.layer-2.npy"));
    let prefix = read_npy(&tmp.path().join("emb.prefix_tokens.npy"));
    let patches = read_npy(&tmp.path().join("emb.patch_tokens.npy"));
    assert_eq!(l1.shape, [3, 21, 48]);
    assert_eq!(l2.shape, [3, 21, 48]);
    assert_eq!(prefix.shape, [3, 5, 48]);
    assert_eq!(patches.shape, [3, 16, 48]);
    assert!(
        max_abs_diff(&l1.data, &l2.data) > 1e-3,
        "layers -1 and -2 must differ"
    );

    // JSON lines of the same run carry the same numbers (f32 printed exactly).
    let jsonl = visenc(&args);
    jsonl.expect_code(0);
    let rows = jsonl.json_lines();
    assert_eq!(rows.len(), 3);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["grid"], serde_json::json!([4, 4]));
        let rows2 = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array().unwrap().iter().flat_map(f32_vec).collect()
        };
        assert_eq!(f32_vec(&row["embedding"]), emb.data[i * 48..(i + 1) * 48]);
        assert_eq!(
            rows2(&row["layers"]["-1"]),
            l1.data[i * 21 * 48..(i + 1) * 21 * 48]
        );
        assert_eq!(
            rows2(&row["layers"]["-2"]),
            l2.data[i * 21 * 48..(i + 1) * 21 * 48]
        );
        assert_eq!(
            rows2(&row["prefix_tokens"]),
            prefix.data[i * 5 * 48..(i + 1) * 5 * 48]
        );
        assert_eq!(
            rows2(&row["patch_tokens"]),
            patches.data[i * 16 * 48..(i + 1) * 16 * 48]
        );
    }

    // DINOv2's pooled output is the CLS token after the final norm: the first prefix token.
    assert_eq!(prefix.data[..48], emb.data[..48]);
    // The reference photo embedding, through .npy.
    let c = cosine(
        &emb.data[..48],
        &flat(&expected("dinov2_reg_hf")["photo_pil_pooled"]),
    );
    assert!(
        c >= PHOTO_MIN_COSINE,
        "npy row 0 vs photo_pil_pooled: cosine {c}"
    );
}

fn read_parquet(path: &Path) -> (Vec<String>, Vec<Vec<f32>>, usize) {
    use arrow_array::{Array, FixedSizeListArray, Float32Array, StringArray};
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let (mut paths, mut embs, mut dim) = (vec![], vec![], 0);
    for batch in reader {
        let batch = batch.unwrap();
        let p = batch
            .column_by_name("image_path")
            .expect("image_path column");
        let p = p
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("image_path is a string column");
        let e = batch.column_by_name("embedding").expect("embedding column");
        let e = e
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .expect("embedding is a fixed-size list");
        dim = e.value_length() as usize;
        for i in 0..batch.num_rows() {
            paths.push(p.value(i).to_string());
            let v = e.value(i);
            embs.push(
                v.as_any()
                    .downcast_ref::<Float32Array>()
                    .expect("f32 values")
                    .values()
                    .to_vec(),
            );
        }
    }
    (paths, embs, dim)
}

#[test]
fn embed_parquet_has_a_row_per_good_image_with_path_and_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n").unwrap();
    let out = tmp.path().join("emb.parquet");
    let (a, b) = (photo("astronaut.png"), photo("motorcycle_left.png"));
    let model = fixture("siglip_hf");
    let (bad_s, out_s) = (bad.display().to_string(), out.display().to_string());
    let run = visenc(&["embed", "-q", "-m", &model, &a, &bad_s, &b, "-o", &out_s]);
    run.expect_code(1);
    assert!(run.stderr.contains(&bad_s), "{}", run.stderr);
    let (paths, embs, dim) = read_parquet(&out);
    assert_eq!(paths, [a.clone(), b.clone()]);
    assert_eq!(dim, 32);
    assert!(embs.iter().all(|e| e.len() == 32));

    let jsonl = visenc(&["embed", "-q", "-m", &model, &a, &b]);
    jsonl.expect_code(0);
    for (row, e) in jsonl.json_lines().iter().zip(&embs) {
        assert_eq!(&f32_vec(&row["embedding"]), e, "parquet and jsonl values");
    }
}

#[test]
fn embed_normalize_gives_unit_rows_in_the_same_direction() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("clip_open_clip");
    let (a, b) = (photo("chelsea.png"), photo("grace_hopper.jpg"));
    let raw = visenc(&["embed", "-q", "-m", &model, &a, &b]);
    raw.expect_code(0);
    let unit = visenc(&["embed", "-q", "--normalize", "-m", &model, &a, &b]);
    unit.expect_code(0);
    let out = tmp.path().join("unit.npy").display().to_string();
    visenc(&[
        "embed",
        "-q",
        "--normalize",
        "-m",
        &model,
        &a,
        &b,
        "-o",
        &out,
    ])
    .expect_code(0);
    let npy = read_npy(Path::new(&out));
    assert_eq!(npy.shape, [2, 24]);
    for (i, (r, u)) in raw.json_lines().iter().zip(unit.json_lines()).enumerate() {
        let (r, u) = (f32_vec(&r["embedding"]), f32_vec(&u["embedding"]));
        assert!(
            (norm(&r) - 1.0).abs() > 1e-2,
            "the raw embedding is not unit already (norm {})",
            norm(&r)
        );
        assert!((norm(&u) - 1.0).abs() < 1e-5, "row {i}: norm {}", norm(&u));
        assert!(cosine(&r, &u) > 0.99999, "row {i}: direction changed");
        assert!(
            (norm(&npy.data[i * 24..(i + 1) * 24]) - 1.0).abs() < 1e-5,
            "npy row {i}"
        );
    }
}

#[test]
fn parquet_refuses_layers_and_tokens_and_unknown_formats_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("vit_timm");
    let p = photo("chelsea.png");
    let out = tmp.path().join("x.parquet").display().to_string();
    for extra in [&["--layers", "-1"][..], &["--tokens"][..]] {
        let mut args = vec!["embed", "-q", "-m", &model, &p, "-o", &out];
        args.extend(extra);
        let run = visenc(&args);
        run.expect_code(2);
        assert!(run.stderr.contains(".parquet"), "{}", run.stderr);
    }
    let out = tmp.path().join("x.csv").display().to_string();
    let run = visenc(&["embed", "-q", "-m", &model, &p, "-o", &out]);
    run.expect_code(2);
    assert!(
        run.stderr.contains("x.csv") && run.stderr.contains(".npy"),
        "{}",
        run.stderr
    );
}
