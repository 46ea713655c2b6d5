//! LLaVA-NeXT "anyres": the tile grid chosen for an image, and the packing of per-tile features into
//! one sequence (unpadding, an `image_newline` token after each row).

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{ModelError, Result};

/// Where an image of a given original size goes under anyres, and how many tokens it becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AnyresPlan {
    /// The pinpoint chosen by `select_best_resolution` (height, width).
    pub best_resolution: (usize, usize),
    /// The size the image is resized to, keeping its aspect ratio, before padding (height, width).
    pub resized: (usize, usize),
    /// Padding (left, top, right, bottom) up to `best_resolution`.
    pub padding: [usize; 4],
    /// The tile grid (rows, columns).
    pub grid: (usize, usize),
    /// Tiles the vision tower sees: the downscaled base image plus the grid.
    pub num_tiles: usize,
    /// The feature grid of the tiles after unpadding (rows, columns).
    pub unpadded: (usize, usize),
    /// Tokens of the packed sequence: base tile + unpadded grid + one newline per row.
    pub num_tokens: usize,
}

/// `select_best_resolution`: the pinpoint (height, width) that keeps the most of the image, then
/// wastes the least.
// Reference: transformers v5.24.0 src/transformers/image_processing_utils.py select_best_resolution
pub fn select_best_resolution(
    original: (usize, usize),
    pinpoints: &[(usize, usize)],
) -> (usize, usize) {
    let (oh, ow) = (original.0 as f64, original.1 as f64);
    let mut best = pinpoints[0];
    let mut max_effective = 0usize;
    let mut min_wasted = usize::MAX;
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow).min(h as f64 / oh);
        // Python's int() truncates.
        let (dw, dh) = ((ow * scale) as usize, (oh * scale) as usize);
        let effective = (dw * dh).min(original.0 * original.1);
        let wasted = (w * h).saturating_sub(effective);
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = (h, w);
        }
    }
    best
}

/// `get_patch_output_size`: the aspect-preserving size inside `target` (height, width).
// Reference: transformers v5.24.0 src/transformers/image_processing_utils.py get_patch_output_size
pub fn patch_output_size(original: (usize, usize), target: (usize, usize)) -> (usize, usize) {
    let (oh, ow) = (original.0 as f64, original.1 as f64);
    let (th, tw) = target;
    let scale_w = tw as f64 / ow;
    let scale_h = th as f64 / oh;
    if scale_w < scale_h {
        (((oh * scale_w).ceil() as usize).min(th), tw)
    } else {
        (th, ((ow * scale_h).ceil() as usize).min(tw))
    }
}

/// Python's `int(round(x, 7))` for the non-negative sizes of `unpad_image` (round to 7 decimals,
/// then truncate); only values within 1e-7 of a half-way point could differ from Python's rounding.
fn int_round7(x: f64) -> usize {
    ((x * 1e7).round() / 1e7) as usize
}

/// `unpad_image` on a feature grid of `current` (rows, cols) for an image of `original` size:
/// the rows (start, len) and columns (start, len) that hold the image rather than padding.
// Reference: transformers v5.24.0 src/transformers/models/llava_next/modeling_llava_next.py unpad_image
pub fn unpad_ranges(
    original: (usize, usize),
    current: (usize, usize),
) -> ((usize, usize), (usize, usize)) {
    let (oh, ow) = (original.0 as f64, original.1 as f64);
    let (ch, cw) = current;
    if ow / oh > cw as f64 / ch as f64 {
        let new_h = int_round7(oh * (cw as f64 / ow));
        let pad = ch.saturating_sub(new_h) / 2;
        ((pad, ch - 2 * pad), (0, cw))
    } else {
        let new_w = int_round7(ow * (ch as f64 / oh));
        let pad = cw.saturating_sub(new_w) / 2;
        ((0, ch), (pad, cw - 2 * pad))
    }
}

/// The anyres configuration of a LLaVA-NeXT checkpoint.
#[derive(Debug, Clone)]
pub struct Anyres {
    /// `image_grid_pinpoints` as (height, width), each a multiple of `tile`.
    pub pinpoints: Vec<(usize, usize)>,
    /// The vision tower's input size (`vision_config.image_size`).
    pub tile: usize,
    /// Patch tokens per tile side (`image_size // patch_size`).
    pub side: usize,
}

impl Anyres {
    /// The plan for an image of `original` size (height, width); both must be at least 1.
    pub fn plan(&self, original: (usize, usize)) -> AnyresPlan {
        let original = (original.0.max(1), original.1.max(1));
        let best = select_best_resolution(original, &self.pinpoints);
        let resized = patch_output_size(original, best);
        // LlavaNextImageProcessor._get_padding_size: divmod(target - size, 2).
        let (px, rx) = ((best.1 - resized.1) / 2, (best.1 - resized.1) % 2);
        let (py, ry) = ((best.0 - resized.0) / 2, (best.0 - resized.0) % 2);
        let grid = (best.0 / self.tile, best.1 / self.tile);
        let current = (grid.0 * self.side, grid.1 * self.side);
        let ((_, rows), (_, cols)) = unpad_ranges(original, current);
        AnyresPlan {
            best_resolution: best,
            resized,
            padding: [px, py, px + rx, py + ry],
            grid,
            num_tiles: grid.0 * grid.1 + 1,
            unpadded: (rows, cols),
            num_tokens: self.side * self.side + rows * (cols + 1),
        }
    }

    /// [`Self::plan`] for an image the model can use: refused when a side is 0, or when the image is
    /// so thin that unpadding leaves no row or no column of tile features (the reference would then
    /// silently keep only the base image: e.g. 1x10000 pixels, or 30x512 with 32 px tiles).
    pub fn checked_plan(&self, original: (usize, usize)) -> Result<AnyresPlan> {
        let (h, w) = original;
        if h == 0 || w == 0 {
            return Err(ModelError::Input(format!(
                "LLaVA-NeXT: an image of {w}x{h} pixels has nothing to tile"
            )));
        }
        let p = self.plan(original);
        if p.unpadded.0 == 0 || p.unpadded.1 == 0 {
            return Err(ModelError::Input(format!(
                "LLaVA-NeXT: a {w}x{h} image is too thin for the anyres grid (image_grid_pinpoints \
                 {:?}, tile {} px): its best pinpoint {}x{} unpads to {}x{} tile features (rows x \
                 columns), so none of its tiles would reach the language model",
                self.pinpoints,
                self.tile,
                p.best_resolution.1,
                p.best_resolution.0,
                p.unpadded.0,
                p.unpadded.1
            )));
        }
        Ok(p)
    }

    /// `LlavaNextModel.pack_image_features` for one image: projected tile features [n, side², D]
    /// (base tile first) -> ([L, D] sequence, rows that are `newline`).
    // Reference: transformers v5.24.0 src/transformers/models/llava_next/modeling_llava_next.py pack_image_features
    pub fn pack(
        &self,
        features: &Tensor,
        original: (usize, usize),
        newline: &Tensor,
    ) -> Result<(Tensor, Vec<usize>)> {
        let (n, t, d) = features.dims3()?;
        let newline = newline.to_dtype(features.dtype())?.reshape((1, 1, d))?;
        if n == 1 {
            // Only a base image: its tokens and one newline.
            let seq = Tensor::cat(&[features.get(0)?, newline.get(0)?], 0)?;
            return Ok((seq, vec![t]));
        }
        let plan = self.checked_plan(original)?;
        let (r, c) = plan.grid;
        let s = self.side;
        if n != r * c + 1 || t != s * s {
            return Err(ModelError::Input(format!(
                "an image of {original:?} needs 1 + {r}x{c} tiles of {} tokens, got {n} tiles of {t}",
                s * s
            )));
        }
        let base = features.get(0)?;
        // [R, C, s, s, D] -> [R, s, C, s, D] -> [R*s, C*s, D]: the feature grid of the padded image.
        let grid = features
            .narrow(0, 1, r * c)?
            .reshape((r, c, s, s, d))?
            .permute((0, 2, 1, 3, 4))?
            .reshape((r * s, c * s, d))?;
        let ((r0, rows), (c0, cols)) = unpad_ranges(original, (r * s, c * s));
        let grid = grid.narrow(0, r0, rows)?.narrow(1, c0, cols)?;
        let nl = newline.broadcast_as((rows, 1, d))?;
        let grid = Tensor::cat(&[&grid, &nl], 1)?.reshape((rows * (cols + 1), d))?;
        let seq = Tensor::cat(&[&base, &grid], 0)?;
        let newlines = (0..rows).map(|i| t + i * (cols + 1) + cols).collect();
        Ok((seq, newlines))
    }
}
