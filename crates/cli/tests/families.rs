//! `visenc info` and `visenc embed` work for every family, and the generative encoders' latents and
//! VQ codes export to `.npy` and `.safetensors`.

mod common;

use common::{png, read_npy, root, visenc};

/// A small 64x48 test picture (the generative encoders run at the image's own size, and their
/// mid-block attention is quadratic in it: real photos are tested in `real_weights.rs` and the
/// visenc crate's tests).
fn picture(dir: &std::path::Path, name: &str) -> String {
    let p = dir.join(name);
    std::fs::write(
        &p,
        png(64, 48, |x, y| {
            [(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8]
        }),
    )
    .unwrap();
    p.display().to_string()
}

fn family(name: &str) -> String {
    root()
        .join("fixtures/families")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn info_and_embed_work_for_every_family() {
    let dir = tempfile::tempdir().unwrap();
    let pic = picture(dir.path(), "pic.png");
    for name in [
        "resnet_hf",
        "resnet_timm",
        "efficientnet_timm",
        "efficientnet_hf",
        "efficientnet_lite",
        "convnext_hf",
        "convnextv2_hf",
        "convnext_timm",
        "swin_hf",
        "maxvit_timm",
        "sd_vae",
        "vqgan",
    ] {
        let m = family(name);
        let info = visenc(&["info", "--json", "-m", &m]);
        info.expect_code(0);
        let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
        let width = v["info"]["hidden_size"].as_u64().unwrap() as usize;
        assert!(width > 0, "{name}: {}", info.stdout);
        let run = visenc(&["embed", "-q", "--features", "-m", &m, &pic]);
        run.expect_code(0);
        let rows = run.json_lines();
        assert_eq!(rows.len(), 1, "{name}");
        assert_eq!(
            rows[0]["embedding"].as_array().unwrap().len(),
            width,
            "{name}"
        );
    }
}

#[test]
fn vae_latents_export_to_safetensors_with_their_scaling_factor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latents.safetensors");
    let (a, b) = (picture(dir.path(), "a.png"), picture(dir.path(), "b.png"));
    let run = visenc(&[
        "embed",
        "-q",
        "-m",
        &family("sd_vae"),
        "-o",
        out.to_str().unwrap(),
        &a,
        &b,
    ]);
    run.expect_code(0);
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mean = st.tensor("latent_mean").unwrap();
    // The tiny VAE downsamples by 2: 64x48 pixels give 4 x 24 x 32 latents per image.
    assert_eq!(mean.dtype(), safetensors::Dtype::F32);
    assert_eq!(mean.shape(), &[2, 4, 24, 32]);
    assert!(st.tensor("latent_logvar").is_ok());
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["scaling_factor"], "0.18215");
    let paths: Vec<String> = serde_json::from_str(&meta["paths"]).unwrap();
    assert_eq!(paths.len(), mean.shape()[0]);
}

#[test]
fn vq_codes_export_to_npy_as_uint32_token_grids() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("codes.npy");
    let pic = picture(dir.path(), "pic.png");
    let run = visenc(&[
        "embed",
        "-q",
        "-m",
        &family("vqgan"),
        "-o",
        out.to_str().unwrap(),
        &pic,
    ]);
    run.expect_code(0);
    let raw = std::fs::read(dir.path().join("codes.codes.npy")).unwrap();
    let header =
        String::from_utf8_lossy(&raw[10..10 + u16::from_le_bytes([raw[8], raw[9]]) as usize])
            .to_string();
    assert!(header.contains("'descr': '<u4'"), "{header}");
    // The tiny VQGAN downsamples by 2 (one stride-2 block): 64x48 pixels give a 24x32 token grid.
    assert!(header.contains("(1, 24, 32)"), "{header}");
    let codes: Vec<u32> = raw[raw.len() - 24 * 32 * 4..]
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(codes.iter().all(|&c| c < 16), "codebook has 16 entries");
    assert_eq!(
        read_npy(&dir.path().join("codes.latent_mean.npy")).shape,
        vec![1, 4, 24, 32]
    );
}

/// `visenc bench --json` times a CNN family and reports its memory consistently: the start, the
/// load's peak, the RSS after loading and the whole run's peak in order, and the file-backed part.
#[test]
fn bench_reports_speed_and_memory() {
    for name in ["resnet_timm", "efficientnet_timm", "convnext_timm"] {
        let m = family(name);
        let args = [
            "bench", "--json", "-m", &m, "--batch", "2", "--size", "40x36",
        ];
        let run = visenc(&[&args[..], &["--iters", "2", "--warmup", "0"]].concat());
        run.expect_code(0);
        let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        let f = |k: &str| {
            v[k].as_f64()
                .unwrap_or_else(|| panic!("{name}: no {k}: {}", run.stdout))
        };
        assert_eq!(v["latency_s"]["n"], 2, "{name}");
        assert_eq!(
            (v["batch"].as_u64(), &v["size"]),
            (Some(2), &serde_json::json!([40, 36]))
        );
        assert!(
            f("img_per_s") > 0.0 && v["parameters"].as_u64() > Some(0),
            "{name}"
        );
        let (start, load_peak) = (f("rss_start_mib"), f("load_peak_rss_mib"));
        let (loaded, peak, file) = (
            f("rss_after_load_mib"),
            f("peak_rss_mib"),
            f("rss_file_mib"),
        );
        assert!(
            0.0 < start && start <= load_peak && loaded <= load_peak && load_peak <= peak,
            "{name}: start {start}, load peak {load_peak}, after load {loaded}, peak {peak}"
        );
        assert!(
            0.0 < file && file < peak,
            "{name}: file-backed {file} of {peak}"
        );
    }
}

/// `visenc bench --peak --json` measures the FMA peak of one thread and of the pool's threads; their
/// ratio is what `bench/compare.py` flags shared cores by.
#[test]
fn bench_peak_reports_thread_scaling() {
    let run = visenc(&["bench", "--peak", "--json", "--seconds", "0.05"]);
    run.expect_code(0);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let p = &v["fma_peak"];
    let f = |k: &str| {
        p[k].as_f64()
            .unwrap_or_else(|| panic!("no {k}: {}", run.stdout))
    };
    assert!(v["threads"].as_u64() >= Some(1), "{}", run.stdout);
    if cfg!(target_arch = "x86_64") {
        assert!(
            f("gflops") > 0.0 && f("gflops_1_thread") > 0.0,
            "{}",
            run.stdout
        );
        assert!(
            (f("scaling") - f("gflops") / f("gflops_1_thread")).abs() < 1e-9,
            "{}",
            run.stdout
        );
    }
    // Measuring a model and the peak at once is refused.
    visenc(&["bench", "--peak", "--kernels"]).expect_code(2);
}
