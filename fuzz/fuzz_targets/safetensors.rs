//! Arbitrary bytes as a safetensors latents file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vaelink_core::latents_file::{deserialize, serialize};

fuzz_target!(|data: &[u8]| {
    let Ok((tensors, metadata)) = deserialize(data) else {
        return;
    };
    for t in &tensors {
        assert_eq!(t.data.len(), t.spec.byte_len());
    }
    let borrowed: Vec<_> = tensors
        .iter()
        .map(|t| (t.name.as_str(), &t.spec, t.data.as_slice()))
        .collect();
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    let bytes = serialize(&borrowed, meta).expect("re-serialising parsed tensors");
    let (back, back_meta) = deserialize(&bytes).expect("parsing our own output");
    assert_eq!(back_meta, metadata);
    let mut a = tensors.clone();
    let mut b = back;
    a.sort_by(|x, y| x.name.cmp(&y.name));
    b.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(a, b);
});
