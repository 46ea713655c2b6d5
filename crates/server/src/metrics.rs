//! Prometheus metrics in the text exposition format: requests by route and status, request
//! latencies, batch sizes and times, queue depth and requests in flight.
//! Format: https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A cumulative histogram with fixed bucket bounds.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    batch_size: Mutex<Histogram>,
    batch_seconds: Mutex<Histogram>,
    queue_depth: AtomicI64,
    in_flight: AtomicI64,
    largest_batch: AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            latency: Mutex::default(),
            batch_size: Mutex::new(Histogram::new(BATCH_BOUNDS)),
            batch_seconds: Mutex::new(Histogram::new(LATENCY_BOUNDS)),
            queue_depth: AtomicI64::new(0),
            in_flight: AtomicI64::new(0),
            largest_batch: AtomicUsize::new(0),
        }
    }
}

/// A poisoned lock only means a panic elsewhere; the counters are still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        *lock(&self.requests)
            .entry((route.to_string(), status))
            .or_default() += 1;
        lock(&self.latency)
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(LATENCY_BOUNDS))
            .observe(elapsed.as_secs_f64());
    }

    pub fn batch(&self, size: usize, elapsed: Duration) {
        lock(&self.batch_size).observe(size as f64);
        self.largest_batch.fetch_max(size, Ordering::Relaxed);
        lock(&self.batch_seconds).observe(elapsed.as_secs_f64());
    }

    /// Items waiting for the model (positive to add, negative to take).
    pub fn queue(&self, delta: i64) {
        self.queue_depth.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn queue_depth(&self) -> i64 {
        self.queue_depth.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    /// The largest batch the model has run so far (0 before the first).
    pub fn largest_batch(&self) -> usize {
        self.largest_batch.load(Ordering::Relaxed)
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP visenc_requests_total HTTP requests answered, by route and status.\n");
        out.push_str("# TYPE visenc_requests_total counter\n");
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "visenc_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP visenc_request_duration_seconds Time from request to response.\n");
        out.push_str("# TYPE visenc_request_duration_seconds histogram\n");
        for (route, h) in lock(&self.latency).iter() {
            h.render(
                &mut out,
                "visenc_request_duration_seconds",
                &format!("route=\"{route}\""),
            );
        }
        out.push_str("# HELP visenc_batch_size Items per forward pass.\n");
        out.push_str("# TYPE visenc_batch_size histogram\n");
        lock(&self.batch_size).render(&mut out, "visenc_batch_size", "");
        out.push_str("# HELP visenc_batch_size_max The largest batch so far.\n");
        out.push_str("# TYPE visenc_batch_size_max gauge\n");
        let _ = writeln!(out, "visenc_batch_size_max {}", self.largest_batch());
        out.push_str("# HELP visenc_batch_duration_seconds Time of one forward pass.\n");
        out.push_str("# TYPE visenc_batch_duration_seconds histogram\n");
        lock(&self.batch_seconds).render(&mut out, "visenc_batch_duration_seconds", "");
        out.push_str("# HELP visenc_queue_depth Items waiting for the model.\n");
        out.push_str("# TYPE visenc_queue_depth gauge\n");
        let _ = writeln!(out, "visenc_queue_depth {}", self.queue_depth());
        out.push_str("# HELP visenc_requests_in_flight Requests being answered.\n");
        out.push_str("# TYPE visenc_requests_in_flight gauge\n");
        let _ = writeln!(
            out,
            "visenc_requests_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_largest_batch_is_its_bucket() {
        let m = Metrics::default();
        assert_eq!(m.largest_batch(), 0);
        m.batch(1, Duration::from_millis(2));
        m.batch(3, Duration::from_millis(2));
        assert_eq!(m.largest_batch(), 3);
        let text = m.render();
        assert!(
            text.contains("visenc_batch_size_bucket{le=\"1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("visenc_batch_size_bucket{le=\"4\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("visenc_batch_size_bucket{le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("visenc_batch_size_sum 4\n"), "{text}");
    }
}
