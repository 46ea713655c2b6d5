//! The embedded backend: behaviour, persistence of the graph cache, bad database files.

mod common;

use visenc_index::{random_unit_vectors, Entry, Error, Index, ANN_MIN_ROWS};

#[test]
fn sqlite_backend_behaves() {
    let d = tempfile::tempdir().unwrap();
    common::exercise(&d.path().join("x.db").display().to_string());
}

#[test]
fn not_a_database_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("notes.db");
    let text = b"this is not a database, just text long enough to be checked";
    std::fs::write(&p, text).unwrap();
    let e = Index::open(&p.display().to_string())
        .err()
        .expect("must fail");
    assert!(matches!(e, Error::Sqlite { .. }), "{e}");
    assert!(e.to_string().contains("notes.db"), "{e}");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        text,
        "the file must be left alone"
    );
}

#[test]
fn graph_is_cached_beside_the_database_and_rebuilt_when_stale_or_corrupt() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("big.db").display().to_string();
    let dim = 16;
    let n = ANN_MIN_ROWS + 100;
    let v = random_unit_vectors(n, dim, 7);
    let idx = Index::create(&db).unwrap();
    idx.bind_model("m", dim).unwrap();
    let entries: Vec<Entry> = v
        .chunks(dim)
        .enumerate()
        .map(|(i, e)| Entry {
            path: format!("{i}.jpg"),
            hash: i.to_string(),
            size: 1,
            embedding: e.to_vec(),
        })
        .collect();
    idx.commit(&entries, &[]).unwrap();
    let q = &v[5 * dim..6 * dim];
    let first = idx.search(q, 5).unwrap();
    assert_eq!(first[0].path, "5.jpg");
    assert!(idx.ann().unwrap().has_graph());
    let cache = format!("{db}.hnsw");
    let written = std::fs::metadata(&cache)
        .expect("graph cached")
        .modified()
        .unwrap();
    drop(idx);

    // A new process (here: a new Index) reuses it as it is.
    let idx = Index::open(&db).unwrap();
    assert_eq!(idx.search(q, 5).unwrap(), first);
    assert_eq!(
        std::fs::metadata(&cache).unwrap().modified().unwrap(),
        written
    );

    // A changed index gets a new graph; a corrupt cache file only costs a rebuild.
    idx.commit(&[], &["5.jpg".into()]).unwrap();
    assert_ne!(idx.search(q, 1).unwrap()[0].path, "5.jpg");
    std::fs::write(&cache, b"garbage").unwrap();
    let idx = Index::open(&db).unwrap();
    let ann = idx.ann().unwrap();
    assert!(ann.has_graph());
    let paths = |h: Vec<visenc_index::Hit>| h.into_iter().map(|h| h.path).collect::<Vec<_>>();
    assert_eq!(paths(idx.search(q, 5).unwrap()), paths(ann.exact(q, 5)));
    assert_eq!(paths(idx.search(q, 4).unwrap()), paths(first[1..].to_vec()));
}
