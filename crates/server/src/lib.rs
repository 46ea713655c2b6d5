//! visenc's HTTP service: OpenAI-compatible `/v1/embeddings` (with infinity's image modality and
//! `/embeddings` alias), TEI-style `/embed`, zero-shot `/classify`, `/search` over an index, a web
//! page, `/health`, Prometheus `/metrics` and an OpenAPI document. Requests from all clients share one
//! dynamic batching queue in front of a dedicated model thread.
//!
//! Layout, after text-embeddings-inference's router: `batcher` (queue + model thread), `error` (kind
//! -> status in one place), `metrics`, `inputs` (request parsing shared by routes), `routes/` (one
//! file per API family).

mod batcher;
pub mod client;
pub mod error;
mod inputs;
pub mod load;
pub mod metrics;
mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use tokio::sync::Semaphore;
use visenc::Encoder;

use batcher::{Batcher, Worker};
use error::{ApiError, ErrorKind, Shape};
use metrics::Metrics;

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct Config {
    /// The model name clients send (`"model"`); requests naming another model are refused.
    pub model_name: String,
    /// Most items in one forward pass.
    pub max_batch: usize,
    /// How long the first item of a batch waits for others.
    pub max_wait: Duration,
    /// Requests answered at once by the compute routes; more get 429.
    pub max_concurrent: usize,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Most inputs in one request.
    pub max_inputs: usize,
}

impl Config {
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            max_batch: 32,
            max_wait: Duration::from_millis(5),
            max_concurrent: 512,
            max_body_bytes: 16 << 20,
            max_inputs: 2048,
        }
    }
}

/// One result of a vector search.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The image file as the index recorded it.
    pub path: String,
    /// Cosine similarity with the query.
    pub score: f32,
}

/// The index `/search` and the web page use. The thumbnail route serves a file only if
/// [`SearchIndex::contains`] says the index recorded it, so no request can reach any other file.
pub trait SearchIndex: Send + Sync {
    /// Width of the stored embeddings.
    fn dimensions(&self) -> usize;
    /// The `k` nearest images to a unit-length query embedding, best first.
    fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>, String>;
    /// Whether `path` is, byte for byte, a file path the index recorded.
    fn contains(&self, path: &str) -> bool;
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(crate) config: Arc<Config>,
    pub(crate) encoder: Arc<Encoder>,
    pub(crate) batcher: Batcher,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) index: Option<Arc<dyn SearchIndex>>,
    slots: Arc<Semaphore>,
    worker: Arc<std::sync::Mutex<Option<Worker>>>,
}

impl AppState {
    /// Starts the model thread for `encoder`.
    pub fn new(
        config: Config,
        encoder: Encoder,
        index: Option<Arc<dyn SearchIndex>>,
    ) -> std::io::Result<Self> {
        let encoder = Arc::new(encoder);
        let metrics = Arc::new(Metrics::default());
        let (batcher, worker) = Batcher::start(
            encoder.clone(),
            metrics.clone(),
            config.max_batch,
            config.max_wait,
        )?;
        Ok(Self {
            slots: Arc::new(Semaphore::new(config.max_concurrent)),
            config: Arc::new(config),
            encoder,
            batcher,
            metrics,
            index,
            worker: Arc::new(std::sync::Mutex::new(Some(worker))),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn model_alive(&self) -> bool {
        self.worker
            .lock()
            .map(|w| w.as_ref().is_some_and(Worker::is_alive))
            .unwrap_or(false)
    }
}

/// Records every answered request (route, status, latency) for `/metrics`.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    state.metrics.in_flight(1);
    let response = next.run(req).await;
    state.metrics.in_flight(-1);
    state
        .metrics
        .request(&route, response.status().as_u16(), started.elapsed());
    response
}

/// Bounds the requests the compute routes answer at once; the rest get 429 at once (no queueing
/// without bound, as TEI's `max_concurrent_requests`).
async fn limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match state.slots.clone().try_acquire_owned() {
        Ok(_permit) => next.run(req).await,
        Err(_) => {
            let shape = if req.uri().path() == "/embed" {
                Shape::Tei
            } else {
                Shape::OpenAi
            };
            ApiError::new(
                ErrorKind::Overloaded,
                format!(
                    "the server is answering its maximum of {} requests; retry later",
                    state.config.max_concurrent
                ),
            )
            .into_shaped(shape)
        }
    }
}

/// The whole service as a router.
pub fn router(state: AppState) -> Router {
    let compute = routes::compute()
        .route_layer(middleware::from_fn_with_state(state.clone(), limit))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes));
    routes::other()
        .merge(compute)
        .route_layer(middleware::from_fn_with_state(state.clone(), track))
        .fallback(|| async {
            ApiError::new(ErrorKind::NotFound, "no such route (see /openapi.json)")
                .into_shaped(Shape::OpenAi)
        })
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves, then finishes the requests in flight and the
/// model's queue before returning.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let worker = state.worker.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    // Every request is answered and every sender dropped: the model thread drains and ends.
    let w = worker.lock().ok().and_then(|mut w| w.take());
    if let Some(w) = w {
        tokio::task::spawn_blocking(move || w.join())
            .await
            .map_err(std::io::Error::other)?;
    }
    Ok(())
}

/// Binds a listener whose accept backlog holds a burst of connections (tokio's default, 128, makes
/// the kernel reset connections when hundreds of clients connect at once).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the service on `addr` until SIGINT/SIGTERM; `on_listen` gets the bound address (useful
/// with port 0). Blocks the calling thread.
pub fn run(
    addr: SocketAddr,
    state: AppState,
    on_listen: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = bind(addr).await?;
        on_listen(listener.local_addr()?);
        serve(listener, state, shutdown_signal()).await
    })
}

/// A service running on a background thread (for tests, the load test and embedding in other
/// programs); [`Running::stop`] shuts it down gracefully.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// Stops accepting, finishes the requests in flight and the model's queue, and waits.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| std::io::Error::other("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Starts the service on `addr` on a background thread and returns once it listens.
pub fn spawn(addr: SocketAddr, state: AppState) -> std::io::Result<Running> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("visenc-server".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = match bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                let _ = ready_tx.send(listener.local_addr());
                serve(listener, state, async {
                    let _ = stop_rx.await;
                })
                .await
            })
        })?;
    let addr = ready_rx
        .recv()
        .map_err(|_| std::io::Error::other("the server thread ended before listening"))??;
    Ok(Running {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}
