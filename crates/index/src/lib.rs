//! visenc-index: a persistent image search index over visenc embeddings.
//!
//! Two backends behind one API, chosen by the `db` string:
//! - a file path: an embedded SQLite database (WAL mode, one transaction per committed batch), no
//!   server needed. Search goes through an in-memory HNSW graph (`usearch`) over int8-quantised
//!   vectors, re-ranked exactly with the stored f32 vectors; the graph is cached beside the database in
//!   `<db>.hnsw` and rebuilt when the index has changed since.
//! - `postgres://...` / `postgresql://...`: PostgreSQL with pgvector (`vector(D)` column, an HNSW index with
//!   cosine distance, batched `COPY` inserts).
//!
//! An index holds one model: its id and embedding width are recorded on the first commit and a
//! different model or width is refused ([`Error::ModelMismatch`]). Rows record path, SHA-256 content
//! hash, size and the L2-normalised embedding; scores are cosine similarities.
//!
//! ```no_run
//! use visenc::{Encoder, LoadOptions};
//! use visenc_index::{Entry, Index};
//! let enc = Encoder::load("openai/clip-vit-base-patch32", &LoadOptions::default())?;
//! let index = Index::create("photos.db")?;                 // or Index::open (must exist)
//! index.bind_model(&visenc_index::model_id("openai/clip-vit-base-patch32"), visenc_index::embedding_dim(&enc))?;
//! let px = enc.load_image("cat.jpg".as_ref())?;
//! let v = visenc_index::embed_images(&enc, &[px])?.remove(0);
//! index.commit(&[Entry { path: "cat.jpg".into(), hash: visenc_index::content_hash("cat.jpg".as_ref())?, size: 1234, embedding: v }], &[])?;
//! for hit in index.search_text(&enc, "a photo of a cat", 10)? {
//!     println!("{} {}", hit.score, hit.path);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`Index`] is `Send + Sync`: a server can share one behind an `Arc`; calls are serialised on the
//! database connection, and searches share the cached graph.

mod ann;
mod pg;
mod sqlite;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sha2::Digest;
use visenc::{EncodeOptions, Encoder, Pixels};

pub use ann::{random_unit_vectors, Ann, ANN_MIN_ROWS};

/// Every error the index can return; each names the database or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{db}: {source}")]
    Sqlite {
        db: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{db}: {}", pg::describe(source))]
    Postgres {
        db: String,
        #[source]
        source: postgres::Error,
    },
    #[error("{db}: no index there (create one with `visenc index DIR --model M --db {db}`)")]
    NotFound { db: String },
    #[error(
        "{db}: this index holds embeddings of {have_model} ({have_dim} dimensions); refusing to add \
         {model} ({dim} dimensions): one index holds one model, use another --db"
    )]
    ModelMismatch {
        db: String,
        have_model: String,
        have_dim: usize,
        model: String,
        dim: usize,
    },
    #[error("query vector has {got} dimensions, the index holds {want}")]
    Dimension { got: usize, want: usize },
    #[error("{db}: {reason}")]
    Corrupt { db: String, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: file name is not valid UTF-8 (the index stores paths as text)", path.display())]
    NonUtf8Path { path: PathBuf },
    #[error(transparent)]
    Encoder(#[from] visenc::Error),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The model an index holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Meta {
    pub model: String,
    pub dim: usize,
}

/// One indexed image as stored: the embedding is L2-normalised on commit.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    /// Lowercase hex SHA-256 of the file's bytes ([`content_hash`]).
    pub hash: String,
    pub size: u64,
    pub embedding: Vec<f32>,
}

/// What the index knows about a file, without its embedding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub path: String,
    pub hash: String,
    pub size: u64,
}

/// One search result: cosine similarity between the query and the image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub path: String,
    pub score: f32,
}

/// The storage side of a backend.
trait Store: Send {
    fn meta(&mut self) -> Result<Option<Meta>>;
    /// Records the model on first use (and creates what depends on the width).
    fn init(&mut self, meta: &Meta) -> Result<()>;
    fn files(&mut self) -> Result<Vec<FileRecord>>;
    fn count(&mut self) -> Result<usize>;
    /// Upserts `entries` and deletes `removed` in one transaction.
    fn commit(&mut self, entries: &[Entry], removed: &[String]) -> Result<()>;
    /// Bumped by every commit: a cached graph is valid while this is unchanged.
    fn generation(&mut self) -> Result<u64>;
    /// Every (path, embedding) in a stable order, the embeddings row-major in one buffer.
    fn vectors(&mut self) -> Result<(Vec<String>, Vec<f32>)>;
    /// A backend that searches by itself (pgvector); `None` means: use the in-memory graph.
    fn native_search(&mut self, _query: &[f32], _k: usize) -> Option<Result<Vec<Hit>>> {
        None
    }
    /// Where the in-memory graph is cached between runs, if anywhere.
    fn graph_cache(&self) -> Option<PathBuf> {
        None
    }
}

/// A search index: see the crate documentation.
pub struct Index {
    db: String,
    store: Mutex<Box<dyn Store>>,
    /// The graph of the generation it was built for.
    ann: Mutex<Option<(u64, Arc<Ann>)>>,
}

fn is_postgres(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

impl Index {
    /// Opens the index at `db`, creating it if needed.
    pub fn create(db: &str) -> Result<Self> {
        Self::new(db, true)
    }

    /// Opens an existing index ([`Error::NotFound`] otherwise).
    pub fn open(db: &str) -> Result<Self> {
        Self::new(db, false)
    }

    fn new(db: &str, create: bool) -> Result<Self> {
        let store: Box<dyn Store> = if is_postgres(db) {
            Box::new(pg::PgStore::open(db, create)?)
        } else {
            Box::new(sqlite::SqliteStore::open(Path::new(db), create)?)
        };
        Ok(Self {
            db: if is_postgres(db) {
                pg::redact(db)
            } else {
                db.to_string()
            },
            store: Mutex::new(store),
            ann: Mutex::new(None),
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Box<dyn Store>> {
        // A panic while holding the lock cannot leave a half-written row (writes are transactions).
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The database as given (a password in a URL hidden).
    pub fn db(&self) -> &str {
        &self.db
    }

    /// The model the index holds; `None` before the first commit.
    pub fn meta(&self) -> Result<Option<Meta>> {
        self.store().meta()
    }

    /// Checks that `model` with embeddings of width `dim` may be added; records it in a new index.
    pub fn bind_model(&self, model: &str, dim: usize) -> Result<()> {
        let mut s = self.store();
        match s.meta()? {
            Some(m) if m.model == model && m.dim == dim => Ok(()),
            Some(m) => Err(Error::ModelMismatch {
                db: self.db.clone(),
                have_model: m.model,
                have_dim: m.dim,
                model: model.to_string(),
                dim,
            }),
            None => s.init(&Meta {
                model: model.to_string(),
                dim,
            }),
        }
    }

    /// Every indexed file.
    pub fn files(&self) -> Result<Vec<FileRecord>> {
        self.store().files()
    }

    /// Number of indexed images.
    pub fn len(&self) -> Result<usize> {
        self.store().count()
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Adds or replaces `entries` (by path) and drops `removed`, atomically. Call
    /// [`Index::bind_model`] first; embeddings of another width are refused.
    pub fn commit(&self, entries: &[Entry], removed: &[String]) -> Result<()> {
        let mut s = self.store();
        let meta = s.meta()?.ok_or_else(|| Error::Corrupt {
            db: self.db.clone(),
            reason: "commit before bind_model: the index has no model yet".into(),
        })?;
        if let Some(e) = entries.iter().find(|e| e.embedding.len() != meta.dim) {
            return Err(Error::Dimension {
                got: e.embedding.len(),
                want: meta.dim,
            });
        }
        let normalized: Vec<Entry> = entries
            .iter()
            .map(|e| Entry {
                embedding: normalize(&e.embedding),
                ..e.clone()
            })
            .collect();
        s.commit(&normalized, removed)
    }

    /// Every (path, L2-normalised embedding) in a stable order, the embeddings row-major in one buffer.
    pub fn vectors(&self) -> Result<(Vec<String>, Vec<f32>)> {
        self.store().vectors()
    }

    /// The `k` images nearest to `query` (any scale; it is normalised), best first.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        let q = normalize(query);
        {
            let mut s = self.store();
            if let Some(meta) = s.meta()? {
                if meta.dim != q.len() {
                    return Err(Error::Dimension {
                        got: q.len(),
                        want: meta.dim,
                    });
                }
            }
            if let Some(hits) = s.native_search(&q, k) {
                return hits;
            }
        }
        Ok(self.ann()?.search(&q, k))
    }

    /// Text-to-image search through the model's text tower.
    pub fn search_text(&self, enc: &Encoder, text: &str, k: usize) -> Result<Vec<Hit>> {
        self.search(&embed_text(enc, text)?, k)
    }

    /// Image-to-image search with a preprocessed image ([`Encoder::load_image`], [`Encoder::decode_image`]).
    pub fn search_image(&self, enc: &Encoder, image: &Pixels, k: usize) -> Result<Vec<Hit>> {
        let v = embed_images(enc, std::slice::from_ref(image))?.remove(0);
        self.search(&v, k)
    }

    /// The in-memory graph over every vector, built (or loaded from its cache) when the index has
    /// changed since the last call.
    pub fn ann(&self) -> Result<Arc<Ann>> {
        let mut s = self.store();
        let generation = s.generation()?;
        let mut cached = self.ann.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, ann)) = cached.as_ref() {
            if *g == generation {
                return Ok(ann.clone());
            }
        }
        let (paths, vectors) = s.vectors()?;
        let dim = s.meta()?.map_or(0, |m| m.dim);
        let ann = Arc::new(Ann::load_or_build(
            paths,
            vectors,
            dim,
            s.graph_cache().as_deref(),
        ));
        *cached = Some((generation, ann.clone()));
        Ok(ann)
    }

    /// Groups of near-duplicate images: connected components of the pairs whose cosine similarity
    /// is at least `threshold`, each group sorted by path, groups sorted by their first path.
    pub fn near_duplicates(&self, threshold: f32) -> Result<Vec<Vec<String>>> {
        Ok(self.ann()?.near_duplicates(threshold))
    }
}

/// The id an index records for a model spec: the canonical path of a local checkpoint, else the
/// hub id as given.
pub fn model_id(spec: &str) -> String {
    match std::fs::canonicalize(spec) {
        Ok(p) => p.display().to_string(),
        Err(_) => spec.to_string(),
    }
}

/// The width of the embeddings the index stores for this encoder (projected if it has a projection).
pub fn embedding_dim(enc: &Encoder) -> usize {
    let i = enc.info();
    i.projection_dim.unwrap_or(i.hidden_size)
}

/// Lowercase hex SHA-256 of a file's bytes.
pub fn content_hash(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The embedding of a text query (the text tower's projection).
pub fn embed_text(enc: &Encoder, text: &str) -> Result<Vec<f32>> {
    let t = enc.encode_texts(&[text])?;
    Ok(t.projected
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}

/// The embeddings of preprocessed images (one forward pass per image size), in input order.
pub fn embed_images(enc: &Encoder, images: &[Pixels]) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![Vec::new(); images.len()];
    let mut pending: Vec<usize> = (0..images.len()).collect();
    while let Some(&first) = pending.first() {
        let size = (images[first].height, images[first].width);
        let (group, rest): (Vec<usize>, Vec<usize>) = pending
            .into_iter()
            .partition(|&i| (images[i].height, images[i].width) == size);
        pending = rest;
        let batch: Vec<Pixels> = group.iter().map(|&i| images[i].clone()).collect();
        let f = enc.encode_pixels(&batch, &EncodeOptions::default())?;
        let rows: Vec<Vec<f32>> = f.embedding().to_dtype(candle_core::DType::F32)?.to_vec2()?;
        for (i, r) in group.into_iter().zip(rows) {
            out[i] = r;
        }
    }
    Ok(out)
}

/// `v / |v|`; a zero vector stays zero.
pub fn normalize(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter().map(|x| x / n).collect()
    } else {
        v.to_vec()
    }
}

/// A file's path as the index stores it ([`Error::NonUtf8Path`] if it is not text).
pub fn path_text(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::NonUtf8Path {
            path: path.to_path_buf(),
        })
}
