//! The tensor wire format of the remote-VAE protocol: a raw, contiguous, little-endian element buffer
//! described by a `shape` and a `dtype` that travel beside it (query string or headers).

use crate::dtype::DType;
use crate::error::{tensor_err, Result};

/// Most dimensions a wire tensor may have (video latents use five).
pub const MAX_NDIM: usize = 8;

/// The description of a wire tensor: shape and dtype, validated so that its byte length is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    shape: Vec<usize>,
    dtype: DType,
    byte_len: usize,
}

impl TensorSpec {
    /// Validates a shape: 1 to [`MAX_NDIM`] dimensions, each at least 1, and a byte length that fits
    /// in memory addressing (no overflow, whatever the peer sent).
    pub fn new(shape: &[usize], dtype: DType) -> Result<Self> {
        if shape.is_empty() || shape.len() > MAX_NDIM {
            return tensor_err!("a tensor needs 1 to {MAX_NDIM} dimensions, got shape {shape:?}");
        }
        if shape.contains(&0) {
            return tensor_err!("tensor shape {shape:?} has a zero dimension");
        }
        let byte_len = shape
            .iter()
            .try_fold(dtype.itemsize(), |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= isize::MAX as usize)
            .map_or_else(|| tensor_err!("tensor shape {shape:?} is too large"), Ok)?;
        Ok(Self {
            shape: shape.to_vec(),
            dtype,
            byte_len,
        })
    }

    /// Parses a shape given as signed integers (as they arrive from a query string or JSON).
    pub fn from_signed(shape: &[i64], dtype: DType) -> Result<Self> {
        let dims = shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| ()))
            .collect::<Result<Vec<_>, ()>>();
        match dims {
            Ok(dims) => Self::new(&dims, dtype),
            Err(()) => tensor_err!("tensor shape {shape:?} has a negative dimension"),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.byte_len / self.dtype.itemsize()
    }

    pub fn byte_len(&self) -> usize {
        self.byte_len
    }

    /// Checks that a body of `len` bytes holds exactly this tensor.
    pub fn check_body_len(&self, len: usize) -> Result<()> {
        if len != self.byte_len {
            return tensor_err!(
                "body has {len} bytes but shape {:?} of {} needs {} bytes",
                self.shape,
                self.dtype.name(),
                self.byte_len
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_len_and_body_check() {
        let spec = TensorSpec::new(&[1, 4, 128, 128], DType::F16).unwrap();
        assert_eq!(spec.byte_len(), 131_072);
        assert_eq!(spec.numel(), 65_536);
        assert!(spec.check_body_len(131_072).is_ok());
        let err = spec.check_body_len(131_071).unwrap_err().to_string();
        assert!(err.contains("131071") && err.contains("131072"), "{err}");
    }

    #[test]
    fn hostile_shapes_are_errors() {
        assert!(TensorSpec::new(&[], DType::F32).is_err());
        assert!(TensorSpec::new(&[1, 0, 4], DType::F32).is_err());
        assert!(TensorSpec::new(&[1; 9], DType::U8).is_err());
        assert!(TensorSpec::new(&[usize::MAX, 2], DType::U8).is_err());
        assert!(TensorSpec::new(&[1 << 31, 1 << 31, 1 << 31], DType::F32).is_err());
        assert!(TensorSpec::from_signed(&[1, -4, 8], DType::F32).is_err());
        assert!(TensorSpec::from_signed(&[1, 4, 8], DType::F32).is_ok());
    }
}
