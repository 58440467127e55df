//! Decoding with libjpeg-turbo for 8-bit YCbCr, gray and RGB JPEGs (`turbo.rs`), libwebp for still
//! WebP (`webp.rs`), and the `image` crate's pure-Rust decoders for the rest (PNG; CMYK and 12-bit
//! JPEG with zune-jpeg; animated WebP with image-webp), converted to RGB8.

use std::io::Cursor;
use std::panic::UnwindSafe;

use image::{ColorType, ImageDecoder, ImageReader, Limits};

use super::{ImageFormat, RgbImage};
use crate::error::{Error, Result};

/// 64 megapixels: a 8192 x 8192 image; anything larger is refused before it is decoded.
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// Largest `width * height` accepted; checked from the header before any pixel buffer exists.
    pub max_pixels: u64,
    /// How alpha is flattened: `None` drops it (as Pillow's `convert("RGB")` does, so transparent
    /// pixels keep their stored colour); `Some(rgb)` composites the image over that colour.
    pub background: Option<[u8; 3]>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_pixels: DEFAULT_MAX_PIXELS,
            background: None,
        }
    }
}

/// What the header of an encoded image says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: usize,
    pub height: usize,
}

fn decode_err(e: impl std::fmt::Display) -> Error {
    Error::Decode(format!("cannot decode image: {e}"))
}

fn reader(bytes: &[u8]) -> Result<(ImageFormat, ImageReader<Cursor<&[u8]>>)> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(decode_err)?;
    let format = match reader.format() {
        Some(image::ImageFormat::Jpeg) => ImageFormat::Jpeg,
        Some(image::ImageFormat::Png) => ImageFormat::Png,
        Some(image::ImageFormat::WebP) => ImageFormat::WebP,
        Some(other) => {
            return Err(Error::Decode(format!(
                "unsupported image format {other:?}; vaelink reads JPEG, PNG and WebP"
            )))
        }
        None if bytes.is_empty() => return Err(Error::Decode("image data is empty".into())),
        None => {
            return Err(Error::Decode(
                "unrecognised image data: not JPEG, PNG or WebP".into(),
            ))
        }
    };
    Ok((format, reader))
}

/// Reads the format and size from the header alone.
pub fn probe(bytes: &[u8]) -> Result<ImageInfo> {
    guarded(|| {
        let (format, reader) = reader(bytes)?;
        // A JPEG that libjpeg-turbo decodes is sized by it too: its header parser is the one
        // `decode` trusts, and it accepts scans zune-jpeg's stricter one refuses.
        if let Some(decoder) = (format == ImageFormat::Jpeg)
            .then(|| super::turbo::Decoder::open(bytes))
            .flatten()
        {
            return Ok(ImageInfo {
                format,
                width: decoder.header.width,
                height: decoder.header.height,
            });
        }
        let (width, height) = reader.into_dimensions().map_err(decode_err)?;
        Ok(ImageInfo {
            format,
            width: width as usize,
            height: height as usize,
        })
    })
}

/// Runs the third-party decoders, turning a panic on malformed data into [`Error::Decode`].
///
/// They are meant never to panic, but fuzzing found inputs that do (zune-jpeg 0.5.15 indexes out of
/// bounds on a baseline JPEG whose scan omits a component with 4x horizontal sampling; 0.5.16-rc3
/// decodes it). `f` only borrows its input immutably and owns every decoder it creates, so nothing is
/// left half-updated by an unwind. With `panic = "abort"` this guard cannot help.
fn guarded<T>(f: impl FnOnce() -> Result<T> + UnwindSafe) -> Result<T> {
    std::panic::catch_unwind(f).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown error");
        Err(Error::Decode(format!(
            "cannot decode image: the decoder failed on malformed data ({what})"
        )))
    })
}

/// Decodes JPEG (baseline, progressive, gray, CMYK), PNG (1-16 bit, gray, palette, alpha) or WebP into
/// 8-bit RGB. 16-bit samples keep their high byte, as Pillow does.
pub fn decode(bytes: &[u8], options: &DecodeOptions) -> Result<RgbImage> {
    let (width, height, color, raw) = guarded(|| read_raw(bytes, options))?;
    let data = match color {
        ColorType::Rgb8 => raw, // the common case: no conversion, no copy
        _ => to_rgb8(&raw, color, options.background)?,
    };
    RgbImage::new(width as usize, height as usize, data)
}

/// Decodes to the decoder's own layout: `(width, height, color type, samples)`.
fn read_raw(bytes: &[u8], options: &DecodeOptions) -> Result<(u32, u32, ColorType, Vec<u8>)> {
    let (format, mut reader) = reader(bytes)?;
    if format == ImageFormat::Jpeg {
        if let Some(decoder) = super::turbo::Decoder::open(bytes) {
            let (w, h) = (decoder.header.width, decoder.header.height);
            check_pixels(w as u64, h as u64, options.max_pixels)?;
            let raw = decoder.decompress(bytes)?;
            return Ok((w as u32, h as u32, ColorType::Rgb8, raw));
        }
    }
    if format == ImageFormat::WebP {
        // libwebp for still images; an animation (its first frame) or a header libwebp cannot
        // read goes to image-webp, which says what is wrong.
        if let Some(f) = super::webp::features(bytes).filter(|f| !f.animated) {
            check_pixels(f.width as u64, f.height as u64, options.max_pixels)?;
            let (channels, color) = match f.has_alpha {
                true => (4, ColorType::Rgba8),
                false => (3, ColorType::Rgb8),
            };
            let raw = super::webp::decode(bytes, &f, channels)?;
            return Ok((f.width, f.height, color, raw));
        }
    }
    let mut limits = Limits::default();
    // Room for the largest allowed image at 16-bit RGBA, so the decoders' own allocations are bounded.
    limits.max_alloc = Some(options.max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(decode_err)?;
    let (width, height) = decoder.dimensions();
    check_pixels(width as u64, height as u64, options.max_pixels)?;
    let color = decoder.color_type();
    let mut raw = vec![0u8; decoder.total_bytes() as usize];
    decoder.read_image(&mut raw).map_err(decode_err)?;
    Ok((width, height, color, raw))
}

fn check_pixels(width: u64, height: u64, limit: u64) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::Decode(format!(
            "image has no pixels ({width}x{height})"
        )));
    }
    let pixels = width * height;
    if pixels > limit {
        return Err(Error::ImageTooLarge {
            width,
            height,
            pixels,
            limit,
        });
    }
    Ok(())
}

/// Converts any decoded layout to RGB8.
fn to_rgb8(raw: &[u8], color: ColorType, background: Option<[u8; 3]>) -> Result<Vec<u8>> {
    // 16-bit buffers come in native byte order; keep the high byte of each sample.
    let high_bytes: Vec<u8>;
    let samples: &[u8] = match color.bytes_per_pixel() / color.channel_count() {
        1 => raw,
        2 => {
            high_bytes = raw
                .chunks_exact(2)
                .map(|s| (u16::from_ne_bytes([s[0], s[1]]) >> 8) as u8)
                .collect();
            &high_bytes
        }
        _ => return Err(Error::Decode(format!("unsupported pixel layout {color:?}"))),
    };
    let rgb = match color.channel_count() {
        1 => samples.iter().flat_map(|&g| [g, g, g]).collect(),
        2 => samples
            .chunks_exact(2)
            .flat_map(|p| flatten_alpha([p[0]; 3], p[1], background))
            .collect(),
        3 => samples.to_vec(),
        4 => samples
            .chunks_exact(4)
            .flat_map(|p| flatten_alpha([p[0], p[1], p[2]], p[3], background))
            .collect(),
        n => return Err(Error::Decode(format!("unsupported channel count {n}"))),
    };
    Ok(rgb)
}

#[inline]
fn flatten_alpha(rgb: [u8; 3], alpha: u8, background: Option<[u8; 3]>) -> [u8; 3] {
    let Some(bg) = background else { return rgb };
    let a = alpha as u32;
    // Rounded integer blend: (c * a + bg * (255 - a)) / 255.
    let blend = |c: u8, b: u8| ((c as u32 * a + b as u32 * (255 - a) + 127) / 255) as u8;
    [
        blend(rgb[0], bg[0]),
        blend(rgb[1], bg[1]),
        blend(rgb[2], bg[2]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_codec::{encode, EncodeOptions};

    fn sample(width: usize, height: usize) -> RgbImage {
        let data = (0..width * height * 3)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        RgbImage::new(width, height, data).unwrap()
    }

    #[test]
    fn png_and_webp_round_trip_exactly() {
        let img = sample(33, 17);
        for format in [ImageFormat::Png, ImageFormat::WebP] {
            let bytes = encode(&img, &EncodeOptions::lossless(format)).unwrap();
            let info = probe(&bytes).unwrap();
            assert_eq!((info.format, info.width, info.height), (format, 33, 17));
            assert_eq!(decode(&bytes, &DecodeOptions::default()).unwrap(), img);
        }
    }

    #[test]
    fn jpeg_round_trip_is_close() {
        let img = RgbImage::new(64, 48, vec![120; 64 * 48 * 3]).unwrap();
        let bytes = encode(&img, &EncodeOptions::jpeg(95)).unwrap();
        let back = decode(&bytes, &DecodeOptions::default()).unwrap();
        assert_eq!((back.width, back.height), (64, 48));
        assert!(back.data.iter().all(|&v| v.abs_diff(120) <= 2));
    }

    #[test]
    fn pixel_limit_is_checked_before_decoding() {
        let bytes = encode(
            &sample(100, 100),
            &EncodeOptions::lossless(ImageFormat::Png),
        )
        .unwrap();
        let options = DecodeOptions {
            max_pixels: 9_999,
            background: None,
        };
        assert!(matches!(
            decode(&bytes, &options),
            Err(Error::ImageTooLarge { pixels: 10_000, .. })
        ));
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert!(matches!(
            decode(b"", &DecodeOptions::default()),
            Err(Error::Decode(_))
        ));
        assert!(decode(b"not an image at all", &DecodeOptions::default()).is_err());
        let bytes = encode(&sample(40, 40), &EncodeOptions::jpeg(90)).unwrap();
        for cut in [2, 20, bytes.len() / 2] {
            // Truncated JPEGs either fail or decode partially; neither may panic.
            let _ = decode(&bytes[..cut], &DecodeOptions::default());
        }
        let png = encode(&sample(40, 40), &EncodeOptions::lossless(ImageFormat::Png)).unwrap();
        assert!(decode(&png[..png.len() / 2], &DecodeOptions::default()).is_err());
    }

    /// A 16x8 baseline JPEG whose Cr component claims 4x1 sampling and whose only scan holds Cb:
    /// zune-jpeg 0.5.15 panics on it (found by the `decode_image` fuzz target).
    fn jpeg_with_odd_sampling() -> Vec<u8> {
        fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
            let len = (body.len() + 2) as u16;
            [&[0xff, marker][..], &len.to_be_bytes(), body].concat()
        }
        let quant = [&[0u8][..], &[1; 64]].concat();
        // One Huffman code (length 1, symbol 0): DC table 0, then AC table 0.
        let huffman = |class: u8| [&[class, 1][..], &[0; 15], &[0]].concat();
        let frame = [8, 0, 8, 0, 16, 3, 1, 0x11, 0, 2, 0x11, 0, 3, 0x41, 0];
        let scan = [1, 2, 0x00, 0, 63, 0];
        [
            vec![0xff, 0xd8],
            segment(0xdb, &quant),
            segment(0xc0, &frame),
            segment(0xc4, &huffman(0x00)),
            segment(0xc4, &huffman(0x10)),
            segment(0xda, &scan),
            vec![0xff, 0xd9],
        ]
        .concat()
    }

    #[test]
    fn what_decodes_is_probed_alike() {
        // A baseline scan declaring Al = 15: libjpeg-turbo ignores it in a sequential scan and
        // zune-jpeg refuses it (found by the `decode_image` fuzz target when probe used zune).
        let mut jpeg = encode(&sample(7, 6), &EncodeOptions::jpeg(90)).unwrap();
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let length = usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
        jpeg[sos + 2 + length - 1] = 0x0F; // Ah = 0, Al = 15
        let decoded = decode(&jpeg, &DecodeOptions::default()).unwrap();
        let info = probe(&jpeg).unwrap();
        assert_eq!((info.width, info.height), (decoded.width, decoded.height));
        assert_eq!((info.width, info.height), (7, 6));
    }

    #[test]
    fn decoder_panics_become_errors() {
        let bytes = jpeg_with_odd_sampling();
        let info = probe(&bytes).unwrap();
        assert_eq!(
            (info.format, info.width, info.height),
            (ImageFormat::Jpeg, 16, 8)
        );
        // zune-jpeg 0.5.15 panics here (the message shows on stderr); later versions may decode it.
        match decode(&bytes, &DecodeOptions::default()) {
            Ok(img) => assert_eq!((img.width, img.height), (16, 8)),
            Err(e) => assert!(matches!(e, Error::Decode(_)), "{e:?}"),
        }
        let err = guarded::<()>(|| panic!("index out of bounds")).unwrap_err();
        assert!(
            matches!(&err, Error::Decode(m) if m.contains("index out of bounds")),
            "{err:?}"
        );
        let err = guarded::<()>(|| panic!("{} {}", "formatted", 1)).unwrap_err();
        assert!(err.to_string().contains("formatted 1"), "{err}");
    }

    #[test]
    fn alpha_is_dropped_or_composited() {
        assert_eq!(flatten_alpha([200, 100, 0], 0, None), [200, 100, 0]);
        assert_eq!(flatten_alpha([200, 100, 0], 0, Some([255; 3])), [255; 3]);
        assert_eq!(
            flatten_alpha([200, 100, 0], 255, Some([255; 3])),
            [200, 100, 0]
        );
        assert_eq!(flatten_alpha([0, 0, 0], 128, Some([255; 3])), [127; 3]);
    }

    #[test]
    fn sixteen_bit_keeps_high_byte() {
        let raw: Vec<u8> = [0x12ffu16, 0xff00, 0x0080]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        assert_eq!(
            to_rgb8(&raw, ColorType::Rgb16, None).unwrap(),
            vec![0x12, 0xff, 0x00]
        );
    }
}
