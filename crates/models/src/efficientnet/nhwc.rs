//! EfficientNet on the CPU channels last ([`crate::nhwc`]): every convolution is an [`NhwcConv`]
//! (1x1 ones one GEMM over all pixels on weights packed at load, with the bias, the activation and
//! the block's residual in its epilogue; depthwise ones vectorised across channels; dense ones, the
//! stem's included, im2col + GEMM), and the squeeze-excitation pools and gates rows of C values.
//! The same network as the forward pass in `mod.rs`, only in another memory layout (the model keeps
//! its weights in this form alone); at larger batches the first stages run image by image so their
//! maps stay in the cache.

use candle_core::Tensor;
use visenc_kernels::conv::{Act, Pad};
use visenc_kernels::pool::sigmoid_gate_rows;

use super::{Block, ConvBnAct, Convs};
use crate::conv::{fused_act, Conv};
use crate::error::{ModelError, Result};
use crate::nhwc::{per_image, Map, NhwcConv, Scratch};
use crate::nn::Activation;

/// A convolution of the trunk with its activation.
#[derive(Debug)]
struct Step {
    conv: NhwcConv,
    act: Act,
}

impl Step {
    /// The zero padding `c` applies before its convolution.
    fn extra(c: &ConvBnAct) -> Pad {
        c.pad.map_or(Pad::default(), |p| Pad {
            top: p.top,
            bottom: p.bottom,
            left: p.left,
            right: p.right,
        })
    }

    /// Whether [`NhwcConv`] runs `c`.
    fn applies(c: &ConvBnAct) -> Result<bool> {
        NhwcConv::applies(&c.conv, Self::extra(c))
    }

    /// `c` prepared (checked with [`Self::applies`] first) and dropped.
    fn prepare(c: ConvBnAct) -> Result<Self> {
        let extra = Self::extra(&c);
        Self::of(c.conv, extra, c.act)
    }

    /// Dense convolutions run in the precision the model was loaded for (depthwise ones in f32).
    fn of(conv: Conv, extra: Pad, act: Option<Activation>) -> Result<Self> {
        let conv = NhwcConv::prepare(&conv, extra, conv.precision())?
            .ok_or_else(|| ModelError::Input("a checked convolution was refused".into()))?;
        Ok(Self {
            conv,
            act: fused_act(act),
        })
    }

    fn forward(&self, x: &Map, residual: Option<&[f32]>, s: &mut Scratch) -> Result<Map> {
        self.conv.forward(x, residual, self.act, s)
    }
}

#[derive(Debug)]
struct NhwcBlock {
    steps: Vec<Step>,
    /// Squeeze-excitation's reduce (activated) and expand, over one row per image.
    se: Option<(Step, Step)>,
    project: Option<Step>,
    residual: bool,
}

/// The prepared convolutions of the channels-last path.
#[derive(Debug)]
pub(super) struct NhwcWeights {
    stem: Step,
    stages: Vec<Vec<NhwcBlock>>,
    head: Step,
}

impl NhwcWeights {
    /// The channels-last form of `m`, or `m` back when the path does not apply (weights not f32
    /// on the CPU, a convolution [`NhwcConv`] does not run). Every convolution is checked first,
    /// then each is converted and dropped in turn, so the weights are never all held in both forms.
    pub(super) fn prepare(m: Convs) -> Result<std::result::Result<Self, Convs>> {
        if !applies(&m)? {
            return Ok(Err(m));
        }
        // Last first, as ResNet's (`resnet::nhwc`): the load peaks at the converted weights plus
        // the last one converted, the stem's.
        let head = Step::prepare(m.head)?;
        let mut stages = Vec::new();
        for stage in m.stages.into_iter().rev() {
            let mut blocks = stage
                .into_iter()
                .rev()
                .map(prepare_block)
                .collect::<Result<Vec<_>>>()?;
            blocks.reverse();
            stages.push(blocks);
        }
        stages.reverse();
        let stem = Step::prepare(m.stem)?;
        Ok(Ok(Self { stem, stages, head }))
    }
}

/// Whether [`NhwcConv`] runs every convolution of `m`.
fn applies(m: &Convs) -> Result<bool> {
    let blocks = m.stages.iter().flatten();
    let steps = blocks
        .clone()
        .flat_map(|b| b.convs.iter().chain(&b.project));
    for c in std::iter::once(&m.stem).chain(steps).chain([&m.head]) {
        if !Step::applies(c)? {
            return Ok(false);
        }
    }
    for se in blocks.flat_map(|b| &b.se) {
        for c in [&se.reduce, &se.expand] {
            if !NhwcConv::applies(c, Pad::default())? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn prepare_block(b: Block) -> Result<NhwcBlock> {
    let steps = b
        .convs
        .into_iter()
        .map(Step::prepare)
        .collect::<Result<_>>()?;
    let se =
        b.se.map(|se| -> Result<_> {
            Ok((
                Step::of(se.reduce, Pad::default(), Some(se.act))?,
                Step::of(se.expand, Pad::default(), None)?,
            ))
        })
        .transpose()?;
    Ok(NhwcBlock {
        steps,
        se,
        project: b.project.map(Step::prepare).transpose()?,
        residual: b.residual,
    })
}

impl NhwcBlock {
    fn forward(&self, x: Map, s: &mut Scratch) -> Result<Map> {
        let Some((last, first)) = self.steps.split_last() else {
            return Err(ModelError::Input(
                "an EfficientNet block without convolutions".into(),
            ));
        };
        let mut prev: Option<Map> = None;
        for step in first {
            let next = step.forward(prev.as_ref().unwrap_or(&x), None, s)?;
            if let Some(old) = prev.replace(next) {
                s.give(old.data);
            }
        }
        let input = prev.as_ref().unwrap_or(&x);
        // Squeeze-excitation pools the last convolution's output as that convolution stores it.
        let mut means = self
            .se
            .as_ref()
            .map(|_| vec![0f32; x.batch * last.conv.out_channels()]);
        let mut y = match means.as_mut() {
            Some(m) => last.conv.forward_and_mean(input, last.act, s, m)?,
            None => last.forward(input, None, s)?,
        };
        if let Some(old) = prev {
            s.give(old.data);
        }
        if let (Some((reduce, expand)), Some(means)) = (&self.se, means) {
            let pooled = Map {
                data: means.into(),
                batch: y.batch,
                h: 1,
                w: 1,
                c: y.c,
            };
            let g = expand.forward(&reduce.forward(&pooled, None, s)?, None, s)?;
            sigmoid_gate_rows(&mut y.data, y.h * y.w, y.c, &g.data);
        }
        let shape = |m: &Map| (m.h, m.w, m.c);
        let out = match &self.project {
            Some(p) => {
                let fits = self.residual && (y.h, y.w, p.conv.out_channels()) == shape(&x);
                let out = p.forward(&y, fits.then_some(&x.data[..]), s)?;
                s.give(y.data);
                out
            }
            None => {
                if self.residual && shape(&y) == shape(&x) {
                    y.data
                        .iter_mut()
                        .zip(x.data.iter())
                        .for_each(|(y, x)| *y += x);
                }
                y
            }
        };
        if self.residual && shape(&out) != shape(&x) {
            return Err(ModelError::Input(format!(
                "a residual block changed its map from {:?} to {:?}",
                shape(&x),
                shape(&out)
            )));
        }
        s.give(x.data);
        Ok(out)
    }
}

/// A stage runs image by image when its widest map for the whole batch would take more than a
/// quarter of the L3 cache: at batch 8 EfficientNet-B0's first stages expand to 20-38 MiB, past the
/// 32 MiB L3 of the EPYC where this was measured, so the depthwise convolution and the projection
/// would read back from memory what the expansion has just written; one image's maps (2.4-4.8 MiB)
/// stay in the cache. (Its weights are small, so reading them once per image costs little.) Where
/// the L3 holds the batch's maps (the Xeon's 260 MiB) the whole batch runs each convolution: 1-3 %
/// faster there (session 14, alternating passes), with 8x fewer parallel regions.
fn stage_bytes() -> usize {
    visenc_kernels::cpu::l3_bytes().unwrap_or(32 << 20) / 4
}

impl NhwcWeights {
    /// The leading stages whose widest map for the whole batch takes more than `budget` bytes (from
    /// the stage's input size: an upper bound where its first block downsamples), image by image
    /// ([`per_image`]); the batch's map after them and how many ran.
    fn leading_stages_per_image(
        &self,
        x: Map,
        s: &mut Scratch,
        budget: usize,
    ) -> Result<(Map, usize)> {
        let batch = x.batch;
        per_image(
            &self.stages,
            x,
            s,
            |stage, m| {
                let c = stage.iter().flat_map(|b| &b.steps);
                let c = c.map(|st| st.conv.out_channels()).max().unwrap_or(0);
                batch * m.h * m.w * c * std::mem::size_of::<f32>() > budget
            },
            |stage, mut m, s| {
                for b in stage {
                    m = b.forward(m, s)?;
                }
                Ok(m)
            },
        )
    }
}

/// The trunk's outputs: the head's map (NCHW view) and, when asked, the stem's and each stage's
/// map (NCHW).
pub(super) struct Trunk {
    pub last: Tensor,
    /// The head's map averaged over its pixels, [batch, c] (read from the NHWC rows; `None` for an
    /// empty map).
    pub mean: Option<Tensor>,
    pub maps: Vec<Tensor>,
}

impl NhwcWeights {
    /// The stem, the stages and the head on NHWC rows, from NCHW pixels (f32 on the CPU).
    pub(super) fn trunk(&self, pixels: &Tensor, features: bool) -> Result<Trunk> {
        let mut s = Scratch::default();
        let input = Map::from_nchw(pixels, &mut s)?;
        let mut x = self.stem.forward(&input, None, &mut s)?;
        s.give(input.data);
        let mut maps = Vec::new();
        let mut first = 0;
        if features {
            maps.push(x.to_nchw()?.contiguous()?);
        } else {
            (x, first) = self.leading_stages_per_image(x, &mut s, stage_bytes())?;
        }
        for stage in &self.stages[first..] {
            for b in stage {
                x = b.forward(x, &mut s)?;
            }
            if features {
                maps.push(x.to_nchw()?.contiguous()?);
            }
        }
        let head = self.head.forward(&x, None, &mut s)?;
        let mean = (head.h * head.w > 0)
            .then(|| head.pixel_means())
            .transpose()?;
        // `last` is a copy: both buffers go back to the pool for the next forward pass.
        let last = head.to_nchw()?;
        s.give(x.data);
        s.give(head.data);
        Ok(Trunk { last, mean, maps })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Leading stages run image by image give the map the batched stages give, whatever the budget
    /// (0: every stage per image).
    #[test]
    fn leading_stages_per_image_match_batched() {
        let model = super::super::tests::timm_fixture("efficientnet_timm")
            .channels_last()
            .unwrap();
        let super::super::Path::ChannelsLast(w) = &model.path else {
            panic!("f32 on the CPU runs channels last");
        };
        let px = Tensor::randn(0f32, 1.0, (3, 3, 40, 36), &Device::Cpu).unwrap();
        let run = |budget: usize| {
            let mut s = Scratch::default();
            let input = Map::from_nchw(&px, &mut s).unwrap();
            let x = w.stem.forward(&input, None, &mut s).unwrap();
            let (mut x, first) = w.leading_stages_per_image(x, &mut s, budget).unwrap();
            for stage in &w.stages[first..] {
                for b in stage {
                    x = b.forward(x, &mut s).unwrap();
                }
            }
            (first, x.batch, x.data.to_vec())
        };
        let (all, b_all, per_image) = run(0);
        let (none, b_none, batched) = run(usize::MAX);
        assert_eq!((all, none), (w.stages.len(), 0), "stages run per image");
        assert_eq!((b_all, b_none), (3, 3), "batch");
        let max = batched.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = per_image
            .iter()
            .zip(&batched)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-5 * max,
            "per image differs by {diff} (max {max})"
        );
    }
}
