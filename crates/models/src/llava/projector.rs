//! The multimodal projector: vision features -> language-model embeddings.
//!
//! Two layouts: transformers `LlavaMultiModalProjector` (`linear_1 -> act -> linear_2`) and the original
//! LLaVA `mm_projector` (`nn.Sequential` built from `mm_projector_type`), e.g. a bare `mm_projector.bin`
//! with keys `model.mm_projector.0.weight`, `model.mm_projector.2.weight`.

use std::str::FromStr;

use candle_core::Tensor;
use visenc_weights::{Scope, Weights};

use crate::error::{config_err, Result};
use crate::nn::Activation;

/// `mm_projector_type` of the original LLaVA code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorType {
    /// One `nn.Linear`.
    Linear,
    /// `mlp{N}x_gelu`: N linear layers with exact GELU between them (LLaVA-1.5: `mlp2x_gelu`).
    MlpGelu(usize),
    /// The vision features unchanged.
    Identity,
}

impl FromStr for ProjectorType {
    type Err = crate::ModelError;

    // Reference: haotian-liu/LLaVA llava/model/multimodal_projector/builder.py build_vision_projector
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => return Ok(Self::Linear),
            "identity" => return Ok(Self::Identity),
            _ => {}
        }
        s.strip_prefix("mlp")
            .and_then(|r| r.strip_suffix("x_gelu"))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n >= 1)
            .map(Self::MlpGelu)
            .ok_or_else(|| {
                config_err(
                    "mm_projector_type",
                    format!("{s:?}; supported: linear, mlp<N>x_gelu, identity"),
                )
            })
    }
}

/// Linear layers with an activation between consecutive ones (none for `identity`).
pub struct Projector {
    layers: Vec<crate::linear::Linear>,
    act: Activation,
    /// (in, out) of the first and last layer; `None` for `identity`.
    dims: Option<(usize, usize)>,
}

/// Linear modules whose sizes the checkpoint decides (`name.weight` [out, in], + `name.bias`), each
/// taking the previous one's output: the layers and (first in, last out).
fn linear_chain(
    s: &Scope,
    names: &[String],
    bias: bool,
) -> Result<(Vec<crate::linear::Linear>, (usize, usize))> {
    let mut layers = Vec::with_capacity(names.len());
    let mut dims: Option<(usize, usize)> = None;
    for name in names {
        let shape = s.pp(name).shape_of("weight").unwrap_or_default();
        let [out, inp] = shape[..] else {
            return Err(config_err(
                s.path(name),
                format!("expected a [out, in] weight, found shape {shape:?}"),
            ));
        };
        if let Some((_, prev)) = dims.filter(|&(_, prev)| prev != inp) {
            return Err(config_err(
                s.path(name),
                format!("takes {inp} features but the layer before it gives {prev}"),
            ));
        }
        layers.push(crate::nn::linear(s, name, inp, out, bias)?);
        dims = Some((dims.map_or(inp, |d| d.0), out));
    }
    Ok((layers, dims.unwrap_or_default()))
}

impl Projector {
    /// transformers `LlavaMultiModalProjector` at scope `s` (`linear_1`, `linear_2`).
    // Reference: transformers v5.24.0 src/transformers/models/llava/modeling_llava.py LlavaMultiModalProjector
    pub fn load_hf(s: &Scope, act: &str, bias: bool) -> Result<Self> {
        let act = Activation::from_name(act).map_err(|_| {
            config_err(
                "projector_hidden_act",
                format!("unsupported activation {act:?}"),
            )
        })?;
        let (layers, dims) = linear_chain(s, &["linear_1".into(), "linear_2".into()], bias)?;
        Ok(Self {
            layers,
            act,
            dims: Some(dims),
        })
    }

    /// The original LLaVA `mm_projector` at scope `s` (e.g. `model.mm_projector`).
    pub fn load_original(s: &Scope, kind: ProjectorType) -> Result<Self> {
        let names: Vec<String> = match kind {
            ProjectorType::Identity => vec![],
            ProjectorType::Linear => vec![String::new()],
            // nn.Sequential(Linear, GELU, Linear, GELU, ...): the linears are modules 0, 2, 4, ...
            ProjectorType::MlpGelu(n) => (0..n).map(|i| (2 * i).to_string()).collect(),
        };
        let (layers, dims) = linear_chain(s, &names, true)?;
        Ok(Self {
            dims: (!layers.is_empty()).then_some(dims),
            layers,
            act: Activation::Gelu,
        })
    }

    /// Output width, `None` for `identity` (it keeps the input width).
    pub fn out_dim(&self) -> Option<usize> {
        self.dims.map(|d| d.1)
    }

    /// Input width, `None` for `identity` (it takes any).
    pub fn in_dim(&self) -> Option<usize> {
        self.dims.map(|d| d.0)
    }

    /// Fails, naming the projector's first layer `name` and the vision side `what`, unless the
    /// projector takes `dim` features.
    pub fn check_input(&self, name: &str, dim: usize, what: &str) -> Result<()> {
        match self.in_dim() {
            Some(d) if d != dim => Err(config_err(
                name,
                format!(
                    "the projector takes {d} features but the vision tower gives {dim} ({what})"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// [.., D_vision] -> [.., D_llm]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            if i > 0 {
                x = self.act.forward(&x)?;
            }
            x = l.forward(&x)?;
        }
        Ok(x)
    }
}

/// Loads a bare original-LLaVA projector file (`mm_projector.bin` / `.safetensors`, as LLaVA's
/// pretraining stage saves it). The type is `kind` (the checkpoint's `mm_projector_type`), or when not
/// given is read from the keys: `<p>.weight` is `linear`, `<p>.0.weight`, `<p>.2.weight`, ... are
/// `mlp{N}x_gelu`. Keys may start with `model.mm_projector` or `mm_projector`. Call
/// [`Weights::finish`] afterwards to refuse files with other tensors.
pub fn load_mm_projector(w: &Weights, kind: Option<ProjectorType>) -> Result<Projector> {
    let prefix = ["model.mm_projector", "mm_projector"]
        .into_iter()
        .find(|p| w.names().any(|n| n.starts_with(&format!("{p}."))))
        .ok_or_else(|| {
            config_err(
                "mm_projector",
                format!(
                    "{}: no `model.mm_projector.*` or `mm_projector.*` tensors",
                    w.source().display()
                ),
            )
        })?;
    let s = w.pp(prefix);
    let kind = match kind {
        Some(k) => k,
        None if s.contains("weight") => ProjectorType::Linear,
        None => {
            let n = (0..)
                .take_while(|i| s.contains(&format!("{}.weight", 2 * i)))
                .count();
            if n == 0 {
                return Err(config_err(
                    "mm_projector_type",
                    format!("cannot tell the projector type from the keys under {prefix}"),
                ));
            }
            ProjectorType::MlpGelu(n)
        }
    };
    Projector::load_original(&s, kind)
}
