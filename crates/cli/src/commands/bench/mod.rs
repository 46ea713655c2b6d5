//! `visenc bench`: times the whole forward (`Encoder::encode_pixels`) of a model on random
//! normalised pixels, and (`--kernels`) the candle kernels visenc runs (GEMM, convolution,
//! attention) against a measured FMA peak of this machine, plus a per-op breakdown of one ViT-B/16
//! block and of ResNet-50's convolutions; `--peak` measures only the FMA peak of one thread and of
//! all threads (a quick check that the threads run on cores of their own).
//!
//! Threads: candle runs on rayon's pool (set `RAYON_NUM_THREADS`); the FMA peak uses as many threads.
//! `bench/compare.py` drives this command (`--json`) next to ONNX Runtime and PyTorch.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};

mod kernels;
mod model;
mod peak;

use kernels::{kernels, print_kernels};
use model::{model, print_model};
use peak::{peak_report, print_peak};

#[derive(Args)]
pub struct BenchArgs {
    /// A checkpoint directory or hub id to time (not needed with --kernels or --peak).
    #[arg(long, short, required_unless_present_any = ["kernels", "peak"])]
    model: Option<String>,
    /// Load even if tensors are missing, unexpected or mis-shaped.
    #[arg(long)]
    allow_mismatch: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Untimed forward passes first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed forward passes (default: as many as fit in --seconds, at least --min-iters).
    #[arg(long)]
    iters: Option<usize>,
    /// Time budget of the timed passes when --iters is not given.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Fewest timed passes when timing by --seconds.
    #[arg(long, default_value_t = 3)]
    min_iters: usize,
    /// What linear layers compute in: f32, bf16 or int8 (as `--precision` of the other commands;
    /// `--dtype` is the old name).
    #[arg(long, alias = "dtype", default_value_t = visenc::Precision::F32)]
    precision: visenc::Precision,
    /// Input size `HxW` (or `N` for NxN); default: the model's input size.
    #[arg(long)]
    size: Option<String>,
    /// Seed of the random pixels.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON (for scripts).
    #[arg(long)]
    json: bool,
    /// Run the kernel micro-benchmarks (GEMM, convolution, attention, FMA peak) instead of a model.
    #[arg(long)]
    kernels: bool,
    /// Measure only the FMA peak of all threads and of one thread, in --seconds but at most 0.5 s;
    /// their ratio shows whether the threads have cores of their own.
    #[arg(long, conflicts_with = "kernels")]
    peak: bool,
    /// Before timing, encode this float32 `.npy` batch [B, 3, H, W] once and write its embedding
    /// (projected if the model has a projection, else pooled) to --check-output (`.npy`).
    #[arg(long, requires = "check_output")]
    check_input: Option<PathBuf>,
    #[arg(long)]
    check_output: Option<PathBuf>,
}

pub fn run(a: BenchArgs) -> Result<usize> {
    let report = if a.kernels {
        kernels(&a)?
    } else if a.peak {
        peak_report(rayon::current_num_threads(), a.seconds.min(0.5))
    } else {
        model(&a)?
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else if a.kernels {
        print_kernels(&mut out, &report)?;
    } else if a.peak {
        print_peak(&mut out, &report)?;
    } else {
        print_model(&mut out, &report)?;
    }
    Ok(0)
}

// ------------------------------------------------------------------------------------------------
// Timing helpers

/// Latency statistics of a list of per-iteration seconds.
#[derive(Debug, Clone)]
struct Stats {
    times: Vec<f64>,
}

impl Stats {
    fn sorted(&self) -> Vec<f64> {
        let mut t = self.times.clone();
        t.sort_by(|a, b| a.total_cmp(b));
        t
    }
    fn median(&self) -> f64 {
        let t = self.sorted();
        let n = t.len();
        if n % 2 == 1 {
            t[n / 2]
        } else {
            (t[n / 2 - 1] + t[n / 2]) / 2.0
        }
    }
    /// Nearest-rank percentile.
    fn pct(&self, p: f64) -> f64 {
        let t = self.sorted();
        let k = ((p / 100.0 * t.len() as f64).ceil() as usize).clamp(1, t.len());
        t[k - 1]
    }
    fn min(&self) -> f64 {
        self.sorted()[0]
    }
    fn max(&self) -> f64 {
        *self.sorted().last().unwrap()
    }
    fn mean(&self) -> f64 {
        self.times.iter().sum::<f64>() / self.times.len() as f64
    }
    fn json(&self) -> Value {
        json!({
            "median": self.median(), "p90": self.pct(90.0), "min": self.min(), "max": self.max(),
            "mean": self.mean(), "n": self.times.len(), "all": self.times,
        })
    }
}

/// How long and how often to run a measured closure.
#[derive(Debug, Clone, Copy)]
struct Plan {
    warmup: usize,
    iters: Option<usize>,
    seconds: f64,
    min_iters: usize,
}

impl Plan {
    fn time<F: FnMut() -> Result<()>>(&self, mut f: F) -> Result<Stats> {
        for _ in 0..self.warmup {
            f()?;
        }
        let mut times = Vec::new();
        let start = Instant::now();
        loop {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64());
            let done = match self.iters {
                Some(n) => times.len() >= n,
                None => {
                    times.len() >= self.min_iters.max(1)
                        && start.elapsed().as_secs_f64() >= self.seconds
                }
            };
            if done {
                return Ok(Stats { times });
            }
        }
    }
}

/// A size field of this process's `/proc/self/status` (`VmHWM`, `VmRSS`, `RssFile`) in MiB (Linux),
/// 0 elsewhere.
fn proc_status_mib(key: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0.0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Deterministic standard-normal numbers (xorshift64* + Box-Muller).
fn randn(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        v.push((r * th.cos()) as f32);
        v.push((r * th.sin()) as f32);
    }
    v.truncate(n);
    v
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let parse = |x: &str| -> Result<usize> {
        x.trim()
            .parse()
            .with_context(|| format!("bad --size {s:?}: expected HxW or N"))
    };
    Ok(match s.split_once(['x', 'X']) {
        Some((h, w)) => (parse(h)?, parse(w)?),
        None => {
            let n = parse(s)?;
            (n, n)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_and_percentile() {
        let s = Stats {
            times: vec![5.0, 1.0, 3.0, 2.0, 4.0],
        };
        assert_eq!(s.median(), 3.0);
        assert_eq!(s.pct(90.0), 5.0);
        assert_eq!(s.pct(50.0), 3.0);
        let s = Stats {
            times: vec![1.0, 2.0],
        };
        assert_eq!(s.median(), 1.5);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("448").unwrap(), (448, 448));
        assert_eq!(parse_size("224x320").unwrap(), (224, 320));
        assert!(parse_size("a").is_err());
    }

    #[test]
    fn randn_is_deterministic_and_normal() {
        let a = randn(3, 10_000);
        assert_eq!(a, randn(3, 10_000));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / a.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
