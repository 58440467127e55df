//! Arbitrary bytes as a vaelink compressed tensor (`VLZ1` header + zstd frame).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vaelink_core::compress::{compress, decompress, DEFAULT_LEVEL};

fuzz_target!(|data: &[u8]| {
    let Ok((spec, raw)) = decompress(data, 1 << 28) else {
        return;
    };
    assert_eq!(raw.len(), spec.byte_len());
    let again = compress(&raw, &spec, DEFAULT_LEVEL).expect("recompressing decompressed data");
    let (spec2, raw2) = decompress(&again, 1 << 28).expect("decompressing our own output");
    assert_eq!(spec2, spec);
    assert_eq!(raw2, raw);
});
