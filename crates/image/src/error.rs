//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while decoding or preprocessing an image.
///
/// Variants that concern one input carry its name (a path, or whatever the caller passed to
/// [`crate::decode_named`], e.g. `"item 3"`), so a batch error points at the culprit.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("{}: cannot read file: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The input has zero bytes.
    #[error("{input}: the input is empty (0 bytes)")]
    Empty { input: String },
    /// The encoded input is larger than [`crate::Limits::max_bytes`].
    #[error("{input}: the encoded input has {bytes} bytes, more than the limit of {max_bytes}")]
    InputTooLarge {
        input: String,
        bytes: u64,
        max_bytes: u64,
    },
    /// The bytes are not in a format this crate decodes (unknown magic bytes, or a known format
    /// that is not compiled in, or a pixel layout that has no RGB conversion).
    #[error("{input}: unsupported image format: {format}")]
    Unsupported { input: String, format: String },
    /// The header announces more pixels than [`crate::Limits::max_pixels`]; nothing was decoded.
    #[error(
        "{input}: the image is {width}x{height} = {} pixels, more than the limit of {max_pixels} \
         (decompression bomb guard)",
        u64::from(*width) * u64::from(*height)
    )]
    TooLarge {
        input: String,
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    /// The data is corrupt or truncated, or the decoder refused it.
    #[error("{input}: cannot decode image: {reason}")]
    Decode { input: String, reason: String },
    /// A preprocessing configuration is incomplete or asks for something unsupported.
    #[error("invalid preprocessing config: {reason}")]
    Config { reason: String },
    /// The configured preprocessing cannot be applied to an image of this size (a target side
    /// would be 0 pixels, or absurdly large).
    #[error("cannot preprocess a {width}x{height} image: {reason}")]
    Geometry {
        width: u32,
        height: u32,
        reason: String,
    },
}

impl ImageError {
    pub(crate) fn config(reason: impl Into<String>) -> Self {
        ImageError::Config {
            reason: reason.into(),
        }
    }
}
