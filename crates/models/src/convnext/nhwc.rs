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

use super::{Block, ConvNeXt, Norm2d};
use crate::api::FeatureMap;
use crate::conv::{is_cpu_f32, Conv};
use crate::error::{ModelError, Result};
use crate::nhwc::{view, Buffer, Map, Scratch as Buffers};
use crate::nn::Activation;

/// The weights the NHWC path needs beyond the model's own: the patch convolutions' weights
/// permuted to [cout, ky, kx, cin] (the order `im2col` gathers in) and packed for [`dense`], and the
/// blocks' depthwise weights tap-major.
#[derive(Debug)]
pub(super) struct NhwcWeights {
    stem: PackedWeight,
    /// One per stage with downsampling.
    downsample: Vec<Option<PackedWeight>>,
    /// Each block's depthwise weight, tap-major, per stage.
    dwconv: Vec<Vec<DepthwiseWeight>>,
}

impl NhwcWeights {
    /// `None` when the NHWC path does not apply: weights not on the CPU (or not f32 there), Linear
    /// layers on candle's product, GRN (ConvNeXt-V2) or an activation other than GELU. The patch
    /// convolutions run in bf16 when the Linear layers do, else in f32 (as the NCHW path's
    /// convolutions, [`crate::conv_lowp`]).
    pub(super) fn prepare(m: &ConvNeXt) -> Result<Option<Self>> {
        let linears = || {
            m.stages
                .iter()
                .flat_map(|s| &s.blocks)
                .flat_map(|b| [&b.fc1, &b.fc2])
        };
        let blocks_ok =
            m.stages.iter().flat_map(|s| &s.blocks).all(|b| {
                b.grn.is_none() && b.act == Activation::Gelu && is_cpu_f32(b.dwconv.weight())
            });
        if !blocks_ok || !is_cpu_f32(m.stem.weight()) || linears().any(|l| l.packed().is_none()) {
            return Ok(None);
        }
        let precision = match linears().next().and_then(|l| l.packed()) {
            Some((w, _)) if w.precision() == Precision::Bf16 => Precision::Bf16,
            _ => Precision::F32,
        };
        let pack = |c: &Conv| -> Result<PackedWeight> {
            let w = c.weight().permute((0, 2, 3, 1))?.contiguous()?;
            let (n, k) = (w.dim(0)?, w.elem_count() / w.dim(0)?.max(1));
            let packed = PackedWeight::pack(view(&w).data()?, n, k, precision);
            Ok(packed)
        };
        let dw = |c: &Conv| -> Result<DepthwiseWeight> {
            let (ch, _, kh, kw) = c.weight().dims4()?;
            Ok(DepthwiseWeight::pack(view(c.weight()).data()?, ch, kh * kw))
        };
        Ok(Some(Self {
            stem: pack(&m.stem)?,
            dwconv: m
                .stages
                .iter()
                .map(|s| s.blocks.iter().map(|b| dw(&b.dwconv)).collect())
                .collect::<Result<_>>()?,
            downsample: m
                .stages
                .iter()
                .map(|s| s.downsample.as_ref().map(|(_, c)| pack(c)).transpose())
                .collect::<Result<_>>()?,
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
fn patch_conv(
    x: &Map,
    k: usize,
    weight: &PackedWeight,
    bias: Option<&Tensor>,
    pool: &mut Buffers,
) -> Result<Map> {
    let (oh, ow) = (x.h / k, x.w / k);
    if oh == 0 || ow == 0 {
        return Err(ModelError::Input(format!(
            "a {}x{} map is smaller than the {k}x{k} patch convolution over it",
            x.h, x.w
        )));
    }
    let cout = weight.n();
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
    let bv = bias.map(view);
    let e = Epilogue {
        bias: bv.as_ref().map(|v| v.data()).transpose()?,
        ..Default::default()
    };
    let mut out = pool.take(m * cout);
    dense(&x.data, &shape, weight, e, &mut out);
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
    /// `x + fc2(gelu(fc1(norm(dwconv(x)))))` on NHWC rows, into `x` (`dw`: the depthwise weight
    /// prepared from `self.dwconv`).
    fn forward_nhwc(&self, x: &mut Map, dw: &DepthwiseWeight, s: &mut Scratch) -> Result<()> {
        let (m, c) = (x.rows(), x.c);
        let k = self.dwconv.weight().dim(2)?;
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
        let dw_b = self.dwconv.bias_tensor().map(view);
        s.dw.resize(m * c);
        let e = Epilogue {
            bias: dw_b.as_ref().map(|v| v.data()).transpose()?,
            ..Default::default()
        };
        depthwise(&x.data, dw, &shape, e, &mut s.dw);
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
        let mut x = patch_conv(
            &input,
            self.patch,
            &w.stem,
            self.stem.bias_tensor(),
            &mut pool,
        )?;
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
            if let (Some((norm, conv)), Some(dw)) = (&stage.downsample, down) {
                normed(&mut x, norm)?;
                let y = patch_conv(&x, 2, dw, conv.bias_tensor(), &mut pool)?;
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
