//! The PostgreSQL + pgvector backend against a real server.
//!
//! Set `VISENC_TEST_POSTGRES` to a superuser URL (`.ci/run` starts one from the PyPI `pgserver`
//! package; see the README). Without it the test says so and passes, except under CI, where a
//! missing variable or an unreachable server fails it.

mod common;

use postgres::{Client, NoTls};

/// `url` pointing at database `name` instead.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let query = tail
        .split_once('?')
        .map_or(String::new(), |(_, q)| format!("?{q}"));
    format!("{scheme}://{authority}/{name}{query}")
}

#[test]
fn postgres_backend_behaves() {
    let Ok(url) = std::env::var("VISENC_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set VISENC_TEST_POSTGRES (see .ci/run)"
        );
        eprintln!("postgres_backend_behaves: VISENC_TEST_POSTGRES is not set, not run");
        return;
    };
    let mut admin = Client::connect(&url, NoTls)
        .unwrap_or_else(|e| panic!("VISENC_TEST_POSTGRES={url}: cannot connect: {e}"));
    let name = format!("visenc_index_test_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let db = with_database(&url, &name);
    common::exercise(&db);

    // The HNSW index over cosine distance exists.
    let mut c = Client::connect(&db, NoTls).unwrap();
    let def: String = c
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'visenc_images' AND indexdef LIKE '%hnsw%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(def.contains("vector_cosine_ops"), "{def}");
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {name}"))
        .unwrap();
}
