//! Decoding any supported format to 8-bit RGB the way the Python references do.
//!
//! The reference is `PIL.ImageOps.exif_transpose(Image.open(f)).convert("RGB")` (Pillow 13), which
//! timm, open_clip and torchvision pipelines apply; [`Alpha::OverWhite`] gives the variant of
//! transformers' `convert_to_rgb`. Where the `image` crate's own conversions differ from Pillow's
//! (16-bit samples, GIF canvases), this module does the conversion itself.

use std::io::{Cursor, Read};
use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::ImageError;
use crate::gif;

/// Bounds on what [`decode`] accepts, checked before any pixel is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest `width * height` accepted. The default, 178_956_970, is where Pillow raises
    /// `DecompressionBombError` (`2 * Image.MAX_IMAGE_PIXELS`).
    pub max_pixels: u64,
    /// Largest encoded input, in bytes. The default is 1 GiB.
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pixels: 178_956_970,
            max_bytes: 1 << 30,
        }
    }
}

impl Limits {
    /// Fails with [`ImageError::TooLarge`] when `width * height` exceeds `max_pixels`.
    pub fn check_pixels(&self, input: &str, width: u32, height: u32) -> Result<(), ImageError> {
        if u64::from(width) * u64::from(height) > self.max_pixels {
            return Err(ImageError::TooLarge {
                input: input.to_string(),
                width,
                height,
                max_pixels: self.max_pixels,
            });
        }
        Ok(())
    }

    /// The allocation cap handed to the `image` decoders: the largest accepted image at
    /// 8 bytes per pixel (16-bit RGBA), plus room for small auxiliary buffers.
    fn decoder_limits(&self) -> image::Limits {
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8).saturating_add(64 << 20));
        limits
    }
}

/// What becomes of transparency when an image is flattened to RGB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Alpha {
    /// Drop the alpha channel, keep the colour under it: Pillow's `convert("RGB")`, used by
    /// timm, open_clip and torchvision pipelines.
    #[default]
    Drop,
    /// Composite over opaque white: transformers 5 `image_transforms.convert_to_rgb` (what its
    /// image processors do when `do_convert_rgb` is set), i.e. Pillow's
    /// `alpha_composite(white, im.convert("RGBA")).convert("RGB")`.
    OverWhite,
}

/// The name used in errors for inputs decoded from memory without a name.
const UNNAMED: &str = "<memory>";

/// Decodes an encoded image (PNG, JPEG, GIF, WebP, BMP, TIFF) to RGB, applying its EXIF
/// orientation, exactly as `ImageOps.exif_transpose(im).convert("RGB")`.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<RgbImage, ImageError> {
    decode_with(bytes, UNNAMED, limits, Alpha::Drop)
}

/// [`decode`], with `name` (a path, a URL, `"item 3"`) in any error.
pub fn decode_named(bytes: &[u8], name: &str, limits: &Limits) -> Result<RgbImage, ImageError> {
    decode_with(bytes, name, limits, Alpha::Drop)
}

/// Reads and decodes the file at `path`; errors name the path.
pub fn open(path: &Path, limits: &Limits) -> Result<RgbImage, ImageError> {
    open_with(path, limits, Alpha::Drop)
}

/// [`open`] with a choice of [`Alpha`] handling.
pub fn open_with(path: &Path, limits: &Limits, alpha: Alpha) -> Result<RgbImage, ImageError> {
    let io_err = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len > limits.max_bytes {
        return Err(ImageError::InputTooLarge {
            input: name,
            bytes: len,
            max_bytes: limits.max_bytes,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // `take` bounds the read even if the file grows after `metadata`.
    file.take(limits.max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    decode_with(&bytes, &name, limits, alpha)
}

/// [`decode_named`] with a choice of [`Alpha`] handling.
pub fn decode_with(
    bytes: &[u8],
    name: &str,
    limits: &Limits,
    alpha: Alpha,
) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty {
            input: name.to_string(),
        });
    }
    if bytes.len() as u64 > limits.max_bytes {
        return Err(ImageError::InputTooLarge {
            input: name.to_string(),
            bytes: bytes.len() as u64,
            max_bytes: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::Unsupported {
        input: name.to_string(),
        format: format!(
            "unknown (no image signature; the data starts with {})",
            bytes
                .iter()
                .take(8)
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    })?;
    if !format.reading_enabled() {
        return Err(ImageError::Unsupported {
            input: name.to_string(),
            format: format!("{format:?} (not compiled in)"),
        });
    }
    if format == ImageFormat::Gif {
        return gif::decode_first_frame(bytes, name, limits, alpha);
    }
    if format == ImageFormat::Jpeg && !jpeg_reaches_eoi(bytes) {
        return Err(ImageError::Decode {
            input: name.to_string(),
            reason: "truncated JPEG: the stream ends before its end-of-image marker".to_string(),
        });
    }

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits.decoder_limits());
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| from_image_error(e, name))?;
    let (width, height) = decoder.dimensions();
    limits.check_pixels(name, width, height)?;
    if width == 0 || height == 0 {
        return Err(ImageError::Decode {
            input: name.to_string(),
            reason: format!("the header announces a {width}x{height} image"),
        });
    }
    let orientation = orientation(&mut decoder, format, bytes);
    let gray16 = format == ImageFormat::Png && png_is_gray16(bytes);
    let img = DynamicImage::from_decoder(decoder).map_err(|e| from_image_error(e, name))?;
    let rgb = to_rgb(img, gray16, alpha, name)?;
    let mut img = DynamicImage::ImageRgb8(rgb);
    img.apply_orientation(orientation);
    Ok(img.into_rgb8())
}

/// The orientation `ImageOps.exif_transpose` applies: the EXIF `Orientation` tag, else (as
/// Pillow's `Image.getexif`) the first `tiff:Orientation` in the XMP packet. Malformed metadata
/// counts as absent, as in Pillow.
///
/// EXIF comes from the decoder, except for PNG where the chunks are scanned here, because the
/// `png` crate only reports an `eXIf` chunk that precedes the image data and Pillow reads one
/// placed after it too.
fn orientation(decoder: &mut impl ImageDecoder, format: ImageFormat, bytes: &[u8]) -> Orientation {
    let from_exif = match format {
        ImageFormat::Png => png_chunk(bytes, b"eXIf").and_then(Orientation::from_exif_chunk),
        // The TIFF decoder reads the tag from the IFD; "absent" and "1" look the same there.
        ImageFormat::Tiff => decoder
            .orientation()
            .ok()
            .filter(|o| *o != Orientation::NoTransforms),
        _ => decoder
            .exif_metadata()
            .ok()
            .flatten()
            .and_then(|chunk| Orientation::from_exif_chunk(&chunk)),
    };
    from_exif
        .or_else(|| {
            decoder
                .xmp_metadata()
                .ok()
                .flatten()
                .and_then(|xmp| xmp_orientation(&xmp))
        })
        .unwrap_or(Orientation::NoTransforms)
}

/// `re.search(rb'tiff:Orientation(="|>)([0-9])', xmp)` as in Pillow's `Image.getexif`.
fn xmp_orientation(xmp: &[u8]) -> Option<Orientation> {
    const KEY: &[u8] = b"tiff:Orientation";
    (0..xmp.len()).find_map(|i| {
        let rest = xmp[i..].strip_prefix(KEY)?;
        let digit = match rest {
            [b'=', b'"', d, ..] | [b'>', d, ..] if d.is_ascii_digit() => d - b'0',
            _ => return None,
        };
        // Pillow takes any digit; 0 and 9 transpose nothing.
        Some(Orientation::from_exif(digit).unwrap_or(Orientation::NoTransforms))
    })
}

/// The data of the first chunk of type `kind` in a PNG stream, anywhere in the file.
fn png_chunk<'a>(bytes: &'a [u8], kind: &[u8; 4]) -> Option<&'a [u8]> {
    let mut rest = bytes.get(8..)?;
    loop {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let chunk_kind = rest.get(4..8)?;
        let data = rest.get(8..8usize.checked_add(len)?)?;
        if chunk_kind == kind {
            return Some(data);
        }
        if chunk_kind == b"IEND" {
            return None;
        }
        rest = rest.get(12usize.checked_add(len)?..)?;
    }
}

/// Whether a JPEG stream reaches its end-of-image marker (`FF D9`).
///
/// libjpeg stops at a premature end and Pillow then raises "image file is truncated"; zune-jpeg
/// pads the missing scan data and returns an image. Segments are skipped by their length, so an
/// embedded thumbnail's marker does not count; in entropy-coded data `FF 00` (stuffing), fill
/// bytes and restart markers are stepped over.
fn jpeg_reaches_eoi(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while let Some(&byte) = bytes.get(i) {
        if byte != 0xFF {
            i += 1;
            continue;
        }
        let Some(&marker) = bytes.get(i + 1) else {
            return false;
        };
        i += match marker {
            0xD9 => return true,
            0xFF => 1,
            0x00 | 0x01 | 0xD0..=0xD8 => 2,
            _ => match bytes.get(i + 2..i + 4) {
                Some(len) => 2 + usize::from(u16::from_be_bytes([len[0], len[1]])),
                None => return false,
            },
        };
    }
    false
}

/// Maps an `image` error to ours, naming the input.
fn from_image_error(e: image::ImageError, name: &str) -> ImageError {
    let input = name.to_string();
    match e {
        image::ImageError::Unsupported(e) => ImageError::Unsupported {
            input,
            format: e.to_string(),
        },
        image::ImageError::IoError(e) => ImageError::Decode {
            input,
            reason: format!("truncated or unreadable data: {e}"),
        },
        e => ImageError::Decode {
            input,
            reason: e.to_string(),
        },
    }
}

/// Whether a PNG's IHDR says 16-bit grayscale (colour type 0), which Pillow opens as mode `I;16`.
///
/// The `png` crate expands a `tRNS` chunk into an alpha channel, after which such an image
/// cannot be told apart from a 16-bit gray+alpha one (Pillow mode `LA` via `LA;16B`), and the
/// two convert to RGB differently.
fn png_is_gray16(bytes: &[u8]) -> bool {
    matches!(
        png_chunk(bytes, b"IHDR"),
        Some([_, _, _, _, _, _, _, _, 16, 0, ..])
    )
}

/// Pillow's `I;16 -> RGB` (`I16_RGB` in Convert.c) clamps to 255: it does not rescale.
fn clamp16(v: u16) -> u8 {
    v.min(255) as u8
}

/// Pillow unpacks 16-bit RGB(A) and LA PNG/TIFF samples (`RGB;16B` etc.) by keeping the high byte.
fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

/// Converts a decoded image to RGB as Pillow's `convert("RGB")` (or the white composite) would.
fn to_rgb(
    img: DynamicImage,
    gray16: bool,
    alpha: Alpha,
    name: &str,
) -> Result<RgbImage, ImageError> {
    let (w, h) = (img.width(), img.height());
    let out = match img {
        DynamicImage::ImageRgb8(i) => return Ok(i),
        DynamicImage::ImageRgba8(i) => flatten(
            w,
            h,
            i.as_raw()
                .chunks_exact(4)
                .map(|p| ([p[0], p[1], p[2]], p[3])),
            alpha,
        ),
        DynamicImage::ImageLuma8(i) => {
            flatten(w, h, i.as_raw().iter().map(|&v| ([v; 3], 255)), alpha)
        }
        DynamicImage::ImageLumaA8(i) => flatten(
            w,
            h,
            i.as_raw().chunks_exact(2).map(|p| ([p[0]; 3], p[1])),
            alpha,
        ),
        DynamicImage::ImageLuma16(i) => flatten(
            w,
            h,
            i.as_raw().iter().map(|&v| ([clamp16(v); 3], 255)),
            alpha,
        ),
        DynamicImage::ImageLumaA16(i) => {
            let gray = if gray16 { clamp16 } else { high_byte };
            flatten(
                w,
                h,
                i.as_raw()
                    .chunks_exact(2)
                    .map(|p| ([gray(p[0]); 3], high_byte(p[1]))),
                alpha,
            )
        }
        DynamicImage::ImageRgb16(i) => flatten(
            w,
            h,
            i.as_raw()
                .chunks_exact(3)
                .map(|p| ([high_byte(p[0]), high_byte(p[1]), high_byte(p[2])], 255)),
            alpha,
        ),
        DynamicImage::ImageRgba16(i) => flatten(
            w,
            h,
            i.as_raw().chunks_exact(4).map(|p| {
                (
                    [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])],
                    high_byte(p[3]),
                )
            }),
            alpha,
        ),
        other => {
            return Err(ImageError::Unsupported {
                input: name.to_string(),
                format: format!("{:?} samples have no Pillow RGB conversion", other.color()),
            })
        }
    };
    Ok(out)
}

/// Builds an RGB image from `(colour, alpha)` pixels, dropping or compositing the alpha.
pub(crate) fn flatten(
    w: u32,
    h: u32,
    pixels: impl Iterator<Item = ([u8; 3], u8)>,
    alpha: Alpha,
) -> RgbImage {
    let mut data = Vec::with_capacity(w as usize * h as usize * 3);
    match alpha {
        Alpha::Drop => pixels.for_each(|(c, _)| data.extend_from_slice(&c)),
        Alpha::OverWhite => pixels.for_each(|(c, a)| data.extend(c.map(|v| over_white(v, a)))),
    }
    RgbImage::from_raw(w, h, data).expect("the decoder returned width * height pixels")
}

/// One channel of `ImagingAlphaComposite` with an opaque white destination.
///
/// Port of <https://github.com/python-pillow/Pillow/blob/11.0.0/src/libImaging/AlphaComposite.c>
/// (7 extra bits of precision, rounded divisions by 255).
fn over_white(c: u8, a: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    const DST: u32 = 255;
    let shift_div255 = |v: u32| ((v >> 8) + v) >> 8;
    if a == 0 {
        return DST as u8;
    }
    let a = u32::from(a);
    let blend = DST * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = u32::from(c) * coef1 + DST * coef2;
    (shift_div255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_white_endpoints() {
        assert_eq!(over_white(17, 0), 255);
        assert_eq!(over_white(17, 255), 17);
        // Half-transparent black over white is mid-grey.
        assert!((127..=128).contains(&over_white(0, 128)));
    }

    #[test]
    fn gray16_detection_reads_ihdr() {
        let mut png =
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00\x00\x01\x00\x00\x00\x01".to_vec();
        png.extend_from_slice(&[16, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(png_is_gray16(&png));
        png[25] = 4;
        assert!(!png_is_gray16(&png));
        assert!(!png_is_gray16(&png[..20]));
    }

    #[test]
    fn jpeg_eoi_is_found_past_segments() {
        // SOI, an APP1 whose payload holds a fake EOI, SOS header, scan data with stuffing and
        // a restart marker, then EOI.
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x04, 0xFF, 0xD9];
        jpeg.extend_from_slice(&[
            0xFF, 0xDA, 0x00, 0x02, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56,
        ]);
        assert!(!jpeg_reaches_eoi(&jpeg));
        jpeg.extend_from_slice(&[0xFF, 0xD9]);
        assert!(jpeg_reaches_eoi(&jpeg));
    }

    #[test]
    fn xmp_orientation_like_pillow() {
        let attr = br#"<rdf:Description tiff:Orientation="6" />"#;
        assert_eq!(xmp_orientation(attr), Some(Orientation::Rotate90));
        let element = b"<tiff:Orientation>3</tiff:Orientation>";
        assert_eq!(xmp_orientation(element), Some(Orientation::Rotate180));
        assert_eq!(
            xmp_orientation(b"tiff:Orientation x tiff:Orientation>8"),
            Some(Orientation::Rotate270)
        );
        assert_eq!(xmp_orientation(b"no orientation here"), None);
    }
}
