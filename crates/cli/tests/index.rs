//! `visenc index`, `search`, `dedup`, `export`/`import` end to end on real photos and a tiny CLIP
//! with a text tower: incremental runs, hostile file names, bad images, `kill -9` and resume, and
//! the same commands (and `kill -9`) against PostgreSQL + pgvector when `VISENC_TEST_POSTGRES` is set.

mod common;
#[path = "../../index/tests/common/scratch_pg.rs"]
mod scratch_pg;

use std::path::{Path, PathBuf};

use arrow_array::Array;
use common::{fixture, photo, visenc};
use visenc_index::Index;

const MODEL: &str = "clip_hf_gelu";
const PHOTOS: [&str; 6] = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "grace_hopper.jpg",
    "motorcycle_left.png",
    "rocket.jpg",
];
/// A file name a shell script would trip over: leading dash, spaces, a newline, non-ASCII.
const HOSTILE: &str = "-rf \n猫 café.png";

/// A folder with the six photos, one of them under a hostile name in a subfolder.
fn photo_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("sub dir")).unwrap();
    for name in PHOTOS {
        let to = if name == "chelsea.png" {
            d.path().join("sub dir").join(HOSTILE)
        } else {
            d.path().join(name)
        };
        std::fs::copy(photo(name), to).unwrap();
    }
    d
}

fn index(dir: &Path, db: &str, extra: &[&str]) -> common::Run {
    let mut args: Vec<String> = vec![
        "index".into(),
        dir.display().to_string(),
        "--model".into(),
        fixture(MODEL),
        "--db".into(),
        db.into(),
        "--quiet".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    visenc(&args)
}

fn search_json(db: &str, args: &[&str]) -> Vec<(String, f32)> {
    let mut all = vec!["search", "--db", db, "--json"];
    all.extend(args);
    visenc(&all)
        .expect_code(0)
        .json_lines()
        .iter()
        .map(|v| {
            (
                v["path"].as_str().unwrap().to_string(),
                v["score"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

fn canonical(p: PathBuf) -> String {
    std::fs::canonicalize(p).unwrap().display().to_string()
}

/// The whole cycle against one database (a SQLite file or a postgres:// URL).
fn cycle(db: &str) {
    let d = photo_dir();
    let cat = canonical(d.path().join("sub dir").join(HOSTILE));
    let r = index(d.path(), db, &[]);
    r.expect_code(0);
    assert!(
        r.stderr.contains("6 image(s) embedded, 0 unchanged"),
        "{}",
        r.stderr
    );

    // Image-to-image: a photo finds itself first, with cosine 1.
    let hits = search_json(db, &["--image", &cat, "--k", "3"]);
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0].0, cat);
    assert!((hits[0].1 - 1.0).abs() < 1e-4, "{hits:?}");
    // Text-to-image through the text tower: scores are cosines of the text and image embeddings,
    // which `visenc similarity` computes independently of the index.
    let hits = search_json(db, &["--k", "6", "--", "-a photo of a cat"]);
    assert_eq!(hits.len(), 6);
    let sim = visenc(&[
        "similarity",
        "--model",
        &fixture(MODEL),
        "--text=-a photo of a cat",
        &d.path().join("coffee.png").display().to_string(),
    ]);
    // `path<TAB>similarity`, after a header line.
    let line = sim
        .expect_code(0)
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    let expected: f32 = line.rsplit('\t').next().unwrap().parse().unwrap();
    let coffee = canonical(d.path().join("coffee.png"));
    let got = hits.iter().find(|h| h.0 == coffee).unwrap().1;
    assert!((got - expected).abs() < 2e-4, "{got} vs {expected}");

    // Incremental: nothing to do; then one changed, one removed, one added, one corrupt.
    let r = index(d.path(), db, &[]);
    r.expect_code(0);
    assert!(
        r.stderr
            .contains("0 image(s) embedded, 6 unchanged, 0 removed"),
        "{}",
        r.stderr
    );
    std::fs::copy(photo("coffee.png"), d.path().join("rocket.jpg")).unwrap();
    std::fs::remove_file(d.path().join("astronaut.png")).unwrap();
    std::fs::write(
        d.path().join("tiny.png"),
        common::png(1, 1, |_, _| [200, 10, 10]),
    )
    .unwrap();
    std::fs::write(
        d.path().join("broken.jpg"),
        b"\xff\xd8\xff\xe0 not really a jpeg",
    )
    .unwrap();
    std::fs::write(
        d.path().join("bomb.png"),
        common::png_claiming(60_000, 60_000),
    )
    .unwrap();
    let r = index(d.path(), db, &[]);
    r.expect_code(1);
    assert!(r.stderr.contains("broken.jpg"), "{}", r.stderr);
    assert!(r.stderr.contains("bomb.png"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("2 image(s) embedded, 4 unchanged, 1 removed, 2 failed"),
        "{}",
        r.stderr
    );
    let idx = Index::open(db).unwrap();
    let mut files: Vec<String> = idx.files().unwrap().into_iter().map(|f| f.path).collect();
    files.sort();
    let mut want: Vec<String> = [
        "coffee.png",
        "grace_hopper.jpg",
        "motorcycle_left.png",
        "rocket.jpg",
        "tiny.png",
    ]
    .iter()
    .map(|n| canonical(d.path().join(n)))
    .chain([cat.clone()])
    .collect();
    want.sort();
    assert_eq!(files, want);
    // rocket.jpg now holds coffee's bytes: its stored hash and embedding follow the new content.
    let hits = search_json(db, &["--image", &coffee, "--k", "2"]);
    let mut top: Vec<&str> = hits.iter().map(|h| h.0.as_str()).collect();
    top.sort();
    let rocket = canonical(d.path().join("rocket.jpg"));
    assert_eq!(top, [coffee.as_str(), rocket.as_str()]);
    assert!(hits.iter().all(|h| (h.1 - 1.0).abs() < 1e-4), "{hits:?}");
    // ... and they are near-duplicates.
    let r = visenc(&["dedup", "--db", db, "--threshold", "0.999", "--json"]);
    let groups = r.expect_code(0).json_lines();
    assert_eq!(groups.len(), 1, "{}", r.stdout);
    assert_eq!(groups[0], serde_json::json!([coffee, rocket]));

    // Bad input leaves the index as it was.
    let n = idx.len().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let r = index(empty.path(), db, &[]);
    r.expect_code(2);
    assert!(r.stderr.contains("no images found"), "{}", r.stderr);
    let r = visenc(&[
        "index",
        &d.path().display().to_string(),
        "--model",
        "/nonexistent/model",
        "--db",
        db,
    ]);
    r.expect_code(2);
    assert!(r.stderr.contains("/nonexistent/model"), "{}", r.stderr);
    let r = visenc(&[
        "index",
        &d.path().display().to_string(),
        "--model",
        &fixture("clip_hf_quickgelu"),
        "--db",
        db,
        "--quiet",
    ]);
    r.expect_code(2);
    assert!(r.stderr.contains("refusing"), "{}", r.stderr);
    assert_eq!(Index::open(db).unwrap().len().unwrap(), n);
}

#[test]
fn index_search_dedup_on_sqlite() {
    let d = tempfile::tempdir().unwrap();
    cycle(&d.path().join("photos index.db").display().to_string());
    let r = visenc(&["search", "--db", "/nonexistent/x.db", "cat"]);
    r.expect_code(2);
    assert!(
        r.stderr.contains("/nonexistent/x.db: no index there"),
        "{}",
        r.stderr
    );
}

#[test]
fn index_search_dedup_on_postgres() {
    if let Some(db) = scratch_pg::ScratchDb::create("visenc_cli_test") {
        cycle(&db.url);
    }
}

#[test]
fn export_is_clip_retrieval_layout_and_imports_back() {
    let d = photo_dir();
    let t = tempfile::tempdir().unwrap();
    let db = t.path().join("a.db").display().to_string();
    index(d.path(), &db, &[]).expect_code(0);
    let out = t.path().join("export");
    let r = visenc(&[
        "export",
        "--db",
        &db,
        "--out",
        &out.display().to_string(),
        "--rows-per-file",
        "4",
    ]);
    r.expect_code(0);
    // Two pairs: 4 + 2 rows; the .npy rows are the index's vectors in the parquet's path order.
    let (paths, vectors) = Index::open(&db).unwrap().vectors().unwrap();
    let dim = vectors.len() / paths.len();
    let mut row = 0;
    for (i, n) in [(0, 4), (1, 2)] {
        let npy = common::read_npy(&out.join(format!("img_emb/img_emb_{i}.npy")));
        assert_eq!(npy.shape, [n, dim]);
        let file = std::fs::File::open(out.join(format!("metadata/metadata_{i}.parquet"))).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let mut names = vec![];
        for b in reader {
            let b = b.unwrap();
            let col = b.column_by_name("image_path").unwrap();
            let s = col
                .as_any()
                .downcast_ref::<arrow_array::StringArray>()
                .unwrap();
            names.extend((0..s.len()).map(|k| s.value(k).to_string()));
        }
        assert_eq!(names, paths[row..row + n]);
        assert_eq!(npy.data, vectors[row * dim..(row + n) * dim]);
        row += n;
    }
    assert!(!out.join("img_emb/img_emb_2.npy").exists());

    // Import into a new index: same rows, and `visenc index` then finds every file unchanged.
    let db2 = t.path().join("b.db").display().to_string();
    let r = visenc(&[
        "import",
        &out.display().to_string(),
        "--db",
        &db2,
        "--model",
        &fixture(MODEL),
    ]);
    r.expect_code(0);
    // (Rows are normalised again on commit: equal up to rounding.)
    let (paths2, vectors2) = Index::open(&db2).unwrap().vectors().unwrap();
    assert_eq!(paths2, paths);
    assert!(common::max_abs_diff(&vectors2, &vectors) < 1e-6);
    let r = index(d.path(), &db2, &[]);
    r.expect_code(0);
    assert!(
        r.stderr.contains("0 image(s) embedded, 6 unchanged"),
        "{}",
        r.stderr
    );
}

/// Kills `visenc index` (SIGKILL) after a few committed batches, then checks that every committed
/// row is whole and that a rerun completes the index to what a single run gives. `db2` is a second,
/// empty database for that single run.
fn kill_9_loses_nothing_committed_and_the_rerun_completes(db: &str, db2: &str) {
    let d = tempfile::tempdir().unwrap();
    let n = 120;
    for i in 0..n {
        let name = PHOTOS[i % PHOTOS.len()];
        std::fs::copy(photo(name), d.path().join(format!("{i:03} {name}"))).unwrap();
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_visenc"))
        .args([
            "index",
            &d.path().display().to_string(),
            "--model",
            &fixture(MODEL),
            "--db",
            db,
        ])
        .args(["--quiet", "--batch", "1", "--commit-every", "2"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for some committed batches, then SIGKILL mid-run.
    let started = std::time::Instant::now();
    loop {
        let done = Index::open(db).ok().and_then(|i| i.len().ok()).unwrap_or(0);
        if done >= 4 {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 120,
            "no batch committed in 2 minutes"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "visenc index exited before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let idx = Index::open(db).unwrap();
    let kept = idx.files().unwrap();
    assert!(
        kept.len() >= 4 && kept.len() < n,
        "{} rows after the kill",
        kept.len()
    );
    // Whatever was committed is whole: hashes match the files, embeddings have the model's width.
    for f in &kept {
        assert_eq!(
            f.hash,
            visenc_index::content_hash(Path::new(&f.path)).unwrap(),
            "{}",
            f.path
        );
    }
    let r = index(d.path(), db, &[]);
    r.expect_code(0);
    let summary = format!(
        "{} image(s) embedded, {} unchanged",
        n - kept.len(),
        kept.len()
    );
    assert!(r.stderr.contains(&summary), "{}", r.stderr);

    // The resumed index equals one built in a single run.
    index(d.path(), db2, &[]).expect_code(0);
    let sorted = |db: &str| {
        let (p, v) = Index::open(db).unwrap().vectors().unwrap();
        let dim = v.len() / p.len();
        let mut rows: Vec<(String, Vec<f32>)> = p
            .into_iter()
            .zip(v.chunks(dim).map(<[f32]>::to_vec))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    };
    let (a, b) = (sorted(db), sorted(db2));
    assert_eq!(a.len(), n);
    for ((pa, va), (pb, vb)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        assert!(common::max_abs_diff(va, vb) < 1e-6, "{pa}");
    }
}

#[test]
fn kill_9_on_sqlite_loses_nothing_committed() {
    let t = tempfile::tempdir().unwrap();
    let db = |name: &str| t.path().join(name).display().to_string();
    kill_9_loses_nothing_committed_and_the_rerun_completes(&db("k.db"), &db("clean.db"));
}

#[test]
fn kill_9_on_postgres_loses_nothing_committed() {
    let (Some(db), Some(db2)) = (
        scratch_pg::ScratchDb::create("visenc_cli_kill"),
        scratch_pg::ScratchDb::create("visenc_cli_kill_clean"),
    ) else {
        return;
    };
    kill_9_loses_nothing_committed_and_the_rerun_completes(&db.url, &db2.url);
}
