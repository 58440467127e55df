//! numpy array helpers: borrowing contiguous data and handing `Vec`s to numpy without copying.

use numpy::{Element, IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use crate::errors::tensor_error;

/// Borrows the elements of a C-contiguous array.
pub fn contiguous<'a, T: Element>(array: &'a PyReadonlyArrayDyn<'_, T>) -> PyResult<&'a [T]> {
    array
        .as_slice()
        .map_err(|_| tensor_error("array must be C-contiguous (use numpy.ascontiguousarray)"))
}

/// Moves a `Vec` into a numpy array of `shape` (no copy).
pub fn to_numpy<'py, T: Element>(
    py: Python<'py>,
    data: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    numpy::ndarray::ArrayD::from_shape_vec(shape, data)
        .map(|a| a.into_pyarray(py))
        .map_err(|e| tensor_error(format!("internal shape error: {e}")))
}

/// The shape of an array that must have `ndim` dimensions.
pub fn shape_of<const N: usize>(shape: &[usize], what: &str) -> PyResult<[usize; N]> {
    shape.try_into().map_err(|_| {
        tensor_error(format!(
            "{what} must have {N} dimensions, got shape {shape:?}"
        ))
    })
}
