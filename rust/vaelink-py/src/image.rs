//! Image codecs and pixel fitting.

use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vaelink_core::image_codec::{
    self, ChromaSubsampling, DecodeOptions, EncodeOptions, ImageFormat, PngCompression,
};
use vaelink_core::process::{self, FitMode};

use crate::arrays::{contiguous, shape_of, to_numpy};
use crate::errors::IntoPyResult;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_image, m)?)?;
    m.add_function(wrap_pyfunction!(probe_image, m)?)?;
    m.add_function(wrap_pyfunction!(encode_image, m)?)?;
    m.add_function(wrap_pyfunction!(fit_to_multiple, m)?)?;
    m.add_function(wrap_pyfunction!(resize_image, m)?)?;
    Ok(())
}

#[pyfunction]
#[pyo3(signature = (data, max_pixels, background=None))]
fn decode_image<'py>(
    py: Python<'py>,
    data: &[u8],
    max_pixels: u64,
    background: Option<[u8; 3]>,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let options = DecodeOptions {
        max_pixels,
        background,
    };
    let image = py.detach(|| image_codec::decode(data, &options)).py()?;
    to_numpy(py, image.data, &[image.height, image.width, 3])
}

#[pyfunction]
fn probe_image(py: Python<'_>, data: &[u8]) -> PyResult<(&'static str, usize, usize)> {
    let info = py.detach(|| image_codec::probe(data)).py()?;
    Ok((info.format.name(), info.width, info.height))
}

#[pyfunction]
#[pyo3(signature = (pixels, format, quality, png_level, subsampling = "4:2:0"))]
fn encode_image<'py>(
    py: Python<'py>,
    pixels: PyReadonlyArrayDyn<'py, u8>,
    format: &str,
    quality: u8,
    png_level: Option<u8>,
    subsampling: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let [height, width, _] = shape_of::<3>(pixels.shape(), "an RGB image")?;
    let options = EncodeOptions {
        format: ImageFormat::parse(format).py()?,
        quality,
        subsampling: ChromaSubsampling::parse(subsampling).py()?,
        png_compression: match png_level {
            None => PngCompression::Fast,
            Some(0) => PngCompression::None,
            Some(level) => PngCompression::Level(level),
        },
    };
    let data = contiguous(&pixels)?;
    let encoded = py
        .detach(|| image_codec::encode_rgb(data, width, height, &options))
        .py()?;
    Ok(PyBytes::new(py, &encoded))
}

#[pyfunction]
fn fit_to_multiple<'py>(
    py: Python<'py>,
    pixels: PyReadonlyArrayDyn<'py, u8>,
    multiple: usize,
    mode: &str,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let [height, width, _] = shape_of::<3>(pixels.shape(), "an RGB image")?;
    let mode = FitMode::parse(mode).py()?;
    let data = contiguous(&pixels)?;
    let fitted = py
        .detach(|| process::fit_to_multiple(data, width, height, multiple, mode))
        .py()?;
    to_numpy(py, fitted.data, &[fitted.height, fitted.width, 3])
}

#[pyfunction]
fn resize_image<'py>(
    py: Python<'py>,
    pixels: PyReadonlyArrayDyn<'py, u8>,
    width: usize,
    height: usize,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let [src_height, src_width, _] = shape_of::<3>(pixels.shape(), "an RGB image")?;
    let data = contiguous(&pixels)?;
    let resized = py
        .detach(|| process::resize(data, src_width, src_height, width, height))
        .py()?;
    to_numpy(py, resized.data, &[resized.height, resized.width, 3])
}
