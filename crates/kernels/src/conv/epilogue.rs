//! The activation fused into a convolution's output (after the bias, which the kernels add while
//! accumulating), through the same per-lane functions as [`crate::activation`], so it stays in
//! vector registers.

use crate::activation::{gelu, gelu_tanh, quick_gelu, relu, relu6, silu};
use crate::dispatch::multiversion;
use crate::math::{map_fn, Lanes};

/// The activation a convolution applies to its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Act {
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// `x * sigmoid(x)`.
    Silu,
    /// `0.5 x (1 + erf(x / sqrt 2))` (`nn.GELU()`).
    Gelu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (`gelu_pytorch_tanh`).
    GeluTanh,
    /// `x sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
}

impl Act {
    /// Applies the activation to every element of `v` in place, `L::N` lanes at a time.
    #[inline(always)]
    pub(super) fn apply<L: Lanes>(self, v: &mut [f32]) {
        match self {
            Act::None => {}
            Act::Relu => map_fn!(L, v, relu),
            Act::Relu6 => map_fn!(L, v, relu6),
            Act::Silu => map_fn!(L, v, silu),
            Act::Gelu => map_fn!(L, v, gelu),
            Act::GeluTanh => map_fn!(L, v, gelu_tanh),
            Act::QuickGelu => map_fn!(L, v, quick_gelu),
        }
    }

    /// Applies the activation to every element of `v` in place, on the widest lanes this CPU has.
    pub fn apply_to(self, v: &mut [f32]) {
        if self != Act::None {
            apply_best(self, v);
        }
    }

    /// The activation of one vector of lanes (for kernels that keep their outputs in registers).
    #[inline(always)]
    pub(crate) fn lanes<L: Lanes>(self, v: L) -> L {
        match self {
            Act::None => v,
            Act::Relu => relu::<L>(v),
            Act::Relu6 => relu6::<L>(v),
            Act::Silu => silu::<L>(v),
            Act::Gelu => gelu::<L>(v),
            Act::GeluTanh => gelu_tanh::<L>(v),
            Act::QuickGelu => quick_gelu::<L>(v),
        }
    }
}

multiversion! {
    fn apply_best<L>(act: Act, v: &mut [f32]) { act.apply::<L>(v) }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The activation of one value by its definition, in f64: the reference for the tests.
    pub fn reference(act: Act, x: f64) -> f64 {
        match act {
            Act::None => x,
            Act::Relu => x.max(0.0),
            Act::Relu6 => x.clamp(0.0, 6.0),
            Act::Silu => x / (1.0 + (-x).exp()),
            Act::Gelu => 0.5 * x * (1.0 + crate::math::tests::erf64(x / std::f64::consts::SQRT_2)),
            Act::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
            }
            Act::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        }
    }

    #[test]
    fn activations_match_definitions() {
        // 400 values: 25 full vectors of 16, on the portable lanes and the widest this CPU has.
        let xs: Vec<f32> = (-200..200).map(|i| i as f32 * 0.37).collect();
        for act in [
            Act::None,
            Act::Relu,
            Act::Relu6,
            Act::Silu,
            Act::Gelu,
            Act::GeluTanh,
            Act::QuickGelu,
        ] {
            let mut portable = xs.clone();
            act.apply::<f32>(&mut portable);
            let mut best = xs.clone();
            apply_best(act, &mut best);
            for out in [&portable, &best] {
                for (&x, &y) in xs.iter().zip(out) {
                    let r = reference(act, x as f64);
                    // GELU's erf error is scaled by x.
                    let scale = r.abs().max(x.abs() as f64).max(1.0);
                    assert!(
                        (y as f64 - r).abs() <= 1e-6 * scale,
                        "{act:?}({x}) = {y}, want {r}"
                    );
                }
            }
        }
        let mut v = [-100.0f32; 16];
        Act::Silu.apply::<f32>(&mut v);
        assert!(v.iter().all(|y| y.abs() < 1e-30));
    }
}
