//! LLaVA and LLaVA-NeXT: a CLIP vision tower, feature selection (`vision_feature_layer`,
//! `vision_feature_select_strategy`), the multimodal projector, and for LLaVA-NeXT the anyres tile
//! packing with `image_newline` tokens. Loads full transformers `LlavaForConditionalGeneration` /
//! `LlavaNextForConditionalGeneration` checkpoints; the language model's weights are ignored.
//!
//! The vision tower's pooled features come through the normal [`ImageEncoder`] API; the projected
//! visual tokens through [`MultimodalEncoder`] (`ImageEncoder::multimodal`).

mod anyres;
mod projector;

pub use anyres::{patch_output_size, select_best_resolution, unpad_ranges, Anyres, AnyresPlan};
pub use projector::{load_mm_projector, Projector, ProjectorType};

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::Value;
use visenc_weights::Weights;

use crate::api::{EncodeOptions, ImageEncoder, ImageFeatures, MultimodalEncoder, VisualTokens};
use crate::clip::{load_hf_vision_tower, ClipVision};
use crate::error::{config_err, ModelError, Result};
use crate::nn::Last;
use crate::{parse, LoadedModel};

/// `vision_feature_select_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectStrategy {
    /// Patch tokens only (the CLS token dropped).
    Default,
    /// Every token, CLS included.
    Full,
}

/// `vision_feature_layer`: one hidden state, or several concatenated along the channels.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum FeatureLayer {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Deserialize)]
#[serde(default)]
struct LlavaConfig {
    vision_config: Value,
    projector_hidden_act: String,
    vision_feature_layer: FeatureLayer,
    vision_feature_select_strategy: SelectStrategy,
    multimodal_projector_bias: bool,
    image_grid_pinpoints: Option<Vec<[usize; 2]>>,
    image_token_index: Option<u32>,
    text_config: Value,
    /// Only in original-LLaVA (haotian-liu) configs.
    mm_projector_type: Option<String>,
}

impl Default for LlavaConfig {
    fn default() -> Self {
        Self {
            vision_config: Value::Null,
            projector_hidden_act: "gelu".into(),
            vision_feature_layer: FeatureLayer::One(-2),
            vision_feature_select_strategy: SelectStrategy::Default,
            multimodal_projector_bias: true,
            image_grid_pinpoints: None,
            image_token_index: None,
            text_config: Value::Null,
            mm_projector_type: None,
        }
    }
}

/// `LlavaNextConfig`'s default `image_grid_pinpoints` (height, width).
const DEFAULT_PINPOINTS: [(usize, usize); 5] =
    [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

/// A LLaVA / LLaVA-NeXT image side: vision tower, feature selection, projector, anyres packing.
pub struct Llava {
    vision: ClipVision,
    layers: Vec<i64>,
    strategy: SelectStrategy,
    projector: Projector,
    llm_dim: usize,
    /// Patch tokens per side of the trained input size.
    side: usize,
    /// LLaVA-NeXT: anyres tiling and the learned `image_newline` [D_llm].
    anyres: Option<(Anyres, Tensor)>,
    image_token_index: Option<u32>,
}

impl Llava {
    /// `get_image_features` before any splitting or packing: pixels [B, 3, H, W] -> the selected
    /// hidden states (CLS dropped under `default`, several layers concatenated) -> projector:
    /// [B, N, D_llm].
    // Reference: transformers v5.24.0 src/transformers/models/llava/modeling_llava.py LlavaModel.get_image_features
    pub fn project(&self, pixels: &Tensor) -> Result<Tensor> {
        let opts = EncodeOptions {
            layers: self.layers.clone(),
            ..Default::default()
        };
        let out = self.vision.trunk.forward(pixels, &opts, Last::Skip)?;
        let selected = out
            .hidden_states
            .iter()
            .map(|(_, h)| match self.strategy {
                SelectStrategy::Default => Ok(h.narrow(1, 1, h.dim(1)? - 1)?),
                SelectStrategy::Full => Ok(h.clone()),
            })
            .collect::<Result<Vec<_>>>()?;
        let x = Tensor::cat(&selected, 2)?;
        self.projector.forward(&x)
    }
}

impl ImageEncoder for Llava {
    fn encode(&self, pixels: &Tensor, opts: &EncodeOptions) -> Result<ImageFeatures> {
        self.vision.encode(pixels, opts)
    }

    fn multimodal(&self) -> Option<&dyn MultimodalEncoder> {
        Some(self)
    }
}

impl MultimodalEncoder for Llava {
    fn llm_hidden_size(&self) -> usize {
        self.llm_dim
    }

    // Reference: transformers v5.24.0 src/transformers/models/llava_next/modeling_llava_next.py LlavaNextModel.get_image_features
    fn encode_image(
        &self,
        pixels: &Tensor,
        image_size: Option<(usize, usize)>,
    ) -> Result<VisualTokens> {
        let feats = self.project(pixels)?;
        match &self.anyres {
            None => {
                if feats.dim(0)? != 1 {
                    return Err(ModelError::Input(format!(
                        "LLaVA encodes one image at a time here, got a batch of {}; use Llava::project",
                        feats.dim(0)?
                    )));
                }
                let tokens = feats.squeeze(0)?;
                Ok(VisualTokens {
                    base_tokens: tokens.dim(0)?,
                    tokens,
                    newlines: vec![],
                })
            }
            Some((anyres, newline)) => {
                let size = image_size.ok_or_else(|| {
                    ModelError::Input("LLaVA-NeXT needs the original image size".into())
                })?;
                let (tokens, newlines) = anyres.pack(&feats, size, newline)?;
                Ok(VisualTokens {
                    tokens,
                    newlines,
                    base_tokens: feats.dim(1)?,
                })
            }
        }
    }

    fn num_tokens(&self, image_size: (usize, usize)) -> Result<usize> {
        Ok(match &self.anyres {
            Some((a, _)) => a.checked_plan(image_size)?.num_tokens,
            None => self.side * self.side + (self.strategy == SelectStrategy::Full) as usize,
        })
    }

    fn anyres_plan(&self, image_size: (usize, usize)) -> Result<Option<AnyresPlan>> {
        self.anyres
            .as_ref()
            .map(|(a, _)| a.checked_plan(image_size))
            .transpose()
    }

    fn image_token_index(&self) -> Option<u32> {
        self.image_token_index
    }
}

/// First of `candidates` under which `key` exists.
fn find_prefix<'a>(w: &Weights, candidates: &[&'a str], key: &str) -> Option<&'a str> {
    candidates
        .iter()
        .copied()
        .find(|p| w.contains(&format!("{p}.{key}")) || (p.is_empty() && w.contains(key)))
}

/// Loads a transformers LLaVA (`model_type` `llava`) or LLaVA-NeXT (`llava_next`) checkpoint.
///
/// Keys are accepted as the hub's checkpoints store them (`vision_tower.vision_model.*`,
/// `multi_modal_projector.*`, `image_newline`, `language_model.*`), as transformers 5 saves them
/// (`vision_tower.*` without `vision_model`), and with the `model.` prefix of the v5 module tree.
pub fn load_hf(cfg: &Value, w: &Weights, architecture: &str) -> Result<LoadedModel> {
    let c: LlavaConfig = parse(cfg, "llava config")?;
    if c.mm_projector_type.is_some() && c.vision_config.is_null() {
        return Err(ModelError::Unsupported {
            what: "original LLaVA checkpoint (mm_projector_type, no vision_config)",
            name: "its weights hold no vision tower; load the CLIP tower on its own and the projector \
                   with visenc_models::llava::load_mm_projector, or use the llava-hf conversion"
                .into(),
        });
    }
    match c.vision_config.get("model_type").and_then(Value::as_str) {
        None | Some("clip_vision_model") => {}
        Some(other) => {
            return Err(ModelError::Unsupported {
                what: "LLaVA vision tower (vision_config.model_type)",
                name: format!("{other:?}; supported: clip_vision_model"),
            })
        }
    }
    let next = cfg.get("model_type").and_then(Value::as_str) == Some("llava_next");
    let tower = find_prefix(
        w,
        &[
            "vision_tower.vision_model",
            "vision_tower",
            "model.vision_tower.vision_model",
            "model.vision_tower",
        ],
        "embeddings.patch_embedding.weight",
    )
    .ok_or_else(|| config_err("vision_tower", "no CLIP vision tower weights found"))?;
    let (vision, mut info) = load_hf_vision_tower(&c.vision_config, &w.pp(tower))?;
    let proj = find_prefix(
        w,
        &["multi_modal_projector", "model.multi_modal_projector"],
        "linear_1.weight",
    )
    .ok_or_else(|| config_err("multi_modal_projector", "no projector weights found"))?;
    let projector = Projector::load_hf(
        &w.pp(proj),
        &c.projector_hidden_act,
        c.multimodal_projector_bias,
    )?;
    let layers = match c.vision_feature_layer {
        FeatureLayer::One(l) => vec![l],
        FeatureLayer::Many(v) if !v.is_empty() => v,
        FeatureLayer::Many(_) => return Err(config_err("vision_feature_layer", "empty list")),
    };
    crate::nn::resolve_layers(&layers, info.num_layers)?;
    let vision_dim = info.hidden_size * layers.len();
    projector.check_input(
        &format!("{proj}.linear_1"),
        vision_dim,
        &format!(
            "vision_config.hidden_size {} x {} vision_feature_layer(s)",
            info.hidden_size,
            layers.len()
        ),
    )?;
    let llm_dim = projector.out_dim().unwrap_or(vision_dim);
    if let Some(d) = c.text_config.get("hidden_size").and_then(Value::as_u64) {
        if d as usize != llm_dim {
            return Err(config_err(
                "text_config.hidden_size",
                format!("{d}, but the multimodal projector outputs {llm_dim} features"),
            ));
        }
    }
    // The language model (`language_model.*`, `lm_head.*`) is the LLM's business, not the encoder's:
    // its tensors are ignored by name so the strict load report still catches anything else unused.
    let lm: Vec<String> = w
        .names()
        .filter(|n| {
            ["language_model.", "model.language_model.", "lm_head."]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .map(str::to_string)
        .collect();
    for n in &lm {
        w.ignore(n);
    }
    let side = info.image_size.0 / info.patch_size;
    let anyres = if next {
        if c.vision_feature_select_strategy == SelectStrategy::Full {
            // pack_image_features views each tile as a side x side grid, which the CLS token breaks.
            return Err(ModelError::Unsupported {
                what: "LLaVA-NeXT vision_feature_select_strategy",
                name: "full (the reference cannot pack tiles that keep the CLS token)".into(),
            });
        }
        let tile = info.image_size.0;
        let pinpoints: Vec<(usize, usize)> = match &c.image_grid_pinpoints {
            Some(p) => p.iter().map(|&[h, w]| (h, w)).collect(),
            None => DEFAULT_PINPOINTS.to_vec(),
        };
        if pinpoints.is_empty()
            || pinpoints
                .iter()
                .any(|&(h, w)| h == 0 || w == 0 || h % tile != 0 || w % tile != 0)
        {
            return Err(config_err(
                "image_grid_pinpoints",
                format!("{pinpoints:?}: every pinpoint must be a non-zero multiple of the tile size {tile}"),
            ));
        }
        let nl = find_prefix(w, &["", "model"], "image_newline").unwrap_or("");
        let newline = w.pp(nl).get(llm_dim, "image_newline")?;
        Some((
            Anyres {
                pinpoints,
                tile,
                side,
            },
            newline,
        ))
    } else {
        None
    };
    info.architecture = architecture.to_string();
    info.family = if next { "llava_next" } else { "llava" };
    Ok(LoadedModel {
        image: Box::new(Llava {
            vision,
            layers,
            strategy: c.vision_feature_select_strategy,
            projector,
            llm_dim,
            side,
            anyres,
            image_token_index: c.image_token_index,
        }),
        text: None,
        info,
    })
}
