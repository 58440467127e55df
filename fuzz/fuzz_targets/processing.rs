//! Pre/post-processing, Flux packing and fitting with arbitrary, often inconsistent, dims and buffer
//! lengths: every call must return (an error for bad input), never panic, overflow or allocate wildly.
//!
//! Input layout: an op byte, a flags byte, dimension bytes (see `dim`), then a payload used as the
//! element buffer.
#![no_main]

use half::{bf16, f16};
use libfuzzer_sys::fuzz_target;
use vaelink_core::packing::{pack, unpack};
use vaelink_core::process::{fit_to_multiple, postprocess, preprocess, resize, Dims, FitMode};

/// Largest buffer a consistent case builds (elements), to keep runs fast.
const MAX_ELEMS: usize = 1 << 16;

struct Input<'a> {
    bytes: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&b, rest)) => {
                self.bytes = rest;
                b
            }
            None => 0,
        }
    }

    /// A dimension: mostly small (0..=47), sometimes a power of two or close to `usize::MAX`.
    fn dim(&mut self) -> usize {
        let b = self.byte();
        match b {
            0xf0..=0xff => usize::MAX - (b & 0x0f) as usize,
            0xc0..=0xef => 1usize << ((b - 0xc0) as u32 + 16),
            _ => (b % 48) as usize,
        }
    }
}

/// `len` elements cycled from `payload` (or the payload itself when `len` is `None`).
fn buffer(payload: &[u8], len: Option<usize>) -> Vec<u8> {
    match len {
        Some(len) if !payload.is_empty() => payload.iter().copied().cycle().take(len).collect(),
        Some(len) => vec![0x5a; len],
        None => payload.to_vec(),
    }
}

fn product(dims: &[usize]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMS)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { bytes: data };
    let op = input.byte();
    let flags = input.byte();
    // Bit 0: build a buffer whose length matches the dims; bit 1: make the output one element short.
    let consistent = flags & 1 != 0;
    let short_out = flags & 2 != 0;
    let (a, b, c, d) = (input.dim(), input.dim(), input.dim(), input.dim());
    let (e, f) = (input.dim(), input.dim());
    let payload = input.bytes;
    let want = |dims: &[usize], itemsize: usize| {
        consistent
            .then(|| product(dims))
            .flatten()
            .map(|n| n * itemsize)
    };

    match op % 8 {
        0 => {
            let dims = Dims {
                n: a,
                channels: c % 5,
                height: b,
                width: d,
            };
            let src = buffer(payload, want(&[a, c % 5, b, d], 1));
            let out_len = src.len().saturating_sub(short_out as usize);
            let (mut o32, mut o16, mut ob16) = (
                vec![0f32; out_len],
                vec![f16::ZERO; out_len],
                vec![bf16::ZERO; out_len],
            );
            let r = preprocess(&src, dims, &mut o32);
            assert_eq!(r.is_ok(), preprocess(&src, dims, &mut o16).is_ok());
            assert_eq!(r.is_ok(), preprocess(&src, dims, &mut ob16).is_ok());
            if r.is_ok() {
                assert!(o32.iter().all(|v| (-1.0..=1.0).contains(v)));
                // Back to pixels exactly (NCHW -> NHWC).
                let mut back = vec![0u8; src.len()];
                postprocess(&o32, dims, &mut back).unwrap();
                assert_eq!(back, src);
            }
        }
        1 => {
            let dims = Dims {
                n: a,
                channels: c,
                height: b,
                width: d,
            };
            let src = buffer(payload, want(&[a, b, c, d], 4));
            let floats: Vec<f32> = src
                .chunks_exact(4)
                .map(|x| f32::from_le_bytes(x.try_into().unwrap()))
                .collect();
            let halves: Vec<f16> = floats.iter().map(|&x| f16::from_f32(x)).collect();
            let brains: Vec<bf16> = floats.iter().map(|&x| bf16::from_f32(x)).collect();
            let mut out = vec![0u8; floats.len().saturating_sub(short_out as usize)];
            let r = postprocess(&floats, dims, &mut out);
            assert_eq!(r.is_ok(), postprocess(&halves, dims, &mut out).is_ok());
            assert_eq!(r.is_ok(), postprocess(&brains, dims, &mut out).is_ok());
        }
        2 | 3 => {
            let shape = [a, b, c, d];
            let src = buffer(payload, want(&shape, 1));
            if let Ok(packed) = pack(&src, shape) {
                assert_eq!(packed.len(), src.len());
                // Unpacking with the image size that gives back this latent size restores the input.
                let (back, back_shape) =
                    unpack(&packed, [a, (c / 2) * (d / 2), 4 * b], 8 * c, 8 * d).unwrap();
                assert_eq!(back_shape, shape);
                assert_eq!(back, src);
            }
            let wide: Vec<u32> = src.iter().map(|&x| x as u32).collect();
            let _ = pack(&wide, shape);
        }
        4 | 5 => {
            // Packed `[B, seq, ch]` and an arbitrary image size (height/width may be huge).
            let shape = [a, b, c];
            let src = buffer(payload, want(&shape, 1));
            let (height, width) = if op & 0x80 != 0 {
                (e, f)
            } else {
                (16 * (e % 8) + d % 16, 16 * (f % 8) + d / 16)
            };
            if let Ok((out, [ub, uc, uh, uw])) = unpack(&src, shape, height, width) {
                assert_eq!(out.len(), src.len());
                assert_eq!(ub * uc * uh * uw, out.len());
                assert_eq!(pack(&out, [ub, uc, uh, uw]).unwrap(), src);
            }
        }
        6 => {
            let (w, h) = (a % 40, b % 40);
            let pixels = buffer(payload, want(&[w, h, 3], 1));
            let mode = if flags & 4 != 0 {
                FitMode::Resize
            } else {
                FitMode::Crop
            };
            if let Ok(img) = fit_to_multiple(&pixels, w, h, c, mode) {
                assert!(img.width <= w && img.height <= h);
                assert!(img.width % c == 0 && img.height % c == 0);
                assert_eq!(img.data.len(), img.width * img.height * 3);
            }
        }
        _ => {
            let (w, h) = (a % 40, b % 40);
            let pixels = buffer(payload, want(&[w, h, 3], 1));
            // Small targets only: the caller chooses the output size, so a huge one is its own doing.
            if let Ok(img) = resize(&pixels, w, h, c % 64, d % 64) {
                assert_eq!((img.width, img.height), (c % 64, d % 64));
            }
        }
    }
});
