//! EfficientNet in three checkpoint layouts that share one runtime: timm (`conv_stem`, `blocks.S.B`,
//! `conv_head`, built from timm's block strings), transformers (`EfficientNetModel`,
//! `EfficientNetForImageClassification`) and the EfficientNet-Lite PyTorch port on PyPI
//! (`efficientnet_lite_pytorch`: `_conv_stem`, `_blocks.N`, `_fc`). Every BatchNorm is folded into the
//! convolution before it at load time; what differs between the layouts (padding, block order,
//! rounding, residual rules) is decided while loading, so the forward pass below is the same for all.

mod hf;
mod lite;
mod nhwc;
mod timm;

use candle_core::{DType, Device, Tensor, D};

use crate::api::{EncodeOptions, FeatureMap, ImageEncoder, ImageFeatures};
use crate::conv::{global_avg_pool, sigmoid_gate_planes, Conv};
use crate::error::{ModelError, Result};
use crate::nn::Activation;

pub use hf::load_hf;
pub use lite::{load_lite, ARCH_PREFIX as LITE_ARCH_PREFIX};
pub use timm::load_timm;

/// `int(v + divisor / 2) // divisor * divisor`, at least `min_value`, bumped by one divisor when that
/// rounds down by more than `1 - round_limit`: timm's `make_divisible`, transformers' `round_filters`
/// and the Lite port's `round_filters` are all this formula.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/layers/helpers.py#L55
pub(crate) fn make_divisible(v: f64, divisor: usize, min_value: usize, round_limit: f64) -> usize {
    let d = divisor as f64;
    let mut new_v = min_value.max(((v + d / 2.0).floor() as usize / divisor) * divisor);
    if (new_v as f64) < round_limit * v {
        new_v += divisor;
    }
    new_v
}

/// Explicit zero padding (left, right, top, bottom) before a convolution, for transformers'
/// `nn.ZeroPad2d` + `padding="valid"` convolutions.
#[derive(Debug, Clone, Copy)]
struct Pad {
    left: usize,
    right: usize,
    top: usize,
    bottom: usize,
}

/// A convolution with its BatchNorm folded in, optionally zero-padded first, optionally activated.
struct ConvBnAct {
    pad: Option<Pad>,
    conv: Conv,
    act: Option<Activation>,
}

impl ConvBnAct {
    /// `act(conv(pad(x)) + residual)`.
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        match self.pad {
            Some(p) => self.conv.forward_with(
                &x.pad_with_zeros(2, p.top, p.bottom)?
                    .pad_with_zeros(3, p.left, p.right)?,
                residual,
                self.act,
            ),
            None => self.conv.forward_with(x, residual, self.act),
        }
    }
}

/// Squeeze-and-excitation: spatial mean -> 1x1 reduce (+bias) -> act -> 1x1 expand (+bias) ->
/// sigmoid gate on the input.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/_efficientnet_blocks.py#L78
// Reference: https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/efficientnet/modeling_efficientnet.py#L213
struct SqueezeExcite {
    reduce: Conv,
    expand: Conv,
    act: Activation,
}

impl SqueezeExcite {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        let s = global_avg_pool(x)?.reshape((b, c, 1, 1))?;
        let s = self
            .expand
            .forward(&self.reduce.forward_with(&s, None, Some(self.act))?)?;
        sigmoid_gate_planes(x, &s)
    }
}

/// Every EfficientNet block is this sequence: activated convolutions (expansion / depthwise, or the
/// single conv of timm's `ConvBnAct`), squeeze-excite, a linear projection, and the residual.
struct Block {
    convs: Vec<ConvBnAct>,
    se: Option<SqueezeExcite>,
    project: Option<ConvBnAct>,
    residual: bool,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for c in &self.convs {
            y = c.forward(&y, None)?;
        }
        if let Some(se) = &self.se {
            y = se.forward(&y)?;
        }
        let residual = self.residual.then_some(x);
        Ok(match &self.project {
            // The projection adds the shortcut in its epilogue.
            Some(p) => p.forward(&y, residual)?,
            None if self.residual => (y + x)?,
            None => y,
        })
    }
}

/// How the last feature map becomes the pooled embedding.
#[derive(Debug, Clone, Copy)]
enum Pool {
    /// Mean over H x W (timm `avg`, `AdaptiveAvgPool2d(1)`).
    Mean,
    /// transformers' `nn.AvgPool2d(hidden_dim, ceil_mode=True)` / `nn.MaxPool2d(..)`: one window
    /// covering the whole map (the mean or max) as long as the map is no larger than `window`;
    /// beyond that the reference yields several windows and fails to reshape, so we refuse too.
    Window { window: usize, max: bool },
}

/// Where a multi-scale feature map is taken.
#[derive(Debug, Clone, Copy)]
struct Tap {
    /// `None`: the stem output; `Some(i)`: the output of stage `i`.
    stage: Option<usize>,
    reduction: usize,
}

pub struct EfficientNet {
    path: Path,
    pool: Pool,
    classifier: Option<crate::linear::Linear>,
    taps: Vec<Tap>,
}

/// The trunk's convolutions, in the one form its forward pass uses ([`nhwc`] for channels last).
type Path = crate::nhwc::Form<Convs, nhwc::NhwcWeights>;

/// The convolutions as loaded (BatchNorm folded).
struct Convs {
    stem: ConvBnAct,
    stages: Vec<Vec<Block>>,
    /// The 1x1 head convolution + BN + act (timm `conv_head`/`bn2`, HF `top_conv`/`top_bn`).
    head: ConvBnAct,
}

impl EfficientNet {
    /// The model on candle's channels-first convolutions (see [`Self::channels_last`]).
    fn new(
        stem: ConvBnAct,
        stages: Vec<Vec<Block>>,
        head: ConvBnAct,
        pool: Pool,
        classifier: Option<crate::linear::Linear>,
        taps: Vec<Tap>,
    ) -> Self {
        Self {
            path: Path::Candle(Convs { stem, stages, head }),
            pool,
            classifier,
            taps,
        }
    }

    /// The model on the channels-last path where every convolution qualifies (f32 weights on the
    /// CPU; each channels-first convolution dropped once converted), else as it is.
    fn channels_last(self) -> Result<Self> {
        let path = self.path.channels_last(nhwc::NhwcWeights::prepare)?;
        Ok(Self { path, ..self })
    }
}

impl ImageEncoder for EfficientNet {
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        opts.refuse_layers("EfficientNet")?;
        let mut maps = Vec::new();
        let mut tap = |stage: Option<usize>, x: &Tensor| {
            if opts.features {
                for t in self.taps.iter().filter(|t| t.stage == stage) {
                    maps.push(FeatureMap {
                        reduction: t.reduction,
                        map: x.clone(),
                    });
                }
            }
        };
        // The channels-last trunk also averages its last map (no pass over the NCHW view).
        let (x, mean) = match &self.path {
            Path::ChannelsLast(w) => {
                // The weights are f32 or quantised on the CPU: pixels come there as f32.
                let px = pixels.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                let trunk = w.trunk(&px, opts.features && !self.taps.is_empty())?;
                for (i, map) in trunk.maps.iter().enumerate() {
                    tap(i.checked_sub(1), map);
                }
                (trunk.last, trunk.mean)
            }
            Path::Candle(c) => {
                let stem = c.stem.forward(pixels, None)?;
                tap(None, &stem);
                let mut x = stem;
                for (i, stage) in c.stages.iter().enumerate() {
                    for b in stage {
                        x = b.forward(&x)?;
                    }
                    tap(Some(i), &x);
                }
                (c.head.forward(&x, None)?, None)
            }
        };
        let (h, w) = (x.dim(2)?, x.dim(3)?);
        let average = |mean: Option<Tensor>| mean.map_or_else(|| global_avg_pool(&x), Ok);
        let pooled = match self.pool {
            Pool::Mean => average(mean)?,
            Pool::Window { window, max } => {
                if h > window || w > window {
                    return Err(ModelError::Input(format!(
                        "the final {h}x{w} feature map is larger than the {window}x{window} pooling window \
                         (config `hidden_dim`); the reference cannot pool it to one vector either"
                    )));
                }
                if max {
                    x.max(D::Minus1)?.max(D::Minus1)?
                } else {
                    average(mean)?
                }
            }
        };
        let logits = self
            .classifier
            .as_ref()
            .map(|c| c.forward(&pooled))
            .transpose()?;
        ImageFeatures::from_map(pooled, logits, &x, maps, opts)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::nhwc::tests::{assert_paths_agree, family_fixture};

    /// The timm fixture `name` (f32 on the CPU), on candle's channels-first convolutions.
    pub(super) fn timm_fixture(name: &str) -> EfficientNet {
        let (w, cfg, arch) = family_fixture(name);
        timm::build_timm(&arch, &cfg, &w).unwrap().0
    }

    /// The channels-last trunk and the candle NCHW path agree on the timm fixtures (expansion /
    /// depthwise / SE blocks and the dense 3x3 convolutions of `cn` and `er` blocks; symmetric and TF
    /// "SAME" padding) at odd sizes, feature maps included. The fixture tests check the NHWC path
    /// against the reference; this keeps the NCHW one checked and shows the NHWC one is taken.
    #[test]
    fn nhwc_and_nchw_paths_agree() {
        for name in ["efficientnet_timm", "efficientnet_timm_tf"] {
            let nchw = timm_fixture(name);
            let nhwc = timm_fixture(name).channels_last().unwrap();
            assert!(
                matches!(nhwc.path, Path::ChannelsLast(_)),
                "{name}: f32 on the CPU runs channels last"
            );
            // The stem's map and 4 stages' (timm's feature taps).
            assert_paths_agree(&nhwc, &nchw, &[(2, 47, 33), (1, 32, 32)], 5, name);
        }
    }

    #[test]
    fn make_divisible_matches_timm() {
        // Values checked against timm.layers.make_divisible.
        assert_eq!(make_divisible(32.0 * 1.1, 8, 8, 0.9), 32);
        assert_eq!(make_divisible(16.0 * 0.25, 8, 8, 0.0), 8);
        assert_eq!(make_divisible(1280.0 * 1.4, 8, 8, 0.9), 1792);
        assert_eq!(make_divisible(40.0 * 1.2, 8, 8, 0.9), 48);
        assert_eq!(make_divisible(24.0 * 1.4, 8, 8, 0.9), 32);
        // Rounding down by more than 10% is bumped back up one divisor.
        assert_eq!(make_divisible(11.0, 8, 8, 0.9), 16);
    }
}
