//! visenc's own CPU kernels ([`visenc_kernels`]) reached from candle tensors: activations in place,
//! LayerNorm, and fused attention reading strided q/k/v. Each entry point takes the kernel on a CPU
//! `f32` tensor and says `None` (or falls back itself) elsewhere, so callers keep candle's path for
//! other devices and dtypes.
//!
//! The kernels have no backward pass, so they also step aside for any input that autograd tracks (a
//! trainable `Var` or a result computed from one, [`Tensor::track_op`]): training runs those layers
//! on candle's differentiable ops ([`softmax_last_dim`], [`layer_norm_differentiable`]), while
//! frozen layers, whose inputs and weights are plain tensors, keep the fast kernels.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, InplaceOp1, Layout, Shape, Storage, Tensor,
};
use visenc_kernels::{activation, attention as fused, norm, Precision};

use candle_core::Result;

/// Whether a kernel may take `t`: an `f32` CPU tensor that no gradient has to flow through.
fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op()
}

/// Whether any of `ts` needs gradients (so only differentiable ops may touch it).
pub fn tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Softmax over the last dimension: candle's fused op (which has no backward) for plain tensors,
/// the composition of differentiable primitives for tracked ones.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, candle_core::D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// LayerNorm of the last dimension from differentiable primitives (candle's fused `layer_norm` has
/// no backward).
pub fn layer_norm_differentiable(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    candle_nn::ops::layer_norm_slow(x, w, b, eps as f32)
}

/// The contiguous `f32` values of a layout, or an error naming the op.
fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input is not contiguous")))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// An activation with a fused kernel, applied by candle's custom-op machinery.
struct Act(activation::Activation);

impl InplaceOp1 for Act {
    fn name(&self) -> &'static str {
        "visenc-activation-inplace"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("activation: not contiguous".into()))?;
        match s {
            CpuStorage::F32(v) => activation::apply_inplace(self.0, &mut v[a..b]),
            _ => candle_core::bail!("activation: f32 only"),
        }
        Ok(())
    }
}

impl CustomOp1 for Act {
    fn name(&self) -> &'static str {
        "visenc-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut v = contiguous(s, l, "activation")?.to_vec();
        activation::apply_inplace(self.0, &mut v);
        Ok((CpuStorage::F32(v), l.shape().clone()))
    }
}

/// `act(x)` by the fused kernel into a new tensor; `None` where it does not apply (other device,
/// dtype, or a strided view).
pub fn activation(x: &Tensor, act: activation::Activation) -> Result<Option<Tensor>> {
    if !cpu_f32(x) || !x.is_contiguous() {
        return Ok(None);
    }
    Ok(Some(x.apply_op1_no_bwd(&Act(act))?))
}

/// `act(x)` overwriting `x` (which the caller owns: no other tensor may share its storage); `false`
/// where the kernel does not apply and nothing was done.
pub fn activation_inplace(x: &Tensor, act: activation::Activation) -> Result<bool> {
    if !cpu_f32(x) || !x.is_contiguous() {
        return Ok(false);
    }
    x.inplace_op1(&Act(act))?;
    Ok(true)
}

/// LayerNorm over the last dimension with `eps`.
struct LayerNormOp(f32);

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "visenc-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(xs, xl, "layer_norm")?;
        let g = contiguous(gs, gl, "layer_norm weight")?;
        let b = contiguous(bs, bl, "layer_norm bias")?;
        let dim = xl.shape().dims().last().copied().unwrap_or(0);
        if dim == 0 || g.len() != dim || b.len() != dim {
            candle_core::bail!(
                "layer_norm: input {:?} with weight {} and bias {}",
                xl.shape(),
                g.len(),
                b.len()
            );
        }
        let mut out = Vec::with_capacity(x.len());
        norm::layer_norm_uninit(x, g, b, self.0, &mut out.spare_capacity_mut()[..x.len()]);
        // SAFETY: `layer_norm` wrote all x.len() values.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// LayerNorm of the last dimension by the kernel; `None` where it does not apply.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !(cpu_f32(x) && cpu_f32(w) && cpu_f32(b) && x.is_contiguous()) {
        return Ok(None);
    }
    Ok(Some(x.apply_op3_no_bwd(w, b, &LayerNormOp(eps as f32))?))
}

/// The strides of a rank-4 `[batch, heads, rows, cols]` view.
fn strides(l: &Layout) -> fused::Strides {
    let s = l.stride();
    fused::Strides {
        offset: l.start_offset(),
        batch: s[0],
        head: s[1],
        row: s[2],
        col: s[3],
    }
}

/// A CPU tensor's storage viewed through its layout as an attention operand.
fn op<'a>(s: &'a Storage, l: &Layout) -> Result<fused::Operand<'a>> {
    match s {
        Storage::Cpu(c) => Ok(fused::Operand {
            data: c.as_slice::<f32>()?,
            strides: strides(l),
        }),
        _ => candle_core::bail!("attention: not a CPU tensor"),
    }
}

/// `softmax(scale q k^T + bias) v` by the fused kernel for `q` [B, H, N, d], `k`, `v` [B, H, M, d]
/// (any strides; views into one fused projection are read in place) and `bias` broadcastable to
/// [B, H, N, M]. The result is [B, N, H, d] (heads merged); the products in `precision` (bf16 and
/// int8 as bf16, as the kernel does it). `None` where the kernel does not apply.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f32,
    precision: Precision,
) -> Result<Option<Tensor>> {
    if ![q, k, v].into_iter().chain(bias).all(cpu_f32) {
        return Ok(None);
    }
    let (batch, heads, queries, head_dim) = q.dims4()?;
    let keys = k.dim(2)?;
    let bias = bias
        .map(|b| -> Result<Tensor> {
            let b = b.broadcast_as((batch, heads, queries, keys))?;
            // The kernel reads keys contiguously; a bias broadcast along keys is rare: copy it.
            Ok(if b.stride()[3] == 1 || keys == 1 {
                b
            } else {
                b.contiguous()?
            })
        })
        .transpose()?;
    let d = fused::Dims {
        batch,
        heads,
        queries,
        keys,
        head_dim,
    };
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
    let bias_op = match &bias_guard {
        Some((s, l)) => {
            let mut o = op(s, l)?;
            if keys == 1 {
                o.strides.col = 1;
            }
            Some(o)
        }
        None => None,
    };
    let out = fused::attention(
        d,
        op(&qs, ql)?,
        op(&ks, kl)?,
        op(&vs, vl)?,
        bias_op,
        scale,
        precision,
    )
    .map_err(candle_core::Error::wrap)?;
    Ok(Some(Tensor::from_vec(
        out,
        (batch, queries, heads, head_dim),
        q.device(),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Tolerance between the kernels and candle's ops (summation order and polynomial exp/erf).
    const TOL: f32 = 2e-5;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn layer_norm_and_activations_match_candle() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2., (3, 5, 37), &dev).unwrap() + 1.0).unwrap();
        let w = Tensor::randn(1f32, 0.1, 37, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 37, &dev).unwrap();
        let ours = layer_norm(&x, &w, &b, 1e-5).unwrap().unwrap();
        let theirs = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert!(max_diff(&ours, &theirs) < TOL);

        let q = activation(&x, activation::Activation::QuickGelu)
            .unwrap()
            .unwrap();
        let want = (&x * candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap()).unwrap();
        assert!(max_diff(&q, &want) < TOL);
        let y = x.copy().unwrap();
        assert!(activation_inplace(&y, activation::Activation::Gelu).unwrap());
        assert!(max_diff(&y, &x.gelu_erf().unwrap()) < TOL);
        // A strided view is left to candle.
        assert!(activation(&x.t().unwrap(), activation::Activation::Silu)
            .unwrap()
            .is_none());
    }

    /// A tracked input (a `Var` or anything computed from one) is left to candle's differentiable
    /// ops, which give the gradient of the composed formula.
    #[test]
    fn tracked_inputs_take_differentiable_ops() {
        let dev = Device::Cpu;
        let x = candle_core::Var::randn(0f32, 1., (2, 7), &dev).unwrap();
        let (w, b) = (
            Tensor::ones(7, DType::F32, &dev).unwrap(),
            Tensor::zeros(7, DType::F32, &dev).unwrap(),
        );
        assert!(layer_norm(&x, &w, &b, 1e-5).unwrap().is_none());
        assert!(activation(&x, activation::Activation::Gelu)
            .unwrap()
            .is_none());
        assert!(!activation_inplace(&x, activation::Activation::Gelu).unwrap());
        let plain = x.as_tensor().detach();
        assert!(layer_norm(&plain, &w, &b, 1e-5).unwrap().is_some());
        // d/dx sum(softmax(x) * c) = s * (c - sum(s * c)), row by row.
        let c = Tensor::randn(0f32, 1., (2, 7), &dev).unwrap();
        let s = softmax_last_dim(&x).unwrap();
        let g = (&s * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let sc = (&s * &c).unwrap().sum_keepdim(D::Minus1).unwrap();
        let want = (&s * c.broadcast_sub(&sc).unwrap()).unwrap();
        assert!(max_diff(g.get(&x).unwrap(), &want) < 1e-6);
        let y = layer_norm_differentiable(&x, &w, &b, 1e-5).unwrap();
        let want = candle_nn::ops::layer_norm(&plain, &w, &b, 1e-5).unwrap();
        assert!(max_diff(&y, &want) < TOL);
        assert!(y.sum_all().unwrap().backward().unwrap().get(&x).is_some());
    }

    #[test]
    fn attention_reads_strided_views_and_matches_candle() {
        let dev = Device::Cpu;
        let (b, n, h, hd) = (2, 21, 3, 8);
        // A fused projection [B, N, 3, H, d] split into views (nn::Attention: k|v [B, N, 2, H, d]).
        let qkv = Tensor::randn(0f32, 1., (b, n, 3, h, hd), &dev).unwrap();
        let part = |i| {
            qkv.narrow(2, i, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let bias = Tensor::randn(0f32, 1., (1, 1, n, n), &dev).unwrap();
        let got = attention(&q, &k, &v, Some(&bias), 0.3, Precision::F32)
            .unwrap()
            .unwrap();
        let s = (q.contiguous().unwrap() * 0.3)
            .unwrap()
            .matmul(&k.contiguous().unwrap().t().unwrap())
            .unwrap();
        let p = candle_nn::ops::softmax(&s.broadcast_add(&bias).unwrap(), D::Minus1).unwrap();
        let want = p
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(max_diff(&got, &want) < TOL);
    }
}
