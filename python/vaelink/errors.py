"""The exceptions vaelink raises. Every one derives from `VaelinkError`; bad-input errors are also
`ValueError`s, so code that already catches `ValueError` keeps working."""

__all__ = [
    "DecodeError",
    "EncodeError",
    "FormatError",
    "ImageTooLargeError",
    "TensorError",
    "VaelinkError",
]


class VaelinkError(Exception):
    """Base class of every vaelink error."""


class DecodeError(VaelinkError, ValueError):
    """Image bytes that are empty, truncated, corrupt or of an unsupported format."""


class ImageTooLargeError(DecodeError):
    """An image whose header declares more pixels than `max_pixels` (checked before decoding)."""


class EncodeError(VaelinkError, ValueError):
    """Pixels that cannot be encoded with the requested format or settings."""


class TensorError(VaelinkError, ValueError):
    """A tensor with an inconsistent or unsupported shape, dtype, layout or byte length."""


class FormatError(VaelinkError, ValueError):
    """A compressed tensor or safetensors file that is malformed."""
