//! The wire description as it arrives from a peer: a `shape` header, a dtype name and a body length.
//!
//! Input layout: 8 bytes little-endian body length, then `shape header \n dtype name` (lossy UTF-8).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vaelink_core::wire::{parse_shape_header, TensorSpec, MAX_NDIM};
use vaelink_core::DType;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let body_len = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let text = String::from_utf8_lossy(&data[8..]);
    let (header, dtype_name) = text.split_once('\n').unwrap_or((&text, "float16"));
    let dtype = DType::parse(dtype_name.trim()).unwrap_or(match dtype_name.len() % 4 {
        0 => DType::F16,
        1 => DType::BF16,
        2 => DType::F32,
        _ => DType::U8,
    });

    if let Ok(dims) = parse_shape_header(header) {
        check_spec(TensorSpec::new(&dims, dtype), body_len);
    }

    // The same dimensions as signed integers (a query string or JSON list), negative ones included.
    let signed: Option<Vec<i64>> = header
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|d| d.trim().parse::<i64>().ok())
        .collect();
    if let Some(signed) = signed {
        let spec = TensorSpec::from_signed(&signed, dtype);
        if signed.iter().any(|&d| d < 0) {
            assert!(spec.is_err());
        }
        check_spec(spec, body_len);
    }
});

fn check_spec(spec: vaelink_core::Result<TensorSpec>, body_len: usize) {
    let Ok(spec) = spec else { return };
    let shape = spec.shape();
    assert!(!shape.is_empty() && shape.len() <= MAX_NDIM);
    let product = shape
        .iter()
        .try_fold(spec.dtype().itemsize(), |a, &d| a.checked_mul(d));
    assert_eq!(product, Some(spec.byte_len()));
    assert!(spec.byte_len() <= isize::MAX as usize);
    assert_eq!(spec.numel() * spec.dtype().itemsize(), spec.byte_len());
    assert!(spec.check_body_len(spec.byte_len()).is_ok());
    assert_eq!(
        spec.check_body_len(body_len).is_ok(),
        body_len == spec.byte_len()
    );
    assert_eq!(parse_shape_header(&spec.shape_header()).unwrap(), shape);
}
