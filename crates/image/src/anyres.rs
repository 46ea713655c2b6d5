//! LLaVA-NeXT "anyres" inputs: the image resized into the chosen grid pinpoint keeping its aspect
//! ratio, padded to it, cut into tiles, plus the whole image squashed to one tile (the "base"
//! image, first), each then preprocessed like any other input.
//!
//! Which pinpoint, which size inside it and where it sits are the model's business
//! (`visenc_models::llava::Anyres::plan`, which the token counts also come from); this file does the
//! pixels, as `LlavaNextImageProcessorPil` does.

use image::RgbImage;

use crate::error::ImageError;
use crate::preprocess::{Preprocess, ResizeMode};
use crate::resample::resize;

/// Where the image goes: on a black canvas of the chosen pinpoint, at `offset`, resized to `resized`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnyresLayout {
    /// The pinpoint chosen by `select_best_resolution` (height, width).
    pub canvas: (u32, u32),
    /// The aspect-preserving size inside it, `get_patch_output_size` (height, width).
    pub resized: (u32, u32),
    /// Padding before the image (left, top), `_get_padding_size`.
    pub offset: (u32, u32),
}

/// The preprocessed tiles of one image.
#[derive(Clone, Debug, PartialEq)]
pub struct AnyresTiles {
    /// `num_tiles * 3 * height * width` normalised values, each tile CHW: the base image first, then
    /// the grid row by row.
    pub data: Vec<f32>,
    pub num_tiles: usize,
    /// Size of each preprocessed tile (height, width).
    pub tile: (u32, u32),
    /// The grid the canvas is cut into (rows, columns).
    pub grid: (u32, u32),
}

impl Preprocess {
    /// The side of the tiles the canvas is cut into (`crop_size.height`, else the resize size) and the
    /// size the base image is squashed to (`size` as (height, width), or a shortest edge as a square),
    /// as `LlavaNextImageProcessorPil._preprocess` picks them.
    // Reference: transformers v5.24.0 src/transformers/models/llava_next/image_processing_pil_llava_next.py LlavaNextImageProcessorPil._preprocess
    pub fn anyres_sizes(&self) -> Result<(u32, (u32, u32)), ImageError> {
        let base = match self.resize {
            Some(ResizeMode::Exact { height, width }) => (height, width),
            Some(ResizeMode::ShortestEdge(n)) => (n, n),
            Some(ResizeMode::LongestEdge(_)) | None => {
                return Err(ImageError::config(
                    "anyres tiling needs `size` as a shortest edge or a height and width",
                ))
            }
        };
        let tile = match self.crop {
            Some((h, _)) => h,
            None => base.0,
        };
        Ok((tile, base))
    }

    /// The tiles of `img` for `layout` (see [`AnyresTiles`]).
    ///
    /// Fails when the layout does not fit the image processor (a canvas that is not a whole number of
    /// tiles, a resized image outside its canvas) or a tile cannot be preprocessed.
    // Reference: transformers v5.24.0 src/transformers/models/llava_next/image_processing_pil_llava_next.py LlavaNextImageProcessorPil.get_image_patches
    pub fn anyres_tiles(
        &self,
        img: &RgbImage,
        layout: &AnyresLayout,
    ) -> Result<AnyresTiles, ImageError> {
        let (in_w, in_h) = img.dimensions();
        if in_w == 0 || in_h == 0 {
            return Err(ImageError::Geometry {
                width: in_w,
                height: in_h,
                reason: "the image is empty".to_string(),
            });
        }
        let (tile, base) = self.anyres_sizes()?;
        let AnyresLayout {
            canvas: (ch, cw),
            resized: (rh, rw),
            offset: (ox, oy),
        } = *layout;
        if ch == 0 || cw == 0 || ch % tile != 0 || cw % tile != 0 {
            return Err(ImageError::config(format!(
                "the anyres pinpoint {ch}x{cw} (image_grid_pinpoints) is not a whole number of \
                 {tile}x{tile} tiles (crop_size)"
            )));
        }
        if rh == 0 || rw == 0 || ox + rw > cw || oy + rh > ch {
            return Err(ImageError::Geometry {
                width: in_w,
                height: in_h,
                reason: format!(
                    "the anyres layout puts a {rw}x{rh} image at ({ox}, {oy}) on a {cw}x{ch} canvas"
                ),
            });
        }
        // _resize_for_patching, then _pad_for_patching (np.pad with zeros).
        let resized = resize(img, rw, rh, self.filter);
        let mut canvas = RgbImage::new(cw, ch);
        image::imageops::replace(&mut canvas, &resized, i64::from(ox), i64::from(oy));
        let grid = (ch / tile, cw / tile);
        // The base image: the whole input squashed to `size`.
        let mut inputs = vec![resize(img, base.1, base.0, self.filter)];
        // divide_to_patches: row-major.
        for r in 0..grid.0 {
            for c in 0..grid.1 {
                let t = image::imageops::crop_imm(&canvas, c * tile, r * tile, tile, tile);
                inputs.push(t.to_image());
            }
        }
        let out = self.output_size(tile, tile);
        let base_out = self.output_size(base.0, base.1);
        if base_out != out {
            return Err(ImageError::config(format!(
                "the base image ({}x{}) and the tiles ({}x{}) preprocess to different sizes",
                base_out.1, base_out.0, out.1, out.0
            )));
        }
        let mut data = Vec::with_capacity(inputs.len() * 3 * out.0 as usize * out.1 as usize);
        for t in &inputs {
            data.extend(self.apply(t)?);
        }
        Ok(AnyresTiles {
            data,
            num_tiles: inputs.len(),
            tile: out,
            grid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(tile: u32) -> Preprocess {
        Preprocess {
            resize: Some(ResizeMode::ShortestEdge(tile)),
            crop: Some((tile, tile)),
            ..Preprocess::default()
        }
    }

    #[test]
    fn tiles_come_base_first_then_row_major_on_a_black_canvas() {
        // A 2x4 white image on a 4x8 canvas, two rows down: the top tiles hold the padding rows.
        let img = RgbImage::from_pixel(4, 2, image::Rgb([255, 255, 255]));
        let layout = AnyresLayout {
            canvas: (4, 8),
            resized: (2, 4),
            offset: (2, 1),
        };
        let t = pre(4).anyres_tiles(&img, &layout).unwrap();
        assert_eq!((t.num_tiles, t.grid, t.tile), (3, (1, 2), (4, 4)));
        let tile = |i: usize| &t.data[i * 48..(i + 1) * 48];
        assert!(
            tile(0).iter().all(|&v| v == 255.0),
            "base: the image squashed"
        );
        // Tile 1 covers canvas columns 0..4: the image starts at column 2, rows 1..3.
        let red = &tile(1)[..16];
        let row = |y: usize| &red[y * 4..y * 4 + 4];
        assert_eq!(row(0), [0.0; 4]);
        assert_eq!(row(1), [0.0, 0.0, 255.0, 255.0]);
        assert_eq!(row(3), [0.0; 4]);
    }

    #[test]
    fn layouts_that_do_not_fit_are_errors() {
        let img = RgbImage::new(3, 3);
        let bad_canvas = AnyresLayout {
            canvas: (4, 6),
            resized: (4, 4),
            offset: (1, 0),
        };
        let err = pre(4).anyres_tiles(&img, &bad_canvas).unwrap_err();
        assert!(err.to_string().contains("image_grid_pinpoints"), "{err}");
        let outside = AnyresLayout {
            canvas: (4, 4),
            resized: (4, 4),
            offset: (1, 0),
        };
        assert!(pre(4).anyres_tiles(&img, &outside).is_err());
        let no_size = Preprocess::default();
        assert!(no_size.anyres_sizes().is_err());
    }
}
