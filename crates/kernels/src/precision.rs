//! The arithmetic a model's linear layers run in.

use std::fmt;
use std::str::FromStr;

/// How linear layers compute, chosen when a model is loaded. Activations stay f32 between layers in
/// every mode; only the matrix products change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Precision {
    /// f32 weights and products (the reference).
    #[default]
    F32,
    /// Weights rounded to bf16 once, activations rounded to bf16 per product, f32 accumulation
    /// ([`crate::gemm_bf16`]).
    Bf16,
    /// Weights quantised to int8 per output channel once, activations to uint8 per row per product,
    /// i32 accumulation ([`crate::gemm_int8`]); attention's products as in `Bf16`
    /// ([`crate::attention`]).
    Int8,
}

impl Precision {
    /// Every precision, in the order of the command-line choices.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::Int8];

    /// The command-line name (`f32`, `bf16`, `int8`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown precision name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPrecision(pub String);

impl fmt::Display for UnknownPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown precision {:?} (expected f32, bf16 or int8)",
            self.0
        )
    }
}

impl std::error::Error for UnknownPrecision {}

impl FromStr for Precision {
    type Err = UnknownPrecision;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPrecision(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
        }
        assert_eq!(
            "fp8".parse::<Precision>(),
            Err(UnknownPrecision("fp8".into()))
        );
    }
}
