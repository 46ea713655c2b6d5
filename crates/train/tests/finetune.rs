//! Fine-tuning against PyTorch (gradients and AdamW steps, fixtures/train/finetune_vit.safetensors from
//! scripts/fixtures/train_finetune.py) and the exactness of resuming from a checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use visenc_train::finetune::run::{fit, Data, Event, RunConfig};
use visenc_train::finetune::{FineTuner, Method};
use visenc_train::optim::AdamWConfig;
use visenc_train::{stratified_split, LabelledImages};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const MODEL: &str = "fixtures/models/vit_hf_classifier";

/// The fixture model's labels, in id order: the head is kept.
fn labels5() -> Vec<String> {
    [
        "tabby cat",
        "golden retriever",
        "espresso",
        "space shuttle",
        "motor scooter",
    ]
    .map(String::from)
    .to_vec()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-30)
}

/// Tolerance of the issue: relative error <= 1e-4.
const TOL: f32 = 1e-4;

/// One backward and two AdamW steps of the last block + final norm + head, and of LoRA adapters on
/// q/k/v/out + head, equal PyTorch's (gradients, weights after each step, learning rates).
#[test]
fn one_step_matches_pytorch() {
    let fx = candle_core::safetensors::load(
        repo().join("fixtures/train/finetune_vit.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let pixels = &fx["pixels"];
    let labels: Vec<u32> = fx["labels"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|l| l as u32)
        .collect();
    let cfg = AdamWConfig {
        weight_decay: 0.05,
        ..AdamWConfig::default()
    };
    let sched = visenc_train::optim::CosineSchedule {
        base_lr: 1e-3,
        warmup: 0,
        total: 10,
    };
    let model = repo().join(MODEL);
    for (variant, method) in [
        ("lastn", Method::LastN { n: 1 }),
        (
            "lora",
            Method::Lora {
                rank: 4,
                alpha: 8.0,
            },
        ),
    ] {
        let mut t = FineTuner::new(model.to_str().unwrap(), &labels5(), method, cfg, 0).unwrap();
        let names: Vec<String> = t.opt.params().iter().map(|p| p.name.clone()).collect();
        let want: Vec<&String> = fx
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{variant}.grad.")).map(|_| k))
            .collect();
        assert_eq!(
            names.len(),
            want.len(),
            "{variant}: trainable tensors {names:?}"
        );
        for n in &names {
            if let Some(init) = fx.get(&format!("lora.init.{n}")) {
                t.set_param(n, init).unwrap();
            }
        }
        let (loss, grads) = t.loss_and_grads(pixels, &labels).unwrap();
        let want_loss = fx[&format!("{variant}.loss1")].to_vec1::<f32>().unwrap()[0];
        assert!(
            (loss - want_loss).abs() < 1e-5 * want_loss.abs(),
            "{variant}: loss {loss} vs {want_loss}"
        );
        // The key bias's true gradient is zero (it shifts each query's scores by a constant, which
        // softmax ignores): both sides hold rounding noise there, so each gradient's error is taken
        // relative to the largest of its own values and 1e-3 of the largest gradient of the step.
        let scale = names
            .iter()
            .map(|n| max_abs(&fx[&format!("{variant}.grad.{n}")]))
            .fold(0f32, f32::max);
        let (mut worst_grad, mut worst_weight) = (0f32, 0f32);
        for n in &names {
            let g = t
                .grad(&grads, n)
                .unwrap_or_else(|| panic!("{variant}: no gradient for {n}"));
            let want = &fx[&format!("{variant}.grad.{n}")];
            let e = max_abs(&(&g - want).unwrap()) / max_abs(want).max(1e-3 * scale);
            assert!(e <= TOL, "{variant}: gradient of {n}: relative error {e}");
            worst_grad = worst_grad.max(e);
            if n.ends_with("key.bias") {
                assert!(max_abs(want) < 1e-6 * scale && max_abs(&g) < 1e-6 * scale);
            }
        }
        t.opt.step(&grads, sched.lr(0)).unwrap();
        for step in [1, 2] {
            if step == 2 {
                t.step(pixels, &labels, sched.lr(1)).unwrap();
            }
            for n in &names {
                let got = t.opt.param(n).unwrap().as_tensor();
                let want = &fx[&format!("{variant}.step{step}.{n}")];
                if n.ends_with("key.bias") {
                    // AdamW scales the rounding noise of its zero gradient up to steps of about the
                    // learning rate, in directions that differ between the two: both stay within
                    // one learning rate per step of each other.
                    let d = max_abs(&(got - want).unwrap());
                    assert!(
                        d <= 2e-3 * step as f32,
                        "{variant}: {n} after step {step}: {d}"
                    );
                    continue;
                }
                let e = rel_err(got, want);
                assert!(
                    e <= TOL,
                    "{variant}: {n} after step {step}: relative error {e}"
                );
                worst_weight = worst_weight.max(e);
            }
        }
        eprintln!("{variant}: worst relative errors: gradients {worst_grad:.2e}, weights {worst_weight:.2e}");
    }
    // The learning rates PyTorch used: transformers' cosine schedule.
    let bytes = std::fs::read(repo().join("fixtures/train/finetune_vit.safetensors")).unwrap();
    let (_, st) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let lrs: HashMap<String, Vec<f64>> =
        serde_json::from_str(&st.metadata().as_ref().unwrap()["lrs"]).unwrap();
    for (i, lr) in lrs["lastn"].iter().enumerate() {
        assert!((sched.lr(i as u64) - lr).abs() < 1e-12, "step {i}: {lr}");
    }
}

/// A two-class set made of the real photos, in a temporary directory.
fn photo_classes(dir: &Path) -> LabelledImages {
    let photos = repo().join("assets/photos");
    for (class, files) in [
        (
            "animal",
            &["chelsea.png", "astronaut.png", "grace_hopper.jpg"][..],
        ),
        (
            "object",
            &["coffee.png", "rocket.jpg", "motorcycle_left.png"][..],
        ),
    ] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for f in files {
            std::fs::copy(photos.join(f), dir.join(class).join(f)).unwrap();
        }
    }
    LabelledImages::open(dir).unwrap()
}

/// 2k steps straight equal k steps, a stop, a resume from the checkpoint and k more (LoRA, so the
/// optimiser state of every block's adapters and the augmentation stream are all exercised).
#[test]
fn resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let set = photo_classes(&tmp.path().join("data"));
    let split = stratified_split(&set.labels, 0.34, 0).unwrap();
    let enc = visenc::Encoder::load(
        repo().join(MODEL).to_str().unwrap(),
        &visenc::LoadOptions::default(),
    )
    .unwrap();
    let (h, w) = enc.info().image_size;
    let data = Data {
        set: &set,
        split: &split,
        eval: enc.preprocess(),
        size: (h as u32, w as u32),
        limits: Default::default(),
    };
    let method = Method::Lora {
        rank: 2,
        alpha: 4.0,
    };
    let cfg = RunConfig {
        epochs: 2,
        batch: 2,
        lr: 1e-2,
        warmup: 1,
        seed: 9,
        save_every: 0,
        stop_at: None,
    };
    let new = || {
        FineTuner::new(
            repo().join(MODEL).to_str().unwrap(),
            &set.classes,
            method,
            AdamWConfig::default(),
            1,
        )
        .unwrap()
    };
    let mut straight = new();
    let mut events = Vec::new();
    let a = fit(
        &mut straight,
        &data,
        &cfg,
        &tmp.path().join("a"),
        false,
        |e| events.push(e),
    )
    .unwrap();
    assert_eq!((a.step, a.total), (4, 4));
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Epoch {
            epoch: 2,
            val: Some(_)
        }
    )));

    let out = tmp.path().join("b");
    let mut first = new();
    let stop = RunConfig {
        stop_at: Some(2),
        ..cfg.clone()
    };
    assert_eq!(
        fit(&mut first, &data, &stop, &out, false, |_| ())
            .unwrap()
            .step,
        2
    );
    assert!(
        !out.join("model.safetensors").exists(),
        "exported before the run ended"
    );
    let mut resumed = new();
    let mut events = Vec::new();
    let b = fit(&mut resumed, &data, &cfg, &out, true, |e| events.push(e)).unwrap();
    assert_eq!(events[0], Event::Resumed { step: 2 });
    assert_eq!(b.step, 4);
    for p in straight.opt.params() {
        let q = resumed.opt.param(&p.name).unwrap();
        let e = rel_err(q.as_tensor(), p.var.as_tensor());
        assert!(e <= 1e-6, "{}: {e}", p.name);
    }
    // The trained change is real (the adapters moved away from B = 0).
    let b0 = straight
        .opt
        .param("vit.encoder.layer.0.attention.attention.query.lora_B.weight")
        .unwrap();
    assert!(
        b0.as_tensor()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );

    // Other settings are refused by name.
    let other = RunConfig { lr: 5e-3, ..cfg };
    let err = fit(&mut new(), &data, &other, &out, true, |_| ())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("lr: 0.01 in the checkpoint, 0.005 now"),
        "{err}"
    );

    // The exported model (LoRA merged) loads for inference and gives the tuner's logits.
    let exported =
        visenc::Encoder::load(out.to_str().unwrap(), &visenc::LoadOptions::default()).unwrap();
    assert_eq!(exported.info().labels.as_deref(), Some(&set.classes[..]));
    let px = exported.load_image(&set.paths[0]).unwrap();
    let f = exported
        .encode_pixels(std::slice::from_ref(&px), &Default::default())
        .unwrap();
    let x = Tensor::from_vec(px.data, (1, 3, px.height, px.width), &Device::Cpu).unwrap();
    let want = resumed.logits(&x, false).unwrap();
    assert!(rel_err(f.logits.as_ref().unwrap(), &want) < 1e-5);
}

/// timm layout: LoRA on the fused `attn.qkv` and `attn.proj`, a new head for the data's classes, and the
/// exported checkpoint (labels in `label_names`, `num_classes`) gives the tuner's logits.
#[test]
fn timm_vit_trains_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let set = photo_classes(&tmp.path().join("data"));
    let split = stratified_split(&set.labels, 0.34, 0).unwrap();
    let spec = repo().join("fixtures/models/vit_timm");
    let spec = spec.to_str().unwrap();
    let enc = visenc::Encoder::load(spec, &visenc::LoadOptions::default()).unwrap();
    let (h, w) = enc.info().image_size;
    let data = Data {
        set: &set,
        split: &split,
        eval: enc.preprocess(),
        size: (h as u32, w as u32),
        limits: Default::default(),
    };
    let method = Method::Lora {
        rank: 2,
        alpha: 2.0,
    };
    let mut t = FineTuner::new(spec, &set.classes, method, AdamWConfig::default(), 0).unwrap();
    let names: Vec<&str> = t.opt.params().iter().map(|p| p.name.as_str()).collect();
    assert!(
        names.contains(&"blocks.0.attn.qkv.lora_A.weight"),
        "{names:?}"
    );
    assert!(names.contains(&"head.weight") && names.contains(&"blocks.1.attn.proj.lora_B.weight"));
    let cfg = RunConfig {
        epochs: 1,
        batch: 2,
        lr: 1e-2,
        warmup: 0,
        seed: 0,
        save_every: 0,
        stop_at: None,
    };
    let out = tmp.path().join("out");
    fit(&mut t, &data, &cfg, &out, false, |_| ()).unwrap();
    let exported =
        visenc::Encoder::load(out.to_str().unwrap(), &visenc::LoadOptions::default()).unwrap();
    assert_eq!(exported.info().labels.as_deref(), Some(&set.classes[..]));
    let px = exported.load_image(&set.paths[3]).unwrap();
    let f = exported
        .encode_pixels(std::slice::from_ref(&px), &Default::default())
        .unwrap();
    let x = Tensor::from_vec(px.data, (1, 3, px.height, px.width), &Device::Cpu).unwrap();
    assert!(rel_err(f.logits.as_ref().unwrap(), &t.logits(&x, false).unwrap()) < 1e-5);
}
