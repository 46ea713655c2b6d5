//! The scale-out backend: PostgreSQL with pgvector. Embeddings live in a `vector(D)` column with an
//! HNSW index over cosine distance; batches arrive through `COPY` into a staging table and are
//! upserted by path in one transaction, so a killed writer leaves the last committed state.
//! Tables: `visenc_meta` (format, model, dim, generation) and `visenc_images`.
//!
//! A commit that writes many rows relative to the table (see [`BULK_FACTOR`]) drops the HNSW index,
//! writes, and builds the index again in the same transaction (PostgreSQL's DDL is transactional,
//! so a failed or killed bulk commit leaves the previous table and index); smaller commits let
//! pgvector maintain the index row by row. A bulk commit locks the table until it commits, so
//! searches running meanwhile wait for it.

use std::fmt::Write as _;
use std::io::Write as _;

use postgres::{Client, NoTls};

use crate::{Entry, Error, FileRecord, Hit, Meta, Result, Store};

const FORMAT: &str = "1";
/// Candidates pgvector's HNSW search keeps (`hnsw.ef_search`, at most 1000); results come back
/// ordered by the exact distance of the stored full-precision vectors.
const EF_SEARCH: usize = 160;
/// A commit rebuilds the HNSW index instead of maintaining it when the table after the commit has at
/// most this many times the rows it writes. pgvector 0.6.2 built an index over 10k 512-d rows in
/// 1.3 ms a row but maintained it at 24.6 ms a row inserting 2k more (measured, `bench/index.md`),
/// so rebuilding wins while the batch is more than about 1/19 of the table; 10 leaves margin for
/// the build's n log n growth.
const BULK_FACTOR: usize = 10;
/// Bytes of pgvector's in-memory HNSW build per row beyond the vector itself (neighbour lists of
/// m = 16, 2m on layer 0, and element headers), with slack; the build gets this much
/// `maintenance_work_mem` (pgvector's README: builds are much faster when the graph fits).
const BUILD_BYTES_PER_ROW: usize = 1024;
/// The most `maintenance_work_mem` a bulk commit asks for; a bigger graph is built on disk, slower.
const BUILD_MEMORY_CAP: usize = 8 << 30;
/// Rows written to `COPY` between flushes of the text buffer.
const COPY_CHUNK: usize = 1024;

pub struct PgStore {
    /// The URL with any password hidden, for messages.
    name: String,
    client: Client,
}

/// A message for a PostgreSQL error: the server's own words when it sent some.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{name}:***@{host}")
        }
        _ => url.to_string(),
    }
}

/// A field of `COPY ... FROM STDIN` in text format: backslash, tab, newline and carriage return escaped.
fn copy_text(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// pgvector's text form, `[1,2.5,-3]`; f32 `Display` is the shortest exact form.
fn vector_text(v: &[f32], out: &mut String) {
    out.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{x}");
    }
    out.push(']');
}

/// The HNSW index over cosine distance, with pgvector's default m (16) and `ef_construction` (64).
const CREATE_HNSW: &str =
    "CREATE INDEX visenc_images_hnsw ON visenc_images USING hnsw (embedding vector_cosine_ops)";

/// Wraps a client error with the (redacted) database name.
fn pg_err(db: &str) -> impl Fn(postgres::Error) -> Error + Copy + '_ {
    move |source| Error::Postgres {
        db: db.to_string(),
        source,
    }
}

impl PgStore {
    pub fn open(url: &str, create: bool) -> Result<Self> {
        let name = redact(url);
        let client = Client::connect(url, NoTls).map_err(pg_err(&name))?;
        let mut s = Self { name, client };
        if create {
            s.client
                .batch_execute(
                    "CREATE EXTENSION IF NOT EXISTS vector;
                     CREATE TABLE IF NOT EXISTS visenc_meta (key text PRIMARY KEY, value text NOT NULL);
                     CREATE TABLE IF NOT EXISTS visenc_images (
                         id bigserial PRIMARY KEY,
                         path text NOT NULL UNIQUE,
                         hash text NOT NULL,
                         size bigint NOT NULL);
                     INSERT INTO visenc_meta (key, value) VALUES ('generation', '0')
                         ON CONFLICT (key) DO NOTHING;",
                )
                .map_err(s.err())?;
            s.client
                .execute(
                    "INSERT INTO visenc_meta (key, value) VALUES ('format', $1) ON CONFLICT (key) DO NOTHING",
                    &[&FORMAT],
                )
                .map_err(s.err())?;
        } else {
            let exists: bool = s
                .client
                .query_one("SELECT to_regclass('visenc_meta') IS NOT NULL", &[])
                .map_err(s.err())?
                .get(0);
            if !exists {
                return Err(Error::NotFound { db: s.name });
            }
        }
        match s.get("format")? {
            Some(f) if f == FORMAT => Ok(s),
            Some(f) => Err(Error::Corrupt {
                db: s.name,
                reason: format!("index format {f}, this visenc reads format {FORMAT}"),
            }),
            None => Err(Error::NotFound { db: s.name }),
        }
    }

    fn err(&self) -> impl Fn(postgres::Error) -> Error + Copy + '_ {
        pg_err(&self.name)
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            db: self.name.clone(),
            reason,
        }
    }

    fn get(&mut self, key: &str) -> Result<Option<String>> {
        let name = self.name.clone();
        let row = self
            .client
            .query_opt("SELECT value FROM visenc_meta WHERE key = $1", &[&key])
            .map_err(pg_err(&name))?;
        Ok(row.map(|r| r.get(0)))
    }

    fn dim(&mut self) -> Result<usize> {
        Ok(self.meta()?.map_or(0, |m| m.dim))
    }
}

impl Store for PgStore {
    fn meta(&mut self) -> Result<Option<Meta>> {
        let (Some(model), Some(dim)) = (self.get("model")?, self.get("dim")?) else {
            return Ok(None);
        };
        let dim = dim
            .parse()
            .map_err(|_| self.corrupt(format!("bad dimension {dim:?} in visenc_meta")))?;
        Ok(Some(Meta { model, dim }))
    }

    fn init(&mut self, meta: &Meta) -> Result<()> {
        let name = self.name.clone();
        let e = pg_err(&name);
        let mut tx = self.client.transaction().map_err(e)?;
        // The width is part of the column type, so the column comes with the model.
        tx.batch_execute(&format!(
            "ALTER TABLE visenc_images ADD COLUMN embedding vector({}) NOT NULL; {CREATE_HNSW}",
            meta.dim
        ))
        .map_err(e)?;
        tx.execute(
            "INSERT INTO visenc_meta (key, value) VALUES ('model', $1), ('dim', $2)",
            &[&meta.model, &meta.dim.to_string()],
        )
        .map_err(e)?;
        tx.commit().map_err(e)
    }

    fn files(&mut self) -> Result<Vec<FileRecord>> {
        let rows = self
            .client
            .query(
                "SELECT path, hash, size FROM visenc_images ORDER BY id",
                &[],
            )
            .map_err(self.err())?;
        Ok(rows
            .iter()
            .map(|r| FileRecord {
                path: r.get(0),
                hash: r.get(1),
                size: r.get::<_, i64>(2) as u64,
            })
            .collect())
    }

    fn count(&mut self) -> Result<usize> {
        let n: i64 = self
            .client
            .query_one("SELECT COUNT(*) FROM visenc_images", &[])
            .map_err(self.err())?
            .get(0);
        Ok(n as usize)
    }

    fn commit(&mut self, entries: &[Entry], removed: &[String]) -> Result<()> {
        let dim = self.dim()?;
        let name = self.name.clone();
        let e = pg_err(&name);
        let mut tx = self.client.transaction().map_err(e)?;
        // Rows already there, counted only up to what decides the path.
        let bulk_below = entries.len() * (BULK_FACTOR - 1);
        let existing = if entries.is_empty() {
            0
        } else {
            let n: i64 = tx
                .query_one(
                    "SELECT count(*) FROM (SELECT 1 FROM visenc_images LIMIT $1) s",
                    &[&(bulk_below as i64 + 1)],
                )
                .map_err(e)?
                .get(0);
            n as usize
        };
        let bulk = !entries.is_empty() && existing <= bulk_below;
        if bulk {
            tx.batch_execute("DROP INDEX IF EXISTS visenc_images_hnsw")
                .map_err(e)?;
        }
        if !entries.is_empty() {
            tx.batch_execute(&format!(
                "CREATE TEMP TABLE visenc_stage (path text, hash text, size bigint, embedding vector({dim}))
                 ON COMMIT DROP"
            ))
            .map_err(e)?;
            let mut w = tx
                .copy_in("COPY visenc_stage (path, hash, size, embedding) FROM STDIN")
                .map_err(e)?;
            let mut text = String::new();
            for chunk in entries.chunks(COPY_CHUNK) {
                text.clear();
                for en in chunk {
                    copy_text(&en.path, &mut text);
                    let _ = write!(text, "\t{}\t{}\t", en.hash, en.size);
                    vector_text(&en.embedding, &mut text);
                    text.push('\n');
                }
                w.write_all(text.as_bytes()).map_err(|source| Error::Io {
                    path: name.clone().into(),
                    source,
                })?;
            }
            w.finish().map_err(e)?;
            tx.batch_execute(
                "INSERT INTO visenc_images (path, hash, size, embedding)
                     SELECT path, hash, size, embedding FROM visenc_stage
                 ON CONFLICT (path) DO UPDATE SET hash = excluded.hash, size = excluded.size,
                     embedding = excluded.embedding",
            )
            .map_err(e)?;
        }
        if !removed.is_empty() {
            tx.execute(
                "DELETE FROM visenc_images WHERE path = ANY($1)",
                &[&removed],
            )
            .map_err(e)?;
        }
        if bulk {
            // Enough memory for the graph, never less than the server's own setting (in kB).
            let rows = existing + entries.len();
            let kb = (rows * (dim * 4 + BUILD_BYTES_PER_ROW)).min(BUILD_MEMORY_CAP) / 1024;
            tx.execute(
                "SELECT set_config('maintenance_work_mem', greatest(setting::bigint, $1)::text || 'kB', true)
                 FROM pg_settings WHERE name = 'maintenance_work_mem'",
                &[&(kb as i64)],
            )
            .map_err(e)?;
            tx.batch_execute(CREATE_HNSW).map_err(e)?;
        }
        tx.batch_execute(
            "UPDATE visenc_meta SET value = (value::bigint + 1)::text WHERE key = 'generation'",
        )
        .map_err(e)?;
        tx.commit().map_err(e)
    }

    fn generation(&mut self) -> Result<u64> {
        let g = self.get("generation")?.unwrap_or_default();
        g.parse()
            .map_err(|_| self.corrupt(format!("bad generation {g:?} in visenc_meta")))
    }

    fn vectors(&mut self) -> Result<(Vec<String>, Vec<f32>)> {
        if self.meta()?.is_none() {
            return Ok((vec![], vec![]));
        }
        let rows = self
            .client
            .query(
                "SELECT path, embedding::text FROM visenc_images ORDER BY id",
                &[],
            )
            .map_err(self.err())?;
        let (mut paths, mut data) = (Vec::with_capacity(rows.len()), Vec::new());
        for r in &rows {
            let path: String = r.get(0);
            let text: &str = r.get(1);
            for x in text.trim_matches(|c| c == '[' || c == ']').split(',') {
                data.push(
                    x.trim()
                        .parse::<f32>()
                        .map_err(|_| self.corrupt(format!("{path}: unreadable vector {text:?}")))?,
                );
            }
            paths.push(path);
        }
        Ok((paths, data))
    }

    fn native_search(&mut self, query: &[f32], k: usize) -> Option<Result<Vec<Hit>>> {
        Some((|| {
            if self.meta()?.is_none() {
                return Ok(vec![]);
            }
            let mut q = String::new();
            vector_text(query, &mut q);
            let name = self.name.clone();
            let e = pg_err(&name);
            let mut tx = self.client.transaction().map_err(e)?;
            tx.batch_execute(&format!(
                "SET LOCAL hnsw.ef_search = {}",
                EF_SEARCH.max(k).min(1000)
            ))
            .map_err(e)?;
            let rows = tx
                .query(
                    "SELECT path, (1 - (embedding <=> $1::text::vector))::real FROM visenc_images
                     ORDER BY embedding <=> $1::text::vector LIMIT $2",
                    &[&q, &(k as i64)],
                )
                .map_err(e)?;
            tx.commit().map_err(e)?;
            Ok(rows
                .iter()
                .map(|r| Hit {
                    path: r.get(0),
                    score: r.get(1),
                })
                .collect())
        })())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_fields_escape_what_copy_text_format_treats_specially() {
        let mut s = String::new();
        copy_text("a b\tc\nd\\e\r-é", &mut s);
        assert_eq!(s, "a b\\tc\\nd\\\\e\\r-é");
    }

    #[test]
    fn passwords_are_hidden_in_messages() {
        assert_eq!(
            redact("postgres://me:secret@db:5432/x"),
            "postgres://me:***@db:5432/x"
        );
        assert_eq!(
            redact("postgresql://postgres@/db?host=/tmp"),
            "postgresql://postgres@/db?host=/tmp"
        );
    }
}
