"""The four element types of the remote-VAE wire format, their numpy dtypes, and conversions.

numpy has no bfloat16 of its own; vaelink uses `ml_dtypes.bfloat16` (the dtype JAX and ONNX use),
whose arrays cross into the Rust core as their uint16 bits, and converts float32 to it in the core.
ml_dtypes is imported on first use (`bfloat16_dtype()`), not with vaelink: it costs as much as the
rest of the package. `bfloat16` and `WIRE_DTYPES` are attributes of this module all the same."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import _native
from .errors import TensorError

__all__ = [
    "WIRE_DTYPES",
    "DTypeName",
    "bfloat16",
    "bfloat16_dtype",
    "dtype_name",
    "from_bfloat16",
    "from_bits",
    "is_bfloat16",
    "little_endian",
    "numpy_dtype",
    "to_bfloat16",
    "to_bits",
    "to_float32",
]

DTypeName = Literal["float16", "bfloat16", "float32", "uint8"]

_NAMES: tuple[DTypeName, ...] = ("float16", "bfloat16", "float32", "uint8")
_SIMPLE: dict[DTypeName, np.dtype] = {  # the wire dtypes numpy has itself
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "uint8": np.dtype("u1"),
}
_bfloat16: np.dtype | None = None
_wire_dtypes: dict[str, np.dtype] | None = None

if TYPE_CHECKING:  # module attributes, made on first access by __getattr__ below
    bfloat16: np.dtype
    WIRE_DTYPES: dict[str, np.dtype]


def bfloat16_dtype() -> np.dtype:
    """`ml_dtypes.bfloat16` as a numpy dtype, importing ml_dtypes on the first call."""
    global _bfloat16
    if _bfloat16 is None:
        import ml_dtypes

        _bfloat16 = np.dtype(ml_dtypes.bfloat16)
    return _bfloat16


def is_bfloat16(dtype: Any) -> bool:
    """Whether `dtype` is bfloat16. Never imports ml_dtypes: until something has, no array can be
    bfloat16."""
    bf16 = _bfloat16
    if bf16 is None:
        if sys.modules.get("ml_dtypes") is None:
            return False
        bf16 = bfloat16_dtype()
    return bool(dtype == bf16)


def _wire() -> dict[str, np.dtype]:
    global _wire_dtypes
    if _wire_dtypes is None:
        _wire_dtypes = {name: numpy_dtype(name) for name in _NAMES}
    return _wire_dtypes


def __getattr__(name: str) -> Any:
    """`bfloat16` and `WIRE_DTYPES` (name -> numpy dtype), made on first access."""
    if name == "bfloat16":
        return bfloat16_dtype()
    if name == "WIRE_DTYPES":
        return _wire()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a wire dtype name; `TensorError` for any other name."""
    if isinstance(name, str) and name == "bfloat16":
        return bfloat16_dtype()
    try:
        return _SIMPLE[name]  # type: ignore[index]
    except (KeyError, TypeError):
        expected = ", ".join(_NAMES)
        raise TensorError(f"unknown dtype {name!r}; expected one of {expected}") from None


def dtype_name(dtype: np.dtype | type) -> DTypeName:
    """The wire name of a numpy dtype; `TensorError` for dtypes the wire cannot carry."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    for name, candidate in _SIMPLE.items():
        if dt == candidate:
            return name
    if is_bfloat16(dt):
        return "bfloat16"
    raise TensorError(
        f"dtype {dt} cannot travel on the wire; use float16, bfloat16, float32 or uint8"
    )


def to_bits(array: np.ndarray) -> np.ndarray:
    """A bfloat16 array as its uint16 bits (a view); other arrays unchanged."""
    return array.view(np.uint16) if is_bfloat16(array.dtype) else array


def from_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bits from the core as a bfloat16 array (a view)."""
    return bits.view(bfloat16_dtype())


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array as the Rust core and the wire take it: C-contiguous, little-endian (a copy only
    when it is not already). 0-d arrays stay 0-d."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.require(array, requirements="C")


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 with round-to-nearest-even (NaN stays NaN), without torch.

    Args:
        array: A float array (converted to float32 first).

    Returns:
        A new `ml_dtypes.bfloat16` array of the same shape.
    """
    src = np.require(array, np.float32, "C")
    return from_bits(_native.f32_to_bf16(src))


def from_bfloat16(array: np.ndarray) -> np.ndarray:
    """bfloat16 (or its uint16 bits) -> float32, exactly.

    Args:
        array: An `ml_dtypes.bfloat16` array, or a uint16 array of bfloat16 bits.

    Returns:
        A new float32 array of the same shape.

    Raises:
        TensorError: An array of another dtype.
    """
    src = np.require(array, requirements="C")
    if src.dtype != np.uint16 and not is_bfloat16(src.dtype):
        raise TensorError(f"expected a bfloat16 array, got {src.dtype}")
    return _native.bf16_to_f32(to_bits(src))


def to_float32(array: np.ndarray) -> np.ndarray:
    """Any float array (bfloat16 included) as float32; float32 ones unchanged."""
    if is_bfloat16(array.dtype):
        return from_bfloat16(array)
    return array.astype(np.float32, copy=False)
