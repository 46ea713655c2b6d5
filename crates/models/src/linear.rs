//! The linear layer of every family: visenc's GEMM on weights packed once at load
//! ([`visenc_kernels::gemm`], in the model's [`Precision`]), or candle's product where the kernels do
//! not apply (weights on another device or in another dtype, or tracked by autograd).

use candle_core::{DType, Device, Module, Tensor};
use visenc_kernels::conv::{Act, Epilogue};
use visenc_kernels::gemm::{gemm_uninit, PackedWeight};
use visenc_kernels::Precision;
use visenc_weights::Scope;

use crate::conv::cpu_f32;
use crate::error::{config_err, Result};
use crate::nn::Activation;

/// `y = x Wᵀ + b` over the last dimension, `W` [out, in] as in PyTorch's `nn.Linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// candle's matmul on the weights as loaded (any device, any dtype, autograd).
    Candle(candle_nn::Linear),
    /// visenc's GEMM on packed weights; the loaded weight is dropped after packing.
    Packed {
        packed: PackedWeight,
        bias: Option<Vec<f32>>,
    },
}

impl Linear {
    /// A layer in `precision`. f32 weights on the CPU that autograd does not track are packed for
    /// visenc's GEMM; other f32 weights keep candle's product. bf16 and int8 always pack (they need
    /// the weights on the CPU).
    pub fn with_precision(
        weight: Tensor,
        bias: Option<Tensor>,
        precision: Precision,
    ) -> Result<Self> {
        let on_cpu = matches!(weight.device(), Device::Cpu);
        if precision == Precision::F32
            && !(on_cpu
                && weight.dtype() == DType::F32
                && !crate::ops::tracked(&[&weight])
                && bias.as_ref().is_none_or(|b| !crate::ops::tracked(&[b])))
        {
            return Ok(Self {
                kind: Kind::Candle(candle_nn::Linear::new(weight, bias)),
            });
        }
        if !on_cpu {
            return Err(config_err(
                "precision",
                format!(
                    "{precision} runs on the CPU kernels; the weights are on {:?}",
                    weight.device()
                ),
            ));
        }
        let (n, k) = weight.dims2()?;
        // Packed from the weight's own storage (no copy of it while the packed form is made).
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let packed = PackedWeight::pack(crate::nhwc::view(&weight).data()?, n, k, precision);
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

    /// The packed weight and bias, for kernels that run the product themselves (channels-last
    /// trunks fusing a residual and an activation); `None` for layers on candle's product.
    pub fn packed(&self) -> Option<(&PackedWeight, Option<&[f32]>)> {
        match &self.kind {
            Kind::Candle(_) => None,
            Kind::Packed { packed, bias } => Some((packed, bias.as_deref())),
        }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        match &self.kind {
            Kind::Candle(l) => l.weight().dim(1).unwrap_or(0),
            Kind::Packed { packed, .. } => packed.k(),
        }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        match &self.kind {
            Kind::Candle(l) => l.weight().dim(0).unwrap_or(0),
            Kind::Packed { packed, .. } => packed.n(),
        }
    }

    /// `x` [..., in] -> [..., out]; packed layers take and give f32 on the CPU. An input that autograd
    /// tracks (a frozen layer after a trainable one) goes through candle's product on the weight
    /// unpacked, so gradients reach the layers before; only f32 layers can do that.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, None)
    }

    /// `act(x Wᵀ + b + residual)`: packed layers add the residual and apply the activation to each
    /// output tile while it is in cache (a residual of the output's shape, f32 on the CPU); other
    /// layers and tracked tensors run them after the product.
    pub fn forward_with(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        let (packed, bias) = match &self.kind {
            Kind::Packed { packed, bias }
                if !crate::ops::tracked(&[x])
                    && residual.is_none_or(|r| !crate::ops::tracked(&[r])) =>
            {
                (packed, bias)
            }
            _ => {
                let y = match &self.kind {
                    Kind::Candle(l) => l.forward(x)?,
                    Kind::Packed { .. } => self.forward_tracked(x)?,
                };
                let y = match residual {
                    Some(r) => (y + r)?,
                    None => y,
                };
                return match act {
                    Some(a) => a.forward_owned(y),
                    None => Ok(y),
                };
            }
        };
        let (k, n) = (packed.k(), packed.n());
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
        *dims.last_mut().expect("checked above") = n;
        let residual = residual
            .map(|r| {
                if r.dims() != dims.as_slice() {
                    return Err(candle_core::Error::ShapeMismatchBinaryOp {
                        lhs: r.shape().clone(),
                        rhs: dims.as_slice().into(),
                        op: "linear residual",
                    });
                }
                r.to_dtype(DType::F32)?.contiguous()
            })
            .transpose()?;
        let rg = residual.as_ref().map(Tensor::storage_and_layout);
        let mut out = Vec::with_capacity(m * n);
        {
            let (storage, layout) = x.storage_and_layout();
            let a = cpu_f32(&storage, layout)?;
            let e = Epilogue {
                bias: bias.as_deref(),
                residual: rg.as_ref().map(|(s, l)| cpu_f32(s, l)).transpose()?,
                act: act.map_or(Act::None, Activation::epilogue),
            };
            gemm_uninit(a, m, packed, e, &mut out.spare_capacity_mut()[..m * n]);
        }
        // SAFETY: `gemm_uninit` wrote all m * n values.
        unsafe { out.set_len(m * n) };
        Ok(Tensor::from_vec(out, dims, x.device())?)
    }

    /// [`Self::forward`] for a tracked input: candle's differentiable product.
    fn forward_tracked(&self, x: &Tensor) -> Result<Tensor> {
        let Kind::Packed {
            packed: PackedWeight::F32(w),
            bias,
        } = &self.kind
        else {
            return Err(config_err(
                "precision",
                "gradients flow only through f32 layers; load the model in f32 to train it",
            ));
        };
        let weight = Tensor::from_vec(w.unpack(), (w.n(), w.k()), x.device())?;
        let bias = bias
            .as_ref()
            .map(|b| Tensor::from_slice(b, b.len(), x.device()))
            .transpose()?;
        Ok(candle_nn::Linear::new(weight, bias).forward(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each precision gives candle's f32 result within its kernel's error, on a 3-d input whose last
    /// dimension is odd.
    #[test]
    fn precisions_match_candle() {
        let dev = Device::Cpu;
        let (n, k) = (37, 45);
        let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., n, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 5, k), &dev).unwrap();
        let want = candle_nn::Linear::new(w.clone(), Some(b.clone()))
            .forward(&x)
            .unwrap();
        for (p, tol) in [
            (Precision::F32, 1e-6),
            (Precision::Bf16, 0.02),
            (Precision::Int8, 0.05),
        ] {
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

    /// A packed f32 layer passes gradients to a tracked input, as candle's layer does.
    #[test]
    fn gradients_flow_through_packed_f32() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (6, 4), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 6, &dev).unwrap();
        let x = candle_core::Var::randn(0f32, 1., (3, 4), &dev).unwrap();
        let grad = |l: &dyn Fn(&Tensor) -> Tensor| {
            let g = l(x.as_tensor()).sqr().unwrap().sum_all().unwrap();
            g.backward().unwrap().get(x.as_tensor()).unwrap().clone()
        };
        let packed = Linear::with_precision(w.clone(), Some(b.clone()), Precision::F32).unwrap();
        assert!(packed.packed().is_some());
        let candle = candle_nn::Linear::new(w, Some(b));
        let (g1, g2) = (
            grad(&|x| packed.forward(x).unwrap()),
            grad(&|x| candle.forward(x).unwrap()),
        );
        let err = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-5);
    }

    /// The fused residual and activation equal the product followed by candle's add and the
    /// activation, in every precision; a residual of the wrong shape is an error.
    #[test]
    fn fused_epilogue_matches_separate_ops() {
        let dev = Device::Cpu;
        let (n, k) = (20, 33);
        let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., n, &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, k), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (2, 3, n), &dev).unwrap();
        for p in Precision::ALL {
            let l = Linear::with_precision(w.clone(), Some(b.clone()), p).unwrap();
            for act in [
                Activation::QuickGelu,
                Activation::GeluTanh,
                Activation::Relu,
            ] {
                let want = act
                    .forward(&(l.forward(&x).unwrap() + &r).unwrap())
                    .unwrap();
                let got = l.forward_with(&x, Some(&r), Some(act)).unwrap();
                let err = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                assert!(err.to_scalar::<f32>().unwrap() < 1e-5, "{p} {act:?}");
            }
            let bad = Tensor::zeros((2, 3, n + 1), DType::F32, &dev).unwrap();
            assert!(l.forward_with(&x, Some(&bad), None).is_err());
        }
    }
}
