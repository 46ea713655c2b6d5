//! Convolution building blocks shared by the CNN and hybrid families: convolutions with PyTorch or
//! TensorFlow "SAME" padding, BatchNorm folded into the preceding convolution at load time, pooling.

use candle_core::{DType, Tensor, D};
use visenc_weights::Scope;

use crate::error::{config_err, Result};

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
        if c.groups == 0 || c.cin % c.groups != 0 || c.cout % c.groups != 0 {
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

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(2)?;
        let (x, pad) = match self.padding {
            Padding::Symmetric(p) => (x.clone(), p),
            Padding::TfSame => (pad_same(x, k, self.stride, self.dilation)?, 0),
        };
        let depthwise = self.groups > 1 && self.weight.dim(1)? == 1 && x.dim(1)? == self.groups;
        let y = if depthwise && self.dilation == 1 && x.device().is_cpu() {
            depthwise_cpu(&x, &self.weight, self.stride, pad)?
        } else {
            x.conv2d(&self.weight, pad, self.stride, self.dilation, self.groups)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y,
        })
    }
}

/// A depthwise convolution (one k x k filter per channel, `weight` [C, 1, k, k]) with zero padding
/// `pad` on every side, as a direct loop over the channel planes in f32, split across threads.
/// candle's grouped `conv2d` runs one convolution per group, which for the hundreds of channels of
/// EfficientNet, ConvNeXt or MaxViT blocks is 10-50x slower than this.
pub fn depthwise_cpu(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    if h + 2 * pad < kh || w + 2 * pad < kw {
        return Err(crate::error::ModelError::Input(format!(
            "a {h}x{w} map is smaller than the {kh}x{kw} depthwise kernel"
        )));
    }
    let (oh, ow) = (
        (h + 2 * pad - kh) / stride + 1,
        (w + 2 * pad - kw) / stride + 1,
    );
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let ws = weight
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = vec![0f32; b * c * oh * ow];
    // The output columns `ox` whose input column `ox * stride + k - pad` lies inside [0, size).
    let valid = |k: usize, size: usize, n: usize| {
        let lo = pad.saturating_sub(k).div_ceil(stride);
        let hi = (size + pad)
            .checked_sub(k + 1)
            .map_or(0, |v| (v / stride + 1).min(n));
        (lo, hi.max(lo))
    };
    let plane = |i: usize, o: &mut [f32]| {
        let (xin, wk) = (
            &xs[i * h * w..(i + 1) * h * w],
            &ws[(i % c) * kh * kw..(i % c + 1) * kh * kw],
        );
        for ky in 0..kh {
            let (y0, y1) = valid(ky, h, oh);
            for kx in 0..kw {
                let (x0, x1) = valid(kx, w, ow);
                let wv = wk[ky * kw + kx];
                for oy in y0..y1 {
                    let row = &xin[(oy * stride + ky - pad) * w..];
                    let orow = &mut o[oy * ow..(oy + 1) * ow];
                    for ox in x0..x1 {
                        orow[ox] += wv * row[ox * stride + kx - pad];
                    }
                }
            }
        }
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(b * c)
        .max(1);
    let per = (b * c).div_ceil(threads) * oh * ow;
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per.max(1)).enumerate() {
            let plane = &plane;
            s.spawn(move || {
                for (j, o) in chunk.chunks_mut(oh * ow).enumerate() {
                    plane(t * per / (oh * ow) + j, o);
                }
            });
        }
    });
    Ok(Tensor::from_vec(out, (b, c, oh, ow), x.device())?.to_dtype(x.dtype())?)
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

/// `nn.MaxPool2d(kernel_size=3, stride=2, padding=1)` (the ResNet stem), padding with -inf.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let neg = |shape: (usize, usize, usize, usize)| {
        Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())
    };
    let x = Tensor::cat(&[&neg((b, c, h, 1))?, x, &neg((b, c, h, 1))?], 3)?;
    let x = Tensor::cat(&[&neg((b, c, 1, w + 2))?, &x, &neg((b, c, 1, w + 2))?], 2)?;
    Ok(x.max_pool2d_with_stride(3, 2)?)
}

/// Global average pooling of [B, C, H, W] to [B, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    Ok(x.mean(D::Minus1)?.mean(D::Minus1)?)
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
    fn depthwise_matches_grouped_conv() {
        let dev = Device::Cpu;
        for (c, h, w, k, stride, pad) in [
            (6, 9, 7, 3, 1, 1),
            (4, 8, 11, 5, 2, 2),
            (3, 5, 6, 3, 2, 0),
            (2, 4, 4, 5, 1, 2),
            (3, 1, 2, 5, 1, 2),
            (2, 2, 3, 5, 2, 2),
        ] {
            let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (c, 1, k, k), &dev).unwrap();
            let ours = depthwise_cpu(&x, &wt, stride, pad).unwrap();
            let reference = x.conv2d(&wt, pad, stride, 1, c).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "c{c} {h}x{w} k{k} s{stride} p{pad}: {diff}");
        }
    }

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
