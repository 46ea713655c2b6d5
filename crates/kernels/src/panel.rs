//! What the GEMMs on packed weights ([`crate::gemm_f32`], [`crate::gemm_bf16`], [`crate::gemm_int8`])
//! share: the panel width of packed weights, the register tile, the parallel loop over output tiles
//! and the epilogue after each tile.
//!
//! `C[m, n] = act(A[m, k] · Wᵀ + bias + residual)`, with `W` [n, k] (a PyTorch `nn.Linear` weight) packed once into
//! panels of [`NR`] output columns, each panel holding its whole `k` contiguously. There is no `k`
//! blocking: one panel is at most 64 x 3072 bf16 (384 KiB), which stays in the 1 MiB L2 while a block of
//! [`MC`] rows streams past it, and a full-`k` dot product lets the epilogue (bias, int8 dequantisation)
//! run once, straight from the accumulators — the order of BLIS' `jr`/`ir` loops with `kc = k`
//! (<https://github.com/flame/blis/blob/0.9.0/docs/KernelsHowTo.md>).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::conv::{Act, Epilogue};
use crate::OutPtr;

/// Output columns per packed panel: four 16-lane registers.
pub(crate) const NR: usize = 64;
/// Rows per register tile: 6 x 4 accumulators leave registers for the 4 panel vectors and a broadcast.
pub(crate) const MR: usize = 6;
/// Most rows per parallel task; the task's rows are register tiles of `MR` rows over one panel.
const MC: usize = 96;
/// Most bytes a task's row block and one panel of f32 operands may take together for the block to
/// serve every panel from L2 (half of the Xeon's 2 MiB): ViT-B/16's fc2 (1576 x 3072 x 768) ran
/// 8-12 % faster with its panels kept instead (session 14, alternating passes; the whole forward
/// 1-3 %).
const L2_BLOCK_BYTES: usize = 1 << 20;
/// Below this many multiply-adds one thread does the whole product (rayon's hand-off costs more).
const SERIAL_MACS: usize = 1 << 18;
/// Fewest parallel tasks per thread a product is split into where it has the rows.
const TASKS_PER_THREAD: usize = 4;

/// One register tile of the output: rows `row..row + rows` (at most [`MR`]) x the `cols` valid
/// columns of panel `panel`.
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub row: usize,
    pub rows: usize,
    pub panel: usize,
    pub cols: usize,
    /// Where the tile goes (rows `n` apart; only this tile's task writes there) with the epilogue's
    /// bias, residual and activation at the tile's first element.
    pub out: Store,
    /// The first tile of its task: the panel comes from L3 or memory, not from L2 as for the next
    /// tiles (see [`crate::gemm_f32`]'s prefetch). Read by the x86 kernels only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub first: bool,
}

/// Checks the operands of `c[m, n] = act(a[m, k] · wᵀ + bias + residual)` (`name` opens the panic
/// message: a wrong shape here is a bug of the caller, not bad input).
pub(crate) fn check_shapes(
    name: &str,
    a: &[f32],
    m: usize,
    n: usize,
    k: usize,
    e: &Epilogue,
    c: &[MaybeUninit<f32>],
) {
    assert_eq!(a.len(), m * k, "{name}: activations are not {m} x {k}");
    check_output(name, m, n, e, c);
}

/// Checks the output, bias and residual of an `m` x `n` product (as [`check_shapes`]).
pub(crate) fn check_output(name: &str, m: usize, n: usize, e: &Epilogue, c: &[MaybeUninit<f32>]) {
    assert_eq!(c.len(), m * n, "{name}: output is not {m} x {n}");
    assert!(
        e.bias.is_none_or(|b| b.len() == n),
        "{name}: bias is not {n} wide"
    );
    assert!(
        e.residual.is_none_or(|r| r.len() == m * n),
        "{name}: residual is not {m} x {n}"
    );
}

/// `c` as memory the GEMMs write (they never read it, nor write anything uninitialised to it).
pub(crate) fn as_uninit(c: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; only initialised values are written through the view.
    unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// Calls `tile` for every register tile of the `m` x `n` output `c`, which writes
/// `act(a · wᵀ + bias + residual)` there (`e`; the whole epilogue in registers), so every element of
/// `c` is written: tasks of up to [`MC`] rows x one panel, in parallel when the product (`k` deep) is
/// large enough.
pub(crate) fn for_each_tile(
    c: &mut [MaybeUninit<f32>],
    m: usize,
    n: usize,
    k: usize,
    e: &Epilogue,
    tile: impl Fn(Tile) + Sync,
) {
    assert!(c.len() >= m * n, "for_each_tile: output is not {m} x {n}");
    let out = OutPtr(c.as_mut_ptr().cast());
    let panels = n.div_ceil(NR);
    // Blocks of equal size (a multiple of MR), so no block is a sliver that streams a whole panel
    // for a few rows (197 tokens: 102 + 95 rather than 96 + 96 + 5); and at least TASKS_PER_THREAD
    // tasks per thread where the rows allow, so a product of few panels and few rows does not
    // leave a thread idle (49 pixels x 3 panels: 3 tasks on 2 threads would take 2/3 of the time,
    // 9 take 5/9).
    let want = m
        .div_ceil(MC)
        .max((crate::cpu::threads() * TASKS_PER_THREAD).div_ceil(panels))
        .min(m.div_ceil(MR))
        .max(1);
    let mc = m.div_ceil(want).next_multiple_of(MR).max(MR);
    let blocks = m.div_ceil(mc);
    // Consecutive tasks (the ones a thread runs in turn: rayon splits the range in halves) share
    // the smaller operand's block and stream the larger one's past it once: with more output
    // columns than rows (a wide layer at batch 1) a panel of weights serves every row block in
    // turn, else a block of rows serves every panel — where that block and a panel fit in L2
    // together; a deep product (ViT's fc2, k = 3072: 1.9 MiB) keeps the panel instead, and its
    // rows stream past it a register tile at a time.
    let panel_major = n > m || (mc + NR) * k * size_of::<f32>() > L2_BLOCK_BYTES;
    let cold = m * n >= COLD_OUTPUT;
    let run = |t: usize| {
        let (block, panel) = if panel_major {
            (t % blocks, t / blocks)
        } else {
            (t / panels, t % panels)
        };
        let row0 = block * mc;
        let end = m.min(row0 + mc);
        let cols = panel_cols(n, panel);
        for row in (row0..end).step_by(MR) {
            let t = Tile {
                first: row == row0,
                row,
                rows: MR.min(end - row),
                panel,
                cols,
                out: Store {
                    // SAFETY: row < m and panel * NR < n, so the offset is inside `c`.
                    c: unsafe { out.at(row * n + panel * NR) },
                    ldc: n,
                    bias: e
                        .bias
                        .map_or(std::ptr::null(), |b| b[panel * NR..].as_ptr()),
                    residual: e
                        .residual
                        .map_or(std::ptr::null(), |r| r[row * n + panel * NR..].as_ptr()),
                    act: e.act,
                    cold,
                },
            };
            tile(t);
        }
    };
    if m * n * k < SERIAL_MACS || crate::cpu::threads() == 1 || SERIAL.get() {
        (0..blocks * panels).for_each(run);
    } else {
        crate::cpu::tasks(blocks * panels).for_each(run);
    }
}

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every GEMM it calls on this thread alone (for callers that are already one of
/// several parallel tasks, each with its own small products).
pub(crate) fn serially<R>(f: impl FnOnce() -> R) -> R {
    let was = SERIAL.replace(true);
    let r = f();
    SERIAL.set(was);
    r
}

/// Rows of `k` activations per parallel task when the bf16 and int8 GEMMs convert their input
/// (about 32 Ki values, so small products stay on one thread).
pub(crate) fn convert_rows(k: usize) -> usize {
    ((1 << 15) / k.max(1)).max(1)
}

/// Blocks of [`convert_rows`] per thread from which a converting GEMM runs block by block.
const CONVERTED_BLOCKS_PER_THREAD: usize = 4;

/// Runs a GEMM that converts its input (bf16, int8) block by block when `m` rows make enough blocks
/// of about [`convert_rows`]: each parallel task converts its rows and multiplies them by every panel on
/// its own thread (`gemm`, under [`serially`]), while they are in cache, instead of one pass over
/// the whole input before the product. Returns false, having done nothing, when the product is
/// too small for that (or already one of several parallel tasks).
pub(crate) fn by_row_blocks(
    a: &[f32],
    m: usize,
    k: usize,
    e: &Epilogue,
    c: &mut [MaybeUninit<f32>],
    gemm: impl Fn(&[f32], usize, Epilogue, &mut [MaybeUninit<f32>]) + Sync,
) -> bool {
    // Whole register tiles, at least 4 per panel.
    let rows = convert_rows(k).max(4 * MR).next_multiple_of(MR);
    let threads = crate::cpu::threads();
    if SERIAL.get() || threads == 1 || m.div_ceil(rows) < CONVERTED_BLOCKS_PER_THREAD * threads {
        return false;
    }
    let n = c.len() / m;
    c.par_chunks_mut(rows * n)
        .zip(a.par_chunks(rows * k))
        .with_max_len(1) // block by block, as `cpu::tasks`
        .enumerate()
        .for_each(|(i, (c, a))| {
            let r = c.len() / n;
            let e = Epilogue {
                residual: e.residual.map(|res| &res[i * rows * n..][..r * n]),
                ..*e
            };
            serially(|| gemm(a, r, e, c));
        });
    true
}

/// Runs `f` with a scratch vector of at least `len` elements kept per thread between calls, so the hot
/// path does not allocate (and page-fault) a fresh buffer per layer. A nested call on the same thread
/// (rayon may run another task while this one waits) gets a fresh vector instead.
pub(crate) fn with_scratch<T: Copy + Default + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, T::default());
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// The valid columns of panel `panel` in an output `n` wide.
fn panel_cols(n: usize, panel: usize) -> usize {
    NR.min(n - panel * NR)
}

/// Mask of the first `cols.min(16)` lanes of 16.
#[cfg(target_arch = "x86_64")]
pub(crate) fn lane_mask(cols: usize) -> u16 {
    if cols >= 16 {
        u16::MAX
    } else {
        (1u16 << cols) - 1
    }
}

/// Where a register tile goes and what its epilogue adds: `c` (rows `ldc` apart) =
/// `act(acc + bias + residual)`, the bias the tile's first column (null: none), the residual rows
/// `ldc` apart like `c` (null: none).
#[derive(Clone, Copy)]
pub(crate) struct Store {
    pub c: *mut f32,
    pub ldc: usize,
    pub bias: *const f32,
    pub residual: *const f32,
    pub act: Act,
    /// The output is larger than the caches hold ([`COLD_OUTPUT`]): the kernel asks for the tile's
    /// lines of `c` (and of the residual) before its products, so its stores do not wait on them.
    /// Read by the x86 kernels only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub cold: bool,
}

/// Output values from which a product's output counts as cold ([`Store::cold`]): 1 MiB, half the L2
/// of the Xeon where it was measured (BENCHMARKS.md, session 13: ResNet-50's 1x1 convolutions from
/// 64 channels, 6.4 M outputs for 64 products each, 10-13 % faster; Winograd's products, whose
/// outputs stay in L2, 3 % slower with the prefetches).
const COLD_OUTPUT: usize = 1 << 18;

/// Prefetches the lines of `out.c` (and of the residual) an `MR` x `16 NV` tile covers, if `out.cold`
/// (prefetches do not fault: any address is safe).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_tile<const MR: usize, const NV: usize>(out: &Store) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    if !out.cold {
        return;
    }
    for r in 0..MR {
        for v in 0..NV {
            let at = r * out.ldc + 16 * v;
            // SAFETY: SSE is part of x86-64; a prefetch reads nothing.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(out.c.wrapping_add(at) as *const i8);
                if !out.residual.is_null() {
                    _mm_prefetch::<_MM_HINT_T0>(out.residual.wrapping_add(at) as *const i8);
                }
            }
        }
    }
}

/// Writes an `MR` x `16 NV` register tile of accumulators to `out`, the first `cols` columns only,
/// with the whole epilogue applied in registers: the store of the f32 and bf16 kernels. The
/// accumulators come by value and the store is always inlined (so it has no `target_feature` of its
/// own, which `inline(always)` does not allow; its intrinsics inline once it is in the kernel): a
/// kernel that called it kept its accumulators in memory through its whole loop (the f32 kernel of
/// `f159ace`, accumulators by reference: ViT-B/16 2.2x slower; the bf16 widened kernel of
/// `d40d1fe`, by value: ResNet-50 bf16 ~30 % slower).
///
/// # Safety
/// AVX-512F is present; `out.c` points to `MR` rows of at least `cols` writable values,
/// `out.ldc` apart; a non-null bias holds `cols` values, a non-null residual `MR` rows like `c`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn store_tile<const MR: usize, const NV: usize>(
    acc: [[std::arch::x86_64::__m512; NV]; MR],
    cols: usize,
    out: Store,
) {
    use crate::math::F32x16;
    use std::arch::x86_64::*;
    for (r, row) in acc.into_iter().enumerate() {
        for (v, x) in row.into_iter().enumerate() {
            let mask = lane_mask(cols - 16 * v);
            // SAFETY: the masked lanes are inside the tile's columns, the bias and the residual
            // (caller).
            unsafe {
                let mut x = x;
                if !out.bias.is_null() {
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, out.bias.add(16 * v)));
                }
                if !out.residual.is_null() {
                    let at = out.residual.add(r * out.ldc + 16 * v);
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, at));
                }
                let x = out.act.lanes::<F32x16>(F32x16::wrap(x)).raw();
                _mm512_mask_storeu_ps(out.c.add(r * out.ldc + 16 * v), mask, x);
            }
        }
    }
}

/// Calls `$kernel::<MR, NV>($args)` for run-time `$mr` in 1..=6 and `$nv` in 1..=4 (the register tile
/// is a compile-time shape so its accumulators live in registers).
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_tile {
    ($kernel:ident, $mr:expr, $nv:expr, $($args:expr),* $(,)?) => {
        match ($mr, $nv) {
            (1, 1) => $kernel::<1, 1>($($args),*), (1, 2) => $kernel::<1, 2>($($args),*),
            (1, 3) => $kernel::<1, 3>($($args),*), (1, 4) => $kernel::<1, 4>($($args),*),
            (2, 1) => $kernel::<2, 1>($($args),*), (2, 2) => $kernel::<2, 2>($($args),*),
            (2, 3) => $kernel::<2, 3>($($args),*), (2, 4) => $kernel::<2, 4>($($args),*),
            (3, 1) => $kernel::<3, 1>($($args),*), (3, 2) => $kernel::<3, 2>($($args),*),
            (3, 3) => $kernel::<3, 3>($($args),*), (3, 4) => $kernel::<3, 4>($($args),*),
            (4, 1) => $kernel::<4, 1>($($args),*), (4, 2) => $kernel::<4, 2>($($args),*),
            (4, 3) => $kernel::<4, 3>($($args),*), (4, 4) => $kernel::<4, 4>($($args),*),
            (5, 1) => $kernel::<5, 1>($($args),*), (5, 2) => $kernel::<5, 2>($($args),*),
            (5, 3) => $kernel::<5, 3>($($args),*), (5, 4) => $kernel::<5, 4>($($args),*),
            (6, 1) => $kernel::<6, 1>($($args),*), (6, 2) => $kernel::<6, 2>($($args),*),
            (6, 3) => $kernel::<6, 3>($($args),*), (6, 4) => $kernel::<6, 4>($($args),*),
            _ => unreachable!("register tile {}x{} out of range", $mr, $nv),
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use dispatch_tile;

/// Shapes (m, n, k) the GEMM tests run: single values, partial register tiles and panels, `k` tails
/// of every packing (pairs, quadruples), several row blocks.
#[cfg(test)]
pub(crate) const TEST_SHAPES: [(usize, usize, usize); 9] = [
    (1, 1, 1),
    (1, 7, 3),
    (2, 64, 16),
    (5, 65, 33),
    (6, 130, 31),
    (7, 17, 2),
    (13, 200, 77),
    (97, 129, 250),
    (200, 100, 513),
];

/// Deterministic pseudo-random numbers for the kernels' tests (xorshift64*).
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            2.0 * u - 1.0
        })
        .collect()
}

/// Naive `A · Wᵀ + bias` in f64, the reference of the kernels' tests.
#[cfg(test)]
pub(crate) fn reference(
    a: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                .sum();
            c[i * n + j] = (dot + bias.map_or(0.0, |b| b[j] as f64)) as f32;
        }
    }
    c
}
