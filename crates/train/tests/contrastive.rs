//! The contrastive losses against open_clip (`fixtures/train/losses.safetensors`, made by
//! `scripts/fixtures/train_losses.py`): loss values, gradients, the locked-image mode and three AdamW steps
//! of a LiT text projection equal PyTorch's.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use visenc_train::{Contrastive, LossKind};

/// Max relative error (max |ours - reference| / max |reference|) allowed: the reference is float64 from the
/// same float32 inputs, so this is float32 rounding only.
const TOL: f32 = 1e-5;

fn fixture() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/train/losses.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).expect("fixtures/train/losses.safetensors")
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let diff = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap();
    let diff = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let scale = scale.to_scalar::<f32>().unwrap();
    let rel = diff / scale;
    assert!(rel <= TOL, "{what}: max relative error {rel:e} > {TOL:e}");
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

fn run(kind: LossKind, lock_image: bool) {
    let f = fixture();
    let image = Var::from_tensor(&f["image_raw"]).unwrap();
    let text = Var::from_tensor(&f["text_raw"]).unwrap();
    let bias = (kind == LossKind::Siglip).then(|| scalar(&f["logit_bias"]));
    let loss_fn = Contrastive::with_init(
        kind,
        lock_image,
        scalar(&f["log_logit_scale"]),
        bias,
        &Device::Cpu,
    )
    .unwrap();
    let loss = loss_fn.loss(image.as_tensor(), text.as_tensor()).unwrap();
    let p = match kind {
        LossKind::Clip => "clip",
        LossKind::Siglip => "siglip",
    };
    assert_close(&format!("{p}.loss"), &loss, &f[&format!("{p}.loss")]);
    let grads = loss.backward().unwrap();
    let g = |v: &Var| grads.get(v.as_tensor()).cloned();
    assert_close(
        &format!("{p}.grad_text"),
        &g(&text).unwrap(),
        &f[&format!("{p}.grad_text")],
    );
    let scale_grad = g(&loss_fn.log_logit_scale).unwrap();
    assert_close(
        &format!("{p}.grad_log_logit_scale"),
        &scale_grad,
        &f[&format!("{p}.grad_log_logit_scale")],
    );
    if let Some(b) = &loss_fn.logit_bias {
        assert_close(
            "siglip.grad_logit_bias",
            &g(b).unwrap(),
            &f["siglip.grad_logit_bias"],
        );
    }
    if lock_image {
        assert!(
            g(&image).is_none(),
            "a locked image tower must get no gradient"
        );
    } else {
        assert_close(
            &format!("{p}.grad_image"),
            &g(&image).unwrap(),
            &f[&format!("{p}.grad_image")],
        );
    }
}

#[test]
fn clip_loss_and_gradients_equal_open_clip() {
    run(LossKind::Clip, false);
}

#[test]
fn siglip_loss_and_gradients_equal_open_clip() {
    run(LossKind::Siglip, false);
}

#[test]
fn locked_image_tower_gets_no_gradient_and_text_gradients_are_unchanged() {
    run(LossKind::Clip, true);
    run(LossKind::Siglip, true);
}

#[test]
fn lit_projection_adamw_steps_equal_pytorch() {
    let f = fixture();
    let w = Var::from_tensor(&f["step.w0"]).unwrap();
    let loss_fn = Contrastive::with_init(
        LossKind::Clip,
        true,
        scalar(&f["log_logit_scale"]),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let params = |weight_decay| ParamsAdamW {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay,
    };
    let mut opt_w = AdamW::new(vec![w.clone()], params(0.1)).unwrap();
    let mut opt_s = AdamW::new(loss_fn.vars(), params(0.0)).unwrap();
    let mut losses = vec![];
    for _ in 0..3 {
        let text = f["step.text_in"]
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap();
        let loss = loss_fn.loss(&f["image_raw"], &text).unwrap();
        let grads = loss.backward().unwrap();
        opt_w.step(&grads).unwrap();
        opt_s.step(&grads).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
    }
    assert_close(
        "step.losses",
        &Tensor::new(losses, &Device::Cpu).unwrap(),
        &f["step.losses"],
    );
    assert_close("step.w3", w.as_tensor(), &f["step.w3"]);
    assert_close(
        "step.log_logit_scale3",
        loss_fn.log_logit_scale.as_tensor(),
        &f["step.log_logit_scale3"],
    );
}

#[test]
fn mismatched_features_are_refused() {
    let loss_fn = Contrastive::new(LossKind::Clip, false, &Device::Cpu).unwrap();
    let a = Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((4, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = loss_fn.loss(&a, &b).unwrap_err().to_string();
    assert!(err.contains("[4, 8]") && err.contains("[4, 6]"), "{err}");
    assert!(Contrastive::with_init(LossKind::Siglip, false, 1.0, None, &Device::Cpu).is_err());
}
