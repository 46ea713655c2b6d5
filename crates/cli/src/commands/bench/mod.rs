//! `visenc bench`: times the whole forward (`Encoder::encode_pixels`) of a model on random
//! normalised pixels, and (`--kernels`) the candle kernels visenc runs (GEMM, convolution,
//! attention) against a measured FMA peak of this machine, plus a per-op breakdown of one ViT-B/16
//! block and of ResNet-50's convolutions.
//!
//! Threads: candle runs on rayon's pool (set `RAYON_NUM_THREADS`); the FMA peak uses as many threads.
//! `bench/compare.py` drives this command (`--json`) next to ONNX Runtime and PyTorch.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde_json::{json, Value};
use visenc::{EncodeOptions, Pixels};

use crate::{batch, output, ModelArgs};

#[derive(Args)]
pub struct BenchArgs {
    /// A checkpoint directory or hub id to time (not needed with --kernels).
    #[arg(long, short, required_unless_present = "kernels")]
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
    /// Before timing, encode this float32 `.npy` batch [B, 3, H, W] once and write its embedding
    /// (projected if the model has a projection, else pooled) to --check-output (`.npy`).
    #[arg(long, requires = "check_output")]
    check_input: Option<PathBuf>,
    #[arg(long)]
    check_output: Option<PathBuf>,
}

pub fn run(a: BenchArgs) -> Result<usize> {
    let report = if a.kernels { kernels(&a)? } else { model(&a)? };
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else if a.kernels {
        print_kernels(&mut out, &report)?;
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

/// `VmHWM` / `VmRSS` of this process in MiB (Linux), 0 elsewhere.
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

// ------------------------------------------------------------------------------------------------
// Whole-model benchmark

fn model(a: &BenchArgs) -> Result<Value> {
    let spec = a.model.clone().context("--model is required")?;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let rss_start = proc_status_mib("VmRSS");
    let t = Instant::now();
    let enc = batch::load_encoder(&ModelArgs {
        model: spec.clone(),
        allow_mismatch: a.allow_mismatch,
        max_pixels: visenc::image::Limits::default().max_pixels,
        precision: a.precision,
    })?;
    let load_s = t.elapsed().as_secs_f64();
    let rss_loaded = proc_status_mib("VmRSS");
    let info = enc.info().clone();
    let (h, w) = match &a.size {
        Some(s) => parse_size(s)?,
        None if info.image_size != (0, 0) => info.image_size,
        None => bail!("{spec}: the model has no fixed input size; give --size HxW"),
    };
    let opts = EncodeOptions::default();

    let mut check = Value::Null;
    if let (Some(inp), Some(outp)) = (&a.check_input, &a.check_output) {
        let (shape, data) = read_npy_f32(inp)?;
        let [b, c, ch, cw] = shape[..] else {
            bail!(
                "{}: expected a [B, 3, H, W] array, got {shape:?}",
                inp.display()
            );
        };
        if c != 3 {
            bail!("{}: expected 3 channels, got {c}", inp.display());
        }
        let px: Vec<Pixels> = data
            .chunks(c * ch * cw)
            .map(|d| Pixels {
                data: d.to_vec(),
                height: ch,
                width: cw,
            })
            .collect();
        let f = enc.encode_pixels(&px, &opts)?;
        let e = f.embedding().to_dtype(DType::F32)?;
        let dims = e.dims().to_vec();
        let v: Vec<f32> = e.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        output::write_npy(outp, output::Elem::F32, &dims, &bytes)?;
        check = json!({"input": inp, "output": outp, "batch": b, "embedding_shape": dims,
                       "projected": f.projected.is_some()});
    }

    let px: Vec<Pixels> = (0..a.batch)
        .map(|i| Pixels {
            data: randn(a.seed.wrapping_add(i as u64), 3 * h * w),
            height: h,
            width: w,
        })
        .collect();
    let plan = Plan {
        warmup: a.warmup,
        iters: a.iters,
        seconds: a.seconds,
        min_iters: a.min_iters,
    };
    let stats = plan.time(|| {
        let f = enc.encode_pixels(&px, &opts)?;
        // candle's CPU backend is synchronous; touching the output keeps the work honest.
        std::hint::black_box(f.embedding().dims());
        Ok(())
    })?;
    let med = stats.median();
    Ok(json!({
        "model": spec,
        "architecture": info.architecture,
        "family": info.family,
        "parameters": info.parameters,
        "precision": a.precision.name(),
        "batch": a.batch,
        "size": [h, w],
        "threads": rayon::current_num_threads(),
        "warmup": a.warmup,
        "latency_s": stats.json(),
        "img_per_s": a.batch as f64 / med,
        "img_per_s_range": [a.batch as f64 / stats.max(), a.batch as f64 / stats.min()],
        "peak_rss_mib": proc_status_mib("VmHWM"),
        "rss_start_mib": rss_start,
        "rss_after_load_mib": rss_loaded,
        "load_s": load_s,
        "check": check,
    }))
}

fn print_model(out: &mut impl Write, r: &Value) -> Result<()> {
    let l = &r["latency_s"];
    let ms = |v: &Value| v.as_f64().unwrap_or(0.0) * 1e3;
    writeln!(
        out,
        "model          {} ({}, family {})",
        r["model"].as_str().unwrap_or(""),
        r["architecture"].as_str().unwrap_or(""),
        r["family"].as_str().unwrap_or("")
    )?;
    let p = r["parameters"].as_u64().unwrap_or(0);
    writeln!(out, "parameters     {p} ({:.1} M)", p as f64 / 1e6)?;
    writeln!(
        out,
        "input          {} x 3 x {} x {} (f32), {} threads",
        r["batch"], r["size"][0], r["size"][1], r["threads"]
    )?;
    writeln!(
        out,
        "throughput     {:.2} img/s (range {:.2}..{:.2})",
        r["img_per_s"].as_f64().unwrap_or(0.0),
        r["img_per_s_range"][0].as_f64().unwrap_or(0.0),
        r["img_per_s_range"][1].as_f64().unwrap_or(0.0)
    )?;
    writeln!(out, "latency/batch  median {:.1} ms, p90 {:.1} ms, min {:.1} ms, max {:.1} ms ({} runs after {} warm-up)",
        ms(&l["median"]), ms(&l["p90"]), ms(&l["min"]), ms(&l["max"]), l["n"], r["warmup"])?;
    writeln!(
        out,
        "peak RSS       {:.0} MiB (after load {:.0} MiB; load {:.2} s)",
        r["peak_rss_mib"].as_f64().unwrap_or(0.0),
        r["rss_after_load_mib"].as_f64().unwrap_or(0.0),
        r["load_s"].as_f64().unwrap_or(0.0)
    )?;
    Ok(())
}

/// Reads a little-endian float32, C-order `.npy` file.
fn read_npy_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .read_to_end(&mut buf)?;
    let bad = |m: &str| anyhow::anyhow!("{}: not a float32 .npy file ({m})", path.display());
    if buf.len() < 10 || &buf[..6] != b"\x93NUMPY" {
        return Err(bad("no magic"));
    }
    let (hlen, start) = match buf[6] {
        1 => (u16::from_le_bytes([buf[8], buf[9]]) as usize, 10),
        2 | 3 => (
            u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize,
            12,
        ),
        _ => return Err(bad("version")),
    };
    let header = std::str::from_utf8(buf.get(start..start + hlen).ok_or_else(|| bad("header"))?)?;
    if !header.contains("'descr': '<f4'") {
        return Err(bad("descr is not '<f4'"));
    }
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran order"));
    }
    let shape_s = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split_once('(')?.1.split_once(')'))
        .ok_or_else(|| bad("shape"))?
        .0;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("shape")))
        .collect::<Result<_>>()?;
    let body = &buf[start + hlen..];
    let n: usize = shape.iter().product();
    if body.len() != 4 * n {
        return Err(bad("size"));
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, data))
}

// ------------------------------------------------------------------------------------------------
// FMA peak

/// Peak f32 FMA throughput (GFLOP/s) of `threads` threads, and the instruction set used.
fn fma_peak(threads: usize, seconds: f64) -> (String, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = if is_x86_feature_detected!("avx512f") {
            "avx512f"
        } else if is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx") {
            "avx2+fma"
        } else {
            return ("none".into(), 0.0);
        };
        let run = move |n: u64| -> f64 {
            // SAFETY: the feature was detected above.
            unsafe {
                if isa == "avx512f" {
                    x86::fma_avx512(n)
                } else {
                    x86::fma_avx2(n)
                }
            }
        };
        let per_iter = if isa == "avx512f" {
            x86::FLOPS_PER_ITER_512
        } else {
            x86::FLOPS_PER_ITER_256
        };
        (
            isa.to_string(),
            peak_threads(threads, seconds, per_iter, run),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, seconds);
        ("unsupported arch".into(), 0.0)
    }
}

/// Peak bf16 dot-product throughput (`vdpbf16ps`), if the CPU has AVX512-BF16.
fn bf16_peak(threads: usize, seconds: f64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512f")) {
            return None;
        }
        // SAFETY: the features were detected above.
        let run = |n: u64| unsafe { x86::dpbf16_avx512(n) };
        Some(peak_threads(
            threads,
            seconds,
            x86::FLOPS_PER_ITER_BF16,
            run,
        ))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, seconds);
        None
    }
}

/// Runs `run(n)` on `threads` threads at once; the best of a few rounds, in GFLOP/s.
fn peak_threads(
    threads: usize,
    seconds: f64,
    flops_per_iter: f64,
    run: impl Fn(u64) -> f64 + Sync,
) -> f64 {
    // Calibrate n so one round takes ~seconds/5 on one thread.
    let mut n: u64 = 1 << 16;
    loop {
        let t = Instant::now();
        std::hint::black_box(run(n));
        let e = t.elapsed().as_secs_f64();
        if e > 0.02 {
            n = ((n as f64) * (seconds / 5.0) / e).max(1.0) as u64;
            break;
        }
        n *= 4;
    }
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| std::hint::black_box(run(n)));
            }
        });
        let e = t.elapsed().as_secs_f64();
        best = best.max(threads as f64 * n as f64 * flops_per_iter / e / 1e9);
    }
    best
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 12 independent accumulators (enough to cover 4-cycle latency on 2 FMA pipes), 2 flops/lane.
    pub const FLOPS_PER_ITER_512: f64 = 12.0 * 16.0 * 2.0;
    pub const FLOPS_PER_ITER_256: f64 = 12.0 * 8.0 * 2.0;
    /// `vdpbf16ps`: per f32 lane, two bf16 products and their sums.
    pub const FLOPS_PER_ITER_BF16: f64 = 12.0 * 16.0 * 4.0;

    macro_rules! chains {
        ($n:expr, $zero:expr, $op:expr, $sum:expr) => {{
            let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) =
                ($zero, $zero, $zero, $zero, $zero, $zero);
            let (mut a6, mut a7, mut a8, mut a9, mut a10, mut a11) =
                ($zero, $zero, $zero, $zero, $zero, $zero);
            for _ in 0..$n {
                a0 = $op(a0);
                a1 = $op(a1);
                a2 = $op(a2);
                a3 = $op(a3);
                a4 = $op(a4);
                a5 = $op(a5);
                a6 = $op(a6);
                a7 = $op(a7);
                a8 = $op(a8);
                a9 = $op(a9);
                a10 = $op(a10);
                a11 = $op(a11);
            }
            $sum([a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11])
        }};
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_avx512(n: u64) -> f64 {
        let m = _mm512_set1_ps(0.999_999);
        let c = _mm512_set1_ps(1e-7);
        let op = |x: __m512| _mm512_fmadd_ps(x, m, c);
        chains!(n, _mm512_set1_ps(1.0), op, |v: [__m512; 12]| v
            .iter()
            .map(|x| _mm512_reduce_add_ps(*x) as f64)
            .sum::<f64>())
    }

    #[target_feature(enable = "avx,fma")]
    pub unsafe fn fma_avx2(n: u64) -> f64 {
        let m = _mm256_set1_ps(0.999_999);
        let c = _mm256_set1_ps(1e-7);
        let op = |x: __m256| _mm256_fmadd_ps(x, m, c);
        chains!(n, _mm256_set1_ps(1.0), op, |v: [__m256; 12]| v
            .iter()
            .map(|x| {
                let mut o = [0f32; 8];
                _mm256_storeu_ps(o.as_mut_ptr(), *x);
                o.iter().map(|&y| y as f64).sum::<f64>()
            })
            .sum::<f64>())
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16_avx512(n: u64) -> f64 {
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.25));
        let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(-1e-3));
        let op = |x: __m512| _mm512_dpbf16_ps(x, a, b);
        chains!(n, _mm512_set1_ps(1.0), op, |v: [__m512; 12]| v
            .iter()
            .map(|x| _mm512_reduce_add_ps(*x) as f64)
            .sum::<f64>())
    }
}

// ------------------------------------------------------------------------------------------------
// Kernels, as visenc calls them through candle

/// `candle_nn::Linear::forward`, the layer every visenc model uses.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    candle_nn::Module::forward(&candle_nn::Linear::new(w.clone(), b.cloned()), x)
}

/// `candle_nn::ops::softmax_last_dim`, reached through visenc's own API (CLIP scoring calls it).
fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(visenc::Scoring::Softmax { logit_scale: 0.0 }.probabilities(x)?)
}

/// `candle_nn::ops::sigmoid` (fused), reached through visenc's API (SigLIP scoring calls it).
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    let s = visenc::Scoring::Sigmoid {
        logit_scale: 0.0,
        logit_bias: 0.0,
    };
    Ok(s.probabilities(x)?)
}

/// `candle_nn::ops::layer_norm`, the fused LayerNorm every visenc transformer uses.
fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::layer_norm(x, g, b, 1e-5)?)
}

/// visenc's f32 CPU convolution (`visenc_models::conv::conv2d_cpu`: dense or depthwise, bias fused).
fn visenc_conv(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
    groups: usize,
) -> Result<Tensor> {
    use visenc::models::conv::{conv2d_cpu, Fused, Padding};
    let fused = Fused {
        bias,
        ..Fused::default()
    };
    conv2d_cpu(x, weight, stride, Padding::Symmetric(pad), groups, fused)?
        .ok_or_else(|| anyhow::anyhow!("visenc has no CPU kernel for {groups} groups"))
}

fn randt(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(randn(seed, n), shape, &Device::Cpu)?)
}

struct KernelResult {
    name: String,
    shape: String,
    gflop: f64,
    stats: Stats,
}

impl KernelResult {
    fn json(&self, peak: f64) -> Value {
        let gflops = self.gflop / self.stats.median();
        json!({
            "name": self.name, "shape": self.shape, "gflop": self.gflop,
            "median_ms": self.stats.median() * 1e3, "min_ms": self.stats.min() * 1e3,
            "max_ms": self.stats.max() * 1e3, "n": self.stats.times.len(),
            "gflops": gflops, "gflops_best": self.gflop / self.stats.min(),
            "fraction_of_peak": if peak > 0.0 { gflops / peak } else { 0.0 },
        })
    }
}

fn kernels(a: &BenchArgs) -> Result<Value> {
    let threads = rayon::current_num_threads();
    let seconds = if a.seconds > 0.0 {
        a.seconds.min(3.0)
    } else {
        1.0
    };
    let (isa, peak) = fma_peak(threads, 1.0);
    let (_, peak1) = fma_peak(1, 0.5);
    let bf16 = bf16_peak(threads, 1.0);
    let plan = Plan {
        warmup: a.warmup.max(1),
        iters: a.iters,
        seconds,
        min_iters: a.min_iters.max(3),
    };
    let mut ks: Vec<KernelResult> = Vec::new();
    let mut bench = |name: &str,
                     shape: String,
                     gflop: f64,
                     f: &mut dyn FnMut() -> Result<Tensor>|
     -> Result<()> {
        let stats = plan.time(|| {
            std::hint::black_box(f()?);
            Ok(())
        })?;
        ks.push(KernelResult {
            name: name.into(),
            shape,
            gflop,
            stats,
        });
        Ok(())
    };

    // GEMM 1024^3 (contiguous x contiguous).
    let (m, k, n) = (1024, 1024, 1024);
    let x = randt(&[m, k], 1)?;
    let y = randt(&[k, n], 2)?;
    let g = 2.0 * (m * k * n) as f64 / 1e9;
    bench("gemm f32", format!("{m}x{k}x{n}"), g, &mut || {
        Ok(x.matmul(&y)?)
    })?;
    let (xb, yb) = (x.to_dtype(DType::BF16)?, y.to_dtype(DType::BF16)?);
    bench("gemm bf16", format!("{m}x{k}x{n}"), g, &mut || {
        Ok(xb.matmul(&yb)?)
    })?;

    // ViT-B/16 GEMMs at batch 8 (M = 8 x 197 tokens), as nn::Linear calls them: x [8, 197, K] @ W[N, K]^T.
    let (b, t) = (8usize, 197usize);
    let vit_gemms = [
        ("vit linear qkv (fused)", 768usize, 2304usize),
        ("vit linear q/k/v/out", 768, 768),
        ("vit linear fc1", 768, 3072),
        ("vit linear fc2", 3072, 768),
    ];
    for (label, kk, nn) in vit_gemms {
        let x = randt(&[b, t, kk], 3)?;
        let w = randt(&[nn, kk], 4)?;
        let g = 2.0 * (b * t * kk * nn) as f64 / 1e9;
        bench(
            label,
            format!("{}x{kk}x{nn} (b{b} x {t} tokens)", b * t),
            g,
            &mut || Ok(linear(&x, &w, None)?),
        )?;
    }
    // The same GEMMs through visenc's bf16 and int8 linear layers (weights packed once, as at load;
    // activations converted / quantised per call). Their peak is not the f32 FMA peak: bf16 is
    // compared with `bf16_dot_peak_gflops`.
    for precision in [visenc::Precision::Bf16, visenc::Precision::Int8] {
        for (label, kk, nn) in vit_gemms {
            let x = randt(&[b, t, kk], 3)?;
            let w = randt(&[nn, kk], 4)?;
            let bias = randt(&[nn], 5)?;
            let l = visenc::models::linear::Linear::with_precision(w, Some(bias), precision)?;
            let g = 2.0 * (b * t * kk * nn) as f64 / 1e9;
            bench(
                &format!("{label} {precision} (visenc)"),
                format!("{}x{kk}x{nn} (b{b} x {t} tokens)", b * t),
                g,
                &mut || Ok(l.forward(&x)?),
            )?;
        }
    }

    // Convolutions, NCHW, through visenc's kernels (`conv::conv2d_cpu`), and once each through
    // candle's im2col + GEMM and its grouped conv2d (one convolution per group) for comparison.
    let conv_cases: [(&str, usize, usize, usize, usize, usize, bool); 6] = [
        // name, channels in, out, kernel, groups, spatial, through candle's conv2d
        ("conv3x3 64->64", 64, 64, 3, 1, 56, false),
        ("conv3x3 64->64 via candle conv2d", 64, 64, 3, 1, 56, true),
        ("conv1x1 256->64", 256, 64, 1, 1, 56, false),
        ("depthwise 3x3, 144 ch", 144, 144, 3, 144, 56, false),
        ("depthwise 7x7, 96 ch", 96, 96, 7, 96, 56, false),
        (
            "depthwise 3x3, 144 ch via candle grouped conv2d",
            144,
            144,
            3,
            144,
            56,
            true,
        ),
    ];
    for (name, cin, cout, kk, groups, hw, candle) in conv_cases {
        let x = randt(&[8, cin, hw, hw], 5)?;
        let w = randt(&[cout, cin / groups, kk, kk], 6)?;
        let g = 2.0 * (8 * cout * hw * hw * (cin / groups) * kk * kk) as f64 / 1e9;
        bench(
            name,
            format!("b8 {cin}x{hw}x{hw}, k{kk}, groups {groups}"),
            g,
            &mut || {
                Ok(if candle {
                    x.conv2d(&w, kk / 2, 1, 1, groups)?
                } else {
                    visenc_conv(&x, &w, None, 1, kk / 2, groups)?
                })
            },
        )?;
    }

    // Attention core: softmax(Q K^T / sqrt(64)) V, 12 heads, 197 tokens, batch 8 (nn::Attention).
    let (h, hd) = (12usize, 64usize);
    let q = randt(&[b, h, t, hd], 7)?;
    let kt = randt(&[b, h, t, hd], 8)?;
    let v = randt(&[b, h, t, hd], 9)?;
    let g = 4.0 * (b * h * t * t * hd) as f64 / 1e9;
    bench(
        "attention",
        format!("b{b}, {h} heads, {t} tokens, head dim {hd}"),
        g,
        &mut || {
            let att = (&q * (hd as f64).powf(-0.5))?.matmul(&kt.t()?)?;
            Ok(softmax_last_dim(&att)?.matmul(&v)?)
        },
    )?;

    // The same attention, and the ViT block's LayerNorm and quick-GELU, through visenc's own kernels
    // (`visenc_models::ops`, what nn::Block runs on CPU f32): fused attention reads q, k, v in place.
    bench(
        "attention fused (visenc)",
        format!("b{b}, {h} heads, {t} tokens, head dim {hd}"),
        g,
        &mut || {
            let y = visenc::models::ops::attention(&q, &kt, &v, None, 0.125)?;
            y.context("the fused attention kernel did not apply")
        },
    )?;
    let xs = randt(&[b, t, 768], 10)?;
    let (g1, b1) = (randt(&[768], 12)?, randt(&[768], 13)?);
    bench(
        "layer_norm (visenc)",
        format!("{}x768", b * t),
        0.0,
        &mut || {
            let y = visenc::models::ops::layer_norm(&xs, &g1, &b1, 1e-5)?;
            y.context("the LayerNorm kernel did not apply")
        },
    )?;
    let hid = randt(&[b, t, 3072], 14)?;
    bench(
        "quick_gelu (visenc)",
        format!("{}x3072", b * t),
        0.0,
        &mut || {
            let y = visenc::models::nn::Activation::QuickGelu.forward(&hid)?;
            Ok(y)
        },
    )?;

    let kernels_json: Vec<Value> = ks.iter().map(|k| k.json(peak)).collect();
    let vit = vit_block_breakdown(&plan)?;
    let resnet = resnet50_conv_breakdown(&plan)?;
    Ok(json!({
        "threads": threads,
        "fma_peak": {"isa": isa, "gflops": peak, "gflops_1_thread": peak1},
        "bf16_dot_peak_gflops": bf16,
        "kernels": kernels_json,
        "vit_b16_block_b8": vit,
        "resnet50_convs_b8": resnet,
    }))
}

/// Times each op of one ViT-B/16 encoder block (CLIP: quick-GELU) at batch 8 exactly as
/// `nn::Block` runs it; x12 estimates the trunk.
fn vit_block_breakdown(plan: &Plan) -> Result<Value> {
    let (b, t, d, h, mlp) = (8usize, 197usize, 768usize, 12usize, 3072usize);
    let hd = d / h;
    let x = randt(&[b, t, d], 11)?;
    let g1 = ((randt(&[d], 12)? * 0.1)? + 1.0)?;
    let b1 = randt(&[d], 13)?;
    let wq = (randt(&[d, d], 14)? * 0.03)?;
    let bq = randt(&[d], 15)?;
    let w1 = (randt(&[mlp, d], 16)? * 0.03)?;
    let bb1 = randt(&[mlp], 17)?;
    let w2 = (randt(&[d, mlp], 18)? * 0.02)?;
    let bb2 = randt(&[d], 19)?;
    let split = |y: &Tensor| -> Result<Tensor> {
        Ok(y.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?)
    };
    let qlin = linear(&x, &wq, Some(&bq))?;
    let qh = split(&qlin)?;
    let att = qh.matmul(&qh.t()?)?;
    let p = softmax_last_dim(&att)?;
    let hid = linear(&x, &w1, Some(&bb1))?;
    let lin_g = |k: usize, n: usize| 2.0 * (b * t * k * n) as f64 / 1e9;
    let att_g = 2.0 * (b * h * t * t * hd) as f64 / 1e9;

    // (name, times per block, GFLOP per call, op)
    type Op<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;
    let ops: Vec<(&str, usize, f64, Op)> = vec![
        ("layer_norm", 2, 0.0, Box::new(|| layer_norm(&x, &g1, &b1))),
        (
            "linear q/k/v/out 768->768 (+bias)",
            4,
            lin_g(d, d),
            Box::new(|| Ok(linear(&x, &wq, Some(&bq))?)),
        ),
        (
            "split heads (reshape+transpose+contiguous)",
            3,
            0.0,
            Box::new(|| split(&qlin)),
        ),
        ("q * scale", 1, 0.0, Box::new(|| Ok((&qh * 0.125)?))),
        ("q @ k^T", 1, att_g, Box::new(|| Ok(qh.matmul(&qh.t()?)?))),
        ("softmax", 1, 0.0, Box::new(|| softmax_last_dim(&att))),
        (
            "att @ v + merge heads",
            1,
            att_g,
            Box::new(|| Ok(p.matmul(&qh)?.transpose(1, 2)?.reshape((b, t, d))?)),
        ),
        (
            "linear fc1 768->3072 (+bias)",
            1,
            lin_g(d, mlp),
            Box::new(|| Ok(linear(&x, &w1, Some(&bb1))?)),
        ),
        (
            "quick_gelu x*sigmoid(1.702x)",
            1,
            0.0,
            Box::new(|| Ok((&hid * sigmoid(&(&hid * 1.702)?)?)?)),
        ),
        (
            "linear fc2 3072->768 (+bias)",
            1,
            lin_g(mlp, d),
            Box::new(|| Ok(linear(&hid, &w2, Some(&bb2))?)),
        ),
        ("residual add", 2, 0.0, Box::new(|| Ok((&x + &x)?))),
    ];
    let mut rows = Vec::new();
    let mut block_s = 0.0;
    for (name, count, gflop, op) in &ops {
        let stats = plan.time(|| {
            std::hint::black_box(op()?);
            Ok(())
        })?;
        let med = stats.median();
        block_s += med * *count as f64;
        rows.push(
            json!({"op": name, "per_block": count, "median_ms": med * 1e3,
                         "gflops": if *gflop > 0.0 { gflop / med } else { 0.0 }}),
        );
    }
    Ok(json!({
        "note": "ops of one CLIP ViT-B/16 block at batch 8 (197 tokens) as nn::Block runs them, \
                 timed one at a time; per_block counts how often a block runs each",
        "ops": rows,
        "block_ms": block_s * 1e3,
        "trunk_estimate_ms": block_s * 12.0 * 1e3,
    }))
}

/// Times every convolution shape of ResNet-50 (timm `resnet50`, 224x224, batch 8) once each through
/// visenc's kernels, with the bias (folded BatchNorm) fused; x count gives the convolution share of a
/// forward.
fn resnet50_conv_breakdown(plan: &Plan) -> Result<Value> {
    // (cin, cout, k, stride, input size, count)
    let mut convs: Vec<(usize, usize, usize, usize, usize, usize)> = vec![(3, 64, 7, 2, 224, 1)];
    let mut cin = 64;
    let mut size = 56;
    for (i, (w, n)) in [(64usize, 3usize), (128, 4), (256, 6), (512, 3)]
        .into_iter()
        .enumerate()
    {
        let s = if i == 0 { 1 } else { 2 };
        let out = 4 * w;
        // First block: conv1 at the input size, strided 3x3, conv3, strided downsample.
        convs.push((cin, w, 1, 1, size, 1));
        convs.push((w, w, 3, s, size, 1));
        let size2 = size / s;
        convs.push((w, out, 1, 1, size2, n));
        convs.push((cin, out, 1, s, size, 1));
        // Other blocks.
        convs.push((out, w, 1, 1, size2, n - 1));
        convs.push((w, w, 3, 1, size2, n - 1));
        cin = out;
        size = size2;
    }
    let plan = Plan {
        warmup: 1,
        iters: Some(plan.min_iters.max(3)),
        ..*plan
    };
    let mut rows = Vec::new();
    let mut total = 0.0;
    let mut total_gflop = 0.0;
    for (cin, cout, k, s, hw, count) in convs {
        let x = randt(&[8, cin, hw, hw], 21)?;
        let w = randt(&[cout, cin, k, k], 22)?;
        let bias = randt(&[cout], 23)?;
        let stats = plan.time(|| {
            std::hint::black_box(visenc_conv(&x, &w, Some(&bias), s, k / 2, 1)?);
            Ok(())
        })?;
        let ho = (hw + 2 * (k / 2) - k) / s + 1;
        let g = 2.0 * (8 * cout * ho * ho * cin * k * k) as f64 / 1e9;
        let med = stats.median();
        total += med * count as f64;
        total_gflop += g * count as f64;
        rows.push(
            json!({"conv": format!("{cin}->{cout} k{k} s{s} @{hw}"), "count": count,
                         "median_ms": med * 1e3, "gflops": g / med}),
        );
    }
    Ok(json!({
        "note": "every convolution of timm resnet50 at 224x224, batch 8, through visenc's kernels with the folded-BN bias fused, timed alone",
        "convs": rows,
        "total_ms": total * 1e3,
        "total_gflop": total_gflop,
        "gflops": total_gflop / total,
    }))
}

fn print_kernels(out: &mut impl Write, r: &Value) -> Result<()> {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    writeln!(
        out,
        "threads {}; FMA peak ({}) {:.0} GFLOP/s; bf16 dot peak {}",
        r["threads"],
        r["fma_peak"]["isa"].as_str().unwrap_or(""),
        f(&r["fma_peak"]["gflops"]),
        r["bf16_dot_peak_gflops"]
            .as_f64()
            .map_or("n/a".into(), |v| format!("{v:.0} GFLOP/s"))
    )?;
    writeln!(
        out,
        "{:<28} {:<40} {:>10} {:>10} {:>8}",
        "kernel", "shape", "ms", "GFLOP/s", "of peak"
    )?;
    for k in r["kernels"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "{:<28} {:<40} {:>10.2} {:>10.1} {:>7.1}%",
            k["name"].as_str().unwrap_or(""),
            k["shape"].as_str().unwrap_or(""),
            f(&k["median_ms"]),
            f(&k["gflops"]),
            100.0 * f(&k["fraction_of_peak"])
        )?;
    }
    let v = &r["vit_b16_block_b8"];
    writeln!(
        out,
        "\nViT-B/16 block at batch 8 (sum {:.1} ms, x12 = {:.0} ms):",
        f(&v["block_ms"]),
        f(&v["trunk_estimate_ms"])
    )?;
    for o in v["ops"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {:<52} x{} {:>9.2} ms {:>8.1} GFLOP/s",
            o["op"].as_str().unwrap_or(""),
            o["per_block"],
            f(&o["median_ms"]),
            f(&o["gflops"])
        )?;
    }
    let c = &r["resnet50_convs_b8"];
    writeln!(
        out,
        "\nResNet-50 convolutions at batch 8: {:.0} ms for {:.1} GFLOP ({:.1} GFLOP/s)",
        f(&c["total_ms"]),
        f(&c["total_gflop"]),
        f(&c["gflops"])
    )?;
    for o in c["convs"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {:<28} x{} {:>9.2} ms {:>8.1} GFLOP/s",
            o["conv"].as_str().unwrap_or(""),
            o["count"],
            f(&o["median_ms"]),
            f(&o["gflops"])
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::D;

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
    fn npy_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let v: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        output::write_npy(&p, output::Elem::F32, &[2, 3, 2, 2], &bytes).unwrap();
        let (shape, data) = read_npy_f32(&p).unwrap();
        assert_eq!(shape, vec![2, 3, 2, 2]);
        assert_eq!(data, v);
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

    #[test]
    fn layer_norm_matches_definition() {
        let x = randt(&[2, 5, 8], 1).unwrap();
        let g = randt(&[8], 2).unwrap();
        let b = randt(&[8], 3).unwrap();
        let y = layer_norm(&x, &g, &b).unwrap();
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let r = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&g)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let diff: f32 = (y - r)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
}
