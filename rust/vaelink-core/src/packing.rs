//! Flux latent packing: `[B, C, H, W] <-> [B, (H/2)(W/2), 4C]`, the 2x2 patchify of diffusers'
//! `FluxPipeline._pack_latents` / `_unpack_latents`. Pure data movement, so generic over the element.

use crate::error::{tensor_err, Result};

/// `view(B, C, H/2, 2, W/2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H/2)(W/2), 4C)`.
pub fn pack<T: Copy>(src: &[T], shape: [usize; 4]) -> Result<Vec<T>> {
    let [b, c, h, w] = shape;
    if h % 2 != 0 || w % 2 != 0 {
        return tensor_err!("packing needs even height and width, got {h}x{w}");
    }
    check_len(src.len(), &shape)?;
    let (hh, wh) = (h / 2, w / 2);
    let mut out = Vec::with_capacity(src.len());
    for bi in 0..b {
        let batch = &src[bi * c * h * w..][..c * h * w];
        for y in 0..hh {
            for x in 0..wh {
                for ci in 0..c {
                    let base = ci * h * w + 2 * y * w + 2 * x;
                    out.extend_from_slice(&[
                        batch[base],
                        batch[base + 1],
                        batch[base + w],
                        batch[base + w + 1],
                    ]);
                }
            }
        }
    }
    Ok(out)
}

/// The packed sequence length and latent size for an image of `height x width` pixels, as diffusers
/// computes them: `h = 2 * (height // 16)`, `w = 2 * (width // 16)`.
pub fn packed_latent_size(height: usize, width: usize) -> (usize, usize) {
    (2 * (height / 16), 2 * (width / 16))
}

/// `view(B, h/2, w/2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)` with `h, w` from the image
/// size (see [`packed_latent_size`]). Returns the data and the unpacked shape.
pub fn unpack<T: Copy>(
    src: &[T],
    shape: [usize; 3],
    height: usize,
    width: usize,
) -> Result<(Vec<T>, [usize; 4])> {
    let [b, seq, ch] = shape;
    check_len(src.len(), &shape)?;
    let (h, w) = packed_latent_size(height, width);
    if h == 0 || w == 0 {
        return tensor_err!(
            "image size {height}x{width} is too small to unpack latents (16 pixels at least)"
        );
    }
    if ch % 4 != 0 {
        return tensor_err!("packed latents need a channel count divisible by 4, got {ch}");
    }
    // Checked: a huge image size (from a request) must be an error, not an overflow.
    let tokens = (h / 2).checked_mul(w / 2);
    if tokens != Some(seq) {
        let needed = tokens.map_or_else(|| "more than usize::MAX".into(), |t| t.to_string());
        return tensor_err!(
            "packed latents have {seq} tokens, but a {height}x{width} image needs {needed}"
        );
    }
    let c = ch / 4;
    let mut out = Vec::with_capacity(src.len());
    // Output order (channel, row, column): each element reads its slot of the 2x2 patch it belongs to.
    for bi in 0..b {
        let batch = &src[bi * seq * ch..][..seq * ch];
        for ci in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let token = (y / 2) * (w / 2) + x / 2;
                    out.push(batch[token * ch + ci * 4 + (y % 2) * 2 + x % 2]);
                }
            }
        }
    }
    Ok((out, [b, c, h, w]))
}

fn check_len(len: usize, shape: &[usize]) -> Result<()> {
    let expected = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if shape.contains(&0) || expected != Some(len) {
        return tensor_err!("{len} elements do not fill shape {shape:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_unpack_is_identity() {
        let shape = [2, 3, 4, 6];
        let src: Vec<u32> = (0..2 * 3 * 4 * 6).collect();
        let packed = pack(&src, shape).unwrap();
        assert_eq!(packed.len(), src.len());
        // token 0 of batch 0, channel 0 is the top-left 2x2 patch: (0, 1, 6, 7).
        assert_eq!(&packed[..4], &[0, 1, 6, 7]);
        let (back, unpacked_shape) = unpack(&packed, [2, 6, 12], 32, 48).unwrap();
        assert_eq!(unpacked_shape, shape);
        assert_eq!(back, src);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(pack(&[0u8; 12], [1, 1, 3, 4]).is_err());
        assert!(pack(&[0u8; 11], [1, 1, 2, 6]).is_err());
        assert!(unpack(&[0u8; 23], [1, 6, 4], 64, 96).is_err()); // length does not fill the shape
        assert!(unpack(&[0u8; 24], [1, 4, 6], 32, 32).is_err()); // ch 6 not divisible by 4
        assert!(unpack(&[0u8; 16], [1, 4, 4], 8, 8).is_err()); // image too small
        assert!(unpack(&[0u8; 16], [1, 4, 4], 48, 32).is_err()); // 6 tokens needed, 4 given
    }

    #[test]
    fn huge_image_size_is_an_error_not_an_overflow() {
        // Found by the `processing` fuzz target: (h/2) * (w/2) overflowed.
        let err = unpack(&[0u8; 16], [1, 4, 4], usize::MAX, usize::MAX).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        assert!(unpack(&[0u8; 16], [1, 4, 4], usize::MAX, 16).is_err());
    }
}
