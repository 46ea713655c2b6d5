//! Odd formats and modes against Pillow's `exif_transpose(im).convert("RGB")` (and transformers'
//! white composite), and bad inputs against the error they must give.

mod common;

use common::{fixtures_dir, manifest, photos_dir, Diff, Tensors};
use visenc_image::{decode, decode_named, decode_with, open, Alpha, ImageError, Limits};

#[test]
fn odd_formats_match_pillow() {
    let manifest = manifest();
    let tensors = Tensors::load("odd.safetensors");
    let mut failures = Vec::new();
    for case in manifest["odd"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let bytes = std::fs::read(fixtures_dir().join(file)).unwrap();
        // Per-file tolerance (levels) where the decoder, not the conversion, differs; the
        // manifest says why.
        let tolerance = case["tolerance"].as_u64().unwrap() as u8;
        for (alpha, key) in [
            (Alpha::Drop, &case["key"]),
            (Alpha::OverWhite, &case["over_white_key"]),
        ] {
            let ours = match decode_with(&bytes, file, &Limits::default(), alpha) {
                Ok(img) => img,
                Err(e) => {
                    failures.push(format!("{file} ({alpha:?}): {e}"));
                    continue;
                }
            };
            let reference = tensors.image(key.as_str().unwrap());
            if ours.dimensions() != reference.dimensions() {
                failures.push(format!(
                    "{file} ({alpha:?}): {:?} vs Pillow {:?}",
                    ours.dimensions(),
                    reference.dimensions()
                ));
                continue;
            }
            let d = Diff::of(&ours, &reference, file);
            println!(
                "{file:28} {:10} {alpha:?}: exact {:.4} max {}",
                case["pil_mode"].as_str().unwrap(),
                d.exact_fraction(),
                d.max
            );
            if d.max > tolerance {
                failures.push(format!("{file} ({alpha:?}): {d:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn bad_inputs_give_typed_errors_naming_the_input() {
    let manifest = manifest();
    for case in manifest["bad"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let path = fixtures_dir().join(file);
        let bytes = std::fs::read(&path).unwrap();
        let err = decode_named(&bytes, file, &Limits::default())
            .expect_err(&format!("{file} must not decode"));
        let variant = match &err {
            ImageError::Empty { input } => ("Empty", input),
            ImageError::Decode { input, .. } => ("Decode", input),
            ImageError::Unsupported { input, .. } => ("Unsupported", input),
            ImageError::TooLarge { input, .. } => ("TooLarge", input),
            other => panic!("{file}: unexpected {other:?}"),
        };
        println!("{file}: {err}");
        assert_eq!(variant.0, case["expect"], "{file}: {err}");
        assert_eq!(variant.1, file);
        assert!(err.to_string().contains(file), "{err}");
        // `open` names the path.
        let err = open(&path, &Limits::default()).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}

#[test]
fn huge_header_reports_its_size() {
    let bytes = std::fs::read(fixtures_dir().join("bad/huge_header.png")).unwrap();
    match decode(&bytes, &Limits::default()) {
        Err(ImageError::TooLarge {
            width,
            height,
            max_pixels,
            ..
        }) => {
            assert_eq!((width, height), (100_000, 100_000));
            assert_eq!(max_pixels, 178_956_970);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn limits_are_configurable() {
    let path = photos_dir().join("chelsea.png");
    let small = Limits {
        max_pixels: 451 * 300 - 1,
        ..Limits::default()
    };
    assert!(matches!(
        open(&path, &small),
        Err(ImageError::TooLarge {
            width: 451,
            height: 300,
            ..
        })
    ));
    let exact = Limits {
        max_pixels: 451 * 300,
        ..Limits::default()
    };
    assert_eq!(open(&path, &exact).unwrap().dimensions(), (451, 300));
    let few_bytes = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    assert!(matches!(
        open(&path, &few_bytes),
        Err(ImageError::InputTooLarge {
            max_bytes: 1000,
            ..
        })
    ));
    let bytes = std::fs::read(&path).unwrap();
    assert!(matches!(
        decode_named(&bytes, "item 3", &few_bytes),
        Err(ImageError::InputTooLarge { input, .. }) if input == "item 3"
    ));
}

#[test]
fn missing_file_is_an_io_error_with_the_path() {
    let path = fixtures_dir().join("no/such/file.png");
    match open(&path, &Limits::default()) {
        Err(ImageError::Io { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected Io, got {other:?}"),
    }
}

/// Every prefix of a valid file must give an error or an image, never a panic. A JPEG cut
/// anywhere is an error, as in Pillow (zune-jpeg alone would pad the missing scan data).
#[test]
fn truncation_at_every_length_never_panics() {
    let jpeg = std::fs::read(fixtures_dir().join("odd/rgb420.jpg")).unwrap();
    for len in 0..jpeg.len() {
        assert!(
            decode(&jpeg[..len], &Limits::default()).is_err(),
            "prefix of {len} bytes decoded"
        );
    }
    for file in [
        "odd/rgba.png",
        "odd/rgb420.jpg",
        "odd/anim.gif",
        "odd/lossless.webp",
        "odd/rgb.tiff",
        "odd/rgb24.bmp",
    ] {
        let bytes = std::fs::read(fixtures_dir().join(file)).unwrap();
        for len in 0..bytes.len() {
            let _ = decode_named(&bytes[..len], file, &Limits::default());
        }
    }
}
