//! The FMA (f32) and `vdpbf16ps` (bf16) peaks of this machine, the yardstick of the kernel rows.

use std::io::Write;

use anyhow::Result;
use serde_json::{json, Value};

/// The FMA peak of `threads` threads (in `seconds`) and of one thread (in half of it), and their
/// ratio: about `threads` where each thread has a core of its own, about 1 where two vCPUs share one
/// core's FMA units (as a cloud host's sibling hyperthreads may, unseen by `/proc/stat`).
pub(super) fn peak_report(threads: usize, seconds: f64) -> Value {
    let (isa, peak) = fma_peak(threads, seconds);
    let (_, peak1) = fma_peak(1, seconds / 2.0);
    let scaling = if peak1 > 0.0 { peak / peak1 } else { 0.0 };
    json!({
        "threads": threads,
        "fma_peak": {"isa": isa, "gflops": peak, "gflops_1_thread": peak1, "scaling": scaling},
    })
}

pub(super) fn print_peak(out: &mut impl Write, r: &Value) -> Result<()> {
    let p = &r["fma_peak"];
    let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
    writeln!(
        out,
        "FMA peak ({}): {:.0} GFLOP/s on {} threads, {:.0} on one: {:.2}x",
        p["isa"].as_str().unwrap_or(""),
        f("gflops"),
        r["threads"],
        f("gflops_1_thread"),
        f("scaling")
    )?;
    Ok(())
}

/// Peak f32 FMA throughput (GFLOP/s) of `threads` threads, and the instruction set used.
pub(super) fn fma_peak(threads: usize, seconds: f64) -> (String, f64) {
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
pub(super) fn bf16_peak(threads: usize, seconds: f64) -> Option<f64> {
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
#[cfg(target_arch = "x86_64")]
fn peak_threads(
    threads: usize,
    seconds: f64,
    flops_per_iter: f64,
    run: impl Fn(u64) -> f64 + Sync,
) -> f64 {
    // Calibrate n so one round takes ~seconds/5 on one thread.
    let mut n: u64 = 1 << 16;
    loop {
        let t = std::time::Instant::now();
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
        let t = std::time::Instant::now();
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
