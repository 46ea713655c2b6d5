//! The locked-image alignment recovers a hidden linear relation between two spaces and generalises to
//! pairs it never saw; top-k accuracy counts ranks as expected.

use candle_core::{Device, Tensor};
use visenc_train::align::{top_k_accuracy, train_projection, AlignConfig, StateFile};
use visenc_train::LossKind;

#[test]
fn projection_learns_a_hidden_map_and_generalises_to_held_out_pairs() {
    // image = A text + noise, 16-d text, 24-d image; 200 training pairs, 50 held out.
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (24, 16), &dev).unwrap();
    let text = Tensor::randn(0f32, 1.0, (250, 16), &dev).unwrap();
    let noise = Tensor::randn(0f32, 0.3, (250, 24), &dev).unwrap();
    let image = (text.matmul(&a.t().unwrap()).unwrap() + noise).unwrap();
    let (tr_t, tr_i) = (
        text.narrow(0, 0, 200).unwrap(),
        image.narrow(0, 0, 200).unwrap(),
    );
    let (te_t, te_i) = (
        text.narrow(0, 200, 50).unwrap(),
        image.narrow(0, 200, 50).unwrap(),
    );
    let before = top_k_accuracy(
        &te_t
            .matmul(&Tensor::randn(0f32, 1.0, (16, 24), &dev).unwrap())
            .unwrap(),
        &te_i,
        &[1],
    )
    .unwrap()[0];
    let cfg = AlignConfig {
        steps: 300,
        lr: 1e-2,
        ..AlignConfig::default()
    };
    let aligned = train_projection(&tr_t, &tr_i, &cfg, None, |_, _| {}).unwrap();
    assert!(
        aligned.losses.last().unwrap() < &(aligned.losses[0] * 0.5),
        "{:?}",
        &aligned.losses[..5]
    );
    let projected = te_t.matmul(&aligned.weight.t().unwrap()).unwrap();
    let acc = top_k_accuracy(&projected, &te_i, &[1, 5]).unwrap();
    assert!(
        acc[0] >= 0.8 && acc[1] >= 0.95,
        "held-out top-1/top-5 {acc:?} (random projection: {before})"
    );
}

#[test]
fn top_k_counts_ranks_and_mismatched_pairs_are_refused() {
    let dev = Device::Cpu;
    let keys = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [0.7, 0.7]], &dev).unwrap();
    // Query 0 is closest to key 0 (rank 0); query 1 closest to key 2, key 1 second (rank 1);
    // query 2 closest to key 0 (rank 1 for its key 2).
    let queries = Tensor::new(&[[1f32, 0.1], [0.6, 0.8], [1.0, 0.2]], &dev).unwrap();
    assert_eq!(
        top_k_accuracy(&queries, &keys, &[1, 2, 3]).unwrap(),
        [1.0 / 3.0, 1.0, 1.0]
    );
    let err = train_projection(
        &queries,
        &keys.narrow(0, 0, 2).unwrap(),
        &AlignConfig::default(),
        None,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("3 and 2"), "{err}");
}

/// Stopping after k steps and resuming from the saved state gives the weights, temperature and bias of the
/// uninterrupted run (full-batch: no data order to restore); a state written with other settings is refused.
#[test]
fn stopping_and_resuming_equals_the_uninterrupted_run() {
    let dev = Device::Cpu;
    let text = Tensor::randn(0f32, 1.0, (40, 8), &dev).unwrap();
    let image = Tensor::randn(0f32, 1.0, (40, 12), &dev).unwrap();
    let cfg = AlignConfig {
        loss: LossKind::Siglip,
        steps: 12,
        lr: 1e-2,
        ..AlignConfig::default()
    };
    let straight = train_projection(&text, &image, &cfg, None, |_, _| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("align_state.safetensors");
    let settings = serde_json::json!({"data": "random", "steps": 12});
    let state = |resume, stop_at| StateFile {
        path: &path,
        every: 5,
        resume,
        stop_at,
        settings: &settings,
    };
    let first =
        train_projection(&text, &image, &cfg, Some(&state(false, Some(7))), |_, _| {}).unwrap();
    assert_eq!(first.losses.len(), 7);
    let mut steps = vec![];
    let resumed = train_projection(&text, &image, &cfg, Some(&state(true, None)), |s, _| {
        steps.push(s)
    })
    .unwrap();
    assert_eq!(steps, (8..=12).collect::<Vec<_>>());
    for (r, s) in resumed.losses.iter().zip(&straight.losses[7..]) {
        assert!(
            (r - s).abs() <= 1e-6,
            "losses {:?} vs {:?}",
            resumed.losses,
            &straight.losses[7..]
        );
    }
    let diff = (&resumed.weight - &straight.weight)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff <= 1e-6, "max |resumed - straight| = {diff}");
    assert_eq!(resumed.logit_scale, straight.logit_scale);
    assert_eq!(resumed.logit_bias, straight.logit_bias);

    let other = serde_json::json!({"data": "random", "steps": 20});
    let err = train_projection(
        &text,
        &image,
        &cfg,
        Some(&StateFile {
            settings: &other,
            ..state(true, None)
        }),
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("steps") && err.contains("12"), "{err}");
}
