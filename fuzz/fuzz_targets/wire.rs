//! The wire description as it arrives from a peer: a shape list, a dtype name and a body length.
//!
//! Input layout: 8 bytes little-endian body length, then `shape list \n dtype name` (lossy UTF-8), the
//! shape a JSON-like list of integers such as `[1,4,128,128]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vaelink_core::wire::{TensorSpec, MAX_NDIM};
use vaelink_core::DType;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let body_len = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let text = String::from_utf8_lossy(&data[8..]);
    let (shape, dtype_name) = text.split_once('\n').unwrap_or((&text, "float16"));
    let dtype = DType::parse(dtype_name.trim()).unwrap_or(match dtype_name.len() % 4 {
        0 => DType::F16,
        1 => DType::BF16,
        2 => DType::F32,
        _ => DType::U8,
    });

    // Signed, as a query string or JSON list carries them: negative dimensions must fail.
    let signed: Option<Vec<i64>> = shape
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|d| d.trim().parse::<i64>().ok())
        .collect();
    let Some(signed) = signed else { return };
    let spec = TensorSpec::from_signed(&signed, dtype);
    if signed.iter().any(|&d| d < 0) {
        assert!(spec.is_err());
    } else {
        // The same dimensions unsigned: `new` must agree with `from_signed`.
        let dims: Vec<usize> = signed.iter().map(|&d| d as usize).collect();
        assert_eq!(TensorSpec::new(&dims, dtype).ok(), spec.as_ref().ok().cloned());
    }
    check_spec(spec, body_len);
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
}
