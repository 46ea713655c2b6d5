//! The dynamic batching queue: items from every request wait in one queue; a dedicated model thread
//! takes up to `max_batch` of them, waiting at most `max_wait` after the first for more to come, and
//! runs them through the model in one forward pass (texts together, images of one size together).
//! The thread ends once every sender is gone and the queue is empty, so in-flight work finishes on
//! shutdown. (The same design as TEI's queue thread, without token budgets.)

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use visenc::{EncodeOptions, Encoder, Pixels};

use crate::error::{ApiError, ErrorKind};
use crate::metrics::Metrics;

/// One input for the model.
pub enum Item {
    Text(String),
    Image(Pixels),
}

/// An embedding as the model returns it (not normalised).
pub type Embedding = Vec<f32>;

struct Job {
    item: Item,
    reply: Reply,
}

/// The sending side of the queue; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

/// The model thread; join it after the last [`Batcher`] is dropped.
pub struct Worker(JoinHandle<()>);

impl Worker {
    pub fn is_alive(&self) -> bool {
        !self.0.is_finished()
    }

    /// Waits until the queue is drained.
    pub fn join(self) {
        // A panic in the model thread was already answered as a failed request.
        let _ = self.0.join();
    }
}

impl Batcher {
    /// Starts the model thread.
    pub fn start(
        encoder: Arc<Encoder>,
        metrics: Arc<Metrics>,
        max_batch: usize,
        max_wait: Duration,
    ) -> std::io::Result<(Self, Worker)> {
        let (tx, rx) = mpsc::channel::<Job>();
        let m = metrics.clone();
        let handle = std::thread::Builder::new()
            .name("visenc-model".into())
            .spawn(move || run(&encoder, &m, &rx, max_batch.max(1), max_wait))?;
        Ok((Self { tx, metrics }, Worker(handle)))
    }

    /// Queues the items and waits for their embeddings, in order. The first failure is returned.
    pub async fn embed(&self, items: Vec<Item>) -> Result<Vec<Embedding>, ApiError> {
        let gone = || ApiError::new(ErrorKind::Backend, "the model worker has stopped");
        let mut replies = Vec::with_capacity(items.len());
        for item in items {
            let (reply, rx) = oneshot::channel();
            self.tx.send(Job { item, reply }).map_err(|_| gone())?;
            self.metrics.queue(1);
            replies.push(rx);
        }
        let mut out = Vec::with_capacity(replies.len());
        for rx in replies {
            out.push(rx.await.map_err(|_| gone())??);
        }
        Ok(out)
    }
}

fn run(
    enc: &Encoder,
    metrics: &Metrics,
    rx: &mpsc::Receiver<Job>,
    max_batch: usize,
    max_wait: Duration,
) {
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + max_wait;
        let mut jobs = vec![first];
        while jobs.len() < max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(job) => jobs.push(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics.queue(-(jobs.len() as i64));
        let started = Instant::now();
        let n = jobs.len();
        // A panic inside the model fails this batch's requests (their replies are dropped and they
        // answer "worker stopped") without taking the queue down.
        let answers =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_batch(enc, jobs)));
        // Counted before anyone is answered: a client that reads the metrics after its answer
        // finds its batch there.
        metrics.batch(n, started.elapsed());
        for (replies, result) in answers.unwrap_or_default() {
            answer(replies, result);
        }
    }
}

type Reply = oneshot::Sender<Result<Embedding, ApiError>>;

/// Some requests' replies and what they get.
type Answer = (Vec<Reply>, Result<Vec<Embedding>, ApiError>);

/// Runs one batch: all texts in one pass, then images grouped by size; returns the answers.
fn run_batch(enc: &Encoder, jobs: Vec<Job>) -> Vec<Answer> {
    let mut answers = Vec::new();
    let mut texts: Vec<(String, Reply)> = Vec::new();
    let mut images: Vec<(Pixels, Reply)> = Vec::new();
    for j in jobs {
        match j.item {
            Item::Text(t) => texts.push((t, j.reply)),
            Item::Image(p) => images.push((p, j.reply)),
        }
    }
    if !texts.is_empty() {
        let (strs, replies): (Vec<String>, Vec<Reply>) = texts.into_iter().unzip();
        let strs: Vec<&str> = strs.iter().map(String::as_str).collect();
        let result = enc
            .encode_texts(&strs)
            .map_err(ApiError::from)
            .and_then(|f| rows(&f.projected));
        answers.push((replies, result));
    }
    while let Some((first, _)) = images.first() {
        let size = (first.height, first.width);
        let (group, rest): (Vec<_>, Vec<_>) = images
            .into_iter()
            .partition(|(p, _)| (p.height, p.width) == size);
        images = rest;
        let (pixels, replies): (Vec<Pixels>, Vec<Reply>) = group.into_iter().unzip();
        let result = enc
            .encode_pixels(&pixels, &EncodeOptions::default())
            .map_err(ApiError::from)
            .and_then(|f| rows(f.embedding()));
        answers.push((replies, result));
    }
    answers
}

fn rows(t: &candle_core::Tensor) -> Result<Vec<Embedding>, ApiError> {
    t.to_dtype(candle_core::DType::F32)
        .and_then(|t| t.to_vec2::<f32>())
        .map_err(|e| ApiError::new(ErrorKind::Backend, format!("reading embeddings: {e}")))
}

fn answer(replies: Vec<Reply>, result: Result<Vec<Embedding>, ApiError>) {
    match result {
        Ok(rows) => {
            for (reply, row) in replies.into_iter().zip(rows) {
                // The client may have gone away; its answer is simply dropped.
                let _ = reply.send(Ok(row));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
