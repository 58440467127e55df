//! Encoding RGB8 pixels: JPEG (libjpeg-turbo, in parallel strips: `jpeg.rs`), PNG (png, with fdeflate for the fast setting), lossless
//! WebP (libwebp: `webp.rs`).

use super::jpeg::{encode_jpeg, ChromaSubsampling};
use super::{check_rgb_len, ImageFormat, RgbImage};
use crate::error::{Error, Result};

/// PNG compression: `Fast` is fdeflate, made for PNG data (many times faster than zlib's default at a
/// similar size); `Level(1..=9)` are the familiar zlib levels; `None` stores the data uncompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PngCompression {
    None,
    Fast,
    Level(u8),
}

#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    pub format: ImageFormat,
    /// JPEG quality, 1 to 100.
    pub quality: u8,
    /// JPEG chroma subsampling.
    pub subsampling: ChromaSubsampling,
    pub png_compression: PngCompression,
}

impl EncodeOptions {
    pub fn jpeg(quality: u8) -> Self {
        Self {
            format: ImageFormat::Jpeg,
            quality,
            subsampling: ChromaSubsampling::default(),
            png_compression: PngCompression::Fast,
        }
    }

    /// PNG with the fast setting, or lossless WebP; JPEG is not lossless and gets quality 100.
    pub fn lossless(format: ImageFormat) -> Self {
        Self {
            format,
            quality: 100,
            subsampling: ChromaSubsampling::S444,
            png_compression: PngCompression::Fast,
        }
    }
}

fn encode_err(e: impl std::fmt::Display) -> Error {
    Error::Encode(format!("cannot encode image: {e}"))
}

/// Encodes an RGB image in the requested format.
pub fn encode(image: &RgbImage, options: &EncodeOptions) -> Result<Vec<u8>> {
    encode_rgb(&image.data, image.width, image.height, options)
}

/// Encodes interleaved RGB8 pixels borrowed from elsewhere (a numpy array, say) without copying them.
pub fn encode_rgb(
    pixels: &[u8],
    width: usize,
    height: usize,
    options: &EncodeOptions,
) -> Result<Vec<u8>> {
    check_rgb_len(width, height, pixels.len())?;
    let (w16, h16) = match (u16::try_from(width), u16::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ if options.format != ImageFormat::Png => {
            return Err(Error::Encode(format!(
                "{}x{height} is too large for {} (65535 at most per side)",
                width,
                options.format.name()
            )))
        }
        _ => (0, 0),
    };
    let mut out = Vec::with_capacity(pixels.len() / 4);
    match options.format {
        ImageFormat::Jpeg => {
            if !(1..=100).contains(&options.quality) {
                return Err(Error::Encode(format!(
                    "JPEG quality must be 1 to 100, got {}",
                    options.quality
                )));
            }
            encode_jpeg(
                pixels,
                w16,
                h16,
                options.quality,
                options.subsampling,
                &mut out,
            )?;
        }
        ImageFormat::Png => encode_png(pixels, width, height, options.png_compression, &mut out)?,
        ImageFormat::WebP => {
            // libwebp's limit (WEBP_MAX_DIMENSION).
            if width > 16383 || height > 16383 {
                return Err(Error::Encode(format!(
                    "{width}x{height} is too large for WebP (16383 at most per side)"
                )));
            }
            out = super::webp::encode_lossless(pixels, width as u32, height as u32)?;
        }
    }
    Ok(out)
}

fn encode_png(
    pixels: &[u8],
    width: usize,
    height: usize,
    compression: PngCompression,
    out: &mut Vec<u8>,
) -> Result<()> {
    let (w, h) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => {
            return Err(Error::Encode(format!(
                "{width}x{height} is too large for PNG"
            )))
        }
    };
    let deflate = match compression {
        PngCompression::None => png::DeflateCompression::NoCompression,
        PngCompression::Fast => png::DeflateCompression::FdeflateUltraFast,
        PngCompression::Level(level @ 1..=9) => png::DeflateCompression::Level(level),
        PngCompression::Level(level) => {
            return Err(Error::Encode(format!(
                "PNG compression level must be 1 to 9, got {level}"
            )))
        }
    };
    let mut encoder = png::Encoder::new(out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_deflate_compression(deflate);
    let mut writer = encoder.write_header().map_err(encode_err)?;
    writer.write_image_data(pixels).map_err(encode_err)?;
    writer.finish().map_err(encode_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_buffers_and_settings_are_errors() {
        let opts = EncodeOptions::jpeg(90);
        assert!(encode_rgb(&[0; 11], 2, 2, &opts).is_err());
        assert!(encode_rgb(&[], 0, 0, &opts).is_err());
        assert!(encode_rgb(&[0; 12], 2, 2, &EncodeOptions::jpeg(0)).is_err());
        let png9 = EncodeOptions {
            png_compression: PngCompression::Level(10),
            ..EncodeOptions::lossless(ImageFormat::Png)
        };
        assert!(encode_rgb(&[0; 12], 2, 2, &png9).is_err());
    }

    #[test]
    fn every_png_setting_decodes_back() {
        let pixels: Vec<u8> = (0..30 * 20 * 3).map(|i| (i % 256) as u8).collect();
        for compression in [
            PngCompression::None,
            PngCompression::Fast,
            PngCompression::Level(1),
            PngCompression::Level(9),
        ] {
            let opts = EncodeOptions {
                png_compression: compression,
                ..EncodeOptions::lossless(ImageFormat::Png)
            };
            let bytes = encode_rgb(&pixels, 30, 20, &opts).unwrap();
            let back = crate::image_codec::decode(&bytes, &Default::default()).unwrap();
            assert_eq!(back.data, pixels, "{compression:?}");
        }
    }
}
