//! The behaviour every backend must have, run against SQLite and PostgreSQL alike.

use visenc_index::{Entry, Error, Index};

fn entry(path: &str, hash: &str, v: &[f32]) -> Entry {
    Entry {
        path: path.into(),
        hash: hash.into(),
        size: 7,
        embedding: v.to_vec(),
    }
}

fn paths(hits: &[visenc_index::Hit]) -> Vec<&str> {
    hits.iter().map(|h| h.path.as_str()).collect()
}

/// Hostile names on purpose: spaces, a newline, a tab, a leading dash, a backslash, non-ASCII.
const ODD: &str = "dir/\n-x\t\\é 猫.png";

pub fn exercise(db: &str) {
    assert!(matches!(Index::open(db), Err(Error::NotFound { .. })));
    let idx = Index::create(db).unwrap();
    assert_eq!(idx.meta().unwrap(), None);
    idx.bind_model("model-a", 3).unwrap();
    idx.commit(
        &[
            entry("a b.jpg", "h1", &[1.0, 0.0, 0.0]),
            entry(ODD, "h2", &[0.0, 2.0, 0.0]),
            entry("c.png", "h3", &[1.0, 1.0, 0.0]),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(idx.len().unwrap(), 3);

    let hits = idx.search(&[2.0, 0.2, 0.0], 3).unwrap();
    assert_eq!(paths(&hits), ["a b.jpg", "c.png", ODD]);
    // cos((1, .1, 0), (1, 0, 0)) = 1/sqrt(1.01); cos((1, .1, 0), (1, 1, 0)) = 1.1/sqrt(2.02)
    assert!(
        (hits[0].score - 1.0 / 1.01f32.sqrt()).abs() < 1e-5,
        "{hits:?}"
    );
    assert!(
        (hits[1].score - 1.1 / 2.02f32.sqrt()).abs() < 1e-5,
        "{hits:?}"
    );
    assert_eq!(idx.search(&[1.0, 0.0, 0.0], 1).unwrap().len(), 1);

    // One model and one width per index; nothing is written by a refused call.
    for (model, dim) in [("model-b", 3), ("model-a", 4)] {
        let e = idx.bind_model(model, dim).unwrap_err();
        assert!(matches!(e, Error::ModelMismatch { .. }), "{e}");
        assert!(e.to_string().contains("model-a"), "{e}");
    }
    let e = idx
        .commit(&[entry("d.png", "h4", &[1.0, 2.0])], &[])
        .unwrap_err();
    assert!(matches!(e, Error::Dimension { got: 2, want: 3 }), "{e}");
    assert!(matches!(
        idx.search(&[1.0; 5], 2),
        Err(Error::Dimension { got: 5, want: 3 })
    ));

    // Replace by path, drop by path, atomically; then reopen.
    idx.commit(
        &[entry("c.png", "h3-new", &[0.0, 0.0, 1.0])],
        &["a b.jpg".into()],
    )
    .unwrap();
    drop(idx);
    let idx = Index::open(db).unwrap();
    let mut files: Vec<(String, String, u64)> = idx
        .files()
        .unwrap()
        .into_iter()
        .map(|f| (f.path, f.hash, f.size))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            ("c.png".into(), "h3-new".into(), 7),
            (ODD.into(), "h2".into(), 7)
        ]
    );
    let hits = idx.search(&[0.0, 0.0, 3.0], 5).unwrap();
    assert_eq!(paths(&hits), ["c.png", ODD]);
    assert!((hits[0].score - 1.0).abs() < 1e-6);
    assert!(hits[1].score.abs() < 1e-6);

    // Near-duplicates: two almost equal vectors group together, the third stays alone.
    idx.commit(&[entry("c copy.png", "h5", &[0.01, 0.0, 1.0])], &[])
        .unwrap();
    assert_eq!(
        idx.near_duplicates(0.99).unwrap(),
        [vec!["c copy.png".to_string(), "c.png".to_string()]]
    );
    assert!(idx.near_duplicates(0.99999).unwrap().is_empty());
}
