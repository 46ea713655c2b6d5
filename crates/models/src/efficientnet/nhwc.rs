//! EfficientNet's blocks on the CPU channels last: every 1x1 convolution (expansion, projection,
//! head, the squeeze-excitation's two) is one GEMM over all pixels on weights packed at load
//! ([`visenc_kernels::gemm`]), with the bias, the activation and the block's residual in its
//! epilogue; the depthwise convolutions run vectorised across channels; the squeeze-excitation
//! pools and gates rows of C values. The stem (a 3-channel convolution) stays channels first and
//! its output is transposed once. The same network as the forward pass in `mod.rs`, only in
//! another memory layout.

use candle_core::Tensor;
use visenc_kernels::conv::nhwc::depthwise;
use visenc_kernels::conv::{Act, ConvShape, Epilogue, Pad};
use visenc_kernels::gemm::{gemm, PackedWeight};
use visenc_kernels::pool::{mean_pixels, sigmoid_gate_rows};
use visenc_kernels::Precision;

use super::{Block, ConvBnAct, EfficientNet, SqueezeExcite};
use crate::conv::{cpu_f32, fused_act, is_cpu_f32, with_f32, Conv, Padding};
use crate::error::{ModelError, Result};

/// A 1x1 convolution packed for [`gemm`], with its activation.
#[derive(Debug)]
struct Pointwise {
    weight: PackedWeight,
    bias: Option<Vec<f32>>,
    act: Act,
}

impl Pointwise {
    /// `None` when `c` is not a pointwise f32 CPU convolution.
    fn prepare(c: &ConvBnAct) -> Result<Option<Self>> {
        Self::of(&c.conv, fused_act(c.act), c.pad.is_none())
    }

    fn of(conv: &Conv, act: Act, unpadded: bool) -> Result<Option<Self>> {
        if !unpadded || !conv.is_pointwise() || !is_cpu_f32(conv.weight()) {
            return Ok(None);
        }
        // Dense convolutions run in bf16 under bf16 and stay f32 otherwise (`crate::conv_lowp`).
        let precision = match conv.precision() {
            Precision::Bf16 => Precision::Bf16,
            _ => Precision::F32,
        };
        let (n, k) = (conv.out_channels(), conv.weight().dim(1)?);
        let weight = with_f32(conv.weight(), |w| PackedWeight::pack(w, n, k, precision))?;
        let bias = conv
            .bias_tensor()
            .map(|b| b.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        Ok(Some(Self { weight, bias, act }))
    }

    /// `act(x · Wᵀ + bias + residual)` over `m` pixel rows, into `out`.
    fn run(&self, x: &[f32], m: usize, residual: Option<&[f32]>, out: &mut Vec<f32>) {
        out.resize(m * self.weight.n(), 0.0);
        let e = Epilogue {
            bias: self.bias.as_deref(),
            residual,
            act: self.act,
        };
        gemm(x, m, &self.weight, e, out);
    }
}

/// One convolution of a block's sequence.
#[derive(Debug)]
enum Step {
    Pointwise(Pointwise),
    /// The block's convolution at this index is depthwise, with this fused activation.
    Depthwise(Act),
}

#[derive(Debug)]
struct NhwcBlock {
    steps: Vec<Step>,
    /// Squeeze-excitation's reduce (activated) and expand.
    se: Option<(Pointwise, Pointwise)>,
    project: Option<Pointwise>,
}

/// The packed weights of the channels-last path.
#[derive(Debug)]
pub(super) struct NhwcWeights {
    stages: Vec<Vec<NhwcBlock>>,
    head: Pointwise,
}

impl NhwcWeights {
    /// `None` when the path does not apply: weights not f32 on the CPU, or a convolution that is
    /// neither 1x1 nor depthwise (e.g. a fused-MBConv's 3x3).
    pub(super) fn prepare(m: &EfficientNet) -> Result<Option<Self>> {
        let mut stages = Vec::new();
        for stage in &m.stages {
            let mut blocks = Vec::new();
            for b in stage {
                match prepare_block(b)? {
                    Some(nb) => blocks.push(nb),
                    None => return Ok(None),
                }
            }
            stages.push(blocks);
        }
        Ok(Pointwise::prepare(&m.head)?.map(|head| Self { stages, head }))
    }
}

fn prepare_block(b: &Block) -> Result<Option<NhwcBlock>> {
    let mut steps = Vec::new();
    for c in &b.convs {
        let step = if c.conv.is_depthwise() && is_cpu_f32(c.conv.weight()) {
            Some(Step::Depthwise(fused_act(c.act)))
        } else {
            Pointwise::prepare(c)?.map(Step::Pointwise)
        };
        match step {
            Some(s) => steps.push(s),
            None => return Ok(None),
        }
    }
    let se = match &b.se {
        Some(SqueezeExcite {
            reduce,
            expand,
            act,
        }) => match (
            Pointwise::of(reduce, act.epilogue(), true)?,
            Pointwise::of(expand, Act::None, true)?,
        ) {
            (Some(r), Some(e)) => Some((r, e)),
            _ => return Ok(None),
        },
        None => None,
    };
    let project = match &b.project {
        Some(p) => match Pointwise::prepare(p)? {
            Some(p) => Some(p),
            None => return Ok(None),
        },
        None => None,
    };
    Ok(Some(NhwcBlock { steps, se, project }))
}

/// An NHWC map: `data` holds [batch, h, w, c].
#[derive(Clone)]
struct Map {
    data: Vec<f32>,
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl Map {
    fn rows(&self) -> usize {
        self.batch * self.h * self.w
    }

    /// The map as an NCHW tensor (a strided view).
    fn to_nchw(&self) -> Result<Tensor> {
        let t = Tensor::from_slice(
            &self.data,
            (self.batch, self.h, self.w, self.c),
            &candle_core::Device::Cpu,
        )?;
        Ok(t.permute((0, 3, 1, 2))?)
    }
}

/// A depthwise convolution (`c`, with any explicit zero padding before it) on an NHWC map.
fn depthwise_conv(x: &Map, c: &ConvBnAct, act: Act, out: &mut Vec<f32>) -> Result<Map> {
    let (k, stride) = (c.conv.weight().dim(2)?, c.conv.stride());
    let explicit = c.pad.map_or(Pad::default(), |p| Pad {
        top: p.top,
        bottom: p.bottom,
        left: p.left,
        right: p.right,
    });
    let (hp, wp) = (
        x.h + explicit.top + explicit.bottom,
        x.w + explicit.left + explicit.right,
    );
    let conv_pad = match c.conv.padding() {
        Padding::Symmetric(p) => Pad::same(p),
        Padding::TfSame => Pad::tf_same(hp, wp, k, k, stride),
    };
    let shape = ConvShape {
        batch: x.batch,
        cin: x.c,
        h: x.h,
        w: x.w,
        cout: x.c,
        kh: k,
        kw: k,
        stride,
        pad: Pad {
            top: explicit.top + conv_pad.top,
            bottom: explicit.bottom + conv_pad.bottom,
            left: explicit.left + conv_pad.left,
            right: explicit.right + conv_pad.right,
        },
        depthwise: true,
    };
    let (oh, ow) = shape.out_hw();
    if oh == 0 || ow == 0 {
        return Err(ModelError::Input(format!(
            "a {}x{} map is smaller than the {k}x{k} convolution over it",
            x.h, x.w
        )));
    }
    let (w, b) = (
        c.conv.weight().storage_and_layout(),
        c.conv.bias_tensor().map(Tensor::storage_and_layout),
    );
    let e = Epilogue {
        bias: b.as_ref().map(|(s, l)| cpu_f32(s, l)).transpose()?,
        residual: None,
        act,
    };
    out.resize(x.batch * oh * ow * x.c, 0.0);
    depthwise(&x.data, cpu_f32(&w.0, w.1)?, &shape, e, out);
    Ok(Map {
        data: std::mem::take(out),
        batch: x.batch,
        h: oh,
        w: ow,
        c: x.c,
    })
}

impl NhwcBlock {
    fn forward(&self, b: &Block, x: Map, scratch: &mut Vec<f32>) -> Result<Map> {
        let mut y = None::<Map>;
        for (step, c) in self.steps.iter().zip(&b.convs) {
            let input = y.as_ref().unwrap_or(&x);
            y = Some(match step {
                Step::Pointwise(p) => {
                    p.run(&input.data, input.rows(), None, scratch);
                    Map {
                        data: std::mem::take(scratch),
                        c: p.weight.n(),
                        ..*input
                    }
                }
                Step::Depthwise(act) => depthwise_conv(input, c, *act, scratch)?,
            });
        }
        let mut y = y.unwrap_or_else(|| x.clone());
        if let Some((reduce, expand)) = &self.se {
            let mut pooled = vec![0f32; y.batch * y.c];
            mean_pixels(&y.data, y.h * y.w, y.c, &mut pooled);
            let (mut s, mut g) = (Vec::new(), Vec::new());
            reduce.run(&pooled, y.batch, None, &mut s);
            expand.run(&s, y.batch, None, &mut g);
            sigmoid_gate_rows(&mut y.data, y.h * y.w, y.c, &g);
        }
        let out_c = self.project.as_ref().map_or(y.c, |p| p.weight.n());
        let residual = b.residual && (y.h, y.w, out_c) == (x.h, x.w, x.c);
        if b.residual && !residual {
            return Err(ModelError::Input(format!(
                "a residual block changed its map from {}x{}x{} to {}x{}x{out_c}",
                x.h, x.w, x.c, y.h, y.w
            )));
        }
        Ok(match &self.project {
            Some(p) => {
                p.run(&y.data, y.rows(), residual.then_some(&x.data[..]), scratch);
                let out = Map {
                    data: std::mem::take(scratch),
                    c: p.weight.n(),
                    ..y
                };
                *scratch = y.data;
                out
            }
            None => {
                if residual {
                    y.data.iter_mut().zip(&x.data).for_each(|(y, x)| *y += x);
                }
                y
            }
        })
    }
}

/// The trunk's outputs: the head's map (NCHW view) and the stage maps that taps asked for.
pub(super) struct Trunk {
    pub last: Tensor,
    /// `(stage, NCHW map)` after each stage (when features are requested).
    pub stage_maps: Vec<(usize, Tensor)>,
}

impl EfficientNet {
    /// The stages and the head on NHWC rows, from the stem's NCHW output (f32 on the CPU).
    pub(super) fn trunk_nhwc(
        &self,
        w: &NhwcWeights,
        stem: &Tensor,
        features: bool,
    ) -> Result<Trunk> {
        let (batch, c, h, wd) = stem.dims4()?;
        let nhwc = stem.permute((0, 2, 3, 1))?.contiguous()?;
        let mut x = Map {
            data: with_f32(&nhwc, <[f32]>::to_vec)?,
            batch,
            h,
            w: wd,
            c,
        };
        let mut scratch = Vec::new();
        let mut stage_maps = Vec::new();
        for (i, (stage, nstage)) in self.stages.iter().zip(&w.stages).enumerate() {
            for (b, nb) in stage.iter().zip(nstage) {
                x = nb.forward(b, x, &mut scratch)?;
            }
            if features {
                stage_maps.push((i, x.to_nchw()?.contiguous()?));
            }
        }
        let mut out = Vec::new();
        w.head.run(&x.data, x.rows(), None, &mut out);
        let head = Map {
            data: out,
            c: w.head.weight.n(),
            ..x
        };
        Ok(Trunk {
            last: head.to_nchw()?,
            stage_maps,
        })
    }
}
