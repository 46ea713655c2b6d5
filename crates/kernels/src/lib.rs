//! CPU kernels behind visenc's encoders, on plain `f32` / `bf16` / `i8` slices (no tensor library).
//!
//! Every kernel has a portable implementation that runs on any target and, where it pays, an x86-64
//! one chosen at run time from [`cpu::features`] (AVX-512F, AVX512-BF16, AVX512-VNNI), so one binary
//! runs everywhere and uses what the machine has. Each module tests its kernels against a naive
//! reference on random and odd shapes.

pub mod activation;
pub mod alloc;
pub mod attention;
pub mod conv;
pub mod cpu;
mod dispatch;
pub mod gemm;
pub mod gemm_bf16;
pub mod gemm_f32;
pub mod gemm_int8;
pub mod math;
pub mod norm;
mod panel;
pub mod pool;
pub mod precision;
pub mod softmax;

pub use precision::Precision;

/// A pointer to an output that parallel tasks write disjoint parts of (which part, and why no two
/// tasks meet, is each user's safety argument).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: the tasks sharing it write disjoint elements (see each user).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element at `offset` (a method, so closures capture the whole `Send` wrapper, not the raw
    /// pointer).
    ///
    /// # Safety
    /// `offset` is inside the output.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(offset) }
    }
}
