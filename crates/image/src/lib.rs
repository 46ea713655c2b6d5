//! Image decoding and reference-exact preprocessing for visenc.
//!
//! * [`decode`] / [`open`]: any supported format to 8-bit RGB, EXIF orientation applied, with
//!   Pillow's conversions (`ImageOps.exif_transpose(im).convert("RGB")`), behind [`Limits`]
//!   checked from the header before anything is decoded. Every format but JPEG decodes to
//!   Pillow's exact pixels; JPEG comes from zune-jpeg, which differs from libjpeg-turbo by a
//!   level or two on some pixels (more with 4:2:0 chroma).
//! * [`resize`]: a bit-exact port of Pillow's resampler for RGB (Pillow 13's pass order).
//! * [`Preprocess`]: resize, centre crop or pad, rescale and normalise, built from the config a
//!   checkpoint ships with (transformers, timm or open_clip) and matching that library's eval
//!   transform.
//! * [`Preprocess::anyres_tiles`]: LLaVA-NeXT's tiles of one image (base image + grid).

mod anyres;
mod config;
mod decode;
mod error;
mod gif;
mod preprocess;
mod resample;

pub use anyres::{AnyresLayout, AnyresTiles};
pub use decode::{decode, decode_named, decode_with, open, open_with, Alpha, Limits};
pub use error::ImageError;
pub use image::RgbImage;
pub use preprocess::{CropRounding, Preprocess, ResizeMode, MAX_OUTPUT_PIXELS};
pub use resample::{resize, Filter};
