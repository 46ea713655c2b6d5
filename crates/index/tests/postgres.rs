//! The PostgreSQL + pgvector backend against a real server (see `common/scratch_pg.rs` for when it
//! runs).

mod common;
#[path = "common/scratch_pg.rs"]
mod scratch_pg;

use postgres::{Client, NoTls};

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
