//! The linear layer of every family: candle's f32 product, or the bf16 / int8 kernels of
//! `visenc-kernels` with the weights packed once at load ([`Precision`]).

use candle_core::{DType, Device, Module, Storage, Tensor};
use visenc_kernels::gemm_bf16::{gemm_bf16, PackedBf16};
use visenc_kernels::gemm_int8::{gemm_int8, PackedInt8};
use visenc_kernels::{cpu, Precision};
use visenc_weights::Scope;

use crate::error::{config_err, Result};

/// `y = x Wᵀ + b` over the last dimension, `W` [out, in] as in PyTorch's `nn.Linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// candle's matmul on the weights as loaded (any device, any dtype).
    F32(candle_nn::Linear),
    /// A CPU kernel on packed weights; the f32 weight is dropped after packing.
    Packed {
        packed: Packed,
        bias: Option<Vec<f32>>,
    },
}

#[derive(Debug, Clone)]
enum Packed {
    Bf16(PackedBf16),
    Int8(PackedInt8),
}

impl Linear {
    /// An f32 layer from `weight` [out, in] and `bias` [out].
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            kind: Kind::F32(candle_nn::Linear::new(weight, bias)),
        }
    }

    /// A layer in `precision`: f32 keeps candle's product; bf16 and int8 pack the weight for the CPU
    /// kernels (they need f32 weights on the CPU).
    pub fn with_precision(
        weight: Tensor,
        bias: Option<Tensor>,
        precision: Precision,
    ) -> Result<Self> {
        let packing = |w: &Tensor| -> Result<(Vec<f32>, usize, usize)> {
            let (n, k) = w.dims2()?;
            if !matches!(w.device(), Device::Cpu) {
                return Err(config_err(
                    "precision",
                    format!(
                        "{precision} runs on the CPU kernels; the weights are on {:?}",
                        w.device()
                    ),
                ));
            }
            Ok((w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, n, k))
        };
        let packed = match precision {
            Precision::F32 => return Ok(Self::new(weight, bias)),
            Precision::Bf16 => {
                let (w, n, k) = packing(&weight)?;
                Packed::Bf16(PackedBf16::pack(&w, n, k))
            }
            Precision::Int8 => {
                let (w, n, k) = packing(&weight)?;
                Packed::Int8(PackedInt8::pack(&w, n, k))
            }
        };
        let bias = bias
            .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1())
            .transpose()?;
        Ok(Self {
            kind: Kind::Packed { packed, bias },
        })
    }

    /// A layer in the precision the weights under `s` are being loaded for.
    pub fn load(s: &Scope, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::with_precision(weight, bias, s.precision())
    }

    /// The f32 layer's weight [out, in] and bias, for kernels that take them directly; `None` for
    /// packed (bf16 / int8) layers.
    pub fn f32_parts(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match &self.kind {
            Kind::F32(l) => Some((l.weight(), l.bias())),
            Kind::Packed { .. } => None,
        }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        match &self.kind {
            Kind::F32(l) => l.weight().dim(1).unwrap_or(0),
            Kind::Packed {
                packed: Packed::Bf16(p),
                ..
            } => p.k(),
            Kind::Packed {
                packed: Packed::Int8(p),
                ..
            } => p.k(),
        }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        match &self.kind {
            Kind::F32(l) => l.weight().dim(0).unwrap_or(0),
            Kind::Packed {
                packed: Packed::Bf16(p),
                ..
            } => p.n(),
            Kind::Packed {
                packed: Packed::Int8(p),
                ..
            } => p.n(),
        }
    }

    /// `x` [..., in] -> [..., out]; packed layers take and give f32 on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (packed, bias) = match &self.kind {
            Kind::F32(l) => return Ok(l.forward(x)?),
            Kind::Packed { packed, bias } => (packed, bias),
        };
        let (k, n) = (self.in_dim(), self.out_dim());
        let mut dims = x.dims().to_vec();
        if dims.last() != Some(&k) {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: x.shape().clone(),
                rhs: (n, k).into(),
                op: "linear",
            }
            .into());
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let m = x.elem_count() / k.max(1);
        let mut out = vec![0f32; m * n];
        {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu_storage) = &*storage else {
                return Err(config_err(
                    "precision",
                    "bf16/int8 layers run on the CPU only",
                ));
            };
            let (start, end) = layout
                .contiguous_offsets()
                .expect("a contiguous tensor has contiguous offsets");
            let a = &cpu_storage.as_slice::<f32>()?[start..end];
            let features = cpu::features();
            match packed {
                Packed::Bf16(w) => gemm_bf16(a, m, w, bias.as_deref(), &mut out, features),
                Packed::Int8(w) => gemm_int8(a, m, w, bias.as_deref(), &mut out, features),
            }
        }
        *dims.last_mut().expect("checked above") = n;
        Ok(Tensor::from_vec(out, dims, x.device())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each precision gives candle's f32 result within its kernel's error, on a 3-d input whose last
    /// dimension is odd.
    #[test]
    fn precisions_match_f32() {
        let dev = Device::Cpu;
        let (n, k) = (37, 45);
        let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., n, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 5, k), &dev).unwrap();
        let want = Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
        for (p, tol) in [(Precision::Bf16, 0.02), (Precision::Int8, 0.05)] {
            let l = Linear::with_precision(w.clone(), Some(b.clone()), p).unwrap();
            assert_eq!((l.in_dim(), l.out_dim()), (k, n));
            let got = l.forward(&x).unwrap();
            assert_eq!(got.dims(), &[2, 5, n]);
            let err = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap();
            let rel = err.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
            assert!(rel < tol, "{p}: relative error {rel}");
            assert!(l
                .forward(&Tensor::zeros((3, k + 1), DType::F32, &dev).unwrap())
                .is_err());
        }
    }
}
