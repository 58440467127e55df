//! Image codecs: JPEG, PNG and WebP bytes <-> 8-bit RGB pixels.

mod decode;
mod encode;
mod jpeg;
mod turbo;
mod webp;

pub use decode::{decode, probe, DecodeOptions, ImageInfo, DEFAULT_MAX_PIXELS};
pub use encode::{encode, encode_rgb, EncodeOptions, PngCompression};
pub use jpeg::ChromaSubsampling;

use crate::error::{Error, Result};

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (`H x W x 3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps a pixel buffer, checking that it holds exactly `height * width * 3` bytes.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        check_rgb_len(width, height, data.len())?;
        Ok(Self {
            width,
            height,
            data,
        })
    }
}

/// The container formats vaelink reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    WebP,
}

impl ImageFormat {
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "jpeg" | "jpg" => Ok(Self::Jpeg),
            "png" => Ok(Self::Png),
            "webp" => Ok(Self::WebP),
            other => Err(Error::Encode(format!(
                "unsupported image format {other:?}; expected jpeg, png or webp"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Jpeg => "jpeg",
            Self::Png => "png",
            Self::WebP => "webp",
        }
    }

    pub fn mime_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::WebP => "image/webp",
        }
    }
}

pub(crate) fn check_rgb_len(width: usize, height: usize, len: usize) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::Encode(format!("image of {width}x{height} is empty")));
    }
    match width.checked_mul(height).and_then(|p| p.checked_mul(3)) {
        Some(n) if n == len => Ok(()),
        _ => Err(Error::Encode(format!(
            "pixel buffer has {len} bytes, but {width}x{height} RGB needs {}",
            width.saturating_mul(height).saturating_mul(3)
        ))),
    }
}
