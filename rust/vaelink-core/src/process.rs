//! Image <-> tensor conversion around the VAE: uint8 `NHWC` pixels to float `NCHW` in [-1, 1] and back,
//! and fitting images to the VAE's spatial multiple.

use fast_image_resize::{
    images::{Image, ImageRef},
    PixelType, ResizeAlg, ResizeOptions, Resizer,
};
use multiversion::multiversion;
use rayon::prelude::*;

use crate::dtype::Float;
use crate::error::{tensor_err, Error, Result};
use crate::image_codec::{check_rgb_len, RgbImage};

/// Below this many bytes of output, threads cost more than they save.
const PARALLEL_MIN_BYTES: usize = 1 << 18;

/// The layout of an image batch: `n` images of `height x width` with `channels` channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Dims {
    fn check(&self, len: usize, what: &str) -> Result<()> {
        let Dims {
            n,
            channels,
            height,
            width,
        } = *self;
        if n == 0 || channels == 0 || height == 0 || width == 0 {
            return tensor_err!("{what} has an empty dimension: {n}x{channels}x{height}x{width}");
        }
        let expected = [n, channels, height, width]
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if expected != Some(len) {
            return tensor_err!(
                "{what} has {len} elements, not n={n} x c={channels} x h={height} x w={width}"
            );
        }
        Ok(())
    }
}

/// `uint8 NHWC` (3 channels) -> `NCHW` floats equal to `2 * x / 255 - 1` computed in float32, then
/// rounded to the output type (round-to-nearest-even, as numpy's `astype`). One pass, via a table.
pub fn preprocess<T: Float>(src: &[u8], dims: Dims, out: &mut [T]) -> Result<()> {
    dims.check(src.len(), "the image batch")?;
    if dims.channels != 3 {
        return tensor_err!("images must have 3 (RGB) channels, got {}", dims.channels);
    }
    if out.len() != src.len() {
        return tensor_err!("output has {} elements, input {}", out.len(), src.len());
    }
    let lut: [T; 256] = std::array::from_fn(|x| T::from_f32(2.0 * x as f32 / 255.0 - 1.0));
    let (h, w) = (dims.height, dims.width);
    let image_px = h * w;
    let rows_per_task = (PARALLEL_MIN_BYTES / (w * 3)).max(1);
    for (src_img, out_img) in src
        .chunks_exact(image_px * 3)
        .zip(out.chunks_exact_mut(image_px * 3))
    {
        let (r, gb) = out_img.split_at_mut(image_px);
        let (g, b) = gb.split_at_mut(image_px);
        if src_img.len() < PARALLEL_MIN_BYTES {
            split_planes(src_img, r, g, b, &lut);
            continue;
        }
        let chunk = rows_per_task * w;
        src_img
            .par_chunks(chunk * 3)
            .zip(
                r.par_chunks_mut(chunk)
                    .zip(g.par_chunks_mut(chunk).zip(b.par_chunks_mut(chunk))),
            )
            .for_each(|(src_rows, (r, (g, b)))| split_planes(src_rows, r, g, b, &lut));
    }
    Ok(())
}

/// Scatters interleaved RGB pixels into three planes through the value table.
fn split_planes<T: Float>(src: &[u8], r: &mut [T], g: &mut [T], b: &mut [T], lut: &[T; 256]) {
    for (i, px) in src.chunks_exact(3).enumerate() {
        r[i] = lut[px[0] as usize];
        g[i] = lut[px[1] as usize];
        b[i] = lut[px[2] as usize];
    }
}

/// Float `NCHW` -> `uint8 NHWC` equal to `round(clamp(x / 2 + 0.5, 0, 1) * 255)` in float32 with
/// round-half-to-even (numpy's `np.round`). NaN becomes 0.
pub fn postprocess<T: Float>(src: &[T], dims: Dims, out: &mut [u8]) -> Result<()> {
    dims.check(src.len(), "the tensor")?;
    if out.len() != src.len() {
        return tensor_err!("output has {} elements, input {}", out.len(), src.len());
    }
    let (c, h, w) = (dims.channels, dims.height, dims.width);
    let plane = h * w;
    for (src_img, out_img) in src
        .chunks_exact(c * plane)
        .zip(out.chunks_exact_mut(c * plane))
    {
        let convert_row = |(y, out_row): (usize, &mut [u8])| {
            // Quantise a run of one channel into a small buffer (a loop the compiler vectorises),
            // then interleave the bytes into the NHWC row.
            let mut run = [0u8; QUANTISE_RUN];
            for ch in 0..c {
                let src_row = &src_img[ch * plane + y * w..][..w];
                for (k, src_run) in src_row.chunks(QUANTISE_RUN).enumerate() {
                    let run = &mut run[..src_run.len()];
                    quantise(src_run, run);
                    let first = k * QUANTISE_RUN;
                    for (i, &q) in run.iter().enumerate() {
                        out_row[(first + i) * c + ch] = q;
                    }
                }
            }
        };
        if out_img.len() >= PARALLEL_MIN_BYTES {
            out_img
                .par_chunks_mut(w * c)
                .enumerate()
                .for_each(convert_row);
        } else {
            out_img.chunks_mut(w * c).enumerate().for_each(convert_row);
        }
    }
    Ok(())
}

const QUANTISE_RUN: usize = 256;

/// 2^23: adding and subtracting it rounds a float in [0, 2^22] to an integer, half to even, in the
/// default rounding mode - the same result as `round_ties_even`, but plain SSE2 arithmetic.
const ROUNDING_MAGIC: f32 = 8_388_608.0;

#[multiversion(targets = "simd")]
fn quantise<T: Float>(src: &[T], out: &mut [u8]) {
    for (q, &v) in out.iter_mut().zip(src) {
        *q = to_u8(v.to_f32());
    }
}

#[inline(always)]
fn to_u8(x: f32) -> u8 {
    // NaN survives the clamp and `as u8` maps it to 0, like numpy's uint8 cast of NaN on x86.
    let y = (x * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0;
    ((y + ROUNDING_MAGIC) - ROUNDING_MAGIC) as u8
}

/// How [`fit_to_multiple`] makes both sides a multiple of the VAE's spatial factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitMode {
    /// Centre-crop to the largest multiple (drops at most `multiple - 1` pixels per side; no resampling).
    Crop,
    /// Resize down to the largest multiple with Lanczos3 (what diffusers' `VaeImageProcessor` does).
    Resize,
}

impl FitMode {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "crop" => Ok(Self::Crop),
            "resize" => Ok(Self::Resize),
            other => tensor_err!("unknown fit mode {other:?}; expected crop or resize"),
        }
    }
}

/// Makes both sides of an interleaved RGB image a multiple of `multiple`, rounding down.
pub fn fit_to_multiple(
    pixels: &[u8],
    width: usize,
    height: usize,
    multiple: usize,
    mode: FitMode,
) -> Result<RgbImage> {
    check_rgb_len(width, height, pixels.len())?;
    if multiple == 0 {
        return tensor_err!("multiple must be at least 1");
    }
    let (w, h) = (width, height);
    let (tw, th) = (w - w % multiple, h - h % multiple);
    if tw == 0 || th == 0 {
        return tensor_err!("image of {w}x{h} is smaller than the multiple {multiple}");
    }
    if (tw, th) == (w, h) {
        return RgbImage::new(w, h, pixels.to_vec());
    }
    match mode {
        FitMode::Crop => {
            let (x0, y0) = ((w - tw) / 2, (h - th) / 2);
            let data = pixels
                .chunks_exact(w * 3)
                .skip(y0)
                .take(th)
                .flat_map(|row| &row[x0 * 3..(x0 + tw) * 3])
                .copied()
                .collect();
            RgbImage::new(tw, th, data)
        }
        FitMode::Resize => resize(pixels, w, h, tw, th),
    }
}

/// Resamples an interleaved RGB image to `width x height` with Lanczos3.
pub fn resize(
    pixels: &[u8],
    src_width: usize,
    src_height: usize,
    width: usize,
    height: usize,
) -> Result<RgbImage> {
    let err = |e: &dyn std::fmt::Display| Error::Tensor(format!("cannot resize: {e}"));
    check_rgb_len(src_width, src_height, pixels.len())?;
    let [sw, sh, dw, dh] =
        [src_width, src_height, width, height].map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    let src = ImageRef::new(sw, sh, pixels, PixelType::U8x3).map_err(|e| err(&e))?;
    let mut dst = Image::new(dw, dh, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(
        fast_image_resize::FilterType::Lanczos3,
    ));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| err(&e))?;
    RgbImage::new(width, height, dst.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn dims(n: usize, c: usize, h: usize, w: usize) -> Dims {
        Dims {
            n,
            channels: c,
            height: h,
            width: w,
        }
    }

    #[test]
    fn preprocess_is_scaled_and_transposed() {
        // One 1x2 image: pixels (0, 128, 255) and (255, 0, 51).
        let src = [0u8, 128, 255, 255, 0, 51];
        let mut out = [0f32; 6];
        preprocess(&src, dims(1, 3, 1, 2), &mut out).unwrap();
        let f = |x: u8| 2.0 * x as f32 / 255.0 - 1.0;
        assert_eq!(out, [f(0), f(255), f(128), f(0), f(255), f(51)]);
        let mut halves = [f16::ZERO; 6];
        preprocess(&src, dims(1, 3, 1, 2), &mut halves).unwrap();
        assert_eq!(halves[0], f16::from_f32(-1.0));
        let mut brains = [bf16::ZERO; 6];
        preprocess(&src, dims(1, 3, 1, 2), &mut brains).unwrap();
        assert_eq!(brains[1], bf16::from_f32(1.0));
    }

    #[test]
    fn preprocess_large_batch_matches_scalar() {
        let (n, h, w) = (2, 300, 301);
        let src: Vec<u8> = (0..n * h * w * 3).map(|i| (i * 31 % 256) as u8).collect();
        let mut out = vec![0f32; src.len()];
        preprocess(&src, dims(n, 3, h, w), &mut out).unwrap();
        for &(b, c, y, x) in &[(0, 0, 0, 0), (1, 2, 299, 300), (1, 1, 150, 7)] {
            let v = src[((b * h + y) * w + x) * 3 + c];
            assert_eq!(
                out[((b * 3 + c) * h + y) * w + x],
                2.0 * v as f32 / 255.0 - 1.0
            );
        }
    }

    #[test]
    fn preprocess_rejects_bad_layouts() {
        let mut out = [0f32; 8];
        assert!(preprocess(&[0u8; 8], dims(1, 4, 1, 2), &mut out).is_err());
        assert!(preprocess(&[0u8; 6], dims(1, 3, 1, 3), &mut out[..6]).is_err());
        assert!(preprocess(&[0u8; 0], dims(0, 3, 1, 1), &mut out[..0]).is_err());
    }

    #[test]
    fn postprocess_rounds_half_to_even_and_clamps() {
        // x = 2 * (k + 0.5) / 255 - 1 hits exact .5 ties only approximately, so test the helper on
        // values whose scaled form is an exact tie: y * 255 = 0.5 -> 0, 1.5 -> 2.
        assert_eq!(((0.5f32 / 255.0) * 255.0).round_ties_even(), 0.0);
        assert_eq!(to_u8(-5.0), 0);
        assert_eq!(to_u8(5.0), 255);
        assert_eq!(to_u8(f32::NAN), 0);
        assert_eq!(to_u8(0.0), 128); // 0.5 * 255 = 127.5 -> 128 (even)
        for k in 0..=255u32 {
            // Exact ties k + 0.5 and their neighbours agree with round_ties_even.
            for y in [
                k as f32,
                k as f32 + 0.5,
                k as f32 + 0.49999997,
                k as f32 + 0.50000006,
            ] {
                let x = (y / 255.0 - 0.5) * 2.0;
                let expected = ((x * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
                assert_eq!(to_u8(x), expected, "x = {x}");
            }
        }
        let src = [-1.0f32, 1.0, 0.0, 0.0, 2.0, -2.0];
        let mut out = [0u8; 6];
        postprocess(&src, dims(1, 3, 1, 2), &mut out).unwrap();
        assert_eq!(out, [0, 128, 255, 255, 128, 0]);
    }

    #[test]
    fn fit_crops_centre_or_resizes() {
        let img = RgbImage::new(10, 9, (0..270).map(|i| i as u8).collect()).unwrap();
        let fit =
            |img: &RgbImage, m, mode| fit_to_multiple(&img.data, img.width, img.height, m, mode);
        let cropped = fit(&img, 8, FitMode::Crop).unwrap();
        assert_eq!((cropped.width, cropped.height), (8, 8));
        assert_eq!(&cropped.data[..3], &img.data[3..6]); // x0 = 1, y0 = 0
        let resized = fit(&img, 8, FitMode::Resize).unwrap();
        assert_eq!((resized.width, resized.height), (8, 8));
        assert!(fit(&img, 16, FitMode::Crop).is_err());
        assert!(fit(&img, 0, FitMode::Crop).is_err());
        assert_eq!(fit(&cropped, 8, FitMode::Crop).unwrap(), cropped);
    }
}
