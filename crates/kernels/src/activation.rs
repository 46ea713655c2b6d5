//! Element-wise activations in place: GELU (erf), GELU (tanh), quick-GELU and SiLU, one pass over the
//! data with the vectorised [`crate::math`] functions, split across the rayon pool for large tensors.

use rayon::prelude::*;

use crate::dispatch::multiversion;
use crate::math::{map_fn, Lanes};

/// The activations with a fused kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `0.5 x (1 + erf(x / sqrt 2))` (`nn.GELU()`).
    Gelu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (`gelu_pytorch_tanh`).
    GeluTanh,
    /// `x sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// `x sigmoid(x)`.
    Silu,
}

#[inline(always)]
pub(crate) fn gelu<L: Lanes>(x: L) -> L {
    let e = x.mul(L::splat(std::f32::consts::FRAC_1_SQRT_2)).erf();
    x.mul(L::splat(0.5)).mul_add(e, x.mul(L::splat(0.5)))
}

#[inline(always)]
pub(crate) fn gelu_tanh<L: Lanes>(x: L) -> L {
    // sqrt(2 / pi)
    const K: f32 = 0.797_884_6;
    let x3 = x.mul(x).mul(x);
    let t = x3.mul_add(L::splat(0.044_715), x).mul(L::splat(K)).tanh();
    x.mul(L::splat(0.5)).mul_add(t, x.mul(L::splat(0.5)))
}

#[inline(always)]
pub(crate) fn quick_gelu<L: Lanes>(x: L) -> L {
    x.mul(x.mul(L::splat(1.702)).sigmoid())
}

#[inline(always)]
pub(crate) fn silu<L: Lanes>(x: L) -> L {
    x.mul(x.sigmoid())
}

/// `max(x, 0)` (for the convolution epilogue).
#[inline(always)]
pub(crate) fn relu<L: Lanes>(x: L) -> L {
    x.max(L::splat(0.0))
}

/// `min(max(x, 0), 6)` (for the convolution epilogue).
#[inline(always)]
pub(crate) fn relu6<L: Lanes>(x: L) -> L {
    x.max(L::splat(0.0)).min(L::splat(6.0))
}

multiversion! {
    fn apply_serial<L>(act: Activation, xs: &mut [f32]) {
        match act {
            Activation::Gelu => map_fn!(L, xs, gelu),
            Activation::GeluTanh => map_fn!(L, xs, gelu_tanh),
            Activation::QuickGelu => map_fn!(L, xs, quick_gelu),
            Activation::Silu => map_fn!(L, xs, silu),
        }
    }
}

/// Elements per parallel task (a multiple of 16; 64 KiB of f32, L2-resident).
const CHUNK: usize = 16 * 1024;

/// Applies `act` to every element of `xs` in place.
pub fn apply_inplace(act: Activation, xs: &mut [f32]) {
    if xs.len() <= CHUNK {
        apply_serial(act, xs);
    } else {
        xs.par_chunks_mut(CHUNK).for_each(|c| apply_serial(act, c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::tests::{erf64, uniform};

    /// Absolute tolerance against the f64 definitions, per unit of |x| (GELU grows like x).
    const ATOL: f64 = 1e-6;

    fn reference(act: Activation, x: f64) -> f64 {
        let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
        match act {
            Activation::Gelu => 0.5 * x * (1.0 + erf64(x / 2f64.sqrt())),
            Activation::GeluTanh => {
                0.5 * x
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::QuickGelu => x * sigmoid(1.702 * x),
            Activation::Silu => x * sigmoid(x),
        }
    }

    #[test]
    fn activations_match_definitions() {
        // Lengths: empty, one element, a tail, and more than one parallel chunk with a tail.
        for n in [0usize, 1, 37, 3 * CHUNK + 5] {
            let mut xs = uniform(n as u64, n, -12.0, 12.0);
            if n > 1 {
                xs[0] = 0.0;
                xs[1] = -100.0;
            }
            for act in [
                Activation::Gelu,
                Activation::GeluTanh,
                Activation::QuickGelu,
                Activation::Silu,
            ] {
                let mut y = xs.clone();
                apply_inplace(act, &mut y);
                for (&x, &y) in xs.iter().zip(&y) {
                    let r = reference(act, x as f64);
                    let tol = ATOL * (1.0 + (x as f64).abs());
                    assert!((y as f64 - r).abs() <= tol, "{act:?}({x}) = {y}, want {r}");
                }
            }
        }
    }
}
