//! The PostgreSQL + pgvector backend against a real server (see `common/scratch_pg.rs` for when it
//! runs).

mod common;
#[path = "common/scratch_pg.rs"]
mod scratch_pg;

use postgres::{Client, NoTls};
use visenc_index::{random_unit_vectors, Ann, Entry, Index};

#[test]
fn postgres_backend_behaves() {
    let Some(db) = scratch_pg::ScratchDb::create("visenc_index_test") else {
        return;
    };
    common::exercise(&db.url);

    // The HNSW index over cosine distance exists.
    let mut c = Client::connect(&db.url, NoTls).unwrap();
    let def: String = c
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'visenc_images' AND indexdef LIKE '%hnsw%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(def.contains("vector_cosine_ops"), "{def}");
}

/// The OID of the HNSW index: a commit that rebuilds the index changes it.
fn hnsw_oid(c: &mut Client) -> u32 {
    c.query_one("SELECT 'visenc_images_hnsw'::regclass::oid", &[])
        .unwrap()
        .get(0)
}

fn entries(first: usize, vectors: &[f32], dim: usize) -> Vec<Entry> {
    vectors
        .chunks(dim)
        .enumerate()
        .map(|(i, v)| Entry {
            path: format!("v{}", first + i),
            hash: format!("h{}", first + i),
            size: 1,
            embedding: v.to_vec(),
        })
        .collect()
}

/// A big commit rebuilds the HNSW index in its transaction, a small one lets pgvector maintain it;
/// both sets of rows are found as exact search finds them, and a bulk commit that fails midway
/// leaves the previous rows and index.
#[test]
fn bulk_and_incremental_commits_search_like_exact_search() {
    let Some(db) = scratch_pg::ScratchDb::create("visenc_index_bulk") else {
        return;
    };
    const DIM: usize = 32;
    let (big, small) = (400, 20);
    let vectors = random_unit_vectors(big + small, DIM, 3);
    let idx = Index::create(&db.url).unwrap();
    idx.bind_model("m", DIM).unwrap();
    let mut c = Client::connect(&db.url, NoTls).unwrap();

    let empty = hnsw_oid(&mut c);
    idx.commit(&entries(0, &vectors[..big * DIM], DIM), &[])
        .unwrap();
    let rebuilt = hnsw_oid(&mut c);
    assert_ne!(rebuilt, empty, "a first big commit rebuilds the index");
    idx.commit(&entries(big, &vectors[big * DIM..], DIM), &[])
        .unwrap();
    assert_eq!(hnsw_oid(&mut c), rebuilt, "a small commit keeps the index");
    assert_eq!(idx.len().unwrap(), big + small);

    let paths = (0..big + small).map(|i| format!("v{i}")).collect();
    let exact = Ann::exhaustive(paths, vectors.clone(), DIM);
    let queries = random_unit_vectors(20, DIM, 4);
    let check = |idx: &Index| {
        let (mut found, mut total) = (0, 0);
        // Random queries, and stored rows of both commits (each must find itself first).
        let stored = (0..10).chain(big..big + small);
        for (q, own) in queries
            .chunks(DIM)
            .map(|q| (q, None))
            .chain(stored.map(|i| (&vectors[i * DIM..(i + 1) * DIM], Some(i))))
        {
            let want = exact.exact(q, 10);
            let got = idx.search(q, 10).unwrap();
            assert_eq!(got.len(), 10);
            if let Some(i) = own {
                assert_eq!(got[0].path, format!("v{i}"), "{got:?}");
            }
            for h in &got {
                if let Some(w) = want.iter().find(|w| w.path == h.path) {
                    assert!((w.score - h.score).abs() < 1e-5, "{h:?} vs {w:?}");
                    found += 1;
                }
            }
            total += want.len();
        }
        let recall = found as f64 / total as f64;
        assert!(recall >= 0.98, "recall@10 {recall:.3} against exact search");
    };
    check(&idx);

    // A bulk commit (as many rows as the table) that fails after the index was dropped and rows
    // were copied: nothing of it stays.
    c.batch_execute(
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'poisoned row'; END $$;
         CREATE TRIGGER poison BEFORE INSERT ON visenc_images FOR EACH ROW
             WHEN (NEW.path = 'poison') EXECUTE FUNCTION poison();",
    )
    .unwrap();
    let generation = || -> String {
        Client::connect(&db.url, NoTls)
            .unwrap()
            .query_one(
                "SELECT value FROM visenc_meta WHERE key = 'generation'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let before = generation();
    let mut batch = entries(10_000, &random_unit_vectors(big + small - 1, DIM, 5), DIM);
    batch.push(Entry {
        path: "poison".into(),
        ..batch[0].clone()
    });
    let e = idx.commit(&batch, &[]).unwrap_err();
    assert!(e.to_string().contains("poisoned row"), "{e}");
    assert_eq!(hnsw_oid(&mut c), rebuilt, "the index is the one before");
    assert_eq!(idx.len().unwrap(), big + small);
    assert_eq!(generation(), before);
    check(&idx);
}
