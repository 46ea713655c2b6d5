//! A global allocator for programs that run the kernels: the system allocator, with every
//! allocation of at least [`ALIGNED_FROM`] bytes aligned to a 64-byte cache line.
//!
//! glibc's `malloc` aligns to 16 bytes, so a 64-byte AVX-512 load from a buffer it returned usually
//! straddles two cache lines. The depthwise convolution loads every input vector from such a
//! buffer (k² times per output) and runs ~20 % faster on aligned maps (32 x 112 x 112 3x3, one
//! thread: 248 -> 200 us; 672 x 14 x 14 5x5: 202 -> 155 us); the GEMM panels, the maps of every
//! trunk and candle's tensors all come from the heap. Small allocations keep the system's
//! alignment (its fast path). Also here: glibc's thresholds for a process that runs forward passes
//! ([`keep_freed_memory`]) and loads models ([`loading`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Allocations from this size up are cache-line aligned.
pub const ALIGNED_FROM: usize = 4096;

/// Cache-line alignment of large allocations (install with `#[global_allocator]`): a block of at
/// least [`ALIGNED_FROM`] bytes is a system block 64 bytes larger, entered at its first cache-line
/// boundary (rather than `posix_memalign`, whose blocks do not serve the next request of the same
/// size once freed, and cannot grow in place).
///
/// ```
/// #[global_allocator]
/// static ALLOC: visenc_kernels::alloc::CacheLineAligned = visenc_kernels::alloc::CacheLineAligned;
/// ```
pub struct CacheLineAligned;

/// glibc's `<malloc.h>` controls.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    pub const M_TRIM_THRESHOLD: i32 = -1;
    pub const M_MMAP_THRESHOLD: i32 = -3;
    pub const M_ARENA_MAX: i32 = -8;
    extern "C" {
        pub fn mallopt(param: i32, value: i32) -> i32;
        pub fn malloc_trim(pad: usize) -> i32;
    }
}

/// Blocks from this size up get a memory map of their own while the process keeps freed memory
/// ([`keep_freed_memory`]): 32 MiB, the largest threshold glibc accepts on 64-bit targets.
const KEPT_MAP_FROM: i32 = 32 << 20;
/// The same threshold while a model loads ([`loading`]): glibc's default.
const LOADING_MAP_FROM: i32 = 128 << 10;

/// Whether [`keep_freed_memory`] set glibc's thresholds ([`loading`] restores them).
static KEEPING: AtomicBool = AtomicBool::new(false);
/// Loads in progress ([`loading`]).
static LOADS: Mutex<usize> = Mutex::new(0);

/// Keeps freed activation buffers in glibc's heap for the next layer and the next batch instead of
/// returning each one to the kernel: by default every buffer above 128 KiB is its own `mmap`, so
/// each layer's output paid for fresh zeroed pages (page faults were ~5-10 % of a CNN forward).
/// One heap (arena) for all threads: a forward pass runs on whichever rayon worker takes it, and
/// with an arena per worker each kept its own copy of the buffers (ViT-B/16 batch 8: peak RSS
/// 533 MiB with per-thread arenas, 444 MiB with one; the buffers are large and few, so the shared
/// lock costs nothing measurable). For programs (the `visenc` binary calls it first thing, before
/// any thread starts); elsewhere than glibc nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds.
    unsafe {
        glibc::mallopt(glibc::M_MMAP_THRESHOLD, KEPT_MAP_FROM);
        glibc::mallopt(glibc::M_TRIM_THRESHOLD, i32::MAX);
        glibc::mallopt(glibc::M_ARENA_MAX, 1);
    }
    KEEPING.store(true, Ordering::SeqCst);
}

/// Sets the size from which glibc maps a block on its own.
fn map_from(bytes: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator threshold; it is thread-safe.
    unsafe {
        glibc::mallopt(glibc::M_MMAP_THRESHOLD, bytes);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// Runs `load` (a model's weights read, folded and converted) so that what it frees goes back to
/// the kernel: while it runs, a process that keeps freed memory ([`keep_freed_memory`]) maps every
/// block from 128 KiB on its own again, so each tensor read and then replaced (a BatchNorm folded
/// into it, packed for the kernels) is unmapped when dropped instead of leaving a hole in the heap
/// that later, larger weights do not fit (ResNet-50: ~40 MiB held that way); afterwards the heap's
/// free memory is handed back too (glibc's `malloc_trim`). Loads may overlap: the thresholds come
/// back when the last one ends.
pub fn loading<T>(load: impl FnOnce() -> T) -> T {
    struct Loading;
    impl Drop for Loading {
        fn drop(&mut self) {
            let mut n = LOADS.lock().unwrap_or_else(|e| e.into_inner());
            *n -= 1;
            if *n == 0 && KEEPING.load(Ordering::SeqCst) {
                map_from(KEPT_MAP_FROM);
            }
        }
    }
    {
        let mut n = LOADS.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 && KEEPING.load(Ordering::SeqCst) {
            map_from(LOADING_MAP_FROM);
        }
        *n += 1;
    }
    let guard = Loading;
    let out = load();
    drop(guard);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
    unsafe {
        glibc::malloc_trim(0);
    }
    out
}

/// Cache-line size, the alignment of large blocks.
const LINE: usize = 64;

/// Whether a block of layout `l` is given cache-line alignment here (else the system's own).
fn aligned_here(l: Layout) -> bool {
    l.size() >= ALIGNED_FROM && l.align() < LINE
}

/// The system block under an aligned one: `LINE` bytes more, at the system's own alignment (so a
/// freed block serves the next request of the same size, and `realloc` can grow in place).
fn base_layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(LINE)?, std::mem::align_of::<usize>()).ok()
}

/// The aligned address inside a system block at `base`: the first cache-line boundary at least one
/// `usize` in, with the distance back to `base` recorded just below it. The `keep` bytes at `from`
/// (inside the block: where a resized block holds its old contents) move there first.
///
/// # Safety
/// `base` is a non-null block of at least `keep + LINE` bytes and `from..from + keep` lies in it.
unsafe fn enter(base: *mut u8, from: *const u8, keep: usize) -> *mut u8 {
    let word = std::mem::size_of::<usize>();
    let gap = word + (LINE - (base as usize + word) % LINE) % LINE;
    // SAFETY: word <= gap <= LINE (the system aligns blocks to at least a word), so the aligned
    // address, the `keep` bytes after it and the word below it are inside the block; `copy`
    // handles the overlap, and the word is written after the bytes moved (it lies below them).
    unsafe {
        let p = base.add(gap);
        std::ptr::copy(from, p, keep);
        (p as *mut usize).sub(1).write_unaligned(gap);
        p
    }
}

/// The system block under an aligned address from [`enter`], and its distance.
///
/// # Safety
/// `p` came from [`enter`].
unsafe fn base_of(p: *mut u8) -> (*mut u8, usize) {
    // SAFETY: `enter` wrote the distance just below `p`.
    unsafe {
        let gap = (p as *const usize).sub(1).read_unaligned();
        (p.sub(gap), gap)
    }
}

/// A block for `layout` from `system` (the system's `alloc` or `alloc_zeroed`): an aligned one
/// where this allocator aligns `layout`, else the system's own.
///
/// # Safety
/// `layout` has a non-zero size.
unsafe fn allocate(layout: Layout, system: impl FnOnce(Layout) -> *mut u8) -> *mut u8 {
    if !aligned_here(layout) {
        return system(layout);
    }
    let Some(base) = base_layout(layout.size()) else {
        return std::ptr::null_mut();
    };
    let b = system(base);
    if b.is_null() {
        return b;
    }
    // SAFETY: a block of LINE spare bytes (zeroed ones are zeroed before the distance is written
    // below the aligned address); nothing to keep.
    unsafe { enter(b, b, 0) }
}

// SAFETY: blocks this allocator aligns are system blocks of `LINE` extra bytes at the system's
// alignment, entered at a recorded offset; whether a block is one is a pure function of the
// caller's layout, which the caller passes back unchanged to `dealloc` and `realloc`.
unsafe impl GlobalAlloc for CacheLineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's non-zero layout.
        unsafe { allocate(layout, |l| System.alloc(l)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's non-zero layout.
        unsafe { allocate(layout, |l| System.alloc_zeroed(l)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract), so an
        // aligned one sits in a system block of `base_layout(layout.size())`.
        unsafe {
            match base_layout(layout.size()).filter(|_| aligned_here(layout)) {
                Some(base) => System.dealloc(base_of(ptr).0, base),
                None => System.dealloc(ptr, layout),
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (from_size_align_unchecked): the caller guarantees `new_size` rounded to
        // `layout.align()` fits `isize`.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (aligned_here(layout), aligned_here(new)) {
            // SAFETY: the caller's layouts, unchanged.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) => {
                let (Some(old_base), Some(new_base)) =
                    (base_layout(layout.size()), base_layout(new_size))
                else {
                    return std::ptr::null_mut();
                };
                // SAFETY: the system block is resized (in place where it can be); its contents
                // keep their distance from its start, and move to its aligned address (another
                // distance where the block moved to a different alignment).
                unsafe {
                    let (base, gap) = base_of(ptr);
                    let b = System.realloc(base, old_base, new_base.size());
                    if b.is_null() {
                        return b;
                    }
                    enter(b, b.add(gap), layout.size().min(new_size))
                }
            }
            // Crossing ALIGNED_FROM: a block of the other kind, the bytes copied, the old one freed.
            // SAFETY: `new` has a non-zero size; both blocks hold the copied bytes.
            _ => unsafe {
                let p = self.alloc(new);
                if !p.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                p
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads may nest, overlap and fail: each returns its value, and the count of loads in
    /// progress (which decides when the thresholds come back) returns to where it was, a panicking
    /// load included.
    #[test]
    fn loads_nest_and_end_even_when_they_panic() {
        let loads = || *LOADS.lock().unwrap_or_else(|e| e.into_inner());
        let before = loads();
        assert_eq!(loading(|| loading(|| 3) + 4), 7);
        let ran = std::thread::spawn(|| loading(|| loading(|| vec![0u8; 1 << 20].len())));
        assert_eq!(ran.join().unwrap(), 1 << 20);
        assert!(std::panic::catch_unwind(|| loading(|| panic!("a bad checkpoint"))).is_err());
        assert_eq!(loads(), before);
    }

    #[test]
    fn large_blocks_are_cache_line_aligned_and_keep_their_bytes() {
        let a = CacheLineAligned;
        let small = Layout::from_size_align(100, 4).unwrap();
        // SAFETY: layouts with non-zero sizes; every block is freed with the layout it has.
        unsafe {
            let p = a.alloc(small);
            assert!(!p.is_null());
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            // Growing across ALIGNED_FROM moves to an aligned block with the same bytes.
            let q = a.realloc(p, small, 10_000);
            assert_eq!(q as usize % 64, 0, "grown block aligned");
            assert!((0..100).all(|i| *q.add(i) == i as u8), "bytes kept");
            let big = Layout::from_size_align(10_000, 4).unwrap();
            let r = a.realloc(q, big, 20_000);
            assert_eq!(r as usize % 64, 0, "reallocated block aligned");
            assert!((0..100).all(|i| *r.add(i) == i as u8), "bytes kept");
            // And shrinking below it returns to the system's alignment, bytes kept.
            let s = a.realloc(r, Layout::from_size_align(20_000, 4).unwrap(), 50);
            assert!((0..50).all(|i| *s.add(i) == i as u8), "bytes kept");
            a.dealloc(s, Layout::from_size_align(50, 4).unwrap());
            // Many resizes of aligned blocks (in place, moved, to other distances), with other
            // blocks in between so the system has to move some of them.
            let mut size = 5000;
            let mut p = a.alloc(Layout::from_size_align(size, 4).unwrap());
            for i in 0..size {
                *p.add(i) = (i % 251) as u8;
            }
            let mut others = Vec::new();
            for step in 0..60 {
                let l = Layout::from_size_align(size, 4).unwrap();
                let next = if step % 3 == 2 {
                    size - 700
                } else {
                    size + 3000
                };
                p = a.realloc(p, l, next);
                size = next;
                assert_eq!(p as usize % 64, 0, "step {step}: aligned");
                assert!(
                    (0..4000).all(|i| *p.add(i) == (i % 251) as u8),
                    "step {step}: bytes kept"
                );
                let o = Layout::from_size_align(4096 + 64 * step, 8).unwrap();
                others.push((a.alloc(o), o));
            }
            a.dealloc(p, Layout::from_size_align(size, 4).unwrap());
            for (o, l) in others {
                a.dealloc(o, l);
            }
            for size in [4096, 5000, 1 << 20] {
                let l = Layout::from_size_align(size, 4).unwrap();
                let z = a.alloc_zeroed(l);
                assert_eq!(z as usize % 64, 0, "{size} bytes aligned");
                assert!((0..size).all(|i| *z.add(i) == 0), "{size} bytes zeroed");
                a.dealloc(z, l);
            }
        }
    }
}
