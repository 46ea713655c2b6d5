//! MaxViT building blocks: the MBConv block, block/grid partition attention with a relative
//! position bias, and the MaxViT block that chains them.

use candle_core::{Module, Tensor};
use visenc_weights::Scope;

use super::config::{make_divisible, Activations, Config, ConvCfg, TransformerCfg};
use crate::conv::{global_avg_pool, pad_same, Conv, ConvSpec, Padding};
use crate::error::{config_err, ModelError, Result};
use crate::nn::{layer_norm, linear, Activation, Mlp};

/// Padding of `create_conv2d(.., padding)`: TF "SAME" for `'same'`, else PyTorch's
/// `((stride - 1) + (k - 1)) // 2` on every side.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/layers/padding.py#L15
pub(super) fn conv_padding(same: bool, k: usize, stride: usize) -> Padding {
    if same {
        Padding::TfSame
    } else {
        Padding::Symmetric((stride - 1 + k - 1) / 2)
    }
}

/// A BatchNorm2d in eval mode that does not follow a convolution (MBConv `pre_norm`), as a
/// per-channel scale and shift.
struct BatchNorm {
    scale: Tensor,
    shift: Tensor,
}

impl BatchNorm {
    fn load(s: &Scope, c: usize, eps: f64) -> Result<Self> {
        let (gamma, beta) = (s.get(c, "weight")?, s.get(c, "bias")?);
        let (mean, var) = (s.get(c, "running_mean")?, s.get(c, "running_var")?);
        s.ignore("num_batches_tracked");
        let scale = (gamma / (var + eps)?.sqrt()?)?;
        let shift = (beta - (mean * &scale)?)?;
        Ok(Self {
            scale: scale.reshape((1, c, 1, 1))?,
            shift: shift.reshape((1, c, 1, 1))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)?)
    }
}

/// timm `Downsample2d(pool_type='avg2')`: 2x2 average pooling with stride 2 (`AvgPool2dSame`, zeros
/// counted, when the checkpoint pads TF-style), then a 1x1 convolution when the width changes.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L340
struct Downsample {
    same: bool,
    expand: Option<Conv>,
}

impl Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.same {
            pad_same(x, 2, 2, 1)?
        } else {
            x.clone()
        };
        let x = x.avg_pool2d(2)?;
        match &self.expand {
            Some(c) => c.forward(&x),
            None => Ok(x),
        }
    }
}

/// Squeeze-and-excitation (`SEModule`): channel gates from the spatial mean.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/layers/squeeze_excite.py#L21
struct SqueezeExcite {
    fc1: crate::linear::Linear,
    fc2: crate::linear::Linear,
    act: Activation,
}

impl SqueezeExcite {
    fn load(s: &Scope, c: usize, rd: usize, act: Activation) -> Result<Self> {
        // 1x1 convolutions on a 1x1 map, run as linear layers.
        let fc = |name: &str, cin: usize, cout: usize| -> Result<crate::linear::Linear> {
            let s = s.pp(name);
            let w = s.get((cout, cin, 1, 1), "weight")?.reshape((cout, cin))?;
            crate::linear::Linear::load(&s, w, Some(s.get(cout, "bias")?))
        };
        Ok(Self {
            fc1: fc("fc1", c, rd)?,
            fc2: fc("fc2", rd, c)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        let g = self.act.forward(&self.fc1.forward(&global_avg_pool(x)?)?)?;
        let g = candle_nn::ops::sigmoid(&self.fc2.forward(&g)?)?;
        Ok(x.broadcast_mul(&g.reshape((b, c, 1, 1))?)?)
    }
}

/// Pre-norm MBConv: BN -> 1x1 expand (BN, act) -> kxk depthwise with the stride (BN, act) -> SE ->
/// 1x1 project, plus the (downsampled) shortcut.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L546
struct MbConv {
    shortcut: Option<Downsample>,
    pre_norm: BatchNorm,
    conv1: Conv,
    conv2: Conv,
    se: SqueezeExcite,
    conv3: Conv,
    act: Activation,
}

impl MbConv {
    fn load(
        s: &Scope,
        cin: usize,
        cout: usize,
        stride: usize,
        c: &ConvCfg,
        acts: Activations,
    ) -> Result<Self> {
        let (eps, same) = (c.eps(), c.same());
        let mid = make_divisible(
            (if c.expand_output { cout } else { cin }) as f64 * c.expand_ratio,
            8,
            0.9,
        );
        let groups = match c.group_size {
            None | Some(0) => 1,
            Some(g) if mid.is_multiple_of(g) => mid / g,
            Some(g) => {
                return Err(config_err(
                    "conv_group_size",
                    format!("{g} does not divide {mid} channels"),
                ))
            }
        };
        let shortcut = (stride == 2)
            .then(|| -> Result<Downsample> {
                let expand = (cin != cout)
                    .then(|| {
                        Conv::load(
                            s,
                            "shortcut.expand",
                            ConvSpec::new(cin, cout, 1, 1).bias(c.output_bias),
                        )
                    })
                    .transpose()?;
                Ok(Downsample { same, expand })
            })
            .transpose()?;
        let rd = match (c.attn_ratio * (if c.expand_output { cout } else { mid }) as f64) as usize {
            0 => make_divisible(mid as f64 / 16.0, 8, 0.0),
            rd => rd,
        };
        let k = c.kernel_size;
        let spec2 = ConvSpec::new(mid, mid, k, stride)
            .groups(groups)
            .padding(conv_padding(same, k, stride));
        Ok(Self {
            shortcut,
            pre_norm: BatchNorm::load(&s.pp("pre_norm"), cin, eps)?,
            conv1: Conv::load(s, "conv1_1x1", ConvSpec::new(cin, mid, 1, 1))?
                .fold_bn(s, "norm1", eps)?,
            conv2: Conv::load(s, "conv2_kxk", spec2)?.fold_bn(s, "norm2", eps)?,
            se: SqueezeExcite::load(&s.pp("se"), mid, rd, acts.se)?,
            conv3: Conv::load(
                s,
                "conv3_1x1",
                ConvSpec::new(mid, cout, 1, 1).bias(c.output_bias),
            )?,
            act: acts.conv,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.shortcut {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        let y = self
            .act
            .forward(&self.conv1.forward(&self.pre_norm.forward(x)?)?)?;
        let y = self.act.forward(&self.conv2.forward(&y)?)?;
        let y = self.conv3.forward(&self.se.forward(&y)?)?;
        Ok((y + shortcut)?)
    }
}

/// How the relative position bias table is indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelPos {
    /// `RelPosBias` (Swin): table [(2h-1)(2w-1), heads] indexed by query minus key.
    Swin,
    /// `RelPosBiasTf`: table [heads, 2h-1, 2w-1] indexed by key minus query.
    Tf,
}

/// The additive attention bias of one partition of `ph x pw` tokens: [heads, N, N], N = ph * pw.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/layers/pos_embed_rel.py#L22 (gen_relative_position_index)
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/layers/pos_embed_rel.py#L550 (generate_lookup_tensor)
fn rel_pos_bias(s: &Scope, kind: RelPos, heads: usize, (ph, pw): (usize, usize)) -> Result<Tensor> {
    let (vh, vw, n) = (2 * ph - 1, 2 * pw - 1, ph * pw);
    let table = match kind {
        RelPos::Swin => s
            .get((vh * vw, heads), "relative_position_bias_table")?
            .t()?
            .contiguous()?,
        RelPos::Tf => s
            .get((heads, vh, vw), "relative_position_bias_table")?
            .reshape((heads, vh * vw))?,
    };
    let mut index = Vec::with_capacity(n * n);
    for (i, j) in (0..n).map(|q| (q / pw, q % pw)) {
        for (x, y) in (0..n).map(|k| (k / pw, k % pw)) {
            let (dy, dx) = match kind {
                RelPos::Swin => (i + ph - 1 - x, j + pw - 1 - y),
                RelPos::Tf => (x + ph - 1 - i, y + pw - 1 - j),
            };
            index.push((dy * vw + dx) as u32);
        }
    }
    let index = Tensor::from_vec(index, n * n, s.device())?;
    Ok(table.index_select(&index, 1)?.reshape((heads, n, n))?)
}

/// Channels-last multi-head attention over the tokens of each partition (`AttentionCl`).
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L255
struct Attention {
    /// Rows ordered [q | k | v], each [heads x dim_head] (the `head_first=False` layout; `head_first`
    /// checkpoints, [heads x (q | k | v) x dim_head], are reordered at load time).
    qkv: crate::linear::Linear,
    proj: crate::linear::Linear,
    heads: usize,
    rel_bias: Tensor,
}

impl Attention {
    fn load(s: &Scope, dim: usize, t: &TransformerCfg, partition: (usize, usize)) -> Result<Self> {
        let dh = t.dim_head;
        if dh == 0 || !dim.is_multiple_of(dh) {
            return Err(config_err(
                "transformer_dim_head",
                format!("{dh} does not divide width {dim}"),
            ));
        }
        let heads = dim / dh;
        let qs = s.pp("qkv");
        let mut w = qs.get((3 * dim, dim), "weight")?;
        let mut b = t.attn_bias.then(|| qs.get(3 * dim, "bias")).transpose()?;
        if t.head_first {
            w = w
                .reshape((heads, 3, dh, dim))?
                .transpose(0, 1)?
                .reshape((3 * dim, dim))?;
            b = b
                .map(|b| b.reshape((heads, 3, dh))?.transpose(0, 1)?.reshape(3 * dim))
                .transpose()?;
        }
        let kind = if t.rel_pos_type == "bias_tf" {
            RelPos::Tf
        } else {
            RelPos::Swin
        };
        Ok(Self {
            qkv: crate::linear::Linear::load(s, w, b)?,
            proj: linear(s, "proj", dim, dim, t.attn_bias)?,
            heads,
            rel_bias: rel_pos_bias(&s.pp("rel_pos"), kind, heads, partition)?,
        })
    }

    /// `x`: [partitions, N, C].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (p, n, c) = x.dims3()?;
        let dh = c / self.heads;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((p, n, 3, self.heads, dh))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * (dh as f64).powf(-0.5))?;
        let (k, v) = (qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let att = q.matmul(&k.t()?)?.broadcast_add(&self.rel_bias)?;
        let y = candle_nn::ops::softmax_last_dim(&att)?.matmul(&v)?;
        self.proj.forward(&y.transpose(1, 2)?.reshape((p, n, c))?)
    }
}

/// `x + attn(norm1(x))` over block or grid partitions, then `x + mlp(norm2(x))`, channels last,
/// with optional LayerScale.
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L812
struct PartitionAttention {
    grid: bool,
    size: (usize, usize),
    norm1: crate::nn::LayerNorm,
    attn: Attention,
    ls1: Option<Tensor>,
    norm2: crate::nn::LayerNorm,
    mlp: Mlp,
    ls2: Option<Tensor>,
}

impl PartitionAttention {
    fn load(
        s: &Scope,
        dim: usize,
        grid: bool,
        size: (usize, usize),
        t: &TransformerCfg,
        act: Activation,
    ) -> Result<Self> {
        let ls = |name: &str| {
            t.init_values
                .map(|_| s.get(dim, &format!("{name}.gamma")))
                .transpose()
        };
        let hidden = (dim as f64 * t.expand_ratio) as usize;
        Ok(Self {
            grid,
            size,
            norm1: layer_norm(s, "norm1", dim, t.norm_eps)?,
            attn: Attention::load(&s.pp("attn"), dim, t, size)?,
            ls1: ls("ls1")?,
            norm2: layer_norm(s, "norm2", dim, t.norm_eps)?,
            mlp: Mlp::load(s, "mlp.fc1", "mlp.fc2", dim, hidden, act)?,
            ls2: ls("ls2")?,
        })
    }

    /// `window_partition` / `grid_partition`: [B, H, W, C] -> [B * partitions, ph * pw, C].
    // Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L760
    fn partition(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (ph, pw) = self.size;
        let (nh, nw) = (h / ph, w / pw);
        let x = if self.grid {
            x.reshape((b, ph, nh, pw, nw, c))?
                .permute((0, 2, 4, 1, 3, 5))?
        } else {
            x.reshape((b, nh, ph, nw, pw, c))?
                .permute((0, 1, 3, 2, 4, 5))?
        };
        Ok(x.contiguous()?.reshape((b * nh * nw, ph * pw, c))?)
    }

    /// `window_reverse` / `grid_reverse`.
    fn reverse(&self, x: &Tensor, (b, h, w): (usize, usize, usize)) -> Result<Tensor> {
        let (ph, pw) = self.size;
        let c = x.dim(2)?;
        let x = x.reshape((b, h / ph, w / pw, ph, pw, c))?;
        let x = if self.grid {
            x.permute((0, 3, 1, 4, 2, 5))?
        } else {
            x.permute((0, 1, 3, 2, 4, 5))?
        };
        Ok(x.contiguous()?.reshape((b, h, w, c))?)
    }

    /// `x`: [B, H, W, C].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (ph, pw) = self.size;
        if h % ph != 0 || w % pw != 0 {
            let kind = if self.grid { "grid" } else { "window" };
            return Err(ModelError::Input(format!(
                "a {h}x{w} MaxViT feature map does not divide into the {ph}x{pw} {kind} partitions this \
                 checkpoint was built with (use its trained input size)"
            )));
        }
        let scale = |y: Tensor, g: &Option<Tensor>| -> Result<Tensor> {
            Ok(match g {
                Some(g) => y.broadcast_mul(g)?,
                None => y,
            })
        };
        let y = self.reverse(
            &self
                .attn
                .forward(&self.partition(&self.norm1.forward(x)?)?)?,
            (b, h, w),
        )?;
        let x = (x + scale(y, &self.ls1)?)?.reshape((b, h * w, c))?;
        let y = self.mlp.forward(&self.norm2.forward(&x)?)?;
        Ok((&x + scale(y, &self.ls2)?)?.reshape((b, h, w, c))?)
    }
}

/// MaxViT block: MBConv (NCHW), then block and grid attention (NHWC).
// Reference: https://github.com/huggingface/pytorch-image-models/blob/v1.0.31/timm/models/maxxvit.py#L1119
pub(super) struct Block {
    conv: MbConv,
    attn_block: Option<PartitionAttention>,
    attn_grid: PartitionAttention,
}

impl Block {
    /// Loads one `stages.{i}.blocks.{j}`.
    pub fn load(s: &Scope, cin: usize, cout: usize, stride: usize, cfg: &Config) -> Result<Self> {
        let attn = |name: &str, is_grid: bool, size| {
            PartitionAttention::load(&s.pp(name), cout, is_grid, size, &cfg.t, cfg.acts.mlp)
        };
        Ok(Self {
            conv: MbConv::load(&s.pp("conv"), cin, cout, stride, &cfg.c, cfg.acts)?,
            attn_block: (!cfg.t.no_block_attn)
                .then(|| attn("attn_block", false, cfg.window))
                .transpose()?,
            attn_grid: attn("attn_grid", true, cfg.grid)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.conv.forward(x)?.permute((0, 2, 3, 1))?.contiguous()?;
        if let Some(a) = &self.attn_block {
            y = a.forward(&y)?;
        }
        Ok(self
            .attn_grid
            .forward(&y)?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }
}
