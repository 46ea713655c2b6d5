//! `visenc serve`: the HTTP service (visenc-server) for one model.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use visenc_server::{Hit, SearchIndex};

use crate::{batch, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The index `visenc index` built (a file, or postgres://...) for /search and the web page.
    #[arg(long)]
    db: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model name clients send as "model" (default: the --model value).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most items in one forward pass.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// How long the first item of a batch waits for more, in milliseconds.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// Requests answered at once; more get 429.
    #[arg(long, default_value_t = 512)]
    max_concurrent: usize,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Most inputs in one request.
    #[arg(long, default_value_t = 2048)]
    max_inputs: usize,
}

pub fn run(a: ServeArgs) -> Result<usize> {
    let enc = batch::load_encoder(&a.model)?;
    let mut config =
        visenc_server::Config::new(a.served_model_name.unwrap_or(a.model.model.clone()));
    config.max_batch = a.max_batch.max(1);
    config.max_wait = Duration::from_millis(a.max_wait_ms);
    config.max_concurrent = a.max_concurrent.max(1);
    config.max_body_bytes = a.max_body_bytes;
    config.max_inputs = a.max_inputs.max(1);
    let index = match &a.db {
        Some(db) => {
            Some(Arc::new(DbIndex::open(db, &a.model.model, &enc)?) as Arc<dyn SearchIndex>)
        }
        None => None,
    };
    let state =
        visenc_server::AppState::new(config, enc, index).context("starting the model thread")?;
    let addr = SocketAddr::new(a.host, a.port);
    visenc_server::run(addr, state, |bound| {
        println!("listening on http://{bound}");
        eprintln!(
            "visenc: serving {} on http://{bound} (Ctrl-C to stop)",
            a.model.model
        );
    })
    .with_context(|| format!("serving on {addr}"))?;
    eprintln!("visenc: stopped after finishing the requests in flight");
    Ok(0)
}

/// The persistent index (visenc-index) behind `/search` and the thumbnail route.
struct DbIndex {
    index: visenc_index::Index,
    dim: usize,
    /// The recorded file paths, re-read when a path is missing and the copy is older than
    /// [`FILES_MAX_AGE`] (the index may grow while the server runs).
    files: Mutex<(Instant, HashSet<String>)>,
}

const FILES_MAX_AGE: Duration = Duration::from_secs(5);

impl DbIndex {
    fn open(db: &str, model: &str, enc: &visenc::Encoder) -> Result<Self> {
        let index =
            visenc_index::Index::open(db).with_context(|| format!("opening the index {db}"))?;
        let dim = visenc_index::embedding_dim(enc);
        if let Some(meta) = index.meta()? {
            let want = visenc_index::model_id(model);
            if meta.model != want || meta.dim != dim {
                bail!(
                    "{db} holds {}-d embeddings of {}; serve it with that model (--model {} gives {dim}-d ones)",
                    meta.dim,
                    meta.model,
                    model
                );
            }
        }
        let files = Self::read_files(&index)?;
        Ok(Self {
            index,
            dim,
            files: Mutex::new((Instant::now(), files)),
        })
    }

    fn read_files(index: &visenc_index::Index) -> Result<HashSet<String>> {
        Ok(index.files()?.into_iter().map(|f| f.path).collect())
    }
}

impl SearchIndex for DbIndex {
    fn dimensions(&self) -> usize {
        self.dim
    }

    fn search(&self, query: &[f32], k: usize) -> std::result::Result<Vec<Hit>, String> {
        let hits = self.index.search(query, k).map_err(|e| e.to_string())?;
        Ok(hits
            .into_iter()
            .map(|h| Hit {
                path: h.path,
                score: h.score,
            })
            .collect())
    }

    fn contains(&self, path: &str) -> bool {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if !files.1.contains(path) && files.0.elapsed() > FILES_MAX_AGE {
            if let Ok(fresh) = Self::read_files(&self.index) {
                *files = (Instant::now(), fresh);
            }
        }
        files.1.contains(path)
    }
}
