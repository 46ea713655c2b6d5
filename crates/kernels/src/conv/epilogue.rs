//! The activation fused into a convolution's output (after the bias, which the kernels add while
//! accumulating), applied to rows of 16 lanes so that the compiler keeps it in vector registers.

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
}

/// `e^x` for f32 within ~2 ulp over the range where it is finite (Cody-Waite range reduction to
/// `2^n * e^r`, |r| <= ln2/2, and a degree-6 polynomial for `e^r`), written with plain arithmetic
/// so that it vectorises; inputs are clamped, so it returns 0 below about -87.3 and a large finite
/// value above 88.3 (where `x * sigmoid(x)` needs neither).
// Reference: https://github.com/jeremybarnes/cephes/blob/60f27df395b8322c2da22c83751a2366b82d50d1/single/expf.c#L62
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.33, 88.3);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * C1 - n * C2;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // 2^n through the exponent bits; n is in [-126, 127] after the clamp. Adding 1.5 * 2^23 puts
    // the integer n in the low mantissa bits (no float-to-int conversion, which does not
    // vectorise with Rust's saturating `as`).
    let bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000 - 127) << 23;
    e * f32::from_bits(bits)
}

impl Act {
    /// Applies the activation to every element of `v` in place.
    #[inline(always)]
    pub fn apply(self, v: &mut [f32]) {
        match self {
            Act::None => {}
            Act::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
            Act::Relu6 => v.iter_mut().for_each(|x| *x = x.clamp(0.0, 6.0)),
            Act::Silu => v.iter_mut().for_each(|x| *x /= 1.0 + exp(-*x)),
        }
    }

    /// The activation of one value (the reference for the tests, and for scalar tails).
    pub fn scalar(self, x: f32) -> f32 {
        match self {
            Act::None => x,
            Act::Relu => x.max(0.0),
            Act::Relu6 => x.clamp(0.0, 6.0),
            Act::Silu => x / (1.0 + (-x).exp()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error of the polynomial `exp` against libm's.
    const EXP_REL_TOL: f32 = 3e-7;

    #[test]
    fn exp_matches_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, reference) = (exp(x), x.exp());
            assert!(
                ((ours - reference) / reference).abs() < EXP_REL_TOL,
                "exp({x}) = {ours}, libm {reference}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(-200.0), exp(-87.33));
        assert!(exp(-200.0) < 1e-37);
    }

    #[test]
    fn activations_match_scalar_definitions() {
        let xs: Vec<f32> = (-200..200).map(|i| i as f32 * 0.37).collect();
        for act in [Act::None, Act::Relu, Act::Relu6, Act::Silu] {
            let mut v = xs.clone();
            act.apply(&mut v);
            for (&x, &y) in xs.iter().zip(&v) {
                let r = act.scalar(x);
                assert!(
                    (y - r).abs() <= 1e-6 * r.abs().max(1.0),
                    "{act:?}({x}) = {y}, want {r}"
                );
            }
        }
        assert_eq!(Act::Silu.scalar(-100.0), -0.0);
        let mut v = [-100.0f32];
        Act::Silu.apply(&mut v);
        assert!(v[0].abs() < 1e-30);
    }
}
