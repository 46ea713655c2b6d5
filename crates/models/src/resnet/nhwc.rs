//! ResNet's trunk on the CPU, channels last: every map is rows of C values per pixel, so a 1x1
//! stride-1 convolution is one GEMM straight over the rows, and every other convolution (the 7x7
//! stem, the 3x3 ones, the strided 1x1 shortcut) an NHWC im2col gather in blocks of rows, then the
//! same GEMM on weights packed once at load ([`gemm`], f32 or bf16 products), with the folded
//! BatchNorm's bias, the shortcut and the activation fused into its output. Max pooling runs along the channels and global pooling reads the rows directly. The same
//! network as the candle path in `mod.rs`, only in another memory layout; chosen at load when every
//! convolution qualifies.

use candle_core::Tensor;
use visenc_kernels::conv::nhwc::im2col;
use visenc_kernels::conv::{Act, ConvShape, Epilogue, Pad};
use visenc_kernels::gemm::{gemm, PackedWeight};
use visenc_kernels::pool::{max_pool_nhwc, mean_pixels, MaxPool};
use visenc_kernels::Precision;

use super::{Features, ResNet};
use crate::api::FeatureMap;
use crate::conv::{is_cpu_f32, kernel_act, Conv, Padding};
use crate::error::{ModelError, Result};
use crate::nhwc::Map;

/// im2col values gathered per GEMM call (16 MiB of f32): a 3x3 convolution over 64 channels
/// then runs ~7000 output pixels per call.
const COLS_BUDGET: usize = 4 << 20;

/// One convolution prepared for the NHWC path: its weight permuted to [cout, kh, kw, cin] (the
/// order [`im2col`] gathers in) and packed, and its bias (the folded BatchNorm's).
#[derive(Debug)]
struct NhwcConv {
    weight: PackedWeight,
    bias: Vec<f32>,
    cin: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl NhwcConv {
    /// `None` for what the path does not run: groups, TF "SAME" padding, non-square kernels,
    /// weights not f32 on the CPU.
    fn prepare(c: &Conv, precision: Precision) -> Result<Option<Self>> {
        let (stride, padding, groups) = c.geometry();
        let (cout, cin, kh, kw) = c.weight().dims4()?;
        let Padding::Symmetric(pad) = padding else {
            return Ok(None);
        };
        if groups != 1 || kh != kw || !is_cpu_f32(c.weight()) {
            return Ok(None);
        }
        let w: Vec<f32> = c.weight().permute((0, 2, 3, 1))?.flatten_all()?.to_vec1()?;
        let weight = PackedWeight::pack(&w, cout, kh * kw * cin, precision);
        let bias = match c.bias_tensor() {
            Some(b) => b.to_vec1()?,
            None => vec![0.0; cout],
        };
        Ok(Some(Self {
            weight,
            bias,
            cin,
            k: kh,
            stride,
            pad,
        }))
    }

    /// `act(conv(x) + bias + residual)` (the residual NHWC of the output's shape), into a buffer
    /// from `s`.
    fn forward(&self, x: &Map, residual: Option<&[f32]>, act: Act, s: &mut Scratch) -> Result<Map> {
        if x.c != self.cin {
            return Err(ModelError::Input(format!(
                "a convolution over {} input channels got a map with {}",
                self.cin, x.c
            )));
        }
        let shape = ConvShape {
            batch: x.batch,
            cin: x.c,
            h: x.h,
            w: x.w,
            cout: self.weight.n(),
            kh: self.k,
            kw: self.k,
            stride: self.stride,
            pad: Pad::same(self.pad),
            depthwise: false,
        };
        let (oh, ow) = shape.out_hw();
        if oh == 0 || ow == 0 {
            return Err(ModelError::Input(format!(
                "a {}x{} map is smaller than the {k}x{k} convolution over it",
                x.h,
                x.w,
                k = self.k
            )));
        }
        let (m, n) = (x.batch * oh * ow, self.weight.n());
        let mut out = s.take(m * n);
        let e = Epilogue {
            bias: Some(&self.bias),
            residual,
            act,
        };
        if self.k == 1 && self.stride == 1 && self.pad == 0 {
            gemm(&x.data, m, &self.weight, e, &mut out);
        } else {
            let row = self.k * self.k * x.c;
            let block = (COLS_BUDGET / row).max(1);
            for r0 in (0..m).step_by(block) {
                let rows = r0..(r0 + block).min(m);
                s.cols.resize(rows.len() * row, 0.0);
                im2col(&x.data, &shape, rows.clone(), &mut s.cols);
                let e = Epilogue {
                    residual: residual.map(|r| &r[rows.start * n..rows.end * n]),
                    ..e
                };
                let o = &mut out[rows.start * n..rows.end * n];
                gemm(&s.cols, rows.len(), &self.weight, e, o);
            }
        }
        Ok(Map {
            data: out,
            batch: x.batch,
            h: oh,
            w: ow,
            c: n,
        })
    }
}

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
    /// `None` when the NHWC path does not apply: an activation the kernels do not fuse, or a
    /// convolution [`NhwcConv::prepare`] refuses (grouped ResNeXt ones). The products run in bf16
    /// when the model is loaded for bf16, else in f32 (as the NCHW path's convolutions,
    /// [`crate::conv_lowp`]).
    pub(super) fn prepare(m: &ResNet, precision: Precision) -> Result<Option<Self>> {
        let Some(act) = kernel_act(m.act) else {
            return Ok(None);
        };
        let precision = match precision {
            Precision::Bf16 => Precision::Bf16,
            _ => Precision::F32,
        };
        let Some(stem) = NhwcConv::prepare(&m.stem, precision)? else {
            return Ok(None);
        };
        let mut stages = Vec::new();
        for stage in &m.stages {
            let mut blocks = Vec::new();
            for b in stage {
                let mut convs = Vec::new();
                for c in &b.convs {
                    let Some(c) = NhwcConv::prepare(c, precision)? else {
                        return Ok(None);
                    };
                    convs.push(c);
                }
                let shortcut = match &b.shortcut {
                    Some(c) => match NhwcConv::prepare(c, precision)? {
                        Some(c) => Some(c),
                        None => return Ok(None),
                    },
                    None => None,
                };
                blocks.push(NhwcBlock { convs, shortcut });
            }
            stages.push(blocks);
        }
        Ok(Some(Self { stem, stages, act }))
    }
}

/// Buffers reused across a forward pass: maps no longer needed and the im2col block.
#[derive(Default)]
struct Scratch {
    free: Vec<Vec<f32>>,
    cols: Vec<f32>,
}

impl Scratch {
    /// A buffer of `len` values (contents unspecified): the free one that already holds the
    /// fewest values at or above `len`, else the longest, so no value is re-zeroed once the
    /// buffers have grown.
    fn take(&mut self, len: usize) -> Vec<f32> {
        let fit = (0..self.free.len())
            .filter(|&i| self.free[i].len() >= len)
            .min_by_key(|&i| self.free[i].len())
            .or_else(|| (0..self.free.len()).max_by_key(|&i| self.free[i].len()));
        let mut v = fit.map(|i| self.free.swap_remove(i)).unwrap_or_default();
        v.truncate(len);
        v.resize(len, 0.0);
        v
    }

    fn give(&mut self, v: Vec<f32>) {
        self.free.push(v);
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
        let stem = self
            .stem
            .forward(&Map::from_nchw(pixels)?, None, self.act, &mut s)?;
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
        let mut pooled = vec![0f32; x.batch * x.c];
        mean_pixels(&x.data, x.h * x.w, x.c, &mut pooled);
        Ok(Trunk {
            last: x.to_nchw()?,
            pooled: Tensor::from_vec(pooled, (x.batch, x.c), pixels.device())?,
            maps,
        })
    }
}
