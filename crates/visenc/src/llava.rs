//! Visual tokens for a language model (LLaVA, LLaVA-NeXT): an image file in, the projected token
//! matrix out, with the layout an LLM runtime needs to splice it into its input embeddings.

use std::path::Path;

use candle_core::Tensor;
use serde::Serialize;
use visenc_image::{AnyresLayout, RgbImage};
use visenc_models::MultimodalEncoder;

use crate::{Encoder, Error, Result};

/// What one row of the token matrix is ([`LlmTokens::kinds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u32)]
pub enum TokenKind {
    /// A patch token of the base image (LLaVA-NeXT: the whole image squashed to one tile; LLaVA:
    /// every token, the CLS token too under the `full` strategy).
    Base = 0,
    /// A patch token of the unpadded tile grid (LLaVA-NeXT), row by row.
    Grid = 1,
    /// The learned `image_newline` vector that ends each row of the grid (LLaVA-NeXT).
    Newline = 2,
}

/// Where the token matrix goes in a language model's input. LLaVA and LLaVA-NeXT use no image
/// start, end or separator tokens: the prompt holds the placeholder `image_token_index` repeated
/// `num_tokens` times (what the processor expands `<image>` to), and the rows of the matrix replace
/// those embeddings in order.
#[derive(Debug, Clone, Serialize)]
pub struct TokenLayout {
    /// `llava` or `llava_next`.
    pub family: &'static str,
    /// The image's original size (height, width): `image_sizes` of the reference processor.
    pub image_size: [usize; 2],
    /// Rows of the matrix = placeholder tokens the prompt needs.
    pub num_tokens: usize,
    /// Width of the rows (the language model's hidden size).
    pub hidden_size: usize,
    /// The placeholder token id (`image_token_index` of the config), if the checkpoint says.
    pub image_token_index: Option<u32>,
    /// Rows 0..base_tokens come from the base image.
    pub base_tokens: usize,
    /// LLaVA-NeXT: tiles the vision tower saw (base image + grid).
    pub num_tiles: usize,
    /// LLaVA-NeXT: the grid pinpoint chosen for the image (height, width).
    pub best_resolution: Option<[usize; 2]>,
    /// LLaVA-NeXT: the tile grid (rows, columns).
    pub tile_grid: Option<[usize; 2]>,
    /// LLaVA-NeXT: the feature grid after unpadding (rows, columns); each row is followed by a newline.
    pub unpadded_grid: Option<[usize; 2]>,
    /// Rows that are `image_newline`.
    pub newlines: Vec<usize>,
}

/// The projected visual tokens of one image and their layout.
#[derive(Debug, Clone)]
pub struct LlmTokens {
    /// [num_tokens, hidden_size].
    pub tokens: Tensor,
    pub layout: TokenLayout,
}

impl LlmTokens {
    /// The [`TokenKind`] of each row.
    pub fn kinds(&self) -> Vec<TokenKind> {
        let l = &self.layout;
        let mut k = vec![TokenKind::Grid; l.num_tokens];
        k[..l.base_tokens].fill(TokenKind::Base);
        for &i in &l.newlines {
            k[i] = TokenKind::Newline;
        }
        k
    }
}

impl Encoder {
    /// The vision-to-language side of a LLaVA-style checkpoint, `None` for other models.
    pub fn multimodal(&self) -> Option<&dyn MultimodalEncoder> {
        self.model.image.multimodal()
    }

    fn require_multimodal(&self) -> Result<&dyn MultimodalEncoder> {
        self.multimodal().ok_or_else(|| Error::NotMultimodal {
            spec: self.spec.clone(),
        })
    }

    /// LLaVA-NeXT's model input for one image, as `LlavaNextImageProcessor` makes it: the tiles
    /// [1 + rows * cols, 3, T, T] (base image first) for the pinpoint the model's
    /// `image_grid_pinpoints` choose. Fails for models without anyres and for images the model
    /// refuses (see `visenc_models::llava::Anyres::checked_plan`).
    pub fn anyres_tiles(&self, img: &RgbImage) -> Result<Tensor> {
        let mm = self.require_multimodal()?;
        let size = (img.height() as usize, img.width() as usize);
        let plan = mm.anyres_plan(size)?.ok_or_else(|| {
            Error::Input(format!(
                "{}: the model does not tile images (no anyres)",
                self.spec
            ))
        })?;
        let u = |x: usize| x as u32;
        let layout = AnyresLayout {
            canvas: (u(plan.best_resolution.0), u(plan.best_resolution.1)),
            resized: (u(plan.resized.0), u(plan.resized.1)),
            offset: (u(plan.padding[0]), u(plan.padding[1])),
        };
        let tiles = self.preprocess.anyres_tiles(img, &layout)?;
        if tiles.num_tiles != plan.num_tiles {
            return Err(Error::NoPreprocess {
                spec: self.spec.clone(),
                reason: format!(
                    "the image processor cuts {} tiles (crop_size {:?}) where the model's anyres grid \
                     needs {} (vision_config.image_size)",
                    tiles.num_tiles, tiles.tile, plan.num_tiles
                ),
            });
        }
        let (h, w) = (tiles.tile.0 as usize, tiles.tile.1 as usize);
        Ok(Tensor::from_vec(
            tiles.data,
            (tiles.num_tiles, 3, h, w),
            &self.device,
        )?)
    }

    /// The projected visual tokens of an image file (see [`Self::llm_tokens`]).
    pub fn llm_tokens_file(&self, path: &Path) -> Result<LlmTokens> {
        let img = visenc_image::open_with(path, &self.limits, self.preprocess.alpha)?;
        self.llm_tokens(&img)
    }

    /// The projected visual tokens of one decoded image, as the reference's
    /// `get_image_features` gives them after its processor (LLaVA-NeXT: through the anyres tiles),
    /// with their [`TokenLayout`].
    pub fn llm_tokens(&self, img: &RgbImage) -> Result<LlmTokens> {
        let mm = self.require_multimodal()?;
        let size = (img.height() as usize, img.width() as usize);
        let plan = mm.anyres_plan(size)?;
        let v = match plan {
            Some(_) => mm.encode_image(&self.anyres_tiles(img)?, Some(size))?,
            None => {
                let px = self.pixels(img)?;
                let t = Tensor::from_vec(px.data, (1, 3, px.height, px.width), &self.device)?;
                mm.encode_image(&t, None)?
            }
        };
        let (n, d) = v.tokens.dims2()?;
        Ok(LlmTokens {
            layout: TokenLayout {
                family: self.model.info.family,
                image_size: [size.0, size.1],
                num_tokens: n,
                hidden_size: d,
                image_token_index: mm.image_token_index(),
                base_tokens: v.base_tokens,
                num_tiles: plan.map_or(1, |p| p.num_tiles),
                best_resolution: plan.map(|p| [p.best_resolution.0, p.best_resolution.1]),
                tile_grid: plan.map(|p| [p.grid.0, p.grid.1]),
                unpadded_grid: plan.map(|p| [p.unpadded.0, p.unpadded.1]),
                newlines: v.newlines,
            },
            tokens: v.tokens,
        })
    }
}
