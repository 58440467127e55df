//! The element types that travel on the wire, and bfloat16 conversion.

use crate::error::{tensor_err, Result};
use half::{bf16, f16};
use multiversion::multiversion;

/// The four dtype names of the remote-VAE protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    U8,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F16, DType::BF16, DType::F32, DType::U8];

    /// Parses a protocol dtype name (`float16`, `bfloat16`, `float32`, `uint8`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "float16" => Ok(DType::F16),
            "bfloat16" => Ok(DType::BF16),
            "float32" => Ok(DType::F32),
            "uint8" => Ok(DType::U8),
            other => tensor_err!(
                "unknown dtype {other:?}; expected one of float16, bfloat16, float32, uint8"
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::U8 => "uint8",
        }
    }

    pub fn itemsize(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::U8 => 1,
        }
    }

    /// A stable one-byte code, used in the compressed-tensor header.
    pub fn code(self) -> u8 {
        match self {
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::F32 => 3,
            DType::U8 => 4,
        }
    }

    pub fn from_code(code: u8) -> Result<Self> {
        DType::ALL
            .into_iter()
            .find(|d| d.code() == code)
            .map_or_else(|| tensor_err!("unknown dtype code {code}"), Ok)
    }
}

/// A float element type that converts to and from `f32` (the type all arithmetic happens in).
pub trait Float: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(value: f32) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
}

impl Float for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
}

impl Float for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        bf16::from_bits(f32_to_bf16_bits(value))
    }
}

/// float32 -> bfloat16 bits, rounding to nearest even; NaN stays a (quiet) NaN of the same sign.
///
/// Branch-light so that slice conversions vectorise (this runs at memory speed on large latents).
#[inline(always)]
pub fn f32_to_bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) as u16) | 0x0040;
    // Signed compare on the non-negative magnitude: a single SSE2 instruction per lane.
    let is_nan = (bits & 0x7fff_ffff) as i32 > 0x7f80_0000;
    if is_nan {
        quiet_nan
    } else {
        rounded
    }
}

/// Converts a float32 slice to bfloat16 bits into `out` (same length).
pub fn f32_to_bf16_slice(src: &[f32], out: &mut [u16]) -> Result<()> {
    check_same_len(src.len(), out.len())?;
    f32_to_bf16_kernel(src, out);
    Ok(())
}

/// Converts bfloat16 bits to float32 into `out` (same length); exact.
pub fn bf16_to_f32_slice(src: &[u16], out: &mut [f32]) -> Result<()> {
    check_same_len(src.len(), out.len())?;
    bf16_to_f32_kernel(src, out);
    Ok(())
}

// Compiled for several instruction sets and picked at run time: the wheel stays baseline x86-64, yet
// these loops run with AVX2 where the CPU has it (SSE2 alone cannot vectorise the 32 -> 16-bit pack).
#[multiversion(targets = "simd")]
fn f32_to_bf16_kernel(src: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(src) {
        *o = f32_to_bf16_bits(v);
    }
}

#[multiversion(targets = "simd")]
fn bf16_to_f32_kernel(src: &[u16], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(src) {
        *o = f32::from_bits((v as u32) << 16);
    }
}

fn check_same_len(a: usize, b: usize) -> Result<()> {
    if a != b {
        return tensor_err!("length mismatch: {a} input elements, {b} output elements");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.name()).unwrap(), d);
            assert_eq!(DType::from_code(d.code()).unwrap(), d);
        }
        assert!(DType::parse("float64").is_err());
        assert!(DType::from_code(0).is_err());
    }

    #[test]
    fn bf16_matches_half_crate_on_many_values() {
        let mut x: u32 = 0x1234_5678;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            let ours = f32_to_bf16_bits(v);
            let theirs = bf16::from_f32(v).to_bits();
            if v.is_nan() {
                assert!(f32::from_bits((ours as u32) << 16).is_nan());
            } else {
                assert_eq!(ours, theirs, "value {v:e} bits {x:#x}");
            }
        }
    }

    #[test]
    fn bf16_rounds_half_to_even_and_keeps_specials() {
        // 1 + 2^-8 is exactly halfway between two bf16 values; even mantissa wins (down to 1.0).
        assert_eq!(f32_to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3 * 2^-8 is halfway too; rounding goes up to the even neighbour.
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80); // overflows to infinity
        assert_eq!(f32_to_bf16_bits(-0.0), 0x8000);
        assert!(bf16::from_bits(f32_to_bf16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn slice_conversion_checks_lengths() {
        let mut out = [0u16; 2];
        assert!(f32_to_bf16_slice(&[1.0], &mut out).is_err());
        let mut back = [0f32; 2];
        f32_to_bf16_slice(&[1.5, -2.0], &mut out).unwrap();
        bf16_to_f32_slice(&out, &mut back).unwrap();
        assert_eq!(back, [1.5, -2.0]);
    }
}
