//! A scratch PostgreSQL database for a test, on the server named by `VISENC_TEST_POSTGRES` (a
//! superuser URL; `.ci/run` starts one from the PyPI `pgserver` package, see the README). Shared by
//! the index crate's and the CLI's tests (`#[path]`-included).

use postgres::{Client, NoTls};

/// A database of its own, dropped (with any connection left to it) when this is dropped.
pub struct ScratchDb {
    admin: Client,
    name: String,
    /// The URL of the scratch database.
    pub url: String,
}

/// `url` pointing at database `name` instead.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let query = tail
        .split_once('?')
        .map_or(String::new(), |(_, q)| format!("?{q}"));
    format!("{scheme}://{authority}/{name}{query}")
}

impl ScratchDb {
    /// A new database named `{tag}_{pid}`. Without `VISENC_TEST_POSTGRES` the test says so and
    /// gets `None` (it then passes without running), except under CI, where a missing variable or
    /// an unreachable server fails it.
    pub fn create(tag: &str) -> Option<Self> {
        let Ok(url) = std::env::var("VISENC_TEST_POSTGRES") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set VISENC_TEST_POSTGRES (see .ci/run)"
            );
            eprintln!("{tag}: VISENC_TEST_POSTGRES is not set, the PostgreSQL test is not run");
            return None;
        };
        let mut admin = Client::connect(&url, NoTls)
            .unwrap_or_else(|e| panic!("VISENC_TEST_POSTGRES={url}: cannot connect: {e}"));
        let name = format!("{tag}_{}", std::process::id());
        // (One statement per call: neither may run inside the transaction of a multi-statement query.)
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        Some(Self {
            url: with_database(&url, &name),
            admin,
            name,
        })
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let _ = self.admin.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}
