//! Convolution building blocks shared by the CNN and hybrid families: convolutions with PyTorch or
//! TensorFlow "SAME" padding, BatchNorm folded into the preceding convolution at load time, pooling.

use candle_core::{DType, Layout, Storage, Tensor, D};
use visenc_kernels::conv::lowp::{conv2d_bf16, PackedConvBf16};
use visenc_kernels::conv::{conv2d, Act, ConvShape, Epilogue, Pad};
use visenc_kernels::pool::{max_pool2d, mean_planes, sigmoid_gate, MaxPool};
use visenc_weights::Scope;

use crate::error::{config_err, ModelError, Result};
use crate::nn::Activation;

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// PyTorch `padding=p` on every side.
    Symmetric(usize),
    /// TensorFlow "SAME": output = ceil(input / stride), padding split with the extra pixel at the
    /// bottom/right, computed from each input's size (timm `Conv2dSame`, EfficientNet-Lite ports).
    TfSame,
}

/// A 2-D convolution (optionally with a BatchNorm folded in).
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: Padding,
    dilation: usize,
    groups: usize,
    /// The bf16 weight under `Precision::Bf16` (`crate::conv_lowp`).
    lowp: crate::conv_lowp::LowpConv,
}

/// Shape of a convolution: channels, kernel, stride, padding, groups.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: Padding,
    pub groups: usize,
    pub bias: bool,
}

impl ConvSpec {
    /// A k x k convolution with PyTorch's usual `padding = k / 2`.
    pub fn new(cin: usize, cout: usize, k: usize, stride: usize) -> Self {
        Self {
            cin,
            cout,
            k,
            stride,
            padding: Padding::Symmetric(k / 2),
            groups: 1,
            bias: false,
        }
    }

    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }

    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }

    pub fn padding(mut self, p: Padding) -> Self {
        self.padding = p;
        self
    }
}

impl Conv {
    /// Loads `name.weight` [cout, cin/groups, k, k] (and `name.bias`).
    pub fn load(s: &Scope, name: &str, c: ConvSpec) -> Result<Self> {
        if c.groups == 0 || !c.cin.is_multiple_of(c.groups) || !c.cout.is_multiple_of(c.groups) {
            return Err(config_err(
                "groups",
                format!(
                    "{} groups do not divide {} -> {} channels",
                    c.groups, c.cin, c.cout
                ),
            ));
        }
        let s = s.pp(name);
        let weight = s.get((c.cout, c.cin / c.groups, c.k, c.k), "weight")?;
        let bias = if c.bias {
            Some(s.get(c.cout, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride: c.stride,
            padding: c.padding,
            dilation: 1,
            groups: c.groups,
            lowp: crate::conv_lowp::LowpConv::new(s.precision()),
        })
    }

    /// Folds the BatchNorm `name` (eval mode: running statistics) into this convolution:
    /// `w' = w * g / sqrt(var + eps)`, `b' = (b - mean) * g / sqrt(var + eps) + beta`.
    pub fn fold_bn(mut self, s: &Scope, name: &str, eps: f64) -> Result<Self> {
        let c = self.weight.dim(0)?;
        let s = s.pp(name);
        let gamma = s.get(c, "weight")?;
        let beta = s.get(c, "bias")?;
        let mean = s.get(c, "running_mean")?;
        let var = s.get(c, "running_var")?;
        s.ignore("num_batches_tracked");
        let scale = (gamma / (var + eps)?.sqrt()?)?;
        self.weight = self.weight.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        let b = match &self.bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(c, self.weight.dtype(), self.weight.device())?,
        };
        self.bias = Some(((b - mean)? * scale)?.add(&beta)?);
        Ok(self)
    }

    /// The weight [cout, cin / groups, k, k] (BatchNorm folded in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias [cout], if any (always after a BatchNorm fold).
    pub fn bias_tensor(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn padding(&self) -> Padding {
        self.padding
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Whether this is a depthwise convolution (one group per channel, one filter each).
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.out_channels() && self.weight.dim(1).ok() == Some(1)
    }

    /// Whether a 1x1 stride-1 unpadded dense convolution: a linear layer over each pixel.
    pub fn is_pointwise(&self) -> bool {
        let (_, _, kh, kw) = self.weight.dims4().unwrap_or((0, 0, 0, 0));
        self.groups == 1
            && (kh, kw) == (1, 1)
            && self.stride == 1
            && self.dilation == 1
            && matches!(self.padding, Padding::Symmetric(0) | Padding::TfSame)
    }

    /// The precision the model was loaded for (bf16 makes dense convolutions run in bf16).
    pub(crate) fn precision(&self) -> visenc_kernels::Precision {
        self.lowp.precision()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, None)
    }

    /// `act(conv(x) + residual)`: on the CPU in f32 the bias, the residual and the activation run
    /// inside the convolution kernel (`visenc_kernels::conv`); elsewhere, or for other groupings,
    /// through candle.
    pub fn forward_with(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        let fast = x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.dilation == 1;
        if fast {
            let e = Fused {
                bias: self.bias.as_ref(),
                residual,
                act,
                bf16: self.lowp.packed(&self.weight, self.groups)?,
            };
            if let Some(y) = conv2d_cpu(x, &self.weight, self.stride, self.padding, self.groups, e)?
            {
                return Ok(y);
            }
        }
        let k = self.weight.dim(2)?;
        let (x, pad) = match self.padding {
            Padding::Symmetric(p) => (x.clone(), p),
            Padding::TfSame => (pad_same(x, k, self.stride, self.dilation)?, 0),
        };
        let y = x.conv2d(&self.weight, pad, self.stride, self.dilation, self.groups)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y,
        };
        let y = match residual {
            Some(r) => (y + r)?,
            None => y,
        };
        act.map_or(Ok(y.clone()), |a| a.forward(&y))
    }
}

/// What [`conv2d_cpu`] adds to the convolution and the activation it applies after:
/// `act(conv + bias + residual)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fused<'a> {
    /// [cout].
    pub bias: Option<&'a Tensor>,
    /// The output's shape.
    pub residual: Option<&'a Tensor>,
    pub act: Option<Activation>,
    /// The weight in bf16 (a dense convolution's `PackedConvBf16`): the products run in bf16.
    pub bf16: Option<&'a PackedConvBf16>,
}

/// An f32 CPU convolution through `visenc_kernels::conv`: dense (groups = 1) or depthwise
/// (`weight` [C, 1, kh, kw] on C channels), with the bias, the residual and the activation fused.
/// `None` for other groupings (candle's path).
pub fn conv2d_cpu(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: Padding,
    groups: usize,
    e: Fused,
) -> Result<Option<Tensor>> {
    let (cout, per_group, kh, kw) = weight.dims4()?;
    let (b, c, h, w) = x.dims4()?;
    if c != per_group * groups {
        return Err(ModelError::Input(format!(
            "a convolution over {} input channels got a map with {c}",
            per_group * groups
        )));
    }
    let depthwise = groups > 1 && per_group == 1 && cout == c;
    if groups != 1 && !depthwise {
        return Ok(None);
    }
    let pad = match padding {
        Padding::Symmetric(p) => Pad::same(p),
        Padding::TfSame => Pad::tf_same(h, w, kh, kw, stride),
    };
    let shape = ConvShape {
        batch: b,
        cin: c,
        h,
        w,
        cout,
        kh,
        kw,
        stride,
        pad,
        depthwise,
    };
    let (oh, ow) = shape.out_hw();
    if oh == 0 || ow == 0 {
        return Err(ModelError::Input(format!(
            "a {h}x{w} map is smaller than the {kh}x{kw} convolution over it"
        )));
    }
    if let Some(r) = e.residual {
        if r.dims() != [b, cout, oh, ow] {
            return Err(ModelError::Input(format!(
                "a residual of shape {:?} cannot be added to a convolution output {:?}",
                r.dims(),
                [b, cout, oh, ow]
            )));
        }
    }
    let fused = fused_act(e.act);
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let bias = e.bias.map(Tensor::contiguous).transpose()?;
    let residual = e.residual.map(Tensor::contiguous).transpose()?;
    let (xg, wg) = (x.storage_and_layout(), weight.storage_and_layout());
    let bg = bias.as_ref().map(Tensor::storage_and_layout);
    let rg = residual.as_ref().map(Tensor::storage_and_layout);
    let epilogue = Epilogue {
        bias: bg.as_ref().map(|(s, l)| cpu_f32(s, l)).transpose()?,
        residual: rg.as_ref().map(|(s, l)| cpu_f32(s, l)).transpose()?,
        act: fused,
    };
    let mut out = vec![0f32; b * cout * oh * ow];
    let xs = cpu_f32(&xg.0, xg.1)?;
    match e.bf16 {
        Some(p) if !depthwise => conv2d_bf16(
            xs,
            p,
            &shape,
            epilogue,
            &mut out,
            visenc_kernels::cpu::features(),
        ),
        _ => conv2d(xs, cpu_f32(&wg.0, wg.1)?, &shape, epilogue, &mut out),
    }
    Ok(Some(Tensor::from_vec(out, (b, cout, oh, ow), x.device())?))
}

/// The activation as the convolution kernels' epilogue applies it (none: [`Act::None`]).
pub(crate) fn fused_act(a: Option<Activation>) -> Act {
    a.map_or(Act::None, Activation::epilogue)
}

/// The f32 data of a contiguous CPU tensor.
pub(crate) fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(ModelError::Input("an f32 CPU tensor was expected".into()));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| ModelError::Input("a contiguous tensor was expected".into()))?;
    Ok(&cpu.as_slice::<f32>()?[start..end])
}

/// TensorFlow "SAME" zero padding for a k x k window.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.11/timm/layers/padding.py#L17
pub fn pad_same(x: &Tensor, k: usize, stride: usize, dilation: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let pad = |size: usize| -> usize {
        let out = size.div_ceil(stride);
        ((out - 1) * stride + (k - 1) * dilation + 1).saturating_sub(size)
    };
    let (ph, pw) = (pad(h), pad(w));
    Ok(x.pad_with_zeros(2, ph / 2, ph - ph / 2)?
        .pad_with_zeros(3, pw / 2, pw - pw / 2)?)
}

/// Whether `x` is an f32 tensor on the CPU (the kernels' domain).
pub(crate) fn is_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Runs `f` on the data of an f32 CPU tensor (made contiguous first).
pub(crate) fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    Ok(f(cpu_f32(&storage, layout)?))
}

/// `nn.MaxPool2d(kernel_size=3, stride=2, padding=1)` (the ResNet stem), padding with -inf.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if is_cpu_f32(x) {
        let p = MaxPool {
            k: 3,
            stride: 2,
            pad: 1,
        };
        let (oh, ow) = p.out_hw(h, w);
        let mut out = vec![0f32; b * c * oh * ow];
        with_f32(x, |x| max_pool2d(x, b * c, h, w, p, &mut out))?;
        return Ok(Tensor::from_vec(out, (b, c, oh, ow), x.device())?);
    }
    let neg = |shape: (usize, usize, usize, usize)| {
        Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())
    };
    let x = Tensor::cat(&[&neg((b, c, h, 1))?, x, &neg((b, c, h, 1))?], 3)?;
    let x = Tensor::cat(&[&neg((b, c, 1, w + 2))?, &x, &neg((b, c, 1, w + 2))?], 2)?;
    Ok(x.max_pool2d_with_stride(3, 2)?)
}

/// Global average pooling of [B, C, H, W] to [B, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if is_cpu_f32(x) && h * w > 0 {
        let mut out = vec![0f32; b * c];
        with_f32(x, |x| mean_planes(x, h * w, &mut out))?;
        return Ok(Tensor::from_vec(out, (b, c), x.device())?);
    }
    Ok(x.mean(D::Minus1)?.mean(D::Minus1)?)
}

/// Squeeze-excitation's gate: `x * sigmoid(s)` with `s` [B, C, 1, 1] broadcast over each plane.
pub fn sigmoid_gate_planes(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if is_cpu_f32(x) && is_cpu_f32(s) && s.elem_count() == b * c && h * w > 0 {
        let mut out = vec![0f32; x.elem_count()];
        let s = s.flatten_all()?.to_vec1::<f32>()?;
        with_f32(x, |x| sigmoid_gate(x, h * w, &s, &mut out))?;
        return Ok(Tensor::from_vec(out, (b, c, h, w), x.device())?);
    }
    Ok(x.broadcast_mul(&candle_nn::ops::sigmoid(s)?)?)
}

/// Channels-first LayerNorm over C of [B, C, H, W] (ConvNeXt's `LayerNorm2d`), computed in f32.
pub fn layer_norm_2d(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    let c = weight.dim(0)?;
    Ok(y.broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tf_same_padding_keeps_ceil_size() {
        let x = Tensor::ones((1, 1, 7, 8), DType::F32, &Device::Cpu).unwrap();
        let p = pad_same(&x, 3, 2, 1).unwrap();
        // out 4x4 -> need (4-1)*2+3 = 9: pad 2 on 7 (1+1), 1 on 8 (0+1).
        assert_eq!(p.dims(), &[1, 1, 9, 9]);
        let v: Vec<Vec<f32>> = p.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(v[0][0], 0.0);
        assert_eq!(v[1][0], 1.0);
        assert_eq!(v[8][8], 0.0);
    }

    #[test]
    fn max_pool_matches_padded_definition() {
        let data: Vec<f32> = (0..25).map(|i| -(i as f32)).collect();
        let x = Tensor::from_vec(data, (1, 1, 5, 5), &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = max_pool_3x3_s2_p1(&x)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        // Output 3x3; window of output (0,0) covers input rows/cols 0..=1 -> max is 0.
        assert_eq!(
            y,
            vec![
                vec![0.0, -1.0, -3.0],
                vec![-5.0, -6.0, -8.0],
                vec![-15.0, -16.0, -18.0]
            ]
        );
    }
}
