//! Lossless tensor compression: byte-shuffle (all first bytes of every element, then all second bytes,
//! ...; float exponents compress far better together) followed by zstd, behind a self-describing header.
//!
//! Layout, little-endian:
//! `b"VLZ1" | dtype code: u8 | ndim: u8 | 2 reserved zero bytes | ndim x u64 dims | zstd frame`.

use std::io::Read;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::wire::{TensorSpec, MAX_NDIM};

const MAGIC: &[u8; 4] = b"VLZ1";
const FIXED_HEADER: usize = 8;

/// zstd's default level: a good size at several hundred MB/s.
pub const DEFAULT_LEVEL: i32 = 3;

fn format_err(msg: impl Into<String>) -> Error {
    Error::Format(msg.into())
}

/// Compresses a wire tensor (`data` must be exactly `spec.byte_len()` bytes).
pub fn compress(data: &[u8], spec: &TensorSpec, level: i32) -> Result<Vec<u8>> {
    spec.check_body_len(data.len())?;
    if !zstd::compression_level_range().contains(&level) {
        return Err(format_err(format!(
            "zstd level must be in {:?}, got {level}",
            zstd::compression_level_range()
        )));
    }
    let mut out = Vec::with_capacity(FIXED_HEADER + 8 * spec.shape().len() + data.len() / 2);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[spec.dtype().code(), spec.shape().len() as u8, 0, 0]);
    for &dim in spec.shape() {
        out.extend_from_slice(&(dim as u64).to_le_bytes());
    }
    let shuffled = shuffle(data, spec.dtype().itemsize());
    zstd::stream::copy_encode(shuffled.as_slice(), &mut out, level)?;
    Ok(out)
}

/// Reads the header of a compressed tensor.
pub fn read_header(buf: &[u8]) -> Result<(TensorSpec, usize)> {
    if buf.len() < FIXED_HEADER || &buf[..4] != MAGIC {
        return Err(format_err("not a vaelink compressed tensor (bad magic)"));
    }
    let dtype = DType::from_code(buf[4])?;
    let ndim = buf[5] as usize;
    if ndim == 0 || ndim > MAX_NDIM || buf[6] != 0 || buf[7] != 0 {
        return Err(format_err(format!(
            "corrupt compressed tensor header (ndim {ndim})"
        )));
    }
    let header_len = FIXED_HEADER + 8 * ndim;
    let dims = buf
        .get(FIXED_HEADER..header_len)
        .ok_or_else(|| format_err("compressed tensor header is truncated"))?;
    let shape: Vec<usize> = dims
        .chunks_exact(8)
        .map(|d| usize::try_from(u64::from_le_bytes(d.try_into().expect("8-byte chunk"))))
        .collect::<Result<_, _>>()
        .map_err(|_| format_err("compressed tensor dimension does not fit this machine"))?;
    Ok((TensorSpec::new(&shape, dtype)?, header_len))
}

/// Decompresses into the raw wire bytes and their spec, refusing tensors that declare more than
/// `max_bytes` (a small, honest zstd frame can expand thousands of times). Memory grows only with
/// data actually decompressed, so a header that lies about its size cannot force an allocation.
pub fn decompress(buf: &[u8], max_bytes: usize) -> Result<(TensorSpec, Vec<u8>)> {
    let (spec, header_len) = read_header(buf)?;
    let expected = spec.byte_len();
    if expected > max_bytes {
        return Err(format_err(format!(
            "compressed tensor declares {expected} bytes, over the limit of {max_bytes}"
        )));
    }
    let decoder = zstd::stream::read::Decoder::new(&buf[header_len..])?;
    let mut shuffled = Vec::new();
    decoder
        .take(expected as u64 + 1)
        .read_to_end(&mut shuffled)
        .map_err(|e| format_err(format!("corrupt compressed tensor: {e}")))?;
    if shuffled.len() != expected {
        return Err(format_err(format!(
            "compressed tensor holds {} bytes, its header says {expected}",
            shuffled.len()
        )));
    }
    let data = unshuffle(&shuffled, spec.dtype().itemsize());
    Ok((spec, data))
}

/// Groups byte `j` of every element together: `out[j * n + i] = data[i * size + j]`.
fn shuffle(data: &[u8], size: usize) -> Vec<u8> {
    if size == 1 {
        return data.to_vec();
    }
    let n = data.len() / size;
    let mut out = vec![0u8; data.len()];
    for (i, element) in data.chunks_exact(size).enumerate() {
        for (j, &byte) in element.iter().enumerate() {
            out[j * n + i] = byte;
        }
    }
    out
}

fn unshuffle(data: &[u8], size: usize) -> Vec<u8> {
    if size == 1 {
        return data.to_vec();
    }
    let n = data.len() / size;
    let mut out = vec![0u8; data.len()];
    for (i, element) in out.chunks_exact_mut(size).enumerate() {
        for (j, byte) in element.iter_mut().enumerate() {
            *byte = data[j * n + i];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats() -> (TensorSpec, Vec<u8>) {
        let spec = TensorSpec::new(&[1, 4, 16, 16], DType::F32).unwrap();
        let data = (0..1024)
            .flat_map(|i| ((i as f32 * 0.01).sin()).to_le_bytes())
            .collect();
        (spec, data)
    }

    #[test]
    fn round_trip_and_it_compresses() {
        let (spec, data) = floats();
        let packed = compress(&data, &spec, DEFAULT_LEVEL).unwrap();
        assert!(packed.len() < data.len());
        let (back_spec, back) = decompress(&packed, usize::MAX).unwrap();
        assert_eq!(back_spec, spec);
        assert_eq!(back, data);
    }

    #[test]
    fn shuffle_round_trips() {
        let data: Vec<u8> = (0..24).collect();
        assert_eq!(shuffle(&data, 4)[..6], [0, 4, 8, 12, 16, 20]);
        assert_eq!(unshuffle(&shuffle(&data, 4), 4), data);
    }

    #[test]
    fn hostile_buffers_are_errors() {
        let (spec, data) = floats();
        let packed = compress(&data, &spec, DEFAULT_LEVEL).unwrap();
        assert!(compress(&data[1..], &spec, 3).is_err());
        assert!(compress(&data, &spec, 1000).is_err());
        assert!(decompress(b"", usize::MAX).is_err());
        assert!(decompress(&packed, data.len() - 1).is_err()); // over the caller's limit
        assert!(decompress(b"VLZ1", usize::MAX).is_err());
        assert!(decompress(&packed[..packed.len() - 5], usize::MAX).is_err());
        let mut bad_magic = packed.clone();
        bad_magic[0] = b'X';
        assert!(decompress(&bad_magic, usize::MAX).is_err());
        // A header claiming a far larger tensor than the frame holds.
        let mut liar = packed.clone();
        liar[FIXED_HEADER..FIXED_HEADER + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decompress(&liar, usize::MAX).is_err());
        let mut smaller = packed;
        smaller[FIXED_HEADER + 8..FIXED_HEADER + 16].copy_from_slice(&2u64.to_le_bytes());
        assert!(decompress(&smaller, usize::MAX).is_err());
    }
}
