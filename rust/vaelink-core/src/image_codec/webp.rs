//! WebP through libwebp (built from source by libwebp-sys): lossless encoding at libwebp's default
//! effort, and decoding of still images. This module holds the only `unsafe` of the codecs: each call
//! gets a buffer it cannot overrun (sizes checked before, lengths passed), and owns what it frees.

use libwebp_sys as ffi;

use crate::error::{Error, Result};

/// What a WebP file's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Features {
    pub width: u32,
    pub height: u32,
    pub has_alpha: bool,
    pub animated: bool,
}

/// The header's size and layout, or `None` when libwebp cannot read it.
pub(crate) fn features(data: &[u8]) -> Option<Features> {
    let mut f = ffi::WebPBitstreamFeatures {
        width: 0,
        height: 0,
        has_alpha: 0,
        has_animation: 0,
        format: 0,
        pad: [0; 5],
    };
    // SAFETY: `data` is valid for `data.len()` bytes and `f` is a plain struct libwebp fills in.
    let status = unsafe { ffi::WebPGetFeatures(data.as_ptr(), data.len(), &mut f) };
    let (width, height) = (u32::try_from(f.width).ok()?, u32::try_from(f.height).ok()?);
    (status == ffi::VP8StatusCode::VP8_STATUS_OK).then_some(Features {
        width,
        height,
        has_alpha: f.has_alpha != 0,
        animated: f.has_animation != 0,
    })
}

/// Decodes a still WebP into RGB8 (`channels` 3) or RGBA8 (4, not premultiplied), rows top to
/// bottom; the caller has checked `width * height` against its limit.
pub(crate) fn decode(data: &[u8], f: &Features, channels: usize) -> Result<Vec<u8>> {
    let stride = f.width as usize * channels;
    let len = stride
        .checked_mul(f.height as usize)
        .ok_or_else(|| Error::Decode("WebP image too large".into()))?;
    let stride_c = i32::try_from(stride).map_err(|_| Error::Decode("WebP row too wide".into()))?;
    let mut out = vec![0u8; len];
    let into = if channels == 4 {
        ffi::WebPDecodeRGBAInto
    } else {
        ffi::WebPDecodeRGBInto
    };
    // SAFETY: `out` is `len` bytes, `stride * height` of them; libwebp writes within what it is
    // told and returns null on any error (including a header that does not match `f`).
    let written = unsafe { into(data.as_ptr(), data.len(), out.as_mut_ptr(), len, stride_c) };
    if written.is_null() {
        return Err(Error::Decode(
            "cannot decode image: libwebp refused the WebP data (corrupt or truncated)".into(),
        ));
    }
    Ok(out)
}

/// Lossless WebP of interleaved RGB8 pixels, at libwebp's default effort (method 4).
pub(crate) fn encode_lossless(pixels: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let too_large = || Error::Encode(format!("{width}x{height} is too large for WebP"));
    let w = i32::try_from(width).map_err(|_| too_large())?;
    let h = i32::try_from(height).map_err(|_| too_large())?;
    let stride = w.checked_mul(3).ok_or_else(too_large)?;
    let mut output: *mut u8 = std::ptr::null_mut();
    // SAFETY: the caller checked `pixels.len() == width * height * 3`; libwebp allocates `output`.
    let size = unsafe { ffi::WebPEncodeLosslessRGB(pixels.as_ptr(), w, h, stride, &mut output) };
    if output.is_null() {
        return Err(Error::Encode("cannot encode image: libwebp failed".into()));
    }
    // SAFETY: libwebp returned `size` bytes at `output`, which we copy and then free once.
    let encoded = unsafe { std::slice::from_raw_parts(output, size).to_vec() };
    unsafe { ffi::WebPFree(output.cast()) };
    if size == 0 {
        return Err(Error::Encode("cannot encode image: libwebp failed".into()));
    }
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixels(width: usize, height: usize) -> Vec<u8> {
        (0..width * height * 3)
            .map(|i| (i * 7 % 251) as u8)
            .collect()
    }

    #[test]
    fn lossless_round_trip() {
        let data = pixels(37, 23);
        let webp = encode_lossless(&data, 37, 23).unwrap();
        let f = features(&webp).unwrap();
        assert_eq!((f.width, f.height, f.animated), (37, 23, false));
        assert_eq!(decode(&webp, &f, 3).unwrap(), data);
        let rgba = decode(&webp, &f, 4).unwrap();
        assert!(rgba.chunks_exact(4).all(|p| p[3] == 255));
        assert_eq!(
            rgba.chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect::<Vec<_>>(),
            data
        );
    }

    #[test]
    fn damaged_data_is_an_error_not_a_crash() {
        let webp = encode_lossless(&pixels(64, 64), 64, 64).unwrap();
        let f = features(&webp).unwrap();
        for cut in [webp.len() / 2, webp.len() - 1, 40] {
            assert!(decode(&webp[..cut], &f, 3).is_err(), "cut at {cut}");
        }
        let lying = Features { width: 63, ..f }; // a buffer too small for what the header says
        assert!(decode(&webp, &lying, 3).is_err());
        assert!(features(b"RIFF\0\0\0\0WEBPVP8 ").is_none());
        assert!(features(&[]).is_none());
    }
}
