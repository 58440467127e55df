//! Baseline JPEG encoding with libjpeg-turbo (`turbo.rs`), in parallel: the image is cut into horizontal strips
//! at MCU-row boundaries, each strip is encoded on its own thread, and the strips' entropy-coded
//! data are joined with restart markers under the first strip's header (its height patched, its
//! restart interval one strip). A restart only resets the DC predictions, and every block is coded
//! exactly as in a one-piece encode, so the joined file decodes to the same pixels; it is a plain
//! baseline JPEG that every decoder reads.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Chroma subsampling of a JPEG. 4:2:0 is libjpeg's and Pillow's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChromaSubsampling {
    /// Chroma at full resolution.
    S444,
    /// Chroma halved horizontally.
    S422,
    /// Chroma halved both ways.
    #[default]
    S420,
}

impl ChromaSubsampling {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "4:4:4" => Ok(Self::S444),
            "4:2:2" => Ok(Self::S422),
            "4:2:0" => Ok(Self::S420),
            other => Err(Error::Encode(format!(
                "unknown chroma subsampling {other:?}; expected 4:4:4, 4:2:2 or 4:2:0"
            ))),
        }
    }

    /// The luma samples per MCU, horizontally and vertically.
    fn mcu(self) -> (usize, usize) {
        match self {
            Self::S444 => (8, 8),
            Self::S422 => (16, 8),
            Self::S420 => (16, 16),
        }
    }
}

/// Below this many pixels per strip, a strip's header and setup cost more than its thread saves.
const MIN_STRIP_PIXELS: usize = 1 << 17;

const SOF0: u8 = 0xC0;
const SOS: u8 = 0xDA;
const EOI: u8 = 0xD9;
const RST0: u8 = 0xD0;

/// Encodes `height` rows of interleaved RGB8 `pixels` as a baseline JPEG into `out`.
pub fn encode_jpeg(
    pixels: &[u8],
    width: u16,
    height: u16,
    quality: u8,
    subsampling: ChromaSubsampling,
    out: &mut Vec<u8>,
) -> Result<()> {
    let strips = rayon::current_num_threads()
        .min(usize::from(width) * usize::from(height) / MIN_STRIP_PIXELS)
        .max(1);
    encode_in_strips(pixels, width, height, quality, subsampling, strips, out)
}

/// `encode_jpeg` with about `strips` strips (fewer when the image has fewer MCU rows, more when
/// one strip would exceed the 65535 MCUs a restart interval can hold).
pub(crate) fn encode_in_strips(
    pixels: &[u8],
    width: u16,
    height: u16,
    quality: u8,
    subsampling: ChromaSubsampling,
    strips: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    let (mcu_w, mcu_h) = subsampling.mcu();
    let (w, h) = (usize::from(width), usize::from(height));
    let mcus_per_row = w.div_ceil(mcu_w);
    let mcu_rows = h.div_ceil(mcu_h);
    let max_rows = (usize::from(u16::MAX) / mcus_per_row.max(1)).max(1);
    let rows_per_strip = mcu_rows.div_ceil(strips.max(1)).clamp(1, max_rows);
    let strip_rows = rows_per_strip * mcu_h;
    if strip_rows >= h {
        return encode_strip(pixels, width, height, quality, subsampling, None, out);
    }
    let interval = u16::try_from(rows_per_strip * mcus_per_row).ok();
    let pieces = pixels
        .par_chunks(strip_rows * w * 3)
        .map(|strip| {
            let rows = u16::try_from(strip.len() / (w * 3)).map_err(encode_err)?;
            let mut piece = Vec::with_capacity(strip.len() / 4);
            encode_strip(
                strip,
                width,
                rows,
                quality,
                subsampling,
                interval,
                &mut piece,
            )?;
            Ok(piece)
        })
        .collect::<Result<Vec<_>>>()?;
    join(&pieces, height, out)
}

fn encode_strip(
    pixels: &[u8],
    width: u16,
    height: u16,
    quality: u8,
    subsampling: ChromaSubsampling,
    restart_interval: Option<u16>,
    out: &mut Vec<u8>,
) -> Result<()> {
    super::turbo::compress(
        pixels,
        usize::from(width),
        usize::from(height),
        quality,
        subsampling,
        restart_interval,
        out,
    )
}

/// The first strip's header with the whole image's height, each strip's entropy-coded data
/// followed by the next restart marker, and the end of the image.
fn join(pieces: &[Vec<u8>], height: u16, out: &mut Vec<u8>) -> Result<()> {
    let total: usize = pieces.iter().map(Vec::len).sum();
    out.reserve(total);
    for (index, piece) in pieces.iter().enumerate() {
        let (header_len, sof) = parse_header(piece)?;
        let data = piece
            .get(header_len..piece.len() - 2)
            .filter(|_| piece.ends_with(&[0xFF, EOI]))
            .ok_or_else(|| encode_err("a strip does not end with its end-of-image marker"))?;
        if index == 0 {
            let start = out.len();
            out.extend_from_slice(&piece[..header_len]);
            // SOF0: marker, length (2), precision (1), then the height.
            out[start + sof + 5..start + sof + 7].copy_from_slice(&height.to_be_bytes());
        } else {
            out.extend_from_slice(&[0xFF, RST0 + ((index - 1) % 8) as u8]);
        }
        out.extend_from_slice(data);
    }
    out.extend_from_slice(&[0xFF, EOI]);
    Ok(())
}

/// The length of a JPEG's header (up to its scan's data) and the offset of its SOF0 marker.
fn parse_header(jpeg: &[u8]) -> Result<(usize, usize)> {
    let mut at = 2; // after SOI
    let mut sof = None;
    while let (Some(&0xFF), Some(&marker), Some(len)) =
        (jpeg.get(at), jpeg.get(at + 1), jpeg.get(at + 2..at + 4))
    {
        let end = at + 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
        if marker == SOF0 {
            sof = Some(at);
        }
        if marker == SOS {
            return sof
                .map(|sof| (end, sof))
                .ok_or_else(|| encode_err("a strip has no SOF0 header"));
        }
        at = end;
    }
    Err(encode_err("a strip has no scan"))
}

fn encode_err(e: impl std::fmt::Display) -> Error {
    Error::Encode(format!("cannot encode image: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo_like(width: usize, height: usize) -> Vec<u8> {
        // Smooth gradients with texture, so every block has AC energy and DC varies.
        let mut data = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                let t = ((x * 7 + y * 13) % 31) as u8;
                data.extend_from_slice(&[
                    (x * 255 / width) as u8 ^ t,
                    (y * 255 / height) as u8,
                    ((x + y) % 256) as u8 / 2 + t,
                ]);
            }
        }
        data
    }

    fn decode(jpeg: &[u8]) -> image::RgbImage {
        image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)
            .expect("a valid JPEG")
            .to_rgb8()
    }

    fn encode_with(
        pixels: &[u8],
        w: u16,
        h: u16,
        sub: ChromaSubsampling,
        strips: usize,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        encode_in_strips(pixels, w, h, 90, sub, strips, &mut out).unwrap();
        out
    }

    #[test]
    fn strips_decode_to_the_pixels_of_a_one_piece_encode() {
        for sub in [
            ChromaSubsampling::S420,
            ChromaSubsampling::S422,
            ChromaSubsampling::S444,
        ] {
            // Odd sizes: the last strip and the right edge are partial MCUs.
            for (w, h) in [(203usize, 197usize), (64, 160), (1000, 37)] {
                let pixels = photo_like(w, h);
                let one = encode_with(&pixels, w as u16, h as u16, sub, 1);
                for strips in [2, 3, 11] {
                    let joined = encode_with(&pixels, w as u16, h as u16, sub, strips);
                    assert_ne!(
                        joined, one,
                        "{sub:?} {w}x{h} in {strips} strips was not split"
                    );
                    assert_eq!(decode(&joined), decode(&one), "{sub:?} {w}x{h} in {strips}");
                }
            }
        }
    }

    #[test]
    fn restart_markers_cycle_and_the_header_says_the_whole_height() {
        let pixels = photo_like(64, 16 * 20);
        let jpeg = encode_with(&pixels, 64, 16 * 20, ChromaSubsampling::S420, 20);
        let markers: Vec<u8> = jpeg
            .windows(2)
            .filter(|w| w[0] == 0xFF && (RST0..RST0 + 8).contains(&w[1]))
            .map(|w| w[1] - RST0)
            .collect();
        assert_eq!(markers, (0..19).map(|i| (i % 8) as u8).collect::<Vec<_>>());
        let (_, sof) = parse_header(&jpeg).unwrap();
        assert_eq!(u16::from_be_bytes([jpeg[sof + 5], jpeg[sof + 6]]), 16 * 20);
        assert_eq!(decode(&jpeg).height(), 16 * 20);
    }

    #[test]
    fn subsampling_names() {
        assert_eq!(
            ChromaSubsampling::parse("4:2:0").unwrap(),
            ChromaSubsampling::S420
        );
        assert_eq!(ChromaSubsampling::default(), ChromaSubsampling::S420);
        assert!(ChromaSubsampling::parse("420").is_err());
    }

    #[test]
    fn a_wide_image_keeps_its_restart_interval_within_sixteen_bits() {
        // 8188 MCUs a row at 4:4:4 (65500 is libjpeg's widest): at most 8 MCU rows a strip.
        let (w, h) = (65500u16, 64u16);
        let pixels = vec![128u8; usize::from(w) * usize::from(h) * 3];
        let jpeg = encode_with(&pixels, w, h, ChromaSubsampling::S444, 2);
        let decoded = decode(&jpeg);
        assert_eq!((decoded.width(), decoded.height()), (65500, 64));
    }
}
