//! The first frame of a GIF, composed on its canvas the way Pillow's `GifImagePlugin` does.
//!
//! Pillow keeps frame 0 as palette indices on a canvas of the logical screen size (grown if the
//! frame reaches past it), pre-filled with the frame's transparency index, or index 0 when there
//! is none; `convert("RGB")` then looks every index up in the frame's palette (local, else
//! global), black past its end. The `image` crate's GIF decoder paints the uncovered canvas
//! black instead, so this module uses the `gif` crate directly.
//! Upstream: `GifImageFile._seek` and `load_prepare` in
//! <https://github.com/python-pillow/Pillow/blob/11.0.0/src/PIL/GifImagePlugin.py>.

use std::io::Cursor;
use std::num::NonZeroU64;

use image::RgbImage;

use crate::decode::{flatten, Alpha, Limits};
use crate::error::ImageError;

/// Decodes frame 0 of a GIF to RGB (see the module docs).
pub(crate) fn decode_first_frame(
    bytes: &[u8],
    name: &str,
    limits: &Limits,
    alpha: Alpha,
) -> Result<RgbImage, ImageError> {
    let decode_err = |e: ::gif::DecodingError| ImageError::Decode {
        input: name.to_string(),
        reason: e.to_string(),
    };
    let mut options = ::gif::DecodeOptions::new();
    options.set_color_output(::gif::ColorOutput::Indexed);
    // One index byte per pixel; the pixel check below normally fires first.
    if let Some(cap) = NonZeroU64::new(limits.max_pixels) {
        options.set_memory_limit(::gif::MemoryLimit::Bytes(cap));
    }
    let mut decoder = options.read_info(Cursor::new(bytes)).map_err(decode_err)?;
    let (screen_w, screen_h) = (u32::from(decoder.width()), u32::from(decoder.height()));
    let global_palette = decoder.global_palette().map(<[u8]>::to_vec);
    let frame = decoder
        .next_frame_info()
        .map_err(decode_err)?
        .ok_or_else(|| ImageError::Decode {
            input: name.to_string(),
            reason: "the GIF has no frames".to_string(),
        })?;
    let (left, top) = (u32::from(frame.left), u32::from(frame.top));
    let (frame_w, frame_h) = (u32::from(frame.width), u32::from(frame.height));
    let transparent = frame.transparent;
    let palette = frame.palette.clone().or(global_palette).unwrap_or_default();

    let width = screen_w.max(left + frame_w);
    let height = screen_h.max(top + frame_h);
    limits.check_pixels(name, width, height)?;
    if width == 0 || height == 0 {
        return Err(ImageError::Decode {
            input: name.to_string(),
            reason: format!("the GIF canvas is {width}x{height}"),
        });
    }
    let mut frame_indices = vec![0u8; decoder.buffer_size()];
    decoder
        .read_into_buffer(&mut frame_indices)
        .map_err(decode_err)?;

    let (width_us, frame_w_us) = (width as usize, frame_w as usize);
    let mut canvas = vec![transparent.unwrap_or(0); width_us * height as usize];
    if frame_w_us > 0 {
        for (y, row) in frame_indices.chunks_exact(frame_w_us).enumerate() {
            let start = (top as usize + y) * width_us + left as usize;
            canvas[start..start + frame_w_us].copy_from_slice(row);
        }
    }
    let pixels = canvas.into_iter().map(|index| {
        let at = usize::from(index) * 3;
        let color = match palette.get(at..at + 3) {
            Some(c) => [c[0], c[1], c[2]],
            None => [0, 0, 0],
        };
        let a = if Some(index) == transparent { 0 } else { 255 };
        (color, a)
    });
    Ok(flatten(width, height, pixels, alpha))
}
