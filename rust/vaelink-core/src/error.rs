//! One error type for the whole core; every fallible call returns it, nothing panics on bad input.

/// What went wrong, grouped by the kind of mistake so that bindings can map each to one exception.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Image bytes that are not a supported, well-formed image.
    #[error("{0}")]
    Decode(String),
    /// An image whose header declares more pixels than allowed; raised before any large allocation.
    #[error("image of {width}x{height} ({pixels} pixels) exceeds the limit of {limit} pixels")]
    ImageTooLarge {
        width: u64,
        height: u64,
        pixels: u64,
        limit: u64,
    },
    /// An image that cannot be encoded with the requested settings.
    #[error("{0}")]
    Encode(String),
    /// A tensor whose shape, dtype or byte length is inconsistent or unsupported.
    #[error("{0}")]
    Tensor(String),
    /// A compressed tensor or safetensors file that is malformed.
    #[error("{0}")]
    Format(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for `Err(Error::Tensor(..))` with `format!` arguments.
macro_rules! tensor_err {
    ($($arg:tt)*) => { Err($crate::error::Error::Tensor(format!($($arg)*))) };
}
pub(crate) use tensor_err;
