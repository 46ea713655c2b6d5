//! Run-time CPU feature detection and the thread count the kernels use.

use std::sync::OnceLock;

/// The instruction-set extensions the kernels can use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// AVX-512 Foundation (16-lane f32 FMA).
    pub avx512f: bool,
    /// AVX512-BF16 (`vdpbf16ps`: bf16 pair dot products accumulated in f32; `vcvtneps2bf16`).
    pub avx512bf16: bool,
    /// AVX512-BF16 whose `vdpbf16ps` multiplies at least [`BF16_DOT_PAYS`] times as fast as f32
    /// FMAs do (timed once at detection; AMD Zen 4/5: 2x, Intel Xeons with two FMA ports: 0.5x).
    /// Where it does not, the bf16 GEMM widens its bf16 operands to f32 and runs on FMAs.
    pub bf16_dot: bool,
    /// AVX512-VNNI (`vpdpbusd`: u8 x i8 quadruple dot products accumulated in i32).
    pub avx512vnni: bool,
    /// AVX2 + FMA (8-lane f32).
    pub avx2_fma: bool,
}

impl Features {
    /// No extension: every kernel takes its portable path.
    pub const PORTABLE: Self = Self {
        avx512f: false,
        avx512bf16: false,
        bf16_dot: false,
        avx512vnni: false,
        avx2_fma: false,
    };

    fn detect() -> Self {
        if std::env::var("VISENC_KERNELS").is_ok_and(|v| v == "portable") {
            return Self::PORTABLE;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx512bf16 =
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16");
            Self {
                avx512f: is_x86_feature_detected!("avx512f"),
                avx512bf16,
                // SAFETY: AVX512-BF16 (and so AVX-512F) was detected.
                bf16_dot: avx512bf16 && unsafe { x86::bf16_dot_speed() } >= BF16_DOT_PAYS,
                avx512vnni: is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni"),
                avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Self::PORTABLE
        }
    }
}

/// How fast, relative to f32 FMAs, `vdpbf16ps` must multiply for the bf16 GEMM to use it: the
/// widening kernel (two integer operations per 16 weight pairs, then FMAs) runs at ~0.85x the f32 FMA
/// rate.
pub const BF16_DOT_PAYS: f64 = 0.8;

/// The features of this machine, detected once. `VISENC_KERNELS=portable` in the environment forces
/// the portable paths (to test them, or to compare against them).
pub fn features() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(Features::detect)
}

/// The size of CPU 0's level-3 cache in bytes as Linux reports it (`None` elsewhere or when the
/// system does not say).
pub fn l3_bytes() -> Option<usize> {
    static L3: OnceLock<Option<usize>> = OnceLock::new();
    *L3.get_or_init(|| {
        let dir = "/sys/devices/system/cpu/cpu0/cache";
        (0..8).find_map(|i| {
            let read = |f: &str| std::fs::read_to_string(format!("{dir}/index{i}/{f}")).ok();
            (read("level")?.trim() == "3").then(|| parse_cache_size(&read("size")?))?
        })
    })
}

/// A sysfs cache size: `48K`, `2048K`, `260M` (or plain bytes).
fn parse_cache_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, unit) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<usize>().ok()?.checked_mul(unit)
}

/// Threads the kernels split work across: rayon's pool size (`RAYON_NUM_THREADS`, else the number of
/// cores).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// `0..n` as parallel tasks split down to single items. rayon otherwise splits a range only a few
/// times (log2 of the threads, again when a part is stolen), so a thread that runs out of work waits
/// while another finishes a run of tasks: 1-5 ms at a time, ~3 % of a ViT-B/16 forward in its GEMMs.
pub(crate) fn tasks(n: usize) -> rayon::iter::MaxLen<rayon::range::Iter<usize>> {
    use rayon::prelude::*;
    (0..n).into_par_iter().with_max_len(1)
}

/// Runs `f` on one of rayon's workers (directly when the caller is one). A forward pass run this way
/// joins its own parallel regions: the worker runs its share of each and steals the rest back,
/// instead of the caller injecting every region into the pool and sleeping until a worker ends it
/// (at batch 1 an EfficientNet-B0 has ~80 regions of well under a millisecond each).
///
/// While `f` runs, the other workers keep looking for its work instead of going to sleep between
/// regions (and being woken, through the kernel, for the next one): each runs a job that takes
/// pending work as it appears and returns when `f` has. They only do so while `f` is the only such
/// pass in the process; with several at once (a server's concurrent requests) every worker is busy
/// anyway, and a worker spinning for one pass must not stay stacked above another pass's work.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    static PASSES: AtomicUsize = AtomicUsize::new(0);
    /// Marks the pass as ended even when `f` panics, so no worker spins forever.
    struct Ended<'a>(&'a AtomicBool);
    impl Drop for Ended<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
            PASSES.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        PASSES.fetch_add(1, Ordering::AcqRel);
        let ended = Ended(&done);
        let owner = rayon::current_thread_index();
        let done = &done;
        for _ in 1..threads() {
            s.spawn(move |_| {
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(Ordering::Acquire) && PASSES.load(Ordering::Acquire) == 1 {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        for _ in 0..SPINS {
                            std::hint::spin_loop();
                        }
                    }
                }
            });
        }
        let r = f();
        drop(ended);
        r
    })
}

/// `spin_loop` hints between two looks for work of a worker waiting on an [`in_pool`] pass.
const SPINS: usize = 32;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::time::Instant;

    /// Multiply-adds per second of `vdpbf16ps` (two per lane) over those of `vfmadd231ps`, each
    /// timed as 12 independent chains on this thread, best of 5 interleaved tries (~1 ms in all).
    ///
    /// # Safety
    /// AVX512-BF16 is present.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn bf16_dot_speed() -> f64 {
        const STEPS: usize = 2048;
        let (mut fma, mut dot) = (f64::MAX, f64::MAX);
        for _ in 0..5 {
            let t = Instant::now();
            let mut acc = [_mm512_set1_ps(1.0); 12];
            let (a, b) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1e-3));
            for _ in 0..STEPS {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(a, b, *x);
                }
            }
            std::hint::black_box(acc);
            fma = fma.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let mut acc = [_mm512_set1_ps(1.0); 12];
            let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.25));
            let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(-1e-3));
            for _ in 0..STEPS {
                for x in acc.iter_mut() {
                    *x = _mm512_dpbf16_ps(*x, a, b);
                }
            }
            std::hint::black_box(acc);
            dot = dot.min(t.elapsed().as_secs_f64());
        }
        2.0 * fma / dot.max(1e-9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passes return their value, run their parallel work, end after a panic (their waiting
    /// workers stop), and several at once from different threads (nested parallel regions in
    /// each, workers waiting for one while another runs) all finish.
    #[test]
    fn passes_finish_alone_after_a_panic_and_concurrently() {
        use rayon::prelude::*;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let work = |seed: u64| {
            in_pool(|| {
                (0..64u64)
                    .into_par_iter()
                    .map(|i| {
                        (0..1000u64)
                            .into_par_iter()
                            .map(|j| i * j + seed)
                            .sum::<u64>()
                    })
                    .sum::<u64>()
            })
        };
        let want = |seed: u64| (0..64u64).map(|i| i * 499_500 + 1000 * seed).sum::<u64>();
        pool.install(|| assert_eq!(work(1), want(1)));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| in_pool(|| panic!("inside the pass")))
        }));
        assert!(panicked.is_err());
        let (tx, rx) = std::sync::mpsc::channel();
        let pool = std::sync::Arc::new(pool);
        for t in 0..4u64 {
            let (tx, pool) = (tx.clone(), pool.clone());
            std::thread::spawn(move || {
                let got: Vec<u64> = (0..20).map(|_| pool.install(|| work(t))).collect();
                tx.send((t, got)).unwrap();
            });
        }
        for _ in 0..4 {
            let (t, got) = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("concurrent passes did not finish");
            assert!(got.iter().all(|&g| g == want(t)), "pass {t}");
        }
    }

    #[test]
    fn cache_sizes_parse() {
        assert_eq!(parse_cache_size("48K\n"), Some(48 << 10));
        assert_eq!(parse_cache_size("266240K"), Some(266240 << 10));
        assert_eq!(parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size(""), None);
        assert_eq!(parse_cache_size("K"), None);
        assert_eq!(parse_cache_size("lots"), None);
    }

    #[test]
    fn detection_is_consistent() {
        let f = features();
        // The extensions built on AVX-512F imply it.
        assert!(!f.avx512bf16 || f.avx512f);
        assert!(!f.bf16_dot || f.avx512bf16);
        assert!(!f.avx512vnni || f.avx512f);
        assert_eq!(f, features());
    }
}
