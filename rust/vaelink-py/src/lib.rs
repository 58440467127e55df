//! `vaelink._native`: the Python face of `vaelink-core` and `vaelink-http`. Functions here only convert
//! arguments, release the GIL around the Rust call and map errors to `vaelink.errors`; the typed API is
//! in `python/vaelink`.

mod arrays;
mod errors;
mod http;
mod image;
mod tensor;

use pyo3::prelude::*;

// Output buffers of tens of MB are common (a 2048 x 2048 float tensor is 50 MB). glibc hands those
// back to the kernel on every free, so each call would page-fault its output in afresh; mimalloc
// keeps freed memory for reuse. Arrays returned to numpy are freed through this allocator too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add(
        "DEFAULT_MAX_PIXELS",
        vaelink_core::image_codec::DEFAULT_MAX_PIXELS,
    )?;
    m.add("DEFAULT_ZSTD_LEVEL", vaelink_core::compress::DEFAULT_LEVEL)?;
    image::register(m)?;
    tensor::register(m)?;
    http::register(m)?;
    Ok(())
}
