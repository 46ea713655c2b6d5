//! Building blocks shared by the transformer families: linear layers, norms, activations, attention
//! and the pre-norm transformer block. Key names are passed in by each family's table so weight paths
//! stay exactly the reference's state-dict keys.

use candle_core::{DType, Module, Tensor, D};
use visenc_kernels::Precision;
use visenc_weights::Scope;

use crate::error::{config_err, Result};
use crate::ops;

/// Loads `name.weight` [out, in] and, if `bias`, `name.bias` [out].
pub fn linear(
    s: &Scope,
    name: &str,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<crate::linear::Linear> {
    let s = s.pp(name);
    let w = s.get((out_dim, in_dim), "weight")?;
    let b = if bias {
        Some(s.get(out_dim, "bias")?)
    } else {
        None
    };
    crate::linear::Linear::load(&s, w, b)
}

/// A classifier head `name.{weight,bias}` from `in_dim` features to as many classes as the checkpoint
/// has, or `None` where the checkpoint has no such head (a bare backbone).
pub fn optional_classifier(
    s: &Scope,
    name: &str,
    in_dim: usize,
) -> Result<Option<crate::linear::Linear>> {
    s.pp(name)
        .shape_of("weight")
        .map(|shape| linear(s, name, in_dim, shape[0], true))
        .transpose()
}

/// Loads a LayerNorm `name.{weight,bias}` of width `dim`.
pub fn layer_norm(s: &Scope, name: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
    let s = s.pp(name);
    Ok(LayerNorm {
        weight: s.get(dim, "weight")?,
        bias: s.get(dim, "bias")?,
        eps,
    })
}

/// LayerNorm over the last dimension: visenc's kernel on CPU `f32`, candle's fused op elsewhere,
/// differentiable primitives when gradients are needed.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// (weight, bias, eps), for kernels that take them directly.
    pub fn parts(&self) -> (&Tensor, &Tensor, f64) {
        (&self.weight, &self.bias, self.eps)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match ops::layer_norm(x, &self.weight, &self.bias, self.eps)? {
            Some(y) => Ok(y),
            None if ops::tracked(&[x, &self.weight, &self.bias]) => {
                ops::layer_norm_differentiable(x, &self.weight, &self.bias, self.eps)
            }
            None => candle_nn::LayerNorm::new(self.weight.clone(), self.bias.clone(), self.eps)
                .forward(x),
        }
    }
}

/// Activation functions by their names in HF configs (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact GELU with erf (`nn.GELU()`).
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`, `gelu_new`), SigLIP.
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_new", rename = "gelu_tanh")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    /// `min(max(x, 0), 6)` (MobileNet, EfficientNet-Lite).
    #[serde(rename = "relu6")]
    Relu6,
    /// `x * sigmoid(x)` (EfficientNet).
    #[serde(alias = "swish", rename = "silu")]
    Silu,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(name.to_string()))
            .map_err(|_| config_err("hidden_act", format!("unsupported activation {name:?}")))
    }

    /// The activation as the kernels' epilogues (GEMM, convolution) apply it.
    pub fn epilogue(self) -> visenc_kernels::conv::Act {
        use visenc_kernels::conv::Act;
        match self {
            Self::QuickGelu => Act::QuickGelu,
            Self::Gelu => Act::Gelu,
            Self::GeluTanh => Act::GeluTanh,
            Self::Relu => Act::Relu,
            Self::Relu6 => Act::Relu6,
            Self::Silu => Act::Silu,
        }
    }

    /// The fused kernel for this activation, if there is one.
    fn kernel(self) -> Option<visenc_kernels::activation::Activation> {
        use visenc_kernels::activation::Activation as K;
        match self {
            Self::QuickGelu => Some(K::QuickGelu),
            Self::Gelu => Some(K::Gelu),
            Self::GeluTanh => Some(K::GeluTanh),
            Self::Silu => Some(K::Silu),
            Self::Relu | Self::Relu6 => None,
        }
    }

    /// `act(x)` into `x` itself when a kernel applies (the caller owns `x`: nothing else may share
    /// its storage), else into a new tensor.
    pub fn forward_owned(self, x: Tensor) -> Result<Tensor> {
        match self.kernel() {
            Some(k) if ops::activation_inplace(&x, k)? => Ok(x),
            _ => self.forward(&x),
        }
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        if let Some(k) = self.kernel() {
            if let Some(y) = ops::activation(x, k)? {
                return Ok(y);
            }
        }
        Ok(match self {
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Self::Gelu => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
            Self::Relu => x.relu()?,
            Self::Relu6 => x.clamp(0f32, 6f32)?,
            Self::Silu => x.silu()?,
        })
    }
}

/// Where the query/key/value projections live in a checkpoint.
#[derive(Debug, Clone, Copy)]
pub enum QkvKeys {
    /// Three linear modules (HF).
    Separate {
        q: &'static str,
        k: &'static str,
        v: &'static str,
    },
    /// One `[3D, D]` weight and `[3D]` bias (timm `attn.qkv.*`, `nn.MultiheadAttention.in_proj_*`).
    Fused {
        weight: &'static str,
        bias: &'static str,
    },
}

/// Key names of one pre-norm transformer block, relative to the block.
#[derive(Debug, Clone, Copy)]
pub struct BlockKeys {
    pub norm1: &'static str,
    pub qkv: QkvKeys,
    pub out: &'static str,
    pub norm2: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
    /// LayerScale vectors (DINOv2 `layer_scale1.lambda1`, timm `ls1.gamma`), when present.
    pub ls1: Option<&'static str>,
    pub ls2: Option<&'static str>,
}

/// Sizes and options of a transformer stack.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    pub dim: usize,
    pub heads: usize,
    pub mlp_dim: usize,
    pub eps: f64,
    pub act: Activation,
    pub qkv_bias: bool,
    pub layer_scale: bool,
}

impl BlockConfig {
    /// The block of the transformers CLIP/SigLIP encoders: biased q/k/v, no LayerScale, the
    /// activation named by `hidden_act`.
    pub fn hf(dim: usize, mlp_dim: usize, heads: usize, eps: f64, act: &str) -> Result<Self> {
        Ok(Self {
            dim,
            heads,
            mlp_dim,
            eps,
            act: Activation::from_name(act)?,
            qkv_bias: true,
            layer_scale: false,
        })
    }
}

/// Multi-head attention: the query projection and the key and value projections fused into one
/// `[2D, D]` linear layer (concatenated at load from separate checkpoints, split from a fused
/// `[3D, D]` one), so one GEMM makes `[B, M, 2, H, d]` and the attention kernel reads q, k and v in
/// place.
pub struct Attention {
    /// The query projection and the key and value projections side by side ([2D, D]): a last
    /// block that needs the class token alone projects its query only (the keys and values still
    /// come from every token), and cross-attention projects each side once.
    q: crate::linear::Linear,
    kv: crate::linear::Linear,
    out: crate::linear::Linear,
    heads: usize,
}

impl Attention {
    pub fn load(
        s: &Scope,
        qkv: QkvKeys,
        out: &str,
        dim: usize,
        heads: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            return Err(config_err(
                "num_attention_heads",
                format!("{heads} heads do not divide width {dim}"),
            ));
        }
        // (query weight [D, D], key and value weights [2D, D]) and their biases.
        let ((wq, wkv), b) = match qkv {
            QkvKeys::Separate { q, k, v } => {
                let get = |name: &str, shape: &[usize], what: &str| s.pp(name).get(shape, what);
                let w = (
                    get(q, &[dim, dim], "weight")?,
                    Tensor::cat(
                        &[
                            get(k, &[dim, dim], "weight")?,
                            get(v, &[dim, dim], "weight")?,
                        ],
                        0,
                    )?,
                );
                let b = if qkv_bias {
                    let b = (
                        get(q, &[dim], "bias")?,
                        Tensor::cat(&[get(k, &[dim], "bias")?, get(v, &[dim], "bias")?], 0)?,
                    );
                    Some(b)
                } else {
                    None
                };
                (w, b)
            }
            QkvKeys::Fused { weight, bias } => {
                let split = |t: Tensor| -> Result<(Tensor, Tensor)> {
                    Ok((t.narrow(0, 0, dim)?, t.narrow(0, dim, 2 * dim)?))
                };
                let b = if qkv_bias {
                    Some(split(s.get(3 * dim, bias)?)?)
                } else {
                    None
                };
                (split(s.get((3 * dim, dim), weight)?)?, b)
            }
        };
        let (bq, bkv) = b.unzip();
        Ok(Self {
            q: crate::linear::Linear::load(s, wq, bq)?,
            kv: crate::linear::Linear::load(s, wkv, bkv)?,
            out: linear(s, out, dim, dim, true)?,
            heads,
        })
    }

    /// `x`: [B, N, D] queries; `kv`: keys/values source (self-attention when `None`; for
    /// cross-attention the queries come from `x`, the keys and values from `kv`);
    /// `bias`: additive mask broadcastable to [B, H, N, M].
    pub fn forward(
        &self,
        x: &Tensor,
        kv: Option<&Tensor>,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_first(x, kv, bias, None, x.dim(1)?)
    }

    /// [`Self::forward`] for the first `rows` queries of `x` only (keys and values from every
    /// token): [B, rows, D], plus `residual` [B, rows, D] added in the output projection's epilogue.
    pub fn forward_first(
        &self,
        x: &Tensor,
        kv: Option<&Tensor>,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        rows: usize,
    ) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let scale = (hd as f64).powf(-0.5);
        // Queries [B, rows, D] and keys | values [B, M, 2D] as [B, H, len, d] views.
        let q = self.q.forward(&x.narrow(1, 0, rows)?)?;
        let q = q.reshape((b, rows, self.heads, hd))?.transpose(1, 2)?;
        let kv = self.kv.forward(kv.unwrap_or(x))?;
        let kv = kv.reshape((b, kv.dim(1)?, 2, self.heads, hd))?;
        let part =
            |i: usize| -> Result<Tensor> { Ok(kv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?) };
        let (k, v) = (part(0)?, part(1)?);
        let bias = bias.map(|t| query_rows(t, n, 0, rows)).transpose()?;
        let bias = bias.as_ref();
        // bf16 layers multiply the attention's operands in bf16 too (as PyTorch's autocast does).
        let precision = self
            .q
            .packed()
            .map_or(Precision::F32, |(w, _)| w.precision());
        let y = match ops::attention(&q, &k, &v, bias, scale as f32, precision)? {
            Some(y) => y.reshape((b, rows, d))?,
            None => {
                let q = (q.contiguous()? * scale)?;
                attention(&q, &k.contiguous()?, &v.contiguous()?, bias)?
                    .transpose(1, 2)?
                    .reshape((b, rows, d))?
            }
        };
        self.out.forward_with(&y, residual, None)
    }
}

/// Largest attention-score matrix computed at once, in elements (256 MiB in f32). Longer
/// sequences (a VAE's mid-block attention over a large image has one token per latent pixel) are
/// processed in blocks of queries, so memory grows linearly, not quadratically, with the image.
const MAX_SCORES: usize = 1 << 26;

/// `softmax(q k^T + bias) v` for pre-scaled `q` [B, H, N, d], `k`, `v` [B, H, M, d] and an additive
/// `bias` broadcastable to [B, H, N, M]; queries in blocks when the score matrix would be too big.
/// On CPU `f32` the fused kernel runs instead (tiles with an online softmax: no size limit) and the
/// result is a [B, H, N, d] view of a [B, N, H, d] buffer.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match ops::attention(q, k, v, bias, 1.0, Precision::F32)? {
        Some(y) => Ok(y.transpose(1, 2)?),
        None => attention_in_blocks(q, k, v, bias, MAX_SCORES),
    }
}

/// The rows of an attention bias (broadcastable to [.., N, M]) for queries `start..start + len` of
/// `n`: a bias with one row per query is cut to them; a broadcast row is kept.
fn query_rows(bias: &Tensor, n: usize, start: usize, len: usize) -> Result<Tensor> {
    let rows = bias
        .dims()
        .get(bias.rank().wrapping_sub(2))
        .copied()
        .unwrap_or(1);
    Ok(if rows == n && len < n {
        bias.narrow(bias.rank() - 2, start, len)?
    } else {
        bias.clone()
    })
}

fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    max_scores: usize,
) -> Result<Tensor> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let block = (max_scores / (b * h * m).max(1)).max(1);
    let kt = k.t()?;
    let run = |start: usize, len: usize| -> Result<Tensor> {
        let mut att = q.narrow(2, start, len)?.matmul(&kt)?;
        if let Some(bias) = bias {
            att = att.broadcast_add(&query_rows(bias, n, start, len)?)?;
        }
        Ok(ops::softmax_last_dim(&att)?.matmul(v)?)
    };
    if block >= n {
        return run(0, n);
    }
    let parts = (0..n)
        .step_by(block)
        .map(|s| run(s, block.min(n - s)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 2)?)
}

/// Two-layer MLP with an activation in between.
pub struct Mlp {
    fc1: crate::linear::Linear,
    fc2: crate::linear::Linear,
    act: Activation,
}

impl Mlp {
    pub fn load(
        s: &Scope,
        fc1: &str,
        fc2: &str,
        dim: usize,
        hidden: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            fc1: linear(s, fc1, dim, hidden, true)?,
            fc2: linear(s, fc2, hidden, dim, true)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }

    /// [`Self::forward`] plus `residual` (the input's shape), added in `fc2`'s epilogue; the
    /// activation runs in `fc1`'s.
    pub fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let h = self.fc1.forward_with(x, None, Some(self.act))?;
        self.fc2.forward_with(&h, residual, None)
    }
}

/// Pre-norm transformer block: `x + ls1*attn(norm1(x))`, then `x + ls2*mlp(norm2(x))`.
// Reference: https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/clip/modeling_clip.py#L585
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    ls1: Option<Tensor>,
    norm2: LayerNorm,
    mlp: Mlp,
    ls2: Option<Tensor>,
}

impl Block {
    pub fn load(s: &Scope, keys: &BlockKeys, c: &BlockConfig) -> Result<Self> {
        let ls = |k: Option<&str>| -> Result<Option<Tensor>> {
            match (c.layer_scale, k) {
                (true, Some(k)) => Ok(Some(s.get(c.dim, k)?)),
                (true, None) => Err(config_err(
                    "layer_scale",
                    "this layout has no LayerScale weights",
                )),
                (false, _) => Ok(None),
            }
        };
        Ok(Self {
            norm1: layer_norm(s, keys.norm1, c.dim, c.eps)?,
            attn: Attention::load(s, keys.qkv, keys.out, c.dim, c.heads, c.qkv_bias)?,
            ls1: ls(keys.ls1)?,
            norm2: layer_norm(s, keys.norm2, c.dim, c.eps)?,
            mlp: Mlp::load(s, keys.fc1, keys.fc2, c.dim, c.mlp_dim, c.act)?,
            ls2: ls(keys.ls2)?,
        })
    }

    /// Without LayerScale the residual adds run in the epilogues of the output projection and of
    /// `fc2`; with it, after the scaling.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_first(x, mask, x.dim(1)?)
    }

    /// [`Self::forward`] of the first `rows` tokens only ([B, rows, D]): what a last block owes a
    /// pooled output that reads the class token. The other tokens still give their keys and values.
    pub fn forward_first(&self, x: &Tensor, mask: Option<&Tensor>, rows: usize) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let first = if rows < x.dim(1)? {
            x.narrow(1, 0, rows)?.contiguous()?
        } else {
            x.clone()
        };
        let x = match &self.ls1 {
            None => self
                .attn
                .forward_first(&h, None, mask, Some(&first), rows)?,
            Some(g) => {
                let y = self.attn.forward_first(&h, None, mask, None, rows)?;
                (first + y.broadcast_mul(g)?)?
            }
        };
        let h = self.norm2.forward(&x)?;
        Ok(match &self.ls2 {
            None => self.mlp.forward_residual(&h, Some(&x))?,
            Some(g) => (&x + self.mlp.forward(&h)?.broadcast_mul(g)?)?,
        })
    }
}

/// What a caller needs of an [`Encoder`]'s last output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Last {
    /// Every token.
    All,
    /// The first tokens only (a pooled output that reads the class token): the last block runs
    /// its attention, projection and MLP for those rows alone (keys and values still come from
    /// every token), unless its output is a kept hidden state.
    First(usize),
    /// Nothing: the blocks after the deepest kept hidden state are skipped.
    Skip,
}

/// A stack of blocks that can hand out the hidden state after any block.
pub struct Encoder {
    blocks: Vec<Block>,
}

impl Encoder {
    /// Loads `prefix.{0..n}` blocks.
    pub fn load(
        s: &Scope,
        prefix: &str,
        n: usize,
        keys: &BlockKeys,
        c: &BlockConfig,
    ) -> Result<Self> {
        let s = s.pp(prefix);
        let blocks = (0..n)
            .map(|i| Block::load(&s.pp(i), keys, c))
            .collect::<Result<_>>()?;
        Ok(Self { blocks })
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Runs the blocks. `keep` lists hidden-state indices in HF's convention (0 = the encoder input,
    /// i = output of block i); those states are returned in the order asked. `last` says what the
    /// caller needs of the last block's output (see [`Last`]).
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        keep: &[usize],
        last: Last,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let n = self.blocks.len();
        let stop = match last {
            Last::Skip => keep.iter().copied().max().unwrap_or(0),
            Last::All | Last::First(_) => n,
        };
        // The last block computes only the first tokens when its full output is not kept.
        let first = match last {
            Last::First(rows) if !keep.contains(&n) => Some(rows),
            _ => None,
        };
        let mut states: Vec<Option<Tensor>> = vec![None; self.blocks.len() + 1];
        let mut x = x.clone();
        if keep.contains(&0) {
            states[0] = Some(x.clone());
        }
        for (i, block) in self.blocks.iter().take(stop).enumerate() {
            x = match first {
                Some(rows) if i + 1 == n => block.forward_first(&x, mask, rows)?,
                _ => block.forward(&x, mask)?,
            };
            if keep.contains(&(i + 1)) {
                states[i + 1] = Some(x.clone());
            }
        }
        let kept = keep
            .iter()
            .filter_map(|&i| states.get(i).cloned().flatten())
            .collect();
        Ok((x, kept))
    }
}

/// Resolves HF-style hidden-state indices (negative counts from the end of `0..=n`) to `0..=n`.
pub fn resolve_layers(layers: &[i64], n: usize) -> Result<Vec<usize>> {
    layers
        .iter()
        .map(|&l| {
            let i = if l < 0 { n as i64 + 1 + l } else { l };
            if (0..=n as i64).contains(&i) {
                Ok(i as usize)
            } else {
                Err(config_err(
                    "layers",
                    format!(
                        "layer {l} is out of range for {n} blocks (valid: -{} ..= {n})",
                        n + 1
                    ),
                ))
            }
        })
        .collect()
}

/// An additive causal mask [1, 1, N, N] (0 on and below the diagonal, -inf above).
pub fn causal_mask(n: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (1, 1, n, n), device)?.to_dtype(dtype)?)
}

/// L2-normalises the last dimension.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&n)?)
}

/// A projection into the joint image-text space, stored either as a linear layer's `weight` [P, D]
/// (HF `visual_projection`, SigLIP text `head`) or as a bare matrix [D, P] used as `x @ proj`
/// (open_clip `visual.proj`, `text_projection`).
pub enum Projection {
    Linear(crate::linear::Linear),
    Matrix(Tensor),
}

impl Projection {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Linear(l) => l.forward(x)?,
            Self::Matrix(m) => x.matmul(m)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Blocked attention equals the one-shot computation, with a per-query bias cut correctly and a
    /// broadcast bias kept whole.
    #[test]
    fn blocked_attention_equals_full() {
        let dev = Device::Cpu;
        let (b, h, n, m, d) = (2, 2, 37, 29, 8);
        let q = Tensor::randn(0f32, 1., (b, h, n, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (b, h, m, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (b, h, m, d), &dev).unwrap();
        for bias_shape in [(1, 1, n, m), (1, 1, 1, m)] {
            let bias = Tensor::randn(0f32, 1., bias_shape, &dev).unwrap();
            let full = attention(&q, &k, &v, Some(&bias)).unwrap();
            // 4 * 29 * 5 scores: blocks of 5 queries, the last one shorter.
            let blocked = attention_in_blocks(&q, &k, &v, Some(&bias), b * h * m * 5).unwrap();
            let diff = (full - blocked).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{bias_shape:?}: {diff}");
        }
    }
}
