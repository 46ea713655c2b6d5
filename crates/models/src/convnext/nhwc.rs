//! ConvNeXt's trunk on the CPU in f32, channels last: every block works on rows of C values per
//! pixel, which is the layout its LayerNorm and its two Linear layers want, so no tensor is ever
//! transposed. The depthwise convolution runs vectorised across channels, the patchify stem and
//! the 2x2 downsampling are a patch gather + one GEMM, the Linear layers fuse their bias, GELU and
//! (the second, with the layer scale folded in at load) the residual, and global pooling reads the
//! rows directly. The same network as the candle path in `mod.rs`, only in another memory layout.

use candle_core::Tensor;
use visenc_kernels::conv::nhwc::{dense, depthwise, DepthwiseWeight};
use visenc_kernels::conv::{Act, ConvShape, Epilogue, Pad};
use visenc_kernels::gemm::{gemm, PackedWeight};
use visenc_kernels::norm::layer_norm;
use visenc_kernels::Precision;

use super::{Block, CandleConvs, ConvNeXt, Norm2d, Stage};
use crate::api::FeatureMap;
use crate::conv::{is_cpu_f32, Conv};
use crate::error::{ModelError, Result};
use crate::nhwc::{view, Buffer, Map, Scratch as Buffers};
use crate::nn::Activation;

/// A patch convolution (the stem, a downsampling) prepared for [`dense`]: its weight permuted to
/// [cout, ky, kx, cin] (the order `im2col` gathers in) and packed, and its bias.
#[derive(Debug)]
struct PatchConv {
    weight: PackedWeight,
    bias: Option<Vec<f32>>,
}

/// A block's depthwise convolution prepared for [`depthwise`]: its weight tap-major, its bias and
/// kernel size.
#[derive(Debug)]
pub(super) struct DepthwiseConv {
    weight: DepthwiseWeight,
    bias: Option<Vec<f32>>,
    k: usize,
}

/// The convolutions of the NHWC path (its norms and Linear layers are the model's own).
#[derive(Debug)]
pub(super) struct NhwcWeights {
    stem: PatchConv,
    /// One per stage with downsampling.
    downsample: Vec<Option<PatchConv>>,
    /// Each block's depthwise convolution, per stage.
    dwconv: Vec<Vec<DepthwiseConv>>,
}

impl NhwcWeights {
    /// The channels-last form of `c`, or `c` back when the NHWC path does not apply: weights not on
    /// the CPU (or not f32 there), Linear layers on candle's product, GRN (ConvNeXt-V2) or an
    /// activation other than GELU in `stages`. The patch convolutions run in bf16 when the Linear
    /// layers do, else in f32 (as the NCHW path's convolutions, [`crate::conv_lowp`]). Each
    /// convolution is dropped once converted.
    pub(super) fn prepare(
        stages: &[Stage],
        c: CandleConvs,
    ) -> Result<std::result::Result<Self, CandleConvs>> {
        let linears = || {
            stages
                .iter()
                .flat_map(|s| &s.blocks)
                .flat_map(|b| [&b.fc1, &b.fc2])
        };
        let blocks_ok = stages
            .iter()
            .flat_map(|s| &s.blocks)
            .all(|b| b.grn.is_none() && b.act == Activation::Gelu);
        let mut convs = c
            .dwconv
            .iter()
            .flatten()
            .chain(c.downsample.iter().flatten());
        let convs_ok = is_cpu_f32(c.stem.weight()) && convs.all(|c| is_cpu_f32(c.weight()));
        if !blocks_ok || !convs_ok || linears().any(|l| l.packed().is_none()) {
            return Ok(Err(c));
        }
        let precision = match linears().next().and_then(|l| l.packed()) {
            Some((w, _)) if w.precision() == Precision::Bf16 => Precision::Bf16,
            _ => Precision::F32,
        };
        let bias = |c: &Conv| c.bias_tensor().map(|b| b.to_vec1()).transpose();
        let patch = |c: Conv| -> Result<PatchConv> {
            let w = c.weight().permute((0, 2, 3, 1))?.contiguous()?;
            let (n, k) = (w.dim(0)?, w.elem_count() / w.dim(0)?.max(1));
            let weight = PackedWeight::pack(view(&w).data()?, n, k, precision);
            Ok(PatchConv {
                weight,
                bias: bias(&c)?,
            })
        };
        let dw = |c: Conv| -> Result<DepthwiseConv> {
            let (ch, _, kh, kw) = c.weight().dims4()?;
            let w = c.weight().contiguous()?;
            let weight = DepthwiseWeight::pack(view(&w).data()?, ch, kh * kw);
            Ok(DepthwiseConv {
                weight,
                bias: bias(&c)?,
                k: kh,
            })
        };
        // The largest (the deepest downsampling) first, the stem last: the load peaks at the
        // converted weights plus the one being converted (see `resnet::nhwc`).
        let mut downsample = (c.downsample.into_iter().rev())
            .map(|d| d.map(patch).transpose())
            .collect::<Result<Vec<_>>>()?;
        downsample.reverse();
        let dwconv = (c.dwconv.into_iter())
            .map(|s| s.into_iter().map(dw).collect())
            .collect::<Result<_>>()?;
        let stem = patch(c.stem)?;
        Ok(Ok(Self {
            stem,
            downsample,
            dwconv,
        }))
    }
}

/// A Linear layer's packed weight and bias.
fn packed(l: &crate::linear::Linear) -> Result<(&PackedWeight, Option<&[f32]>)> {
    l.packed()
        .ok_or_else(|| ModelError::Input("the NHWC path needs packed Linear layers".into()))
}

/// LayerNorm over each row of C values.
fn norm_rows(x: &Map, weight: &Tensor, bias: &Tensor, eps: f64, out: &mut Buffer) -> Result<()> {
    let (g, b) = (view(weight), view(bias));
    out.resize(x.data.len());
    layer_norm(&x.data, g.data()?, b.data()?, eps as f32, out);
    Ok(())
}

/// A `k x k` stride-`k` convolution (`weight` packed from [cout, ky, kx, cin]) on an NHWC map,
/// floor-cropping sizes that are not a multiple of `k`.
fn patch_conv(x: &Map, k: usize, conv: &PatchConv, pool: &mut Buffers) -> Result<Map> {
    let (oh, ow) = (x.h / k, x.w / k);
    if oh == 0 || ow == 0 {
        return Err(ModelError::Input(format!(
            "a {}x{} map is smaller than the {k}x{k} patch convolution over it",
            x.h, x.w
        )));
    }
    let cout = conv.weight.n();
    let shape = ConvShape {
        batch: x.batch,
        cin: x.c,
        h: x.h,
        w: x.w,
        cout,
        kh: k,
        kw: k,
        stride: k,
        pad: Pad::default(),
        depthwise: false,
    };
    let m = x.batch * oh * ow;
    let e = Epilogue {
        bias: conv.bias.as_deref(),
        ..Default::default()
    };
    let mut out = pool.take(m * cout);
    dense(&x.data, &shape, &conv.weight, e, &mut out);
    Ok(Map {
        data: out,
        batch: x.batch,
        h: oh,
        w: ow,
        c: cout,
    })
}

/// Buffers reused by every block of a forward pass, taken from the pool and given back to it.
struct Scratch {
    dw: Buffer,
    normed: Buffer,
    hidden: Buffer,
    out: Buffer,
}

impl Scratch {
    /// Room for blocks of `values` (pixels x channels) and `hidden` MLP values: the first stage's,
    /// the largest.
    fn take(pool: &mut Buffers, values: usize, hidden: usize) -> Self {
        Self {
            dw: pool.take(values),
            normed: pool.take(values),
            hidden: pool.take(hidden),
            out: pool.take(values),
        }
    }

    fn give(self, pool: &mut Buffers) {
        for b in [self.dw, self.normed, self.hidden, self.out] {
            pool.give(b);
        }
    }
}

impl Block {
    /// `x + fc2(gelu(fc1(norm(dw(x)))))` on NHWC rows, into `x`.
    fn forward_nhwc(&self, x: &mut Map, dw: &DepthwiseConv, s: &mut Scratch) -> Result<()> {
        let (m, c, k) = (x.rows(), x.c, dw.k);
        let shape = ConvShape {
            batch: x.batch,
            cin: c,
            h: x.h,
            w: x.w,
            cout: c,
            kh: k,
            kw: k,
            stride: 1,
            pad: Pad::same((k - 1) / 2),
            depthwise: true,
        };
        s.dw.resize(m * c);
        let e = Epilogue {
            bias: dw.bias.as_deref(),
            ..Default::default()
        };
        depthwise(&x.data, &dw.weight, &shape, e, &mut s.dw);
        let (g, b, eps) = self.norm.parts();
        let (g, b) = (view(g), view(b));
        s.normed.resize(m * c);
        layer_norm(&s.dw, g.data()?, b.data()?, eps as f32, &mut s.normed);
        let ((w1, b1), (w2, b2)) = (packed(&self.fc1)?, packed(&self.fc2)?);
        s.hidden.resize(m * w1.n());
        let e1 = Epilogue {
            bias: b1,
            residual: None,
            act: Act::Gelu,
        };
        gemm(&s.normed, m, w1, e1, &mut s.hidden);
        s.out.resize(m * c);
        let e2 = Epilogue {
            bias: b2,
            residual: Some(&x.data),
            act: Act::None,
        };
        gemm(&s.hidden, m, w2, e2, &mut s.out);
        std::mem::swap(&mut x.data, &mut s.out);
        Ok(())
    }
}

/// The trunk's outputs: the final map (NCHW view), the pooled vector before the head's norm, the
/// requested feature maps.
pub(super) struct Trunk {
    pub last: Tensor,
    pub pooled: Tensor,
    pub maps: Vec<FeatureMap>,
}

impl ConvNeXt {
    /// Stem, stages, `norm_pre` and global pooling on NHWC rows (`pixels` NCHW, f32 on the CPU).
    pub(super) fn trunk_nhwc(
        &self,
        w: &NhwcWeights,
        pixels: &Tensor,
        features: bool,
    ) -> Result<Trunk> {
        let mut pool = Buffers::default();
        let input = Map::from_nchw(pixels, &mut pool)?;
        let mut x = patch_conv(&input, self.patch, &w.stem, &mut pool)?;
        pool.give(input.data);
        let mut buf = pool.take(x.data.len());
        let mut normed = |x: &mut Map, n: &Norm2d| -> Result<()> {
            norm_rows(x, &n.weight, &n.bias, n.eps, &mut buf)?;
            std::mem::swap(&mut x.data, &mut buf);
            Ok(())
        };
        normed(&mut x, &self.stem_norm)?;
        let mut reduction = self.patch;
        let mut maps = Vec::new();
        let hidden = self.stages.iter().flat_map(|s| &s.blocks).next();
        let hidden = hidden
            .and_then(|b| b.fc1.packed())
            .map_or(0, |(w, _)| w.n());
        let mut scratch = Scratch::take(&mut pool, x.data.len(), x.rows() * hidden);
        for ((stage, down), dws) in self.stages.iter().zip(&w.downsample).zip(&w.dwconv) {
            if let (Some(norm), Some(conv)) = (&stage.downsample, down) {
                normed(&mut x, norm)?;
                let y = patch_conv(&x, 2, conv, &mut pool)?;
                pool.give(std::mem::replace(&mut x, y).data);
                reduction *= 2;
            }
            for (b, dw) in stage.blocks.iter().zip(dws) {
                b.forward_nhwc(&mut x, dw, &mut scratch)?;
            }
            if features {
                maps.push(FeatureMap {
                    reduction,
                    map: x.to_nchw()?.contiguous()?,
                });
            }
        }
        if let Some(n) = &self.norm_pre {
            normed(&mut x, n)?;
        }
        scratch.give(&mut pool);
        pool.give(buf);
        let pooled = x.pixel_means()?;
        let last = x.to_nchw()?;
        pool.give(x.data);
        Ok(Trunk { last, pooled, maps })
    }
}
