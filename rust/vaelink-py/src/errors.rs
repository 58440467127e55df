//! Core errors -> the Python exception hierarchy defined in `vaelink/errors.py`.

use pyo3::exceptions::PyOSError;
use pyo3::PyErr;
use vaelink_core::Error;

pyo3::import_exception!(vaelink.errors, DecodeError);
pyo3::import_exception!(vaelink.errors, ImageTooLargeError);
pyo3::import_exception!(vaelink.errors, EncodeError);
pyo3::import_exception!(vaelink.errors, TensorError);
pyo3::import_exception!(vaelink.errors, FormatError);

pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Decode(_) => DecodeError::new_err(msg),
        Error::ImageTooLarge { .. } => ImageTooLargeError::new_err(msg),
        Error::Encode(_) => EncodeError::new_err(msg),
        Error::Tensor(_) => TensorError::new_err(msg),
        Error::Format(_) => FormatError::new_err(msg),
        Error::Io(e) => PyOSError::new_err(e.to_string()),
    }
}

/// `Result<T, core::Error>` -> `PyResult<T>`.
pub trait IntoPyResult<T> {
    fn py(self) -> pyo3::PyResult<T>;
}

impl<T> IntoPyResult<T> for vaelink_core::Result<T> {
    fn py(self) -> pyo3::PyResult<T> {
        self.map_err(to_py)
    }
}

pub fn tensor_error(msg: impl Into<String>) -> PyErr {
    TensorError::new_err(msg.into())
}
