//! Untrusted inputs mixed with good ones in a single run: each bad file fails alone with an error that
//! names it, every good image still gets its row in order, nothing panics, and the exit code is 1.
//! Odd but valid images (1x1, 1x3000) are images: they are embedded as the reference would embed them
//! (a 1x1 image took down an embedding server's route, infinity #609).

mod common;

use std::path::{Path, PathBuf};

use common::{f32_vec, fixture, photo, png, png_claiming, visenc};

struct Inputs {
    _dir: tempfile::TempDir,
    /// In the order given on the command line, with whether each should give a row.
    all: Vec<(String, bool)>,
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

fn inputs() -> Inputs {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = std::fs::read(photo("chelsea.png")).unwrap();
    let all = vec![
        (photo("chelsea.png"), true),
        (write(d, "zero-bytes.png", b""), false),
        (write(d, "truncated.png", &good[..good.len() / 3]), false),
        (
            write(d, "x.jpg", b"this is a text file, not a JPEG\n"),
            false,
        ),
        (
            write(d, "one-pixel.png", &png(1, 1, |_, _| [200, 30, 40])),
            true,
        ),
        (
            write(
                d,
                "wide-1x3000.png",
                &png(3000, 1, |x, _| [(x % 256) as u8, 90, 160]),
            ),
            true,
        ),
        (photo("rocket.jpg"), true),
        (
            write(d, "bomb-100000x100000.png", &png_claiming(100_000, 100_000)),
            false,
        ),
        (d.join("does-not-exist.png").display().to_string(), false),
        (photo("coffee.png"), true),
    ];
    Inputs { _dir: dir, all }
}

/// The stderr lines that name `path`.
fn errors_for<'a>(stderr: &'a str, path: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| l.contains(path)).collect()
}

fn check_errors(stderr: &str, inputs: &Inputs) {
    assert!(!stderr.contains("panicked"), "{stderr}");
    for (p, ok) in &inputs.all {
        let lines = errors_for(stderr, p);
        if *ok {
            assert!(
                lines.is_empty(),
                "{p} is a valid image but was reported: {lines:?}"
            );
        } else {
            assert_eq!(
                lines.len(),
                1,
                "{p}: expected one error line naming it, got {lines:?}\n{stderr}"
            );
        }
    }
    let failed = inputs.all.iter().filter(|(_, ok)| !ok).count();
    assert!(
        stderr.contains(&format!("{failed} input(s) failed")),
        "{stderr}"
    );
}

fn good(inputs: &Inputs) -> Vec<&str> {
    inputs
        .all
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(p, _)| p.as_str())
        .collect()
}

#[test]
fn embed_bad_inputs_fail_alone_named_and_exit_1() {
    let inputs = inputs();
    // A batch size that puts good and bad images together and splits them across batches.
    let mut args = vec![
        "embed".to_string(),
        "-q".into(),
        "--batch".into(),
        "3".into(),
        "-m".into(),
        fixture("clip_hf_gelu"),
    ];
    args.extend(inputs.all.iter().map(|(p, _)| p.clone()));
    let run = visenc(&args);
    run.expect_code(1);
    check_errors(&run.stderr, &inputs);
    let rows = run.json_lines();
    let paths: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths, good(&inputs));
    for r in &rows {
        let e = f32_vec(&r["embedding"]);
        assert_eq!(e.len(), 16);
        assert!(
            e.iter().all(|v| v.is_finite()),
            "{}: non-finite embedding",
            r["path"]
        );
    }
}

#[test]
fn bad_input_messages_say_what_is_wrong() {
    let inputs = inputs();
    let mut args = vec![
        "embed".to_string(),
        "-q".into(),
        "-m".into(),
        fixture("vit_hf_classifier"),
    ];
    args.extend(inputs.all.iter().map(|(p, _)| p.clone()));
    let run = visenc(&args);
    run.expect_code(1);
    let line = |needle: &str| -> String {
        let (p, _) = inputs.all.iter().find(|(p, _)| p.contains(needle)).unwrap();
        errors_for(&run.stderr, p).join("\n").to_lowercase()
    };
    assert!(
        line("zero-bytes").contains("empty") || line("zero-bytes").contains("0 bytes"),
        "{}",
        line("zero-bytes")
    );
    assert!(
        line("truncated").contains("truncated") || line("truncated").contains("end of file"),
        "{}",
        line("truncated")
    );
    assert!(
        line("x.jpg").contains("format") || line("x.jpg").contains("signature"),
        "{}",
        line("x.jpg")
    );
    let bomb = line("bomb");
    assert!(
        bomb.contains("100000x100000") && bomb.contains("limit"),
        "{bomb}"
    );
    let missing = line("does-not-exist");
    assert!(
        missing.contains("no such file") || missing.contains("not found"),
        "{missing}"
    );
}

#[test]
fn classify_and_similarity_also_skip_bad_inputs() {
    let inputs = inputs();
    let paths: Vec<String> = inputs.all.iter().map(|(p, _)| p.clone()).collect();

    let mut args = vec![
        "classify".to_string(),
        "-q".into(),
        "--json".into(),
        "-m".into(),
        fixture("siglip_hf"),
    ];
    args.extend(["--labels".into(), "cat,rocket".into()]);
    args.extend(paths.iter().cloned());
    let run = visenc(&args);
    run.expect_code(1);
    check_errors(&run.stderr, &inputs);
    let got: Vec<String> = run
        .json_lines()
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, good(&inputs));

    let mut args = vec![
        "similarity".to_string(),
        "-q".into(),
        "-m".into(),
        fixture("clip_open_clip"),
        "--text".into(),
        "a cat".into(),
    ];
    args.extend(paths.iter().cloned());
    let run = visenc(&args);
    run.expect_code(1);
    check_errors(&run.stderr, &inputs);
    let got: Vec<&str> = run
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(got, good(&inputs));
}

#[test]
fn npy_output_index_lists_only_the_good_images() {
    let inputs = inputs();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("e.npy");
    let mut args = vec![
        "embed".to_string(),
        "-q".into(),
        "-m".into(),
        fixture("dinov2_hf"),
        "-o".into(),
        out.display().to_string(),
    ];
    args.extend(inputs.all.iter().map(|(p, _)| p.clone()));
    visenc(&args).expect_code(1);
    let npy = common::read_npy(&out);
    assert_eq!(npy.shape, [good(&inputs).len(), 32]);
    let index = std::fs::read_to_string(PathBuf::from(tmp.path()).join("e.paths.txt")).unwrap();
    assert_eq!(index.lines().collect::<Vec<_>>(), good(&inputs));
}

#[test]
fn max_pixels_rejects_normal_photos_with_a_clear_message() {
    let (a, b) = (photo("chelsea.png"), photo("rocket.jpg"));
    let run = visenc(&[
        "embed",
        "-q",
        "--max-pixels",
        "100",
        "-m",
        &fixture("vit_timm"),
        &a,
        &b,
    ]);
    run.expect_code(1);
    assert!(run.stdout.is_empty(), "no rows: {}", run.stdout);
    for p in [&a, &b] {
        let lines = errors_for(&run.stderr, p);
        assert_eq!(lines.len(), 1, "{p}: {}", run.stderr);
        assert!(
            lines[0].contains("limit of 100") || lines[0].contains("limit 100"),
            "{}",
            lines[0]
        );
    }
    // chelsea.png is 451x300: the message gives the size that was refused.
    assert!(
        errors_for(&run.stderr, &a)[0].contains("451x300"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_run_where_every_input_fails_exits_1_and_writes_no_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = write(tmp.path(), "bad.png", b"nope");
    let run = visenc(&["embed", "-q", "-m", &fixture("vit_timm"), &bad]);
    run.expect_code(1);
    assert!(run.stdout.is_empty());
    assert_eq!(errors_for(&run.stderr, &bad).len(), 1, "{}", run.stderr);
}
