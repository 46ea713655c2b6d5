//! The load test: many concurrent clients against a server on this machine (loopback only), for a
//! bounded time. Each client sends single-input requests (texts to `/v1/embeddings` and `/embed`,
//! an image to `/v1/embeddings` with `"modality": "image"`) and checks every answer against the one
//! the server gave for the same input alone, before the load; a separate client polls `/health`.
//! It reports throughput, latency percentiles, statuses and every discrepancy.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use crate::client::{Client, Response};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Must be a loopback address.
    pub addr: SocketAddr,
    pub clients: usize,
    pub duration: Duration,
    /// An encoded image (PNG, JPEG, ...) for the image requests.
    pub image: Vec<u8>,
    /// Largest allowed difference between a batched answer and the single one.
    pub tolerance: f32,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub clients: usize,
    pub elapsed: Duration,
    pub requests: usize,
    pub by_status: BTreeMap<u16, usize>,
    /// Requests that got no HTTP answer (connection refused, reset, timed out).
    pub transport_errors: usize,
    /// Answers that differ from the single-request answer by more than the tolerance.
    pub mismatches: usize,
    /// Largest difference seen between a batched answer and the single one.
    pub max_difference: f32,
    pub health_checks: usize,
    pub health_failures: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// The largest forward pass the server ran (from `/metrics`).
    pub largest_batch: usize,
    /// The first few problems, for the report.
    pub problems: Vec<String>,
}

impl LoadReport {
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn server_errors(&self) -> usize {
        self.by_status
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum()
    }

    /// No 5xx, no transport error, /health always fine, every answer equal to the single one.
    pub fn passed(&self) -> bool {
        self.server_errors() == 0
            && self.transport_errors == 0
            && self.health_failures == 0
            && self.mismatches == 0
            && self.requests > 0
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "clients            {}", self.clients)?;
        writeln!(f, "duration           {:.1} s", self.elapsed.as_secs_f64())?;
        writeln!(f, "requests           {}", self.requests)?;
        writeln!(f, "throughput         {:.1} req/s", self.throughput())?;
        writeln!(
            f,
            "latency            p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )?;
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        writeln!(f, "statuses           {}", statuses.join(", "))?;
        writeln!(f, "transport errors   {}", self.transport_errors)?;
        writeln!(
            f,
            "batched == single  {} mismatches (max |difference| {:.2e})",
            self.mismatches, self.max_difference
        )?;
        writeln!(
            f,
            "/health            {} checks, {} failures",
            self.health_checks, self.health_failures
        )?;
        writeln!(f, "largest batch      {}", self.largest_batch)?;
        for p in &self.problems {
            writeln!(f, "problem            {p}")?;
        }
        writeln!(
            f,
            "result             {}",
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One kind of request and where its embedding sits in the answer.
struct Payload {
    path: &'static str,
    body: Value,
}

fn payloads(image: &[u8]) -> Vec<Payload> {
    let texts = [
        "a photo of a cat",
        "an espresso in a white cup",
        "a rocket on the launch pad",
        "a motorcycle parked outside",
        "an astronaut in a white suit",
        "a portrait of a naval officer",
        "a dog running on the beach",
        "the skyline of a city at night",
    ];
    let mut out: Vec<Payload> = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        out.push(if i % 2 == 0 {
            Payload {
                path: "/v1/embeddings",
                body: json!({"input": t, "encoding_format": "float"}),
            }
        } else {
            Payload {
                path: "/embed",
                body: json!({"inputs": t}),
            }
        });
    }
    let data_url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(image)
    );
    out.push(Payload {
        path: "/v1/embeddings",
        body: json!({"input": [data_url], "modality": "image"}),
    });
    out
}

/// The embedding in an answer of either API.
fn embedding(r: &Response) -> io::Result<Vec<f32>> {
    let v = r.json()?;
    let e = v
        .pointer("/data/0/embedding")
        .or_else(|| v.get(0))
        .and_then(Value::as_array)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no embedding: {v}")))?;
    Ok(e.iter()
        .filter_map(Value::as_f64)
        .map(|x| x as f32)
        .collect())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    by_status: BTreeMap<u16, usize>,
    transport_errors: usize,
    mismatches: usize,
    max_difference: f32,
    problems: Vec<String>,
}

impl Tally {
    fn problem(&mut self, p: String) {
        if self.problems.len() < 5 {
            self.problems.push(p);
        }
    }
}

/// Runs the load test. Fails only if the server cannot be reached at all or the address is not
/// on this machine; everything else is in the report.
pub fn run(cfg: &LoadConfig) -> io::Result<LoadReport> {
    if !cfg.addr.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: the load test only targets loopback addresses",
                cfg.addr
            ),
        ));
    }
    let timeout = Duration::from_secs(60);
    let payloads = Arc::new(payloads(&cfg.image));
    // The answers for each input alone (nothing else is running, so each is a batch of one).
    let mut single = Client::new(cfg.addr, timeout);
    let mut reference = Vec::with_capacity(payloads.len());
    for p in payloads.iter() {
        let r = single.post_json(p.path, &p.body)?;
        if r.status != 200 {
            return Err(io::Error::other(format!(
                "{} answered {} before the load: {}",
                p.path,
                r.status,
                r.text()
            )));
        }
        reference.push(embedding(&r)?);
    }
    let reference = Arc::new(reference);

    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(cfg.clients + 1));
    let mut threads = Vec::with_capacity(cfg.clients + 1);
    for c in 0..cfg.clients {
        let (payloads, reference, tally, done, start) = (
            payloads.clone(),
            reference.clone(),
            tally.clone(),
            done.clone(),
            start.clone(),
        );
        let (addr, tolerance) = (cfg.addr, cfg.tolerance);
        threads.push(
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    let mut client = Client::new(addr, timeout);
                    let mut local = Tally::default();
                    start.wait();
                    let mut k = c;
                    while !done.load(Ordering::Relaxed) {
                        let i = k % payloads.len();
                        k += 1;
                        let t = Instant::now();
                        match client.post_json(payloads[i].path, &payloads[i].body) {
                            Ok(r) => {
                                local.latencies.push(t.elapsed());
                                *local.by_status.entry(r.status).or_default() += 1;
                                if r.status != 200 {
                                    local.problem(format!(
                                        "{} -> {}: {}",
                                        payloads[i].path,
                                        r.status,
                                        r.text()
                                    ));
                                    continue;
                                }
                                let d = embedding(&r)
                                    .map_or(f32::INFINITY, |e| max_diff(&e, &reference[i]));
                                local.max_difference = local.max_difference.max(d);
                                if d > tolerance {
                                    local.mismatches += 1;
                                    local.problem(format!(
                                        "{} input {i}: batched answer differs by {d:e}",
                                        payloads[i].path
                                    ));
                                }
                            }
                            Err(e) => {
                                local.transport_errors += 1;
                                local.problem(format!("{}: {e}", payloads[i].path));
                            }
                        }
                    }
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    t.latencies.extend(local.latencies);
                    for (s, n) in local.by_status {
                        *t.by_status.entry(s).or_default() += n;
                    }
                    t.transport_errors += local.transport_errors;
                    t.mismatches += local.mismatches;
                    t.max_difference = t.max_difference.max(local.max_difference);
                    for p in local.problems {
                        t.problem(p);
                    }
                })?,
        );
    }
    // /health, polled throughout on its own connection.
    let health = {
        let (done, addr) = (done.clone(), cfg.addr);
        std::thread::spawn(move || {
            let mut client = Client::new(addr, timeout);
            let (mut checks, mut failures) = (0, 0);
            while !done.load(Ordering::Relaxed) {
                checks += 1;
                let ok = client
                    .get("/health")
                    .is_ok_and(|r| r.status == 200 && r.json().is_ok_and(|v| v["status"] == "ok"));
                failures += usize::from(!ok);
                std::thread::sleep(Duration::from_millis(50));
            }
            (checks, failures)
        })
    };
    start.wait();
    let began = Instant::now();
    std::thread::sleep(cfg.duration);
    done.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = began.elapsed();
    let (health_checks, health_failures) = health.join().unwrap_or((0, 1));
    let largest_batch = Client::new(cfg.addr, timeout)
        .get("/metrics")
        .ok()
        .and_then(|r| {
            r.text().lines().find_map(|l| {
                l.strip_prefix("visenc_batch_size_max ")?
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0);

    let mut t = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    t.latencies.sort();
    let pct = |q: f64| -> Duration {
        if t.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((t.latencies.len() - 1) as f64 * q).round() as usize;
        t.latencies[i]
    };
    Ok(LoadReport {
        clients: cfg.clients,
        elapsed,
        requests: t.latencies.len() + t.transport_errors,
        p50: pct(0.50),
        p99: pct(0.99),
        max: t.latencies.last().copied().unwrap_or_default(),
        by_status: t.by_status,
        transport_errors: t.transport_errors,
        mismatches: t.mismatches,
        max_difference: t.max_difference,
        health_checks,
        health_failures,
        largest_batch,
        problems: t.problems,
    })
}
