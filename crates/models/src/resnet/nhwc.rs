//! ResNet's trunk on the CPU, channels last: every map is rows of C values per pixel, so a 1x1
//! stride-1 convolution is one GEMM straight over the rows, and every other convolution (the 7x7
//! stem, the 3x3 ones, the strided 1x1 shortcut) an NHWC im2col gather in blocks of rows, then the
//! same GEMM on weights packed once at load (f32 or bf16 products, [`NhwcConv`]), with the folded
//! BatchNorm's bias, the shortcut and the activation fused into its output. Max pooling runs along
//! the channels and global pooling reads the rows directly. The same network as the candle path in
//! `mod.rs`, only in another memory layout; chosen at load when every convolution qualifies.

use candle_core::Tensor;
use visenc_kernels::conv::{Act, Pad};
use visenc_kernels::pool::{max_pool_nhwc, MaxPool};
use visenc_kernels::Precision;

use super::{Convs, Features};
use crate::api::FeatureMap;
use crate::conv::{fused_act, Conv};
use crate::error::{ModelError, Result};
use crate::nhwc::{Map, NhwcConv, Scratch};
use crate::nn::Activation;

/// A residual block prepared for the NHWC path.
#[derive(Debug)]
struct NhwcBlock {
    convs: Vec<NhwcConv>,
    shortcut: Option<NhwcConv>,
}

/// The whole trunk's prepared convolutions.
#[derive(Debug)]
pub(super) struct NhwcWeights {
    stem: NhwcConv,
    stages: Vec<Vec<NhwcBlock>>,
    act: Act,
}

impl NhwcWeights {
    /// The channels-last form of `m`, or `m` back when the NHWC path does not apply: a convolution
    /// [`NhwcConv::prepare`] refuses (grouped ResNeXt ones, weights not f32 on the CPU). Every
    /// convolution is checked first, then each is converted and dropped in turn, so the weights are
    /// never all held in both forms. The products run in the precision the model was loaded for
    /// (f32, bf16 or int8: per-channel weights, activations per pixel).
    pub(super) fn prepare(
        m: Convs,
        act: Activation,
        precision: Precision,
    ) -> Result<std::result::Result<Self, Convs>> {
        let every = std::iter::once(&m.stem).chain(
            m.stages
                .iter()
                .flatten()
                .flat_map(|b| b.convs.iter().chain(&b.shortcut)),
        );
        for c in every {
            if !NhwcConv::applies(c, Pad::default())? {
                return Ok(Err(m));
            }
        }
        let prep = |c: Conv| {
            NhwcConv::prepare(&c, Pad::default(), precision)?
                .ok_or_else(|| ModelError::Input("a checked convolution was refused".into()))
        };
        // Last first: while a convolution is converted both its forms are held, so the load peaks
        // at the converted weights plus the last one converted, here the stem's (in the network's
        // order, a 3x3 of the last stage: 9 MiB for ResNet-50); the deep layers, converted first,
        // have the earlier ones' growth (Winograd's larger kernels) still to come under that peak.
        let mut stages = Vec::new();
        for stage in m.stages.into_iter().rev() {
            let mut blocks = Vec::new();
            for b in stage.into_iter().rev() {
                let shortcut = b.shortcut.map(prep).transpose()?;
                let mut convs = b
                    .convs
                    .into_iter()
                    .rev()
                    .map(prep)
                    .collect::<Result<Vec<_>>>()?;
                convs.reverse();
                blocks.push(NhwcBlock { convs, shortcut });
            }
            blocks.reverse();
            stages.push(blocks);
        }
        stages.reverse();
        let stem = prep(m.stem)?;
        let act = fused_act(Some(act));
        Ok(Ok(Self { stem, stages, act }))
    }
}

impl NhwcBlock {
    /// `act(convs(x) + shortcut(x))`, the activation after every convolution but the last fused
    /// into it, the sum and the last activation fused into the last one.
    fn forward(&self, x: Map, act: Act, s: &mut Scratch) -> Result<Map> {
        let shortcut = self
            .shortcut
            .as_ref()
            .map(|c| c.forward(&x, None, Act::None, s))
            .transpose()?;
        let mut y: Option<Map> = None;
        for (i, c) in self.convs.iter().enumerate() {
            let input = y.as_ref().unwrap_or(&x);
            let next = if i + 1 == self.convs.len() {
                let r = shortcut.as_ref().unwrap_or(&x);
                c.forward(input, Some(&r.data), act, s)?
            } else {
                c.forward(input, None, act, s)?
            };
            if let Some(done) = y.replace(next) {
                s.give(done.data);
            }
        }
        s.give(x.data);
        if let Some(sc) = shortcut {
            s.give(sc.data);
        }
        y.ok_or_else(|| ModelError::Input("a ResNet block without convolutions".into()))
    }
}

/// The trunk's outputs: the final map (NCHW view), the pooled vector, the requested feature maps.
pub(super) struct Trunk {
    pub last: Tensor,
    pub pooled: Tensor,
    pub maps: Vec<FeatureMap>,
}

impl NhwcWeights {
    /// Stem, max-pool, stages and global pooling on NHWC rows (`pixels` NCHW, f32 on the CPU);
    /// the feature maps where `features` asks for them (NCHW, as the candle path returns them).
    pub(super) fn trunk(&self, pixels: &Tensor, features: Option<Features>) -> Result<Trunk> {
        let mut s = Scratch::default();
        let input = Map::from_nchw(pixels, &mut s)?;
        let stem = self.stem.forward(&input, None, self.act, &mut s)?;
        s.give(input.data);
        let mut maps = Vec::new();
        if features == Some(Features::Timm) {
            maps.push(FeatureMap {
                reduction: 2,
                map: stem.to_nchw()?.contiguous()?,
            });
        }
        let p = MaxPool {
            k: 3,
            stride: 2,
            pad: 1,
        };
        let (oh, ow) = p.out_hw(stem.h, stem.w);
        let mut pooled = s.take(stem.batch * oh * ow * stem.c);
        max_pool_nhwc(
            &stem.data,
            stem.batch,
            stem.h,
            stem.w,
            stem.c,
            p,
            &mut pooled,
        );
        let mut x = Map {
            data: pooled,
            batch: stem.batch,
            h: oh,
            w: ow,
            c: stem.c,
        };
        s.give(stem.data);
        let mut reduction = 4;
        for (i, stage) in self.stages.iter().enumerate() {
            for b in stage {
                x = b.forward(x, self.act, &mut s)?;
            }
            if i > 0 {
                reduction *= 2;
            }
            if features.is_some() {
                maps.push(FeatureMap {
                    reduction,
                    map: x.to_nchw()?.contiguous()?,
                });
            }
        }
        let pooled = x.pixel_means()?;
        // `last` is a copy: the map's buffer goes back to the pool for the next forward pass.
        let last = x.to_nchw()?;
        s.give(x.data);
        Ok(Trunk { last, pooled, maps })
    }
}
