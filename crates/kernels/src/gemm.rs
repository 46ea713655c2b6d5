//! The product behind every linear layer (and 1x1 / im2col convolution on channels-last rows):
//! `C[m, n] = act(A[m, k] · W[n, k]ᵀ + bias + residual)`, with `W` packed once, at load, in the
//! precision the model runs in ([`Precision`]); activations are f32 in and out.

use std::mem::MaybeUninit;

use crate::conv::Epilogue;
use crate::gemm_bf16::{gemm_bf16, PackedBf16};
use crate::gemm_f32::{gemm_f32, PackedF32};
use crate::gemm_int8::{gemm_int8, PackedInt8};
use crate::Precision;

/// A weight matrix [n, k] packed for [`gemm`] in one precision.
#[derive(Debug, Clone)]
pub enum PackedWeight {
    F32(PackedF32),
    Bf16(PackedBf16),
    Int8(PackedInt8),
}

impl PackedWeight {
    /// Packs `w`, row-major [n, k] (a PyTorch `nn.Linear` weight), for products in `precision`.
    pub fn pack(w: &[f32], n: usize, k: usize, precision: Precision) -> Self {
        match precision {
            Precision::F32 => Self::F32(PackedF32::pack(w, n, k)),
            Precision::Bf16 => Self::Bf16(PackedBf16::pack(w, n, k)),
            Precision::Int8 => Self::Int8(PackedInt8::pack(w, n, k)),
        }
    }

    /// Output width.
    pub fn n(&self) -> usize {
        match self {
            Self::F32(w) => w.n(),
            Self::Bf16(w) => w.n(),
            Self::Int8(w) => w.n(),
        }
    }

    /// Input width.
    pub fn k(&self) -> usize {
        match self {
            Self::F32(w) => w.k(),
            Self::Bf16(w) => w.k(),
            Self::Int8(w) => w.k(),
        }
    }

    /// The precision the weights were packed for.
    pub fn precision(&self) -> Precision {
        match self {
            Self::F32(_) => Precision::F32,
            Self::Bf16(_) => Precision::Bf16,
            Self::Int8(_) => Precision::Int8,
        }
    }
}

/// `c[m, n] = act(a[m, k] · wᵀ + bias + residual)` (`e`), on the fastest kernels this CPU has.
/// `a` is row-major [m, k], `c` and the residual row-major [m, n], the bias [n].
///
/// # Panics
/// When a length does not match (`a` not `m * k`, `c` or the residual not `m * n`, the bias not
/// `n`): callers check user input before.
pub fn gemm(a: &[f32], m: usize, w: &PackedWeight, e: Epilogue, c: &mut [f32]) {
    gemm_uninit(a, m, w, e, crate::panel::as_uninit(c));
}

/// [`gemm`] into memory not yet initialised (a `Vec`'s spare capacity): every element of `c` is
/// written, so a new output is not zero-filled first.
pub fn gemm_uninit(a: &[f32], m: usize, w: &PackedWeight, e: Epilogue, c: &mut [MaybeUninit<f32>]) {
    let features = crate::cpu::features();
    match w {
        PackedWeight::F32(w) => gemm_f32(a, m, w, e, c, features),
        PackedWeight::Bf16(w) => gemm_bf16(a, m, w, e, c, features),
        PackedWeight::Int8(w) => gemm_int8(a, m, w, e, c, features),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::Act;
    use crate::panel::{reference, test_values};

    /// Every precision applies the same epilogue (residual, then activation) after its product.
    #[test]
    fn every_precision_applies_the_epilogue() {
        let (m, n, k) = (9, 70, 40);
        let a = test_values(m * k, 1);
        let w = test_values(n * k, 2);
        let bias = test_values(n, 3);
        let res = test_values(m * n, 4);
        let want: Vec<f32> = reference(&a, &w, Some(&bias), m, n, k)
            .iter()
            .zip(&res)
            .map(|(x, r)| (x + r).max(0.0))
            .collect();
        for (precision, tol) in [
            (Precision::F32, 1e-5),
            (Precision::Bf16, 0.1),
            (Precision::Int8, 0.32),
        ] {
            let packed = PackedWeight::pack(&w, n, k, precision);
            assert_eq!(
                (packed.n(), packed.k(), packed.precision()),
                (n, k, precision)
            );
            let mut c = vec![f32::NAN; m * n];
            let e = Epilogue {
                bias: Some(&bias),
                residual: Some(&res),
                act: Act::Relu,
            };
            gemm(&a, m, &packed, e, &mut c);
            for (g, r) in c.iter().zip(&want) {
                assert!((g - r).abs() <= tol, "{precision}: {g} vs {r}");
            }
        }
    }

    /// The converting GEMMs give the same result, bit for bit, whether they convert the whole input
    /// first or block by block in parallel tasks (`panel::by_row_blocks`: 203 rows of k = 3000
    /// make 9 blocks of 24, the last one short, 4 per thread on 2), residual and epilogue included.
    #[test]
    fn blocks_of_rows_match_one_pass() {
        let (m, n, k) = (203, 21, 3000);
        let a = test_values(m * k, 11);
        let w = test_values(n * k, 12);
        let (bias, res) = (test_values(n, 13), test_values(m * n, 14));
        let e = Epilogue {
            bias: Some(&bias),
            residual: Some(&res),
            act: Act::Silu,
        };
        for precision in [Precision::Bf16, Precision::Int8] {
            let packed = PackedWeight::pack(&w, n, k, precision);
            let (mut blocks, mut one) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            // On two threads, whatever this machine has (one would not split).
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build();
            pool.unwrap()
                .install(|| gemm(&a, m, &packed, e, &mut blocks));
            crate::panel::serially(|| gemm(&a, m, &packed, e, &mut one));
            assert_eq!(blocks, one, "{precision}");
        }
    }
}
