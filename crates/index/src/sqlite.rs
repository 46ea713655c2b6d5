//! The embedded backend: one SQLite file in WAL mode with `synchronous=FULL`, so a committed batch
//! survives `kill -9` (and power loss), and a killed writer leaves the last committed state.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::{Entry, Error, FileRecord, Meta, Result, Store};

/// Bumped when the schema changes incompatibly.
const FORMAT: &str = "1";

pub struct SqliteStore {
    path: PathBuf,
    conn: Connection,
}

impl SqliteStore {
    pub fn open(path: &Path, create: bool) -> Result<Self> {
        let db = path.display().to_string();
        if !create && !path.is_file() {
            return Err(Error::NotFound { db });
        }
        let e = |source| Error::Sqlite {
            db: db.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(e)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(e)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(e)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(e)?;
        if create {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS images (
                     id INTEGER PRIMARY KEY,
                     path TEXT NOT NULL UNIQUE,
                     hash TEXT NOT NULL,
                     size INTEGER NOT NULL,
                     embedding BLOB NOT NULL);",
            )
            .map_err(e)?;
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?1), ('generation', '0')",
                params![FORMAT],
            )
            .map_err(e)?;
        }
        let mut s = Self {
            path: path.to_path_buf(),
            conn,
        };
        match s.get("format")? {
            Some(f) if f == FORMAT => Ok(s),
            Some(f) => Err(s.corrupt(format!(
                "index format {f}, this visenc reads format {FORMAT}"
            ))),
            None => Err(Error::NotFound { db }),
        }
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |source| Error::Sqlite {
            db: self.path.display().to_string(),
            source,
        }
    }

    fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            db: self.path.display().to_string(),
            reason,
        }
    }

    fn get(&mut self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(self.err())
    }
}

fn blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Store for SqliteStore {
    fn meta(&mut self) -> Result<Option<Meta>> {
        let (Some(model), Some(dim)) = (self.get("model")?, self.get("dim")?) else {
            return Ok(None);
        };
        let dim = dim
            .parse()
            .map_err(|_| self.corrupt(format!("bad dimension {dim:?} in meta")))?;
        Ok(Some(Meta { model, dim }))
    }

    fn init(&mut self, meta: &Meta) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('model', ?1), ('dim', ?2)",
                params![meta.model, meta.dim.to_string()],
            )
            .map_err(self.err())?;
        Ok(())
    }

    fn files(&mut self) -> Result<Vec<FileRecord>> {
        let mut st = self
            .conn
            .prepare("SELECT path, hash, size FROM images ORDER BY id")
            .map_err(self.err())?;
        st.query_map([], |r| {
            Ok(FileRecord {
                path: r.get(0)?,
                hash: r.get(1)?,
                size: r.get::<_, i64>(2)? as u64,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|source| Error::Sqlite {
            db: self.path.display().to_string(),
            source,
        })
    }

    fn count(&mut self) -> Result<usize> {
        self.conn
            .query_row("SELECT COUNT(*) FROM images", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(self.err())
    }

    fn commit(&mut self, entries: &[Entry], removed: &[String]) -> Result<()> {
        let db = self.path.display().to_string();
        let e = |source| Error::Sqlite {
            db: db.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(e)?;
        {
            let mut up = tx
                .prepare(
                    "INSERT INTO images (path, hash, size, embedding) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (path) DO UPDATE SET hash = excluded.hash, size = excluded.size,
                     embedding = excluded.embedding",
                )
                .map_err(e)?;
            for en in entries {
                up.execute(params![
                    en.path,
                    en.hash,
                    en.size as i64,
                    blob(&en.embedding)
                ])
                .map_err(e)?;
            }
            let mut del = tx
                .prepare("DELETE FROM images WHERE path = ?1")
                .map_err(e)?;
            for p in removed {
                del.execute([p]).map_err(e)?;
            }
            tx.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'",
                [],
            )
            .map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    fn generation(&mut self) -> Result<u64> {
        let g = self.get("generation")?.unwrap_or_default();
        g.parse()
            .map_err(|_| self.corrupt(format!("bad generation {g:?} in meta")))
    }

    fn vectors(&mut self) -> Result<(Vec<String>, Vec<f32>)> {
        let dim = self.meta()?.map_or(0, |m| m.dim);
        let db = self.path.display().to_string();
        let e = |source| Error::Sqlite {
            db: db.clone(),
            source,
        };
        let mut st = self
            .conn
            .prepare("SELECT path, embedding FROM images ORDER BY id")
            .map_err(e)?;
        let mut rows = st.query([]).map_err(e)?;
        let (mut paths, mut data) = (Vec::new(), Vec::new());
        while let Some(r) = rows.next().map_err(e)? {
            let path: String = r.get(0).map_err(e)?;
            let b: Vec<u8> = r.get(1).map_err(e)?;
            if b.len() != dim * 4 {
                return Err(Error::Corrupt {
                    db,
                    reason: format!("{path}: embedding of {} bytes, expected {dim} f32", b.len()),
                });
            }
            data.extend(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            paths.push(path);
        }
        Ok((paths, data))
    }

    fn graph_cache(&self) -> Option<PathBuf> {
        Some(PathBuf::from(format!("{}.hnsw", self.path.display())))
    }
}
